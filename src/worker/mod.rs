//! `waymark run`: the Kafka worker.
//!
//! **Two stages, one loop.** With `routing.mode = "home"` (the default) the
//! worker reads raw carrier topics and its own repartition topic through one
//! consumer. A raw record is normalized and each of its shipments' events is
//! produced to that shipment's home partition of the repartition topic
//! (see [`crate::routing`]); a repartition record is deduped, ordered and emitted
//! in the state of its partition. Dead letters come from the first stage. So
//! every shipment is deduped in one place whatever the producer's keying, and a
//! rebalance moves whole homes with their state. With `routing.mode = "input"`
//! there is one stage and the input partition is the home.
//!
//! Delivery semantics (mode `at-least-once`): every acknowledged input record ends
//! up as its milestones on the output topic; a crash can only re-emit *identical*
//! upserts of the batch that was in flight (a repeated first stage re-produces
//! identical canonical events, which the second stage drops as duplicates).
//!
//! How: the worker thread owns a `BaseConsumer` (rebalance callbacks run inside
//! its poll) and a delivery thread delivers one batch at a time:
//! 1. poll up to `worker.batch_size` records (or `worker.batch_wait`) and
//!    normalize them (on `worker.normalize_threads`), while the previous batch
//!    is still being delivered;
//! 2. once that batch is delivered, dedupe and order these records against the
//!    state it wrote, staging state changes in memory; hand them to the
//!    delivery thread, which runs 3 to 6 while the worker thread goes back to 1;
//! 3. produce repartition records, upserts and dead letters with an idempotent
//!    producer and wait until Kafka acknowledges every one (retrying the batch on
//!    delivery failure);
//! 4. commit the state changes to the changelog (if on) in a transaction with
//!    the batch's input offsets, whose group metadata makes the group refuse a
//!    member it has replaced (the batch is then abandoned, nothing logged);
//! 5. write dedupe keys, shipment states and the stateful partitions' next
//!    offsets to RocksDB in one atomic batch (WAL on);
//! 6. commit the offsets of every partition read to the consumer group.
//!
//! On assignment a stateful partition is restored from its changelog and starts
//! at the later of the group's offset and its stored progress; a raw partition
//! starts at the group's committed offset. A kill between 3 and 5 re-runs the
//! batch against the state it had, giving the identical upserts. On revocation
//! the callback first waits for the batch in flight (see [`in_flight`]), and
//! offsets are committed synchronously before the partitions go. An abandoned
//! batch takes the records polled after it with it: every partition of them
//! still assigned is sought back to the first record not delivered.
//!
//! Mode `exactly-once` (Kafka transactions): each batch's repartition records,
//! upserts, dead letters, changelog records and the offsets of both topics are
//! committed in one transaction, so a `read_committed` reader of the output sees
//! every milestone exactly once. State is written to RocksDB only after the
//! transaction commits. A kill between the commit and the state write leaves the
//! store behind the group's committed offset; on assignment the changelog (or,
//! with changelogs off, a silent re-processing up to the committed offset: state
//! only, outputs dropped) brings it up to date. A commit that fails indefinitely
//! (timeout) is never retried blindly: the producer is re-created with the same
//! transactional.id (which fences the old one and settles the pending
//! transaction), and the group's committed offsets tell whether the batch made
//! it; only if not is it sent again.
//!
//! Files: [`run`] the loop and the delivery thread, [`in_flight`] the batch a
//! revocation waits for, [`consumer`] the rebalance callbacks and polling,
//! [`partitions`] what they share (one lock), [`producer`] acknowledgements and
//! retries, [`transaction`] the exactly-once commit, [`reorder`] the bounded
//! reorder window, [`changelog`] state hand-over, [`topics`] the internal topics,
//! [`client`] librdkafka properties.

pub mod changelog;
pub mod client;
pub mod consumer;
pub mod delivery;
pub mod in_flight;
pub mod partitions;
pub mod producer;
pub mod reorder;
pub mod run;
pub mod topics;
pub mod transaction;

use rdkafka::error::KafkaError;
use thiserror::Error;

use crate::error::StoreError;
use crate::sink::SinkError;

pub use changelog::ChangelogError;
pub use client::{base_config, consumer_config, producer_config};
pub use run::{run_worker, WorkerDeps};
pub use topics::RepartitionError;

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
    #[error(transparent)]
    Repartition(#[from] RepartitionError),
    /// The client configuration is wrong (a librdkafka property): fix it and restart.
    #[error("{0}")]
    Config(String),
    /// The thread that delivers batches stopped unexpectedly (a bug: its panic is in the log).
    #[error("the delivery thread stopped unexpectedly (see the panic above in the log; restart the worker: it resumes from the group's committed offsets)")]
    DeliveryThread,
    /// An abandoned batch's partition could not be sought back to the batch.
    #[error("cannot re-read the abandoned batch of {topic} [{partition}]: {reason} (restart the worker: it resumes from the group's committed offsets)")]
    Rewind { topic: String, partition: i32, reason: String },
}

impl WorkerError {
    /// Exit code: 2 when the configuration must change, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            WorkerError::Repartition(RepartitionError::PartitionsChanged { .. }) | WorkerError::Config(_) => 2,
            // Topics, ACLs or limits that are wrong: configuration, not a fault.
            WorkerError::Sink(e) if e.fate() == crate::error::Fate::Stop && matches!(e, SinkError::Kafka { .. }) => 2,
            _ => 1,
        }
    }
}
