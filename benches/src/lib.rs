//! Shared pieces of the benchmarks: synthetic canonical events and preloading.

use chrono::{Duration, TimeZone, Utc};
use waymark::event::{Location, SourceRef, Status, TrackingEvent};

/// The n-th synthetic canonical event: distinct for every n, realistic field sizes.
pub fn event(n: u64) -> TrackingEvent {
    let base = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let statuses = [Status::LabelCreated, Status::PickedUp, Status::InTransit, Status::OutForDelivery, Status::Delivered];
    TrackingEvent {
        tenant_id: format!("tenant-{}", n % 16),
        carrier: "ups".into(),
        tracking_number: format!("1Z999AA1{:010}", n / 5),
        shipment_ref: None,
        status: statuses[(n % 5) as usize],
        carrier_status_code: ["MP", "OR", "AR", "OT", "KB"][(n % 5) as usize].into(),
        carrier_status_detail: Some("I".into()),
        description: Some("Arrived at Facility".into()),
        occurred_at: base + Duration::minutes((n % 5) as i64 * 90),
        time_assumed_utc: false,
        location: Location {
            city: Some("LOUISVILLE".into()),
            region: Some("KY".into()),
            postal_code: Some("40209".into()),
            country: Some("US".into()),
        },
        source_event_id: None,
        received_at: base,
        source: SourceRef { topic: "tracking.raw.ups".into(), partition: 0, offset: n as i64 },
    }
}

#[cfg(feature = "store")]
pub use store_helpers::*;

#[cfg(feature = "store")]
mod store_helpers {
    use super::*;
    use chrono::DateTime;
    use waymark::dedupe::{check_and_stage, DedupePolicy};
    use waymark::state::{Scope, StateStore, Staged};
    use waymark::store::RocksStore;

    /// Insert events 0..n through the real insert-if-absent path, in batches of 1000
    /// (as the worker does), printing progress every 10%.
    pub fn preload(store: &RocksStore, scope: Scope, policy: DedupePolicy, now: DateTime<Utc>, n: u64, progress: bool) {
        let mut i = 0;
        while i < n {
            let mut staged = Staged::new(store);
            for _ in 0..1000.min(n - i) {
                check_and_stage(&mut staged, scope, policy, &event(i), now).unwrap();
                i += 1;
            }
            store.write(staged.take_batch()).unwrap();
            if progress && n >= 10 && i % (n / 10).max(1) < 1000 {
                eprintln!("  preloaded {i}/{n}");
            }
        }
    }
}
