//! Metrics (DESIGN section 8): names, and the translation of pipeline outcomes
//! into them. Served over HTTP by [`crate::http`].
//!
//! The core returns outcomes; this module turns them into metrics through the
//! `metrics` facade, so the core never touches a global recorder. Label cardinality is bounded: carrier, status,
//! outcome and error kind are closed sets; the tenant label is added only when
//! `telemetry.tenant_label = true`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::dedupe::Verdict;
use crate::pipeline::RecordResult;

pub const EVENTS: &str = "waymark_events_total";
pub const DEDUPE_HIT_RATIO: &str = "waymark_dedupe_hit_ratio";
pub const MILESTONES: &str = "waymark_milestones_emitted_total";
pub const REGRESSIONS: &str = "waymark_status_regressions_prevented_total";
pub const OUT_OF_ORDER: &str = "waymark_out_of_order_total";
pub const DEAD_LETTERS: &str = "waymark_dead_letter_total";
pub const KEY_COLLISIONS: &str = "waymark_key_collisions_total";
pub const STORE_KEYS: &str = "waymark_store_keys";
pub const STORE_EXPIRED: &str = "waymark_store_expired_total";
pub const STORE_LOOKUP_SECONDS: &str = "waymark_store_lookup_seconds";
pub const PROCESS_SECONDS: &str = "waymark_process_seconds";
pub const CONSUMER_LAG: &str = "waymark_consumer_lag";
pub const RECORDS: &str = "waymark_records_total";
pub const REORDER_HELD: &str = "waymark_reorder_held_records";
pub const LAST_PROGRESS: &str = "waymark_last_progress_timestamp_seconds";
pub const KEYING_CONFLICTS: &str = "waymark_shipment_partition_conflicts_total";
pub const ROUTED: &str = "waymark_repartition_records_total";

/// Turns pipeline outcomes into metrics.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// Add a `tenant` label to the events counter (bounded tenants only).
    pub tenant_label: bool,
    /// (events, duplicates) per carrier, for the hit-ratio gauge.
    totals: Mutex<HashMap<String, (u64, u64)>>,
}

impl Telemetry {
    pub fn new(tenant_label: bool) -> Self {
        Telemetry { tenant_label, totals: Mutex::default() }
    }

    /// Record one processed record.
    pub fn record(&self, result: &RecordResult, elapsed: Duration) {
        histogram!(PROCESS_SECONDS).record(elapsed.as_secs_f64());
        let carrier = result.carrier.clone().unwrap_or_else(|| "unknown".into());
        if let Some(dead) = &result.dead_letter {
            counter!(RECORDS, "carrier" => carrier.clone(), "outcome" => "dead_letter").increment(1);
            counter!(DEAD_LETTERS, "carrier" => carrier.clone(), "reason" => dead.error_kind.clone()).increment(1);
            self.events(&carrier, result.tenant_id.as_deref(), "invalid", 1);
            return;
        }
        if !result.from_repartition {
            // A raw record counts once, when it is read: not again at its events' home.
            counter!(RECORDS, "carrier" => carrier.clone(), "outcome" => "processed").increment(1);
        }
        if !result.routed.is_empty() {
            counter!(ROUTED, "carrier" => carrier.clone()).increment(result.routed.len() as u64);
        }
        if result.keying_conflicts > 0 {
            counter!(KEYING_CONFLICTS, "carrier" => carrier.clone()).increment(u64::from(result.keying_conflicts));
            self.warn_keying(&carrier);
        }
        let mut duplicates = 0u64;
        for event in &result.events {
            self.events(&carrier, result.tenant_id.as_deref(), event.verdict.label(), 1);
            match event.verdict {
                Verdict::New => {
                    counter!(MILESTONES, "carrier" => carrier.clone(), "status" => event.status.as_str()).increment(1);
                    if event.applied.regression_prevented {
                        counter!(REGRESSIONS, "carrier" => carrier.clone()).increment(1);
                    }
                    if event.applied.out_of_order {
                        counter!(OUT_OF_ORDER, "carrier" => carrier.clone()).increment(1);
                    }
                }
                Verdict::DuplicateHash => duplicates += 1,
                Verdict::DuplicateKey { collision } => {
                    duplicates += 1;
                    if collision {
                        counter!(KEY_COLLISIONS, "carrier" => carrier.clone()).increment(1);
                    }
                }
            }
        }
        if !result.events.is_empty() {
            let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
            let entry = totals.entry(carrier.clone()).or_default();
            entry.0 += result.events.len() as u64;
            entry.1 += duplicates;
            gauge!(DEDUPE_HIT_RATIO, "carrier" => carrier).set(entry.1 as f64 / entry.0 as f64);
        }
    }

    /// One warning per 10,000 conflicts: the counter carries the rate.
    fn warn_keying(&self, carrier: &str) {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEEN: AtomicU64 = AtomicU64::new(0);
        if SEEN.fetch_add(1, Ordering::Relaxed) % 10_000 == 0 {
            tracing::warn!(
                %carrier,
                "a shipment arrived on two input partitions while routing.mode = \"input\": the input is not keyed by shipment, so milestones can repeat and statuses move back; set routing.mode = \"home\" (see {KEYING_CONFLICTS})"
            );
        }
    }

    fn events(&self, carrier: &str, tenant: Option<&str>, outcome: &'static str, n: u64) {
        match (self.tenant_label, tenant) {
            (true, Some(tenant)) => counter!(EVENTS, "carrier" => carrier.to_string(), "tenant" => tenant.to_string(), "outcome" => outcome).increment(n),
            _ => counter!(EVENTS, "carrier" => carrier.to_string(), "outcome" => outcome).increment(n),
        }
    }
}
