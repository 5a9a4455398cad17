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
//! Limits: state is local to the instance; when a partition moves to an instance
//! with no state for it, that instance starts from the group's committed offset and
//! its dedupe memory for the partition starts empty (outputs stay idempotent by
//! `milestone_id`).

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

use crate::batch;
use crate::config::Config;
use crate::envelope::Envelope;
use crate::error::{Fate, StoreError};
use crate::output::{DeadLetter, MilestoneUpsert};
use crate::pipeline::{stored_progress, Pipeline};
use crate::sink::{Sink, SinkError};
use crate::state::Keyspace;
use crate::store::RocksStore;
use crate::http::Health;
use crate::telemetry::{Telemetry, CONSUMER_LAG, STORE_KEYS};

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("Kafka client setup failed: {0} (check kafka.brokers and the librdkafka properties)")]
    Setup(KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
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
        .set("enable.partition.eof", "false");
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
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
                let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                for elem in tpl.clone().elements() {
                    let (topic, partition) = (elem.topic().to_string(), elem.partition());
                    assigned.insert((topic.clone(), partition));
                    match stored_progress(&*self.store, &topic, partition) {
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
                if commit.count() > 0 && !consumer.assignment_lost() {
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
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut counts = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(_) => counts.acked += 1,
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
}

impl KafkaSink {
    pub fn new(config: &Config) -> Result<KafkaSink, KafkaError> {
        let producer = producer_config(config).create_with_context(DeliveryTracker::default())?;
        Ok(KafkaSink {
            producer,
            output_topic: config.kafka.output_topic.clone(),
            dead_letter_topic: config.kafka.dead_letter_topic.clone(),
            flush_timeout: Duration::from_secs(60),
        })
    }

    fn enqueue(&self, topic: &str, key: &str, payload: &[u8], headers: OwnedHeaders) -> Result<(), SinkError> {
        let mut record = BaseRecord::to(topic).key(key).payload(payload).headers(headers);
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
        *self.producer.context().state.lock().unwrap_or_else(|p| p.into_inner()) = DeliveryCounts::default();
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
        let flushed = self.producer.flush(self.flush_timeout);
        let counts = self.producer.context().state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if flushed.is_ok() && counts.acked == total && counts.failed == 0 {
            return Ok(());
        }
        Err(SinkError::Kafka {
            failed: total - counts.acked,
            total,
            reason: counts
                .last_error
                .or_else(|| flushed.err().map(|e| e.to_string()))
                .unwrap_or_else(|| "not acknowledged in time".into()),
            fate: Fate::Retry,
        })
    }
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
    let context = WorkerContext { store: deps.store.clone(), progress: progress.clone(), assigned: assigned.clone() };
    let consumer: BaseConsumer<WorkerContext> =
        consumer_config(config).create_with_context(context).map_err(WorkerError::Setup)?;
    let topics: Vec<&str> = config.kafka.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(WorkerError::Setup)?;
    let mut sink = KafkaSink::new(config).map_err(WorkerError::Setup)?;
    deps.health.ready.store(true, Ordering::SeqCst);
    tracing::info!(topics = ?topics, group = %config.kafka.group_id, "worker started");

    let mut last_gauges = Instant::now();
    while !deps.shutdown.load(Ordering::SeqCst) {
        let mut envelopes = poll_batch(&consumer, config, deps.shutdown, &progress);
        {
            let owned = assigned.lock().unwrap_or_else(|p| p.into_inner());
            envelopes.retain(|e| owned.contains(&(e.topic.clone(), e.partition)));
        }
        if !envelopes.is_empty() {
            process_and_commit(&deps, &consumer, &mut sink, &envelopes, &progress)?;
        }
        if last_gauges.elapsed() > Duration::from_secs(5) {
            update_gauges(&consumer, &deps.store, &progress);
            last_gauges = Instant::now();
        }
    }
    tracing::info!("shutting down: in-flight batch done, committing offsets");
    deps.health.ready.store(false, Ordering::SeqCst);
    commit_progress(&consumer, &progress, CommitMode::Sync);
    consumer.unsubscribe();
    Ok(())
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
) -> Result<(), WorkerError> {
    let output = batch::process(deps.pipeline, &*deps.store, envelopes, (deps.clock)(), true, Some(deps.telemetry))?;
    let mut retrying = RetryingSink { inner: sink, shutdown: deps.shutdown, deadline: deps.config.shutdown_timeout };
    match batch::deliver(&*deps.store, &mut retrying, output, &mut batch::no_crash) {
        Ok(_) => {}
        Err(batch::DeliverError::Sink(e)) => return Err(e.into()),
        Err(batch::DeliverError::Store(e)) => return Err(e.into()),
        Err(batch::DeliverError::Crashed(point)) => unreachable!("no failpoint is armed in production ({point:?})"),
    }
    {
        let mut map = progress.lock().unwrap_or_else(|p| p.into_inner());
        for envelope in envelopes {
            map.insert((envelope.topic.clone(), envelope.partition), envelope.offset + 1);
        }
    }
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

impl Sink for RetryingSink<'_> {
    fn send(&mut self, upserts: &[MilestoneUpsert], dead_letters: &[DeadLetter]) -> Result<(), SinkError> {
        let mut attempt = 0u32;
        let mut shutdown_seen: Option<Instant> = None;
        loop {
            match self.inner.send(upserts, dead_letters) {
                Ok(()) => return Ok(()),
                Err(e) if e.fate() == Fate::Retry => {
                    if self.shutdown.load(Ordering::SeqCst) {
                        let since = *shutdown_seen.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.deadline {
                            return Err(e);
                        }
                    }
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "output not acknowledged; re-sending the batch (identical records)");
                    metrics::counter!("waymark_output_retries_total").increment(1);
                    // No consumer poll here: a poll could hand out (and so skip) a record.
                    std::thread::sleep(Duration::from_millis(500).saturating_mul(attempt.min(10)));
                }
                Err(e) => return Err(e),
            }
        }
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

fn update_gauges(consumer: &BaseConsumer<WorkerContext>, store: &RocksStore, progress: &Mutex<HashMap<(String, i32), i64>>) {
    let map = progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for ((topic, partition), next) in map {
        if let Ok((_, high)) = consumer.client().fetch_watermarks(&topic, partition, Duration::from_millis(500)) {
            metrics::gauge!(CONSUMER_LAG, "topic" => topic, "partition" => partition.to_string()).set((high - next).max(0) as f64);
        }
    }
    for keyspace in [Keyspace::Keys, Keyspace::Hashes, Keyspace::Shipments] {
        if let Ok(n) = store.estimated_keys(keyspace) {
            metrics::gauge!(STORE_KEYS, "keyspace" => keyspace.name()).set(n as f64);
        }
    }
}
