//! The points between the side effects of committing a batch, where a process
//! can die, and the crash-test hook that makes it die there.
//!
//! One set of typed points serves every committer: the worker's at-least-once
//! order and exactly-once transaction, and replay. The simulation
//! (tests/it/simulation.rs) crashes at each point through the hook that
//! [`crate::batch::deliver`] takes; the real-broker tests crash a real process
//! with `WAYMARK_FAILPOINT=<point>:<n>`:
//!
//! - `<point>:<n>` aborts the process (like `kill -9`: no destructors, no flush)
//!   the n-th time it reaches `<point>`;
//! - `<point>:<n>:pause=<seconds>` stalls there instead (a member that stops
//!   polling while a batch is in flight);
//! - `batch_offset_commit:<n>:fail` makes every per-batch offset commit from the
//!   n-th on fail, as commits do while the group rebalances ([`fails`]).
//!
//! Unset, a point costs one read of a `OnceLock` per batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// A point in the life of a batch (or of the worker's start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// The worker subscribed; its producers are not created yet.
    BeforeProducers,
    /// Processed, nothing sent yet.
    BeforeOutput,
    /// Outputs acknowledged (exactly-once: the transaction committed); state
    /// not yet written.
    AfterOutput,
    /// At-least-once with changelogs: the member still owned its partitions a
    /// moment ago and is about to log the batch's state changes.
    BeforeChangelog,
    /// The durable copy of the state (the changelog) acknowledged; the local
    /// store not yet written.
    AfterChangelog,
    /// State and progress written; the group's offsets not yet committed
    /// (at-least-once commits them after the batch).
    AfterState,
    /// The at-least-once per-batch offset commit (only `fail` applies).
    BatchOffsetCommit,
}

impl Failpoint {
    /// Every point, in the order a batch reaches them.
    pub const ALL: [Failpoint; 7] = [
        Failpoint::BeforeProducers,
        Failpoint::BeforeOutput,
        Failpoint::AfterOutput,
        Failpoint::BeforeChangelog,
        Failpoint::AfterChangelog,
        Failpoint::AfterState,
        Failpoint::BatchOffsetCommit,
    ];

    /// The name `WAYMARK_FAILPOINT` uses.
    pub fn name(self) -> &'static str {
        match self {
            Failpoint::BeforeProducers => "before_producers",
            Failpoint::BeforeOutput => "before_output",
            Failpoint::AfterOutput => "after_output",
            Failpoint::BeforeChangelog => "before_changelog",
            Failpoint::AfterChangelog => "after_changelog",
            Failpoint::AfterState => "after_state",
            Failpoint::BatchOffsetCommit => "batch_offset_commit",
        }
    }

    fn named(name: &str) -> Option<Failpoint> {
        Failpoint::ALL.into_iter().find(|point| point.name() == name)
    }
}

/// What an armed failpoint does when reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Abort,
    Pause(u64),
    Fail,
}

/// An armed failpoint: the point, from which hit on, and what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Armed {
    point: Failpoint,
    nth: u64,
    action: Action,
}

/// Parse a `WAYMARK_FAILPOINT` value (`None`: nothing armed; an unknown point
/// name arms nothing, so a typo fails the crash test instead of crashing
/// somewhere else).
fn parse(spec: &str) -> Option<Armed> {
    let mut parts = spec.split(':');
    let point = Failpoint::named(parts.next()?)?;
    let nth = parts.next().and_then(|n| n.parse().ok()).unwrap_or(1);
    let action = match parts.next() {
        Some("fail") => Action::Fail,
        Some(other) => match other.strip_prefix("pause=").and_then(|s| s.parse().ok()) {
            Some(seconds) => Action::Pause(seconds),
            None => Action::Abort,
        },
        None => Action::Abort,
    };
    Some(Armed { point, nth, action })
}

fn armed() -> Option<Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    *ARMED.get_or_init(|| std::env::var("WAYMARK_FAILPOINT").ok().as_deref().and_then(parse))
}

/// Count one hit of the armed failpoint; the count after it.
fn hit() -> u64 {
    static HITS: AtomicU64 = AtomicU64::new(0);
    HITS.fetch_add(1, Ordering::SeqCst) + 1
}

/// The process reached `point`: abort or pause there if `WAYMARK_FAILPOINT` says so.
pub fn reached(point: Failpoint) {
    let Some(armed) = armed() else { return };
    if armed.point != point || hit() != armed.nth {
        return;
    }
    let name = point.name();
    match armed.action {
        Action::Pause(seconds) => {
            eprintln!("waymark: failpoint {name} reached, pausing {seconds}s (WAYMARK_FAILPOINT)");
            std::thread::sleep(Duration::from_secs(seconds));
        }
        Action::Abort => {
            eprintln!("waymark: failpoint {name} reached, aborting (WAYMARK_FAILPOINT)");
            std::process::abort();
        }
        Action::Fail => {}
    }
}

/// Does the step at `point` fail this time? True from the n-th time on when
/// `WAYMARK_FAILPOINT=<point>:<n>:fail` is set.
pub fn fails(point: Failpoint) -> bool {
    match armed() {
        Some(Armed { point: armed, nth, action: Action::Fail }) if armed == point => hit() >= nth,
        _ => false,
    }
}

/// The production hook of [`crate::batch::deliver`]: the environment's
/// failpoint, never a simulated crash.
pub fn hook(point: Failpoint) -> bool {
    reached(point);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_a_point_a_hit_and_an_action() {
        assert_eq!(parse("after_output"), Some(Armed { point: Failpoint::AfterOutput, nth: 1, action: Action::Abort }));
        assert_eq!(parse("before_output:3:pause=12"), Some(Armed { point: Failpoint::BeforeOutput, nth: 3, action: Action::Pause(12) }));
        assert_eq!(parse("batch_offset_commit:2:fail"), Some(Armed { point: Failpoint::BatchOffsetCommit, nth: 2, action: Action::Fail }));
        assert_eq!(parse("after_ouptut:1"), None, "a misspelled point arms nothing");
        for point in Failpoint::ALL {
            assert_eq!(Failpoint::named(point.name()), Some(point));
        }
    }
}
