//! Fault tests against a real broker of their own (so that stopping it never
//! disturbs the tests sharing WAYMARK_TEST_BROKERS): the broker is stopped and
//! restarted mid-stream while the worker runs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use waymark::synth::{generate, TrafficSpec};
use waymark::Envelope;

use crate::common::*;

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

    // Generous: the property is that nothing is lost; a loaded 2-core machine
    // (CI runs two tests at once) can take a minute or more to come back.
    let output = read_all_on(&broker.address(), &setup.output, 2, expected.len(), Duration::from_secs(240), Duration::from_secs(3));
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

/// A small tmpfs mounted for one test (needs root, as CI runs; fails clearly otherwise).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test mounts a {megabytes} MiB tmpfs to fill the state disk and needs root for it (CI runs as root); run it as root"
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write zeros until the disk is full (ENOSPC).
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        loop {
            match file.write(&block) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_state_disk_stops_the_worker_with_a_clear_error_and_loses_nothing() {
    let disk = SmallDisk::mount(24);
    let setup = WorkerSetup::new("diskfull", 1);
    // Small memtables, so RocksDB must write to disk soon after the disk fills.
    setup.configure("state", "memtable_mb = 1");
    let state_dir = disk.path().join("state");
    let spec = |seed: u64, shipments: usize| TrafficSpec { seed, shipments, topic: setup.input.clone(), ..TrafficSpec::default() };
    let first = generate(&spec(41, 40)).envelopes;
    let mut second = generate(&spec(42, 1_500)).envelopes;
    // One partition, one stream: the second part continues the first's offsets.
    for (i, envelope) in second.iter_mut().enumerate() {
        envelope.offset = (first.len() + i) as i64;
    }
    let all: Vec<Envelope> = first.iter().chain(&second).cloned().collect();
    let expected = expected_upserts(&all);

    produce(&setup.input, &first, 1);
    let stderr_path = disk.path().parent().unwrap().join(format!("waymark-diskfull-{}.log", std::process::id()));
    let mut worker = Command::new(waymark_bin())
        .arg("run")
        .arg("--config")
        .arg(&setup.config_path)
        .arg("--state-dir")
        .arg(&state_dir)
        .env("WAYMARK_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let before = read_all(&setup.output, 1, 1, Duration::from_secs(60), Duration::ZERO);
    assert!(!before.is_empty(), "the worker emitted nothing before the disk filled");
    std::thread::sleep(Duration::from_secs(1));
    let filler = disk.fill();
    produce(&setup.input, &second, 1);
    let status = wait_exit(&mut worker, Duration::from_secs(120));
    let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr_path);
    assert!(status.is_some_and(|s| !s.success()), "the worker must stop (non-zero) when its state disk is full: {status:?}\n{log}");
    assert!(
        log.contains("No space left on device") && log.contains("disk is not full"),
        "the error must say what happened and what to do:\n{log}"
    );

    // Free the disk and restart: nothing acknowledged was lost.
    std::fs::remove_file(filler).unwrap();
    let mut worker = setup.spawn(Some(&state_dir), None);
    let output = read_all(&setup.output, 1, expected.len(), Duration::from_secs(120), Duration::from_secs(3));
    signal(&worker, "TERM");
    let restarted = wait_exit(&mut worker, Duration::from_secs(30));
    let (distinct, repeats) = check_at_least_once(&output, &expected);
    let reason = log.lines().find(|l| l.contains("No space left")).unwrap_or("").trim();
    println!("checked: disk filled mid-stream; worker stopped with `{reason}`; after freeing it: {distinct} distinct of {} expected, {repeats} identical repeats", expected.len());
    assert!(restarted.is_some_and(|s| s.success()));
}

#[test]
fn a_slow_downstream_backpressures_the_worker_without_loss() {
    // A producer queue of 5 records with 20 ms linger: every batch of 200 fills
    // it again and again (QueueFull), as a slow output topic would. The worker
    // must wait for deliveries, not drop, buffer without bound or fail.
    let setup = WorkerSetup::new("backpressure", 1);
    setup.configure("kafka.producer_properties", "\"queue.buffering.max.messages\" = \"5\"\n\"linger.ms\" = \"20\"");
    let (input, expected) = setup.traffic(61, 80);
    produce(&setup.input, &input, 1);
    let mut worker = setup.spawn(None, None);
    let output = read_all(&setup.output, 1, expected.len(), Duration::from_secs(120), Duration::from_secs(2));
    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(30));
    let (distinct, repeats) = check_at_least_once(&output, &expected);
    println!("checked: producer queue of 5 records, {} records in, {distinct} distinct of {} expected, {repeats} repeats", input.len(), expected.len());
    assert_eq!(repeats, 0, "nothing crashed, so nothing may repeat");
    assert!(status.is_some_and(|s| s.success()));
}

#[test]
fn a_worker_started_before_its_broker_waits_for_it() {
    let broker = PrivateBroker::stopped();
    // The setup creates topics, which needs the broker: write the config by hand
    // through a setup on the shared broker, then point it at the private one.
    let setup = WorkerSetup::new("brokerlate", 1);
    let text = std::fs::read_to_string(&setup.config_path).unwrap();
    std::fs::write(&setup.config_path, text.replace(&brokers(), &broker.address())).unwrap();
    let mut worker = setup.spawn(None, None);
    std::thread::sleep(Duration::from_secs(4));
    assert!(worker.try_wait().unwrap().is_none(), "the worker must wait for its broker, not exit");
    assert_eq!(http_get(setup.http_port, "/readyz").map(|r| r.0), Some(503), "not ready while the broker is away");

    broker.script("start");
    create_topics_on(&broker.address(), &[&setup.input, &setup.output, &setup.dlq], 1);
    let (input, expected) = setup.traffic(71, 30);
    produce_on(&broker.address(), &setup.input, &input, 1);
    let output = read_all_on(&broker.address(), &setup.output, 1, expected.len(), Duration::from_secs(120), Duration::from_secs(2));
    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(30));
    let (distinct, repeats) = check_at_least_once(&output, &expected);
    println!("checked: worker started 4 s before its broker; {distinct} distinct of {} expected, {repeats} repeats", expected.len());
    assert!(status.is_some_and(|s| s.success()));
}

/// A produce error that retrying can never fix (here: an output topic that does
/// not exist, on a broker that does not create topics) stops the worker with exit
/// 2 and what to fix, instead of re-sending the batch forever while healthy.
/// Found by the chaos soak: the broker came back long enough for the worker's
/// internal topics to be checked, then went down again before its
/// transactional producer was initialized. The initialization timed out and
/// the worker exited 1. It now waits for the broker there too. (The worker
/// pauses between the two steps, a failpoint, while the test stops the broker.)
#[test]
fn a_broker_that_goes_away_while_the_producers_start_is_waited_for() {
    let broker = PrivateBroker::start();
    let setup = WorkerSetup::on(&broker.address(), "producersstart", 1);
    setup.configure("kafka", "delivery = \"exactly-once\"");
    let mut worker = std::process::Command::new(waymark_bin())
        .args(["run", "--config"])
        .arg(&setup.config_path)
        .env("WAYMARK_LOG", "warn,waymark=info")
        .env("WAYMARK_FAILPOINT", "before_producers:1:pause=6")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    broker.script("stop");
    // The producer's initialization times out after 30 s; the worker must go on waiting.
    std::thread::sleep(Duration::from_secs(40));
    assert!(worker.try_wait().unwrap().is_none(), "the worker must wait for its broker, not exit");
    broker.script("start");
    let (input, expected) = setup.traffic(72, 20);
    produce_on(&broker.address(), &setup.input, &input, 1);
    let output = read_all_on(&broker.address(), &setup.output, 1, expected.len(), Duration::from_secs(120), Duration::from_secs(2));
    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(30));
    let (distinct, repeats) = check_at_least_once(&output, &expected);
    assert_eq!(repeats, 0, "exactly-once");
    println!("checked: the broker went away while the producers started; {distinct} of {} milestones after it came back", expected.len());
    assert!(status.is_some_and(|s| s.success()));
}

#[test]
fn an_output_topic_that_cannot_be_written_stops_the_worker_with_exit_2() {
    let setup = WorkerSetup::new("unwritable", 1);
    let missing = unique("it.unwritable.missing-output");
    let text = std::fs::read_to_string(&setup.config_path).unwrap().replace(&setup.output, &missing);
    std::fs::write(&setup.config_path, text).unwrap();
    setup.configure("kafka.producer_properties", "\"message.timeout.ms\" = \"20000\"\n\"topic.metadata.propagation.max.ms\" = \"3000\"");
    let spec = TrafficSpec { seed: 71, shipments: 5, topic: setup.input.clone(), ..TrafficSpec::default() };
    produce(&setup.input, &generate(&spec).envelopes, 1);
    let mut worker = std::process::Command::new(waymark_bin())
        .args(["run", "--config"])
        .arg(&setup.config_path)
        .env("WAYMARK_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut worker, Duration::from_secs(120)).expect("the worker must stop, not retry forever");
    let mut stderr = String::new();
    std::io::Read::read_to_string(worker.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    println!("checked: unwritable output topic: {status:?}, last line: {}", stderr.lines().last().unwrap_or_default());
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("retrying cannot fix this"), "{stderr}");
}
