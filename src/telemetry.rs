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
pub const RECORDS: &str = "waymark_records_total";
pub const STORE_KEYS: &str = "waymark_store_keys";
pub const STORE_EXPIRED: &str = "waymark_store_expired_total";
pub const PROCESS_SECONDS: &str = "waymark_process_seconds";
pub const STORE_MEMORY: &str = "waymark_store_memory_bytes";
pub const BATCH_STAGE_SECONDS: &str = "waymark_batch_stage_seconds";
pub const STORE_LOOKUP_SECONDS: &str = "waymark_store_lookup_seconds";
pub const CONSUMER_LAG: &str = "waymark_consumer_lag";
pub const INPUT_TOPIC_MISSING: &str = "waymark_input_topic_missing";
pub const TOPIC_RECREATED: &str = "waymark_topic_recreated_total";
pub const RESTORE_WAITS: &str = "waymark_restore_waits_total";
pub const REORDER_HELD: &str = "waymark_reorder_held_records";
pub const OUTPUT_RETRIES: &str = "waymark_output_retries_total";
pub const RECORDS_SKIPPED: &str = "waymark_records_skipped_total";
pub const ROUTED: &str = "waymark_repartition_records_total";
pub const KEYING_CONFLICTS: &str = "waymark_shipment_partition_conflicts_total";
pub const LAST_PROGRESS: &str = "waymark_last_progress_timestamp_seconds";
pub const CHANGELOG_RESTORED: &str = "waymark_changelog_restored_total";
pub const CHANGELOG_RESTORE_SECONDS: &str = "waymark_changelog_restore_seconds";
pub const BATCHES_ABANDONED: &str = "waymark_batches_abandoned_total";
pub const CLOCK_STEPS: &str = "waymark_clock_steps_total";
pub const CHANGELOG_DROPS_APPLIED: &str = "waymark_changelog_drops_applied_total";
pub const CHANGELOG_SKIPPED: &str = "waymark_changelog_skipped_total";
pub const PRODUCER_RECREATED: &str = "waymark_producer_recreated_total";
pub const TRANSACTION_RETRIES: &str = "waymark_transaction_retries_total";
pub const RECORDS_CAUGHT_UP: &str = "waymark_records_caught_up_total";
pub const GENERATIONS: &str = "waymark_shipment_generations_total";
pub const SUSPECTED_FALSE_DELIVERIES: &str = "waymark_suspected_false_deliveries_total";
pub const RETRACTIONS: &str = "waymark_retractions_total";
pub const INGEST_REQUESTS: &str = "waymark_ingest_requests_total";
pub const INGEST_AUTH_FAILURES: &str = "waymark_ingest_auth_failures_total";
pub const INGEST_ACK_SECONDS: &str = "waymark_ingest_ack_seconds";
pub const INGEST_BYTES: &str = "waymark_ingest_bytes_total";
pub const INGEST_IN_FLIGHT: &str = "waymark_ingest_in_flight_requests";
pub const INGEST_BROKER_UP: &str = "waymark_ingest_broker_up";

/// What a metric is, for Prometheus's `# TYPE`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    /// With the buckets, in seconds (exported as a Prometheus histogram, so
    /// `histogram_quantile` works and pods can be aggregated).
    Histogram(&'static [f64]),
}

/// One metric as the worker exports it: the single source of its name, type,
/// labels and help text. The HTTP endpoint describes every metric from this
/// table, the README's Metrics table and the deployment's dashboard and alerts
/// are tested against it, and the metrics without labels are exported from the
/// start (at zero), so a dashboard of a healthy new instance shows no gaps.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn counter_of(name: &'static str, labels: &'static [&'static str], help: &'static str) -> Metric {
    Metric { name, kind: Kind::Counter, labels, help }
}
const fn gauge_of(name: &'static str, labels: &'static [&'static str], help: &'static str) -> Metric {
    Metric { name, kind: Kind::Gauge, labels, help }
}
const fn histogram_of(name: &'static str, buckets: &'static [f64], labels: &'static [&'static str], help: &'static str) -> Metric {
    Metric { name, kind: Kind::Histogram(buckets), labels, help }
}

/// Every metric the worker exports, in the README's order.
pub const CATALOG: &[Metric] = &[
    counter_of(EVENTS, &["carrier", "outcome"], "Canonical events by carrier and dedupe outcome (new, duplicate_key, duplicate_hash, revision, invalid); with telemetry.tenant_label also by tenant"),
    gauge_of(DEDUPE_HIT_RATIO, &["carrier"], "Share of canonical events found to be duplicates, per carrier, since start"),
    counter_of(MILESTONES, &["carrier", "status"], "Ensure-milestone upserts emitted"),
    counter_of(REGRESSIONS, &["carrier"], "Events that would have moved a shipment status backwards"),
    counter_of(OUT_OF_ORDER, &["carrier"], "New events older than the latest seen for their shipment"),
    counter_of(DEAD_LETTERS, &["carrier", "reason"], "Records sent to the dead-letter output, by reason"),
    counter_of(KEY_COLLISIONS, &["carrier"], "Same composite key, different content hash"),
    counter_of(RECORDS, &["carrier", "outcome"], "Raw records processed or dead-lettered"),
    gauge_of(STORE_KEYS, &["keyspace"], "Estimated live keys per state keyspace"),
    counter_of(STORE_EXPIRED, &["keyspace"], "State entries dropped by compaction after their TTL"),
    histogram_of(PROCESS_SECONDS, &[0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0], &[], "Pipeline time per record (normalize, dedupe, order)"),
    gauge_of(STORE_MEMORY, &["kind"], "Memory the state store holds, by kind (memtables, block_cache, table_readers)"),
    histogram_of(
        BATCH_STAGE_SECONDS,
        &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0],
        &["stage"],
        "Time of each stage of a batch: poll (waiting for and reading records), process, wait (for the batch in flight), output (until acknowledged or committed), changelog, state",
    ),
    histogram_of(
        STORE_LOOKUP_SECONDS,
        &[0.000_002, 0.000_005, 0.000_01, 0.000_02, 0.000_05, 0.000_1, 0.000_2, 0.000_5, 0.001, 0.01],
        &["op", "keyspace"],
        "State store lookup latency, by operation and keyspace",
    ),
    gauge_of(CONSUMER_LAG, &["topic", "partition"], "Records not read yet, per assigned partition: its end for a read_committed reader (last stable offset) minus the consumer's own position"),
    gauge_of(INPUT_TOPIC_MISSING, &["topic"], "1 while an input topic is missing or not readable by this worker (nothing of it is consumed), else 0"),
    counter_of(TOPIC_RECREATED, &["topic"], "Topics found deleted and re-created under the worker (their records are read from the new start, none skipped)"),
    counter_of(RESTORE_WAITS, &[], "Restores that waited for the group's committed offset (an open transaction of a departed member) or for the partition to start; never fatal before worker.restore_timeout without progress"),
    gauge_of(REORDER_HELD, &[], "Records held by the bounded reorder window, not yet processed or committed"),
    counter_of(OUTPUT_RETRIES, &[], "Output batches sent again after a retriable produce error"),
    counter_of(RECORDS_SKIPPED, &[], "Records below their partition's progress, skipped as already processed (stale fetches)"),
    counter_of(ROUTED, &["carrier"], "Records the first stage produced to the repartition topic (one per shipment per raw record)"),
    counter_of(KEYING_CONFLICTS, &["carrier"], "routing.mode = input only: events of shipments last seen on another input partition"),
    gauge_of(LAST_PROGRESS, &[], "Unix time of the last completed batch (outputs acknowledged, state written), or of the start"),
    counter_of(CHANGELOG_RESTORED, &[], "State entries replayed from the changelog topics into the local store on partition assignment"),
    histogram_of(
        CHANGELOG_RESTORE_SECONDS,
        &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0],
        &[],
        "Time to restore one partition's state from its changelog",
    ),
    counter_of(BATCHES_ABANDONED, &[], "Batches abandoned because this member lost its partitions while they were in flight (re-run by the partitions' next owner)"),
    counter_of(CLOCK_STEPS, &[], "Wall-clock steps of more than 60 s the guarded clock did not follow (check NTP)"),
    counter_of(CHANGELOG_DROPS_APPLIED, &[], "Drop markers (waymark state drop) met while restoring: the partition's earlier state was forgotten"),
    counter_of(CHANGELOG_SKIPPED, &[], "Changelog records that are no state entry of this Waymark, skipped on restore"),
    counter_of(PRODUCER_RECREATED, &[], "Transactional producers re-created after an indefinite transaction outcome"),
    counter_of(TRANSACTION_RETRIES, &[], "Batches retried after their transaction was not committed"),
    counter_of(GENERATIONS, &["carrier"], "Tracking numbers reused: new generations begun (an early scan more than the generation gap after a terminal shipment's latest event)"),
    counter_of(SUSPECTED_FALSE_DELIVERIES, &["carrier"], "In-transit or out-for-delivery scans later than a delivered one (the status stays delivered; often a mis-scanned delivery)"),
    counter_of(RETRACTIONS, &["carrier"], "Milestones retracted by corrections from the control topic (waymark correct): each emitted a retract_milestone upsert"),
    counter_of(RECORDS_CAUGHT_UP, &[], "exactly-once with changelogs off: records whose outputs were committed before a crash, re-processed silently to rebuild local state"),
    // `waymark ingest`, the webhook receiver.
    counter_of(INGEST_REQUESTS, &["source", "outcome"], "ingest: webhook requests by source and outcome (accepted, unauthorized, too_large, timeout, unavailable, bad_request)"),
    counter_of(INGEST_AUTH_FAILURES, &["source", "reason"], "ingest: requests refused by authentication, by source and reason (bad_signature, stale_timestamp, replayed, ...)"),
    histogram_of(
        INGEST_ACK_SECONDS,
        &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0],
        &["source"],
        "ingest: time from a request's body read to the broker's acknowledgement of its record",
    ),
    counter_of(INGEST_BYTES, &["source"], "ingest: body bytes of accepted webhooks, as produced"),
    gauge_of(INGEST_IN_FLIGHT, &[], "ingest: webhook requests being verified or waiting for the broker"),
    gauge_of(INGEST_BROKER_UP, &[], "ingest: 1 while the broker answers and every source's topic exists, else 0"),
];

/// Describe the metrics of `waymark ingest` (and only those) and export each
/// source's series at zero.
pub fn describe_ingest<'a>(sources: impl IntoIterator<Item = &'a str>, reasons: &[&'static str]) {
    for metric in CATALOG.iter().filter(|m| m.name.starts_with("waymark_ingest_")) {
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(metric.name, metric.help),
            Kind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            Kind::Histogram(_) => metrics::describe_histogram!(metric.name, metric.help),
        }
    }
    gauge!(INGEST_IN_FLIGHT).set(0.0);
    gauge!(INGEST_BROKER_UP).set(0.0);
    for source in sources {
        for outcome in ["accepted", "unauthorized", "too_large", "timeout", "unavailable", "bad_request"] {
            counter!(INGEST_REQUESTS, "source" => source.to_string(), "outcome" => outcome).increment(0);
        }
        for reason in reasons {
            counter!(INGEST_AUTH_FAILURES, "source" => source.to_string(), "reason" => *reason).increment(0);
        }
        counter!(INGEST_BYTES, "source" => source.to_string()).increment(0);
    }
}

/// Describe every metric of [`CATALOG`] to the installed recorder, and export
/// the ones without labels at zero (a counter that has not moved yet is a 0,
/// not a missing series). `carriers` are the configured carrier names: the
/// per-carrier event and record counters start at zero for each.
pub fn describe_and_zero<'a>(carriers: impl IntoIterator<Item = &'a str>) {
    for metric in CATALOG {
        match metric.kind {
            Kind::Counter => {
                metrics::describe_counter!(metric.name, metric.help);
                if metric.labels.is_empty() {
                    counter!(metric.name).increment(0);
                }
            }
            Kind::Gauge => {
                metrics::describe_gauge!(metric.name, metric.help);
                // A gauge at zero would claim a value (a lag, a time): only
                // the ones whose zero is the truth at start.
                if metric.name == REORDER_HELD {
                    gauge!(metric.name).set(0.0);
                }
            }
            Kind::Histogram(_) => metrics::describe_histogram!(metric.name, metric.help),
        }
    }
    for carrier in carriers {
        for outcome in ["new", "duplicate_key", "duplicate_hash", "revision", "invalid"] {
            counter!(EVENTS, "carrier" => carrier.to_string(), "outcome" => outcome).increment(0);
        }
        for outcome in ["processed", "dead_letter"] {
            counter!(RECORDS, "carrier" => carrier.to_string(), "outcome" => outcome).increment(0);
        }
    }
}

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
        if result.retractions > 0 {
            counter!(RETRACTIONS, "carrier" => carrier.clone()).increment(u64::from(result.retractions));
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
                    if event.applied.new_generation {
                        counter!(GENERATIONS, "carrier" => carrier.clone()).increment(1);
                    }
                    if event.applied.suspected_false_delivery {
                        counter!(SUSPECTED_FALSE_DELIVERIES, "carrier" => carrier.clone()).increment(1);
                    }
                    if event.applied.regression_prevented {
                        counter!(REGRESSIONS, "carrier" => carrier.clone()).increment(1);
                    }
                    if event.applied.out_of_order {
                        counter!(OUT_OF_ORDER, "carrier" => carrier.clone()).increment(1);
                    }
                }
                // Counted under its outcome, `revision`; not a duplicate.
                Verdict::Revision { .. } => {}
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
