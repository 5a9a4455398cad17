//! Shared driver of the fuzz targets (one target per carrier parser).

use chrono::{TimeZone, Utc};
use waymark::carriers::CarrierRegistry;
use waymark::state::{MemoryStore, Staged};

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap_or_default()
}

/// Normalize `data` as a body of `carrier`; errors are fine, panics are bugs.
pub fn normalize(carrier: &str, data: &[u8]) {
    let registry = CarrierRegistry::builtin();
    if let Ok(events) = registry.normalize(carrier, data, now()) {
        for event in events {
            // Every accepted event must be serializable as a canonical event.
            assert!(!event.tracking_number.is_empty(), "accepted an event without a tracking number");
        }
    }
}

/// Parse `data` as an archive line and run it through the pipeline.
pub fn envelope_line(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else { return };
    let Ok(envelope) = waymark::Envelope::from_kcat_json(line) else { return };
    let store = MemoryStore::default();
    let mut staged = Staged::new(&store);
    let _ = waymark::Pipeline::default().process(&envelope, now(), &mut staged);
}
