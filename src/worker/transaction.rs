//! The transactional producer of `exactly-once` mode: a batch's repartition
//! records, upserts, dead letters, changelog records and the offsets of every
//! input it consumed (raw and repartition topics alike) commit in one Kafka
//! transaction, or not at all. In `at-least-once` mode with state hand-over the
//! same producer logs each batch's state changes with its offsets
//! ([`TransactionalSink::log_state`]): the outputs go first, through the
//! idempotent producer.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::TopicPartitionList;

use super::changelog::{self, ChangelogRecord};
use super::client::transactional_producer_config;
use super::consumer::WorkerContext;
use super::producer::{DeliveryTracker, KafkaSink, Outputs, Retry};
use crate::config::Config;
use crate::error::Fate;
use crate::sink::SinkError;
use crate::state::StateBatch;
use crate::telemetry;

/// Timeout of each transactional call (init, send offsets, commit, abort).
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The transactional producer of `exactly-once` mode (and of the changelog in
/// `at-least-once` mode).
pub struct TransactionalSink {
    config: ClientConfig,
    sink: KafkaSink,
    /// Timeout of each transactional call (init, send offsets, commit, abort).
    timeout: Duration,
    /// How many times the producer was replaced after an indefinite error.
    recreated: u64,
    /// Whether a commit's outcome is still unknown (kept across batches).
    settlement: Settlement,
    /// Group id naming the changelog topics, when state changes are logged.
    changelog_group: Option<String>,
}

/// Changelog offsets the delivery reports gave: (topic, partition) -> offset.
type Positions = HashMap<(String, i32), i64>;

impl TransactionalSink {
    pub fn new(config: &Config, transactional_id: &str) -> Result<TransactionalSink, KafkaError> {
        let (client, sink) = Self::open(config, transactional_id)?;
        let changelog_group = config.changelog.as_ref().map(|_| config.kafka.group_id.clone());
        Ok(TransactionalSink { config: client, sink, timeout: TRANSACTION_TIMEOUT, recreated: 0, settlement: Settlement::default(), changelog_group })
    }

    /// The changelog records of a batch's state (none when changelogs are off).
    fn changelog_records(&self, state: &StateBatch) -> Result<Vec<ChangelogRecord>, SinkError> {
        match &self.changelog_group {
            Some(group) => Ok(changelog::records(state, group)?),
            None => Ok(Vec::new()),
        }
    }

    /// A sink on a fresh transactional producer (initialized: it fenced any
    /// earlier producer of the same id), and the client config that made it.
    fn open(config: &Config, transactional_id: &str) -> Result<(ClientConfig, KafkaSink), KafkaError> {
        let client = transactional_producer_config(config, transactional_id);
        let sink = KafkaSink::with_producer(config, Self::create(&client, TRANSACTION_TIMEOUT)?);
        Ok((client, sink))
    }

    fn create(client: &ClientConfig, timeout: Duration) -> Result<ThreadedProducer<DeliveryTracker>, KafkaError> {
        let producer: ThreadedProducer<DeliveryTracker> = client.create_with_context(DeliveryTracker::default())?;
        producer.init_transactions(timeout)?;
        Ok(producer)
    }

    /// Commit one batch's outputs and input offsets atomically, retrying until
    /// it is certain that they are committed exactly once, or the shutdown
    /// deadline passes (then nothing of the batch is claimed). See
    /// [`commit_batch`] for the protocol.
    pub fn commit(
        &mut self,
        consumer: &BaseConsumer<WorkerContext>,
        outputs: Outputs<'_>,
        state: &mut StateBatch,
        offsets: &TopicPartitionList,
        shutdown: &AtomicBool,
        deadline: Duration,
    ) -> Result<(), SinkError> {
        let records = self.changelog_records(state)?;
        self.commit_records(consumer, outputs, &records, state, offsets, shutdown, deadline)
    }

    #[allow(clippy::too_many_arguments)]
    fn commit_records(
        &mut self,
        consumer: &BaseConsumer<WorkerContext>,
        outputs: Outputs<'_>,
        records: &[ChangelogRecord],
        state: &mut StateBatch,
        offsets: &TopicPartitionList,
        shutdown: &AtomicBool,
        deadline: Duration,
    ) -> Result<(), SinkError> {
        let mut retry = Retry::new(shutdown, deadline, Duration::from_millis(200));
        let mut settlement = std::mem::take(&mut self.settlement);
        let mut transaction = KafkaTransaction { sink: self, consumer, expected: 0 };
        let result = commit_batch(&mut transaction, &mut settlement, outputs, records, offsets, &mut retry);
        self.settlement = settlement;
        if matches!(result, Err(SinkError::Fenced)) {
            // The batch is abandoned, and its transaction may still be open on
            // the broker (a broker outage cut it off). Its offsets keep the
            // group's committed offsets of those partitions unstable, and the
            // restore of the next assignment waits for them to be stable: end
            // it now (a fresh producer's init aborts it) instead of at the next
            // batch, which only comes after that restore. A failure here
            // changes nothing: the next batch re-creates the producer anyway.
            if let Err(e) = self.recreate() {
                tracing::warn!(error = %e, "could not end the abandoned batch's transaction now; the next batch will");
            }
        }
        if let Some(delivered) = result? {
            changelog::stage_positions(state, records, &delivered);
        }
        Ok(())
    }

    /// At-least-once with state hand-over: log a batch's state changes to the
    /// changelog in a transaction with the batch's input offsets, after its
    /// outputs were acknowledged (by the idempotent producer). The offsets carry
    /// the consumer's group metadata, so the group refuses the commit of a
    /// member it has replaced: such a member's records are aborted, invisible to
    /// the `read_committed` restores, and it abandons the batch
    /// ([`SinkError::Fenced`]). A new owner's restore waits for a transaction
    /// that is still open (its committed-offset fetch is stable), so it never
    /// misses state a member logged just before it lost the partition. A batch
    /// with no state changes commits nothing here (its offsets go to the group
    /// as usual).
    pub fn log_state(
        &mut self,
        consumer: &BaseConsumer<WorkerContext>,
        state: &mut StateBatch,
        offsets: &TopicPartitionList,
        shutdown: &AtomicBool,
        deadline: Duration,
    ) -> Result<(), SinkError> {
        let records = self.changelog_records(state)?;
        if records.is_empty() {
            return Ok(());
        }
        let nothing = Outputs::default();
        self.commit_records(consumer, nothing, &records, state, offsets, shutdown, deadline)
    }

    /// Replace the producer: the new one's init fences the old and settles any
    /// transaction it left open.
    fn recreate(&mut self) -> Result<(), KafkaError> {
        tracing::warn!("re-creating the transactional producer");
        metrics::counter!(telemetry::PRODUCER_RECREATED).increment(1);
        self.recreated += 1;
        self.sink.producer = Self::create(&self.config, self.timeout)?;
        Ok(())
    }
}

/// The steps of one transaction as the commit protocol sees them: the
/// transactional producer and the consumer group behind one seam, so that the
/// protocol can be driven by scripted answers in tests (a real broker cannot be
/// made to time out a commit after it wrote PrepareCommit on demand).
trait TransactionOps {
    fn begin(&mut self) -> Result<(), String>;
    /// Enqueue the batch's records in the open transaction.
    fn send(&mut self, outputs: Outputs<'_>, records: &[ChangelogRecord]) -> Result<(), SinkError>;
    /// Add the consumed offsets to the open transaction (the group's metadata
    /// fences a member the group has replaced: [`SinkError::Fenced`]).
    fn send_offsets(&mut self, offsets: &TopicPartitionList) -> Result<(), SinkError>;
    /// `Ok(Some(positions))`: committed, with the changelog offsets the
    /// delivery reports gave; `Ok(None)`: committed, positions unknown.
    fn commit(&mut self) -> Result<Option<Positions>, CommitError>;
    fn abort(&mut self) -> Result<(), String>;
    /// A fresh producer with the same transactional id: its init fences the
    /// old one and completes or aborts the transaction it left.
    fn recreate(&mut self) -> Result<(), String>;
    /// Are the group's committed offsets exactly `offsets`? An error is no answer.
    fn is_committed(&mut self, offsets: &TopicPartitionList) -> Result<bool, String>;
    /// The group took this member's partitions away (session timeout, or no
    /// poll for longer than `max.poll.interval.ms`).
    fn assignment_lost(&self) -> bool;
}

/// How a commit failed.
#[derive(Debug)]
enum CommitError {
    /// Nothing of the transaction is committed; abort it and try again.
    Abortable(String),
    /// It may or may not have committed (a timeout, a coordinator failing over).
    Unknown(String),
}

/// A commit's unknown outcome, remembered across attempts and batches.
#[derive(Debug, Default)]
struct Settlement {
    /// A commit ended with an unknown outcome that is not settled yet: nothing
    /// is sent until the group's offsets say whether it committed.
    unsettled: bool,
    /// The producer of that commit still has to be replaced.
    recreate_pending: bool,
}

/// The commit protocol: attempts until one commits, the shutdown deadline
/// passes, or this member loses its partitions ([`SinkError::Fenced`]: the
/// batch is abandoned). A batch is never re-sent while an earlier attempt's
/// outcome is unknown: after an indefinite commit error the only steps allowed
/// are re-creating the producer and asking the group's committed offsets, and
/// a new transaction begins only once they answered "not committed".
fn commit_batch<T: TransactionOps>(
    ops: &mut T,
    settlement: &mut Settlement,
    outputs: Outputs<'_>,
    records: &[ChangelogRecord],
    offsets: &TopicPartitionList,
    retry: &mut Retry<'_>,
) -> Result<Option<Positions>, SinkError> {
    loop {
        match attempt(ops, settlement, outputs, records, offsets) {
            Ok(positions) => return Ok(positions),
            Err(AttemptError::Replaced) => {
                tracing::warn!("the transaction cannot commit: the group has replaced this member");
                return Err(SinkError::Fenced);
            }
            Err(AttemptError::Failed(reason, fate)) => {
                if ops.assignment_lost() {
                    // The session timed out or the member stopped polling for
                    // longer than max.poll.interval.ms: the group refuses this
                    // member's offset commits for good (unknown member), and
                    // retrying without polling would never rejoin. Abandon the
                    // batch: nothing of it is claimed, the next poll rejoins and
                    // re-reads it from the group's committed offsets. A commit
                    // whose outcome is unknown stays unsettled: the producer is
                    // re-created before the next transaction begins.
                    tracing::warn!(%reason, "the transaction cannot commit: this member lost its partitions");
                    return Err(SinkError::Fenced);
                }
                if fate != Fate::Retry || retry.gave_up() {
                    let total = outputs.len() + records.len();
                    return Err(SinkError::Kafka { failed: total, total, reason, fate });
                }
                tracing::warn!(%reason, attempt = retry.attempt + 1, "transaction not committed; trying the batch again");
                metrics::counter!(telemetry::TRANSACTION_RETRIES).increment(1);
                retry.back_off();
            }
        }
    }
}

/// How one attempt of [`commit_batch`] failed.
enum AttemptError {
    /// The group refused this member's offsets (it has been replaced); the
    /// transaction is aborted.
    Replaced,
    /// Anything else, with its fate.
    Failed(String, Fate),
}

/// One attempt of [`commit_batch`].
fn attempt<T: TransactionOps>(
    ops: &mut T,
    settlement: &mut Settlement,
    outputs: Outputs<'_>,
    records: &[ChangelogRecord],
    offsets: &TopicPartitionList,
) -> Result<Option<Positions>, AttemptError> {
    let retry = |reason: String| AttemptError::Failed(reason, Fate::Retry);
    if settlement.unsettled {
        // An earlier attempt ended with an unknown outcome: settle it before
        // anything is sent again. A fresh producer (its init fences the old
        // one and completes or aborts its transaction), then a definite answer
        // from the group's committed offsets; no answer, no re-send.
        if settlement.recreate_pending {
            ops.recreate().map_err(|e| retry(format!("re-creating the producer after an unknown commit outcome: {e}")))?;
            settlement.recreate_pending = false;
        }
        let committed = ops
            .is_committed(offsets)
            .map_err(|e| retry(format!("cannot tell whether the last transaction committed ({e}); asking again before re-sending")))?;
        settlement.unsettled = false;
        if committed {
            tracing::info!("the transaction did commit before the error; not sending the batch again");
            return Ok(None);
        }
    }
    if let Err(e) = ops.begin() {
        ops.recreate().map_err(|r| retry(format!("begin failed ({e}); re-creating the producer failed: {r}")))?;
        return Err(retry(format!("begin_transaction: {e}")));
    }
    // A member whose assignment is lost holds group metadata without a
    // generation or member id (librdkafka resets them), and the classic group
    // coordinator accepts a transactional offset commit with such metadata
    // unchecked: the batch, whose partitions another member may own by now,
    // would commit. So membership is checked right before the offsets go into
    // the transaction and again right before it commits.
    let sent = ops.send(outputs, records).and_then(|()| {
        if ops.assignment_lost() {
            return Err(SinkError::Fenced);
        }
        ops.send_offsets(offsets)
    });
    if let Err(e) = sent {
        abort_or_recreate(ops);
        return Err(match e {
            SinkError::Fenced => AttemptError::Replaced,
            e => AttemptError::Failed(format!("sending the batch: {e}"), e.fate()),
        });
    }
    if ops.assignment_lost() {
        abort_or_recreate(ops);
        return Err(AttemptError::Replaced);
    }
    match ops.commit() {
        Ok(positions) => Ok(positions),
        Err(CommitError::Abortable(e)) => {
            abort_or_recreate(ops);
            Err(retry(format!("commit_transaction: {e} (aborted)")))
        }
        Err(CommitError::Unknown(e)) => {
            // Indefinite: it may or may not have committed. Never retry
            // blindly: the next attempt settles the outcome first.
            settlement.unsettled = true;
            settlement.recreate_pending = true;
            Err(retry(format!("commit_transaction: {e} (outcome unknown; settling it before anything is re-sent)")))
        }
    }
}

fn abort_or_recreate<T: TransactionOps>(ops: &mut T) {
    if let Err(e) = ops.abort() {
        tracing::warn!(error = %e, "abort_transaction failed");
        if let Err(e) = ops.recreate() {
            tracing::error!(error = %e, "re-creating the transactional producer failed; will retry");
        }
    }
}

/// [`TransactionOps`] on Kafka: the sink's transactional producer and the
/// worker's consumer.
struct KafkaTransaction<'a> {
    sink: &'a mut TransactionalSink,
    consumer: &'a BaseConsumer<WorkerContext>,
    /// Records enqueued in the open transaction.
    expected: usize,
}

impl TransactionOps for KafkaTransaction<'_> {
    fn begin(&mut self) -> Result<(), String> {
        self.sink.sink.reset_counts();
        self.expected = 0;
        self.sink.sink.producer.begin_transaction().map_err(|e| e.to_string())
    }

    fn send(&mut self, outputs: Outputs<'_>, records: &[ChangelogRecord]) -> Result<(), SinkError> {
        self.expected = self.sink.sink.count(outputs) + records.len();
        self.sink.sink.enqueue_all(outputs)?;
        let attempt = self.sink.sink.attempt();
        for record in records {
            let base = BaseRecord::to(&record.topic).key(&record.key[..]).payload(&record.value[..]).partition(record.partition);
            self.sink.sink.enqueue_record(base, attempt)?;
        }
        Ok(())
    }

    fn send_offsets(&mut self, offsets: &TopicPartitionList) -> Result<(), SinkError> {
        let failed = |reason: String| SinkError::Kafka { failed: 0, total: 0, reason, fate: Fate::Retry };
        let group = self.consumer.group_metadata().ok_or_else(|| failed("the consumer has no group metadata yet".into()))?;
        match self.sink.sink.producer.send_offsets_to_transaction(offsets, &group, self.sink.timeout) {
            Ok(()) => Ok(()),
            Err(e) if e.rdkafka_error_code().is_some_and(member_replaced) => {
                tracing::warn!(error = %e, "the group refused this member's offsets: it has been replaced");
                Err(SinkError::Fenced)
            }
            Err(e) => Err(failed(e.to_string())),
        }
    }

    fn commit(&mut self) -> Result<Option<Positions>, CommitError> {
        // rust-rdkafka's commit_transaction first flushes, and its flush, while
        // anything is still in flight, waits in a 100 ms poll of the event
        // queue whose events the producer's own thread takes: at least 100 ms
        // per transaction. So wait for the delivery reports here (woken by each
        // one) and for the producer's queue to empty; the flush then returns at
        // once. A failed delivery is left for commit_transaction to report (it
        // makes the transaction abortable).
        let _ = self.sink.sink.await_acks(self.expected);
        let drained = std::time::Instant::now();
        while self.sink.sink.producer.in_flight_count() > 0 && drained.elapsed() < Duration::from_millis(100) {
            std::thread::sleep(Duration::from_micros(50));
        }
        match self.sink.sink.producer.commit_transaction(self.sink.timeout) {
            Ok(()) => {
                let counts = self.sink.sink.counts();
                Ok((counts.acked == self.expected).then_some(counts.offsets))
            }
            Err(KafkaError::Transaction(e)) if e.txn_requires_abort() => Err(CommitError::Abortable(e.to_string())),
            Err(e) => Err(CommitError::Unknown(e.to_string())),
        }
    }

    fn abort(&mut self) -> Result<(), String> {
        self.sink.sink.producer.abort_transaction(self.sink.timeout).map_err(|e| e.to_string())
    }

    fn recreate(&mut self) -> Result<(), String> {
        self.sink.recreate().map_err(|e| e.to_string())
    }

    fn is_committed(&mut self, offsets: &TopicPartitionList) -> Result<bool, String> {
        offsets_committed(self.consumer, offsets).map_err(|e| e.to_string())
    }

    fn assignment_lost(&self) -> bool {
        self.consumer.assignment_lost()
    }
}

/// Does the group's refusal of an offset commit mean it has replaced this
/// member? Unknown member (removed from the group, e.g. it did not rejoin in
/// time while another member took its partitions) or a fenced static instance:
/// librdkafka may not have marked the assignment lost yet, but no retry can
/// succeed before the member polls and rejoins. Not an illegal generation: that
/// is a member the group still knows, in the middle of a rebalance that
/// librdkafka completes in the background (a cooperative rebalance may leave it
/// every partition), so the commit is retried.
fn member_replaced(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(code, Code::UnknownMemberId | Code::FencedInstanceId)
}

/// Replay's exactly-once sink (`replay --to-topic --transactional-id`): each
/// batch's upserts and dead letters commit in one transaction of its own, so a
/// `read_committed` reader sees a batch whole or not at all; the batch's state
/// (and its resume checkpoint) is written only after the commit. A commit whose
/// outcome is unknown stops the replay with the reason rather than re-send.
pub struct ReplayTransactions {
    sink: KafkaSink,
    timeout: Duration,
}

impl ReplayTransactions {
    pub fn new(config: &Config, transactional_id: &str) -> Result<ReplayTransactions, KafkaError> {
        let (_, sink) = TransactionalSink::open(config, transactional_id)?;
        Ok(ReplayTransactions { sink, timeout: TRANSACTION_TIMEOUT })
    }
}

impl crate::sink::Sink for ReplayTransactions {
    fn send(&mut self, outputs: Outputs<'_>) -> Result<(), SinkError> {
        let total = self.sink.count(outputs);
        if total == 0 {
            return Ok(());
        }
        let failed = |reason: String, fate: Fate| SinkError::Kafka { failed: total, total, reason, fate };
        self.sink.reset_counts();
        self.sink.producer.begin_transaction().map_err(|e| failed(format!("begin_transaction: {e}"), Fate::Stop))?;
        if let Err(e) = self.sink.enqueue_all(outputs) {
            let _ = self.sink.producer.abort_transaction(self.timeout);
            return Err(e);
        }
        match self.sink.producer.commit_transaction(self.timeout) {
            Ok(()) => Ok(()),
            Err(KafkaError::Transaction(e)) if e.txn_requires_abort() => {
                let _ = self.sink.producer.abort_transaction(self.timeout);
                Err(failed(format!("commit_transaction: {e} (aborted: nothing of the batch is visible; run the replay again to resume)"), Fate::Stop))
            }
            Err(e) => Err(failed(
                format!("commit_transaction: {e} (outcome unknown: the batch may or may not be visible; its state was not written, so a re-run re-sends it)"),
                Fate::Stop,
            )),
        }
    }
}

/// Are the group's committed offsets exactly `offsets`? An error is no answer.
fn offsets_committed(consumer: &BaseConsumer<WorkerContext>, offsets: &TopicPartitionList) -> Result<bool, KafkaError> {
    let committed = consumer.committed_offsets(offsets.clone(), Duration::from_secs(10))?;
    Ok(offsets.elements().iter().all(|want| {
        committed.find_partition(want.topic(), want.partition()).is_some_and(|got| got.offset() == want.offset())
    }))
}

#[cfg(test)]
mod tests {
    //! Transactional fault injection with librdkafka's mock cluster (unit level:
    //! the real broker tests in tests/ prove the read_committed guarantees; the
    //! mock cannot, it keeps no transaction markers).
    use super::*;
    use crate::config::RawConfig;
    use crate::worker::client::consumer_config;
    use crate::store::RocksStore;
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::types::RDKafkaRespErr;
    use rdkafka::Offset;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Instant;
    use crate::output::MilestoneUpsert;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::RDKafkaApiKey;

    fn config_for(brokers: &str) -> Config {
        let toml = format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"mock-group\"\ninput_topics = [\"in\"]\noutput_topic = \"out\"\ndead_letter_topic = \"dlq\"\n[kafka.producer_properties]\n\"retry.backoff.ms\" = \"200\"\n\"retry.backoff.max.ms\" = \"200\"\n[state]\nchangelog = false\n"
        );
        RawConfig::from_toml(&toml).unwrap().validate().unwrap()
    }

    fn one_upsert(upsert: &[MilestoneUpsert; 1]) -> Outputs<'_> {
        Outputs { upserts: upsert, ..Outputs::default() }
    }

    fn upsert() -> [MilestoneUpsert; 1] {
        let event = crate::dedupe::tests::event("1Z", crate::event::Status::InTransit, 1_722_438_000_000);
        [MilestoneUpsert::new(event, crate::event::Status::InTransit, crate::event::Status::InTransit)]
    }

    /// A consumer that has joined the group (so it has group metadata).
    fn joined_consumer(config: &Config, store: Arc<RocksStore>) -> BaseConsumer<WorkerContext> {
        let context = WorkerContext {
            health: Arc::default(),
            store,
            partitions: Default::default(),
            stateless_topics: Default::default(),
            delivery: crate::config::DeliveryMode::ExactlyOnce,
            restorer: None,
            in_flight: Default::default(),
            restoring: Default::default(),
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
        sink.commit(&consumer, one_upsert(&upsert()), &mut StateBatch::default(), &offsets, &shutdown, Duration::from_secs(5)).unwrap();
        assert_eq!(sink.recreated, 0);

        // Then EndTxn answers "concurrent transactions" (retriable) 15 times in a
        // row: with retries 200 ms apart that outlasts the 2 s commit timeout, an
        // indefinite outcome. The sink must re-create the producer rather than
        // retry the commit blindly, and the batch must still get in once the
        // coordinator answers again.
        cluster.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS; 15]);
        sink.commit(&consumer, one_upsert(&upsert()), &mut StateBatch::default(), &offsets, &shutdown, Duration::from_secs(5))
            .expect("the batch commits once the coordinator answers again");
        assert!(sink.recreated >= 1, "an indefinite commit error must re-create the producer");

        // An abortable commit error followed by an abort that times out: abort,
        // then re-create, then the batch goes in.
        let recreated_before = sink.recreated;
        let mut errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN];
        errors.extend([RDKafkaRespErr::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS; 15]);
        cluster.request_errors(RDKafkaApiKey::EndTxn, &errors);
        sink.commit(&consumer, one_upsert(&upsert()), &mut StateBatch::default(), &offsets, &shutdown, Duration::from_secs(5))
            .expect("the batch commits after the abort path");
        assert!(sink.recreated > recreated_before, "an abort that times out must re-create the producer");
    }

    /// Scripted [`TransactionOps`]: each call takes the next step of a script,
    /// which names the call it expects and the answer to give; a call the
    /// script does not expect fails the test, so a test's script is the exact
    /// sequence the protocol must follow.
    struct Scripted {
        script: std::collections::VecDeque<(&'static str, Answer)>,
        calls: Vec<&'static str>,
        assignment_lost: bool,
    }

    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Pass,
        Fail,
        Abortable,
        Unknown,
        Committed,
        NotCommitted,
        /// The group refused the member (unknown member, illegal generation).
        Replaced,
    }

    impl Scripted {
        fn new(script: &[(&'static str, Answer)]) -> Scripted {
            Scripted { script: script.iter().copied().collect(), calls: Vec::new(), assignment_lost: false }
        }

        fn next(&mut self, call: &'static str) -> Answer {
            self.calls.push(call);
            match self.script.pop_front() {
                Some((expected, answer)) if expected == call => answer,
                Some((expected, _)) => panic!("the protocol called {call}, the script expected {expected}; calls so far: {:?}", self.calls),
                None => panic!("the protocol called {call} after the end of the script; calls: {:?}", self.calls),
            }
        }

        fn unit(&mut self, call: &'static str) -> Result<(), String> {
            match self.next(call) {
                Answer::Pass => Ok(()),
                other => Err(format!("{call}: scripted {other:?}")),
            }
        }
    }

    impl TransactionOps for Scripted {
        fn begin(&mut self) -> Result<(), String> {
            self.unit("begin")
        }
        fn send(&mut self, _: Outputs<'_>, _: &[ChangelogRecord]) -> Result<(), SinkError> {
            self.unit("send").map_err(|reason| SinkError::Kafka { failed: 1, total: 1, reason, fate: Fate::Retry })
        }
        fn send_offsets(&mut self, _: &TopicPartitionList) -> Result<(), SinkError> {
            match self.next("send_offsets") {
                Answer::Pass => Ok(()),
                Answer::Replaced => Err(SinkError::Fenced),
                other => Err(SinkError::Kafka { failed: 0, total: 0, reason: format!("send_offsets: scripted {other:?}"), fate: Fate::Retry }),
            }
        }
        fn commit(&mut self) -> Result<Option<Positions>, CommitError> {
            match self.next("commit") {
                Answer::Pass => Ok(Some(Positions::new())),
                Answer::Abortable => Err(CommitError::Abortable("scripted".into())),
                _ => Err(CommitError::Unknown("scripted timeout".into())),
            }
        }
        fn abort(&mut self) -> Result<(), String> {
            self.unit("abort")
        }
        fn recreate(&mut self) -> Result<(), String> {
            self.unit("recreate")
        }
        fn is_committed(&mut self, _: &TopicPartitionList) -> Result<bool, String> {
            match self.next("is_committed") {
                Answer::Committed => Ok(true),
                Answer::NotCommitted => Ok(false),
                other => Err(format!("scripted {other:?}")),
            }
        }
        fn assignment_lost(&self) -> bool {
            self.assignment_lost
        }
    }

    /// Run the protocol over `ops` for one batch (no shutdown under way).
    fn run_script(ops: &mut Scripted, settlement: &mut Settlement) -> Result<Option<Positions>, SinkError> {
        let shutdown = AtomicBool::new(false);
        let mut retry = Retry::new(&shutdown, Duration::from_secs(60), Duration::from_millis(1));
        let upserts = upsert();
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset("in", 0, Offset::Offset(1)).unwrap();
        commit_batch(ops, settlement, one_upsert(&upserts), &[], &offsets, &mut retry)
    }

    fn sends(calls: &[&str]) -> usize {
        calls.iter().filter(|c| **c == "send").count()
    }

    /// Review finding: a commit that timed out, a re-creation that timed out
    /// too, then a begin on the old producer... must never lead to a re-send
    /// before the group's offsets said "not committed". Here the re-creation
    /// fails twice and the lookup fails once: the only calls in between are
    /// re-creations and lookups, then the batch goes again, once.
    #[test]
    fn an_unknown_commit_outcome_is_settled_before_the_batch_is_sent_again() {
        use Answer::*;
        let mut ops = Scripted::new(&[
            ("begin", Pass),
            ("send", Pass),
            ("send_offsets", Pass),
            ("commit", Unknown),
            ("recreate", Fail),
            ("recreate", Fail),
            ("recreate", Pass),
            ("is_committed", Fail),
            ("is_committed", NotCommitted),
            ("begin", Pass),
            ("send", Pass),
            ("send_offsets", Pass),
            ("commit", Pass),
        ]);
        let mut settlement = Settlement::default();
        let result = run_script(&mut ops, &mut settlement);
        assert!(matches!(result, Ok(Some(_))), "{result:?}");
        assert!(ops.script.is_empty(), "the protocol stopped early: {:?}", ops.calls);
        assert_eq!(sends(&ops.calls), 2);
        assert!(!settlement.unsettled && !settlement.recreate_pending);
    }

    /// The same, when the lost commit did go in: the batch is never sent again.
    #[test]
    fn a_commit_that_went_in_despite_its_error_is_not_sent_again() {
        use Answer::*;
        let mut ops = Scripted::new(&[
            ("begin", Pass),
            ("send", Pass),
            ("send_offsets", Pass),
            ("commit", Unknown),
            ("recreate", Pass),
            ("is_committed", Fail),
            ("is_committed", Fail),
            ("is_committed", Committed),
        ]);
        let result = run_script(&mut ops, &mut Settlement::default());
        assert!(matches!(result, Ok(None)), "committed, changelog positions unknown: {result:?}");
        assert!(ops.script.is_empty(), "{:?}", ops.calls);
        assert_eq!(sends(&ops.calls), 1, "a committed batch was sent again: {:?}", ops.calls);
    }

    /// An unknown outcome left by a batch that was abandoned (shutdown deadline,
    /// lost partitions) is still settled before the next batch begins.
    #[test]
    fn an_unsettled_outcome_carries_over_to_the_next_batch() {
        use Answer::*;
        let mut settlement = Settlement { unsettled: true, recreate_pending: true };
        let mut ops = Scripted::new(&[("recreate", Pass), ("is_committed", NotCommitted), ("begin", Pass), ("send", Pass), ("send_offsets", Pass), ("commit", Pass)]);
        let result = run_script(&mut ops, &mut settlement);
        assert!(matches!(result, Ok(Some(_))), "{result:?}");
        assert!(ops.script.is_empty(), "{:?}", ops.calls);
    }

    /// An abortable error means nothing committed: abort (re-create when the
    /// abort fails) and send again at once, no lookup needed.
    #[test]
    fn an_abortable_commit_is_aborted_and_sent_again() {
        use Answer::*;
        let mut ops = Scripted::new(&[
            ("begin", Pass),
            ("send", Pass),
            ("send_offsets", Pass),
            ("commit", Abortable),
            ("abort", Fail),
            ("recreate", Pass),
            ("begin", Pass),
            ("send", Pass),
            ("send_offsets", Pass),
            ("commit", Pass),
        ]);
        let result = run_script(&mut ops, &mut Settlement::default());
        assert!(matches!(result, Ok(Some(_))), "{result:?}");
        assert!(ops.script.is_empty(), "{:?}", ops.calls);
    }

    /// Review finding: a member the group replaced gets "unknown member" from
    /// send_offsets on every attempt; retrying without polling never rejoins (a
    /// livelock). The protocol aborts and gives the batch up at once.
    #[test]
    fn a_member_that_lost_its_partitions_abandons_the_batch_instead_of_retrying() {
        use Answer::*;
        let mut ops = Scripted::new(&[("begin", Pass), ("send", Pass), ("abort", Pass)]);
        ops.assignment_lost = true;
        let result = run_script(&mut ops, &mut Settlement::default());
        assert!(matches!(result, Err(SinkError::Fenced)), "{result:?}");
        assert!(ops.script.is_empty(), "{:?}", ops.calls);
    }

    /// The assignment is lost after the offsets went into the
    /// transaction (the member's metadata then has no generation, which the
    /// group coordinator does not check for transactional commits). The
    /// transaction must be aborted, never committed.
    #[test]
    fn a_member_that_lost_its_partitions_never_commits_the_transaction() {
        use Answer::*;
        struct LosesAfterOffsets(Scripted);
        impl TransactionOps for LosesAfterOffsets {
            fn begin(&mut self) -> Result<(), String> {
                self.0.begin()
            }
            fn send(&mut self, o: Outputs<'_>, r: &[ChangelogRecord]) -> Result<(), SinkError> {
                self.0.send(o, r)
            }
            fn send_offsets(&mut self, offsets: &TopicPartitionList) -> Result<(), SinkError> {
                let sent = self.0.send_offsets(offsets);
                self.0.assignment_lost = true;
                sent
            }
            fn commit(&mut self) -> Result<Option<Positions>, CommitError> {
                self.0.commit()
            }
            fn abort(&mut self) -> Result<(), String> {
                self.0.abort()
            }
            fn recreate(&mut self) -> Result<(), String> {
                self.0.recreate()
            }
            fn is_committed(&mut self, offsets: &TopicPartitionList) -> Result<bool, String> {
                self.0.is_committed(offsets)
            }
            fn assignment_lost(&self) -> bool {
                self.0.assignment_lost()
            }
        }
        let mut ops = LosesAfterOffsets(Scripted::new(&[("begin", Pass), ("send", Pass), ("send_offsets", Pass), ("abort", Pass)]));
        let shutdown = AtomicBool::new(false);
        let mut retry = Retry::new(&shutdown, Duration::from_secs(60), Duration::from_millis(1));
        let upserts = upsert();
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset("in", 0, Offset::Offset(1)).unwrap();
        let result = commit_batch(&mut ops, &mut Settlement::default(), one_upsert(&upserts), &[], &offsets, &mut retry);
        assert!(matches!(result, Err(SinkError::Fenced)), "{result:?}");
        assert!(!ops.0.calls.contains(&"commit"), "a member without its partitions committed: {:?}", ops.0.calls);
        assert!(ops.0.script.is_empty(), "{:?}", ops.0.calls);
    }

    /// A member the group replaced while it was not polling (another member
    /// joined and took its partitions) is refused by the group before
    /// librdkafka marks its assignment lost. Retrying could never succeed
    /// without a poll: the protocol aborts and gives the batch up at once.
    #[test]
    fn a_member_the_group_refuses_abandons_the_batch_before_its_assignment_is_marked_lost() {
        use Answer::*;
        let mut ops = Scripted::new(&[("begin", Pass), ("send", Pass), ("send_offsets", Replaced), ("abort", Pass)]);
        assert!(!ops.assignment_lost);
        let result = run_script(&mut ops, &mut Settlement::default());
        assert!(matches!(result, Err(SinkError::Fenced)), "{result:?}");
        assert!(ops.script.is_empty(), "{:?}", ops.calls);
    }

    /// An illegal generation is a rebalance in progress, not a replacement: in
    /// a cooperative rebalance the member may keep every partition, and a batch
    /// abandoned then would be skipped (its records already fetched). Only an
    /// unknown member (or a fenced static instance) ends the retries.
    #[test]
    fn only_an_unknown_member_counts_as_replaced() {
        use rdkafka::types::RDKafkaErrorCode as Code;
        assert!(member_replaced(Code::UnknownMemberId));
        assert!(member_replaced(Code::FencedInstanceId));
        assert!(!member_replaced(Code::IllegalGeneration));
        assert!(!member_replaced(Code::RebalanceInProgress));
        assert!(!member_replaced(Code::CoordinatorNotAvailable));
    }

    /// Past the shutdown deadline the protocol gives up, claiming nothing, and
    /// an unknown outcome stays unsettled for whoever commits next.
    #[test]
    fn a_shutdown_leaves_an_unknown_outcome_unsettled() {
        use Answer::*;
        let mut ops = Scripted::new(&[("begin", Pass), ("send", Pass), ("send_offsets", Pass), ("commit", Unknown)]);
        let shutdown = AtomicBool::new(true);
        let mut retry = Retry::new(&shutdown, Duration::ZERO, Duration::from_millis(1));
        let upserts = upsert();
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset("in", 0, Offset::Offset(1)).unwrap();
        let mut settlement = Settlement::default();
        let result = commit_batch(&mut ops, &mut settlement, one_upsert(&upserts), &[], &offsets, &mut retry);
        assert!(matches!(result, Err(SinkError::Kafka { .. })), "{result:?}");
        assert!(settlement.unsettled && settlement.recreate_pending);
    }

    /// Exactly-once without changelogs: a store that lags the group catches up
    /// silently up to the group's committed offset. If that offset cannot be
    /// read (the coordinator loading, or a pending transactional commit of the
    /// previous owner), guessing "none" would process the records below it live
    /// and emit committed milestones again: the worker must stop instead.
    #[test]
    fn exactly_once_stops_rather_than_guess_when_the_committed_offset_cannot_be_read() {
        let cluster = MockCluster::new(1).unwrap();
        for topic in ["in", "out", "dlq"] {
            cluster.create_topic(topic, 1, 1).unwrap();
        }
        let config = config_for(&cluster.bootstrap_servers());
        let state = tempfile::tempdir().unwrap();
        let store = Arc::new(RocksStore::open(state.path(), &crate::store::StoreOptions::default(), crate::store::system_clock()).unwrap());
        cluster.request_errors(RDKafkaApiKey::OffsetFetch, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 500]);
        let consumer = joined_consumer(&config, store);
        let fatal = crate::worker::partitions::lock(&consumer.context().partitions).take_fatal();
        cluster.clear_request_errors(RDKafkaApiKey::OffsetFetch);
        let Some(error) = fatal else {
            panic!("the partition was assigned without its committed offset: records below it would be emitted again");
        };
        assert!(error.to_string().contains("cannot read the group's committed offset"), "{error}");
    }

    #[test]
    fn a_shutdown_past_its_deadline_gives_up_without_claiming_the_batch() {
        let MockWorker { _state, cluster, consumer, mut sink, offsets } = MockWorker::new("mock-txn-2", Duration::from_secs(1));
        cluster.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS; 2000]);
        let shutdown = AtomicBool::new(true);
        let started = Instant::now();
        let result = sink.commit(&consumer, one_upsert(&upsert()), &mut StateBatch::default(), &offsets, &shutdown, Duration::from_secs(2));
        assert!(result.is_err(), "a commit that never succeeds must not be reported as committed");
        assert!(started.elapsed() < Duration::from_secs(20), "gave up only after {:?}", started.elapsed());
        cluster.clear_request_errors(RDKafkaApiKey::EndTxn);
    }
}

