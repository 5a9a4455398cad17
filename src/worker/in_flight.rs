//! The batch being delivered while the worker polls and prepares the next one.
//!
//! A batch's delivery (acknowledgements, the changelog or exactly-once
//! transaction, the state write, the offset commit) runs on its own thread, so
//! the worker thread polls and normalizes the next batch meanwhile. Polling runs
//! the rebalance callbacks; a partition revoked then must not go to its next
//! owner while a batch of it is still being delivered here, or that batch's
//! state could be logged after the new owner's (a later restore would move
//! statuses back) and its offsets committed after the new owner's. So the
//! revocation callback waits for the batch in flight first: the partitions go
//! with every batch read from them either delivered or abandoned, exactly as
//! when nothing overlapped. [`InFlight`] is that wait.

use std::sync::{Condvar, Mutex, MutexGuard};

/// How many batches were handed to the delivery thread and how many of them
/// are done, and a wait for the two to meet. Counts, not a flag: the delivery
/// thread finishes batch N (its guard drops) only after it sent N's result, and
/// by then the worker thread may already have handed it batch N+1. A flag
/// cleared by N's guard would say "idle" while N+1 is being delivered, and a
/// revocation would not wait for it.
#[derive(Debug, Default)]
pub struct InFlight {
    counts: Mutex<Counts>,
    idle: Condvar,
}

#[derive(Debug, Default)]
struct Counts {
    submitted: u64,
    finished: u64,
}

impl InFlight {
    /// A batch was handed to the delivery thread. Paired with the guard of
    /// [`InFlight::delivering`] on that thread.
    pub fn start(&self) {
        self.lock().submitted += 1;
    }

    /// The delivery thread's guard for one batch: when dropped (the batch's
    /// result is sent, or the thread unwinds) that batch is no longer in flight.
    pub fn delivering(&self) -> Delivering<'_> {
        Delivering { in_flight: self }
    }

    /// Block until every batch handed over so far is done.
    pub fn wait_idle(&self) {
        let mut counts = self.lock();
        while counts.finished < counts.submitted {
            counts = self.idle.wait(counts).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn is_busy(&self) -> bool {
        let counts = self.lock();
        counts.finished < counts.submitted
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// See [`InFlight::delivering`].
pub struct Delivering<'a> {
    in_flight: &'a InFlight,
}

impl Drop for Delivering<'_> {
    fn drop(&mut self) {
        let mut counts = self.in_flight.lock();
        // Never past what was handed over (a guard taken without `start`, as
        // some tests do, must not make a later batch look done).
        counts.finished = (counts.finished + 1).min(counts.submitted);
        drop(counts);
        self.in_flight.idle.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn a_revocation_waits_until_the_batch_in_flight_is_delivered() {
        let in_flight = InFlight::default();
        let delivered = AtomicBool::new(false);
        in_flight.start();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _guard = in_flight.delivering();
                std::thread::sleep(Duration::from_millis(200));
                delivered.store(true, Ordering::SeqCst);
            });
            in_flight.wait_idle();
            assert!(delivered.load(Ordering::SeqCst), "the wait returned before the batch was delivered");
        });
        assert!(!in_flight.is_busy());
    }

    #[test]
    fn a_delivery_thread_that_panics_does_not_leave_the_batch_in_flight() {
        let in_flight = InFlight::default();
        in_flight.start();
        let result = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let _guard = in_flight.delivering();
                    panic!("delivery failed unexpectedly");
                })
                .join()
        });
        assert!(result.is_err());
        in_flight.wait_idle();
        assert!(!in_flight.is_busy());
    }

    #[test]
    fn nothing_in_flight_means_no_wait() {
        let in_flight = InFlight::default();
        in_flight.wait_idle();
        assert!(!in_flight.is_busy());
    }

    /// The delivery thread drops batch 1's guard only after sending its result;
    /// the worker thread may hand it batch 2 before that. Batch 2 is then in
    /// flight, and a revocation must wait for it.
    #[test]
    fn the_previous_batchs_guard_does_not_end_the_next_batch() {
        use std::sync::mpsc;
        let in_flight = InFlight::default();
        let (result_tx, result_rx) = mpsc::channel::<()>();
        let (second_tx, second_rx) = mpsc::channel::<()>();
        let (guard_dropped_tx, guard_dropped_rx) = mpsc::channel::<()>();
        in_flight.start();
        std::thread::scope(|scope| {
            let in_flight = &in_flight;
            scope.spawn(move || {
                let first = in_flight.delivering();
                result_tx.send(()).unwrap();
                // The worker thread hands over batch 2 before this guard drops.
                second_rx.recv().unwrap();
                drop(first);
                guard_dropped_tx.send(()).unwrap();
            });
            result_rx.recv().unwrap();
            in_flight.start();
            second_tx.send(()).unwrap();
            guard_dropped_rx.recv().unwrap();
            assert!(in_flight.is_busy(), "batch 2 was handed over and is not delivered: it is in flight");
            let second = in_flight.delivering();
            drop(second);
            assert!(!in_flight.is_busy());
        });
    }
}
