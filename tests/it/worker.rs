//! `waymark run` against the real broker: end to end, SIGTERM, SIGKILL.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use waymark::state::MemoryStore;
use waymark::synth::{generate, Rng, TrafficSpec};
use waymark::{batch, Envelope};

use crate::common::*;

/// Strip the source (topic differs between the test's input and the archive).
fn without_source(mut v: serde_json::Value) -> serde_json::Value {
    v.as_object_mut().unwrap().remove("source");
    v
}

fn with_topic(envelopes: &[Envelope], topic: &str) -> Vec<Envelope> {
    envelopes
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.topic = topic.to_string();
            if e.header("carrier").is_none() {
                e.headers.push(("carrier".into(), Some(b"easypost".to_vec())));
            }
            e
        })
        .collect()
}

#[test]
fn worker_emits_each_distinct_milestone_once_like_replay_and_stops_cleanly_on_sigterm() {
    let setup = WorkerSetup::new("e2e", 1);
    let input = with_topic(&sample_envelopes(), &setup.input);
    let expected = expected_upserts(&input);
    produce(&setup.input, &input, 1);

    let mut worker = setup.spawn(None, None);
    let output = read_all(&setup.output, 1, expected.len(), Duration::from_secs(90), Duration::from_secs(3));
    let ids: Vec<String> = output.iter().map(|r| r.value["milestone_id"].as_str().unwrap().to_string()).collect();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    println!("checked: {} upserts read, {} distinct, {} expected", ids.len(), distinct.len(), expected.len());
    assert_eq!(ids.len(), distinct.len(), "a milestone was emitted twice");
    assert_eq!(distinct.into_iter().cloned().collect::<BTreeSet<_>>(), expected.keys().cloned().collect());
    for read in &output {
        let id = read.value["milestone_id"].as_str().unwrap();
        assert_eq!(without_source(read.value.clone()), without_source(expected[id].clone()));
        let key = format!("{}:{}:{}", read.value["tenant_id"].as_str().unwrap(), "easypost", read.value["tracking_number"].as_str().unwrap());
        assert_eq!(read.key.as_deref(), Some(key.as_str()), "output keyed by shipment");
    }
    // The same archive through `waymark replay` gives the same milestones.
    let replayed = std::fs::read_to_string(repo().join("replay/sample.expected.ndjson")).unwrap();
    let replay_ids: BTreeSet<String> = replayed
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["milestone_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(replay_ids, expected.keys().cloned().collect());

    let dead = read_all(&setup.dlq, 1, 1, Duration::from_secs(30), Duration::from_millis(500));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].value["error_kind"], "invalid_json");

    let (code, metrics) = http_get(setup.http_port, "/metrics").expect("metrics endpoint");
    assert_eq!(code, 200);
    assert!(metrics.contains("waymark_events_total{carrier=\"easypost\",outcome=\"duplicate_hash\"}"), "{metrics}");
    assert!(metrics.contains("waymark_dead_letter_total{carrier=\"easypost\",reason=\"invalid_json\"} 1"), "{metrics}");
    assert!(metrics.contains("waymark_dedupe_hit_ratio{carrier=\"easypost\"}"), "{metrics}");
    assert!(metrics.contains("waymark_store_lookup_seconds_bucket{op=\"scan\",keyspace=\"keys\""), "{metrics}");
    assert!(metrics.contains("waymark_process_seconds_count"), "{metrics}");
    // A lag series for every partition the worker was assigned: the input's
    // one and the repartition topic's four.
    let repartition = format!("{}-repartition", setup.group);
    for (topic, partitions) in [(setup.input.as_str(), 1), (repartition.as_str(), 4)] {
        for partition in 0..partitions {
            let series = format!("waymark_consumer_lag{{topic=\"{topic}\",partition=\"{partition}\"}}");
            assert!(metrics.contains(&series), "no {series}: {metrics}");
        }
    }
    check_against_the_catalog(&metrics);
    // Lag comes from librdkafka's statistics, every 5 s.
    let lag_seen = (0..40).any(|_| {
        std::thread::sleep(Duration::from_millis(250));
        http_get(setup.http_port, "/metrics").is_some_and(|(_, m)| m.contains("waymark_consumer_lag{topic="))
    });
    assert!(lag_seen, "no waymark_consumer_lag gauge within 10 s");
    assert_eq!(http_get(setup.http_port, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(http_get(setup.http_port, "/readyz").map(|r| r.0), Some(200));

    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(30)).expect("worker exits within 30 s of SIGTERM");
    assert!(status.success(), "SIGTERM must exit 0, got {status:?}");

    // Restarted with the same state, nothing is emitted again.
    let mut again = setup.spawn(None, None);
    std::thread::sleep(Duration::from_secs(5));
    let after = read_all(&setup.output, 1, usize::MAX, Duration::from_secs(2), Duration::ZERO);
    assert_eq!(after.len(), output.len(), "a restart re-emitted milestones");
    // Beside the running worker: a dry run opens its state read-only.
    let archive: String = input.iter().map(|e| e.to_kcat_json() + "\n").collect();
    let archive_path = setup.state_dir.with_extension("archive.ndjson");
    std::fs::write(&archive_path, &archive).unwrap();
    let dry = std::process::Command::new(waymark_bin())
        .args(["replay", "--dry-run", "--config"])
        .arg(&setup.config_path)
        .arg("--state-dir")
        .arg(&setup.state_dir)
        .arg("--input")
        .arg(&archive_path)
        .output()
        .unwrap();
    let dry_err = String::from_utf8_lossy(&dry.stderr);
    assert!(dry.status.success(), "a dry run beside the running worker failed: {dry_err}");
    assert!(dry_err.contains("milestones emitted:     0"), "{dry_err}");
    signal(&again, "TERM");
    assert!(wait_exit(&mut again, Duration::from_secs(30)).is_some_and(|s| s.success()));

    // `replay --state-dir` against the stopped worker's state (same config, so
    // the same homes): the archive of the same records is entirely known.
    let mut replay = std::process::Command::new(waymark_bin())
        .args(["replay", "--input", "-", "--config"])
        .arg(&setup.config_path)
        .arg("--state-dir")
        .arg(&setup.state_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut replay.stdin.take().unwrap(), archive.as_bytes()).unwrap();
    let out = replay.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(out.stdout.is_empty(), "replay against the worker's state re-emitted: {}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("milestones emitted:     0"), "{stderr}");
}

/// Stream size and kill count of the SIGKILL tests: CI runs ~5,300 records and 6
/// kills; `WAYMARK_FAULT_SCALE=full` runs ~100,000 records and 20 kills.
fn fault_scale() -> (usize, usize) {
    match std::env::var("WAYMARK_FAULT_SCALE").as_deref() {
        Ok("full") => (5_000, 20),
        _ => (250, 6),
    }
}

/// Produce a 2-partition stream, SIGKILL the worker at random moments (6 times,
/// or 20 at full scale), restart it each time, then check the output topic
/// (read_committed). Returns (kills, distinct, repeats).
fn sigkill_run(name: &str, extra_args: &[&str]) -> (usize, usize, usize) {
    let (shipments, max_kills) = fault_scale();
    let setup = WorkerSetup::new(name, 2);
    let mut input = Vec::new();
    for (partition, seed) in [(0, 11u64), (1, 12u64)] {
        let spec = TrafficSpec { seed, shipments, partition, topic: setup.input.clone(), ..TrafficSpec::default() };
        input.extend(generate(&spec).envelopes);
    }
    let expected = expected_upserts(&input);
    // Produced without keys: a shipment's records land on either partition.
    produce(&setup.input, &scatter(&input, 2), 2);
    println!("input: {} records (no keys), {} distinct milestones", input.len(), expected.len());

    let mut rng = Rng::new(0x5eed);
    let mut kills = 0;
    let mut worker = setup.spawn_with(None, None, extra_args);
    let count = || read_all(&setup.output, 2, usize::MAX, Duration::from_millis(300), Duration::ZERO).len();
    loop {
        // Kill only while the worker is visibly processing: once it has emitted
        // something since it (re)started, at a random moment shortly after.
        let before = count();
        if before >= expected.len() || kills >= max_kills {
            break;
        }
        let started = std::time::Instant::now();
        while count() == before && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        signal(&worker, "KILL");
        let _ = worker.wait();
        kills += 1;
        worker = setup.spawn_with(None, None, extra_args);
    }
    let output = read_all(&setup.output, 2, expected.len(), Duration::from_secs(600), Duration::from_secs(3));
    signal(&worker, "TERM");
    let _ = wait_exit(&mut worker, Duration::from_secs(30));

    let (distinct, repeats) = check_at_least_once(&output, &expected);
    println!(
        "checked: {kills} SIGKILLs, {} upserts read, {distinct} distinct, {} expected, {repeats} identical repeats",
        output.len(),
        expected.len()
    );
    assert!(kills >= 1, "the stream finished before any kill; make it longer");
    let shipments = assert_no_status_moves_back(&output);
    println!("checked: no status moved back over {shipments} shipments");
    (kills, distinct, repeats)
}

#[test]
fn worker_killed_with_sigkill_mid_stream_loses_no_milestone() {
    sigkill_run("kill9", &[]);
}

#[test]
fn exactly_once_worker_killed_with_sigkill_shows_each_milestone_once_to_read_committed() {
    let transactional_id = unique("it.eos.txn");
    let (kills, distinct, repeats) = sigkill_run("eos", &["--delivery", "exactly-once", "--transactional-id", &transactional_id]);
    assert_eq!(repeats, 0, "exactly-once: a read_committed reader saw {repeats} repeated milestones over {kills} kills");
    assert!(distinct > 0);
}

/// One crash at a failpoint between two side effects, then a clean restart.
/// Returns (distinct, repeats) as read by a read_committed consumer.
fn failpoint_run(name: &str, point: &str, extra_args: &[&str], changelog: bool) -> (usize, usize) {
    let setup = WorkerSetup::new(name, 2);
    if !changelog {
        setup.disable_changelog();
    }
    let (input, expected) = setup.traffic(31, 60);
    produce(&setup.input, &scatter(&input, 2), 2);
    // batch_size is 200 in the test config: the 2nd batch hits the failpoint.
    let mut cmd = std::process::Command::new(waymark_bin());
    cmd.arg("run").arg("--config").arg(&setup.config_path).args(extra_args);
    cmd.env("WAYMARK_FAILPOINT", format!("{point}:2")).env("WAYMARK_LOG", "warn");
    let mut crashing = cmd.stdout(std::process::Stdio::null()).spawn().unwrap();
    let status = wait_exit(&mut crashing, Duration::from_secs(60)).expect("the failpoint aborts the worker");
    assert!(!status.success(), "{point}: the worker should have died at the failpoint, got {status:?}");
    let mut worker = setup.spawn_with(None, None, extra_args);
    let output = read_all(&setup.output, 2, expected.len(), Duration::from_secs(60), Duration::from_secs(2));
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).is_some_and(|s| s.success()));
    let (distinct, repeats) = check_at_least_once(&output, &expected);
    assert_no_status_moves_back(&output);
    println!("checked: failpoint {point} {extra_args:?} changelog={changelog}: {distinct} distinct of {} expected, {repeats} identical repeats", expected.len());
    (distinct, repeats)
}

#[test]
fn a_crash_between_any_two_side_effects_loses_nothing() {
    for point in ["before_output", "after_output", "after_changelog", "after_state"] {
        failpoint_run(&format!("fp.alo.{point}"), point, &[], true);
        if point == "after_changelog" {
            // Exactly-once logs state inside the transaction: no separate point.
            continue;
        }
        let txn = unique("it.fp.txn");
        let eos = ["--delivery", "exactly-once", "--transactional-id", &txn];
        let (_, repeats) = failpoint_run(&format!("fp.eos.{point}"), point, &eos, true);
        assert_eq!(repeats, 0, "exactly-once, crash at {point}: a read_committed reader saw repeats");
        if point == "after_output" {
            // Without changelogs the store is caught up from the input instead.
            let txn = unique("it.fp.txn");
            let eos = ["--delivery", "exactly-once", "--transactional-id", &txn];
            let (_, repeats) = failpoint_run("fp.eos.local.after_output", point, &eos, false);
            assert_eq!(repeats, 0, "exactly-once without changelog, crash after commit: repeats");
        }
    }
}

/// Per shipment key, in output order, how often a milestone's status ranks below
/// the one before it. A status without a rank (exception, cancelled, unknown)
/// keeps its arrival place in a window and starts a new run, so it is skipped.
fn rank_drops(reads: &[Read]) -> usize {
    let mut ordered: Vec<&Read> = reads.iter().collect();
    ordered.sort_by_key(|r| (r.partition, r.offset));
    let mut last: BTreeMap<String, u8> = BTreeMap::new();
    let mut drops = 0;
    for read in ordered {
        let rank = waymark::Status::parse(read.value["status"].as_str().unwrap()).unwrap().rank();
        let key = read.key.clone().unwrap_or_default();
        if rank > 0 && rank < last.get(&key).copied().unwrap_or(0) {
            drops += 1;
        }
        last.insert(key, rank);
    }
    drops
}

#[test]
fn the_reorder_window_holds_uncommitted_and_emits_in_hierarchy_order() {
    let setup = WorkerSetup::new("reorder", 2);
    setup.configure("order", "reorder_window = \"6s\"\nreorder_max_records = 100000");
    let mut input = Vec::new();
    for (partition, seed) in [(0, 51u64), (1, 52u64)] {
        let spec = TrafficSpec { seed, shipments: 120, partition, topic: setup.input.clone(), ..TrafficSpec::default() };
        input.extend(generate(&spec).envelopes);
    }
    let expected = expected_upserts(&input);
    // The check below means something only if arrival order breaks hierarchy order.
    let arrival_order: Vec<Read> = {
        let output = batch::process(&waymark::Pipeline::default(), &MemoryStore::default(), &input, chrono::Utc::now(), false, None).unwrap();
        output
            .upserts
            .iter()
            .enumerate()
            .map(|(i, u)| Read { partition: 0, offset: i as i64, key: Some(u.key()), value: serde_json::to_value(u).unwrap(), headers: BTreeMap::new() })
            .collect()
    };
    let drops_without_window = rank_drops(&arrival_order);
    assert!(drops_without_window > 0, "the stream has no out-of-order deliveries to reorder");
    produce(&setup.input, &input, 2);

    // Killed while the window holds records: nothing of them may be committed.
    let mut worker = setup.spawn(None, None);
    let held = (0..200).find_map(|_| {
        std::thread::sleep(Duration::from_millis(50));
        let (_, metrics) = http_get(setup.http_port, "/metrics")?;
        let line = metrics.lines().find(|l| l.starts_with("waymark_reorder_held_records "))?;
        let n: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        (n > 0.0).then_some(n)
    });
    let held = held.expect("the worker never reported held records");
    signal(&worker, "KILL");
    let _ = worker.wait();
    let early = read_all(&setup.output, 2, usize::MAX, Duration::from_millis(500), Duration::ZERO);
    assert!(early.is_empty(), "records held by the window were emitted before it closed");

    let mut worker = setup.spawn(None, None);
    let output = read_all(&setup.output, 2, expected.len(), Duration::from_secs(90), Duration::from_secs(2));
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).is_some_and(|s| s.success()));
    let (distinct, repeats) = check_at_least_once(&output, &expected);
    let drops = rank_drops(&output);
    println!(
        "checked: SIGKILL with {held} records held, then {distinct} distinct of {} expected, {repeats} repeats; status drops per shipment: {drops} with the window, {drops_without_window} in arrival order",
        expected.len()
    );
    assert_eq!(repeats, 0);
    assert_eq!(drops, 0, "within one window, every shipment's milestones must come out in hierarchy order");
}

/// Producers compress with whatever their platform defaults to: every codec Kafka
/// knows is read, and the worker's own output can use any of them (zstd here).
#[test]
fn every_compression_codec_is_read_and_zstd_is_written() {
    let setup = WorkerSetup::new("codecs", 1);
    setup.configure("kafka.producer_properties", "\"compression.type\" = \"zstd\"");
    let (input, expected) = setup.traffic(81, 40);
    let codecs = ["gzip", "snappy", "lz4", "zstd"];
    for (codec, chunk) in codecs.iter().zip(input.chunks(input.len().div_ceil(codecs.len()))) {
        produce_with(&brokers(), &setup.input, chunk, 1, &[("compression.type", codec)]);
    }
    let mut worker = setup.spawn(None, None);
    let output = read_all(&setup.output, 1, expected.len(), Duration::from_secs(90), Duration::from_secs(2));
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).is_some_and(|s| s.success()));
    let (distinct, repeats) = check_at_least_once(&output, &expected);
    // A librdkafka built without zstd refuses `compression.type = zstd` when the
    // worker creates its producer (exit 2), so output arriving proves it writes zstd.
    println!("checked: input compressed with {codecs:?}, output with zstd: {distinct} distinct of {} expected, {repeats} repeats", expected.len());
}

/// `log.format = "json"` (or `WAYMARK_LOG_FORMAT=json`): every stderr line is one
/// JSON object; at info level no payload and no secret property value appears.
#[test]
fn json_logs_carry_no_payload_or_secret_at_info() {
    let setup = WorkerSetup::new("jsonlogs", 1);
    let mut input = with_topic(&sample_envelopes(), &setup.input);
    let marker = "PAYLOAD-MARKER-7c1e";
    let mut bad = input[0].clone();
    bad.payload = format!("{{\"{marker}\": ").into_bytes();
    input.push(bad);
    let expected = expected_upserts(&input);
    produce(&setup.input, &input, 1);
    let secret = "hunter2-b41f";
    let mut worker = std::process::Command::new(waymark_bin())
        .args(["run", "--config"])
        .arg(&setup.config_path)
        .args(["-X", &format!("sasl.username={secret}")])
        .env("WAYMARK_LOG_FORMAT", "json")
        .env("WAYMARK_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let output = read_all(&setup.output, 1, expected.len(), Duration::from_secs(90), Duration::from_secs(1));
    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(30)).expect("exits after SIGTERM");
    let mut stderr = String::new();
    std::io::Read::read_to_string(worker.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert_eq!(output.len(), expected.len());
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 3, "the worker logged almost nothing: {stderr}");
    for line in &lines {
        let record: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(record["level"].is_string() && record["fields"].is_object(), "{line}");
        assert!(!line.contains(marker), "a payload reached the log: {line}");
        assert!(!line.contains(secret), "a property value reached the log: {line}");
        // Plain values, never Rust's Debug renderings of them.
        for value in record["fields"].as_object().unwrap().values().filter_map(|v| v.as_str()) {
            assert!(!value.starts_with("Some(") && value != "None" && !value.starts_with('['), "a Debug value in a JSON log line: {line}");
        }
    }
    let assigned = lines.iter().find(|l| l.contains("\"assigned")).unwrap_or_else(|| panic!("no assignment line: {stderr}"));
    let assigned: serde_json::Value = serde_json::from_str(assigned).unwrap();
    assert!(assigned["fields"]["start"].is_number() || assigned["fields"]["start"].is_null(), "{assigned}");
    println!("checked: {} JSON log lines, plain values, no payload, no property value", lines.len());
}

/// A consumer of `group` that never joins it: reads and commits the group's
/// offsets as Kafka's own tools do.
fn group_client(group: &str) -> rdkafka::consumer::BaseConsumer {
    rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// Commit `offset` for every partition of `topics` in `group`, as
/// `kafka-consumer-groups.sh --reset-offsets --execute` does (no member active).
fn reset_group_offsets(group: &str, topics: &[(&str, i32)], offset: i64) {
    use rdkafka::consumer::{CommitMode, Consumer};
    let consumer = group_client(group);
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (topic, partitions) in topics {
        for p in 0..*partitions {
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(offset)).unwrap();
        }
    }
    consumer.commit(&tpl, CommitMode::Sync).expect("resetting the group's offsets");
}

/// Sum of a counter family's samples in a /metrics text, filtered by a label text.
fn metric_sum(metrics: &str, family: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(label))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// An operator's offset reset with Kafka's own tools is followed, not overridden
/// by the store's progress: after the repartition topic's offsets are reset to
/// the beginning, the worker reads it again (every event a duplicate now: the
/// state remembers them) and emits nothing new.
#[test]
fn a_group_offset_reset_is_followed_not_overridden_by_stored_progress() {
    let setup = WorkerSetup::new("reset", 1);
    let (input, expected) = setup.traffic(91, 30);
    produce(&setup.input, &input, 1);
    let mut worker = setup.spawn(None, None);
    let first = read_all(&setup.output, 1, expected.len(), Duration::from_secs(90), Duration::from_secs(2));
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).is_some_and(|s| s.success()));
    assert_eq!(check_at_least_once(&first, &expected).0, expected.len());

    let repartition = format!("{}-repartition", setup.group);
    reset_group_offsets(&setup.group, &[(&repartition, 4)], 0);
    let mut worker = setup.spawn(None, None);
    let events_routed: f64 = expected.len() as f64;
    let reread = (0..120).find_map(|_| {
        std::thread::sleep(Duration::from_millis(250));
        let (_, metrics) = http_get(setup.http_port, "/metrics")?;
        let duplicates = metric_sum(&metrics, "waymark_events_total", "outcome=\"duplicate_hash\"");
        (duplicates >= events_routed).then_some(duplicates)
    });
    let after = read_all(&setup.output, 1, usize::MAX, Duration::from_secs(2), Duration::ZERO);
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).is_some_and(|s| s.success()));
    let reread = reread.expect("after the reset the worker must read the repartition topic again from its beginning");
    println!("checked: offset reset followed: {reread} events re-read as duplicates, {} new upserts", after.len() - first.len());
    assert_eq!(after.len(), first.len(), "re-read events are duplicates: nothing new may be emitted");
}

/// `replay --to-topic`: the archive's upserts on a Kafka topic, with the keys,
/// headers and values the worker would write (the sample's expected timeline).
#[test]
fn replay_to_a_topic_writes_what_the_worker_writes() {
    replay_to_topic(&[]);
}

/// The same in a transaction per batch: a read_committed reader sees it whole.
#[test]
fn replay_to_a_topic_in_transactions_writes_what_the_worker_writes() {
    replay_to_topic(&["--transactional-id", &unique("it.replay.txn")]);
}

fn replay_to_topic(extra: &[&str]) {
    let setup = WorkerSetup::new("replay-to-topic", 1);
    let out = std::process::Command::new(waymark_bin())
        .args(["replay", "--input", "replay/sample.ndjson", "--config"])
        .arg(&setup.config_path)
        .args(["--to-topic", &setup.output])
        .args(extra)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected: Vec<serde_json::Value> = std::fs::read_to_string(repo().join("replay/sample.expected.ndjson"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let output = read_all(&setup.output, 1, expected.len(), Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(output.iter().map(|r| r.value.clone()).collect::<Vec<_>>(), expected, "the topic holds the expected timeline, in order");
    for read in &output {
        let value = &read.value;
        let key = format!("{}:{}:{}", value["tenant_id"].as_str().unwrap(), value["carrier"].as_str().unwrap(), value["tracking_number"].as_str().unwrap());
        assert_eq!(read.key.as_deref(), Some(key.as_str()));
        assert_eq!(read.headers.get("milestone-id").map(String::as_str), value["milestone_id"].as_str());
    }
    let dead = read_all(&setup.dlq, 1, 1, Duration::from_secs(20), Duration::from_millis(500));
    assert_eq!(dead.len(), 1, "the sample's truncated body is a dead letter on the dead-letter topic");
    println!("checked: replay --to-topic wrote {} upserts and {} dead letter", output.len(), dead.len());
}

/// `replay --from-topic`: a topic's retained history through the pipeline, with
/// no group of its own (the live group is untouched), bounded by --since/--until.
#[test]
fn replay_from_a_topic_reads_its_history_within_the_range() {
    let setup = WorkerSetup::new("replay-from-topic", 2);
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    let input = with_topic(&sample_envelopes(), &setup.input);
    produce(&setup.input, &input, 2);
    let after = chrono::Utc::now() + chrono::Duration::seconds(5);
    let replay = |extra: &[&str]| {
        let out = std::process::Command::new(waymark_bin())
            .args(["replay", "--from-topic", &setup.input, "--config"])
            .arg(&setup.config_path)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let expected: Vec<serde_json::Value> = std::fs::read_to_string(repo().join("replay/sample.expected.ndjson"))
        .unwrap()
        .lines()
        .map(|l| without_source(serde_json::from_str(l).unwrap()))
        .collect();
    let all = replay(&[]);
    let mut got: Vec<serde_json::Value> = all.lines().map(|l| without_source(serde_json::from_str(l).unwrap())).collect();
    let mut want = expected.clone();
    let id = |v: &serde_json::Value| v["milestone_id"].as_str().unwrap().to_string();
    got.sort_by_key(id);
    want.sort_by_key(id);
    assert_eq!(got.iter().map(id).collect::<Vec<_>>(), want.iter().map(id).collect::<Vec<_>>(), "every milestone of the topic's history");
    let since = replay(&["--since", &before.to_rfc3339()]);
    assert_eq!(since.lines().count(), expected.len(), "--since before the records: all of them");
    let none = replay(&["--until", &before.to_rfc3339()]);
    assert!(none.is_empty(), "--until before the records: none of them");
    let later = replay(&["--since", &after.to_rfc3339()]);
    assert!(later.is_empty(), "--since after the records: none of them");
    // Resumable: with a state directory, a second run continues after the first.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    assert_eq!(replay(&["--state-dir", state]).lines().count(), expected.len());
    let records_read = |extra: &[&str]| {
        let out = std::process::Command::new(waymark_bin())
            .args(["replay", "--from-topic", &setup.input, "--config"])
            .arg(&setup.config_path)
            .args(["--state-dir", state])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success() && out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stderr.lines().find_map(|l| l.strip_prefix("records read:")).map(|n| n.trim().to_string()).unwrap_or_default()
    };
    assert_eq!(records_read(&[]), "0", "a second run resumes after what the first committed");
    assert_eq!(records_read(&["--from-start"]), input.len().to_string(), "--from-start reads the range again (all duplicates)");
    println!("checked: replay --from-topic read {} milestones; --since/--until bound the range", got.len());
}

/// The documented backfill: with the worker running, `waymark produce` puts an
/// archive on the input topic; what the worker has seen comes out as duplicates,
/// only what is new becomes milestones.
#[test]
fn a_backfill_through_the_input_topic_emits_only_what_is_new() {
    let setup = WorkerSetup::new("backfill", 1);
    let spec = TrafficSpec { seed: 101, shipments: 30, topic: setup.input.clone(), ..TrafficSpec::default() };
    let live = generate(&spec).envelopes;
    let first_half = &live[..live.len() / 2];
    let expected_first = expected_upserts(first_half);
    let expected_all = expected_upserts(&live);
    produce(&setup.input, first_half, 1);
    let mut worker = setup.spawn(None, None);
    let _ = read_all(&setup.output, 1, expected_first.len(), Duration::from_secs(60), Duration::from_secs(1));
    // The backfill archive: everything, the half the worker saw included.
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("backfill.ndjson");
    std::fs::write(&archive, live.iter().map(|e| e.to_kcat_json() + "\n").collect::<String>()).unwrap();
    let out = std::process::Command::new(waymark_bin())
        .args(["produce", "--brokers", &brokers(), "--topic", &setup.input, "--input"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let output = read_all(&setup.output, 1, expected_all.len(), Duration::from_secs(90), Duration::from_secs(2));
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).is_some_and(|s| s.success()));
    let (distinct, repeats) = check_at_least_once(&output, &expected_all);
    println!("checked: backfill of {} records over {} already seen: {distinct} distinct milestones, {repeats} repeats", live.len(), first_half.len());
    assert_eq!(repeats, 0, "the backfill re-emitted milestones the worker had already emitted");
}

/// State entries (dedupe keys, hashes, shipments; not the bookkeeping of
/// offsets) a state directory holds for one partition (`waymark state export`).
fn exported_entries(state_dir: &std::path::Path, topic: &str, partition: i32) -> usize {
    let out = std::process::Command::new(waymark_bin())
        .args(["state", "export", "--state-dir"])
        .arg(state_dir)
        .args(["--topic", topic, "--partition", &partition.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "state export: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["keyspace"] != "offsets")
        .count()
}

#[test]
fn a_dropped_partition_is_not_brought_back_by_its_changelog() {
    let setup = WorkerSetup::new("drop", 2);
    let (input, expected) = setup.traffic(61, 60);
    produce(&setup.input, &input, 2);
    let mut worker = setup.spawn(None, None);
    read_all(&setup.output, 2, expected.len(), Duration::from_secs(90), Duration::from_secs(1));
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).is_some_and(|s| s.success()));
    let homes = format!("{}-repartition", setup.group);
    let before: Vec<usize> = (0..4).map(|p| exported_entries(&setup.state_dir, &homes, p)).collect();
    assert!(before.iter().all(|n| *n > 0), "every home should hold state: {before:?}");

    // Drop home 0 with the group stopped: a marker goes to its changelog.
    let out = std::process::Command::new(waymark_bin())
        .args(["state", "drop", "--config"])
        .arg(&setup.config_path)
        .arg("--state-dir")
        .arg(&setup.state_dir)
        .args(["--topic", &homes, "--partition", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "state drop: {stderr}");
    assert!(stderr.contains("wrote a drop marker to"), "{stderr}");
    assert_eq!(exported_entries(&setup.state_dir, &homes, 0), 0);

    // The same directory after a restart, and a new instance's empty directory:
    // both restore every home from the changelog except the dropped one.
    restore_and_stop(&setup, &setup.state_dir);
    let other = setup.state_dir.with_extension("other");
    restore_and_stop(&setup, &other);
    for dir in [&setup.state_dir, &other] {
        let after: Vec<usize> = (0..4).map(|p| exported_entries(dir, &homes, p)).collect();
        println!("checked: {} entries per home before the drop {before:?}, after a restore {after:?}", dir.display());
        assert_eq!(after[0], 0, "the changelog brought the dropped home back in {}", dir.display());
        assert!(after[1..].iter().zip(&before[1..]).all(|(a, b)| a >= b), "other homes must be restored: {after:?} vs {before:?}");
    }
}

/// `waymark run` (with `extra`) and `WAYMARK_FAILPOINT=failpoint`, its log (at
/// `log_filter`) written to a file named `log_name` beside the state directory.
fn spawn_armed(setup: &WorkerSetup, extra: &[&str], failpoint: &str, log_filter: &str, log_name: &str) -> (std::process::Child, std::path::PathBuf) {
    let log = setup.state_dir.with_extension(log_name);
    let mut cmd = std::process::Command::new(waymark_bin());
    cmd.arg("run").arg("--config").arg(&setup.config_path).args(extra);
    cmd.env("WAYMARK_FAILPOINT", failpoint).env("WAYMARK_LOG", log_filter);
    cmd.stdout(std::process::Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
    (cmd.spawn().unwrap(), log)
}

/// A member that stops polling while a batch is in flight, for longer than
/// `max.poll.interval.ms`, has been replaced when it wakes up. In at-least-once
/// mode it must not log the batch's state to the changelog (the new owner may
/// have logged newer state, which an older value would override); in
/// exactly-once mode its transaction's offset commit is refused for good
/// (unknown member), and retrying without polling would never rejoin. Either way
/// it abandons the batch, gets its partitions back through a rebalance and
/// carries on: everything is delivered, no status moves back, and exactly-once
/// shows a read_committed reader no repeat.
fn stalled_member_run(name: &str, pause_at: &str, extra: &[&str]) -> (usize, usize) {
    let setup = WorkerSetup::new(name, 2);
    setup.configure("kafka.consumer_properties", "\"max.poll.interval.ms\" = \"7000\"");
    let (input, expected) = setup.traffic(71, 150);
    produce(&setup.input, &scatter(&input, 2), 2);
    // The 2nd batch reaches `pause_at`, then the worker stalls for 12 s.
    let (mut worker, log) = spawn_armed(&setup, extra, &format!("{pause_at}:2:pause=12"), "warn", "stalled.log");
    let output = read_all(&setup.output, 2, expected.len(), Duration::from_secs(120), Duration::from_secs(2));
    let running = worker.try_wait().ok().flatten().is_none();
    if running {
        signal(&worker, "TERM");
    }
    let status = wait_exit(&mut worker, Duration::from_secs(30));
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(stderr.contains(&format!("failpoint {pause_at} reached, pausing")), "{stderr}");
    assert!(stderr.contains("lost its partitions while a batch was in flight"), "the stalled member did not notice it was replaced: {stderr}");
    assert!(running, "the stalled member exited instead of rejoining: {status:?}\n{stderr}");
    assert!(status.is_some_and(|s| s.success()), "SIGTERM must still exit 0: {status:?}\n{stderr}");
    assert_no_status_moves_back(&output);
    check_at_least_once(&output, &expected)
}

#[test]
fn a_member_replaced_while_its_batch_was_in_flight_abandons_the_batchs_state() {
    let (distinct, repeats) = stalled_member_run("fence", "after_output", &[]);
    println!("checked: the stalled member abandoned its batch's state; {distinct} distinct milestones, {repeats} identical repeats");
}

#[test]
fn an_exactly_once_member_replaced_while_its_transaction_was_open_abandons_the_batch() {
    let txn = unique("it.fence-eos.txn");
    let (distinct, repeats) = stalled_member_run("fence-eos", "before_output", &["--delivery", "exactly-once", "--transactional-id", &txn]);
    assert_eq!(repeats, 0, "exactly-once: a read_committed reader saw {repeats} repeated milestones");
    println!("checked: the stalled exactly-once member abandoned its batch and rejoined; {distinct} distinct milestones, no repeat");
}

/// The shipment states of a state directory (`state export`), key -> value (hex).
fn shipment_states(state_dir: &std::path::Path) -> BTreeMap<String, String> {
    let out = std::process::Command::new(waymark_bin()).args(["state", "export", "--state-dir"]).arg(state_dir).output().unwrap();
    assert!(out.status.success(), "state export: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|entry| entry["keyspace"] == "shipments")
        .map(|entry| (entry["key"].as_str().unwrap().to_string(), entry["value"].as_str().unwrap().to_string()))
        .collect()
}

/// A late writer: member A stalls in the middle of a batch (at-least-once: its
/// ownership check passed, its state changes are about to be logged;
/// exactly-once: its transaction is about to begin), for longer than
/// `max.poll.interval.ms`. B joins, takes the partitions over, processes the
/// rest of the stream (newer states of the same shipments) and logs them. When A
/// wakes up, whatever it appends to the changelog lands after B's writes and
/// would win every later restore (statuses that move back, dedupe keys that go
/// missing); and retrying a commit the group refuses, without polling, would
/// never end. A must be fenced, abandon the batch and rejoin; a new instance
/// restoring from the changelog must end with exactly B's shipment states.
fn late_writer_run(name: &str, pause_at: &str, extra: &[&str]) {
    let setup = WorkerSetup::new(name, 2);
    setup.configure("kafka.consumer_properties", "\"max.poll.interval.ms\" = \"7000\"");
    let config = std::fs::read_to_string(&setup.config_path).unwrap();
    std::fs::write(&setup.config_path, config.replace("batch_size = 200", "batch_size = 20")).unwrap();
    let (input, expected) = setup.traffic(79, 120);
    produce(&setup.input, &scatter(&input, 2), 2);
    // A: its 3rd batch stalls for 40 s at `pause_at`. (Each instance has its
    // own state directory, so its own default transactional id.)
    let pause = Duration::from_secs(40);
    let (mut a, a_log) = spawn_armed(&setup, extra, &format!("{pause_at}:3:pause={}", pause.as_secs()), "warn,waymark=info", "a.log");
    let reached = (0..240).any(|_| {
        std::thread::sleep(Duration::from_millis(250));
        a.try_wait().ok().flatten().is_none()
            && std::fs::read_to_string(&a_log).unwrap_or_default().contains(&format!("failpoint {pause_at} reached, pausing"))
    });
    assert!(reached, "A never reached the failpoint: {}", std::fs::read_to_string(&a_log).unwrap_or_default());
    let stalled = std::time::Instant::now();
    // B joins; once A has been away for max.poll.interval.ms, B owns everything.
    let b_dir = setup.state_dir.with_extension("b");
    let mut b = setup.spawn_with(Some(&b_dir), Some(free_port()), extra);
    let output = read_all(&setup.output, 2, expected.len(), Duration::from_secs(120), Duration::from_secs(2));
    let (_, repeats) = check_at_least_once(&output, &expected);
    if !extra.is_empty() {
        assert_eq!(repeats, 0, "exactly-once: a read_committed reader saw {repeats} repeated milestones");
    }
    signal(&b, "TERM");
    assert!(wait_exit(&mut b, Duration::from_secs(30)).is_some_and(|s| s.success()), "B did not stop cleanly");
    assert!(
        stalled.elapsed() < pause,
        "B needed {:?} to take over and finish, longer than A's stall: nothing to judge; raise the pause",
        stalled.elapsed()
    );
    let new_owner = shipment_states(&b_dir);
    // A wakes up, finishes (or abandons) its batch and polls again, which
    // takes its partitions back: the first assignment after the stall.
    let resumed = (0..(pause.as_secs() * 4 + 240)).any(|_| {
        std::thread::sleep(Duration::from_millis(250));
        let log = std::fs::read_to_string(&a_log).unwrap_or_default();
        log.split_once("pausing").is_some_and(|(_, after)| after.contains("assigned;"))
    });
    signal(&a, "TERM");
    let status = wait_exit(&mut a, Duration::from_secs(30));
    let a_stderr = std::fs::read_to_string(&a_log).unwrap_or_default();
    assert!(resumed, "A never took partitions again after its stall: {a_stderr}");
    assert!(status.is_some_and(|s| s.success()), "A must still stop cleanly: {status:?}\n{a_stderr}");
    // C restores every home from the changelog into an empty directory.
    let c_dir = setup.state_dir.with_extension("c");
    restore_and_stop_with(&setup, &c_dir, extra);
    let restored = shipment_states(&c_dir);
    assert!(!new_owner.is_empty(), "B holds no shipment state");
    let stale: Vec<&String> = new_owner.keys().filter(|key| restored.get(*key) != new_owner.get(*key)).collect();
    assert!(
        stale.is_empty(),
        "{} of {} shipments restore to a state other than the new owner's: the replaced member's changelog write landed after B's\n{a_stderr}",
        stale.len(),
        new_owner.len()
    );
    assert!(a_stderr.contains("lost its partitions while a batch was in flight"), "A should have abandoned its batch: {a_stderr}");
    println!("checked: {} shipment states restore exactly as the new owner left them; the replaced member was fenced and rejoined", new_owner.len());
}

#[test]
fn a_replaced_member_cannot_log_state_after_the_new_owner() {
    late_writer_run("zombie", "before_changelog", &[]);
}

#[test]
fn a_replaced_exactly_once_member_is_fenced_and_rejoins() {
    late_writer_run("zombie-eos", "before_output", &["--delivery", "exactly-once"]);
}

/// Records the group has not committed: for every partition of `topics`, its
/// log end minus the group's committed offset (none committed counts from 0).
fn group_lag(group: &str, topics: &[(&str, i32)]) -> i64 {
    use rdkafka::consumer::Consumer;
    let consumer = group_client(group);
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (topic, partitions) in topics {
        for p in 0..*partitions {
            tpl.add_partition(topic, p);
        }
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).expect("reading the group's committed offsets");
    committed
        .elements()
        .iter()
        .map(|e| {
            let (_, end) = consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10)).expect("reading a log end");
            let done = match e.offset() {
                rdkafka::Offset::Offset(n) => n,
                _ => 0,
            };
            end - done
        })
        .sum()
}

/// While a group rebalances, per-batch offset commits fail ("Specified group
/// generation id is not valid"); if traffic then stops, no later batch commits
/// again, and the group's lag stays above zero for good although everything was
/// processed (lag alerts fire, whoever gets the partitions next re-processes
/// them). Here every per-batch commit fails (a failpoint): once the worker is
/// idle it must hand the group its offsets anyway, without new input.
#[test]
fn offsets_whose_batch_commits_failed_are_committed_once_the_worker_is_idle() {
    let setup = WorkerSetup::new("stale", 2);
    let (input, expected) = setup.traffic(73, 60);
    produce(&setup.input, &scatter(&input, 2), 2);
    let (mut worker, log) = spawn_armed(&setup, &[], "batch_offset_commit:1:fail", "warn", "commits.log");
    let output = read_all(&setup.output, 2, expected.len(), Duration::from_secs(120), Duration::from_secs(2));
    let repartition = format!("{}-repartition", setup.group);
    let topics = [(setup.input.as_str(), 2), (repartition.as_str(), 4)];
    // No new input from here on; the worker's idle re-commit runs every 5 s.
    let mut lag = group_lag(&setup.group, &topics);
    for _ in 0..60 {
        if lag == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        lag = group_lag(&setup.group, &topics);
    }
    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(30));
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(stderr.contains("offset commit failed (WAYMARK_FAILPOINT)"), "the failpoint never fired: {stderr}");
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{stderr}");
    let (distinct, _) = check_at_least_once(&output, &expected);
    assert_eq!(lag, 0, "30 s after the last record the group still lags by {lag} records: failed batch commits were never retried");
    println!("checked: every per-batch commit failed; {distinct} milestones delivered and the idle worker brought the group's lag to 0");
}

/// What a live worker exports matches `telemetry::CATALOG`: every family has
/// its help text and the catalog's type (histograms are histograms, not
/// summaries), and every counter without labels is there from the start.
fn check_against_the_catalog(metrics: &str) {
    use waymark::telemetry::{Kind, CATALOG};
    for metric in CATALOG {
        let kind = match metric.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        };
        let typed = metrics.lines().find(|l| l.starts_with(&format!("# TYPE {} ", metric.name)));
        if let Some(line) = typed {
            assert_eq!(line, format!("# TYPE {} {kind}", metric.name), "{metrics}");
            assert!(metrics.contains(&format!("# HELP {} ", metric.name)), "no help text for {}: {metrics}", metric.name);
        }
        if metric.kind == Kind::Counter && metric.labels.is_empty() {
            assert!(typed.is_some() && metrics.lines().any(|l| l.starts_with(&format!("{} ", metric.name))), "{} is not exported from the start: {metrics}", metric.name);
        }
    }
    // A partition's restore ran: its time is a histogram with buckets.
    assert!(metrics.contains("waymark_changelog_restore_seconds_bucket{le="), "{metrics}");
}
