//! Fail-overs without a crash and nothing skipped without a word, on the real
//! broker: a restore that meets a dead member's open transaction, an exactly-once
//! worker left idle, topics deleted and re-created under a worker, internal
//! topics whose retention must follow the configuration, a missing input topic,
//! a long restore, and `state drop` beside a running group.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::common::*;

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("admin client")
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

fn delete_topic(topic: &str) {
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in block_on(admin().delete_topics(&[topic], &options)).expect("delete_topics") {
        result.unwrap_or_else(|(t, e)| panic!("deleting {t}: {e}"));
    }
    // Deletion is asynchronous on the broker: wait until the name is free.
    let probe: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let gone = (0..120).any(|_| {
        std::thread::sleep(Duration::from_millis(250));
        probe
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .is_ok_and(|m| m.topics().iter().all(|t| t.name() != topic || t.error().is_some()))
    });
    assert!(gone, "topic {topic} still exists 30 s after its deletion");
}

fn topic_config(topic: &str, name: &str) -> Option<String> {
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let resources = block_on(admin().describe_configs([&ResourceSpecifier::Topic(topic)], &options)).ok()?;
    resources.into_iter().next()?.ok()?.get(name).and_then(|e| e.value.clone())
}

/// The worker must still be running: otherwise fail with the tail of its log.
fn still_running(worker: &mut std::process::Child, log: &std::path::Path) {
    if let Some(status) = worker.try_wait().unwrap() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        panic!("the worker exited by itself ({status:?}); its log ends with:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
}

/// `waymark run` with its log in a file beside the state directory.
fn spawn_logged(setup: &WorkerSetup, name: &str, extra: &[&str]) -> (std::process::Child, std::path::PathBuf) {
    spawn_logged_with(setup, name, extra, &[])
}

/// [`spawn_logged`] with extra environment variables (a failpoint, say).
fn spawn_logged_with(setup: &WorkerSetup, name: &str, extra: &[&str], envs: &[(&str, &str)]) -> (std::process::Child, std::path::PathBuf) {
    let log = setup.state_dir.with_extension(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let worker = std::process::Command::new(waymark_bin())
        .args(["run", "--config"])
        .arg(&setup.config_path)
        .args(extra)
        .envs(envs.iter().copied())
        .env("WAYMARK_LOG", "warn,waymark=info")
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn waymark run");
    (worker, log)
}

fn stop(mut worker: std::process::Child) {
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).is_some_and(|s| s.success()), "SIGTERM must exit 0");
}

fn metric_sum(metrics: &str, family: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// A member that died between the offsets and
/// the commit of its transaction leaves the offsets of a home "unstable" until
/// the broker aborts that transaction. librdkafka fetches the committed offsets
/// of a whole assignment in one request and starts none of its partitions while
/// any is unstable, so the survivor's seek of a home it had already restored
/// failed with "Local: Erroneous state", which stopped it (exit 1). Now the
/// survivor processes the other homes, waits for that one, and never exits.
#[test]
fn a_restore_waits_for_a_dead_members_open_transaction_instead_of_crashing() {
    let setup = WorkerSetup::new("opentxn", 1);
    setup.configure("kafka", "delivery = \"exactly-once\"");
    let repartition = format!("{}-repartition", setup.group);
    // A first run gives every home a committed offset, so the next run seeks
    // each home it restores to it.
    let (before, before_expected) = setup.traffic(302, 40);
    produce(&setup.input, &before, 1);
    let (worker, _) = spawn_logged(&setup, "opentxn-1", &[]);
    read_all(&setup.output, 1, before_expected.len(), Duration::from_secs(90), Duration::from_secs(1));
    stop(worker);
    // The dead member: offsets for home 0 (the first to restore) sent in a
    // transaction never committed.
    let zombie: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", unique("zombie"))
        .set("transaction.timeout.ms", "15000")
        .create()
        .unwrap();
    zombie.init_transactions(Duration::from_secs(30)).unwrap();
    zombie.begin_transaction().unwrap();
    let member: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).set("group.id", &setup.group).create().unwrap();
    let mut offsets = TopicPartitionList::new();
    offsets.add_partition_offset(&repartition, 0, Offset::Offset(0)).unwrap();
    zombie.send_offsets_to_transaction(&offsets, &member.group_metadata().unwrap(), Duration::from_secs(30)).unwrap();

    let (input, _) = setup.traffic(303, 80);
    produce(&setup.input, &input, 1);
    let expected = expected_upserts(&[before, input].concat());
    let (mut worker, log) = spawn_logged(&setup, "opentxn-2", &[]);
    let output = read_all(&setup.output, 1, expected.len(), Duration::from_secs(120), Duration::from_secs(2));
    still_running(&mut worker, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("cannot restore the partition's state"), "{text}");
    let (distinct, repeats) = check_at_least_once(&output, &expected);
    assert_eq!(repeats, 0, "exactly-once: no milestone twice");
    stop(worker);
    drop(zombie);
    println!("checked: {distinct} milestones, the worker waited for the open transaction on home 0 and kept running");
}

/// Produce `envelopes` to partition 0 of `topic` inside one Kafka transaction
/// (as Kafka Connect, Streams or Flink upstreams do): the topic's last offset
/// is then a commit marker, not a record.
fn produce_in_a_transaction(topic: &str, envelopes: &[waymark::Envelope]) {
    use rdkafka::message::{Header, OwnedHeaders};
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", unique("upstream"))
        .create()
        .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    producer.begin_transaction().unwrap();
    for e in envelopes {
        let mut headers = OwnedHeaders::new();
        for (name, value) in &e.headers {
            headers = headers.insert(Header { key: name, value: value.as_deref() });
        }
        let mut record = BaseRecord::<[u8], [u8]>::to(topic).partition(0).payload(&e.payload[..]).headers(headers);
        if let Some(key) = &e.key {
            record = record.key(&key[..]);
        }
        send_retrying(&producer, record);
    }
    producer.commit_transaction(Duration::from_secs(30)).unwrap();
}

/// Liveness read librdkafka's `consumer_lag`,
/// counted from the consumer's own commits. In exactly-once mode the consumer
/// never commits itself (offsets go in transactions), so it never returned to
/// 0; on a topic written in transactions the last commit marker left it at 1
/// at best. An idle worker then failed /healthz after `worker.stall_timeout`
/// (a restart loop at night). Lag is now counted from the consumer's position.
fn idle_run(name: &str, exactly_once: bool, transactional_input: bool) {
    let setup = WorkerSetup::new(name, 1);
    if exactly_once {
        setup.configure("kafka", "delivery = \"exactly-once\"");
    }
    setup.configure("worker", "stall_timeout = \"10s\"");
    let (input, expected) = setup.traffic(404, 40);
    let (first, second) = input.split_at(input.len() * 4 / 5);
    let send = |records: &[waymark::Envelope]| {
        if transactional_input {
            produce_in_a_transaction(&setup.input, records)
        } else {
            produce(&setup.input, records, 1)
        }
    };
    send(first);
    let (worker, _) = spawn_logged(&setup, &format!("{name}-1"), &[]);
    read_all(&setup.output, 1, expected_upserts(first).len(), Duration::from_secs(90), Duration::from_secs(1));
    stop(worker);
    // Restarted: the assignment now starts at committed offsets behind commit markers.
    let (mut worker, log) = spawn_logged(&setup, &format!("{name}-2"), &[]);
    send(second);
    let output = read_all(&setup.output, 1, expected.len(), Duration::from_secs(90), Duration::from_secs(1));
    check_at_least_once(&output, &expected);
    // Idle for twice the stall timeout (statistics come every 5 s).
    std::thread::sleep(Duration::from_secs(22));
    still_running(&mut worker, &log);
    let (code, body) = http_get(setup.http_port, "/healthz").expect("healthz");
    let (_, metrics) = http_get(setup.http_port, "/metrics").expect("metrics");
    let lag = metric_sum(&metrics, "waymark_consumer_lag");
    stop(worker);
    assert_eq!(code, 200, "an idle worker failed liveness: {body}");
    assert!(metrics.contains("waymark_consumer_lag{"), "no lag series: {metrics}");
    assert_eq!(lag, 0.0, "everything is read, yet the lag says {lag}");
    println!("checked: idle worker (exactly-once {exactly_once}, transactional input {transactional_input}): /healthz 200, waymark_consumer_lag 0");
}

#[test]
fn an_idle_exactly_once_worker_stays_live_with_no_lag() {
    idle_run("idle-eos", true, false);
}

#[test]
fn an_idle_worker_reading_a_transactional_topic_stays_live_with_no_lag() {
    idle_run("idle-txn-input", false, true);
}

/// The lag liveness read was only refreshed
/// while the worker thread polled, and a delivery that never finished did not
/// count at all while nothing new arrived: the worker thread kept polling
/// (nothing to read, lag 0), the batch stayed in delivery, and /healthz said
/// 200 forever. Here the delivery thread stalls for 40 s before its outputs
/// (a failpoint: to the worker thread that is a broker that never
/// acknowledges): /healthz must fail within the 10 s stall timeout, and the
/// worker goes on by itself afterwards, having lost nothing.
#[test]
fn a_delivery_that_does_not_finish_fails_liveness_until_it_does() {
    let setup = WorkerSetup::new("stuck", 1);
    setup.configure("worker", "stall_timeout = \"10s\"");
    let (input, expected) = setup.traffic(606, 30);
    produce(&setup.input, &input, 1);
    let (mut worker, log) = spawn_logged_with(&setup, "stuck", &[], &[("WAYMARK_FAILPOINT", "before_output:1:pause=40")]);
    let started = Instant::now();
    let mut stuck = None;
    while started.elapsed() < Duration::from_secs(35) && stuck.is_none() {
        std::thread::sleep(Duration::from_millis(500));
        stuck = http_get(setup.http_port, "/healthz").filter(|(code, _)| *code == 503).map(|(_, body)| body);
    }
    let body = stuck.unwrap_or_else(|| panic!("/healthz stayed 200 while a delivery did not finish\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
    assert!(body.starts_with("stuck"), "{body}");
    let output = read_all(&setup.output, 1, expected.len(), Duration::from_secs(120), Duration::from_secs(1));
    still_running(&mut worker, &log);
    check_at_least_once(&output, &expected);
    let live = eventually(Duration::from_secs(20), Duration::from_millis(500), || http_get(setup.http_port, "/healthz").is_some_and(|(code, _)| code == 200));
    stop(worker);
    assert!(live, "the worker must be live again once its deliveries go through");
    println!("checked: /healthz 503 ({}) while a delivery did not finish, 200 and nothing lost after", body.trim());
}

/// Deleting a topic deletes the group's offsets
/// for it, and the store's progress then pointed past the end of the re-created
/// topic. librdkafka reset to its start, and every record below the old
/// progress was skipped as "processed" (routed events lost without a word).
/// Now the worker sees that the log ends below its progress and reads the new
/// topic from its start, with an error line and `waymark_topic_recreated_total`.
#[test]
fn a_re_created_repartition_topic_is_read_from_its_start() {
    let setup = WorkerSetup::new("recreated", 1);
    let (input, expected) = setup.traffic(505, 60);
    produce(&setup.input, &input, 1);
    let (worker, _) = spawn_logged(&setup, "recreated-1", &[]);
    read_all(&setup.output, 1, expected.len(), Duration::from_secs(90), Duration::from_secs(1));
    stop(worker);

    // Purged by an operator; the worker re-creates it when it starts.
    delete_topic(&format!("{}-repartition", setup.group));
    let (mut worker, log) = spawn_logged(&setup, "recreated-2", &[]);
    // New shipments, fewer records than the old topic's per home: every one of
    // them lies below the old progress.
    let (more, more_expected) = setup.traffic(506, 15);
    assert!(more_expected.keys().all(|id| !expected.contains_key(id)));
    produce(&setup.input, &more, 1);
    let output = read_all(&setup.output, 1, expected.len() + more_expected.len(), Duration::from_secs(90), Duration::from_secs(2));
    still_running(&mut worker, &log);
    let got: std::collections::BTreeSet<&str> = output.iter().filter_map(|r| r.value["milestone_id"].as_str()).collect();
    let lost: Vec<&String> = more_expected.keys().filter(|id| !got.contains(id.as_str())).collect();
    let (_, metrics) = http_get(setup.http_port, "/metrics").expect("metrics");
    stop(worker);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(lost.is_empty(), "{} of {} milestones after the re-creation were never emitted\n{text}", lost.len(), more_expected.len());
    assert!(metric_sum(&metrics, "waymark_topic_recreated_total") >= 1.0, "the re-creation must be counted: {metrics}");
    assert!(text.contains("deleted and re-created"), "the re-creation must be logged: {text}");
    println!("checked: {} milestones after the repartition topic was re-created, none skipped", more_expected.len());
}

/// An input topic deleted and re-created under a running
/// worker had its first records skipped (they lay below the progress reached on
/// the old topic). Every milestone of the new topic must come out.
#[test]
fn an_input_topic_re_created_under_a_running_worker_loses_nothing() {
    let setup = WorkerSetup::new("recreated-input", 1);
    let (input, expected) = setup.traffic(507, 50);
    produce(&setup.input, &input, 1);
    let (mut worker, log) = spawn_logged(&setup, "recreated-input", &[]);
    read_all(&setup.output, 1, expected.len(), Duration::from_secs(90), Duration::from_secs(1));
    delete_topic(&setup.input);
    create_topics(&[&setup.input], 1);
    let (more, more_expected) = setup.traffic(508, 12);
    produce(&setup.input, &more, 1);
    let output = read_all(&setup.output, 1, expected.len() + more_expected.len(), Duration::from_secs(120), Duration::from_secs(2));
    still_running(&mut worker, &log);
    stop(worker);
    let got: std::collections::BTreeSet<&str> = output.iter().filter_map(|r| r.value["milestone_id"].as_str()).collect();
    let lost = more_expected.keys().filter(|id| !got.contains(id.as_str())).count();
    assert_eq!(lost, 0, "{lost} of {} milestones of the re-created input topic were never emitted", more_expected.len());
    println!("checked: an input topic re-created under the running worker: {} milestones, none lost", more_expected.len());
}

/// The changelog's and the repartition topic's
/// retention were set only when the worker created them. A TTL raised later
/// left live dedupe keys to be deleted from the changelog (a hand-over then
/// re-emits their events). Now both follow the configuration on every start,
/// and whatever else the topic is configured with stays.
#[test]
fn internal_topics_retention_follows_the_configuration_on_every_start() {
    let setup = WorkerSetup::new("retention", 1);
    setup.configure("dedupe", "ttl = \"1d\"");
    produce(&setup.input, &sample_envelopes(), 1);
    restore_and_stop(&setup, &setup.state_dir);
    let changelog = format!("{}-repartition-changelog", setup.group);
    let repartition = format!("{}-repartition", setup.group);
    let day = 86_400_000i64;
    assert_eq!(topic_config(&changelog, "retention.ms"), Some((2 * day).to_string()), "TTL plus a day at creation");

    let text = std::fs::read_to_string(&setup.config_path).unwrap().replace("ttl = \"1d\"", "ttl = \"30d\"");
    std::fs::write(&setup.config_path, text).unwrap();
    setup.configure("routing", "retention = \"10d\"");
    restore_and_stop(&setup, &setup.state_dir);
    assert_eq!(topic_config(&changelog, "retention.ms"), Some((31 * day).to_string()), "the raised TTL must raise the changelog's retention");
    assert_eq!(topic_config(&changelog, "cleanup.policy").as_deref(), Some("compact,delete"), "the other settings stay");
    assert_eq!(topic_config(&repartition, "retention.ms"), Some((10 * day).to_string()));
    println!("checked: changelog retention 2d -> 31d and repartition retention -> 10d on restart");
}

/// A worker whose input topic is missing (or misspelled)
/// consumed nothing and reported ready and healthy forever. Now it is not
/// ready, says which topic, and `waymark_input_topic_missing` shows it; once
/// the topic exists it is consumed.
#[test]
fn a_missing_input_topic_makes_the_worker_not_ready_until_it_exists() {
    let setup = WorkerSetup::new("missing", 1);
    let missing = unique("it.missing.in");
    let text = std::fs::read_to_string(&setup.config_path)
        .unwrap()
        .replace(&format!("input_topics = [\"{}\"]", setup.input), &format!("input_topics = [\"{}\", \"{missing}\"]", setup.input));
    std::fs::write(&setup.config_path, text).unwrap();
    let (mut worker, log) = spawn_logged(&setup, "missing", &[]);
    let started = Instant::now();
    let mut seen = None;
    while started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
        let Some((code, body)) = http_get(setup.http_port, "/readyz") else { continue };
        let metrics = http_get(setup.http_port, "/metrics").map(|m| m.1).unwrap_or_default();
        if code == 503 && body.contains("input topic") && metrics.contains(&format!("waymark_input_topic_missing{{topic=\"{missing}\"}} 1")) {
            seen = Some(body);
            break;
        }
    }
    let body = seen.unwrap_or_else(|| panic!("no 503 naming a missing input topic within 60 s\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
    assert_eq!(http_get(setup.http_port, "/healthz").map(|r| r.0), Some(200), "missing input is not a reason to restart");
    create_topics(&[&missing], 1);
    let entries = sample_envelopes();
    let on_missing: Vec<waymark::Envelope> = entries.iter().map(|e| waymark::Envelope { topic: missing.clone(), ..e.clone() }).collect();
    produce(&missing, &on_missing, 1);
    let expected = expected_upserts(&on_missing);
    let output = read_all(&setup.output, 1, expected.len(), Duration::from_secs(90), Duration::from_secs(1));
    still_running(&mut worker, &log);
    let ready = eventually(Duration::from_secs(30), Duration::from_millis(500), || http_get(setup.http_port, "/readyz").is_some_and(|(code, _)| code == 200));
    stop(worker);
    assert!(output.len() >= expected.len(), "the topic created later must be consumed");
    assert!(ready, "the worker must become ready once its input topic exists");
    println!("checked: missing input -> 503 ({}), consumed once created, ready again", body.trim());
}

/// A restore ran on the poll thread in one go,
/// so one longer than `max.poll.interval.ms` cost the member its membership
/// (and its partitions, which went to another member that restored them too).
/// Restores now go in slices between polls.
#[test]
fn a_restore_longer_than_the_poll_interval_keeps_the_member_in_its_group() {
    use waymark::state::{Keyspace, Scope};
    let setup = WorkerSetup::new("longrestore", 1);
    let text = std::fs::read_to_string(&setup.config_path).unwrap().replace("[routing]\npartitions = 4", "[routing]\npartitions = 1");
    std::fs::write(&setup.config_path, text).unwrap();
    let repartition = format!("{}-repartition", setup.group);
    let changelog = format!("{repartition}-changelog");
    create_topics(&[&repartition], 1);
    create_topics(&[&changelog], 1);
    // A home whose changelog holds 300,000 dedupe entries (far-future expiry),
    // in small record batches: with fetches capped at 1 KiB (below) the restore
    // reads about 20 entries per round trip and takes far longer than the 7 s
    // poll interval, without a changelog of millions of records.
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .set("batch.size", "1000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let scope = Scope::of(&repartition, 0);
    let value = i64::MAX.to_be_bytes();
    let entries = 300_000u32;
    for i in 0..entries {
        let mut key = scope.0.to_vec();
        key.extend_from_slice(&[0u8; 28]);
        key.extend_from_slice(&i.to_be_bytes());
        let key = waymark::worker::changelog::encode_key(Keyspace::Hashes, &key);
        send_retrying(&producer, BaseRecord::<[u8], [u8]>::to(&changelog).partition(0).key(&key[..]).payload(&value[..]));
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    let (input, expected) = setup.traffic(909, 20);
    produce(&setup.input, &input, 1);
    let started = Instant::now();
    setup.configure("kafka.consumer_properties", "\"max.poll.interval.ms\" = \"7000\"");
    let (mut worker, log) = spawn_logged(&setup, "longrestore", &["-X", "fetch.message.max.bytes=1024"]);
    let output = read_all(&setup.output, 1, expected.len(), Duration::from_secs(240), Duration::from_secs(1));
    let took = started.elapsed();
    still_running(&mut worker, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    stop(worker);
    check_at_least_once(&output, &expected);
    assert!(text.contains(&format!("applied={entries}")), "the home must have been restored from its changelog:\n{text}");
    assert!(!text.contains("maximum poll interval"), "the member left its group during the restore:\n{text}");
    assert!(!text.contains("partitions revoked"), "the partitions went to another member during the restore:\n{text}");
    println!("checked: {entries} changelog entries restored in slices ({took:?} to the output), the member stayed in its group");
}

/// `state drop` while the group runs wrote its
/// marker among the partition owner's changelog writes, which the owner never
/// reads back: the owner kept the state, later restores elsewhere dropped it.
/// It is now refused (exit 2) while the group has members.
#[test]
fn state_drop_is_refused_while_the_group_runs() {
    let setup = WorkerSetup::new("droprun", 1);
    produce(&setup.input, &sample_envelopes(), 1);
    let other = setup.state_dir.with_extension("other");
    // A state directory of the group's, stopped.
    let mut first = setup.spawn(Some(&other), Some(free_port()));
    std::thread::sleep(Duration::from_secs(8));
    signal(&first, "TERM");
    assert!(wait_exit(&mut first, Duration::from_secs(30)).is_some_and(|s| s.success()));
    let (worker, _) = spawn_logged(&setup, "droprun", &[]);
    let ready = eventually(Duration::from_secs(60), Duration::from_millis(250), || http_get(setup.http_port, "/readyz").is_some_and(|(code, _)| code == 200));
    assert!(ready, "the worker never became ready");
    let homes = format!("{}-repartition", setup.group);
    let drop = |dir: &std::path::Path| {
        std::process::Command::new(waymark_bin())
            .args(["state", "drop", "--config"])
            .arg(&setup.config_path)
            .arg("--state-dir")
            .arg(dir)
            .args(["--topic", &homes, "--partition", "0"])
            .output()
            .unwrap()
    };
    let out = drop(&other);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("active member") && stderr.contains("stop every instance"), "{stderr}");
    stop(worker);
    let out = drop(&other);
    assert!(out.status.success(), "with the group stopped the drop goes ahead: {}", String::from_utf8_lossy(&out.stderr));
    println!("checked: state drop refused while the group runs ({}), done once it is stopped", stderr.lines().last().unwrap_or_default());
}
