//! The wall clock the worker decides with, guarded against steps.
//!
//! Expiry is judged by wall time: a dedupe key or a shipment is forgotten when
//! `now` passes its `expires_at`, and RocksDB's compaction filter deletes it for
//! good. An NTP step of +31 days, or a VM resumed with a bad clock, would make
//! every entry look expired (mass re-emission, timelines restarting) and a
//! compaction during the step would delete them; a step backwards would write
//! entries that expire early. So the worker and the compaction filter read one
//! [`GuardedClock`]:
//!
//! - it never goes backwards: after a small step back it stands still until the
//!   wall clock catches up;
//! - when the wall clock moves more than `max_step` away from what the monotonic
//!   clock says has elapsed since the previous reading, that is a step, not time
//!   passing: the guarded clock advances by the elapsed monotonic time instead,
//!   counts the step (`waymark_clock_steps_total`) and logs it, and keeps the
//!   offset for as long as the process runs. A restart takes the wall clock as it
//!   is then (a process that was stopped for weeks must see those weeks pass).
//!
//! Both sources are injected, so the guard is tested with scripted clocks.

use std::sync::Mutex;
use std::time::Duration;

/// Milliseconds since the epoch, as the wall clock says.
pub type WallSource = Box<dyn Fn() -> i64 + Send + Sync>;
/// Time elapsed on a monotonic clock since some fixed instant.
pub type MonotonicSource = Box<dyn Fn() -> Duration + Send + Sync>;

/// Default largest disagreement between the wall clock and the monotonic clock
/// that is still taken as the wall clock being right (NTP slews far less).
pub const DEFAULT_MAX_STEP: Duration = Duration::from_secs(60);

pub struct GuardedClock {
    wall: WallSource,
    monotonic: MonotonicSource,
    max_step_ms: i64,
    state: Mutex<State>,
}

struct State {
    last_wall_ms: i64,
    last_monotonic: Duration,
    /// Sum of the steps not followed: guarded = wall - offset.
    offset_ms: i64,
    /// The last value returned (never decreases).
    now_ms: i64,
}

/// What one reading found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub now_ms: i64,
    /// The wall clock stepped by this many milliseconds since the previous
    /// reading (not followed); 0 when it did not.
    pub step_ms: i64,
}

impl GuardedClock {
    pub fn new(wall: WallSource, monotonic: MonotonicSource, max_step: Duration) -> GuardedClock {
        let (last_wall_ms, last_monotonic) = (wall(), monotonic());
        GuardedClock {
            wall,
            monotonic,
            max_step_ms: i64::try_from(max_step.as_millis()).unwrap_or(i64::MAX),
            state: Mutex::new(State { last_wall_ms, last_monotonic, offset_ms: 0, now_ms: last_wall_ms }),
        }
    }

    /// The system's wall clock, guarded by `std::time::Instant`.
    pub fn system(max_step: Duration) -> GuardedClock {
        let started = std::time::Instant::now();
        GuardedClock::new(Box::new(|| chrono::Utc::now().timestamp_millis()), Box::new(move || started.elapsed()), max_step)
    }

    /// Read the clock, with what the reading found.
    pub fn read(&self) -> Reading {
        let (wall, monotonic) = ((self.wall)(), (self.monotonic)());
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = i64::try_from(monotonic.saturating_sub(state.last_monotonic).as_millis()).unwrap_or(i64::MAX);
        let moved = wall.saturating_sub(state.last_wall_ms);
        let step_ms = moved.saturating_sub(elapsed);
        let step_ms = if step_ms.abs() > self.max_step_ms { step_ms } else { 0 };
        state.offset_ms = state.offset_ms.saturating_add(step_ms);
        state.last_wall_ms = wall;
        state.last_monotonic = monotonic;
        state.now_ms = state.now_ms.max(wall.saturating_sub(state.offset_ms));
        Reading { now_ms: state.now_ms, step_ms }
    }

    /// Milliseconds since the epoch; steps are counted and logged.
    pub fn now_ms(&self) -> i64 {
        let reading = self.read();
        if reading.step_ms != 0 {
            metrics::counter!(crate::telemetry::CLOCK_STEPS).increment(1);
            tracing::warn!(
                step_seconds = reading.step_ms as f64 / 1000.0,
                "the wall clock stepped; expiry keeps following the monotonic clock until the worker restarts (check NTP or the VM's clock)"
            );
        }
        reading.now_ms
    }

    /// [`GuardedClock::now_ms`] as a UTC time.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(self.now_ms()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    /// A clock whose wall and monotonic readings the test sets.
    fn scripted() -> (GuardedClock, Arc<AtomicI64>, Arc<AtomicI64>) {
        let wall = Arc::new(AtomicI64::new(1_000_000_000));
        let mono = Arc::new(AtomicI64::new(0));
        let (w, m) = (wall.clone(), mono.clone());
        let clock = GuardedClock::new(
            Box::new(move || w.load(Ordering::SeqCst)),
            Box::new(move || Duration::from_millis(m.load(Ordering::SeqCst) as u64)),
            DEFAULT_MAX_STEP,
        );
        (clock, wall, mono)
    }

    fn advance(wall: &AtomicI64, mono: &AtomicI64, wall_ms: i64, mono_ms: i64) {
        wall.fetch_add(wall_ms, Ordering::SeqCst);
        mono.fetch_add(mono_ms, Ordering::SeqCst);
    }

    #[test]
    fn follows_the_wall_clock_while_it_agrees_with_elapsed_time() {
        let (clock, wall, mono) = scripted();
        let start = clock.read().now_ms;
        advance(&wall, &mono, 5_000, 5_000);
        assert_eq!(clock.read(), Reading { now_ms: start + 5_000, step_ms: 0 });
        // NTP slewing: a few seconds of disagreement is followed.
        advance(&wall, &mono, 10_000, 7_000);
        assert_eq!(clock.read(), Reading { now_ms: start + 15_000, step_ms: 0 });
    }

    #[test]
    fn a_forward_step_is_not_followed_and_time_keeps_passing() {
        let (clock, wall, mono) = scripted();
        let start = clock.read().now_ms;
        let forty_days = 40 * 86_400_000;
        advance(&wall, &mono, forty_days + 1_000, 1_000);
        assert_eq!(clock.read(), Reading { now_ms: start + 1_000, step_ms: forty_days });
        advance(&wall, &mono, 2_000, 2_000);
        assert_eq!(clock.read(), Reading { now_ms: start + 3_000, step_ms: 0 }, "the offset is kept");
        // The clock is set right again (a step back of 40 days): back in step.
        advance(&wall, &mono, -forty_days + 1_000, 1_000);
        assert_eq!(clock.read(), Reading { now_ms: start + 4_000, step_ms: -forty_days });
        assert_eq!(clock.read().now_ms, wall.load(Ordering::SeqCst));
    }

    #[test]
    fn it_never_goes_backwards() {
        let (clock, wall, mono) = scripted();
        let start = clock.read().now_ms;
        // A small step back (within max_step): stand still until the wall catches up.
        advance(&wall, &mono, -10_000, 1_000);
        assert_eq!(clock.read().now_ms, start);
        advance(&wall, &mono, 4_000, 4_000);
        assert_eq!(clock.read().now_ms, start);
        advance(&wall, &mono, 8_000, 8_000);
        assert_eq!(clock.read().now_ms, start + 2_000);
        // A large step back: not followed either.
        advance(&wall, &mono, -86_400_000, 1_000);
        assert_eq!(clock.read(), Reading { now_ms: start + 3_000, step_ms: -86_401_000 });
    }
}
