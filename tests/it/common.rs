//! Shared helpers: the real broker, unique topics, producing and reading records,
//! and running the `waymark` binary.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use waymark::Envelope;

/// The real broker's address, or a failure that says how to start one.
pub fn brokers() -> String {
    match std::env::var("WAYMARK_TEST_BROKERS") {
        Ok(b) if !b.trim().is_empty() => b,
        _ => panic!(
            "this test needs a real Kafka broker and WAYMARK_TEST_BROKERS is not set.\n\
             Run the whole suite with `scripts/test.sh` (it starts and stops the broker), or start one with\n\
             `eval \"$(scripts/kafka.sh start)\"` and run cargo test again."
        ),
    }
}

/// A topic name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}.{}.{nanos:x}.{n}", std::process::id())
}

/// Create topics (partitions each) on the real broker.
pub fn create_topics(names: &[&str], partitions: i32) {
    create_topics_on(&brokers(), names, partitions)
}

/// Create topics on the broker at `brokers`.
pub fn create_topics_on(brokers: &str, names: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let topics: Vec<NewTopic> = names.iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1))).collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let results = runtime
        .block_on(admin.create_topics(&topics, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))))
        .unwrap_or_else(|e| panic!("cannot reach the broker at {brokers} to create topics: {e}"));
    for result in results {
        result.unwrap_or_else(|(topic, e)| panic!("creating {topic}: {e}"));
    }
}

/// Produce envelopes' bodies, keys and headers to `topic` (partition kept modulo
/// `partitions`; a negative one leaves it to the producer's partitioner).
pub fn produce(topic: &str, envelopes: &[Envelope], partitions: i32) {
    produce_on(&brokers(), topic, envelopes, partitions)
}

/// Produce to the broker at `brokers`.
pub fn produce_on(brokers: &str, topic: &str, envelopes: &[Envelope], partitions: i32) {
    produce_with(brokers, topic, envelopes, partitions, &[])
}

/// [`produce_on`] with extra producer properties (e.g. `compression.type`).
pub fn produce_with(brokers: &str, topic: &str, envelopes: &[Envelope], partitions: i32, properties: &[(&str, &str)]) {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", brokers).set("enable.idempotence", "true").set("linger.ms", "5");
    for (name, value) in properties {
        client.set(*name, *value);
    }
    let producer: ThreadedProducer<DefaultProducerContext> = client.create().expect("producer");
    for envelope in envelopes {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &envelope.headers {
            headers = headers.insert(Header { key: k, value: v.as_deref() });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(&envelope.payload[..]).headers(headers);
        // A negative partition leaves the choice to the producer's partitioner (by key).
        if envelope.partition >= 0 {
            record = record.partition(envelope.partition.rem_euclid(partitions));
        }
        if let Some(key) = &envelope.key {
            record = record.key(&key[..]);
        }
        send_retrying(&producer, record);
    }
    producer.flush(Duration::from_secs(60)).expect("all input acknowledged");
}

/// Send one record, waiting while the producer's queue is full.
pub fn send_retrying<C, K, P>(producer: &ThreadedProducer<C>, mut record: BaseRecord<'_, K, P>)
where
    C: rdkafka::producer::ProducerContext<DeliveryOpaque = ()>,
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Whether `check` comes true within `timeout`, asked every `every`.
pub fn eventually(timeout: Duration, every: Duration, mut check: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        if check() {
            return true;
        }
        if started.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Run the worker until it is ready (partitions assigned, so restored), then stop it.
pub fn restore_and_stop(setup: &WorkerSetup, state_dir: &Path) {
    restore_and_stop_with(setup, state_dir, &[]);
}

/// [`restore_and_stop`] with extra `waymark run` arguments.
pub fn restore_and_stop_with(setup: &WorkerSetup, state_dir: &Path, extra: &[&str]) {
    let port = free_port();
    let mut worker = setup.spawn_with(Some(state_dir), Some(port), extra);
    let ready = eventually(Duration::from_secs(60), Duration::from_millis(250), || http_get(port, "/readyz").is_some_and(|(code, _)| code == 200));
    assert!(ready, "the worker never became ready");
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).is_some_and(|s| s.success()));
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: serde_json::Value,
    pub headers: BTreeMap<String, String>,
}

/// Read everything from `topic` (all partitions, read_committed) until `expected`
/// records arrived or `timeout` passed; then keep reading `settle` longer to catch
/// extra records (duplicates) that must not be there.
pub fn read_all(topic: &str, partitions: i32, expected: usize, timeout: Duration, settle: Duration) -> Vec<Read> {
    read_all_on(&brokers(), topic, partitions, expected, timeout, settle)
}

/// [`read_all`] from the broker at `brokers`.
pub fn read_all_on(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<Read> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let started = Instant::now();
    let mut reached: Option<Instant> = None;
    loop {
        if out.len() >= expected && reached.is_none() {
            reached = Some(Instant::now());
        }
        match reached {
            Some(at) if at.elapsed() >= settle => break,
            None if started.elapsed() >= timeout => break,
            _ => {}
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let value = serde_json::from_slice(m.payload().unwrap_or_default())
                .unwrap_or_else(|e| panic!("output record is not JSON: {e}"));
            let headers = m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            out.push(Read {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value,
                headers,
            });
        }
    }
    out
}

/// Path of the built `waymark` binary.
pub fn waymark_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_waymark"))
}

/// The repository root (fixtures, replay samples, schemas).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A free TCP port on loopback for the worker's HTTP endpoint.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Topics and directories of one worker test.
pub struct WorkerSetup {
    pub input: String,
    pub output: String,
    pub dlq: String,
    pub group: String,
    pub partitions: i32,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    pub http_port: u16,
    _dir: tempfile::TempDir,
}

impl WorkerSetup {
    pub fn new(name: &str, partitions: i32) -> WorkerSetup {
        Self::on(&brokers(), name, partitions)
    }

    /// A setup against the broker at `brokers`.
    pub fn on(brokers: &str, name: &str, partitions: i32) -> WorkerSetup {
        let input = unique(&format!("it.{name}.in"));
        let output = unique(&format!("it.{name}.out"));
        let dlq = unique(&format!("it.{name}.dlq"));
        create_topics_on(brokers, &[&input, &output, &dlq], partitions);
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let config_path = dir.path().join("waymark.toml");
        let http_port = free_port();
        let group = unique(&format!("it.{name}.group"));
        let config = format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
input_topics = ["{input}"]
output_topic = "{output}"
dead_letter_topic = "{dlq}"
[kafka.consumer_properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"topic.metadata.refresh.interval.ms" = "2000"
[routing]
partitions = 4
[state]
dir = "{state}"
sync_writes = true
[worker]
batch_size = 200
batch_wait = "50ms"
shutdown_timeout = "20s"
[http]
listen = "127.0.0.1:{http_port}"
"#,
            state = state_dir.display(),
        );
        std::fs::write(&config_path, config).unwrap();
        WorkerSetup { input, output, dlq, group, partitions, state_dir, config_path, http_port, _dir: dir }
    }

    /// Synthetic traffic (EasyPost webhooks, partition 0) for this setup's input
    /// topic, and the milestones it must yield.
    pub fn traffic(&self, seed: u64, shipments: usize) -> (Vec<Envelope>, BTreeMap<String, serde_json::Value>) {
        let input = waymark::synth::generate(&waymark::synth::TrafficSpec {
            seed,
            shipments,
            topic: self.input.clone(),
            ..waymark::synth::TrafficSpec::default()
        })
        .envelopes;
        let expected = expected_upserts(&input);
        (input, expected)
    }

    /// Switch state hand-over off (`state.changelog = false`): state stays local.
    pub fn disable_changelog(&self) {
        self.configure("state", "changelog = false");
    }

    /// Add `lines` to the config's `[section]`, creating the section if needed.
    pub fn configure(&self, section: &str, lines: &str) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        let header = format!("[{section}]\n");
        let text = if text.contains(&header) {
            text.replacen(&header, &format!("{header}{lines}\n"), 1)
        } else {
            format!("{text}\n{header}{lines}\n")
        };
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// Start a worker process with this setup's config (its own state dir if given).
    pub fn spawn(&self, state_dir: Option<&Path>, http_port: Option<u16>) -> Child {
        self.spawn_with(state_dir, http_port, &[])
    }

    /// [`WorkerSetup::spawn`] with extra `waymark run` arguments.
    pub fn spawn_with(&self, state_dir: Option<&Path>, http_port: Option<u16>, extra: &[&str]) -> Child {
        let mut cmd = Command::new(waymark_bin());
        cmd.arg("run").arg("--config").arg(&self.config_path).args(extra);
        if let Some(dir) = state_dir {
            cmd.arg("--state-dir").arg(dir);
        }
        if let Some(port) = http_port {
            cmd.arg("--http-listen").arg(format!("127.0.0.1:{port}"));
        }
        cmd.env("WAYMARK_LOG", "warn,waymark=info").stdout(Stdio::null()).stderr(Stdio::inherit());
        cmd.spawn().expect("spawn waymark run")
    }
}

/// Send a signal to a child process.
pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().expect("kill");
    assert!(status.success(), "kill -{sig} failed");
}

/// Wait for a child to exit, at most `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// GET a path from the worker's HTTP endpoint (plain HTTP/1.1 over a socket).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_with(port, path, &[])
}

/// [`http_get`] with request headers.
pub fn http_get_with(port: u16, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let extra: String = headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

/// The stream as a producer without keys sends it: records spread round-robin
/// over `partitions`, whatever shipment they carry.
pub fn scatter(envelopes: &[Envelope], partitions: i32) -> Vec<Envelope> {
    envelopes
        .iter()
        .enumerate()
        .map(|(i, e)| Envelope { partition: (i as i32).rem_euclid(partitions), key: None, ..e.clone() })
        .collect()
}

/// No shipment's `shipment_status` moves back in output order (per shipment key,
/// first emission of each milestone). Returns the number of shipments checked.
pub fn assert_no_status_moves_back(reads: &[Read]) -> usize {
    let mut ordered: Vec<&Read> = reads.iter().collect();
    ordered.sort_by_key(|r| (r.partition, r.offset));
    let mut first_seen = std::collections::HashSet::new();
    let mut latest: BTreeMap<String, u8> = BTreeMap::new();
    for read in ordered {
        if !first_seen.insert(read.value["milestone_id"].as_str().unwrap().to_string()) {
            continue;
        }
        let status = waymark::Status::parse(read.value["shipment_status"].as_str().unwrap()).expect("known status");
        // Per generation: a reused tracking number's new parcel starts afresh.
        let shipment = format!("{}#{}", read.key.clone().expect("output records are keyed by shipment"), read.value["generation"].as_u64().unwrap_or(0));
        let previous = latest.insert(shipment.clone(), status.rank()).unwrap_or(0);
        assert!(status.rank() >= previous, "shipment {shipment} moved back to {status:?} at {read:?}");
    }
    latest.len()
}

/// Per shipment key, the `shipment_status` of its last milestone in output order
/// (first emissions: an at-least-once repeat restates an earlier status).
pub fn final_statuses(reads: &[Read]) -> BTreeMap<String, String> {
    let mut ordered: Vec<&Read> = reads.iter().collect();
    ordered.sort_by_key(|r| (r.partition, r.offset));
    let mut first_seen = std::collections::HashSet::new();
    ordered
        .into_iter()
        .filter(|r| first_seen.insert(r.value["milestone_id"].as_str().unwrap_or_default().to_string()))
        .map(|r| (r.key.clone().unwrap_or_default(), r.value["shipment_status"].as_str().unwrap_or_default().to_string()))
        .collect()
}

/// The sample archive shipped in replay/.
pub fn sample_envelopes() -> Vec<Envelope> {
    let text = std::fs::read_to_string(repo().join("replay/sample.ndjson")).unwrap();
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| Envelope::from_kcat_json(l).unwrap()).collect()
}

/// The at-least-once check on an output topic: every expected milestone is there,
/// nothing else is, and every repeat is byte-identical to the first emission.
/// Returns (distinct milestones, repeats).
pub fn check_at_least_once(output: &[Read], expected: &BTreeMap<String, serde_json::Value>) -> (usize, usize) {
    let mut seen: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut repeats = 0;
    for read in output {
        let id = read.value["milestone_id"].as_str().expect("milestone_id").to_string();
        if let Some(previous) = seen.insert(id.clone(), read.value.clone()) {
            repeats += 1;
            assert_eq!(previous, read.value, "a re-emitted upsert differs from the first ({id})");
        }
    }
    let missing: Vec<&String> = expected.keys().filter(|id| !seen.contains_key(*id)).collect();
    assert!(missing.is_empty(), "{} of {} milestones lost, e.g. {:?}", missing.len(), expected.len(), missing.first());
    let unexpected = seen.keys().filter(|id| !expected.contains_key(*id)).count();
    assert_eq!(unexpected, 0, "milestones that a correct pipeline would not emit");
    (seen.len(), repeats)
}

/// The upserts a correct pipeline emits for `envelopes` (each partition in order),
/// by milestone id; prints what the stream holds.
pub fn expected_upserts(envelopes: &[Envelope]) -> BTreeMap<String, serde_json::Value> {
    let store = waymark::state::MemoryStore::default();
    let output = waymark::batch::process(&waymark::Pipeline::default(), &store, envelopes, chrono::Utc::now(), false, None)
        .expect("the in-memory pipeline cannot fail");
    let s = &output.summary;
    println!(
        "stream: {} records, {} canonical events, {} duplicates ({:.0}% of events; {} by key within skew), {} out of order",
        s.records,
        s.events,
        s.duplicate_hash + s.duplicate_key,
        100.0 * (s.duplicate_hash + s.duplicate_key) as f64 / s.events.max(1) as f64,
        s.duplicate_key,
        s.out_of_order
    );
    output.upserts.iter().map(|u| (u.milestone_id.clone(), serde_json::to_value(u).unwrap())).collect()
}

/// A private single-node broker run by scripts/kafka.sh on free ports.
pub struct PrivateBroker {
    port: u16,
    controller_port: u16,
    data: tempfile::TempDir,
}

impl PrivateBroker {
    pub fn start() -> PrivateBroker {
        let broker = PrivateBroker::stopped();
        broker.script("start");
        broker
    }

    /// Ports and data directory chosen, broker not started yet.
    pub fn stopped() -> PrivateBroker {
        // The shared broker being up proves Java, Maven and the jar cache work here.
        let _ = brokers();
        PrivateBroker { port: free_port(), controller_port: free_port(), data: tempfile::tempdir().unwrap() }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn script(&self, command: &str) {
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

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.script("stop");
    }
}
