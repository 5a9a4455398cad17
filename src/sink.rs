//! Where outputs go. A sink returns from `send` only when every record of the batch
//! is acknowledged (written and flushed, or acked by Kafka): the caller commits
//! state after that, never before.

use std::io::Write;

use thiserror::Error;

use crate::error::Fate;
use crate::output::{DeadLetter, MilestoneUpsert};
use crate::routing::RoutedRecord;

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
    /// Deliver a batch; `Ok` means every record is acknowledged. `routed` are
    /// the worker's repartition records (stage one); other sinks get none.
    fn send(&mut self, upserts: &[MilestoneUpsert], dead_letters: &[DeadLetter], routed: &[RoutedRecord]) -> Result<(), SinkError>;

    /// Hand the batch's state changes to storage beyond this process (the Kafka
    /// worker's changelog), after `send` succeeded and before the local store
    /// claims them; `Ok` means acknowledged. The sink may add entries to the batch
    /// (how far that storage holds this store's writes). Default: nothing to do.
    fn send_state(&mut self, _state: &mut crate::state::StateBatch) -> Result<(), SinkError> {
        Ok(())
    }
}

/// NDJSON files or streams: upserts to one, dead letters to another (or dropped
/// with a count when none is given).
pub struct NdjsonSink<W: Write, D: Write> {
    pub upserts: W,
    pub dead_letters: Option<D>,
}

impl<W: Write, D: Write> Sink for NdjsonSink<W, D> {
    fn send(&mut self, upserts: &[MilestoneUpsert], dead_letters: &[DeadLetter], routed: &[RoutedRecord]) -> Result<(), SinkError> {
        if !routed.is_empty() {
            // Replay applies events in their home's scope directly; only the worker hops.
            return Err(SinkError::Io(std::io::Error::other("an NDJSON sink cannot take repartition records (a bug)")));
        }
        for upsert in upserts {
            // `io::Error::from` hands back the writer's own error (a closed
            // pipe stays a BrokenPipe); only encoding errors become `Other`.
            serde_json::to_writer(&mut self.upserts, upsert).map_err(std::io::Error::from)?;
            self.upserts.write_all(b"\n")?;
        }
        self.upserts.flush()?;
        if let Some(out) = self.dead_letters.as_mut() {
            for dead in dead_letters {
                serde_json::to_writer(&mut *out, dead).map_err(std::io::Error::from)?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
        Ok(())
    }
}

/// Collects outputs in memory (tests, simulation).
#[derive(Debug, Default)]
pub struct MemorySink {
    pub upserts: Vec<MilestoneUpsert>,
    pub dead_letters: Vec<DeadLetter>,
    pub routed: Vec<RoutedRecord>,
}

impl Sink for MemorySink {
    fn send(&mut self, upserts: &[MilestoneUpsert], dead_letters: &[DeadLetter], routed: &[RoutedRecord]) -> Result<(), SinkError> {
        self.routed.extend_from_slice(routed);
        self.upserts.extend_from_slice(upserts);
        self.dead_letters.extend_from_slice(dead_letters);
        Ok(())
    }
}
