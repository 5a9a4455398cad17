//! Where outputs go. A sink returns from `send` only when every record of the batch
//! is acknowledged (written and flushed, or acked by Kafka): the caller commits
//! state after that, never before.

use std::io::Write;

use thiserror::Error;

use crate::error::Fate;
use crate::output::{DeadLetter, DecisionRecord, MilestoneUpsert};
use crate::routing::RoutedRecord;

/// One batch's records, by destination: the output, dead-letter, repartition
/// and decisions topics (or their files).
#[derive(Debug, Clone, Copy, Default)]
pub struct Outputs<'a> {
    pub upserts: &'a [MilestoneUpsert],
    pub dead_letters: &'a [DeadLetter],
    /// The worker's repartition records (stage one); other sinks get none.
    pub routed: &'a [RoutedRecord],
    /// Non-new decisions, when a decisions topic is configured.
    pub decisions: &'a [DecisionRecord],
}

impl Outputs<'_> {
    pub fn len(&self) -> usize {
        self.upserts.len() + self.dead_letters.len() + self.routed.len() + self.decisions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("writing output failed: {0} (check the output path and free disk space)")]
    Io(#[from] std::io::Error),
    #[error("Kafka did not acknowledge {failed} of {total} records: {reason}")]
    Kafka { failed: usize, total: usize, reason: String, fate: Fate },
    /// The batch's state cannot be logged (a bug, not a transient fault).
    #[error("cannot log the batch's state changes: {0}")]
    State(#[from] crate::error::StoreError),
    /// This member lost its partitions while the batch was in flight: another
    /// member may own them and have logged newer state, which an older value
    /// written now would override, and a transaction's offset commit is refused
    /// for good. The worker abandons the batch (nothing of it is claimed).
    #[error("this member lost its partitions while a batch was in flight; the batch is abandoned")]
    Fenced,
}

impl SinkError {
    pub fn fate(&self) -> Fate {
        match self {
            SinkError::Io(_) | SinkError::State(_) | SinkError::Fenced => Fate::Stop,
            SinkError::Kafka { fate, .. } => *fate,
        }
    }
}

/// Destination of upserts and dead letters.
pub trait Sink {
    /// Deliver a batch; `Ok` means every record is acknowledged.
    fn send(&mut self, outputs: Outputs<'_>) -> Result<(), SinkError>;

    /// Hand the batch's state changes to storage beyond this process (the Kafka
    /// worker's changelog), after `send` succeeded and before the local store
    /// claims them; `Ok` means acknowledged. The sink may add entries to the batch
    /// (how far that storage holds this store's writes). Default: nothing to do.
    fn send_state(&mut self, _state: &mut crate::state::StateBatch) -> Result<(), SinkError> {
        Ok(())
    }
}

/// NDJSON files or streams: upserts to one, dead letters and decisions each to
/// another (or dropped, counted in the summary, when none is given).
pub struct NdjsonSink<W: Write, D: Write> {
    pub upserts: W,
    pub dead_letters: Option<D>,
    pub decisions: Option<D>,
}

impl<W: Write, D: Write> Sink for NdjsonSink<W, D> {
    fn send(&mut self, outputs: Outputs<'_>) -> Result<(), SinkError> {
        let Outputs { upserts, dead_letters, routed, decisions } = outputs;
        if !routed.is_empty() {
            // Replay applies events in their home's scope directly; only the worker hops.
            return Err(SinkError::Io(std::io::Error::other("an NDJSON sink cannot take repartition records (a bug)")));
        }
        write_lines(&mut self.upserts, upserts)?;
        if let Some(out) = self.dead_letters.as_mut() {
            write_lines(out, dead_letters)?;
        }
        if let Some(out) = self.decisions.as_mut() {
            write_lines(out, decisions)?;
        }
        Ok(())
    }
}

/// `records` as NDJSON lines, flushed.
fn write_lines<T: serde::Serialize>(out: &mut impl Write, records: &[T]) -> std::io::Result<()> {
    for record in records {
        // `io::Error::from` hands back the writer's own error (a closed pipe
        // stays a BrokenPipe); only encoding errors become `Other`.
        serde_json::to_writer(&mut *out, record).map_err(std::io::Error::from)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Collects outputs in memory (tests, simulation).
#[derive(Debug, Default)]
pub struct MemorySink {
    pub upserts: Vec<MilestoneUpsert>,
    pub dead_letters: Vec<DeadLetter>,
    pub routed: Vec<RoutedRecord>,
    pub decisions: Vec<DecisionRecord>,
}

impl Sink for MemorySink {
    fn send(&mut self, outputs: Outputs<'_>) -> Result<(), SinkError> {
        self.routed.extend_from_slice(outputs.routed);
        self.upserts.extend_from_slice(outputs.upserts);
        self.dead_letters.extend_from_slice(outputs.dead_letters);
        self.decisions.extend_from_slice(outputs.decisions);
        Ok(())
    }
}
