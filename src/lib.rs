//! Waymark: carrier-tracking ingestion. Raw carrier webhooks in, idempotent
//! "ensure milestone" upserts out, deduplicated and in status-hierarchy order.
//!
//! The core (`envelope`, `carriers`, `dedupe`, `order`, `pipeline`, `batch`) is
//! free of I/O: the clock is a parameter and state sits behind
//! [`state::StateStore`]. Kafka (`worker`), files (`replay`, `sink`), RocksDB
//! (`store`) and HTTP (`telemetry`) are adapters at the edges.

// The pure core: no I/O, builds without the `runtime` feature (fuzzing).
pub mod batch;
pub mod carriers;
pub mod clock;
pub mod correction;
pub mod dedupe;
pub mod envelope;
pub mod error;
pub mod event;
pub mod explain;
pub mod failpoint;
pub mod ingest;
pub mod order;
pub mod output;
pub mod parallel;
pub mod pipeline;
pub mod routing;
pub mod sink;
pub mod state;
pub mod synth;
pub mod telemetry;

// The adapters.
#[cfg(feature = "runtime")]
pub mod audit;
#[cfg(feature = "runtime")]
pub mod config;
#[cfg(feature = "runtime")]
pub mod http;
#[cfg(feature = "runtime")]
pub mod produce;
#[cfg(feature = "runtime")]
pub mod replay;
#[cfg(feature = "runtime")]
pub mod store;
#[cfg(feature = "runtime")]
pub mod worker;

pub use envelope::Envelope;
pub use event::{Status, TrackingEvent};
pub use output::{DeadLetter, MilestoneUpsert};
pub use pipeline::Pipeline;
