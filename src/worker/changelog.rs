//! State hand-over between instances: every state change the worker commits is
//! also written to a compacted **changelog topic**, and the local RocksDB is a
//! cache of it (Kafka Streams' model, layered on transactional outputs).
//!
//! - One changelog topic per stateful topic (the repartition topic, or each input
//!   topic with `routing.mode = "input"`), named by [`topic_for`], with as many
//!   partitions: the changes of home partition `p` go to changelog partition `p`,
//!   keyed by keyspace byte + state key (so compaction keeps the latest value of
//!   each key). Progress is not logged: the group's committed offsets are
//!   authoritative when a partition moves.
//! - `exactly-once`: the changelog records are part of the batch's transaction, so
//!   they commit atomically with the outputs and the input offsets.
//!   `at-least-once`: they commit in a transaction of their own with the batch's
//!   input offsets, after the outputs are acknowledged and before the local
//!   state write, so neither the changelog nor the store ever claims an event
//!   whose upserts were not acknowledged, and a member the group has replaced
//!   cannot append older state after the new owner's (its offsets are refused,
//!   its records aborted).
//! - On assignment of a partition, the worker first asks the group for its
//!   committed offset (which, for a `read_committed` consumer, waits for pending
//!   transactional commits), then replays the changelog partition into the store
//!   from where this store last read it up to its end (`read_committed`), and only
//!   then starts consuming at the committed offset. Replaying is idempotent (puts
//!   in log order), so reading from an older position is always safe; after each
//!   batch the store also records the changelog offsets of its own writes, so a
//!   partition that comes back reads only what others wrote meanwhile.
//! - Retention: `cleanup.policy=compact,delete` with `retention.ms` = the longest
//!   dedupe TTL plus a day; every entry expires by then anyway.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Message, Offset, TopicPartitionList};
use thiserror::Error;

use super::producer::DeliveryTracker;
use super::topics::{Admin, TopicError};
use crate::error::StoreError;
use crate::pipeline::{progress_key, stored_offset};
use crate::state::{Keyspace, Scope, StateBatch, StateStore};
use crate::store::RocksStore;
use crate::telemetry;

/// Why the changelog could not be set up or replayed. The worker stops on it (a
/// partition must not be processed with state it could not restore); a restart
/// tries again.
#[derive(Debug, Error)]
pub enum ChangelogError {
    #[error("changelog topic `{1}`: {0} (check that the brokers are reachable; the worker needs rights to describe and create topics, or create the topic yourself: cleanup.policy=compact,delete, as many partitions as its input)")]
    Setup(String, String),
    #[error("topic `{0}` does not exist or has no partitions: create it before starting the worker")]
    MissingInput(String),
    #[error("restoring {topic} [{partition}] from its changelog: {reason}")]
    Restore { topic: String, partition: i32, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Name of the changelog topic of one stateful topic: `<topic>-changelog` for the
/// group's own internal topics (`waymark-repartition-changelog`),
/// `<group_id>-<topic>-changelog` for an input topic.
pub fn topic_for(group_id: &str, topic: &str) -> String {
    match topic.strip_prefix(group_id).and_then(|rest| rest.strip_prefix('-')) {
        Some(_) => format!("{topic}-changelog"),
        None => format!("{group_id}-{topic}-changelog"),
    }
}

/// Changelog record key: the keyspace's index, then the state key.
pub fn encode_key(keyspace: Keyspace, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 1);
    out.push(keyspace.index() as u8);
    out.extend_from_slice(key);
    out
}

/// The state entry a changelog record carries.
pub fn decode(key: &[u8], value: &[u8]) -> Result<(Keyspace, Vec<u8>, Vec<u8>), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { keyspace: "changelog", reason };
    let (&index, state_key) = key.split_first().ok_or_else(|| corrupt("empty record key".into()))?;
    let keyspace = Keyspace::ALL
        .get(index as usize)
        .copied()
        .filter(|k| *k != Keyspace::Offsets)
        .ok_or_else(|| corrupt(format!("record key names keyspace {index}, which is not logged")))?;
    if state_key.len() < 8 {
        return Err(corrupt(format!("state key of {} bytes has no scope", state_key.len())));
    }
    Ok((keyspace, state_key.to_vec(), value.to_vec()))
}

/// Can this value be a state entry of its keyspace? Dedupe entries need their
/// expiry (readers take the first 8 bytes, and the content hash after it when
/// present); a shipment state must decode exactly as the pipeline will read it,
/// or the first event of that shipment would stop the worker, and every member
/// that restored it after (a crash loop across the group). A tombstone (empty
/// value) or a foreign value is not restorable.
pub fn restorable(keyspace: Keyspace, value: &[u8]) -> bool {
    match keyspace {
        Keyspace::Shipments => crate::order::ShipmentState::decode(value).is_ok(),
        Keyspace::Keys | Keyspace::Hashes | Keyspace::Offsets => keyspace.expiry(value).is_some(),
    }
}

/// Key of the marker `waymark state drop` writes to a changelog partition. No
/// keyspace has index 0xff, so it is never mistaken for a state entry (a Waymark
/// that does not know it skips it as foreign). Compaction keeps the latest
/// marker; a restore that reads one forgets everything the partition's changelog
/// held before it, so a dropped partition stays dropped when it moves.
pub const DROP_MARKER_KEY: &[u8] = b"\xffwaymark.state-dropped";

/// Write the drop marker to the changelog partition of `input_topic` [`partition`]
/// and wait until the broker acknowledges it. `client` is the worker's producer
/// configuration ([`super::client::producer_config`]). `Ok(false)`: the group has
/// no changelog topic for `input_topic`, so there is nothing a restore could
/// bring back.
pub fn write_drop_marker(
    client: &ClientConfig,
    group_id: &str,
    input_topic: &str,
    partition: i32,
    at: chrono::DateTime<chrono::Utc>,
    timeout: Duration,
) -> Result<bool, ChangelogError> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    let changelog = topic_for(group_id, input_topic);
    let failed = |reason: String| ChangelogError::Setup(format!("cannot write the drop marker to partition {partition}: {reason}"), changelog.clone());
    let mut client = client.clone();
    client.set("message.timeout.ms", timeout.as_millis().to_string());
    let producer: BaseProducer<DeliveryTracker> =
        client.create_with_context(DeliveryTracker::default()).map_err(|e| failed(e.to_string()))?;
    let metadata = producer.client().fetch_metadata(Some(&changelog), timeout).map_err(|e| failed(e.to_string()))?;
    let partitions = metadata.topics().iter().find(|t| t.name() == changelog && t.error().is_none()).map_or(0, |t| t.partitions().len());
    if partitions == 0 {
        return Ok(false);
    }
    if partition < 0 || partition as usize >= partitions {
        return Err(failed(format!("the topic has {partitions} partitions")));
    }
    let value = serde_json::json!({"kind": "state_dropped", "topic": input_topic, "partition": partition, "at": at}).to_string();
    producer
        .send(super::producer::numbered(BaseRecord::<[u8], String>::to(&changelog).partition(partition).key(DROP_MARKER_KEY).payload(&value), 0))
        .map_err(|(e, _)| failed(e.to_string()))?;
    producer.flush(timeout).map_err(|e| failed(e.to_string()))?;
    match producer.context().outcome() {
        (1, _, _) => Ok(true),
        (_, _, Some(reason)) => Err(failed(reason)),
        _ => Err(failed(format!("no acknowledgement within {timeout:?}"))),
    }
}

/// Marks a changelog position key apart from a progress key: a topic name never
/// starts with a NUL byte.
const POSITION_MARK: &[u8] = b"\0changelog\0";

/// Where the store remembers how far it has read (or written) one input
/// partition's changelog: scope | partition | mark | topic, in the offsets keyspace.
pub fn position_key(input_topic: &str, partition: i32) -> Vec<u8> {
    let mut key = Scope::of(input_topic, partition).0.to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key.extend_from_slice(POSITION_MARK);
    key.extend_from_slice(input_topic.as_bytes());
    key
}

/// The input partition of a progress key (`None` for any other offsets entry).
fn progress_partition(key: &[u8]) -> Option<(String, i32)> {
    let partition = i32::from_be_bytes(key.get(8..12)?.try_into().ok()?);
    let topic = key.get(12..)?;
    if topic.is_empty() || topic.starts_with(b"\0") {
        return None;
    }
    let topic = std::str::from_utf8(topic).ok()?;
    (progress_key(topic, partition) == key).then(|| (topic.to_string(), partition))
}

/// One state change on its way to the changelog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogRecord {
    pub input_topic: String,
    pub topic: String,
    pub partition: i32,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// The changelog records of a batch's state. Each state key belongs to the input
/// partition whose scope prefixes it; the batch's progress entries say which
/// partitions those are (the worker always stages progress).
///
/// Shipment states come first. Both modes now write them in a transaction, so a
/// crash leaves all of a batch or none of it to a `read_committed` restore; the
/// order still matters for a changelog written by an earlier Waymark without
/// one, where a crash in the middle of sending them could leave a prefix of each
/// partition's records: a restore from it then holds a dedupe key only when every shipment state of the
/// batch is there too, so re-processing the batch re-applies what is missing and
/// ends every shipment where the uninterrupted run did. Keys first would let a
/// restored key turn its event into a duplicate whose status never reaches the
/// shipment (the status would move back).
pub fn records(batch: &StateBatch, group_id: &str) -> Result<Vec<ChangelogRecord>, StoreError> {
    let partitions: HashMap<&[u8], (String, i32)> = batch
        .puts
        .iter()
        .filter(|(keyspace, _, _)| *keyspace == Keyspace::Offsets)
        .filter_map(|(_, key, _)| Some((&key[..8], progress_partition(key)?)))
        .collect();
    let mut out = Vec::new();
    let shipments_first = batch
        .puts
        .iter()
        .filter(|(keyspace, _, _)| *keyspace == Keyspace::Shipments)
        .chain(batch.puts.iter().filter(|(keyspace, _, _)| *keyspace != Keyspace::Shipments));
    for (keyspace, key, value) in shipments_first {
        if *keyspace == Keyspace::Offsets {
            continue;
        }
        let (input_topic, partition) = key.get(..8).and_then(|scope| partitions.get(scope)).ok_or_else(|| StoreError::Corrupt {
            keyspace: keyspace.name(),
            reason: "a staged state key belongs to no partition of its batch (no progress entry for its scope)".into(),
        })?;
        out.push(ChangelogRecord {
            input_topic: input_topic.clone(),
            topic: topic_for(group_id, input_topic),
            partition: *partition,
            key: encode_key(*keyspace, key),
            value: value.clone(),
        });
    }
    Ok(out)
}

/// Record, in the batch about to be written locally, how far the changelog holds
/// this store's own writes: `delivered` maps (changelog topic, partition) to the
/// highest acknowledged offset.
pub fn stage_positions(batch: &mut StateBatch, records: &[ChangelogRecord], delivered: &HashMap<(String, i32), i64>) {
    let mut seen: HashMap<(&str, i32), &str> = HashMap::new();
    for record in records {
        seen.insert((&record.topic, record.partition), &record.input_topic);
    }
    for ((topic, partition), input_topic) in seen {
        if let Some(offset) = delivered.get(&(topic.to_string(), partition)) {
            batch.put(Keyspace::Offsets, position_key(input_topic, partition), (offset + 1).to_be_bytes().to_vec());
        }
    }
}

/// The stored changelog position of an input partition.
pub fn stored_position<S: StateStore + ?Sized>(store: &S, input_topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
    stored_offset(store, &position_key(input_topic, partition))
}

/// Make sure every stateful topic has its changelog topic with at least as many
/// partitions (created compacted if missing; grown if its topic grew).
pub fn ensure_topics(admin: &Admin, group_id: &str, stateful_topics: &[String], replication: i32, retention: Duration) -> Result<(), ChangelogError> {
    let retention_ms = retention.as_millis().to_string();
    for input in stateful_topics {
        let changelog = topic_for(group_id, input);
        let setup = |e: TopicError| ChangelogError::Setup(e.to_string(), changelog.clone());
        let wanted = admin.partitions_of(input).map_err(setup)?;
        if wanted == 0 {
            return Err(ChangelogError::MissingInput(input.clone()));
        }
        let have = admin.partitions_of(&changelog).map_err(setup)?;
        if have == 0 {
            admin
                .create(&changelog, wanted, replication, &[("cleanup.policy", "compact,delete"), ("retention.ms", &retention_ms)])
                .map_err(setup)?;
            tracing::info!(topic = %changelog, partitions = wanted, "created the changelog topic");
        } else {
            match admin.config_value(&changelog, "cleanup.policy") {
                Some(policy) if policy.contains("compact") => {}
                Some(policy) => tracing::warn!(
                    topic = %changelog, %policy,
                    "the changelog topic is not compacted: old state may be deleted before it expires; set cleanup.policy=compact,delete on it"
                ),
                None => tracing::debug!(topic = %changelog, "could not read the changelog topic's cleanup.policy"),
            }
            // Every entry must outlive its TTL in the changelog: a TTL raised
            // since the topic was created raises its retention now.
            admin.ensure_retention(&changelog, retention).map_err(setup)?;
        }
        if have > 0 && have < wanted {
            admin.grow(&changelog, wanted).map_err(setup)?;
            tracing::info!(topic = %changelog, from = have, to = wanted, "grew the changelog topic with its input");
        }
    }
    Ok(())
}

/// The restore consumer's context: reaching the end of the changelog is how a
/// restore finishes, not an error worth logging (librdkafka reports it as one).
struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::error!(error = %error, reason, "changelog restore consumer error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

/// Replays changelog partitions into the local store.
#[derive(Clone)]
pub struct Restorer {
    client: ClientConfig,
    group_id: String,
    /// Longest a restore may go without progress (no record read, the group's
    /// committed offset not readable, the partition not startable) before the
    /// worker gives up and stops. A long restore that keeps reading is never cut.
    pub timeout: Duration,
}

/// How a restore ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    /// The store holds the changelog up to its end; this many entries were applied.
    Done(u64),
    /// This store's changelog position lies beyond the changelog's end: the
    /// changelog topic was deleted and re-created (or emptied). The store keeps
    /// its state (nothing in the new changelog is newer); later writes go on in
    /// the new topic, and the position follows them.
    Recreated { position: i64, end: i64 },
}

impl Restorer {
    /// `client` carries the connection properties (bootstrap servers, security).
    pub fn new(mut client: ClientConfig, group_id: &str, timeout: Duration) -> Restorer {
        client
            .set("group.id", format!("{group_id}-changelog-restore"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            // The end is reached when a fetch comes back empty: don't let the
            // broker hold that fetch for the default 500 ms per partition.
            .set("fetch.wait.max.ms", "10")
            .set("auto.offset.reset", "earliest");
        Restorer { client, group_id: group_id.to_string(), timeout }
    }

    /// Start restoring one input partition: the changelog's end is read now,
    /// the records come with [`RestoreSession::step`].
    pub fn begin(&self, store: &RocksStore, input_topic: &str, partition: i32) -> Result<RestoreSession, ChangelogError> {
        let failed = |reason: String| ChangelogError::Restore { topic: input_topic.to_string(), partition, reason };
        let changelog = topic_for(&self.group_id, input_topic);
        // A client that cannot be created is a configuration error (fatal); an
        // end that cannot be read yet is transient (the caller asks again), so
        // it is asked with a short timeout: the worker thread must poll soon.
        let consumer: BaseConsumer<QuietEof> =
            self.client.create_with_context(QuietEof).map_err(|e| ChangelogError::Setup(e.to_string(), changelog.clone()))?;
        let (_, high) = consumer.fetch_watermarks(&changelog, partition, Duration::from_secs(5)).map_err(|e| failed(e.to_string()))?;
        let from = stored_position(store, input_topic, partition)?;
        let mut session = RestoreSession {
            consumer,
            changelog,
            input_topic: input_topic.to_string(),
            partition,
            position: position_key(input_topic, partition),
            timeout: self.timeout,
            batch: StateBatch::default(),
            applied: 0,
            skipped: 0,
            next: None,
            started: Instant::now(),
            last_read: Instant::now(),
            finished: None,
        };
        match from {
            Some(from) if from > high => session.finished = Some(Restored::Recreated { position: from, end: high }),
            Some(from) if from == high => session.finished = Some(Restored::Done(0)),
            _ if high == 0 => session.finished = Some(Restored::Done(0)),
            _ => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&session.changelog, partition, from.map_or(Offset::Beginning, Offset::Offset))
                    .map_err(|e| failed(e.to_string()))?;
                session.consumer.assign(&tpl).map_err(|e| failed(e.to_string()))?;
            }
        }
        Ok(session)
    }
}

/// One partition's restore in progress: read in slices, so that the worker
/// polls its group consumer between them (a restore longer than
/// `max.poll.interval.ms` must not cost the member its membership).
pub struct RestoreSession {
    consumer: BaseConsumer<QuietEof>,
    changelog: String,
    input_topic: String,
    partition: i32,
    position: Vec<u8>,
    timeout: Duration,
    batch: StateBatch,
    applied: u64,
    skipped: u64,
    next: Option<i64>,
    started: Instant,
    /// The last time a record (or an empty fetch that was not the end) came.
    last_read: Instant,
    finished: Option<Restored>,
}

impl RestoreSession {
    /// Entries applied so far.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Read for at most `budget`. `Some` when the restore is complete (its state
    /// is in the store); `None` when there is more to read. Fails when nothing
    /// could be read for the restorer's timeout.
    pub fn step(&mut self, store: &RocksStore, budget: Duration) -> Result<Option<Restored>, ChangelogError> {
        if let Some(finished) = self.finished {
            return Ok(Some(self.finish(store, finished)?));
        }
        let slice = Instant::now();
        let (input_topic, partition) = (self.input_topic.clone(), self.partition);
        let failed = |reason: String| ChangelogError::Restore { topic: input_topic.clone(), partition, reason };
        while slice.elapsed() < budget {
            if self.last_read.elapsed() > self.timeout {
                return Err(failed(format!(
                    "no changelog record could be read for {:?} ({} entries applied; check the brokers, or raise worker.restore_timeout)",
                    self.timeout, self.applied
                )));
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    // The consumer's position is past any trailing transaction markers.
                    let at_end = self
                        .consumer
                        .position()
                        .ok()
                        .and_then(|p| p.find_partition(&self.changelog, self.partition).map(|e| e.offset()))
                        .and_then(|o| if let Offset::Offset(n) = o { Some(n) } else { None });
                    self.next = at_end.or(self.next);
                    return Ok(Some(self.finish(store, Restored::Done(self.applied))?));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, topic = %self.changelog, partition, "changelog read error; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Some(Ok(message)) => {
                    self.last_read = Instant::now();
                    self.next = Some(message.offset() + 1);
                    if message.key() == Some(DROP_MARKER_KEY) {
                        // `waymark state drop` was here: what came before is gone,
                        // in this store too (its earlier restores included).
                        self.batch = StateBatch::default();
                        store.drop_scope(Scope::of(&self.input_topic, partition))?;
                        metrics::counter!(telemetry::CHANGELOG_DROPS_APPLIED).increment(1);
                        tracing::info!(topic = %self.changelog, partition, offset = message.offset(), "the partition's state was dropped here (waymark state drop): forgetting what came before");
                        continue;
                    }
                    let value = message.payload().unwrap_or_default();
                    match decode(message.key().unwrap_or_default(), value) {
                        Ok((keyspace, key, value)) if restorable(keyspace, &value) => {
                            self.batch.put(keyspace, key, value);
                            self.applied += 1;
                        }
                        // A record no Waymark of this version wrote (a tombstone an
                        // operator produced, another version's entry, garbage): one
                        // bad record must not make the partition unrestorable.
                        Ok(_) | Err(_) => {
                            self.skipped += 1;
                            metrics::counter!(telemetry::CHANGELOG_SKIPPED).increment(1);
                            tracing::warn!(topic = %self.changelog, partition, offset = message.offset(), "skipping a changelog record that is not a state entry of this Waymark");
                        }
                    }
                    if self.batch.puts.len() >= 10_000 {
                        self.flush(store)?;
                        tracing::info!(topic = %self.input_topic, partition, applied = self.applied, "restoring state from the changelog");
                    }
                }
            }
        }
        // Whatever this slice read is in the store: a restart resumes after it.
        self.flush(store)?;
        Ok(None)
    }

    fn flush(&mut self, store: &RocksStore) -> Result<(), StoreError> {
        if let Some(next) = self.next {
            self.batch.put(Keyspace::Offsets, self.position.clone(), next.to_be_bytes().to_vec());
        }
        if self.batch.is_empty() {
            return Ok(());
        }
        store.write(std::mem::take(&mut self.batch))
    }

    fn finish(&mut self, store: &RocksStore, restored: Restored) -> Result<Restored, ChangelogError> {
        self.flush(store)?;
        let (topic, partition, seconds) = (&self.input_topic, self.partition, self.started.elapsed().as_secs_f64());
        match restored {
            Restored::Done(applied) => {
                metrics::counter!(telemetry::CHANGELOG_RESTORED).increment(applied);
                metrics::histogram!(telemetry::CHANGELOG_RESTORE_SECONDS).record(seconds);
                tracing::info!(%topic, partition, applied, skipped = self.skipped, seconds, "state restored from the changelog");
            }
            Restored::Recreated { position, end } => {
                metrics::counter!(crate::telemetry::TOPIC_RECREATED, "topic" => self.changelog.clone()).increment(1);
                tracing::error!(
                    changelog = %self.changelog, partition, position, end,
                    "the changelog topic ends before what this store already read from it: it was deleted and re-created. This store keeps its state and logs new changes to the new topic, but another instance taking this partition over can only restore what was logged since; to give every instance the whole state again, stop the group, run `waymark state drop` for the partition on every instance, and replay the raw history (see the README's backfill procedure)"
                );
            }
        }
        Ok(restored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::progress_key;

    /// A crash in the middle of a batch's changelog leaves a prefix of its
    /// records. Restored from any prefix and re-processed, the batch ends every
    /// shipment exactly where the uninterrupted run did.
    #[test]
    fn any_prefix_of_a_batchs_changelog_reprocesses_to_the_same_shipments() {
        use crate::routing::Placement;
        use crate::state::{MemoryStore, Staged};
        use crate::synth::{generate, TrafficSpec};
        use chrono::TimeZone;

        let pipeline = crate::Pipeline { placement: Placement::Input, ..crate::Pipeline::default() };
        let now = chrono::Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap();
        let traffic = generate(&TrafficSpec { seed: 17, shipments: 6, topic: "in".into(), ..TrafficSpec::default() }).envelopes;
        let (before, batch) = traffic.split_at(traffic.len() / 2);
        let shipments = |store: &MemoryStore| Staged::new(store).scan(Keyspace::Shipments, &[], &[0xff; 64]).unwrap();
        let run = |store: &MemoryStore, envelopes: &[crate::Envelope]| {
            let output = crate::batch::process(&pipeline, store, envelopes, now, true, None).unwrap();
            store.write(output.state.clone()).unwrap();
            output.state
        };
        let uninterrupted = MemoryStore::default();
        run(&uninterrupted, before);
        let state = run(&uninterrupted, batch);
        let logged = records(&state, "g").unwrap();
        assert!(logged.len() > 10);
        for prefix in 0..=logged.len() {
            let store = MemoryStore::default();
            run(&store, before);
            let mut restored = StateBatch::default();
            for record in &logged[..prefix] {
                let (keyspace, key, value) = decode(&record.key, &record.value).unwrap();
                restored.put(keyspace, key, value);
            }
            store.write(restored).unwrap();
            run(&store, batch);
            assert_eq!(shipments(&store), shipments(&uninterrupted), "restored from the first {prefix} of {} records", logged.len());
        }
    }

    #[test]
    fn records_go_to_the_partition_whose_scope_prefixes_them() {
        let (a, b) = (Scope::of("in", 0), Scope::of("in", 3));
        let mut batch = StateBatch::default();
        batch.put(Keyspace::Hashes, [&a.0[..], b"h1"].concat(), b"v1".to_vec());
        batch.put(Keyspace::Shipments, [&b.0[..], b"s1"].concat(), b"v2".to_vec());
        batch.put(Keyspace::Offsets, progress_key("in", 0), 5i64.to_be_bytes().to_vec());
        batch.put(Keyspace::Offsets, progress_key("in", 3), 9i64.to_be_bytes().to_vec());
        let out = records(&batch, "g").unwrap();
        assert_eq!(out.len(), 2, "progress is not logged");
        // Shipment states first (see `records`).
        assert_eq!((out[0].topic.as_str(), out[0].partition), ("g-in-changelog", 3));
        assert_eq!((out[1].topic.as_str(), out[1].partition), ("g-in-changelog", 0));
        let (keyspace, key, value) = decode(&out[0].key, &out[0].value).unwrap();
        assert_eq!((keyspace, key, value), (Keyspace::Shipments, [&b.0[..], b"s1"].concat(), b"v2".to_vec()));
    }

    #[test]
    fn a_state_key_of_no_partition_in_the_batch_is_an_error_not_a_guess() {
        let mut batch = StateBatch::default();
        batch.put(Keyspace::Keys, [&Scope::of("in", 1).0[..], b"k"].concat(), b"v".to_vec());
        batch.put(Keyspace::Offsets, progress_key("in", 0), 1i64.to_be_bytes().to_vec());
        assert!(records(&batch, "g").is_err());
    }

    #[test]
    fn position_keys_are_not_mistaken_for_progress() {
        assert_eq!(progress_partition(&progress_key("in", 2)), Some(("in".to_string(), 2)));
        assert_eq!(progress_partition(&position_key("in", 2)), None);
        let mut batch = StateBatch::default();
        batch.put(Keyspace::Offsets, position_key("in", 2), 1i64.to_be_bytes().to_vec());
        batch.put(Keyspace::Offsets, progress_key("in", 2), 1i64.to_be_bytes().to_vec());
        assert!(records(&batch, "g").unwrap().is_empty());
    }

    #[test]
    fn tombstones_and_foreign_values_are_not_restorable() {
        assert!(!restorable(Keyspace::Shipments, b""), "a tombstone");
        assert!(!restorable(Keyspace::Hashes, &[0; 4]), "too short to carry an expiry");
        assert!(restorable(Keyspace::Hashes, &[0; 8]));
        assert!(restorable(Keyspace::Shipments, &[0; 18]));
    }

    /// A shipment state of another length (a newer Waymark's encoding, met
    /// during a downgrade) would fail to decode on its shipment's next event
    /// and stop every member that restored it: it is skipped at restore.
    #[test]
    fn a_shipment_state_the_pipeline_cannot_decode_is_not_restorable() {
        assert!(!restorable(Keyspace::Shipments, &[0; 19]), "one byte too long");
        assert!(!restorable(Keyspace::Shipments, &[0; 17]), "one byte too short");
        let mut unknown_status = [0u8; 18];
        unknown_status[0] = 200;
        assert!(!restorable(Keyspace::Shipments, &unknown_status), "a status index this version does not know");
    }

    #[test]
    fn offsets_and_garbage_are_never_restored() {
        assert!(decode(&encode_key(Keyspace::Offsets, &[0; 12]), b"x").is_err());
        assert!(decode(&[], b"x").is_err());
        assert!(decode(&[9, 0, 0, 0, 0, 0, 0, 0, 0], b"x").is_err());
        assert!(decode(&encode_key(Keyspace::Keys, &[1; 4]), b"x").is_err(), "too short for a scope");
    }

    #[test]
    fn positions_are_one_past_the_last_delivered_offset() {
        let mut batch = StateBatch::default();
        batch.put(Keyspace::Hashes, [&Scope::of("in", 0).0[..], b"h"].concat(), b"v".to_vec());
        batch.put(Keyspace::Offsets, progress_key("in", 0), 1i64.to_be_bytes().to_vec());
        let recs = records(&batch, "g").unwrap();
        let delivered = HashMap::from([(("g-in-changelog".to_string(), 0), 41i64)]);
        stage_positions(&mut batch, &recs, &delivered);
        let store = crate::state::MemoryStore::default();
        store.write(batch).unwrap();
        assert_eq!(stored_position(&store, "in", 0).unwrap(), Some(42));
    }
}
