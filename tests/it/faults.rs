//! Fault tests against a real broker of their own (so that stopping it never
//! disturbs the tests sharing WAYMARK_TEST_BROKERS): the broker is stopped and
//! restarted mid-stream while the worker runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use waymark::state::MemoryStore;
use waymark::synth::{generate, TrafficSpec};
use waymark::{batch, Envelope};

use crate::common::*;

/// A private single-node broker run by scripts/kafka.sh on free ports.
struct PrivateBroker {
    port: u16,
    controller_port: u16,
    data: tempfile::TempDir,
}

impl PrivateBroker {
    fn start() -> PrivateBroker {
        // The shared broker being up proves Java, Maven and the jar cache work here.
        let _ = brokers();
        let broker = PrivateBroker { port: free_port(), controller_port: free_port(), data: tempfile::tempdir().unwrap() };
        broker.script("start");
        broker
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn script(&self, command: &str) {
        let status = Command::new(repo().join("scripts/kafka.sh"))
            .arg(command)
            .env("WAYMARK_KAFKA_PORT", self.port.to_string())
            .env("WAYMARK_KAFKA_CONTROLLER_PORT", self.controller_port.to_string())
            .env("WAYMARK_KAFKA_DATA", self.data.path())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run scripts/kafka.sh");
        assert!(status.success(), "scripts/kafka.sh {command} failed for the private broker");
    }

    fn data_dir(&self) -> &Path {
        self.data.path()
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.script("stop");
    }
}

fn expected_upserts(envelopes: &[Envelope]) -> BTreeMap<String, serde_json::Value> {
    let output = batch::process(&waymark::Pipeline::default(), &MemoryStore::default(), envelopes, chrono::Utc::now(), false, None)
        .unwrap();
    output.upserts.iter().map(|u| (u.milestone_id.clone(), serde_json::to_value(u).unwrap())).collect()
}

#[test]
fn broker_stopped_and_restarted_mid_stream_loses_nothing() {
    let broker = PrivateBroker::start();
    assert!(broker.data_dir().exists());
    let setup = WorkerSetup::on(&broker.address(), "brokerfault", 2);
    let mut input = Vec::new();
    for (partition, seed) in [(0, 21u64), (1, 22u64)] {
        let spec = TrafficSpec { seed, shipments: 120, partition, topic: setup.input.clone(), ..TrafficSpec::default() };
        input.extend(generate(&spec).envelopes);
    }
    let expected = expected_upserts(&input);
    // First half before the outage, second half after it.
    let (first, second): (Vec<Envelope>, Vec<Envelope>) =
        input.iter().cloned().partition(|e| e.offset < (input.iter().filter(|x| x.partition == e.partition).count() as i64) / 2);
    produce_on(&broker.address(), &setup.input, &first, 2);

    let mut worker = setup.spawn(None, None);
    let before = read_all_on(&broker.address(), &setup.output, 2, 1, Duration::from_secs(60), Duration::ZERO);
    assert!(!before.is_empty(), "the worker emitted nothing before the outage");
    broker.script("stop");
    std::thread::sleep(Duration::from_secs(3));
    assert!(worker.try_wait().unwrap().is_none(), "the worker must wait for the broker, not exit");
    broker.script("start");
    produce_on(&broker.address(), &setup.input, &second, 2);

    let output = read_all_on(&broker.address(), &setup.output, 2, expected.len(), Duration::from_secs(120), Duration::from_secs(3));
    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(30));
    let (distinct, repeats) = check_at_least_once(&output, &expected);
    println!(
        "checked: broker restarted once, {} records in, {} upserts read, {distinct} distinct, {} expected, {repeats} identical repeats",
        input.len(),
        output.len(),
        expected.len()
    );
    assert!(status.is_some_and(|s| s.success()), "SIGTERM after the outage must still exit 0: {status:?}");
}
