//! Correct whatever the producer's keying: one multi-carrier stream (EasyPost and
//! DHL, with redeliveries, replays with new ids and out-of-order snapshots)
//! produced five ways, in both delivery modes, against the real broker:
//! (a) keyed by tracking number, (b) with no key, (c) keyed by a fresh id per
//! delivery, (d) with DHL bodies that carry two shipments each, (e) with input
//! partitions added mid-stream. Every one must yield exactly the milestones of the
//! stream keyed by shipment (once each to a read_committed reader in
//! `exactly-once`; identical repeats only in `at-least-once`), no shipment status
//! moving backwards in output order, and the same final statuses.
//!
//! And the opt-out (`routing.mode = "input"`) on an un-keyed stream shows itself
//! on /metrics (`waymark_shipment_partition_conflicts_total`).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use waymark::synth::{generate, merge_dhl_pairs, Rng, SynthCarrier, TrafficSpec};
use waymark::Envelope;

use crate::common::*;

const PARTITIONS: i32 = 3;

/// How the producer of the raw topic keys (and so partitions) its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keying {
    TrackingNumber,
    NoKey,
    DeliveryId,
    TwoShipmentsPerBody,
    PartitionsAddedMidStream,
}

/// EasyPost and DHL traffic for `topic`, interleaved (one raw topic, the carrier
/// header says which is which).
fn stream(topic: &str) -> Vec<Envelope> {
    let spec = |seed, carrier| TrafficSpec { seed, shipments: 45, carrier, topic: topic.to_string(), ..TrafficSpec::default() };
    let easypost = generate(&spec(61, SynthCarrier::EasyPost)).envelopes;
    let dhl = generate(&spec(62, SynthCarrier::Dhl)).envelopes;
    let mut rng = Rng::new(63);
    let (mut a, mut b) = (easypost.into_iter().peekable(), dhl.into_iter().peekable());
    let mut out = Vec::new();
    while a.peek().is_some() || b.peek().is_some() {
        let next = if b.peek().is_none() || (a.peek().is_some() && rng.chance(0.5)) { a.next() } else { b.next() };
        out.extend(next);
    }
    out
}

/// The tracking number a body is about (its first shipment's).
fn tracking_number(envelope: &Envelope) -> String {
    let body: serde_json::Value = serde_json::from_slice(&envelope.payload).unwrap();
    body["result"]["tracking_code"].as_str().or_else(|| body["shipments"][0]["id"].as_str()).unwrap().to_string()
}

/// Produce with `key` and librdkafka's default partitioner (no explicit partition).
fn produce_keyed(topic: &str, envelopes: &[Envelope], key: impl Fn(usize, &Envelope) -> String) {
    let keyed: Vec<Envelope> = envelopes
        .iter()
        .enumerate()
        .map(|(i, e)| Envelope { key: Some(key(i, e).into_bytes()), partition: -1, ..e.clone() })
        .collect();
    produce(topic, &keyed, PARTITIONS);
}

fn add_partitions(topic: &str, total: usize) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let results = runtime
        .block_on(admin.create_partitions([&NewPartitions::new(topic, total)], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))))
        .expect("create_partitions");
    for result in results {
        result.unwrap_or_else(|(topic, e)| panic!("growing {topic}: {e}"));
    }
}

/// One run: the stream produced with `keying`, one worker in `exactly_once` or
/// not. Returns the output and the expected milestones.
fn keying_run(keying: Keying, exactly_once: bool) -> (Vec<Read>, BTreeMap<String, serde_json::Value>) {
    let name = format!("keying.{keying:?}.{}", if exactly_once { "eos" } else { "alo" }).to_lowercase();
    let setup = WorkerSetup::new(&name, if keying == Keying::PartitionsAddedMidStream { 2 } else { PARTITIONS });
    let reference = stream(&setup.input);
    // What the stream keyed by shipment yields: the reference for all five.
    let expected = expected_upserts(&reference);
    let input = match keying {
        Keying::TwoShipmentsPerBody => merge_dhl_pairs(&reference),
        _ => reference.clone(),
    };
    let mut args: Vec<String> = Vec::new();
    if exactly_once {
        args.extend(["--delivery".into(), "exactly-once".into(), "--transactional-id".into(), unique("it.keying.txn")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut worker = setup.spawn_with(None, None, &args);
    match keying {
        Keying::TrackingNumber => produce_keyed(&setup.input, &input, |_, e| tracking_number(e)),
        Keying::DeliveryId => produce_keyed(&setup.input, &input, |i, _| format!("delivery-{i}-{}", unique("id"))),
        Keying::NoKey | Keying::TwoShipmentsPerBody => produce(&setup.input, &scatter(&input, PARTITIONS), PARTITIONS),
        Keying::PartitionsAddedMidStream => {
            let (first, second) = input.split_at(input.len() / 2);
            produce(&setup.input, &scatter(first, 2), 2);
            // Let the worker get into the first half before the topic grows.
            let _ = read_all(&setup.output, 1, expected.len() / 4, Duration::from_secs(60), Duration::ZERO);
            add_partitions(&setup.input, 4);
            produce(&setup.input, &scatter(second, 4), 4);
        }
    }
    let output = read_all(&setup.output, setup.partitions.max(1), expected.len(), Duration::from_secs(180), Duration::from_secs(3));
    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(40)).expect("the worker exits after SIGTERM");
    assert!(status.success(), "{name}: SIGTERM must exit 0, got {status:?}");
    (output, expected)
}

fn check(keying: Keying, exactly_once: bool) {
    let (output, expected) = keying_run(keying, exactly_once);
    let (distinct, repeats) = check_at_least_once(&output, &expected);
    let shipments = assert_no_status_moves_back(&output);
    let finals = final_statuses(&output);
    let expected_finals: BTreeMap<String, String> = {
        // The stream keyed by shipment, in order: the last milestone of each shipment.
        let mut finals = BTreeMap::new();
        for value in expected.values() {
            let key = format!("{}:{}:{}", value["tenant_id"].as_str().unwrap(), value["carrier"].as_str().unwrap(), value["tracking_number"].as_str().unwrap());
            let status = value["shipment_status"].as_str().unwrap().to_string();
            let rank = |s: &str| waymark::Status::parse(s).map(|s| s.rank()).unwrap_or(0);
            let entry = finals.entry(key).or_insert_with(|| status.clone());
            if rank(&status) > rank(entry) {
                *entry = status;
            }
        }
        finals
    };
    println!(
        "checked keying {keying:?} ({}): {} upserts read, {distinct} distinct of {} expected, {repeats} identical repeats, {shipments} shipments with no status moved back",
        if exactly_once { "exactly-once" } else { "at-least-once" },
        output.len(),
        expected.len()
    );
    assert_eq!(finals, expected_finals, "final shipment statuses differ from the stream keyed by shipment");
    if exactly_once {
        assert_eq!(repeats, 0, "exactly-once with keying {keying:?}: a read_committed reader saw {repeats} repeated milestones");
    }
}

#[test]
fn keyed_by_tracking_number_at_least_once() {
    check(Keying::TrackingNumber, false);
}

#[test]
fn keyed_by_tracking_number_exactly_once() {
    check(Keying::TrackingNumber, true);
}

#[test]
fn no_key_at_least_once() {
    check(Keying::NoKey, false);
}

#[test]
fn no_key_exactly_once() {
    check(Keying::NoKey, true);
}

#[test]
fn keyed_by_delivery_id_at_least_once() {
    check(Keying::DeliveryId, false);
}

#[test]
fn keyed_by_delivery_id_exactly_once() {
    check(Keying::DeliveryId, true);
}

#[test]
fn two_shipments_per_body_at_least_once() {
    check(Keying::TwoShipmentsPerBody, false);
}

#[test]
fn two_shipments_per_body_exactly_once() {
    check(Keying::TwoShipmentsPerBody, true);
}

#[test]
fn partitions_added_mid_stream_at_least_once() {
    check(Keying::PartitionsAddedMidStream, false);
}

#[test]
fn partitions_added_mid_stream_exactly_once() {
    check(Keying::PartitionsAddedMidStream, true);
}

/// The opt-out trusts the producer: fed an un-keyed stream it must say so on
/// /metrics (and it does double milestones: that is what the metric warns of).
#[test]
fn the_input_routing_opt_out_reports_shipments_seen_on_two_partitions() {
    let setup = WorkerSetup::new("keying.optout", PARTITIONS);
    setup.configure("routing", "mode = \"input\"");
    let reference = stream(&setup.input);
    let expected = expected_upserts(&reference);
    produce(&setup.input, &scatter(&reference, PARTITIONS), PARTITIONS);
    let mut worker = setup.spawn(None, None);
    let output = read_all(&setup.output, PARTITIONS, expected.len(), Duration::from_secs(120), Duration::from_secs(2));
    let conflicts = (0..40)
        .find_map(|_| {
            let (_, metrics) = http_get(setup.http_port, "/metrics")?;
            let total: f64 = metrics
                .lines()
                .filter(|l| l.starts_with("waymark_shipment_partition_conflicts_total{"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum();
            if total > 0.0 {
                return Some(total);
            }
            std::thread::sleep(Duration::from_millis(250));
            None
        })
        .unwrap_or(0.0);
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).is_some_and(|s| s.success()));
    let mut ids = std::collections::HashSet::new();
    let repeated = output.iter().filter(|r| !ids.insert(r.value["milestone_id"].as_str().unwrap().to_string())).count();
    println!("checked opt-out on an un-keyed stream: {conflicts} conflicts counted, {repeated} milestones emitted more than once, {} read", output.len());
    assert!(conflicts > 0.0, "the opt-out on an un-keyed stream must count shipment/partition conflicts");
}
