//! Property tests of the core (pipeline over the in-memory store): for any
//! interleaving of a set of distinct events with arbitrary duplicates,
//! reorderings, changed event ids and clock skew within tolerance, the emitted
//! milestones are exactly the distinct events, once each, and no shipment's status
//! ever moves backwards in the output.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Duration, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::json;
use waymark::state::{Keyspace, MemoryStore, StateStore, Staged};
use waymark::{Envelope, Pipeline, Status};

const STATUSES: [(&str, &str); 6] = [
    ("pre_transit", "OC"),
    ("in_transit", "PU"),
    ("in_transit", "AR"),
    ("out_for_delivery", "OD"),
    ("failure", "DE"),
    ("delivered", "DL"),
];

/// [`STATUSES`] and EasyPost statuses that map to canonical statuses without a
/// rank: `cancelled`, `exception` (failure SE) and `unknown`.
const STATUSES_WITH_UNRANKED: [(&str, &str); 9] = [
    ("pre_transit", "OC"),
    ("in_transit", "PU"),
    ("in_transit", "AR"),
    ("cancelled", "CA"),
    ("out_for_delivery", "OD"),
    ("failure", "SE"),
    ("unknown", "XX"),
    ("failure", "DE"),
    ("delivered", "DL"),
];

/// A distinct scan: shipment, status index, minute offset (distinct per shipment).
#[derive(Debug, Clone)]
struct Scan {
    shipment: usize,
    status: usize,
    minute: i64,
}

/// One delivery of a scan: which scan, the event id, and skew in ms. Skews lie in
/// [-1 s, +1 s], so any two copies are within the 2 s tolerance of each other.
#[derive(Debug, Clone)]
struct Delivery {
    scan: usize,
    event_id: u32,
    skew_ms: i64,
}

fn scans(statuses: usize) -> impl Strategy<Value = Vec<Scan>> {
    prop::collection::vec((0usize..3, 0usize..statuses, 0i64..500), 1..25).prop_map(|raw| {
        // Make scans distinct: one minute slot per shipment is used at most once.
        let mut seen = BTreeSet::new();
        raw.into_iter()
            .filter(|(s, _, m)| seen.insert((*s, *m)))
            .map(|(shipment, status, minute)| Scan { shipment, status, minute })
            .collect()
    })
}

fn scenario() -> impl Strategy<Value = (Vec<Scan>, Vec<Delivery>)> {
    scenario_with(&STATUSES)
}

fn scenario_with(statuses: &[(&str, &str)]) -> impl Strategy<Value = (Vec<Scan>, Vec<Delivery>)> {
    scans(statuses.len()).prop_flat_map(|scans| {
        let n = scans.len();
        let deliveries = prop::collection::vec((0..n, any::<u32>(), -1000i64..=1000), 0..60);
        (Just(scans), deliveries, any::<u64>())
    })
    .prop_map(|(scans, extra, shuffle_seed)| {
        // Every scan at least once (skew 0), then arbitrary duplicates, all shuffled.
        let mut deliveries: Vec<Delivery> =
            (0..scans.len()).map(|scan| Delivery { scan, event_id: scan as u32, skew_ms: 0 }).collect();
        deliveries.extend(extra.into_iter().map(|(scan, event_id, skew_ms)| Delivery { scan, event_id, skew_ms }));
        let mut rng = waymark::synth::Rng::new(shuffle_seed);
        for i in (1..deliveries.len()).rev() {
            deliveries.swap(i, rng.below(i as u64 + 1) as usize);
        }
        (scans, deliveries)
    })
}

fn envelope(offset: usize, scan: &Scan, delivery: &Delivery) -> Envelope {
    envelope_with(&STATUSES, offset, scan, delivery)
}

fn envelope_with(statuses: &[(&str, &str)], offset: usize, scan: &Scan, delivery: &Delivery) -> Envelope {
    let base = Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap();
    let at = base + Duration::minutes(scan.minute) + Duration::milliseconds(delivery.skew_ms);
    let (status, code) = statuses[scan.status];
    let body = json!({"object": "Event", "id": format!("evt_{}", delivery.event_id), "description": "tracker.updated",
        "result": {"object": "Tracker", "tracking_code": format!("PROP{}", scan.shipment),
            "tracking_details": [{"status": status, "carrier_code": code, "message": code,
                "datetime": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "tracking_location": {"city": "MEMPHIS", "state": "TN", "country": "US"}}]}});
    Envelope {
        topic: "tracking.raw.easypost".into(),
        partition: 0,
        offset: offset as i64,
        timestamp_ms: None,
        headers: vec![("tenant-id".into(), Some(b"acme".to_vec()))],
        key: None,
        payload: body.to_string().into_bytes(),
    }
}

/// [`envelope`] with the scan's message (its description) replaced: the
/// provider's correction of the scan's text.
fn corrected(offset: usize, scan: &Scan, delivery: &Delivery, text: &str) -> Envelope {
    let mut envelope = envelope(offset, scan, delivery);
    let (_, code) = STATUSES[scan.status];
    let body = String::from_utf8(envelope.payload).unwrap().replace(&format!("\"message\":\"{code}\""), &format!("\"message\":\"{text}\""));
    envelope.payload = body.into_bytes();
    envelope
}

/// One EasyPost scan of shipment `GEN1` at `minute` minutes after a base time.
fn scan_at(offset: usize, status: &str, code: &str, minute: i64) -> Envelope {
    let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + Duration::minutes(minute);
    let body = json!({"object": "Event", "id": format!("evt_{offset}"), "description": "tracker.updated",
        "result": {"object": "Tracker", "tracking_code": "GEN1",
            "tracking_details": [{"status": status, "carrier_code": code, "message": code,
                "datetime": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "tracking_location": {"city": "MEMPHIS", "state": "TN", "country": "US"}}]}});
    Envelope {
        topic: "tracking.raw.easypost".into(),
        partition: 0,
        offset: offset as i64,
        timestamp_ms: None,
        headers: vec![("tenant-id".into(), Some(b"acme".to_vec()))],
        key: None,
        payload: body.to_string().into_bytes(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// A delivered parcel, then an early scan `after` minutes after the
    /// delivery: a new generation exactly when that is more than the gap; then
    /// the first parcel's history replayed late (and one of its scans never
    /// seen before) never begins another, and belongs to the first generation.
    #[test]
    fn generations_split_after_the_gap_only_and_an_old_replay_never_splits(
        after in 0i64..(2 * 30 * 24 * 60),
        late_minute in 0i64..2000,
    ) {
        let gap_minutes = (waymark::order::DEFAULT_GENERATION_GAP.as_secs() / 60) as i64;
        let pipeline = Pipeline::default();
        let store = MemoryStore::default();
        let now = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let mut offset = 0;
        let run = |envelope: Envelope| {
            let mut staged = Staged::new(&store);
            let result = pipeline.process(&envelope, now, &mut staged).unwrap();
            store.write(staged.take_batch()).unwrap();
            result.upserts
        };
        let first = [("pre_transit", "OC", 0), ("in_transit", "PU", 60), ("delivered", "DL", 2000)];
        for (status, code, minute) in first {
            offset += 1;
            run(scan_at(offset, status, code, minute));
        }
        offset += 1;
        let reused = run(scan_at(offset, "pre_transit", "OC", 2000 + after));
        let expected_generation = u32::from(after > gap_minutes);
        prop_assert_eq!(reused.iter().map(|u| u.generation).collect::<Vec<_>>(), vec![expected_generation]);
        // The first parcel's history, replayed later: duplicates only.
        for (status, code, minute) in first {
            offset += 1;
            prop_assert!(run(scan_at(offset, status, code, minute)).is_empty());
        }
        // A scan of the first parcel never seen before, arriving late: the first generation's.
        offset += 1;
        let late = run(scan_at(offset, "in_transit", "AR", 61 + late_minute % 1900));
        prop_assert_eq!(late.len(), 1);
        prop_assert_eq!(late[0].generation, 0);
        if expected_generation == 1 {
            prop_assert_eq!(late[0].shipment_status, Status::Delivered, "the first parcel ended delivered");
        }
    }

    /// Whatever the interleaving of copies and corrections: a correction is one
    /// revision of its scan's milestone (same id, revision 1, never a second
    /// milestone or a second notification), sending it again (skewed or not) is
    /// a duplicate, and a late copy of the uncorrected scan does not undo it.
    #[test]
    fn a_correction_is_one_revision_of_its_milestone(
        (scans, deliveries) in scenario(),
        fix in prop::collection::vec(any::<bool>(), 25),
        copies in prop::collection::vec(-1000i64..=1000, 1..4),
    ) {
        let pipeline = Pipeline::default();
        let store = MemoryStore::default();
        let now = Utc.with_ymd_and_hms(2026, 5, 2, 0, 0, 0).unwrap();
        let mut firsts: BTreeMap<usize, String> = BTreeMap::new();
        let mut revisions: Vec<(usize, String, u32)> = Vec::new();
        let mut offset = 0;
        let run = |envelope: Envelope, scan: usize, firsts: &mut BTreeMap<usize, String>, revisions: &mut Vec<(usize, String, u32)>| {
            let mut staged = Staged::new(&store);
            let result = pipeline.process(&envelope, now, &mut staged).unwrap();
            store.write(staged.take_batch()).unwrap();
            for upsert in result.upserts {
                match upsert.revision {
                    0 => assert!(firsts.insert(scan, upsert.milestone_id).is_none(), "a scan became two milestones"),
                    n => revisions.push((scan, upsert.milestone_id, n)),
                }
            }
        };
        for delivery in &deliveries {
            offset += 1;
            run(envelope(offset, &scans[delivery.scan], delivery), delivery.scan, &mut firsts, &mut revisions);
        }
        for (i, scan) in scans.iter().enumerate().filter(|(i, _)| fix[*i]) {
            for skew_ms in &copies {
                offset += 1;
                let delivery = Delivery { scan: i, event_id: 9000 + offset as u32, skew_ms: *skew_ms };
                run(corrected(offset, scan, &delivery, "Corrected by the carrier"), i, &mut firsts, &mut revisions);
                offset += 1;
                run(envelope(offset, scan, &delivery), i, &mut firsts, &mut revisions);
            }
        }
        prop_assert_eq!(firsts.len(), scans.len());
        let fixed = scans.iter().enumerate().filter(|(i, _)| fix[*i]).count();
        prop_assert_eq!(revisions.len(), fixed, "one revision per corrected scan: {:?}", revisions);
        for (scan, id, n) in &revisions {
            prop_assert_eq!(*n, 1);
            prop_assert_eq!(Some(id), firsts.get(scan), "a revision keeps its milestone's id");
        }
    }

    #[test]
    fn emitted_milestones_are_exactly_the_distinct_events_once_each((scans, deliveries) in scenario()) {
        let pipeline = Pipeline::default();
        let store = MemoryStore::default();
        let now = Utc.with_ymd_and_hms(2026, 5, 2, 0, 0, 0).unwrap();
        let mut emitted: Vec<(usize, String, Status)> = Vec::new();
        for (offset, delivery) in deliveries.iter().enumerate() {
            let scan = &scans[delivery.scan];
            let mut staged = Staged::new(&store);
            let result = pipeline.process(&envelope(offset, scan, delivery), now, &mut staged).unwrap();
            store.write(staged.take_batch()).unwrap();
            prop_assert!(result.dead_letter.is_none());
            for upsert in result.upserts {
                emitted.push((delivery.scan, upsert.milestone_id, upsert.shipment_status));
            }
        }
        // Exactly one milestone per distinct scan.
        let per_scan: BTreeMap<usize, usize> = emitted.iter().fold(BTreeMap::new(), |mut m, (s, _, _)| {
            *m.entry(*s).or_default() += 1;
            m
        });
        prop_assert_eq!(per_scan.len(), scans.len(), "some scan never became a milestone");
        prop_assert!(per_scan.values().all(|n| *n == 1), "a scan became two milestones: {:?}", per_scan);
        let ids: BTreeSet<&String> = emitted.iter().map(|(_, id, _)| id).collect();
        prop_assert_eq!(ids.len(), emitted.len());
        // Per shipment, shipment_status ranks never decrease in output order
        // (cancelled/exception have rank 0 and only apply before any ranked status).
        let mut last: BTreeMap<usize, u8> = BTreeMap::new();
        for (scan, _, status) in &emitted {
            let shipment = scans[*scan].shipment;
            let prev = last.get(&shipment).copied().unwrap_or(0);
            prop_assert!(status.rank() >= prev, "status moved back to {:?}", status);
            last.insert(shipment, status.rank());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// The bounded reorder window: the same deliveries cut into windows of any
    /// sizes still give exactly one milestone per distinct scan, and within each
    /// window every shipment's milestones come out in status-hierarchy order,
    /// whatever order they arrived in.
    #[test]
    fn a_reorder_window_emits_each_shipment_in_hierarchy_order(
        (scans, deliveries) in scenario(),
        cuts in prop::collection::vec(1usize..12, 1..20),
    ) {
        let pipeline = Pipeline::default();
        let store = MemoryStore::default();
        let now = Utc.with_ymd_and_hms(2026, 5, 2, 0, 0, 0).unwrap();
        let envelopes: Vec<(usize, Envelope)> =
            deliveries.iter().enumerate().map(|(offset, d)| (d.scan, envelope(offset, &scans[d.scan], d))).collect();
        let mut emitted: BTreeMap<String, usize> = BTreeMap::new();
        let mut last_shipment_status: BTreeMap<String, u8> = BTreeMap::new();
        let mut rest = &envelopes[..];
        let mut cut = cuts.iter().cycle();
        while !rest.is_empty() {
            let size = (*cut.next().unwrap()).min(rest.len());
            let (window, tail) = rest.split_at(size);
            rest = tail;
            let records: Vec<Envelope> = window.iter().map(|(_, e)| e.clone()).collect();
            let mut staged = Staged::new(&store);
            let (results, upserts) = pipeline.process_in_hierarchy_order(&records, now, &mut staged).unwrap();
            store.write(staged.take_batch()).unwrap();
            prop_assert_eq!(results.len(), records.len());
            let mut last_in_window: BTreeMap<String, u8> = BTreeMap::new();
            for upsert in upserts {
                *emitted.entry(upsert.milestone_id.clone()).or_default() += 1;
                let shipment = upsert.tracking_number.clone();
                let rank = upsert.status.rank();
                // Unranked statuses keep their arrival place and start a new run.
                prop_assert!(rank == 0 || rank >= last_in_window.get(&shipment).copied().unwrap_or(0), "{} emitted {:?} after a higher status in one window", shipment, upsert.status);
                last_in_window.insert(shipment.clone(), rank);
                let shipment_rank = upsert.shipment_status.rank();
                prop_assert!(shipment_rank >= last_shipment_status.get(&shipment).copied().unwrap_or(0));
                last_shipment_status.insert(shipment, shipment_rank);
            }
        }
        prop_assert_eq!(emitted.len(), scans.len(), "one milestone per distinct scan");
        prop_assert!(emitted.values().all(|n| *n == 1));
    }

    /// The reorder window changes the order of emission, never where a shipment
    /// ends: cut into windows of any sizes, with statuses that have no rank
    /// (`cancelled`, which is terminal only before pickup, `exception`,
    /// `unknown`) among the ranked ones, every shipment ends in exactly the
    /// state arrival order gives it.
    #[test]
    fn a_reorder_window_ends_every_shipment_where_arrival_order_does(
        (scans, deliveries) in scenario_with(&STATUSES_WITH_UNRANKED),
        cuts in prop::collection::vec(1usize..12, 1..20),
    ) {
        let pipeline = Pipeline::default();
        let now = Utc.with_ymd_and_hms(2026, 5, 2, 0, 0, 0).unwrap();
        let envelopes: Vec<Envelope> = deliveries
            .iter()
            .enumerate()
            .map(|(offset, d)| envelope_with(&STATUSES_WITH_UNRANKED, offset, &scans[d.scan], d))
            .collect();
        let in_arrival_order = MemoryStore::default();
        for record in &envelopes {
            let mut staged = Staged::new(&in_arrival_order);
            pipeline.process(record, now, &mut staged).unwrap();
            in_arrival_order.write(staged.take_batch()).unwrap();
        }
        let in_windows = MemoryStore::default();
        let mut rest = &envelopes[..];
        let mut cut = cuts.iter().cycle();
        while !rest.is_empty() {
            let (window, tail) = rest.split_at((*cut.next().unwrap()).min(rest.len()));
            rest = tail;
            let mut staged = Staged::new(&in_windows);
            pipeline.process_in_hierarchy_order(window, now, &mut staged).unwrap();
            in_windows.write(staged.take_batch()).unwrap();
        }
        let shipments = |store: &MemoryStore| Staged::new(store).scan(Keyspace::Shipments, &[], &[0xff; 64]).unwrap();
        prop_assert!(!shipments(&in_arrival_order).is_empty());
        prop_assert_eq!(shipments(&in_windows), shipments(&in_arrival_order));
    }
}
