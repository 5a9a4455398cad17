//! The consume-process-produce loop: one consumer on the worker thread, which
//! polls, normalizes and dedupes; each batch's delivery on a second thread, one
//! batch in flight while the next is polled and normalized (see `in_flight`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};

use super::changelog::{self, Restorer};
use super::client::{base_config, consumer_config};
use super::consumer::{commit_progress, poll_batch, AdaptiveBatch, WorkerContext};
use super::delivery::{deliver_batches, mark_progress, observe_stage, stage_done, Committer, Delivery, DeliveryContext, Job};
use super::partitions::{lock, SharedPartitions};
use super::producer::{KafkaSink, Retry};
use super::reorder::ReorderBuffer;
use super::topics::{ensure_repartition_topic, Admin, RepartitionError};
use super::transaction::TransactionalSink;
use super::WorkerError;
use crate::batch;
use crate::config::Config;
use crate::envelope::Envelope;
use crate::error::StoreError;
use crate::failpoint::{self, Failpoint};
use crate::http::Health;
use crate::pipeline::{Pipeline, Prepared};
use crate::routing::{KeyingCheck, Placement};
use crate::state::{Keyspace, StateStore};
use crate::store::RocksStore;
use crate::telemetry::{self, Telemetry, INPUT_TOPIC_MISSING, REORDER_HELD, STORE_KEYS, STORE_MEMORY};

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
    let mut pipeline = deps.pipeline.clone();
    pipeline.placement = config.placement.clone();
    // Topics whose partitions own state, and the ones that only route.
    let (stateful, stateless): (Vec<String>, Vec<String>) = match &config.placement {
        Placement::Home { topic, .. } => {
            pipeline.hop = true;
            // Corrections are read like raw records: routed to their home.
            let raw = config.kafka.input_topics.iter().chain(config.kafka.control_topic.as_ref()).cloned().collect();
            (vec![topic.clone()], raw)
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
    mark_progress(&deps.health);
    let context = WorkerContext {
        health: deps.health.clone(),
        store: deps.store.clone(),
        partitions: partitions.clone(),
        stateless_topics: stateless.iter().cloned().collect::<HashSet<_>>(),
        delivery: config.delivery,
        restorer,
        in_flight: Arc::default(),
        restoring: Default::default(),
    };
    let consumer: BaseConsumer<WorkerContext> =
        consumer_config(config).create_with_context(context).map_err(WorkerError::Setup)?;
    let topics: Vec<&str> = stateless.iter().chain(&stateful).map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(WorkerError::Setup)?;
    failpoint::reached(Failpoint::BeforeProducers);
    let committer = Committer::open(
        config.delivery,
        config.changelog.is_some(),
        || KafkaSink::new(config).map_err(WorkerError::Setup),
        || open_transactional(config, deps.shutdown),
    )?;
    let Some(committer) = committer else {
        return Ok(());
    };
    deps.health.ready.store(true, Ordering::SeqCst);
    tracing::info!(topics = %topics.join(","), group = %config.kafka.group_id, placement = %config.placement.layout(), "worker started");

    let in_flight = consumer.context().in_flight.clone();
    std::thread::scope(|scope| {
        // The delivery thread: one batch at a time, in order (see `in_flight`).
        let (jobs, jobs_rx) = mpsc::sync_channel::<Job>(0);
        let (done_tx, done) = mpsc::channel();
        let (consumer, partitions, deps) = (&consumer, &partitions, &deps);
        let context = DeliveryContext {
            consumer,
            store: &deps.store,
            partitions,
            in_flight: &in_flight,
            health: &deps.health,
            shutdown: deps.shutdown,
            shutdown_timeout: config.shutdown_timeout,
        };
        scope.spawn(move || deliver_batches(&context, committer, jobs_rx, done_tx));
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
            if !config.delivery.offsets_in_transaction() && unit_was_empty && !delivery.pending {
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
    if !config.delivery.offsets_in_transaction() {
        commit_progress(consumer, partitions, CommitMode::Sync);
    }
    deps.health.drained.store(true, Ordering::SeqCst);
    consumer.unsubscribe();
    Ok(())
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
        metrics::counter!(telemetry::RECORDS_CAUGHT_UP).increment(silent.len() as u64);
        lock(partitions).advance(&silent);
    }
    let live_prepared = whole(&live, live_prepared);
    Ok((live, live_prepared))
}

