//! Metrics: names, and the translation of pipeline outcomes
//! into them. Served over HTTP by [`crate::http`].
//!
//! The core returns outcomes; this module turns them into metrics through the
//! `metrics` facade, so the core never touches a global recorder. Label cardinality is bounded: status,
//! outcome and error kind are closed sets; carrier is the configured carriers plus
//! `unknown` once [`Telemetry::with_carriers`] is given them (a record can name any
//! carrier in its `carrier` header, and each new label value is a series kept
//! forever); the tenant label is added only when `telemetry.tenant_label = true`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::dedupe::Verdict;
use crate::error::RecordError;
use crate::pipeline::RecordResult;

pub const EVENTS: &str = "waymark_events_total";
pub const DEDUPE_HIT_RATIO: &str = "waymark_dedupe_hit_ratio";
pub const MILESTONES: &str = "waymark_milestones_emitted_total";
pub const REGRESSIONS: &str = "waymark_status_regressions_prevented_total";
pub const OUT_OF_ORDER: &str = "waymark_out_of_order_total";
pub const DEAD_LETTERS: &str = "waymark_dead_letter_total";
pub const KEY_COLLISIONS: &str = "waymark_key_collisions_total";
pub const STORE_KEYS: &str = "waymark_store_keys";
pub const STORE_MEMORY: &str = "waymark_store_memory_bytes";
pub const STORE_EXPIRED: &str = "waymark_store_expired_total";
pub const STORE_LOOKUP_SECONDS: &str = "waymark_store_lookup_seconds";
pub const PROCESS_SECONDS: &str = "waymark_process_seconds";
pub const BATCH_STAGE_SECONDS: &str = "waymark_batch_stage_seconds";
pub const CONSUMER_LAG: &str = "waymark_consumer_lag";
pub const RECORDS: &str = "waymark_records_total";
pub const REORDER_HELD: &str = "waymark_reorder_held_records";
pub const LAST_PROGRESS: &str = "waymark_last_progress_timestamp_seconds";
pub const KEYING_CONFLICTS: &str = "waymark_shipment_partition_conflicts_total";
pub const ROUTED: &str = "waymark_repartition_records_total";
pub const INPUT_TOPIC_MISSING: &str = "waymark_input_topic_missing";
pub const TOPIC_RECREATED: &str = "waymark_topic_recreated_total";

/// Turns pipeline outcomes into metrics.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// Add a `tenant` label to the events counter (bounded tenants only).
    pub tenant_label: bool,
    /// Carrier names used as `carrier` label values; any other is `unknown`. Empty:
    /// every resolved name is used as is (unbounded; set them with `with_carriers`).
    known_carriers: BTreeSet<String>,
    /// (events, duplicates) per carrier label, for the hit-ratio gauge.
    totals: Mutex<HashMap<String, (u64, u64)>>,
}

/// Label value for a carrier that is not configured, or not known at all.
pub const UNKNOWN: &str = "unknown";

impl Telemetry {
    pub fn new(tenant_label: bool) -> Self {
        Telemetry { tenant_label, known_carriers: BTreeSet::new(), totals: Mutex::default() }
    }

    /// Bound the `carrier` label to these names (the registry's, e.g.
    /// `pipeline.carriers.names()`); a record resolved to any other carrier is
    /// labelled `unknown`.
    pub fn with_carriers<I>(mut self, carriers: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        // Resolved carrier names are lower-case (envelope and registry both fold case).
        self.known_carriers = carriers.into_iter().map(|c| c.into().to_ascii_lowercase()).collect();
        self
    }

    /// The `carrier` label value of a record resolved to `carrier`.
    pub fn carrier_label(&self, carrier: Option<&str>) -> String {
        match carrier {
            Some(name) if self.known_carriers.is_empty() || self.known_carriers.contains(name) => name.to_string(),
            _ => UNKNOWN.to_string(),
        }
    }

    /// Record one processed record.
    pub fn record(&self, result: &RecordResult, elapsed: Duration) {
        histogram!(PROCESS_SECONDS).record(elapsed.as_secs_f64());
        let carrier = self.carrier_label(result.carrier.as_deref());
        if let Some(dead) = &result.dead_letter {
            counter!(RECORDS, "carrier" => carrier.clone(), "outcome" => "dead_letter").increment(1);
            counter!(DEAD_LETTERS, "carrier" => carrier.clone(), "reason" => reason_label(&dead.error_kind)).increment(1);
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

/// The `reason` label of a dead letter: its error kind. `DeadLetter::new` only
/// writes `RecordError::kind()` values, a closed set; anything else (a dead letter
/// built by hand) is `unknown` rather than a new series.
fn reason_label(error_kind: &str) -> &'static str {
    RecordError::KINDS.iter().copied().find(|kind| *kind == error_kind).unwrap_or(UNKNOWN)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

    use super::*;
    use crate::error::RecordError;
    use crate::event::Status;
    use crate::order::Applied;
    use crate::pipeline::EventOutcome;

    #[test]
    fn carrier_labels_are_the_configured_carriers_or_unknown() {
        let open = Telemetry::new(false);
        assert_eq!(open.carrier_label(Some("nordpost")), "nordpost", "no carriers set: today's behaviour");
        assert_eq!(open.carrier_label(None), "unknown");
        let closed = Telemetry::new(false).with_carriers(["ups", "usps", "nordpost"].map(String::from));
        assert_eq!(closed.carrier_label(Some("ups")), "ups");
        assert_eq!(closed.carrier_label(Some("nordpost")), "nordpost");
        assert_eq!(closed.carrier_label(Some("upz")), "unknown");
        assert_eq!(closed.carrier_label(Some("")), "unknown");
        assert_eq!(closed.carrier_label(None), "unknown");
        let labels: BTreeSet<String> = (0..1_000).map(|i| closed.carrier_label(Some(&format!("carrier-{i}")))).collect();
        assert_eq!(labels, BTreeSet::from(["unknown".to_string()]));
    }

    #[test]
    fn reason_labels_are_error_kinds_or_unknown() {
        for kind in RecordError::KINDS {
            assert_eq!(reason_label(kind), kind);
        }
        assert_eq!(reason_label("made_up"), "unknown");
    }

    /// Every label value `record` uses, per label name (no exporter needed).
    #[derive(Default)]
    struct Labels(Mutex<BTreeSet<(String, String)>>);

    impl Labels {
        fn note(&self, key: &Key) {
            let mut seen = self.0.lock().unwrap();
            for label in key.labels() {
                seen.insert((label.key().to_string(), label.value().to_string()));
            }
        }

        fn values(&self, name: &str) -> BTreeSet<String> {
            self.0.lock().unwrap().iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
        }
    }

    impl Recorder for Labels {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            self.note(key);
            Counter::noop()
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            self.note(key);
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            self.note(key);
            Histogram::noop()
        }
    }

    /// Reliability review, finding 10: unknown `carrier` header values must not
    /// each become a label value (three series each, kept forever).
    #[test]
    fn records_of_unknown_carriers_add_no_label_values() {
        let telemetry = Telemetry::new(false).with_carriers(["ups", "usps"].map(String::from));
        let labels = Labels::default();
        let envelope = crate::Envelope {
            topic: "in".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            headers: vec![],
            key: None,
            payload: b"{}".to_vec(),
        };
        metrics::with_local_recorder(&labels, || {
            for i in 0..1_000 {
                let carrier = format!("header-value-{i}");
                let error = RecordError::UnknownCarrier(carrier.clone());
                let dead = crate::output::DeadLetter::new(&envelope, &error, Some(carrier.clone()), None, chrono::Utc::now());
                let rejected = RecordResult { carrier: Some(carrier), dead_letter: Some(dead), ..RecordResult::default() };
                telemetry.record(&rejected, Duration::from_micros(5));
            }
            let ok = RecordResult {
                carrier: Some("ups".into()),
                events: vec![EventOutcome { verdict: Verdict::New, status: Status::InTransit, occurred_at: chrono::DateTime::UNIX_EPOCH, applied: Applied::default() }],
                ..RecordResult::default()
            };
            telemetry.record(&ok, Duration::from_micros(5));
        });
        assert_eq!(labels.values("carrier"), BTreeSet::from(["unknown".to_string(), "ups".to_string()]));
        assert_eq!(labels.values("reason"), BTreeSet::from(["unknown_carrier".to_string()]));
    }
}
