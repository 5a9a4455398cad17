//! `waymark correct` on the real broker, across a rebalance, in both delivery
//! modes: a false delivered retracted while a second instance joins; the
//! shipment's state (the retracted entry, the recomputed status) moves with
//! its home through the changelog, so after the first instance leaves, the
//! other one moves the status on from where the retraction left it.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use waymark::Envelope;

use crate::common::*;

/// One EasyPost webhook for shipment EZC1 of tenant acme with these scans.
fn webhook(topic: &str, offset: i64, scans: &[(&str, &str, &str)]) -> Envelope {
    let details: Vec<Value> = scans
        .iter()
        .map(|(status, code, at)| serde_json::json!({"status": status, "carrier_code": code, "datetime": at, "message": format!("{status} {code}")}))
        .collect();
    let body = serde_json::json!({"object": "Event", "id": format!("evt_{offset}"), "description": "tracker.updated",
        "result": {"object": "Tracker", "tracking_code": "EZC1", "tracking_details": details}});
    Envelope {
        topic: topic.into(),
        partition: 0,
        offset,
        timestamp_ms: None,
        headers: vec![("tenant-id".into(), Some(b"acme".to_vec())), ("carrier".into(), Some(b"easypost".to_vec()))],
        key: None,
        payload: body.to_string().into_bytes(),
    }
}

const PICKED_UP: (&str, &str, &str) = ("in_transit", "PU", "2026-11-30T09:00:00Z");
const FALSE_DELIVERY: (&str, &str, &str) = ("delivered", "DL", "2026-11-30T15:00:00Z");
const BACK_IN_TRANSIT: (&str, &str, &str) = ("in_transit", "AR", "2026-11-30T18:00:00Z");
const OUT_FOR_DELIVERY: (&str, &str, &str) = ("out_for_delivery", "OD", "2026-12-01T08:00:00Z");

/// Read `topic` until `done` holds for the records read (or the time is up).
fn read_until(topic: &str, timeout: Duration, done: impl Fn(&[Read]) -> bool) -> Vec<Read> {
    let started = std::time::Instant::now();
    loop {
        let reads = read_all(topic, 1, usize::MAX, Duration::from_secs(3), Duration::from_millis(500));
        if done(&reads) || started.elapsed() > timeout {
            return reads;
        }
    }
}

fn correct(setup: &WorkerSetup, milestone_id: &str) {
    let out = Command::new(waymark_bin())
        .args(["correct", "--config"])
        .arg(&setup.config_path)
        .args(["--shipment", "acme:easypost:EZC1", "--retract", milestone_id, "--reason", "scanned delivered at the wrong address", "--by", "it@acme"])
        .output()
        .unwrap();
    assert!(out.status.success(), "waymark correct: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("correction sent"), "{}", String::from_utf8_lossy(&out.stdout));
}

/// A worker process, killed if the test panics before it stops it.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn retractions(reads: &[Read]) -> Vec<&Value> {
    reads.iter().map(|r| &r.value).filter(|v| v["kind"] == "retract_milestone").collect()
}

fn correct_across_a_rebalance(name: &str, mode: &[&str]) {
    let setup = WorkerSetup::new(name, 1);
    let control = unique("it.correct.control");
    create_topics(&[&control], 1);
    setup.configure("kafka", &format!("control_topic = \"{control}\""));
    let history = [webhook(&setup.input, 0, &[PICKED_UP]), webhook(&setup.input, 1, &[PICKED_UP, FALSE_DELIVERY]), webhook(&setup.input, 2, &[PICKED_UP, FALSE_DELIVERY, BACK_IN_TRANSIT])];
    produce(&setup.input, &history, 1);

    let (a_dir, b_dir) = (setup.state_dir.with_extension("a"), setup.state_dir.with_extension("b"));
    let mut a = Running(setup.spawn_with(Some(&a_dir), Some(free_port()), mode));
    let reads = read_until(&setup.output, Duration::from_secs(90), |r| r.len() >= 3);
    assert_eq!(reads.len(), 3, "three milestones: {:?}", reads.iter().map(|r| &r.value).collect::<Vec<_>>());
    let false_delivery = reads.iter().find(|r| r.value["status"] == "delivered").expect("the false delivered").value.clone();
    let last = &reads[2].value;
    assert_eq!((last["status"].as_str(), last["shipment_status"].as_str()), (Some("in_transit"), Some("delivered")), "the later scan does not move a delivered status");

    // B joins (the group rebalances), and the correction is sent meanwhile.
    let b_port = free_port();
    let mut b = Running(setup.spawn_with(Some(&b_dir), Some(b_port), mode));
    correct(&setup, false_delivery["milestone_id"].as_str().unwrap());
    let reads = read_until(&setup.output, Duration::from_secs(90), |r| !retractions(r).is_empty());
    let retracted = retractions(&reads);
    assert_eq!(retracted.len(), 1, "one retraction: {retracted:?}");
    let retraction = retracted[0];
    assert_eq!(retraction["milestone_id"], false_delivery["milestone_id"]);
    assert_eq!((retraction["shipment_status"].as_str(), retraction["latest_status"].as_str()), (Some("in_transit"), Some("in_transit")));
    assert_eq!(retraction["retraction"]["requested_by"], "it@acme");
    assert_eq!(retraction["source"]["topic"].as_str(), Some(control.as_str()));

    // A leaves: B owns every home, restored from the changelog. The same
    // correction again changes nothing; the next scan moves the status on
    // from in_transit (with the retraction lost, it would stay delivered);
    // the false scan re-sent by the carrier stays retracted.
    signal(&a.0, "TERM");
    assert!(wait_exit(&mut a.0, Duration::from_secs(30)).is_some_and(|s| s.success()), "A did not stop cleanly");
    assert!(eventually(Duration::from_secs(60), Duration::from_millis(250), || http_get(b_port, "/readyz").is_some_and(|(code, _)| code == 200)));
    correct(&setup, false_delivery["milestone_id"].as_str().unwrap());
    produce(&setup.input, &[webhook(&setup.input, 3, &[PICKED_UP, FALSE_DELIVERY, BACK_IN_TRANSIT, OUT_FOR_DELIVERY])], 1);
    let reads = read_until(&setup.output, Duration::from_secs(90), |r| r.iter().any(|r| r.value["status"] == "out_for_delivery"));
    let next = reads.iter().find(|r| r.value["status"] == "out_for_delivery").expect("the out-for-delivery milestone");
    assert_eq!(next.value["shipment_status"], "out_for_delivery", "the state after the rebalance knows the retraction");
    let settled = read_all(&setup.output, 1, usize::MAX, Duration::from_secs(5), Duration::from_secs(3));
    assert_eq!(retractions(&settled).len(), 1, "the correction sent again retracted nothing more");
    assert_eq!(settled.iter().filter(|r| r.value["kind"] == "ensure_milestone").count(), 4, "no milestone came back: {:?}", settled.iter().map(|r| &r.value).collect::<Vec<_>>());
    signal(&b.0, "TERM");
    assert!(wait_exit(&mut b.0, Duration::from_secs(30)).is_some_and(|s| s.success()), "B did not stop cleanly");
    println!("checked: the false delivered retracted once across a rebalance; the status moved on from in_transit on the new owner");
}

#[test]
fn a_retraction_survives_a_rebalance_at_least_once() {
    correct_across_a_rebalance("correct", &[]);
}

#[test]
fn a_retraction_survives_a_rebalance_exactly_once() {
    // Each instance's default transactional id differs by its state directory.
    correct_across_a_rebalance("correct-eos", &["--delivery", "exactly-once"]);
}
