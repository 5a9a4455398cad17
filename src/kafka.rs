//! `waymark run`: the Kafka worker.
//!
//! Delivery semantics (mode `at-least-once`): every acknowledged input record ends
//! up as its milestones on the output topic; a crash can only re-emit *identical*
//! upserts of the batch that was in flight.
//!
//! How: one thread owns a `BaseConsumer` (rebalance callbacks run inside its poll)
//! and processes one batch at a time:
//! 1. poll up to `worker.batch_size` records (or `worker.batch_wait`);
//! 2. run them through the pipeline, staging state changes in memory;
//! 3. produce upserts and dead letters with an idempotent producer and wait until
//!    Kafka acknowledges every one (retrying the batch on delivery failure);
//! 4. write dedupe keys, shipment states and the partitions' next offsets to RocksDB
//!    in one atomic batch (WAL on);
//! 5. commit the same offsets to the consumer group (asynchronously).
//! RocksDB's stored offsets are authoritative: on assignment the worker seeks each
//! partition to them, and any record below them is skipped. A kill between 3 and 4
//! re-runs the batch against the state it had, giving the identical upserts.
//! On revocation the in-flight batch is already complete (processing happens between
//! polls), and offsets are committed synchronously before the partitions go.
//!
//! Mode `exactly-once` (Kafka transactions, DESIGN section 9 design (a)): each
//! batch's upserts, dead letters and the input offsets are committed in one
//! transaction, so a `read_committed` reader of the output sees every milestone
//! exactly once. State is written to RocksDB only after the transaction commits.
//! A kill between the commit and the state write leaves the store behind the
//! group's committed offset; on assignment the worker seeks to the store's
//! progress and re-processes the records up to the committed offset *silently*
//! (state only, outputs dropped: they are already committed), then carries on.
//! A commit that fails indefinitely (timeout) is never retried blindly: the
//! producer is re-created with the same transactional.id (which fences the old one
//! and settles the pending transaction), and the group's committed offsets tell
//! whether the batch made it; only if not is it sent again.
//!
//! State hand-over (`state.changelog = true`, the default): see [`crate::changelog`].
//! Every batch's state changes also go to a compacted changelog topic (inside the
//! transaction in `exactly-once` mode; after the outputs are acknowledged and
//! before the local write in `at-least-once` mode), and an assigned partition's
//! state is restored from it before any record of the partition is processed, so
//! its dedupe keys and shipment states move with it between instances. With
//! changelogs off, state is local: a partition that moves starts with empty dedupe
//! memory on its new instance (outputs stay idempotent by `milestone_id`), and
//! `exactly-once` catches a lagging store up from the input as described above.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use thiserror::Error;

use crate::batch::{self, Failpoint};
use crate::changelog::{self, ChangelogError, ChangelogRecord, Restorer};
use crate::config::{Config, DeliveryMode};
use crate::envelope::Envelope;
use crate::error::{Fate, StoreError};
use crate::output::{DeadLetter, MilestoneUpsert};
use crate::pipeline::{stored_progress, Pipeline};
use crate::sink::{Sink, SinkError};
use crate::state::{Keyspace, StateBatch, StateStore};
use crate::store::RocksStore;
use crate::http::Health;
use crate::telemetry::{Telemetry, CONSUMER_LAG, REORDER_HELD, STORE_KEYS};

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("Kafka client setup failed: {0} (check kafka.brokers and the librdkafka properties)")]
    Setup(KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Changelog(#[from] ChangelogError),
}

/// Connection properties shared by every client (admin, changelog restore).
pub fn base_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.brokers);
    for (k, v) in &config.kafka.properties {
        client.set(k, v);
    }
    client
}

/// librdkafka properties for the consumer: ours first, then the user's.
pub fn consumer_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "5000");
    for (k, v) in config.kafka.properties.iter().chain(&config.kafka.consumer_properties) {
        client.set(k, v);
    }
    client
}

/// librdkafka properties for the producer: idempotent, acks=all.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    for (k, v) in config.kafka.properties.iter().chain(&config.kafka.producer_properties) {
        client.set(k, v);
    }
    client
}

/// Consumer callbacks: seek to stored progress on assignment, commit on revocation.
pub struct WorkerContext {
    store: Arc<RocksStore>,
    /// Next offset per assigned partition, as last written to the store.
    progress: Arc<Mutex<HashMap<(String, i32), i64>>>,
    /// Partitions this instance owns right now: records of a partition revoked
    /// while a batch was being polled are dropped, never emitted (the new owner
    /// reads them from the committed offset).
    assigned: Arc<Mutex<HashSet<(String, i32)>>>,
    /// Exactly-once only: per partition, the group's committed offset when the
    /// store was behind it; records below it are re-processed silently.
    catch_up: Arc<Mutex<HashMap<(String, i32), i64>>>,
    /// Offsets are committed only inside transactions (never on revocation).
    transactional: bool,
    /// State hand-over: restore each assigned partition from its changelog first.
    restorer: Option<Restorer>,
    /// A restore that failed inside the rebalance callback; the worker loop stops on it.
    fatal: Arc<Mutex<Option<ChangelogError>>>,
}

impl ClientContext for WorkerContext {
    /// librdkafka's statistics (every `statistics.interval.ms`) carry the lag of
    /// each assigned partition: publishing it here costs the poll loop nothing.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, stats) in statistics.topics {
            for (partition, p) in stats.partitions {
                if partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!(CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
                let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                let mut catch_up = self.catch_up.lock().unwrap_or_else(|p| p.into_inner());
                for elem in tpl.clone().elements() {
                    let (topic, partition) = (elem.topic().to_string(), elem.partition());
                    assigned.insert((topic.clone(), partition));
                    if let Some(restorer) = &self.restorer {
                        match self.restore_then_start(consumer, restorer, &topic, partition) {
                            Ok(Some(start)) => {
                                let _ = tpl.set_partition_offset(&topic, partition, Offset::Offset(start));
                                progress.insert((topic.clone(), partition), start);
                            }
                            Ok(None) => tracing::info!(%topic, partition, "assigned; no progress anywhere, starting at auto.offset.reset"),
                            Err(e) => {
                                tracing::error!(%topic, partition, error = %e, "cannot restore the partition's state; stopping");
                                self.fatal.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                            }
                        }
                        continue;
                    }
                    match stored_progress(&*self.store, &topic, partition) {
                        Ok(Some(next)) if self.transactional => {
                            // The store may lag the group (killed between commit and state write).
                            let committed = committed_offset(consumer, &topic, partition, Duration::from_secs(10)).ok().flatten();
                            let _ = tpl.set_partition_offset(&topic, partition, Offset::Offset(next));
                            progress.insert((topic.clone(), partition), next);
                            match committed {
                                Some(committed) if committed > next => {
                                    catch_up.insert((topic.clone(), partition), committed);
                                    tracing::info!(%topic, partition, next, committed, "assigned; catching up state silently to the committed offset");
                                }
                                _ => tracing::info!(%topic, partition, next, "assigned; resuming from stored progress"),
                            }
                        }
                        Ok(Some(next)) => {
                            let _ = tpl.set_partition_offset(&topic, partition, Offset::Offset(next));
                            progress.insert((topic.clone(), partition), next);
                            tracing::info!(%topic, partition, next, "assigned; resuming from stored progress");
                        }
                        Ok(None) => tracing::info!(%topic, partition, "assigned; no stored progress, using the group's committed offset"),
                        Err(e) => tracing::error!(%topic, partition, error = %e, "cannot read stored progress; using the group's committed offset"),
                    }
                }
                let result = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if let Err(e) = result {
                    tracing::error!(error = %e, "assigning partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Everything processed is already in the store (batches complete between
                // polls); hand the group the same offsets before the partitions go.
                let mut commit = TopicPartitionList::new();
                let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
                let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                for elem in tpl.elements() {
                    assigned.remove(&(elem.topic().to_string(), elem.partition()));
                    if let Some(next) = progress.remove(&(elem.topic().to_string(), elem.partition())) {
                        let _ = commit.add_partition_offset(elem.topic(), elem.partition(), Offset::Offset(next));
                    }
                }
                {
                    let mut catch_up = self.catch_up.lock().unwrap_or_else(|p| p.into_inner());
                    for elem in tpl.elements() {
                        catch_up.remove(&(elem.topic().to_string(), elem.partition()));
                    }
                }
                if commit.count() > 0 && !consumer.assignment_lost() && !self.transactional {
                    if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                        tracing::warn!(error = %e, "committing offsets on revocation failed; the next owner may re-process (identical upserts)");
                    }
                }
                let result = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = result {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
                tracing::info!(partitions = tpl.count(), "partitions revoked");
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
    }
}

impl WorkerContext {
    /// Changelog mode: the group's committed offset first (for a read_committed
    /// consumer it waits until no transactional commit is pending, so the
    /// changelog's end below is at least as new as that offset), then the
    /// changelog replayed into the store, then the offset to start at: the later
    /// of the committed offset and this store's own progress (ahead only when this
    /// instance processed further before losing the partition: that state is in
    /// the changelog too).
    fn restore_then_start(
        &self,
        consumer: &BaseConsumer<Self>,
        restorer: &Restorer,
        topic: &str,
        partition: i32,
    ) -> Result<Option<i64>, ChangelogError> {
        let restore_failed = |reason: String| ChangelogError::Restore { topic: topic.to_string(), partition, reason };
        let committed = committed_offset(consumer, topic, partition, restorer.timeout)
            .map_err(|e| restore_failed(format!("cannot read the group's committed offset: {e}")))?;
        let applied = restorer.restore(&*self.store, topic, partition)?;
        let stored = stored_progress(&*self.store, topic, partition)?;
        let start = committed.into_iter().chain(stored).max();
        tracing::info!(%topic, partition, ?committed, ?stored, applied, ?start, "assigned; state restored from the changelog");
        Ok(start)
    }
}

/// Delivery results of the producer, counted per batch.
#[derive(Default)]
pub struct DeliveryTracker {
    state: Mutex<DeliveryCounts>,
}

#[derive(Default, Debug, Clone)]
struct DeliveryCounts {
    acked: usize,
    failed: usize,
    last_error: Option<String>,
    /// Highest acknowledged offset per (topic, partition).
    offsets: HashMap<(String, i32), i64>,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut counts = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(message) => {
                counts.acked += 1;
                let highest = counts.offsets.entry((message.topic().to_string(), message.partition())).or_insert(-1);
                *highest = (*highest).max(message.offset());
            }
            Err((e, _)) => {
                counts.failed += 1;
                counts.last_error = Some(e.to_string());
            }
        }
    }
}

/// Sends upserts and dead letters to Kafka and waits for every acknowledgement.
pub struct KafkaSink {
    producer: ThreadedProducer<DeliveryTracker>,
    output_topic: String,
    dead_letter_topic: String,
    /// How long one attempt waits for acknowledgements.
    flush_timeout: Duration,
    /// Group id naming the changelog topics, when state changes are logged.
    changelog_group: Option<String>,
}

impl KafkaSink {
    pub fn new(config: &Config) -> Result<KafkaSink, KafkaError> {
        Ok(Self::with_producer(config, producer_config(config).create_with_context(DeliveryTracker::default())?))
    }

    fn with_producer(config: &Config, producer: ThreadedProducer<DeliveryTracker>) -> KafkaSink {
        KafkaSink {
            producer,
            output_topic: config.kafka.output_topic.clone(),
            dead_letter_topic: config.kafka.dead_letter_topic.clone(),
            flush_timeout: Duration::from_secs(60),
            changelog_group: config.changelog.as_ref().map(|_| config.kafka.group_id.clone()),
        }
    }

    /// The changelog records of a batch's state (none when changelogs are off).
    fn changelog_records(&self, state: &StateBatch) -> Result<Vec<ChangelogRecord>, SinkError> {
        match &self.changelog_group {
            Some(group) => Ok(changelog::records(state, group)?),
            None => Ok(Vec::new()),
        }
    }

    fn enqueue_changelog(&self, records: &[ChangelogRecord]) -> Result<(), SinkError> {
        for record in records {
            let base = BaseRecord::to(&record.topic).key(&record.key[..]).payload(&record.value[..]).partition(record.partition);
            self.enqueue_record(base)?;
        }
        Ok(())
    }

    fn reset_counts(&self) {
        *self.producer.context().state.lock().unwrap_or_else(|p| p.into_inner()) = DeliveryCounts::default();
    }

    fn counts(&self) -> DeliveryCounts {
        self.producer.context().state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Wait until `total` records queued since the last reset are acknowledged.
    fn await_acks(&self, total: usize) -> Result<DeliveryCounts, SinkError> {
        let flushed = self.producer.flush(self.flush_timeout);
        let counts = self.counts();
        if flushed.is_ok() && counts.acked == total && counts.failed == 0 {
            return Ok(counts);
        }
        Err(SinkError::Kafka {
            failed: total - counts.acked.min(total),
            total,
            reason: counts
                .last_error
                .or_else(|| flushed.err().map(|e| e.to_string()))
                .unwrap_or_else(|| "not acknowledged in time".into()),
            fate: Fate::Retry,
        })
    }

    /// Queue every record of a batch (keys and headers as documented).
    fn enqueue_all(&self, upserts: &[MilestoneUpsert], dead_letters: &[DeadLetter]) -> Result<(), SinkError> {
        for upsert in upserts {
            let payload = serde_json::to_vec(upsert).map_err(std::io::Error::other)?;
            let headers = OwnedHeaders::new()
                .insert(Header { key: "milestone-id", value: Some(upsert.milestone_id.as_str()) })
                .insert(Header { key: "tenant-id", value: Some(upsert.tenant_id.as_str()) });
            self.enqueue(&self.output_topic, &upsert.key(), &payload, headers)?;
        }
        for dead in dead_letters {
            let payload = serde_json::to_vec(dead).map_err(std::io::Error::other)?;
            let headers = OwnedHeaders::new().insert(Header { key: "error-kind", value: Some(dead.error_kind.as_str()) });
            self.enqueue(&self.dead_letter_topic, &dead.key(), &payload, headers)?;
        }
        Ok(())
    }

    fn enqueue(&self, topic: &str, key: &str, payload: &[u8], headers: OwnedHeaders) -> Result<(), SinkError> {
        self.enqueue_record(BaseRecord::to(topic).key(key).payload(payload).headers(headers))
    }

    fn enqueue_record<K: rdkafka::message::ToBytes + ?Sized>(&self, record: BaseRecord<'_, K, [u8]>) -> Result<(), SinkError> {
        let mut record = record;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                    // Backpressure: the local queue is bounded; wait for deliveries.
                    record = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((e, _)) => {
                    return Err(SinkError::Kafka { failed: 1, total: 1, reason: e.to_string(), fate: Fate::Retry });
                }
            }
        }
    }
}

impl Sink for KafkaSink {
    fn send(&mut self, upserts: &[MilestoneUpsert], dead_letters: &[DeadLetter]) -> Result<(), SinkError> {
        let total = upserts.len() + dead_letters.len();
        if total == 0 {
            return Ok(());
        }
        self.reset_counts();
        self.enqueue_all(upserts, dead_letters)?;
        self.await_acks(total).map(|_| ())
    }

    /// At-least-once: the changelog gets the state only after the outputs are
    /// acknowledged, so a new owner never restores a claim on an unsent upsert.
    fn send_state(&mut self, state: &mut StateBatch) -> Result<(), SinkError> {
        let records = self.changelog_records(state)?;
        if records.is_empty() {
            return Ok(());
        }
        self.reset_counts();
        self.enqueue_changelog(&records)?;
        let counts = self.await_acks(records.len())?;
        changelog::stage_positions(state, &records, &counts.offsets);
        Ok(())
    }
}

/// The group's committed offset of one partition (`Ok(None)`: the group has none).
fn committed_offset(
    consumer: &BaseConsumer<WorkerContext>,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<Option<i64>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = consumer.committed_offsets(tpl, timeout)?;
    Ok(match committed.find_partition(topic, partition).map(|e| e.offset()) {
        Some(Offset::Offset(n)) => Some(n),
        _ => None,
    })
}

/// The transactional producer of `exactly-once` mode.
pub struct TransactionalSink {
    config: ClientConfig,
    sink: KafkaSink,
    /// Timeout of each transactional call (init, send offsets, commit, abort).
    timeout: Duration,
    /// How many times the producer was replaced after an indefinite error.
    recreated: u64,
}

impl TransactionalSink {
    pub fn new(config: &Config, transactional_id: &str) -> Result<TransactionalSink, KafkaError> {
        let mut client = producer_config(config);
        client.set("transactional.id", transactional_id);
        let timeout = Duration::from_secs(30);
        let sink = KafkaSink::with_producer(config, Self::create(&client, timeout)?);
        Ok(TransactionalSink { config: client, sink, timeout, recreated: 0 })
    }

    fn create(client: &ClientConfig, timeout: Duration) -> Result<ThreadedProducer<DeliveryTracker>, KafkaError> {
        let producer: ThreadedProducer<DeliveryTracker> = client.create_with_context(DeliveryTracker::default())?;
        producer.init_transactions(timeout)?;
        Ok(producer)
    }

    /// Replace the producer: the new one's init fences the old and settles any
    /// transaction it left open.
    fn recreate(&mut self) -> Result<(), KafkaError> {
        tracing::warn!("re-creating the transactional producer");
        metrics::counter!("waymark_producer_recreated_total").increment(1);
        self.recreated += 1;
        self.sink.producer = Self::create(&self.config, self.timeout)?;
        Ok(())
    }

    /// Commit one batch's outputs and input offsets atomically, retrying until
    /// it is certain that they are committed exactly once, or the shutdown
    /// deadline passes (then nothing of the batch is claimed).
    fn commit(
        &mut self,
        consumer: &BaseConsumer<WorkerContext>,
        upserts: &[MilestoneUpsert],
        dead_letters: &[DeadLetter],
        state: &mut StateBatch,
        offsets: &TopicPartitionList,
        shutdown: &AtomicBool,
        deadline: Duration,
    ) -> Result<(), SinkError> {
        let records = self.sink.changelog_records(state)?;
        let mut retry = Retry::new(shutdown, deadline, Duration::from_millis(200));
        loop {
            match self.try_commit(consumer, upserts, dead_letters, &records, offsets) {
                Ok(positions) => {
                    if let Some(delivered) = positions {
                        changelog::stage_positions(state, &records, &delivered);
                    }
                    return Ok(());
                }
                Err(reason) => {
                    if retry.gave_up() {
                        let total = upserts.len() + dead_letters.len() + records.len();
                        return Err(SinkError::Kafka { failed: total, total, reason, fate: Fate::Retry });
                    }
                    tracing::warn!(%reason, attempt = retry.attempt + 1, "transaction not committed; trying the batch again");
                    metrics::counter!("waymark_transaction_retries_total").increment(1);
                    retry.back_off();
                }
            }
        }
    }

    /// One attempt. `Ok(Some(offsets))`: committed, with the changelog offsets
    /// the delivery reports gave; `Ok(None)`: committed, offsets unknown.
    fn try_commit(
        &mut self,
        consumer: &BaseConsumer<WorkerContext>,
        upserts: &[MilestoneUpsert],
        dead_letters: &[DeadLetter],
        records: &[ChangelogRecord],
        offsets: &TopicPartitionList,
    ) -> Result<Option<HashMap<(String, i32), i64>>, String> {
        let group = consumer.group_metadata().ok_or("the consumer has no group metadata yet")?;
        self.sink.reset_counts();
        if let Err(e) = self.sink.producer.begin_transaction() {
            self.recreate().map_err(|r| format!("begin failed ({e}); re-creating the producer failed: {r}"))?;
            return Err(format!("begin_transaction: {e}"));
        }
        let sent = (|| {
            self.sink.enqueue_all(upserts, dead_letters)?;
            self.sink.enqueue_changelog(records)?;
            self.sink
                .producer
                .send_offsets_to_transaction(offsets, &group, self.timeout)
                .map_err(|e| SinkError::Kafka { failed: 0, total: 0, reason: e.to_string(), fate: Fate::Retry })
        })();
        if let Err(e) = sent {
            self.abort_or_recreate();
            return Err(format!("sending the batch: {e}"));
        }
        match self.sink.producer.commit_transaction(self.timeout) {
            Ok(()) => {
                let counts = self.sink.counts();
                let all = upserts.len() + dead_letters.len() + records.len();
                Ok((counts.acked == all).then_some(counts.offsets))
            }
            Err(KafkaError::Transaction(e)) if e.txn_requires_abort() => {
                self.abort_or_recreate();
                Err(format!("commit_transaction: {e} (aborted)"))
            }
            Err(e) => {
                // Indefinite: it may or may not have committed. Never retry blindly.
                self.recreate().map_err(|r| format!("commit outcome unknown ({e}); re-creating the producer failed: {r}"))?;
                if offsets_committed(consumer, offsets) {
                    tracing::info!("the transaction did commit before the error; not sending the batch again");
                    Ok(None)
                } else {
                    Err(format!("commit_transaction: {e} (not committed)"))
                }
            }
        }
    }

    fn abort_or_recreate(&mut self) {
        if let Err(e) = self.sink.producer.abort_transaction(self.timeout) {
            tracing::warn!(error = %e, "abort_transaction failed");
            if let Err(e) = self.recreate() {
                tracing::error!(error = %e, "re-creating the transactional producer failed; will retry");
            }
        }
    }
}

/// Are the group's committed offsets exactly `offsets`?
fn offsets_committed(consumer: &BaseConsumer<WorkerContext>, offsets: &TopicPartitionList) -> bool {
    let Ok(committed) = consumer.committed_offsets(offsets.clone(), Duration::from_secs(10)) else {
        return false;
    };
    offsets.elements().iter().all(|want| {
        committed.find_partition(want.topic(), want.partition()).is_some_and(|got| got.offset() == want.offset())
    })
}

/// Everything the worker loop needs, passed in (shutdown and clock included).
pub struct WorkerDeps<'a> {
    pub config: &'a Config,
    pub pipeline: &'a Pipeline,
    pub store: Arc<RocksStore>,
    pub telemetry: &'a Telemetry,
    pub health: &'a Health,
    pub shutdown: &'a AtomicBool,
    pub clock: &'a (dyn Fn() -> DateTime<Utc> + Sync),
}

/// The consume-process-produce loop. Returns `Ok` after a clean shutdown.
pub fn run_worker(deps: WorkerDeps<'_>) -> Result<(), WorkerError> {
    let config = deps.config;
    let progress: Arc<Mutex<HashMap<(String, i32), i64>>> = Arc::default();
    let assigned: Arc<Mutex<HashSet<(String, i32)>>> = Arc::default();
    let catch_up: Arc<Mutex<HashMap<(String, i32), i64>>> = Arc::default();
    let transactional = matches!(config.delivery, DeliveryMode::ExactlyOnce { .. });
    let fatal: Arc<Mutex<Option<ChangelogError>>> = Arc::default();
    let restorer = match &config.changelog {
        Some(settings) => {
            // The broker may not be up yet: wait for it (not ready meanwhile)
            // rather than exit into a crash loop.
            let mut retry = Retry::new(deps.shutdown, Duration::ZERO, Duration::from_secs(1));
            loop {
                let ensured = changelog::ensure_topics(
                    &base_config(config),
                    &config.kafka.group_id,
                    &config.kafka.input_topics,
                    settings.replication,
                    settings.retention,
                    Duration::from_secs(10),
                );
                match ensured {
                    Ok(()) => break,
                    Err(_) if deps.shutdown.load(Ordering::SeqCst) => {
                        tracing::info!("stopped before the changelog topics were ready; nothing was processed");
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, brokers = %config.kafka.brokers, attempt = retry.attempt + 1, "changelog topics not ready; retrying");
                        retry.back_off();
                    }
                }
            }
            Some(Restorer::new(base_config(config), &config.kafka.group_id, settings.restore_timeout))
        }
        None => None,
    };
    let context = WorkerContext {
        store: deps.store.clone(),
        progress: progress.clone(),
        assigned: assigned.clone(),
        catch_up: catch_up.clone(),
        transactional,
        restorer,
        fatal: fatal.clone(),
    };
    let consumer: BaseConsumer<WorkerContext> =
        consumer_config(config).create_with_context(context).map_err(WorkerError::Setup)?;
    let topics: Vec<&str> = config.kafka.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(WorkerError::Setup)?;
    let mut output = match &config.delivery {
        DeliveryMode::AtLeastOnce => Output::AtLeastOnce(KafkaSink::new(config).map_err(WorkerError::Setup)?),
        DeliveryMode::ExactlyOnce { transactional_id } => {
            Output::ExactlyOnce(TransactionalSink::new(config, transactional_id).map_err(WorkerError::Setup)?)
        }
    };
    deps.health.ready.store(true, Ordering::SeqCst);
    tracing::info!(topics = ?topics, group = %config.kafka.group_id, "worker started");

    let mut last_gauges = Instant::now();
    let mut window = ReorderBuffer::default();
    // With the reorder window on, every unit is processed in hierarchy order.
    let process: Process = if config.reorder.is_some() { batch::process_window } else { batch::process };
    loop {
        // After a shutdown request: no more polling, but a held window is still
        // processed and committed (in-flight work).
        let stopping = deps.shutdown.load(Ordering::SeqCst);
        let mut envelopes = if stopping { Vec::new() } else { poll_batch(&consumer, config, deps.shutdown, &progress) };
        if let Some(e) = fatal.lock().unwrap_or_else(|p| p.into_inner()).take() {
            deps.health.failed.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
        {
            let owned = assigned.lock().unwrap_or_else(|p| p.into_inner());
            envelopes.retain(|e| owned.contains(&(e.topic.clone(), e.partition)));
            // Held records of a partition revoked meanwhile are dropped, never
            // emitted: nothing of them was committed, the new owner reads them.
            window.retain(|e| owned.contains(&(e.topic.clone(), e.partition)));
        }
        let unit = match config.reorder {
            None => envelopes,
            Some(limits) => {
                window.extend(envelopes);
                let unit = if window.due(limits) || stopping { window.take() } else { Vec::new() };
                metrics::gauge!(REORDER_HELD).set(window.held.len() as f64);
                unit
            }
        };
        if !unit.is_empty() {
            match &mut output {
                Output::AtLeastOnce(sink) => process_and_commit(&deps, &consumer, sink, &unit, &progress, process)?,
                Output::ExactlyOnce(sink) => process_transactionally(&deps, &consumer, sink, unit, &progress, &catch_up, process)?,
            }
        }
        if last_gauges.elapsed() > Duration::from_secs(5) {
            update_gauges(&deps.store);
            last_gauges = Instant::now();
        }
        if stopping {
            break;
        }
    }
    tracing::info!("shutting down: in-flight batch done, committing offsets");
    deps.health.ready.store(false, Ordering::SeqCst);
    if !transactional {
        commit_progress(&consumer, &progress, CommitMode::Sync);
    }
    consumer.unsubscribe();
    Ok(())
}

/// Crash-test hook: `WAYMARK_FAILPOINT=<point>:<n>` makes the process abort (like
/// `kill -9`: no destructors, no flush) the n-th time it reaches `<point>`, one of
/// `before_output`, `after_output` (outputs acknowledged or transaction committed,
/// state not written), `after_changelog` (at-least-once with changelogs: state
/// logged, not written locally) and `after_state` (state written, offsets not committed in
/// at-least-once mode). Unset, it costs one relaxed atomic load per batch.
fn failpoint(point: &str) {
    use std::sync::atomic::AtomicU64;
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let armed = ARMED.get_or_init(|| {
        let spec = std::env::var("WAYMARK_FAILPOINT").ok()?;
        let (name, nth) = spec.split_once(':').unwrap_or((spec.as_str(), "1"));
        Some((name.to_string(), nth.parse().unwrap_or(1)))
    });
    if let Some((name, nth)) = armed {
        if name == point && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
            eprintln!("waymark: failpoint {point} reached, aborting (WAYMARK_FAILPOINT)");
            std::process::abort();
        }
    }
}

/// Records held by the bounded reorder window. Nothing of them is committed
/// (outputs, state, offsets) until the window closes and they are processed as one
/// unit in status-hierarchy order, so offsets never pass a held record and a crash
/// simply re-reads them. Memory is bounded by `order.reorder_max_records`.
#[derive(Default)]
struct ReorderBuffer {
    held: Vec<Envelope>,
    /// When the oldest held record arrived.
    since: Option<Instant>,
    /// Highest held offset per partition: a partition revoked and assigned back
    /// re-delivers records from its committed offset; those are held already.
    highest: HashMap<(String, i32), i64>,
}

impl ReorderBuffer {
    fn extend(&mut self, envelopes: Vec<Envelope>) {
        for envelope in envelopes {
            let highest = self.highest.entry((envelope.topic.clone(), envelope.partition)).or_insert(-1);
            if envelope.offset > *highest {
                *highest = envelope.offset;
                self.since.get_or_insert_with(Instant::now);
                self.held.push(envelope);
            }
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&Envelope) -> bool) {
        let before = self.held.len();
        self.held.retain(|e| keep(e));
        if self.held.len() == before {
            return;
        }
        // Only after a revocation: forget the dropped partitions' positions.
        self.highest.clear();
        for envelope in &self.held {
            let highest = self.highest.entry((envelope.topic.clone(), envelope.partition)).or_insert(-1);
            *highest = (*highest).max(envelope.offset);
        }
        if self.held.is_empty() {
            self.since = None;
        }
    }

    fn due(&self, limits: crate::config::ReorderWindow) -> bool {
        self.held.len() >= limits.max_records || self.since.is_some_and(|since| since.elapsed() >= limits.window)
    }

    fn take(&mut self) -> Vec<Envelope> {
        self.since = None;
        self.highest.clear();
        std::mem::take(&mut self.held)
    }
}

/// How a unit of records is processed: `batch::process` (arrival order) or
/// `batch::process_window` (the reorder window's hierarchy order).
type Process = fn(&Pipeline, &RocksStore, &[Envelope], DateTime<Utc>, bool, Option<&Telemetry>) -> Result<batch::BatchOutput, StoreError>;

/// The output side of the worker, by delivery mode.
enum Output {
    AtLeastOnce(KafkaSink),
    ExactlyOnce(TransactionalSink),
}

/// One batch in `exactly-once` mode: silent catch-up first, then one transaction
/// for outputs and offsets, then state.
fn process_transactionally(
    deps: &WorkerDeps<'_>,
    consumer: &BaseConsumer<WorkerContext>,
    sink: &mut TransactionalSink,
    envelopes: Vec<Envelope>,
    progress: &Mutex<HashMap<(String, i32), i64>>,
    catch_up: &Mutex<HashMap<(String, i32), i64>>,
    process: Process,
) -> Result<(), WorkerError> {
    let now = (deps.clock)();
    let (silent, live): (Vec<Envelope>, Vec<Envelope>) = {
        let bounds = catch_up.lock().unwrap_or_else(|p| p.into_inner());
        envelopes.into_iter().partition(|e| bounds.get(&(e.topic.clone(), e.partition)).is_some_and(|c| e.offset < *c))
    };
    if !silent.is_empty() {
        // Their outputs were committed before the crash; rebuild only the state.
        let output = process(deps.pipeline, &*deps.store, &silent, now, true, None)?;
        deps.store.write(output.state)?;
        metrics::counter!("waymark_records_caught_up_total").increment(silent.len() as u64);
        record_progress(progress, &silent);
    }
    if live.is_empty() {
        return Ok(());
    }
    let output = process(deps.pipeline, &*deps.store, &live, now, true, Some(deps.telemetry))?;
    let mut offsets = TopicPartitionList::new();
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    for e in &live {
        next.insert((e.topic.clone(), e.partition), e.offset + 1);
    }
    for ((topic, partition), offset) in &next {
        let _ = offsets.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    failpoint("before_output");
    let mut state = output.state;
    sink.commit(consumer, &output.upserts, &output.dead_letters, &mut state, &offsets, deps.shutdown, deps.config.shutdown_timeout)?;
    failpoint("after_output");
    // Only now may state claim the batch.
    deps.store.write(state)?;
    failpoint("after_state");
    record_progress(progress, &live);
    Ok(())
}

fn record_progress(progress: &Mutex<HashMap<(String, i32), i64>>, envelopes: &[Envelope]) {
    let mut map = progress.lock().unwrap_or_else(|p| p.into_inner());
    for envelope in envelopes {
        map.insert((envelope.topic.clone(), envelope.partition), envelope.offset + 1);
    }
}

/// Poll until a batch is full, the wait is over, or shutdown is requested.
fn poll_batch(
    consumer: &BaseConsumer<WorkerContext>,
    config: &Config,
    shutdown: &AtomicBool,
    progress: &Mutex<HashMap<(String, i32), i64>>,
) -> Vec<Envelope> {
    let deadline = Instant::now() + config.batch_wait;
    let mut envelopes = Vec::new();
    while envelopes.len() < config.batch_size && !shutdown.load(Ordering::SeqCst) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let wait = if envelopes.is_empty() { Duration::from_millis(200) } else { remaining };
        match consumer.poll(wait) {
            None => {
                if !envelopes.is_empty() || Instant::now() >= deadline {
                    break;
                }
            }
            Some(Err(e)) => {
                // Transport errors are transient: librdkafka reconnects by itself.
                tracing::warn!(error = %e, "consumer error; waiting for the broker");
                std::thread::sleep(Duration::from_millis(200));
            }
            Some(Ok(message)) => {
                let (topic, partition, offset) = (message.topic().to_string(), message.partition(), message.offset());
                let next = progress.lock().unwrap_or_else(|p| p.into_inner()).get(&(topic.clone(), partition)).copied();
                if next.is_some_and(|next| offset < next) {
                    metrics::counter!("waymark_records_skipped_total").increment(1);
                    continue;
                }
                let headers = message
                    .headers()
                    .map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
                    .unwrap_or_default();
                envelopes.push(Envelope {
                    topic,
                    partition,
                    offset,
                    timestamp_ms: message.timestamp().to_millis(),
                    headers,
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                });
            }
        }
    }
    envelopes
}

fn process_and_commit(
    deps: &WorkerDeps<'_>,
    consumer: &BaseConsumer<WorkerContext>,
    sink: &mut KafkaSink,
    envelopes: &[Envelope],
    progress: &Mutex<HashMap<(String, i32), i64>>,
    process: Process,
) -> Result<(), WorkerError> {
    let output = process(deps.pipeline, &*deps.store, envelopes, (deps.clock)(), true, Some(deps.telemetry))?;
    let mut retrying = RetryingSink { inner: sink, shutdown: deps.shutdown, deadline: deps.config.shutdown_timeout };
    match batch::deliver(&*deps.store, &mut retrying, output, &mut |point| {
        failpoint(match point {
            Failpoint::BeforeOutput => "before_output",
            Failpoint::AfterOutput => "after_output",
            Failpoint::AfterChangelog => "after_changelog",
            Failpoint::AfterState => "after_state",
        });
        false
    }) {
        Ok(_) => {}
        Err(batch::DeliverError::Sink(e)) => return Err(e.into()),
        Err(batch::DeliverError::Store(e)) => return Err(e.into()),
        Err(batch::DeliverError::Crashed(point)) => unreachable!("no failpoint is armed in production ({point:?})"),
    }
    record_progress(progress, envelopes);
    commit_progress(consumer, progress, CommitMode::Async);
    Ok(())
}

/// Re-sends a batch until Kafka acknowledges all of it. Gives up only when a
/// shutdown has waited longer than its deadline: then nothing of the batch is
/// claimed and it is re-processed on restart.
struct RetryingSink<'a> {
    inner: &'a mut KafkaSink,
    shutdown: &'a AtomicBool,
    deadline: Duration,
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
                    metrics::counter!("waymark_output_retries_total").increment(1);
                    // No consumer poll here: a poll could hand out (and so skip) a record.
                    retry.back_off();
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Sink for RetryingSink<'_> {
    fn send(&mut self, upserts: &[MilestoneUpsert], dead_letters: &[DeadLetter]) -> Result<(), SinkError> {
        self.retrying("output", |sink| sink.send(upserts, dead_letters))
    }

    fn send_state(&mut self, state: &mut StateBatch) -> Result<(), SinkError> {
        self.retrying("changelog", |sink| sink.send_state(state))
    }
}

/// Retry policy of a batch's output: retry forever with linear back-off (capped at
/// ten steps), except once a shutdown has waited longer than its deadline.
struct Retry<'a> {
    shutdown: &'a AtomicBool,
    deadline: Duration,
    step: Duration,
    attempt: u32,
    shutdown_seen: Option<Instant>,
}

impl<'a> Retry<'a> {
    fn new(shutdown: &'a AtomicBool, deadline: Duration, step: Duration) -> Self {
        Retry { shutdown, deadline, step, attempt: 0, shutdown_seen: None }
    }

    /// True when a shutdown is under way and has waited past its deadline.
    fn gave_up(&mut self) -> bool {
        if !self.shutdown.load(Ordering::SeqCst) {
            return false;
        }
        self.shutdown_seen.get_or_insert_with(Instant::now).elapsed() >= self.deadline
    }

    fn back_off(&mut self) {
        self.attempt += 1;
        std::thread::sleep(self.step.saturating_mul(self.attempt.min(10)));
    }
}

fn commit_progress(consumer: &BaseConsumer<WorkerContext>, progress: &Mutex<HashMap<(String, i32), i64>>, mode: CommitMode) {
    let map = progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if map.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in map {
        let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(next));
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::warn!(error = %e, "offset commit failed; the store's progress stays authoritative");
    }
}

fn update_gauges(store: &RocksStore) {
    for keyspace in [Keyspace::Keys, Keyspace::Hashes, Keyspace::Shipments] {
        if let Ok(n) = store.estimated_keys(keyspace) {
            metrics::gauge!(STORE_KEYS, "keyspace" => keyspace.name()).set(n as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Transactional fault injection with librdkafka's mock cluster (unit level:
    //! the real broker tests in tests/ prove the read_committed guarantees; the
    //! mock cannot, it keeps no transaction markers).
    use super::*;
    use crate::config::RawConfig;
    use crate::output::MilestoneUpsert;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::RDKafkaApiKey;

    fn config_for(brokers: &str) -> Config {
        let toml = format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"mock-group\"\ninput_topics = [\"in\"]\noutput_topic = \"out\"\ndead_letter_topic = \"dlq\"\n[kafka.producer_properties]\n\"retry.backoff.ms\" = \"200\"\n\"retry.backoff.max.ms\" = \"200\"\n[state]\nchangelog = false\n"
        );
        RawConfig::from_toml(&toml).unwrap().validate().unwrap()
    }

    fn upsert() -> MilestoneUpsert {
        let event = crate::dedupe::tests::event("1Z", crate::event::Status::InTransit, 1_722_438_000_000);
        MilestoneUpsert::new(event, crate::event::Status::InTransit, crate::event::Status::InTransit)
    }

    /// A consumer that has joined the group (so it has group metadata).
    fn joined_consumer(config: &Config, store: Arc<RocksStore>) -> BaseConsumer<WorkerContext> {
        let context = WorkerContext {
            store,
            progress: Arc::default(),
            assigned: Arc::default(),
            catch_up: Arc::default(),
            transactional: true,
            restorer: None,
            fatal: Arc::default(),
        };
        let consumer: BaseConsumer<WorkerContext> = consumer_config(config).create_with_context(context).unwrap();
        consumer.subscribe(&["in"]).unwrap();
        let started = Instant::now();
        while consumer.assignment().map(|a| a.count()).unwrap_or(0) == 0 {
            assert!(started.elapsed() < Duration::from_secs(30), "the mock group never assigned the partition");
            let _ = consumer.poll(Duration::from_millis(100));
        }
        consumer
    }

    /// A mock cluster with the worker's topics, a consumer that joined the group,
    /// a transactional sink whose calls time out after `timeout`, and the offsets
    /// of one processed input record.
    struct MockWorker {
        cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        consumer: BaseConsumer<WorkerContext>,
        sink: TransactionalSink,
        offsets: TopicPartitionList,
        _state: tempfile::TempDir,
    }

    impl MockWorker {
        fn new(transactional_id: &str, timeout: Duration) -> MockWorker {
            let cluster = MockCluster::new(1).unwrap();
            for topic in ["in", "out", "dlq"] {
                cluster.create_topic(topic, 1, 1).unwrap();
            }
            let config = config_for(&cluster.bootstrap_servers());
            let state = tempfile::tempdir().unwrap();
            let options = crate::store::StoreOptions::default();
            let store = Arc::new(RocksStore::open(state.path(), &options, crate::store::system_clock()).unwrap());
            let consumer = joined_consumer(&config, store);
            let mut sink = TransactionalSink::new(&config, transactional_id).unwrap();
            sink.timeout = timeout;
            let mut offsets = TopicPartitionList::new();
            offsets.add_partition_offset("in", 0, Offset::Offset(1)).unwrap();
            MockWorker { cluster, consumer, sink, offsets, _state: state }
        }
    }

    #[test]
    fn commit_timeouts_recreate_the_producer_and_the_batch_still_commits() {
        let MockWorker { _state, cluster, consumer, mut sink, offsets } = MockWorker::new("mock-txn", Duration::from_secs(2));
        let shutdown = AtomicBool::new(false);

        // A clean commit first.
        sink.commit(&consumer, &[upsert()], &[], &mut StateBatch::default(), &offsets, &shutdown, Duration::from_secs(5)).unwrap();
        assert_eq!(sink.recreated, 0);

        // Then EndTxn answers "concurrent transactions" (retriable) 15 times in a
        // row: with retries 200 ms apart that outlasts the 2 s commit timeout, an
        // indefinite outcome. The sink must re-create the producer rather than
        // retry the commit blindly, and the batch must still get in once the
        // coordinator answers again.
        cluster.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS; 15]);
        sink.commit(&consumer, &[upsert()], &[], &mut StateBatch::default(), &offsets, &shutdown, Duration::from_secs(5))
            .expect("the batch commits once the coordinator answers again");
        assert!(sink.recreated >= 1, "an indefinite commit error must re-create the producer");

        // An abortable commit error followed by an abort that times out: abort,
        // then re-create, then the batch goes in.
        let recreated_before = sink.recreated;
        let mut errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN];
        errors.extend([RDKafkaRespErr::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS; 15]);
        cluster.request_errors(RDKafkaApiKey::EndTxn, &errors);
        sink.commit(&consumer, &[upsert()], &[], &mut StateBatch::default(), &offsets, &shutdown, Duration::from_secs(5))
            .expect("the batch commits after the abort path");
        assert!(sink.recreated > recreated_before, "an abort that times out must re-create the producer");
    }

    #[test]
    fn a_shutdown_past_its_deadline_gives_up_without_claiming_the_batch() {
        let MockWorker { _state, cluster, consumer, mut sink, offsets } = MockWorker::new("mock-txn-2", Duration::from_secs(1));
        cluster.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS; 2000]);
        let shutdown = AtomicBool::new(true);
        let started = Instant::now();
        let result = sink.commit(&consumer, &[upsert()], &[], &mut StateBatch::default(), &offsets, &shutdown, Duration::from_secs(2));
        assert!(result.is_err(), "a commit that never succeeds must not be reported as committed");
        assert!(started.elapsed() < Duration::from_secs(20), "gave up only after {:?}", started.elapsed());
        cluster.clear_request_errors(RDKafkaApiKey::EndTxn);
    }
}
