//! What the consumer's rebalance callbacks and the worker loop share: the
//! partitions this instance owns, which wait for their state's restore, and how
//! far each is processed, behind ONE lock
//! ([`SharedPartitions`]). Callbacks run inside the consumer's poll on the worker
//! thread and the delivery thread advances progress after each batch; every
//! holder keeps the lock for one map operation per partition. Pure: no Kafka types.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use super::changelog::ChangelogError;
use crate::envelope::Envelope;

/// (topic, partition).
pub type TopicPartition = (String, i32);

/// The partitions of this instance.
#[derive(Debug, Default)]
pub struct Partitions {
    /// Owned right now: records of a partition revoked while a batch was being
    /// polled are dropped, never emitted (the new owner reads them from the
    /// committed offset).
    owned: HashSet<TopicPartition>,
    /// Next offset to process per owned partition, as last completed (stored
    /// progress on assignment, then each processed batch): records below it are
    /// skipped, and it is what the group is told on commit and revocation.
    next: HashMap<TopicPartition, i64>,
    /// `exactly-once` only: per partition, the group's committed offset when the
    /// store was behind it (killed between commit and state write); records below
    /// it are re-processed silently (state only: their outputs are committed).
    catch_up_to: HashMap<TopicPartition, i64>,
    /// Assigned and paused, their state not restored yet: the loop restores them
    /// between batches (a rebalance callback that restored would hold up the
    /// whole group's rebalance), then seeks and resumes them. In assignment order.
    /// Each with the number of its assignment: a partition revoked and assigned
    /// again between two restore slices starts its restore afresh (its
    /// committed offset and changelog may have moved on meanwhile).
    pending_restore: Vec<(TopicPartition, u64)>,
    /// Assignments of partitions to restore so far (numbers the entries above).
    assignments: u64,
    /// A failure in a rebalance callback or a restore; the loop stops on it.
    fatal: Option<ChangelogError>,
}

/// The one lock around [`Partitions`].
pub type SharedPartitions = Arc<Mutex<Partitions>>;

/// Lock, ignoring poison: a panic elsewhere leaves the maps consistent (every
/// verb below is a single map operation per partition).
pub fn lock(shared: &SharedPartitions) -> MutexGuard<'_, Partitions> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Partitions {
    /// A partition was assigned, starting at `start` (if known) and silently
    /// catching up below `catch_up_to` (if set).
    pub fn assign(&mut self, topic: &str, partition: i32, start: Option<i64>, catch_up_to: Option<i64>) {
        let tp = (topic.to_string(), partition);
        self.owned.insert(tp.clone());
        if let Some(start) = start {
            self.next.insert(tp.clone(), start);
        }
        if let Some(bound) = catch_up_to {
            self.catch_up_to.insert(tp, bound);
        }
    }

    /// A partition was assigned whose state the loop restores before anything of
    /// it is processed (see [`Partitions::next_to_restore`]).
    pub fn assign_pending_restore(&mut self, topic: &str, partition: i32) {
        let tp = (topic.to_string(), partition);
        self.owned.insert(tp.clone());
        if !self.pending_restore.iter().any(|(pending, _)| *pending == tp) {
            self.assignments += 1;
            self.pending_restore.push((tp, self.assignments));
        }
    }

    pub fn is_pending_restore(&self, topic: &str, partition: i32) -> bool {
        self.restore_assignment(topic, partition).is_some()
    }

    /// The number of the assignment a pending partition waits for its restore in.
    pub fn restore_assignment(&self, topic: &str, partition: i32) -> Option<u64> {
        self.pending_restore.iter().find(|((t, p), _)| t == topic && *p == partition).map(|(_, n)| *n)
    }

    pub fn pending_restore_count(&self) -> usize {
        self.pending_restore.len()
    }

    pub fn has_pending_restore(&self) -> bool {
        !self.pending_restore.is_empty()
    }

    /// The next partition to restore (it stays pending until
    /// [`Partitions::restore_done`], so a revocation meanwhile is seen).
    pub fn first_pending_restore(&self) -> Option<(TopicPartition, u64)> {
        self.pending_restore.first().cloned()
    }

    /// Every partition waiting for its restore, in the order to try them.
    pub fn pending_restores(&self) -> Vec<(TopicPartition, u64)> {
        self.pending_restore.clone()
    }

    /// A partition whose restore has to wait goes to the back of the line, so
    /// the ones behind it are restored meanwhile.
    pub fn defer_restore(&mut self, topic: &str, partition: i32) {
        if let Some(at) = self.pending_restore.iter().position(|((t, p), _)| t == topic && *p == partition) {
            let entry = self.pending_restore.remove(at);
            self.pending_restore.push(entry);
        }
    }

    /// A partition's state is restored and the partition started.
    pub fn restore_done(&mut self, topic: &str, partition: i32) {
        self.pending_restore.retain(|((t, p), _)| !(t == topic && *p == partition));
    }

    /// A partition was revoked: forget it; returns its next offset to hand the group.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> Option<i64> {
        let tp = (topic.to_string(), partition);
        self.pending_restore.retain(|(pending, _)| *pending != tp);
        self.owned.remove(&tp);
        self.catch_up_to.remove(&tp);
        self.next.remove(&tp)
    }

    pub fn owned_count(&self) -> usize {
        self.owned.len()
    }

    pub fn owns(&self, topic: &str, partition: i32) -> bool {
        self.owned.contains(&(topic.to_string(), partition))
    }

    /// Next offset to process, if known.
    pub fn next(&self, topic: &str, partition: i32) -> Option<i64> {
        self.next.get(&(topic.to_string(), partition)).copied()
    }

    /// Is any partition catching up silently (see [`Partitions::is_catch_up`])?
    pub fn is_catching_up(&self) -> bool {
        !self.catch_up_to.is_empty()
    }

    /// Was this record's output committed before a crash (state-only catch-up)?
    pub fn is_catch_up(&self, envelope: &Envelope) -> bool {
        self.catch_up_to.get(&(envelope.topic.clone(), envelope.partition)).is_some_and(|bound| envelope.offset < *bound)
    }

    /// These records are done. A partition no longer owned is not tracked
    /// again: its progress must never reach a later offset commit, which would
    /// overwrite the new owner's.
    pub fn advance(&mut self, envelopes: &[Envelope]) {
        for envelope in envelopes {
            let tp = (envelope.topic.clone(), envelope.partition);
            if self.owned.contains(&tp) {
                self.next.insert(tp, envelope.offset + 1);
            }
        }
    }

    /// The partition's log was deleted and re-created under this member (its
    /// end lies below the progress kept for it): its records start again at
    /// `offset`, and the old progress means nothing for them.
    pub fn restart_at(&mut self, topic: &str, partition: i32, offset: i64) {
        let tp = (topic.to_string(), partition);
        self.catch_up_to.remove(&tp);
        if self.owned.contains(&tp) {
            self.next.insert(tp, offset);
        }
    }

    /// Every partition's next offset, to commit to the group.
    pub fn commit_list(&self) -> Vec<(TopicPartition, i64)> {
        self.next.iter().map(|(tp, next)| (tp.clone(), *next)).collect()
    }

    pub fn fail(&mut self, error: ChangelogError) {
        self.fatal.get_or_insert(error);
    }

    pub fn take_fatal(&mut self) -> Option<ChangelogError> {
        self.fatal.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(partition: i32, offset: i64) -> Envelope {
        Envelope { topic: "t".into(), partition, offset, timestamp_ms: None, headers: vec![], key: None, payload: vec![] }
    }

    #[test]
    fn assignment_progress_and_revocation() {
        let mut p = Partitions::default();
        p.assign("t", 0, Some(5), Some(9));
        p.assign("t", 1, None, None);
        assert!(p.owns("t", 0) && p.owns("t", 1) && !p.owns("t", 2));
        assert!(p.is_catch_up(&envelope(0, 8)) && !p.is_catch_up(&envelope(0, 9)) && !p.is_catch_up(&envelope(1, 0)));
        assert!(p.is_catching_up());
        p.advance(&[envelope(1, 3), envelope(1, 4)]);
        assert_eq!(p.next("t", 1), Some(5));
        let mut commits = p.commit_list();
        commits.sort();
        assert_eq!(commits, vec![(("t".to_string(), 0), 5), (("t".to_string(), 1), 5)]);
        assert_eq!(p.revoke("t", 0), Some(5));
        assert!(!p.owns("t", 0) && !p.is_catch_up(&envelope(0, 8)));
        assert!(!p.is_catching_up(), "revoking the only partition catching up ends the catch-up");
        assert_eq!(p.commit_list().len(), 1);
        p.advance(&[envelope(0, 7)]);
        assert_eq!(p.next("t", 0), None, "a revoked partition's progress is never committed again");
        assert_eq!(p.commit_list().len(), 1);
    }

    #[test]
    fn partitions_wait_for_their_restore_in_assignment_order_until_revoked() {
        let mut p = Partitions::default();
        for partition in [3, 1, 2, 1] {
            p.assign_pending_restore("h", partition);
        }
        assert!(p.owns("h", 3) && p.is_pending_restore("h", 1));
        assert_eq!(p.next("h", 3), None, "nothing is committed for a partition before its restore");
        assert!(p.commit_list().is_empty());
        assert_eq!(p.revoke("h", 1), None);
        assert!(!p.is_pending_restore("h", 1));
        let (first, assignment) = p.first_pending_restore().unwrap();
        assert_eq!(first, ("h".to_string(), 3));
        assert!(p.is_pending_restore("h", 3), "a partition stays pending while it is being restored");
        // Revoked and assigned again while it was being restored: a new assignment.
        p.revoke("h", 3);
        p.assign_pending_restore("h", 3);
        assert_ne!(p.restore_assignment("h", 3), Some(assignment), "a restore begun for the earlier assignment must start again");
        assert_eq!(p.first_pending_restore().map(|(tp, _)| tp), Some(("h".to_string(), 2)));
        p.defer_restore("h", 2);
        let order: Vec<i32> = p.pending_restores().into_iter().map(|((_, n), _)| n).collect();
        assert_eq!(order, [3, 2], "a restore that waits lets the others go first");
        p.restore_done("h", 2);
        p.restore_done("h", 3);
        assert_eq!(p.first_pending_restore(), None);
        assert!(!p.has_pending_restore());
    }
}
