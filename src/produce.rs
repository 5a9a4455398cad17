//! `waymark produce`: put a `kcat -C -J` archive back on Kafka, keys and headers
//! included, so dumps, dead-letter topics and backfills can be re-driven with
//! one command. Records get the current time by default: an archive's own
//! times are often older than the topic's retention, and the broker would
//! delete such records before the worker reads them. `--keep-timestamps`
//! keeps them, and refuses a record its topic's retention would delete on
//! arrival. Bodies that are not UTF-8 travel in the archive as
//! `payload_base64` and are produced as the original bytes.
//!
//! With `dead_letters`, each line is a record of the dead-letter topic (its value
//! a Waymark dead letter): the original record inside it is produced again, to
//! its own topic unless one is given. A dead letter whose body was trimmed to fit
//! cannot be re-driven from itself: it is reported, and skipped.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use thiserror::Error;

use crate::envelope::Envelope;
use crate::worker::producer::DeliveryTracker;

#[derive(Debug, Error)]
pub enum ProduceError {
    #[error("line {line}: {reason} (each line must be a kcat -J record{hint})")]
    Line { line: u64, reason: String, hint: &'static str },
    #[error("cannot read the archive: {0}")]
    Read(#[from] std::io::Error),
    #[error("Kafka producer: {0} (check --brokers / kafka.brokers and the librdkafka properties)")]
    Kafka(String),
    #[error("{failed} of {total} records were not acknowledged: {reason}")]
    Unacknowledged { failed: usize, total: usize, reason: String },
    #[error("line {line}: the record's timestamp ({at}) is older than topic `{topic}` keeps records (retention.ms = {retention_ms}): the broker would delete it before anyone reads it. Drop --keep-timestamps (records then get the current time), or raise the topic's retention.ms; {sent} earlier records were produced")]
    OutsideRetention { line: u64, at: String, topic: String, retention_ms: i64, sent: u64 },
}

impl ProduceError {
    /// Exit code: 2 when the command line or a topic setting must change.
    pub fn exit_code(&self) -> u8 {
        match self {
            ProduceError::OutsideRetention { .. } => 2,
            _ => 1,
        }
    }
}

/// Where records go.
pub struct ProduceOptions {
    /// Every record to this topic (`None`: each record's own topic).
    pub topic: Option<String>,
    /// Keep each record's partition (else the producer's partitioner, by key).
    pub keep_partitions: bool,
    /// Lines are dead letters: produce the original record each carries.
    pub dead_letters: bool,
    /// Keep each record's archived timestamp (else the current time).
    pub keep_timestamps: bool,
}

/// What a run produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Produced {
    pub records: u64,
    pub bytes: u64,
    /// Dead letters whose body was trimmed (not re-driven), by source.
    pub skipped_truncated: Vec<String>,
    /// Records per topic.
    pub per_topic: BTreeMap<String, u64>,
}

/// One archive line to the record to produce.
fn record_of(line: &str, line_no: u64, options: &ProduceOptions) -> Result<Option<Envelope>, ProduceError> {
    let bad = |reason: String| ProduceError::Line {
        line: line_no,
        reason,
        hint: if options.dead_letters { " of the dead-letter topic" } else { "" },
    };
    let record = Envelope::from_kcat_json(line).map_err(|e| bad(e.to_string()))?;
    if !options.dead_letters {
        return Ok(Some(record));
    }
    let dead: crate::output::DeadLetter =
        serde_json::from_slice(&record.payload).map_err(|e| bad(format!("its value is not a Waymark dead letter: {e}")))?;
    if dead.envelope.is_truncated() {
        return Ok(None);
    }
    dead.envelope.to_envelope().map(Some).map_err(|e| bad(format!("its original record cannot be rebuilt: {e}")))
}

/// Each target topic's `retention.ms`, asked once (`None`: unlimited, or
/// unknown: the broker could not say, and the record goes as it is).
#[derive(Default)]
struct Retention {
    topics: BTreeMap<String, Option<i64>>,
    admin: Option<crate::worker::topics::Admin>,
}

impl Retention {
    fn of(&mut self, client: &ClientConfig, topic: &str) -> Option<i64> {
        if let Some(known) = self.topics.get(topic) {
            return *known;
        }
        if self.admin.is_none() {
            self.admin = crate::worker::topics::Admin::new(client, Duration::from_secs(10)).ok();
        }
        let retention = self
            .admin
            .as_ref()
            .and_then(|admin| admin.config_value(topic, "retention.ms"))
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|ms| *ms >= 0);
        self.topics.insert(topic.to_string(), retention);
        retention
    }
}

/// Produce every line of `reader`; `progress` is told the running count.
pub fn produce(
    client: &ClientConfig,
    reader: &mut dyn BufRead,
    options: &ProduceOptions,
    progress: &mut dyn FnMut(&Produced),
) -> Result<Produced, ProduceError> {
    let producer: ThreadedProducer<DeliveryTracker> =
        client.create_with_context(DeliveryTracker::default()).map_err(|e| ProduceError::Kafka(e.to_string()))?;
    let mut produced = Produced::default();
    let mut retention = Retention::default();
    let mut line = Vec::new();
    let mut line_no = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        line_no += 1;
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let Some(envelope) = record_of(text, line_no, options)? else {
            produced.skipped_truncated.push(format!("line {line_no}"));
            continue;
        };
        let topic = options.topic.clone().unwrap_or_else(|| envelope.topic.clone());
        let mut headers = OwnedHeaders::new();
        for (name, value) in &envelope.headers {
            headers = headers.insert(Header { key: name, value: value.as_deref() });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&topic).payload(&envelope.payload[..]).headers(headers);
        if let Some(key) = &envelope.key {
            record = record.key(&key[..]);
        }
        if let Some(ts) = envelope.timestamp_ms.filter(|_| options.keep_timestamps) {
            if let Some(retention_ms) = retention.of(client, &topic) {
                let now_ms = chrono::Utc::now().timestamp_millis();
                if ts < now_ms.saturating_sub(retention_ms) {
                    let at = chrono::DateTime::from_timestamp_millis(ts).map_or_else(|| ts.to_string(), |t| t.to_rfc3339());
                    producer.flush(Duration::from_secs(120)).map_err(|e| ProduceError::Kafka(e.to_string()))?;
                    return Err(ProduceError::OutsideRetention { line: line_no, at, topic, retention_ms, sent: produced.records });
                }
            }
            record = record.timestamp(ts);
        }
        if options.keep_partitions && envelope.partition >= 0 {
            record = record.partition(envelope.partition);
        }
        let mut record = crate::worker::producer::numbered(record, 0);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(ProduceError::Kafka(format!("line {line_no}: {e}"))),
            }
        }
        produced.records += 1;
        produced.bytes += envelope.payload.len() as u64;
        *produced.per_topic.entry(topic).or_default() += 1;
        if produced.records % 10_000 == 0 {
            progress(&produced);
        }
    }
    producer.flush(Duration::from_secs(120)).map_err(|e| ProduceError::Kafka(e.to_string()))?;
    let (acked, failed, reason) = producer.context().outcome();
    if acked as u64 != produced.records || failed > 0 {
        return Err(ProduceError::Unacknowledged {
            failed: produced.records as usize - acked.min(produced.records as usize),
            total: produced.records as usize,
            reason: reason.unwrap_or_else(|| "not acknowledged in time".into()),
        });
    }
    progress(&produced);
    Ok(produced)
}
