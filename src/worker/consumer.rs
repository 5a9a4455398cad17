//! The consumer side: rebalance callbacks (seek, or pause until restored, on
//! assignment; commit on revocation), the restores between batches, polling a
//! batch, and committing offsets to the group.
//!
//! One consumer reads both record kinds: raw carrier topics and, with
//! `routing.mode = "home"`, the repartition topic. Only partitions that own state
//! (the repartition topic's, or the inputs' with `routing.mode = "input"`) are
//! restored from a changelog or seeked to stored progress; raw partitions whose
//! events hop to their home keep no state and start at the group's committed offset.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::changelog::{ChangelogError, RestoreSession, Restored, Restorer};
use super::in_flight::InFlight;
use super::partitions::{lock, SharedPartitions};
use crate::config::Config;
use crate::envelope::Envelope;
use crate::http::Health;
use crate::pipeline::stored_progress;
use crate::store::RocksStore;
use crate::config::DeliveryMode;
use crate::telemetry::{self, CONSUMER_LAG};

/// Consumer callbacks: restore or seek on assignment, commit on revocation.
pub struct WorkerContext {
    /// Lag, broker reachability and assignment, for /healthz and /readyz.
    pub(super) health: Arc<Health>,
    pub(super) store: Arc<RocksStore>,
    pub(super) partitions: SharedPartitions,
    /// Topics whose partitions keep no state (raw inputs whose events hop home).
    pub(super) stateless_topics: HashSet<String>,
    /// Exactly-once: offsets are committed only inside transactions (never on
    /// revocation), and a store behind the group's offset catches up silently.
    pub(super) delivery: DeliveryMode,
    /// State hand-over: restore each assigned stateful partition from its changelog first.
    pub(super) restorer: Option<Restorer>,
    /// The batch being delivered while the loop polls: a revocation waits for it.
    pub(super) in_flight: Arc<InFlight>,
    /// Restores in progress, by partition, a slice per turn.
    pub(super) restoring: Mutex<std::collections::HashMap<super::partitions::TopicPartition, Restoring>>,
}

impl ClientContext for WorkerContext {
    /// librdkafka's statistics (every `statistics.interval.ms`) carry each
    /// assigned partition's end and position: publishing the lag here costs the
    /// poll loop nothing. The lag is computed from the consumer's own position,
    /// not librdkafka's `consumer_lag`, which counts from the group's committed
    /// offset as *this consumer* last committed or fetched it: in exactly-once
    /// mode the consumer never commits (offsets go in transactions), so that
    /// figure only grows, and on a transactional topic it stays at least 1 (the
    /// commit marker after the last record). The position librdkafka reports is
    /// past markers it has read.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut total_lag = 0i64;
        for (topic, stats) in statistics.topics {
            for (partition, p) in stats.partitions {
                if partition < 0 || !lock(&self.partitions).owns(&topic, partition) {
                    continue;
                }
                let Some(lag) = own_lag(&p) else { continue };
                total_lag += lag;
                metrics::gauge!(CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string()).set(lag as f64);
            }
        }
        self.health.lag.store(total_lag, Ordering::SeqCst);
        let broker_up = statistics.brokers.values().any(|b| b.state == "UP" && b.nodeid >= 0);
        self.health.broker_up.store(broker_up, Ordering::SeqCst);
    }
}

/// Records of one partition this consumer has not read yet: its end for a
/// `read_committed` reader (the last stable offset) minus where it reads next
/// (the position past what it returned, else the committed offset it started
/// from, else the log start, where `auto.offset.reset = earliest` begins).
/// `None` while the end is not known yet.
pub(super) fn own_lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    let end = if p.ls_offset >= 0 { p.ls_offset } else { p.hi_offset };
    if end < 0 {
        return None;
    }
    let position = [p.app_offset, p.committed_offset, p.lo_offset].into_iter().find(|o| *o >= 0)?;
    Some((end - position).max(0))
}

impl ConsumerContext for WorkerContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.on_assign(consumer, tpl);
                self.health.assigned.store(lock(&self.partitions).owned_count(), Ordering::SeqCst);
                for elem in tpl.elements() {
                    // Every assigned partition has its lag series from the start
                    // (0 until the first statistics report measures it), so a
                    // dashboard or alert never sees a partition without one.
                    metrics::gauge!(CONSUMER_LAG, "topic" => elem.topic().to_string(), "partition" => elem.partition().to_string()).set(0.0);
                }
                let result = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if let Err(e) = result {
                    // The partitions would count as owned and never be fetched
                    // (a silent stall until the next rebalance): stop, and a
                    // restart joins the group afresh.
                    tracing::error!(error = %e, "assigning partitions failed; stopping");
                    lock(&self.partitions).fail(ChangelogError::Restore {
                        topic: "(assignment)".into(),
                        partition: -1,
                        reason: format!("librdkafka refused the group's assignment: {e}"),
                    });
                }
                // Partitions whose state the loop restores are paused before
                // anything of them is fetched; the loop resumes them once restored.
                let mut pending = TopicPartitionList::new();
                {
                    let partitions = lock(&self.partitions);
                    for elem in tpl.elements().iter().filter(|e| partitions.is_pending_restore(e.topic(), e.partition())) {
                        pending.add_partition(elem.topic(), elem.partition());
                    }
                }
                if pending.count() > 0 {
                    if let Err(e) = consumer.pause(&pending) {
                        tracing::error!(error = %e, "cannot pause partitions until their state is restored; stopping");
                        lock(&self.partitions).fail(ChangelogError::Restore {
                            topic: "(assignment)".into(),
                            partition: -1,
                            reason: format!("cannot pause newly assigned partitions until their state is restored: {e}"),
                        });
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, tpl);
                self.health.assigned.store(lock(&self.partitions).owned_count(), Ordering::SeqCst);
                for elem in tpl.elements() {
                    // A partition that moved away has no lag here any more.
                    metrics::gauge!(CONSUMER_LAG, "topic" => elem.topic().to_string(), "partition" => elem.partition().to_string()).set(0.0);
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
    fn on_assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        for elem in tpl.clone().elements() {
            let (topic, partition) = (elem.topic().to_string(), elem.partition());
            if self.stateless_topics.contains(&topic) {
                lock(&self.partitions).assign(&topic, partition, None, None);
                tracing::debug!(%topic, partition, "assigned; raw partition, starting at the group's committed offset");
                continue;
            }
            if self.restorer.is_some() {
                // Restored by the loop between batches (`restore_pending`), not
                // here: restoring in the callback held up the whole group's
                // rebalance, about 100 ms per partition. Kafka Streams made the
                // same move (restore in the poll loop, partition paused).
                lock(&self.partitions).assign_pending_restore(&topic, partition);
                tracing::debug!(%topic, partition, "assigned; paused until its state is restored");
                continue;
            }
            // The group's committed offset is authoritative (an operator's reset
            // with Kafka's own tools is followed); the store's progress serves
            // only when the group has none, or, in exactly-once mode, when the
            // store lags the group and must catch up silently.
            let committed = match committed_offset(consumer, &topic, partition, Duration::from_secs(10)) {
                Ok(committed) => committed,
                Err(e) if self.delivery.offsets_in_transaction() => {
                    // Without it, a store that lags the group cannot catch up
                    // silently and would emit committed outputs again: stop (a
                    // restart asks again) rather than guess.
                    tracing::error!(%topic, partition, error = %e, "cannot read the group's committed offset; stopping");
                    let mut partitions = lock(&self.partitions);
                    partitions.assign(&topic, partition, None, None);
                    partitions.fail(ChangelogError::Restore {
                        topic: topic.clone(),
                        partition,
                        reason: format!("cannot read the group's committed offset: {e}"),
                    });
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%topic, partition, error = %e, "cannot read the group's committed offset; using the store's progress");
                    None
                }
            };
            let stored = match stored_progress(&*self.store, &topic, partition) {
                Ok(stored) => stored,
                Err(e) => {
                    tracing::error!(%topic, partition, error = %e, "cannot read stored progress; using the group's committed offset");
                    None
                }
            };
            let (start, catch_up_to) = match (committed, stored) {
                (Some(committed), Some(stored)) if self.delivery.offsets_in_transaction() && stored < committed => (Some(stored), Some(committed)),
                (Some(committed), _) => (Some(committed), None),
                (None, stored) => (stored, None),
            };
            if let Some(start) = start {
                let _ = tpl.set_partition_offset(&topic, partition, Offset::Offset(start));
            }
            lock(&self.partitions).assign(&topic, partition, start, catch_up_to);
            match catch_up_to {
                Some(committed) => tracing::info!(%topic, partition, start, committed, "assigned; catching up state silently to the committed offset"),
                None => tracing::info!(%topic, partition, start, committed, stored, "assigned"),
            }
        }
    }

    /// First the batch in flight (polled before this poll) is delivered or
    /// abandoned (see [`InFlight`]); then everything processed is in the store,
    /// and the group is handed the same offsets before the partitions go.
    pub(super) fn on_revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        if self.in_flight.is_busy() {
            let waiting = Instant::now();
            self.in_flight.wait_idle();
            tracing::debug!(waited_ms = waiting.elapsed().as_millis() as u64, "revocation waited for the batch in flight");
        }
        let mut commit = TopicPartitionList::new();
        {
            let mut partitions = lock(&self.partitions);
            for elem in tpl.elements() {
                if let Some(next) = partitions.revoke(elem.topic(), elem.partition()) {
                    let _ = commit.add_partition_offset(elem.topic(), elem.partition(), Offset::Offset(next));
                }
            }
        }
        if commit.count() > 0 && !consumer.assignment_lost() && !self.delivery.offsets_in_transaction() {
            if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                tracing::warn!(error = %e, "committing offsets on revocation failed; the next owner may re-process (identical upserts)");
            }
        }
    }

    /// Restore, for about `budget`, the state of the partitions assigned since
    /// the last calls, in assignment order, a partition that has to wait going
    /// to the back of the line (so one that waits holds up no other); seek each
    /// restored partition to where it starts and resume it. Called by the loop between polls, so a
    /// restore of any length keeps the member in its group (the partitions wait
    /// paused meanwhile, and the others are processed). A partition's restore
    /// waits, without failing, while the group's committed offset cannot be
    /// read yet (a transaction of a member that died is still open) and while
    /// librdkafka has not started the partition (a seek then fails with "Local:
    /// Erroneous state"): both are transient during a fail-over. It fails, and
    /// stops the worker through [`super::partitions::Partitions::fail`], only when it has made no
    /// progress for `worker.restore_timeout`. Returns whether it moved forward.
    pub(super) fn restore_pending(&self, consumer: &BaseConsumer<Self>, budget: Duration) -> bool {
        let Some(restorer) = &self.restorer else {
            return false;
        };
        let deadline = Instant::now() + budget;
        let mut moved = false;
        let mut jobs = self.restoring.lock().unwrap_or_else(|p| p.into_inner());
        // Rebalance callbacks run only inside a poll, never during this call:
        // the pending list cannot change under it.
        let pending = lock(&self.partitions).pending_restores();
        // A partition revoked since (and maybe assigned again) starts afresh:
        // whatever its earlier restore applied stays, and is read on from.
        jobs.retain(|tp, job| pending.iter().any(|(pending, assignment)| pending == tp && *assignment == job.assignment));
        for (tp, assignment) in pending {
            if Instant::now() >= deadline {
                break;
            }
            let job = jobs.entry(tp.clone()).or_insert_with(|| Restoring::new(tp.0.clone(), tp.1, assignment));
            match self.advance_restore(consumer, restorer, job, deadline) {
                Ok(Step::Started) => {
                    moved = true;
                    jobs.remove(&tp);
                }
                Ok(Step::Moved) => moved = true,
                Ok(Step::Waiting) => lock(&self.partitions).defer_restore(&tp.0, tp.1),
                Err(e) => {
                    tracing::error!(topic = %tp.0, partition = tp.1, error = %e, "cannot restore the partition's state; stopping");
                    jobs.remove(&tp);
                    lock(&self.partitions).fail(e);
                    return moved;
                }
            }
        }
        moved
    }

    /// One restore, as far as `deadline` allows: the group's committed offset
    /// (for a `read_committed` consumer it is only answered once no
    /// transactional commit is pending, so the changelog's end read after it is
    /// at least as new as that offset), then the changelog replayed into the
    /// store, then the partition started at the group's committed offset (an
    /// operator's reset with Kafka's tools is followed; records the state
    /// already holds come out as duplicates, never as milestones), or at the
    /// store's progress when the group has none.
    fn advance_restore(&self, consumer: &BaseConsumer<Self>, restorer: &Restorer, job: &mut Restoring, deadline: Instant) -> Result<Step, ChangelogError> {
        let (topic, partition) = (job.topic.clone(), job.partition);
        let restore_failed = |reason: String| ChangelogError::Restore { topic: topic.clone(), partition, reason };
        let mut moved = false;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(if moved { Step::Moved } else { Step::Waiting });
            }
            match &mut job.phase {
                RestorePhase::Committed => match committed_offset(consumer, &topic, partition, COMMITTED_WAIT) {
                    Ok(committed) => match restorer.begin(&self.store, &topic, partition) {
                        Ok(session) => {
                            job.phase = RestorePhase::Reading { session, committed };
                            job.since = Instant::now();
                        }
                        // The changelog's end is not readable yet: a topic just
                        // created has no leader for a moment, a broker that is
                        // restarting does not answer. Asked again next turn.
                        Err(ChangelogError::Restore { reason, .. }) if job.since.elapsed() < restorer.timeout => {
                            job.note_wait_reason("the changelog's end is not readable yet; retrying", &reason);
                            return Ok(if moved { Step::Moved } else { Step::Waiting });
                        }
                        Err(e) => return Err(e),
                    },
                    Err(e) if job.since.elapsed() < restorer.timeout => {
                        job.note_wait("the group's committed offset is not readable yet (a transaction of a member that left may still be open); waiting", &e);
                        return Ok(if moved { Step::Moved } else { Step::Waiting });
                    }
                    Err(e) => return Err(restore_failed(format!("cannot read the group's committed offset for {:?}: {e}", restorer.timeout))),
                },
                RestorePhase::Reading { session, committed } => {
                    let before = session.applied();
                    let step = session.step(&self.store, remaining)?;
                    moved |= session.applied() > before || step.is_some();
                    let Some(restored) = step else {
                        return Ok(if moved { Step::Moved } else { Step::Waiting });
                    };
                    let stored = stored_progress(&*self.store, &topic, partition)?;
                    let start = committed.or(stored);
                    let applied = match restored {
                        Restored::Done(applied) => applied,
                        Restored::Recreated { .. } => 0,
                    };
                    tracing::info!(%topic, partition, committed, stored, applied, start, "assigned; state restored from the changelog");
                    job.phase = RestorePhase::Starting { start };
                    job.since = Instant::now();
                }
                RestorePhase::Starting { start } => {
                    let start = *start;
                    let started = (|| -> Result<(), KafkaError> {
                        if let Some(start) = start {
                            consumer.seek(&topic, partition, Offset::Offset(start), Duration::from_secs(1))?;
                        }
                        let mut resume = TopicPartitionList::new();
                        resume.add_partition(&topic, partition);
                        consumer.resume(&resume)
                    })();
                    match started {
                        Ok(()) => {
                            let mut partitions = lock(&self.partitions);
                            partitions.restore_done(&topic, partition);
                            partitions.assign(&topic, partition, start, None);
                            if start.is_none() {
                                tracing::info!(%topic, partition, "restored; no progress anywhere, starting at auto.offset.reset");
                            }
                            return Ok(Step::Started);
                        }
                        Err(e) if job.since.elapsed() < restorer.timeout => {
                            job.note_wait("the partition is not started yet (librdkafka is still fetching its committed offset); retrying", &e);
                            return Ok(if moved { Step::Moved } else { Step::Waiting });
                        }
                        Err(e) => return Err(restore_failed(format!("cannot start the partition at {start:?} for {:?}: {e}", restorer.timeout))),
                    }
                }
            }
        }
    }
}

/// How long one ask for a partition's committed offset may take. Far longer
/// than a restore slice on purpose: after a broker restart, on a loaded
/// machine, the group coordinator answers only once it has loaded the group,
/// which can take many seconds, and asks cut shorter than that were never
/// answered (asks of 250 ms and then of 5 s each lost a CI run that restarted
/// the broker beside other load). The member keeps its group meanwhile
/// (librdkafka heartbeats on its own thread, and 30 s is far below
/// `max.poll.interval.ms`), and the wait is asked again, without failing,
/// until `worker.restore_timeout`.
const COMMITTED_WAIT: Duration = Duration::from_secs(30);

/// How far one call moved a restore.
enum Step {
    /// The partition is restored, started and resumed.
    Started,
    /// Entries were applied (or a phase ended); more to do.
    Moved,
    /// Nothing moved: waiting for the group or for librdkafka.
    Waiting,
}

/// A partition's restore in progress (see [`WorkerContext::restore_pending`]).
pub(super) struct Restoring {
    topic: String,
    partition: i32,
    /// The assignment it restores for (see [`super::partitions::Partitions::restore_assignment`]).
    assignment: u64,
    phase: RestorePhase,
    /// When the current phase began: the progress deadline of the waits.
    since: Instant,
    /// When a wait was last logged (every 30 s while it lasts, not every turn).
    wait_logged: Option<Instant>,
}

enum RestorePhase {
    Committed,
    Reading { session: RestoreSession, committed: Option<i64> },
    Starting { start: Option<i64> },
}

impl Restoring {
    fn new(topic: String, partition: i32, assignment: u64) -> Restoring {
        Restoring { topic, partition, assignment, phase: RestorePhase::Committed, since: Instant::now(), wait_logged: None }
    }

    fn note_wait(&mut self, what: &str, error: &KafkaError) {
        self.note_wait_reason(what, &error.to_string());
    }

    fn note_wait_reason(&mut self, what: &str, error: &str) {
        if self.wait_logged.is_none() {
            metrics::counter!(telemetry::RESTORE_WAITS).increment(1);
        }
        if self.wait_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(30)) {
            self.wait_logged = Some(Instant::now());
            let waited_s = self.since.elapsed().as_secs();
            tracing::warn!(topic = %self.topic, partition = self.partition, %error, waited_s, "{what}");
        }
    }
}

/// Did a seek fail only because librdkafka has not started the partition's
/// fetcher yet (its committed offset is still being fetched)?
pub(super) fn not_started(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Seek(reason) if *reason == RDKafkaErrorCode::State.to_string())
}

/// The group's committed offset of one partition (`Ok(None)`: the group has none).
pub(super) fn committed_offset(
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

/// How many records the next batch may take: batch sizes adapt to load. A batch
/// that filled up means records are waiting, so the next may be twice as large
/// (up to `max`); one that closed on its wait shrinks back towards `base`, so a
/// quiet stream keeps small batches and low latency.
#[derive(Debug, Clone, Copy)]
pub struct AdaptiveBatch {
    pub base: usize,
    pub max: usize,
    pub current: usize,
}

impl AdaptiveBatch {
    pub fn new(base: usize, max: usize) -> Self {
        AdaptiveBatch { base, max: max.max(base), current: base }
    }

    /// After a poll that returned `got` records.
    pub fn observe(&mut self, got: usize) {
        self.current = if got >= self.current { (self.current * 2).min(self.max) } else { (self.current / 2).max(self.base) };
    }
}

/// Poll until a batch is full, the wait is over, or shutdown is requested.
pub(super) fn poll_batch(
    consumer: &BaseConsumer<WorkerContext>,
    config: &Config,
    batch_size: usize,
    shutdown: &AtomicBool,
    partitions: &SharedPartitions,
) -> Vec<Envelope> {
    let deadline = Instant::now() + config.batch_wait;
    let mut envelopes = Vec::new();
    let mut bytes = 0usize;
    while envelopes.len() < batch_size && bytes < config.batch_max_bytes && !shutdown.load(Ordering::SeqCst) {
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
                let next = lock(partitions).next(message.topic(), message.partition());
                if let Some(next) = next.filter(|next| message.offset() < *next) {
                    if !log_restarted_below(consumer, partitions, message.topic(), message.partition(), message.offset(), next) {
                        metrics::counter!(telemetry::RECORDS_SKIPPED).increment(1);
                        continue;
                    }
                }
                bytes += message.payload_len();
                envelopes.push(envelope_of(&message));
            }
        }
    }
    envelopes
}

/// A record came below the progress kept for its partition. Either it is a
/// stale record (processed already: skipped), or the partition's log now ends
/// below that progress: the topic was deleted and re-created (teams do it to
/// purge poison data) and librdkafka, finding the old position out of range,
/// reset to the new log's start. Its records are new and must all be
/// processed: the progress restarts at this record, loudly (an error line and
/// `waymark_topic_recreated_total`). Returns whether the record is kept.
fn log_restarted_below(
    consumer: &BaseConsumer<WorkerContext>,
    partitions: &SharedPartitions,
    topic: &str,
    partition: i32,
    offset: i64,
    next: i64,
) -> bool {
    match consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)) {
        Ok((_, end)) if end < next => {
            metrics::counter!(crate::telemetry::TOPIC_RECREATED, "topic" => topic.to_string()).increment(1);
            tracing::error!(
                %topic, partition, progress = next, end, restart = offset,
                "the partition's log ends before this worker's progress: the topic was deleted and re-created; processing the new topic's records from its start (nothing of it is skipped)"
            );
            lock(partitions).restart_at(topic, partition, offset);
            true
        }
        Ok(_) => false,
        Err(e) => {
            tracing::warn!(%topic, partition, offset, progress = next, error = %e, "a record below the partition's progress, and its log end cannot be read to tell whether the topic was re-created; skipping it as processed");
            false
        }
    }
}

/// A consumed record as an [`Envelope`] (the one conversion: the worker and
/// `replay --from-topic` both read through it).
pub fn envelope_of<M: Message>(message: &M) -> Envelope {
    let headers = message
        .headers()
        .map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
        .unwrap_or_default();
    Envelope {
        topic: message.topic().to_string(),
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        headers,
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
    }
}

/// Tell the group how far every owned partition is processed.
pub(super) fn commit_progress(consumer: &BaseConsumer<WorkerContext>, partitions: &SharedPartitions, mode: CommitMode) {
    let list = lock(partitions).commit_list();
    if list.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in list {
        let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(next));
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::warn!(error = %e, "offset commit failed; the store's progress stays authoritative");
    }
}

#[cfg(test)]
mod tests {
    use super::AdaptiveBatch;

    #[test]
    fn batches_grow_under_load_and_shrink_when_quiet() {
        let mut batch = AdaptiveBatch::new(500, 4000);
        for expected in [1000, 2000, 4000, 4000] {
            batch.observe(batch.current);
            assert_eq!(batch.current, expected);
        }
        batch.observe(10);
        assert_eq!(batch.current, 2000);
        for _ in 0..5 {
            batch.observe(0);
        }
        assert_eq!(batch.current, 500, "never below the configured size");
    }
}
