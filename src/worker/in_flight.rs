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

/// Whether a batch is being delivered, and a wait for the end of it.
#[derive(Debug, Default)]
pub struct InFlight {
    busy: Mutex<bool>,
    idle: Condvar,
}

impl InFlight {
    /// A batch was handed to the delivery thread. Paired with the guard of
    /// [`InFlight::delivering`] on that thread.
    pub fn start(&self) {
        *self.lock() = true;
    }

    /// The delivery thread's guard for one batch: when dropped (the batch's
    /// result is sent, or the thread unwinds) the batch is no longer in flight.
    pub fn delivering(&self) -> Delivering<'_> {
        Delivering { in_flight: self }
    }

    /// Block until no batch is in flight.
    pub fn wait_idle(&self) {
        let mut busy = self.lock();
        while *busy {
            busy = self.idle.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn is_busy(&self) -> bool {
        *self.lock()
    }

    fn lock(&self) -> MutexGuard<'_, bool> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// See [`InFlight::delivering`].
pub struct Delivering<'a> {
    in_flight: &'a InFlight,
}

impl Drop for Delivering<'_> {
    fn drop(&mut self) {
        *self.in_flight.lock() = false;
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
}
