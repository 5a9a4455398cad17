//! The consume-process-produce loop: one consumer on the worker thread, which
//! polls, normalizes and dedupes; each batch's delivery on a second thread, one
//! batch in flight while the next is polled and normalized (see `in_flight`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::changelog::{self, Restorer};
use super::client::{base_config, consumer_config};
use super::consumer::{commit_progress, poll_batch, AdaptiveBatch, WorkerContext};
use super::in_flight::InFlight;
use super::partitions::{lock, SharedPartitions};
use super::producer::{KafkaSink, Outputs, Retry, RetryingSink};
use super::reorder::ReorderBuffer;
use super::topics::{ensure_repartition_topic, Admin, RepartitionError};
use super::transaction::TransactionalSink;
use super::WorkerError;
use crate::batch;
use crate::config::{Config, DeliveryMode};
use crate::envelope::Envelope;
use crate::error::StoreError;
use crate::http::Health;
use crate::pipeline::{Pipeline, Prepared};
use crate::routing::{KeyingCheck, Placement};
use crate::output::{DeadLetter, MilestoneUpsert};
use crate::routing::RoutedRecord;
use crate::sink::{Sink, SinkError};
use crate::state::{Keyspace, StateBatch, StateStore};
use crate::store::RocksStore;
use crate::telemetry::{Telemetry, BATCH_STAGE_SECONDS, INPUT_TOPIC_MISSING, LAST_PROGRESS, REORDER_HELD, STORE_KEYS, STORE_MEMORY};

/// Everything the worker loop needs, passed in (shutdown and clock included).
pub struct WorkerDeps<'a> {
    pub config: &'a Config,
    pub pipeline: &'a Pipeline,
    pub store: Arc<RocksStore>,
    pub telemetry: &'a Telemetry,
    pub health: Arc<Health>,
    pub shutdown: &'a AtomicBool,
    pub clock: &'a (dyn Fn() -> DateTime<Utc> + Sync),
}

/// Under load a batch may grow to this many times `worker.batch_size` (fewer
/// round trips to the broker and fsyncs per record; see `AdaptiveBatch`).
const MAX_BATCH_GROWTH: usize = 8;

/// Longest the loop restores partitions' state before it polls again (the
/// member must poll within `max.poll.interval.ms`, and the partitions already
/// restored keep being processed meanwhile).
const RESTORE_SLICE: Duration = Duration::from_millis(500);

/// How many shipments the keying check of `routing.mode = "input"` remembers.
const KEYING_CHECK_CAPACITY: usize = 1_000_000;

/// The consume-process-produce loop. Returns `Ok` after a clean shutdown.
pub fn run_worker(deps: WorkerDeps<'_>) -> Result<(), WorkerError> {
    let config = deps.config;
    let transactional = matches!(config.delivery, DeliveryMode::ExactlyOnce);
    let mut pipeline = deps.pipeline.clone();
    pipeline.placement = config.placement.clone();
    // Topics whose partitions own state, and the ones that only route.
    let (stateful, stateless): (Vec<String>, Vec<String>) = match &config.placement {
        Placement::Home { topic, .. } => {
            pipeline.hop = true;
            (vec![topic.clone()], config.kafka.input_topics.clone())
        }
        Placement::Input => {
            pipeline.keying_check = Some(Arc::new(Mutex::new(KeyingCheck::new(KEYING_CHECK_CAPACITY))));
            (config.kafka.input_topics.clone(), Vec::new())
        }
    };
    // Bad properties are a configuration error, found before any connection
    // attempt (not retried as if the broker were away).
    super::client::validate(config).map_err(WorkerError::Config)?;
    let restorer = match prepare_topics(config, &stateful, deps.shutdown)? {
        Some(restorer) => restorer,
        None => return Ok(()),
    };
    let partitions = SharedPartitions::default();
    deps.health.stall_after_ms.store(config.stall_timeout.as_millis().min(i64::MAX as u128) as i64, Ordering::SeqCst);
    mark_progress(&deps);
    let context = WorkerContext {
        health: deps.health.clone(),
        store: deps.store.clone(),
        partitions: partitions.clone(),
        stateless_topics: stateless.iter().cloned().collect::<HashSet<_>>(),
        transactional,
        restorer,
        in_flight: Arc::default(),
        restoring: Default::default(),
    };
    let consumer: BaseConsumer<WorkerContext> =
        consumer_config(config).create_with_context(context).map_err(WorkerError::Setup)?;
    let topics: Vec<&str> = stateless.iter().chain(&stateful).map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(WorkerError::Setup)?;
    failpoint("before_producers");
    let output = match &config.delivery {
        DeliveryMode::AtLeastOnce => Output::AtLeastOnce {
            outputs: KafkaSink::new(config).map_err(WorkerError::Setup)?,
            changelog: match config.changelog {
                Some(_) => match open_transactional(config, deps.shutdown)? {
                    Some(sink) => Some(sink),
                    None => return Ok(()),
                },
                None => None,
            },
        },
        DeliveryMode::ExactlyOnce => match open_transactional(config, deps.shutdown)? {
            Some(sink) => Output::ExactlyOnce(sink),
            None => return Ok(()),
        },
    };
    deps.health.ready.store(true, Ordering::SeqCst);
    tracing::info!(topics = ?topics, group = %config.kafka.group_id, placement = %config.placement.layout(), "worker started");

    let in_flight = consumer.context().in_flight.clone();
    std::thread::scope(|scope| {
        // The delivery thread: one batch at a time, in order (see `in_flight`).
        let (jobs, jobs_rx) = mpsc::sync_channel::<Job>(0);
        let (done_tx, done) = mpsc::channel();
        let (consumer, partitions, deps) = (&consumer, &partitions, &deps);
        let delivery_in_flight = &*in_flight;
        scope.spawn(move || deliver_batches(deps, consumer, output, partitions, jobs_rx, done_tx, delivery_in_flight));
        let mut delivery = Delivery { jobs, done, in_flight: &in_flight, pending: false, health: &deps.health };
        let result = consume(deps, consumer, &pipeline, partitions, &mut delivery);
        if result.is_err() {
            // A batch still in flight gives up its retries within
            // `shutdown_timeout` rather than hold the exit.
            deps.shutdown.store(true, Ordering::SeqCst);
        }
        result
        // Leaving the scope drops the job channel: the delivery thread ends
        // after the batch in flight, and the scope waits for it.
    })
}

/// The poll-process loop of the worker thread; each processed batch goes to the
/// delivery thread, and the next is polled and prepared while it is delivered.
fn consume(
    deps: &WorkerDeps<'_>,
    consumer: &BaseConsumer<WorkerContext>,
    pipeline: &Pipeline,
    partitions: &SharedPartitions,
    delivery: &mut Delivery<'_>,
) -> Result<(), WorkerError> {
    let config = deps.config;
    let transactional = matches!(config.delivery, DeliveryMode::ExactlyOnce);
    let mut last_gauges = Instant::now();
    let mut window = ReorderBuffer::default();
    let mut batch_size = AdaptiveBatch::new(config.batch_size, config.batch_size.saturating_mul(MAX_BATCH_GROWTH));
    loop {
        // After a shutdown request: no more polling, but a held window is still
        // processed and committed (in-flight work).
        let stopping = deps.shutdown.load(Ordering::SeqCst);
        deps.health.beat();
        // Partitions assigned during the last polls: their state first (after the
        // batch in flight, so that restores and deliveries never interleave), a
        // slice per turn, so that the poll below keeps the member in its group.
        if !stopping {
            if lock(partitions).has_pending_restore() {
                delivery.settle(consumer, &mut window, Vec::new())?;
                if consumer.context().restore_pending(consumer, RESTORE_SLICE) {
                    deps.health.mark_progress();
                }
            }
            deps.health.restoring.store(lock(partitions).pending_restore_count(), Ordering::SeqCst);
        }
        let polling = Instant::now();
        let mut envelopes =
            if stopping { Vec::new() } else { poll_batch(consumer, config, batch_size.current, deps.shutdown, partitions) };
        if !envelopes.is_empty() {
            stage_done("poll", polling);
        }
        batch_size.observe(envelopes.len());
        if let Some(e) = lock(partitions).take_fatal() {
            deps.health.failed.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
        {
            let owned = lock(partitions);
            envelopes.retain(|e| owned.owns(&e.topic, e.partition));
            // Held records of a partition revoked meanwhile are dropped, never
            // emitted: nothing of them was committed, the new owner reads them.
            window.retain(|e| owned.owns(&e.topic, e.partition));
        }
        let unit = match config.reorder {
            None => envelopes,
            Some(limits) => {
                // Only records that are deduped wait in the window: raw records
                // whose events hop home are routed at once.
                let (mut unit, held): (Vec<Envelope>, Vec<Envelope>) =
                    envelopes.into_iter().partition(|e| !pipeline.is_stateful(&e.topic));
                let now = Instant::now();
                window.extend(held, now);
                if window.due(limits, now) || stopping {
                    unit.extend(window.take());
                }
                metrics::gauge!(REORDER_HELD).set(window.len() as f64);
                unit
            }
        };
        let unit_was_empty = unit.is_empty();
        if unit_was_empty {
            delivery.settle_if_done(consumer, &mut window)?;
        } else {
            let now = (deps.clock)();
            let preparing = Instant::now();
            // Normalizing touches no state: it runs while the batch in flight is
            // delivered. The reorder window's order needs the whole window, so
            // it prepares inside `process_window`.
            let prepared = config.reorder.is_none().then(|| pipeline.prepare_batch(&unit, now));
            let prepare_time = preparing.elapsed();
            // Deduping reads the state the batch in flight writes.
            if let Some(unit) = delivery.settle(consumer, &mut window, unit)? {
                if let Some(job) = process_for_delivery(deps, pipeline, unit, prepared, now, partitions, prepare_time)? {
                    delivery.submit(job);
                }
            }
        }
        if last_gauges.elapsed() > Duration::from_secs(5) {
            update_gauges(&deps.store);
            check_input_topics(consumer, &config.kafka.input_topics, &deps.health);
            last_gauges = Instant::now();
            if !transactional && unit_was_empty && !delivery.pending {
                // Idle: hand the group our offsets again. A per-batch commit that
                // failed during a rebalance is otherwise never retried once traffic
                // stops, and the group's lag would stay above zero for good.
                commit_progress(consumer, partitions, CommitMode::Sync);
            }
        }
        if stopping {
            delivery.settle(consumer, &mut window, Vec::new())?;
            break;
        }
    }
    tracing::info!("shutting down: in-flight batch done, committing offsets");
    deps.health.ready.store(false, Ordering::SeqCst);
    if !transactional {
        commit_progress(consumer, partitions, CommitMode::Sync);
    }
    deps.health.drained.store(true, Ordering::SeqCst);
    consumer.unsubscribe();
    Ok(())
}

/// A processed batch on its way out: its records and what they produced.
struct Job {
    envelopes: Vec<Envelope>,
    output: batch::BatchOutput,
}

/// How the delivery of a batch ended, when it did not stop the worker.
enum Delivered {
    Done,
    /// The group replaced this member while the batch was in flight; nothing
    /// of it is claimed (its records are read again).
    Abandoned(Vec<Envelope>),
}

/// The worker thread's end of the delivery thread: at most one batch in flight.
struct Delivery<'a> {
    jobs: mpsc::SyncSender<Job>,
    done: mpsc::Receiver<Result<Delivered, WorkerError>>,
    in_flight: &'a InFlight,
    /// A batch was submitted whose result is not taken yet.
    pending: bool,
    /// Liveness watches how long a batch is in delivery.
    health: &'a Health,
}

impl Delivery<'_> {
    fn submit(&mut self, job: Job) {
        self.in_flight.start();
        self.health.delivering(true);
        self.pending = true;
        if self.jobs.send(job).is_err() {
            // The delivery thread is gone (it panicked): `settle` reports it.
            tracing::error!("the delivery thread has stopped");
        }
    }

    /// Wait for the batch in flight. Returns `next` (the records polled after
    /// it) when that batch was delivered; when it was abandoned, everything read
    /// after it (`next` and the reorder window's held records) is dropped too,
    /// and every partition of them that is still assigned is sought back to the
    /// first record not delivered, so nothing read after an abandoned batch
    /// overtakes it. An error of the batch in flight stops the worker.
    fn settle(
        &mut self,
        consumer: &BaseConsumer<WorkerContext>,
        window: &mut ReorderBuffer,
        next: Vec<Envelope>,
    ) -> Result<Option<Vec<Envelope>>, WorkerError> {
        if !self.pending {
            return Ok(Some(next));
        }
        let waiting = Instant::now();
        let result = self.done.recv().unwrap_or(Err(WorkerError::DeliveryThread));
        stage_done("wait", waiting);
        self.take(consumer, window, next, result)
    }

    /// Between batches with nothing to process: take the result of the batch
    /// in flight if it is there, without waiting (an abandoned batch is then
    /// read again at once, and the idle offset commit sees every batch).
    fn settle_if_done(&mut self, consumer: &BaseConsumer<WorkerContext>, window: &mut ReorderBuffer) -> Result<(), WorkerError> {
        if !self.pending {
            return Ok(());
        }
        let result = match self.done.try_recv() {
            Ok(result) => result,
            Err(mpsc::TryRecvError::Empty) => return Ok(()),
            Err(mpsc::TryRecvError::Disconnected) => Err(WorkerError::DeliveryThread),
        };
        self.take(consumer, window, Vec::new(), result).map(drop)
    }

    fn take(
        &mut self,
        consumer: &BaseConsumer<WorkerContext>,
        window: &mut ReorderBuffer,
        next: Vec<Envelope>,
        result: Result<Delivered, WorkerError>,
    ) -> Result<Option<Vec<Envelope>>, WorkerError> {
        self.pending = false;
        self.health.delivering(false);
        match result? {
            Delivered::Done => Ok(Some(next)),
            Delivered::Abandoned(mut unread) => {
                unread.extend(next);
                unread.extend(window.take());
                abandon(consumer, &unread)?;
                Ok(None)
            }
        }
    }
}

/// The delivery thread: each batch's outputs, changelog or transaction, state
/// write and progress, one batch at a time in submission order.
fn deliver_batches(
    deps: &WorkerDeps<'_>,
    consumer: &BaseConsumer<WorkerContext>,
    mut output: Output,
    partitions: &SharedPartitions,
    jobs: mpsc::Receiver<Job>,
    done: mpsc::Sender<Result<Delivered, WorkerError>>,
    in_flight: &InFlight,
) {
    for job in jobs {
        // Dropped after the result is sent: a revocation waiting for this batch
        // then finds its progress advanced (or the batch abandoned).
        let _delivering = in_flight.delivering();
        let result = match &mut output {
            Output::AtLeastOnce { outputs, changelog } => {
                deliver_at_least_once(deps, consumer, outputs, changelog.as_mut(), job, partitions)
            }
            Output::ExactlyOnce(sink) => deliver_transactionally(deps, consumer, sink, job, partitions),
        };
        if done.send(result).is_err() {
            return;
        }
    }
}

/// Create what is missing of the internal topics (the repartition topic, the
/// changelogs of the stateful topics) and return the changelog restorer
/// (`Some(None)`: changelogs off). The broker may not be up yet: wait for it (not
/// ready meanwhile) rather than exit into a crash loop; `None` when a shutdown
/// came first. A repartition topic whose partition count differs from
/// `routing.partitions` is refused at once: waiting cannot fix it.
fn prepare_topics(config: &Config, stateful: &[String], shutdown: &AtomicBool) -> Result<Option<Option<Restorer>>, WorkerError> {
    let mut retry = Retry::new(shutdown, Duration::ZERO, Duration::from_secs(1));
    loop {
        let attempt = || -> Result<(), WorkerError> {
            let admin = Admin::new(&base_config(config), Duration::from_secs(10))
                .map_err(|e| WorkerError::Changelog(changelog::ChangelogError::Setup(e.to_string(), "(admin client)".into())))?;
            if let Placement::Home { topic, partitions } = &config.placement {
                ensure_repartition_topic(&admin, topic, *partitions, config.repartition.replication, config.repartition.retention)?;
            }
            if let Some(settings) = &config.changelog {
                changelog::ensure_topics(&admin, &config.kafka.group_id, stateful, settings.replication, settings.retention)?;
            }
            Ok(())
        };
        match attempt() {
            Ok(()) => break,
            Err(e @ WorkerError::Repartition(RepartitionError::PartitionsChanged { .. })) => return Err(e),
            Err(_) if shutdown.load(Ordering::SeqCst) => {
                tracing::info!("stopped before the internal topics were ready; nothing was processed");
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(error = %e, brokers = %config.kafka.brokers, attempt = retry.attempt + 1, "internal topics not ready; retrying");
                retry.back_off();
            }
        }
    }
    Ok(Some(
        config
            .changelog
            .as_ref()
            .map(|settings| Restorer::new(super::client::restore_config(config), &config.kafka.group_id, settings.restore_timeout)),
    ))
}

/// The transactional producer, initialized (which fences an earlier producer of
/// the same id and settles its open transaction). The broker may be away at
/// that moment (it went down again right after the internal topics were
/// ready): a timeout is waited out, not a reason to exit; `None` when a
/// shutdown came first. Errors retrying cannot fix (authorization, a bad
/// property) stop the worker.
fn open_transactional(config: &Config, shutdown: &AtomicBool) -> Result<Option<TransactionalSink>, WorkerError> {
    let mut retry = Retry::new(shutdown, Duration::ZERO, Duration::from_secs(1));
    loop {
        match TransactionalSink::new(config, &config.transactional_id) {
            Ok(sink) => return Ok(Some(sink)),
            Err(_) if shutdown.load(Ordering::SeqCst) => return Ok(None),
            Err(e) if transient_init_error(&e) => {
                tracing::warn!(error = %e, brokers = %config.kafka.brokers, attempt = retry.attempt + 1, "the transactional producer cannot be initialized yet; retrying");
                retry.back_off();
            }
            Err(e) => return Err(WorkerError::Setup(e)),
        }
    }
}

/// Did initializing a transactional producer fail only for now (a timeout, a
/// coordinator or broker away), so that asking again can succeed?
fn transient_init_error(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};
    match e {
        KafkaError::Transaction(rd) => {
            rd.is_retriable()
                || matches!(
                    rd.code(),
                    Code::OperationTimedOut | Code::RequestTimedOut | Code::CoordinatorNotAvailable | Code::NotCoordinator | Code::AllBrokersDown | Code::BrokerTransportFailure
                )
        }
        _ => false,
    }
}

/// One stage of a batch took from `started` until now.
fn stage_done(stage: &'static str, started: Instant) {
    observe_stage(stage, started.elapsed());
}

fn observe_stage(stage: &'static str, elapsed: Duration) {
    metrics::histogram!(BATCH_STAGE_SECONDS, "stage" => stage).record(elapsed.as_secs_f64());
}

/// A batch completed (or the worker started): liveness sees progress. The
/// gauge is for Prometheus, which compares it with its own wall clock.
fn mark_progress(deps: &WorkerDeps<'_>) {
    deps.health.mark_progress();
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    metrics::gauge!(LAST_PROGRESS).set(wall.as_secs_f64());
}

/// Does the broker know every input topic, readable by this worker? A missing
/// or misspelled topic (or one this principal may not describe) is consumed by
/// nobody, and nothing else would show it: the worker is not ready while one
/// is missing, and `waymark_input_topic_missing{topic}` says which (an alert
/// watches it). A broker that does not answer leaves the last verdict.
fn check_input_topics(consumer: &BaseConsumer<WorkerContext>, topics: &[String], health: &Health) {
    let mut missing = 0;
    for topic in topics {
        let known = match consumer.fetch_metadata(Some(topic), Duration::from_secs(2)) {
            Ok(metadata) => metadata.topics().iter().any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()),
            Err(_) => return,
        };
        if !known {
            missing += 1;
            if missing_state_changed(topic, true) {
                tracing::error!(%topic, "input topic missing or not readable: nothing of it is consumed (create it, fix kafka.input_topics, or grant this principal Describe and Read on it)");
            }
        } else if missing_state_changed(topic, false) {
            tracing::info!(%topic, "input topic found");
        }
        metrics::gauge!(INPUT_TOPIC_MISSING, "topic" => topic.clone()).set(if known { 0.0 } else { 1.0 });
    }
    health.missing_inputs.store(missing, Ordering::SeqCst);
}

/// Remember whether `topic` was missing at the last check; true when that changed
/// (so the log says it once, not every few seconds). A first check that finds
/// the topic says nothing.
fn missing_state_changed(topic: &str, missing: bool) -> bool {
    use std::sync::OnceLock;
    static MISSING: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let mut set = MISSING.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if missing {
        set.insert(topic.to_string())
    } else {
        set.remove(topic)
    }
}

fn update_gauges(store: &RocksStore) {
    for keyspace in [Keyspace::Keys, Keyspace::Hashes, Keyspace::Shipments] {
        if let Ok(n) = store.estimated_keys(keyspace) {
            metrics::gauge!(STORE_KEYS, "keyspace" => keyspace.name()).set(n as f64);
        }
    }
    if let Ok(kinds) = store.memory_bytes() {
        for (kind, bytes) in kinds {
            metrics::gauge!(STORE_MEMORY, "kind" => kind).set(bytes as f64);
        }
    }
}

/// Crash-test hook: `WAYMARK_FAILPOINT=<point>:<n>` makes the process abort (like
/// `kill -9`: no destructors, no flush) the n-th time it reaches `<point>`, one of
/// `before_output`, `after_output` (outputs acknowledged or transaction committed,
/// state not written), `before_changelog` (at-least-once: the member still owned
/// its partitions a moment ago and is about to log a batch's state changes),
/// `after_changelog` (at-least-once with changelogs: state logged, not written
/// locally) and `after_state` (state written, offsets not committed in
/// at-least-once mode). `<point>:<n>:pause=<seconds>` stalls there instead (a
/// member that stops polling while a batch is in flight). `batch_offset_commit:<n>:fail`
/// makes every per-batch offset commit from the n-th on fail, as commits do
/// while the group rebalances (see [`failpoint_fails`]). Unset, it costs one
/// relaxed atomic load per batch.
pub(crate) fn failpoint(point: &str) {
    if let Some((name, nth, action)) = armed_failpoint() {
        if name == point && failpoint_hit() == *nth {
            match action {
                FailpointAction::Pause(seconds) => {
                    eprintln!("waymark: failpoint {point} reached, pausing {seconds}s (WAYMARK_FAILPOINT)");
                    std::thread::sleep(Duration::from_secs(*seconds));
                }
                FailpointAction::Abort => {
                    eprintln!("waymark: failpoint {point} reached, aborting (WAYMARK_FAILPOINT)");
                    std::process::abort();
                }
                FailpointAction::Fail => {}
            }
        }
    }
}

/// Does the step at `point` fail this time? True from the n-th time on when
/// `WAYMARK_FAILPOINT=<point>:<n>:fail` is set.
pub(crate) fn failpoint_fails(point: &str) -> bool {
    match armed_failpoint() {
        Some((name, nth, FailpointAction::Fail)) if name == point => failpoint_hit() >= *nth,
        _ => false,
    }
}

enum FailpointAction {
    Abort,
    Pause(u64),
    Fail,
}

fn armed_failpoint() -> &'static Option<(String, u64, FailpointAction)> {
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<(String, u64, FailpointAction)>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let spec = std::env::var("WAYMARK_FAILPOINT").ok()?;
        let mut parts = spec.split(':');
        let name = parts.next()?.to_string();
        let nth = parts.next().and_then(|n| n.parse().ok()).unwrap_or(1);
        let action = match parts.next() {
            Some("fail") => FailpointAction::Fail,
            Some(other) => match other.strip_prefix("pause=").and_then(|s| s.parse().ok()) {
                Some(seconds) => FailpointAction::Pause(seconds),
                None => FailpointAction::Abort,
            },
            None => FailpointAction::Abort,
        };
        Some((name, nth, action))
    })
}

/// Count one hit of the armed failpoint; the count after it.
fn failpoint_hit() -> u64 {
    use std::sync::atomic::AtomicU64;
    static HITS: AtomicU64 = AtomicU64::new(0);
    HITS.fetch_add(1, Ordering::SeqCst) + 1
}

/// A batch abandoned because this member lost its partitions while it was in
/// flight: its state is not written and its offsets are not advanced. The next
/// poll takes the lost assignment back through a rebalance (state restored from
/// the changelog, records re-read from the group's committed offsets). A
/// partition librdkafka still counts as assigned (the group refused the member
/// before librdkafka noticed, and a cooperative rebalance may give it back
/// without a revocation) is sought back to the batch's first record, or its
/// fetch position, already past the batch, would skip it for good. (The reorder
/// window holds no record of these partitions: a unit with stateful records
/// took the whole window.) A seek that fails stops the worker: a restart
/// resumes from the group's committed offsets.
fn abandon(consumer: &BaseConsumer<WorkerContext>, envelopes: &[Envelope]) -> Result<(), WorkerError> {
    metrics::counter!("waymark_batches_abandoned_total").increment(1);
    tracing::warn!(
        records = envelopes.len(),
        "this member lost its partitions while a batch was in flight (no poll for longer than max.poll.interval.ms, or the session timed out, e.g. during a broker outage); the batch is abandoned (nothing of it is claimed) and its partitions are re-assigned"
    );
    rewind(consumer, envelopes)
}

/// Seek every partition of `envelopes` that the consumer still has assigned
/// back to its first record in them.
fn rewind(consumer: &BaseConsumer<WorkerContext>, envelopes: &[Envelope]) -> Result<(), WorkerError> {
    let assigned = consumer.assignment().unwrap_or_default();
    for ((topic, partition), offset) in offset_per_partition(envelopes, i64::min) {
        if assigned.find_partition(topic, partition).is_none() {
            continue;
        }
        match consumer.seek(topic, partition, Offset::Offset(offset), Duration::from_secs(10)) {
            Ok(()) => tracing::info!(%topic, partition, offset, "sought back to the abandoned batch's first record"),
            // Lost and assigned again since: librdkafka has not started it yet,
            // and starts it at the group's committed offset, which the abandoned
            // batch never moved. Nothing to do.
            Err(e) if super::consumer::not_started(&e) => {
                tracing::info!(%topic, partition, offset, "the abandoned batch's partition is re-assigned and not started yet: it starts at the group's committed offset")
            }
            Err(e) => return Err(WorkerError::Rewind { topic: topic.to_string(), partition, reason: e.to_string() }),
        }
    }
    Ok(())
}

/// At-least-once: outputs through the idempotent producer (re-sent until
/// acknowledged), then the batch's state changes logged to the changelog in a
/// transaction with the batch's input offsets. A member that stalled for longer
/// than `max.poll.interval.ms` has been replaced, and the new owner may already
/// have logged newer state for the same shipments: an older value logged after
/// it would win compaction (a later restore would move statuses back). The group
/// refuses such a member's transactional offset commit, so its records are
/// aborted and it abandons the batch (see `process_and_commit`). The ownership
/// check first only spares a transaction that cannot commit; the fence is the
/// broker's.
struct AtLeastOnceSink<'a> {
    outputs: RetryingSink<'a>,
    /// `None`: changelogs off, state stays local.
    changelog: Option<&'a mut TransactionalSink>,
    consumer: &'a BaseConsumer<WorkerContext>,
    offsets: &'a TopicPartitionList,
}

impl Sink for AtLeastOnceSink<'_> {
    fn send(&mut self, upserts: &[MilestoneUpsert], dead_letters: &[DeadLetter], routed: &[RoutedRecord]) -> Result<(), SinkError> {
        self.outputs.send(upserts, dead_letters, routed)
    }

    fn send_state(&mut self, state: &mut StateBatch) -> Result<(), SinkError> {
        let Some(changelog) = self.changelog.as_deref_mut() else {
            return Ok(());
        };
        if self.consumer.assignment_lost() {
            return Err(SinkError::Fenced);
        }
        if state.puts.iter().any(|(keyspace, _, _)| *keyspace != Keyspace::Offsets) {
            failpoint("before_changelog");
        }
        changelog.log_state(self.consumer, state, self.offsets, self.outputs.shutdown, self.outputs.deadline)
    }
}

/// The offsets to commit after `envelopes`: per partition, one past the last.
fn next_offsets(envelopes: &[Envelope]) -> TopicPartitionList {
    let mut offsets = TopicPartitionList::new();
    for ((topic, partition), last) in offset_per_partition(envelopes, i64::max) {
        let _ = offsets.add_partition_offset(topic, partition, Offset::Offset(last + 1));
    }
    offsets
}

/// Per partition of `envelopes`, their offsets folded with `pick` (the first
/// with `i64::min`, the last with `i64::max`).
fn offset_per_partition(envelopes: &[Envelope], pick: fn(i64, i64) -> i64) -> HashMap<(&str, i32), i64> {
    let mut folded: HashMap<(&str, i32), i64> = HashMap::new();
    for e in envelopes {
        folded.entry((e.topic.as_str(), e.partition)).and_modify(|offset| *offset = pick(*offset, e.offset)).or_insert(e.offset);
    }
    folded
}

/// The output side of the worker, by delivery mode.
enum Output {
    /// Outputs through the idempotent producer; state changes (with changelogs
    /// on) through the transactional one, with the batch's offsets.
    AtLeastOnce { outputs: KafkaSink, changelog: Option<TransactionalSink> },
    ExactlyOnce(TransactionalSink),
}

/// What `Pipeline::prepare_batch` made of a unit's records, one per record.
type Preparations = Vec<(Prepared, Duration)>;

/// Dedupe and order a unit of records (prepared already, or, with the reorder
/// window, in hierarchy order) and observe the batch's `process` stage.
fn process_unit(
    deps: &WorkerDeps<'_>,
    pipeline: &Pipeline,
    envelopes: &[Envelope],
    prepared: Option<Preparations>,
    now: DateTime<Utc>,
    telemetry: Option<&Telemetry>,
) -> Result<batch::BatchOutput, StoreError> {
    match prepared {
        Some(prepared) => batch::process_prepared(pipeline, &*deps.store, envelopes, prepared, now, true, telemetry),
        None => batch::process_window(pipeline, &*deps.store, envelopes, now, true, telemetry),
    }
}

/// One unit, processed for the delivery thread (`None`: nothing left to
/// deliver). Records of a partition that is catching up silently go first,
/// state only, written at once: in `exactly-once` mode their outputs were
/// committed before a crash left the store behind (never in `at-least-once`,
/// where no partition catches up).
fn process_for_delivery(
    deps: &WorkerDeps<'_>,
    pipeline: &Pipeline,
    envelopes: Vec<Envelope>,
    prepared: Option<Preparations>,
    now: DateTime<Utc>,
    partitions: &SharedPartitions,
    prepare_time: Duration,
) -> Result<Option<Job>, WorkerError> {
    let processing = Instant::now();
    let (live, prepared) = catch_up_silently(deps, pipeline, envelopes, prepared, now, partitions)?;
    if live.is_empty() {
        return Ok(None);
    }
    let output = process_unit(deps, pipeline, &live, prepared, now, Some(deps.telemetry))?;
    observe_stage("process", prepare_time + processing.elapsed());
    Ok(Some(Job { envelopes: live, output }))
}

/// Process and write the unit's catch-up records (see `process_for_delivery`);
/// returns the others with their preparations.
fn catch_up_silently(
    deps: &WorkerDeps<'_>,
    pipeline: &Pipeline,
    envelopes: Vec<Envelope>,
    prepared: Option<Preparations>,
    now: DateTime<Utc>,
    partitions: &SharedPartitions,
) -> Result<(Vec<Envelope>, Option<Preparations>), WorkerError> {
    let catching_up: Vec<bool> = {
        let partitions = lock(partitions);
        if !partitions.is_catching_up() {
            return Ok((envelopes, prepared));
        }
        envelopes.iter().map(|e| partitions.is_catch_up(e)).collect()
    };
    let (mut silent, mut live) = (Vec::new(), Vec::with_capacity(envelopes.len()));
    let (mut silent_prepared, mut live_prepared) = (Vec::new(), Vec::with_capacity(envelopes.len()));
    let mut prepared = prepared.map(Vec::into_iter);
    for (envelope, catching_up) in envelopes.into_iter().zip(catching_up) {
        let prepared = prepared.as_mut().and_then(Iterator::next);
        let (records, preparations) = if catching_up { (&mut silent, &mut silent_prepared) } else { (&mut live, &mut live_prepared) };
        records.push(envelope);
        preparations.extend(prepared);
    }
    // Preparations come for every record or for none (the reorder window's).
    let whole = |records: &Vec<Envelope>, preparations: Preparations| {
        (preparations.len() == records.len()).then_some(preparations)
    };
    if !silent.is_empty() {
        let output = process_unit(deps, pipeline, &silent, whole(&silent, silent_prepared), now, None)?;
        deps.store.write(output.state)?;
        metrics::counter!("waymark_records_caught_up_total").increment(silent.len() as u64);
        lock(partitions).advance(&silent);
    }
    let live_prepared = whole(&live, live_prepared);
    Ok((live, live_prepared))
}

/// The output side of a batch in `exactly-once` mode, on the delivery thread:
/// one transaction for outputs and offsets, then state.
fn deliver_transactionally(
    deps: &WorkerDeps<'_>,
    consumer: &BaseConsumer<WorkerContext>,
    sink: &mut TransactionalSink,
    job: Job,
    partitions: &SharedPartitions,
) -> Result<Delivered, WorkerError> {
    let Job { envelopes, output } = job;
    let offsets = next_offsets(&envelopes);
    failpoint("before_output");
    let mut state = output.state;
    let outputs = Outputs { upserts: &output.upserts, dead_letters: &output.dead_letters, routed: &output.routed };
    let committing = Instant::now();
    match sink.commit(consumer, outputs, &mut state, &offsets, deps.shutdown, deps.config.shutdown_timeout) {
        Ok(()) => {}
        Err(SinkError::Fenced) => return Ok(Delivered::Abandoned(envelopes)),
        Err(e) => return Err(e.into()),
    }
    stage_done("output", committing);
    failpoint("after_output");
    // Only now may state claim the batch.
    let writing = Instant::now();
    deps.store.write(state)?;
    stage_done("state", writing);
    failpoint("after_state");
    lock(partitions).advance(&envelopes);
    mark_progress(deps);
    Ok(Delivered::Done)
}

/// The output side of a batch in `at-least-once` mode, on the delivery thread:
/// outputs acknowledged, state logged and written (`batch::deliver`), then the
/// group's offsets.
fn deliver_at_least_once(
    deps: &WorkerDeps<'_>,
    consumer: &BaseConsumer<WorkerContext>,
    sink: &mut KafkaSink,
    changelog: Option<&mut TransactionalSink>,
    job: Job,
    partitions: &SharedPartitions,
) -> Result<Delivered, WorkerError> {
    let Job { envelopes, output } = job;
    let mut stage = Instant::now();
    let offsets = next_offsets(&envelopes);
    let outputs = RetryingSink { inner: sink, shutdown: deps.shutdown, deadline: deps.config.shutdown_timeout };
    let mut fenced = AtLeastOnceSink { outputs, changelog, consumer, offsets: &offsets };
    match batch::deliver(&*deps.store, &mut fenced, output, &mut |point| {
        let name = match point {
            // Processing was observed on the worker thread.
            batch::Failpoint::BeforeOutput => None,
            batch::Failpoint::AfterOutput => Some("output"),
            batch::Failpoint::AfterChangelog => Some("changelog"),
            batch::Failpoint::AfterState => Some("state"),
        };
        if let Some(name) = name {
            stage_done(name, stage);
        }
        stage = Instant::now();
        failpoint(point.name());
        false
    }) {
        Ok(_) => {}
        Err(batch::DeliverError::Sink(SinkError::Fenced)) => {
            // Its outputs are acknowledged (whoever owns the partitions now
            // re-runs the batch: identical upserts), its state is neither logged
            // nor written.
            return Ok(Delivered::Abandoned(envelopes));
        }
        Err(batch::DeliverError::Sink(e)) => return Err(e.into()),
        Err(batch::DeliverError::Store(e)) => return Err(e.into()),
        Err(batch::DeliverError::Crashed(point)) => unreachable!("no failpoint is armed in production ({point:?})"),
    }
    lock(partitions).advance(&envelopes);
    mark_progress(deps);
    if failpoint_fails("batch_offset_commit") {
        tracing::warn!("offset commit failed (WAYMARK_FAILPOINT); the store's progress stays authoritative");
    } else {
        commit_progress(consumer, partitions, CommitMode::Async);
    }
    Ok(Delivered::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

    /// A consumer of topic `in` on a mock cluster: `partitions` partitions of
    /// ten records each, all assigned from the beginning. The cluster must
    /// outlive the consumer.
    fn mock_consumer(partitions: i32) -> (MockCluster<'static, DefaultProducerContext>, BaseConsumer<WorkerContext>, tempfile::TempDir) {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("in", partitions, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let producer: ThreadedProducer<DefaultProducerContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        for partition in 0..partitions {
            for i in 0..10 {
                producer.send(BaseRecord::<(), str>::to("in").partition(partition).payload(&format!("record {i}"))).unwrap();
            }
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let toml = format!("[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"mock-group\"\ninput_topics = [\"in\"]\n[state]\nchangelog = false\n");
        let config = RawConfig::from_toml(&toml).unwrap().validate().unwrap();
        let state = tempfile::tempdir().unwrap();
        let store = Arc::new(RocksStore::open(state.path(), &crate::store::StoreOptions::default(), crate::store::system_clock()).unwrap());
        let context = WorkerContext {
            health: Arc::default(),
            store,
            partitions: Default::default(),
            stateless_topics: Default::default(),
            transactional: false,
            restorer: None,
            in_flight: Default::default(),
            restoring: Default::default(),
        };
        let consumer: BaseConsumer<WorkerContext> = consumer_config(&config).create_with_context(context).unwrap();
        let mut tpl = TopicPartitionList::new();
        for partition in 0..partitions {
            tpl.add_partition_offset("in", partition, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        (cluster, consumer, state)
    }

    /// The next record the consumer returns.
    fn next(consumer: &BaseConsumer<WorkerContext>) -> Envelope {
        let started = Instant::now();
        loop {
            assert!(started.elapsed() < Duration::from_secs(30), "no record from the mock cluster");
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                return super::super::consumer::envelope_of(&message.detach());
            }
        }
    }

    /// An abandoned batch's partitions are still assigned when the group refused
    /// the member before librdkafka noticed (or a cooperative rebalance hands
    /// them back without a revocation). The fetch position is past the batch, so
    /// without a seek back the next poll would go on after it and the batch's
    /// records would never be processed.
    #[test]
    fn an_abandoned_batch_is_read_again_from_its_first_record() {
        let (_cluster, consumer, _state) = mock_consumer(1);
        let batch: Vec<Envelope> = (0..6).map(|_| next(&consumer)).collect();
        assert_eq!(batch.iter().map(|e| e.offset).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5]);
        // Records 3 to 5 were the batch in flight; the batch is abandoned.
        rewind(&consumer, &batch[3..]).unwrap();
        assert_eq!(next(&consumer).offset, 3, "the batch's first record must be read again");
    }

    /// The batch in flight is abandoned after the next one was polled (and
    /// records were held in the reorder window): those were read after it and
    /// must not overtake it, so they are dropped and their partitions sought back
    /// too, including partitions the abandoned batch did not have.
    #[test]
    fn records_polled_after_an_abandoned_batch_are_read_again_with_it() {
        let (_cluster, consumer, _state) = mock_consumer(3);
        let mut polled: Vec<Envelope> = (0..30).map(|_| next(&consumer)).collect();
        polled.sort_by_key(|e| (e.partition, e.offset));
        let of = |partition: i32, offsets: std::ops::Range<i64>| -> Vec<Envelope> {
            polled.iter().filter(|e| e.partition == partition && offsets.contains(&e.offset)).cloned().collect()
        };
        // In flight: partition 0's records 2 to 4. Polled after it: partition 0's
        // 5 to 6 and partition 1's 3 to 5; held in the window: partition 2's 4 to 7.
        let in_flight_batch = of(0, 2..5);
        let polled_after: Vec<Envelope> = of(0, 5..7).into_iter().chain(of(1, 3..6)).collect();
        let mut window = ReorderBuffer::default();
        window.extend(of(2, 4..8), Instant::now());
        let in_flight = InFlight::default();
        let (jobs, _jobs_rx) = mpsc::sync_channel(0);
        let (_done_tx, done) = mpsc::channel();
        let health = Health::default();
        let mut delivery = Delivery { jobs, done, in_flight: &in_flight, pending: true, health: &health };
        let kept = delivery.take(&consumer, &mut window, polled_after, Ok(Delivered::Abandoned(in_flight_batch))).unwrap();
        assert!(kept.is_none(), "records polled after an abandoned batch must not be processed");
        assert!(window.take().is_empty(), "held records read after an abandoned batch must be dropped");
        assert!(!delivery.pending);
        let mut first_again = HashMap::new();
        while first_again.len() < 3 {
            let e = next(&consumer);
            first_again.entry(e.partition).or_insert(e.offset);
        }
        assert_eq!(first_again, HashMap::from([(0, 2), (1, 3), (2, 4)]), "each partition re-reads from its first record not delivered");
    }

    /// A poll that revokes partitions may come while a batch of them is being
    /// delivered: the revocation must wait for it, so the offsets it hands the
    /// group (and the state the next owner restores) include that batch.
    #[test]
    fn a_revocation_waits_for_the_batch_in_flight_and_commits_its_offsets() {
        let (_cluster, consumer, _state) = mock_consumer(1);
        let context = consumer.context();
        lock(&context.partitions).assign("in", 0, Some(0), None);
        let in_flight_batch: Vec<Envelope> = (0..6).map(|_| next(&consumer)).collect();
        context.in_flight.start();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _delivering = context.in_flight.delivering();
                std::thread::sleep(Duration::from_millis(300));
                lock(&context.partitions).advance(&in_flight_batch);
            });
            let mut revoked = TopicPartitionList::new();
            revoked.add_partition("in", 0);
            context.on_revoke(&consumer, &revoked);
        });
        let committed = super::super::consumer::committed_offset(&consumer, "in", 0, Duration::from_secs(10)).unwrap();
        assert_eq!(committed, Some(6), "the revocation must hand the group the offsets of the batch that was in flight");
        assert!(!lock(&context.partitions).owns("in", 0));
    }

    #[test]
    fn a_delivered_batch_lets_the_next_one_through() {
        let (_cluster, consumer, _state) = mock_consumer(1);
        let in_flight = InFlight::default();
        let (jobs, _jobs_rx) = mpsc::sync_channel(0);
        let (done_tx, done) = mpsc::channel();
        let health = Health::default();
        let mut delivery = Delivery { jobs, done, in_flight: &in_flight, pending: true, health: &health };
        done_tx.send(Ok(Delivered::Done)).unwrap();
        let next_batch = vec![next(&consumer)];
        let kept = delivery.settle(&consumer, &mut ReorderBuffer::default(), next_batch).unwrap();
        assert_eq!(kept.map(|k| k.len()), Some(1));
        assert!(!delivery.pending);
        drop(done_tx);
        delivery.pending = true;
        assert!(matches!(delivery.settle(&consumer, &mut ReorderBuffer::default(), Vec::new()), Err(WorkerError::DeliveryThread)));
    }
}
