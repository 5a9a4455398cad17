//! The bounded reorder window's buffer. The clock is a parameter (`now`), so
//! every rule here is tested without sleeping.

use std::collections::HashMap;
use std::time::Instant;

use crate::config::ReorderWindow;
use crate::envelope::Envelope;

/// Records held by the bounded reorder window. Nothing of them is committed
/// (outputs, state, offsets) until the window closes and they are processed as one
/// unit in status-hierarchy order, so offsets never pass a held record and a crash
/// simply re-reads them. Memory is bounded by `order.reorder_max_records` and
/// `order.reorder_max_bytes` (bodies held).
#[derive(Default)]
pub struct ReorderBuffer {
    held: Vec<Envelope>,
    /// Bytes of the held records' bodies.
    bytes: usize,
    /// When the oldest held record arrived.
    since: Option<Instant>,
    /// Highest held offset per partition: a partition revoked and assigned back
    /// re-delivers records from its committed offset; those are held already.
    highest: HashMap<(String, i32), i64>,
}

impl ReorderBuffer {
    pub fn extend(&mut self, envelopes: Vec<Envelope>, now: Instant) {
        for envelope in envelopes {
            let highest = self.highest.entry((envelope.topic.clone(), envelope.partition)).or_insert(-1);
            if envelope.offset > *highest {
                *highest = envelope.offset;
                self.since.get_or_insert(now);
                self.bytes += envelope.payload.len();
                self.held.push(envelope);
            }
        }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&Envelope) -> bool) {
        let before = self.held.len();
        self.held.retain(|e| keep(e));
        if self.held.len() == before {
            return;
        }
        self.bytes = self.held.iter().map(|e| e.payload.len()).sum();
        // Only after a revocation: forget the dropped partitions' positions.
        self.highest.clear();
        for envelope in &self.held {
            let highest = self.highest.entry((envelope.topic.clone(), envelope.partition)).or_insert(-1);
            *highest = (*highest).max(envelope.offset);
        }
        if self.held.is_empty() {
            self.since = None;
        }
    }

    pub fn due(&self, limits: ReorderWindow, now: Instant) -> bool {
        self.held.len() >= limits.max_records || self.bytes >= limits.max_bytes || self.since.is_some_and(|since| now.saturating_duration_since(since) >= limits.window)
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn take(&mut self) -> Vec<Envelope> {
        self.since = None;
        self.bytes = 0;
        self.highest.clear();
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn envelope(partition: i32, offset: i64) -> Envelope {
        Envelope { topic: "t".into(), partition, offset, timestamp_ms: None, headers: vec![], key: None, payload: vec![] }
    }

    const LIMITS: ReorderWindow = ReorderWindow { window: Duration::from_secs(2), max_records: 3, max_bytes: 1000 };

    #[test]
    fn due_by_age_from_the_oldest_held_record() {
        let t0 = Instant::now();
        let mut buffer = ReorderBuffer::default();
        assert!(!buffer.due(LIMITS, t0), "an empty window is never due");
        buffer.extend(vec![envelope(0, 0)], t0);
        buffer.extend(vec![envelope(0, 1)], t0 + Duration::from_secs(1));
        assert!(!buffer.due(LIMITS, t0 + Duration::from_millis(1999)));
        assert!(buffer.due(LIMITS, t0 + Duration::from_secs(2)));
        assert_eq!(buffer.take().len(), 2);
        assert!(buffer.is_empty() && !buffer.due(LIMITS, t0 + Duration::from_secs(9)));
    }

    #[test]
    fn due_by_bytes() {
        let t0 = Instant::now();
        let mut buffer = ReorderBuffer::default();
        let big = |offset| Envelope { payload: vec![b'x'; 600], ..envelope(0, offset) };
        buffer.extend(vec![big(0)], t0);
        assert!(!buffer.due(LIMITS, t0));
        buffer.extend(vec![big(1)], t0);
        assert!(buffer.due(LIMITS, t0), "1,200 bytes held, 1,000 allowed");
        buffer.take();
        buffer.extend(vec![big(2)], t0);
        assert!(!buffer.due(LIMITS, t0), "take resets the byte count");
    }

    #[test]
    fn due_by_count() {
        let t0 = Instant::now();
        let mut buffer = ReorderBuffer::default();
        buffer.extend(vec![envelope(0, 0), envelope(1, 0)], t0);
        assert!(!buffer.due(LIMITS, t0));
        buffer.extend(vec![envelope(1, 1)], t0);
        assert!(buffer.due(LIMITS, t0));
    }

    #[test]
    fn redelivered_records_are_held_once_and_revoked_ones_dropped() {
        let t0 = Instant::now();
        let mut buffer = ReorderBuffer::default();
        buffer.extend(vec![envelope(0, 5), envelope(0, 6), envelope(1, 2)], t0);
        // A partition revoked and assigned back re-delivers from its committed offset.
        buffer.extend(vec![envelope(0, 5), envelope(0, 6), envelope(0, 7)], t0);
        assert_eq!(buffer.len(), 4);
        buffer.retain(|e| e.partition == 0);
        assert_eq!(buffer.len(), 3);
        buffer.extend(vec![envelope(1, 2)], t0);
        assert_eq!(buffer.len(), 4, "partition 1 came back: its records are held again");
    }
}
