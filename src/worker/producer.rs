//! The producer side: upserts, dead letters, repartition records and changelog
//! records out, and every acknowledgement awaited before a batch counts as sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::client::producer_config;
use crate::config::Config;
use crate::error::Fate;
use crate::sink::{Sink, SinkError};
use crate::telemetry;

pub use crate::sink::Outputs;

/// Delivery results of the producer, counted per attempt. The producer's own
/// thread reports each delivery and wakes whoever waits for a batch
/// ([`KafkaSink::await_acks`]): a batch counts as sent the moment its last
/// acknowledgement arrives, with no polling interval to sit out.
///
/// Each record carries the number of the attempt that enqueued it (its
/// delivery opaque), and only the current attempt's reports count: an attempt
/// that timed out leaves records in flight (librdkafka's `message.timeout.ms`
/// outlasts the wait), and their late reports must not complete the next
/// attempt's count while some of its own records are unacknowledged.
#[derive(Default)]
pub struct DeliveryTracker {
    state: Mutex<DeliveryCounts>,
    delivered: Condvar,
}

#[derive(Default, Debug, Clone)]
pub(super) struct DeliveryCounts {
    /// The attempt these counts are for (see [`KafkaSink::reset_counts`]).
    attempt: usize,
    /// Reports of earlier attempts that arrived during this one (ignored).
    pub(super) stale: usize,
    pub(super) acked: usize,
    failed: usize,
    last_error: Option<String>,
    /// Fate of the worst delivery error of the batch.
    fate: Option<Fate>,
    /// Highest acknowledged offset per (topic, partition).
    pub(super) offsets: HashMap<(String, i32), i64>,
}

impl DeliveryTracker {
    /// (acknowledged, failed, last error) since creation or the last reset.
    pub fn outcome(&self) -> (usize, usize, Option<String>) {
        let counts = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (counts.acked, counts.failed, counts.last_error.clone())
    }
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, attempt: usize) {
        let report = match result {
            Ok(message) => Ok((message.topic(), message.partition(), message.offset())),
            Err((e, _)) => Err(e),
        };
        self.state.lock().unwrap_or_else(|p| p.into_inner()).observe(attempt, report);
        self.delivered.notify_all();
    }
}

impl DeliveryCounts {
    /// Start counting a new attempt from zero.
    fn next_attempt(&mut self) {
        let attempt = self.attempt.wrapping_add(1);
        *self = DeliveryCounts { attempt, ..DeliveryCounts::default() };
    }

    /// Count one delivery report of a record enqueued by `attempt`.
    fn observe(&mut self, attempt: usize, report: Result<(&str, i32, i64), &KafkaError>) {
        if attempt != self.attempt {
            self.stale += 1;
            return;
        }
        match report {
            Ok((topic, partition, offset)) => {
                self.acked += 1;
                let highest = self.offsets.entry((topic.to_string(), partition)).or_insert(-1);
                *highest = (*highest).max(offset);
            }
            Err(e) => {
                self.failed += 1;
                self.last_error = Some(e.to_string());
                let fate = produce_fate(e);
                if fate == Fate::Stop {
                    self.last_error = Some(format!("{e} ({UNFIXABLE})"));
                }
                if self.fate != Some(Fate::Stop) {
                    self.fate = Some(fate);
                }
            }
        }
    }
}

/// What a stopping produce error tells the operator.
const UNFIXABLE: &str = "retrying cannot fix this: check that the topic exists with a valid name, that this principal may write it (ACLs), that records fit message.max.bytes, and that this host's clock agrees with the broker's (records carry the current time; a topic refuses times outside its message.timestamp.before.max.ms and after.max.ms); then restart";

/// What a produce error means for the batch. Retrying cannot fix a record the
/// broker or client will never take (too large, invalid), a topic that does not
/// exist or may not be written, a record time the topic refuses (the host's
/// clock is off by more than the topic allows: re-sending the same time fails
/// the same way), or a configuration the client rejects: those stop
/// the worker with the reason instead of re-sending forever. Everything else
/// (timeouts, leader changes, a broker away) is retried.
pub fn produce_fate(error: &KafkaError) -> Fate {
    use rdkafka::types::RDKafkaErrorCode as Code;
    match error.rdkafka_error_code() {
        Some(
            Code::MessageSizeTooLarge
            | Code::InvalidMessageSize
            | Code::InvalidMessage
            | Code::InvalidRecord
            | Code::InvalidTimestamp
            | Code::InvalidTopic
            | Code::UnknownTopic
            | Code::TopicAuthorizationFailed
            | Code::ClusterAuthorizationFailed
            | Code::TransactionalIdAuthorizationFailed
            | Code::GroupAuthorizationFailed
            | Code::SaslAuthenticationFailed
            | Code::Authentication
            | Code::InvalidArgument
            | Code::InvalidRequiredAcks
            | Code::PolicyViolation,
        ) => Fate::Stop,
        _ => Fate::Retry,
    }
}

/// Sends upserts and dead letters to Kafka and waits for every acknowledgement.
pub struct KafkaSink {
    pub(super) producer: ThreadedProducer<DeliveryTracker>,
    output_topic: String,
    dead_letter_topic: String,
    /// `None`: decisions are not recorded (the pipeline makes none).
    decisions_topic: Option<String>,
    /// How long one attempt waits for acknowledgements.
    flush_timeout: Duration,
}

impl KafkaSink {
    pub fn new(config: &Config) -> Result<KafkaSink, KafkaError> {
        Ok(Self::with_producer(config, producer_config(config).create_with_context(DeliveryTracker::default())?))
    }

    pub(super) fn with_producer(config: &Config, producer: ThreadedProducer<DeliveryTracker>) -> KafkaSink {
        KafkaSink {
            producer,
            output_topic: config.kafka.output_topic.clone(),
            dead_letter_topic: config.kafka.dead_letter_topic.clone(),
            decisions_topic: config.kafka.decisions_topic.clone(),
            flush_timeout: Duration::from_secs(60),
        }
    }

    /// A new attempt: its records are numbered apart from every earlier one's.
    pub(super) fn reset_counts(&self) {
        self.producer.context().state.lock().unwrap_or_else(|p| p.into_inner()).next_attempt();
    }

    pub(super) fn attempt(&self) -> usize {
        self.producer.context().state.lock().unwrap_or_else(|p| p.into_inner()).attempt
    }

    pub(super) fn counts(&self) -> DeliveryCounts {
        self.producer.context().state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Wait until `total` records queued since the last reset are reported
    /// (acknowledged or failed), woken by each delivery report.
    pub(super) fn await_acks(&self, total: usize) -> Result<DeliveryCounts, SinkError> {
        let tracker = self.producer.context();
        let deadline = Instant::now() + self.flush_timeout;
        let mut counts = tracker.state.lock().unwrap_or_else(|p| p.into_inner());
        while counts.acked + counts.failed < total {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            counts = tracker.delivered.wait_timeout(counts, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        let counts = counts.clone();
        if counts.acked == total && counts.failed == 0 {
            return Ok(counts);
        }
        Err(SinkError::Kafka {
            failed: total - counts.acked.min(total),
            total,
            reason: counts.last_error.clone().unwrap_or_else(|| format!("not acknowledged within {:?}", self.flush_timeout)),
            fate: counts.fate.unwrap_or(Fate::Retry),
        })
    }

    /// Queue every record of a batch (keys and headers as documented).
    /// The records of `outputs` this sink produces (decisions only with a
    /// decisions topic).
    pub(super) fn count(&self, outputs: Outputs<'_>) -> usize {
        if self.decisions_topic.is_some() {
            outputs.len()
        } else {
            outputs.len() - outputs.decisions.len()
        }
    }

    pub(super) fn enqueue_all(&self, outputs: Outputs<'_>) -> Result<(), SinkError> {
        // Read once per batch, not per record: the tracker's lock is shared
        // with the producer's delivery thread.
        let attempt = self.attempt();
        for routed in outputs.routed {
            let base = BaseRecord::to(&routed.topic).key(routed.key.as_str()).payload(&routed.payload[..]).partition(routed.partition);
            self.enqueue_record(base, attempt)?;
        }
        for upsert in outputs.upserts {
            let payload = serde_json::to_vec(upsert).map_err(std::io::Error::other)?;
            let headers = OwnedHeaders::new()
                .insert(Header { key: "milestone-id", value: Some(upsert.milestone_id.as_str()) })
                .insert(Header { key: "tenant-id", value: Some(upsert.tenant_id.as_str()) });
            self.enqueue(&self.output_topic, &upsert.key(), &payload, headers, attempt)?;
        }
        for dead in outputs.dead_letters {
            let payload = serde_json::to_vec(dead).map_err(std::io::Error::other)?;
            let headers = OwnedHeaders::new().insert(Header { key: "error-kind", value: Some(dead.error_kind.as_str()) });
            self.enqueue(&self.dead_letter_topic, &dead.key(), &payload, headers, attempt)?;
        }
        if let Some(topic) = &self.decisions_topic {
            for decision in outputs.decisions {
                let payload = serde_json::to_vec(decision).map_err(std::io::Error::other)?;
                let label = decision.decision.label();
                let headers = OwnedHeaders::new()
                    .insert(Header { key: "decision", value: Some(label) })
                    .insert(Header { key: "tenant-id", value: Some(decision.tenant_id.as_str()) });
                self.enqueue(topic, &decision.key(), &payload, headers, attempt)?;
            }
        }
        Ok(())
    }

    fn enqueue(&self, topic: &str, key: &str, payload: &[u8], headers: OwnedHeaders, attempt: usize) -> Result<(), SinkError> {
        self.enqueue_record(BaseRecord::to(topic).key(key).payload(payload).headers(headers), attempt)
    }

    pub(super) fn enqueue_record<K: rdkafka::message::ToBytes + ?Sized>(&self, record: BaseRecord<'_, K, [u8]>, attempt: usize) -> Result<(), SinkError> {
        let mut record = numbered(record, attempt);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                    // Backpressure: the local queue is bounded; wait for deliveries.
                    record = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((e, _)) => {
                    let fate = produce_fate(&e);
                    let reason = if fate == Fate::Stop { format!("{e} ({UNFIXABLE})") } else { e.to_string() };
                    return Err(SinkError::Kafka { failed: 1, total: 1, reason, fate });
                }
            }
        }
    }
}

/// `record`, carrying the attempt that enqueues it (see [`DeliveryTracker`]).
pub(crate) fn numbered<'a, K: rdkafka::message::ToBytes + ?Sized, P: rdkafka::message::ToBytes + ?Sized>(record: BaseRecord<'a, K, P>, attempt: usize) -> BaseRecord<'a, K, P, usize> {
    BaseRecord {
        topic: record.topic,
        partition: record.partition,
        payload: record.payload,
        key: record.key,
        timestamp: record.timestamp,
        headers: record.headers,
        delivery_opaque: attempt,
    }
}

impl Sink for KafkaSink {
    fn send(&mut self, outputs: Outputs<'_>) -> Result<(), SinkError> {
        let total = self.count(outputs);
        if total == 0 {
            return Ok(());
        }
        self.reset_counts();
        self.enqueue_all(outputs)?;
        self.await_acks(total).map(|_| ())
    }

    // No `send_state`: this producer has no fence, so state changes never go
    // to a changelog through it (a member the group has replaced could append
    // them after the new owner's). They go through a transaction with the
    // batch's offsets instead (`TransactionalSink`).
}

/// Re-sends a batch until Kafka acknowledges all of it. Gives up only when a
/// shutdown has waited longer than its deadline: then nothing of the batch is
/// claimed and it is re-processed on restart.
pub struct RetryingSink<'a> {
    pub inner: &'a mut KafkaSink,
    pub shutdown: &'a AtomicBool,
    pub deadline: Duration,
}

impl RetryingSink<'_> {
    fn retrying(&mut self, what: &str, mut attempt: impl FnMut(&mut KafkaSink) -> Result<(), SinkError>) -> Result<(), SinkError> {
        let mut retry = Retry::new(self.shutdown, self.deadline, Duration::from_millis(500));
        loop {
            match attempt(self.inner) {
                Ok(()) => return Ok(()),
                Err(e) if e.fate() == Fate::Retry => {
                    if retry.gave_up() {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, attempt = retry.attempt + 1, "{what} not acknowledged; re-sending (identical records)");
                    metrics::counter!(telemetry::OUTPUT_RETRIES).increment(1);
                    // No consumer poll here: a poll could hand out (and so skip) a record.
                    retry.back_off();
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Sink for RetryingSink<'_> {
    fn send(&mut self, outputs: Outputs<'_>) -> Result<(), SinkError> {
        self.retrying("output", |sink| sink.send(outputs))
    }
}

/// Retry policy of a batch's output: retry forever with linear back-off (capped at
/// ten steps), except once a shutdown has waited longer than its deadline.
pub struct Retry<'a> {
    shutdown: &'a AtomicBool,
    deadline: Duration,
    step: Duration,
    pub attempt: u32,
    shutdown_seen: Option<Instant>,
}

impl<'a> Retry<'a> {
    pub fn new(shutdown: &'a AtomicBool, deadline: Duration, step: Duration) -> Self {
        Retry { shutdown, deadline, step, attempt: 0, shutdown_seen: None }
    }

    /// True when a shutdown is under way and has waited past its deadline.
    pub fn gave_up(&mut self) -> bool {
        if !self.shutdown.load(Ordering::SeqCst) {
            return false;
        }
        self.shutdown_seen.get_or_insert_with(Instant::now).elapsed() >= self.deadline
    }

    pub fn back_off(&mut self) {
        self.attempt += 1;
        std::thread::sleep(self.step.saturating_mul(self.attempt.min(10)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode as Code;

    #[test]
    fn errors_that_retrying_cannot_fix_stop_the_worker() {
        for code in [Code::MessageSizeTooLarge, Code::TopicAuthorizationFailed, Code::UnknownTopic, Code::InvalidRecord, Code::InvalidTimestamp] {
            assert_eq!(produce_fate(&KafkaError::MessageProduction(code)), Fate::Stop, "{code:?}");
        }
        for code in [Code::RequestTimedOut, Code::NotLeaderForPartition, Code::BrokerTransportFailure, Code::MessageTimedOut] {
            assert_eq!(produce_fate(&KafkaError::MessageProduction(code)), Fate::Retry, "{code:?}");
        }
    }

    /// Attempt 1 of a batch (a1..a5 to a slow partition, b1 to one that is
    /// down) timed out and was retried as attempt 2 (six records again). The
    /// late acknowledgements of a1..a5 and of a1' make six: counted by number,
    /// the batch would pass while b1' is unacknowledged, and its offsets and
    /// state would move past a record that is later lost.
    #[test]
    fn late_reports_of_an_earlier_attempt_do_not_count() {
        let mut counts = DeliveryCounts::default();
        counts.next_attempt();
        let first = counts.attempt;
        counts.next_attempt();
        let second = counts.attempt;
        for offset in 0..5 {
            counts.observe(first, Ok(("out", 1, offset)));
        }
        counts.observe(second, Ok(("out", 1, 5)));
        assert_eq!(counts.acked, 1, "only the current attempt's acknowledgements count");
        assert_eq!(counts.stale, 5);
        let timed_out = KafkaError::MessageProduction(Code::MessageTimedOut);
        counts.observe(first, Err(&timed_out));
        assert_eq!(counts.failed, 0, "an earlier attempt's failure is not this attempt's");
        assert_eq!(counts.offsets.get(&("out".to_string(), 1)), Some(&5));
    }
}
