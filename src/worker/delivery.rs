//! The delivery thread: one batch at a time, in the order the worker thread
//! submitted them, through the [`Committer`] of the configured
//! [`DeliveryMode`]. The worker thread's end of it is [`Delivery`]: at most one
//! batch in flight, whose result the worker thread takes before it dedupes the
//! next batch against the state that batch wrote.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::consumer::{commit_progress, WorkerContext};
use super::in_flight::InFlight;
use super::partitions::{lock, SharedPartitions};
use super::producer::{KafkaSink, RetryingSink};
use super::reorder::ReorderBuffer;
use super::transaction::TransactionalSink;
use super::WorkerError;
use crate::batch;
use crate::config::DeliveryMode;
use crate::envelope::Envelope;
use crate::failpoint::{self, Failpoint};
use crate::http::Health;
use crate::sink::{Outputs, Sink, SinkError};
use crate::state::{Keyspace, StateBatch, StateStore};
use crate::store::RocksStore;
use crate::telemetry::{self, BATCH_STAGE_SECONDS, LAST_PROGRESS};

/// A processed batch on its way out: its records and what they produced.
pub(super) struct Job {
    pub(super) envelopes: Vec<Envelope>,
    pub(super) output: batch::BatchOutput,
}

/// How the delivery of a batch ended, when it did not stop the worker.
pub(super) enum Delivered {
    Done,
    /// The group replaced this member while the batch was in flight; nothing
    /// of it is claimed (its records are read again).
    Abandoned(Vec<Envelope>),
}

/// The worker thread's end of the delivery thread: at most one batch in flight.
pub(super) struct Delivery<'a> {
    pub(super) jobs: mpsc::SyncSender<Job>,
    pub(super) done: mpsc::Receiver<Result<Delivered, WorkerError>>,
    pub(super) in_flight: &'a InFlight,
    /// A batch was submitted whose result is not taken yet.
    pub(super) pending: bool,
    /// Liveness watches how long a batch is in delivery.
    pub(super) health: &'a Health,
}

impl Delivery<'_> {
    pub(super) fn submit(&mut self, job: Job) {
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
    pub(super) fn settle(
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
    pub(super) fn settle_if_done(&mut self, consumer: &BaseConsumer<WorkerContext>, window: &mut ReorderBuffer) -> Result<(), WorkerError> {
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
pub(super) fn deliver_batches(
    context: &DeliveryContext<'_>,
    mut committer: Committer,
    jobs: mpsc::Receiver<Job>,
    done: mpsc::Sender<Result<Delivered, WorkerError>>,
) {
    for job in jobs {
        // Dropped after the result is sent: a revocation waiting for this batch
        // then finds its progress advanced (or the batch abandoned).
        let _delivering = context.in_flight.delivering();
        let result = committer.deliver(context, job);
        if done.send(result).is_err() {
            return;
        }
    }
}

/// The output side of the worker: one arm per delivery mode, side by side.
/// Each arm is that mode's commit order for one batch; adding a mode is adding
/// an arm (and its [`DeliveryMode`]).
pub(super) enum Committer {
    /// Outputs through the idempotent producer, acknowledged; then the state
    /// changes (with changelogs on) through the transactional producer, with
    /// the batch's offsets; then the local store; then the group's offsets.
    AtLeastOnce { outputs: KafkaSink, changelog: Option<TransactionalSink> },
    /// Outputs, state changes and offsets in one transaction; then the local
    /// store (a crash in between is caught up on assignment).
    ExactlyOnce(TransactionalSink),
}

impl Committer {
    /// The committer of `mode`. `transactional` opens the transactional
    /// producer (waiting for the broker); `None` when a shutdown came first.
    pub(super) fn open(
        mode: DeliveryMode,
        changelogs: bool,
        outputs: impl FnOnce() -> Result<KafkaSink, WorkerError>,
        transactional: impl FnOnce() -> Result<Option<TransactionalSink>, WorkerError>,
    ) -> Result<Option<Committer>, WorkerError> {
        Ok(match mode {
            DeliveryMode::AtLeastOnce => {
                let outputs = outputs()?;
                let changelog = if changelogs {
                    match transactional()? {
                        Some(sink) => Some(sink),
                        None => return Ok(None),
                    }
                } else {
                    None
                };
                Some(Committer::AtLeastOnce { outputs, changelog })
            }
            DeliveryMode::ExactlyOnce => transactional()?.map(Committer::ExactlyOnce),
        })
    }

    /// Deliver one batch in this mode's order.
    fn deliver(&mut self, context: &DeliveryContext<'_>, job: Job) -> Result<Delivered, WorkerError> {
        match self {
            Committer::AtLeastOnce { outputs, changelog } => deliver_at_least_once(context, outputs, changelog.as_mut(), job),
            Committer::ExactlyOnce(sink) => deliver_transactionally(context, sink, job),
        }
    }
}

/// What the delivery thread works with: the consumer (for the group's offsets
/// and its fence), the store, the partitions' progress, and the shutdown with
/// its deadline. Nothing of the poll loop.
#[derive(Clone, Copy)]
pub(super) struct DeliveryContext<'a> {
    pub(super) consumer: &'a BaseConsumer<WorkerContext>,
    pub(super) store: &'a RocksStore,
    pub(super) partitions: &'a SharedPartitions,
    pub(super) in_flight: &'a InFlight,
    pub(super) health: &'a Health,
    pub(super) shutdown: &'a AtomicBool,
    pub(super) shutdown_timeout: Duration,
}

/// The output side of a batch in `exactly-once` mode, on the delivery thread:
/// one transaction for outputs and offsets, then state.
fn deliver_transactionally(context: &DeliveryContext<'_>, sink: &mut TransactionalSink, job: Job) -> Result<Delivered, WorkerError> {
    let DeliveryContext { consumer, store, partitions, shutdown, shutdown_timeout, health, .. } = *context;
    let Job { envelopes, mut output } = job;
    let offsets = next_offsets(&envelopes);
    failpoint::reached(Failpoint::BeforeOutput);
    let committing = Instant::now();
    let mut state = std::mem::take(&mut output.state);
    match sink.commit(consumer, output.outputs(), &mut state, &offsets, shutdown, shutdown_timeout) {
        Ok(()) => {}
        Err(SinkError::Fenced) => return Ok(Delivered::Abandoned(envelopes)),
        Err(e) => return Err(e.into()),
    }
    stage_done("output", committing);
    failpoint::reached(Failpoint::AfterOutput);
    // Only now may state claim the batch.
    let writing = Instant::now();
    store.write(state)?;
    stage_done("state", writing);
    failpoint::reached(Failpoint::AfterState);
    lock(partitions).advance(&envelopes);
    mark_progress(health);
    Ok(Delivered::Done)
}

/// The output side of a batch in `at-least-once` mode, on the delivery thread:
/// outputs acknowledged, state logged and written (`batch::deliver`), then the
/// group's offsets.
fn deliver_at_least_once(
    context: &DeliveryContext<'_>,
    sink: &mut KafkaSink,
    changelog: Option<&mut TransactionalSink>,
    job: Job,
) -> Result<Delivered, WorkerError> {
    let DeliveryContext { consumer, store, partitions, shutdown, shutdown_timeout, health, .. } = *context;
    let Job { envelopes, output } = job;
    let mut stage = Instant::now();
    let offsets = next_offsets(&envelopes);
    let outputs = RetryingSink { inner: sink, shutdown, deadline: shutdown_timeout };
    let mut fenced = AtLeastOnceSink { outputs, changelog, consumer, offsets: &offsets };
    match batch::deliver(store, &mut fenced, output, &mut |point| {
        let name = match point {
            Failpoint::AfterOutput => Some("output"),
            Failpoint::AfterChangelog => Some("changelog"),
            Failpoint::AfterState => Some("state"),
            // Processing was observed on the worker thread.
            _ => None,
        };
        if let Some(name) = name {
            stage_done(name, stage);
        }
        stage = Instant::now();
        failpoint::hook(point)
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
    mark_progress(health);
    if failpoint::fails(Failpoint::BatchOffsetCommit) {
        tracing::warn!("offset commit failed (WAYMARK_FAILPOINT); the store's progress stays authoritative");
    } else {
        commit_progress(consumer, partitions, CommitMode::Async);
    }
    Ok(Delivered::Done)
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
    metrics::counter!(telemetry::BATCHES_ABANDONED).increment(1);
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
    fn send(&mut self, outputs: Outputs<'_>) -> Result<(), SinkError> {
        self.outputs.send(outputs)
    }

    fn send_state(&mut self, state: &mut StateBatch) -> Result<(), SinkError> {
        let Some(changelog) = self.changelog.as_deref_mut() else {
            return Ok(());
        };
        if self.consumer.assignment_lost() {
            return Err(SinkError::Fenced);
        }
        if state.puts.iter().any(|(keyspace, _, _)| *keyspace != Keyspace::Offsets) {
            failpoint::reached(Failpoint::BeforeChangelog);
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


/// One stage of a batch took from `started` until now.
pub(super) fn stage_done(stage: &'static str, started: Instant) {
    observe_stage(stage, started.elapsed());
}

pub(super) fn observe_stage(stage: &'static str, elapsed: Duration) {
    metrics::histogram!(BATCH_STAGE_SECONDS, "stage" => stage).record(elapsed.as_secs_f64());
}

/// A batch completed (or the worker started): liveness sees progress. The
/// gauge is for Prometheus, which compares it with its own wall clock.
pub(super) fn mark_progress(health: &Health) {
    health.mark_progress();
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    metrics::gauge!(LAST_PROGRESS).set(wall.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::super::client::consumer_config;
    use std::sync::Arc;
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
            delivery: crate::config::DeliveryMode::AtLeastOnce,
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
