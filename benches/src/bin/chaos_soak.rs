//! Seeded chaos soak against a real Kafka broker: `--instances` copies of
//! `waymark run` (spawned from `--waymark PATH`) in ONE consumer group, fed
//! un-keyed multi-carrier traffic while a seeded schedule of faults hits them,
//! then the output is checked. For each delivery mode it:
//!
//! 1. creates the input (`--partitions`, default 4), output and dead-letter
//!    topics, writes one worker config (session.timeout.ms 6000, so that a
//!    freeze of 7-15 s outlives the session; topic metadata refreshed every 2 s,
//!    so that added input partitions are found) and starts the instances, each
//!    with its own state directory, transactional.id and log file;
//! 2. produces `--events` canonical events of `waymark::synth` traffic (EasyPost
//!    and DHL webhooks, every other chunk's DHL bodies merged in pairs,
//!    redeliveries, reordering, provider replays), no key, round-robin over the
//!    input partitions, paced over the whole fault schedule (never more than one
//!    fault step ahead), with deliberately bad records among them (bodies that
//!    are not JSON, an unknown `carrier` header), each tagged with a
//!    `soak-bad` header;
//! 3. runs `--faults` faults, one every `--fault-every` seconds, kinds chosen by
//!    a SplitMix64 seeded with `--seed` (the first five are one of each kind):
//!    `kill` (SIGKILL an instance, restart it on the same state directory),
//!    `freeze` (SIGSTOP an instance for 7-15 s, longer than the session, then
//!    SIGCONT), `broker` (SIGKILL the broker that `--kafka-script start` started
//!    with this environment, down 2-12 s, `--kafka-script start` again),
//!    `rolling` (SIGTERM each instance in turn, wait for exit 0, restart) and
//!    `partitions` (CreatePartitions: one or two more input partitions);
//! 4. once producing and faults are over, waits for the output to settle and
//!    checks: every expected milestone (the same in-memory pipeline the test
//!    suite uses, `expected_upserts` in tests/it/common.rs) is there, exactly
//!    once to a read_committed reader in exactly-once mode, any repeats
//!    byte-identical in at-least-once mode, nothing unexpected; no shipment's
//!    `shipment_status` moves back in output order; one dead letter per bad
//!    record (at least one at-least-once), no other dead letters; no instance
//!    exited unless the harness made it (its log's tail is printed); the
//!    group's lag is 0 on the input and repartition topics; every final SIGTERM
//!    exits 0.
//!
//! Prints one line per fault and a progress line every 5 s on stderr, a summary
//! per mode on stdout, and exits 1 on any violation. Everything is bounded in
//! count and time and talks only to `--brokers`; broker faults go through
//! `--kafka-script` (default scripts/kafka.sh) with the inherited
//! `WAYMARK_KAFKA_PORT` / `WAYMARK_KAFKA_DATA`, whose port must be the one of
//! `--brokers`. Instance logs and state live under `--work-dir` (default
//! `$TMPDIR/chaos-soak.<pid>`), kept on failure.
//!
//! ```text
//! export WAYMARK_KAFKA_PORT=39092 WAYMARK_KAFKA_DATA=/tmp/soak-kafka
//! eval "$(scripts/kafka.sh start)"
//! cargo build --bin waymark
//! cargo run --manifest-path benches/Cargo.toml --features e2e --bin chaos-soak -- \
//!     --quick --brokers $WAYMARK_TEST_BROKERS --waymark $CARGO_TARGET_DIR/debug/waymark
//! # the large configuration (a release worker; hours):
//! cargo run --release --manifest-path benches/Cargo.toml --features e2e --bin chaos-soak -- \
//!     --brokers $WAYMARK_TEST_BROKERS --waymark $CARGO_TARGET_DIR/release/waymark \
//!     --events 1000000 --faults 200 --instances 3 --seed 1
//! ```
//!
//! See docs/chaos-soak.md.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use waymark::synth::{generate, merge_dhl_pairs, Rng, SynthCarrier, TrafficSpec};
use waymark::Envelope;

#[derive(Clone)]
struct Args {
    brokers: String,
    waymark: String,
    kafka_script: String,
    modes: Vec<&'static str>,
    instances: usize,
    events: usize,
    faults: usize,
    seed: u64,
    partitions: i32,
    /// Partitions of the processing stage (`[routing] partitions`).
    homes: u32,
    /// Seconds between the starts of two faults (a fault that runs longer
    /// delays the next one).
    fault_every: u64,
    /// Longest wait for the output to settle once producing and faults are over.
    settle_timeout: u64,
    /// Faults beyond one of each kind are all kills (the quick preset's budget).
    quick: bool,
    work_dir: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        brokers: "127.0.0.1:19092".into(),
        waymark: "target/debug/waymark".into(),
        kafka_script: "scripts/kafka.sh".into(),
        modes: vec!["at-least-once", "exactly-once"],
        instances: 3,
        events: 100_000,
        faults: 20,
        seed: 1,
        partitions: 4,
        homes: 8,
        fault_every: 15,
        settle_timeout: 600,
        quick: false,
        work_dir: std::env::temp_dir().join(format!("chaos-soak.{}", std::process::id())),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let number = |v: String, what: &str| -> u64 { v.parse().unwrap_or_else(|_| usage(&format!("{what} takes a number, not {v:?}"))) };
        match flag.as_str() {
            "--brokers" => a.brokers = value(),
            "--waymark" => a.waymark = value(),
            "--kafka-script" => a.kafka_script = value(),
            "--instances" => a.instances = number(value(), "--instances") as usize,
            "--events" => a.events = number(value(), "--events") as usize,
            "--faults" => a.faults = number(value(), "--faults") as usize,
            "--seed" => a.seed = number(value(), "--seed"),
            "--partitions" => a.partitions = number(value(), "--partitions") as i32,
            "--homes" => a.homes = number(value(), "--homes") as u32,
            "--fault-every" => a.fault_every = number(value(), "--fault-every"),
            "--settle-timeout" => a.settle_timeout = number(value(), "--settle-timeout"),
            "--work-dir" => a.work_dir = PathBuf::from(value()),
            "--mode" => {
                a.modes = match value().as_str() {
                    "at-least-once" => vec!["at-least-once"],
                    "exactly-once" => vec!["exactly-once"],
                    "both" => vec!["at-least-once", "exactly-once"],
                    other => usage(&format!("--mode at-least-once|exactly-once|both, not {other:?}")),
                }
            }
            "--quick" => {
                a.instances = 2;
                a.events = 3_000;
                a.faults = 6;
                a.fault_every = 7;
                a.settle_timeout = 180;
                a.quick = true;
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown flag {other}")),
        }
    }
    if a.instances == 0 || a.partitions < 1 || a.homes == 0 || a.events == 0 {
        usage("--instances, --partitions, --homes and --events must be at least 1");
    }
    a
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("chaos-soak: {problem}");
    }
    eprintln!(
        "usage: chaos-soak [--quick] [--mode at-least-once|exactly-once|both] [--instances N] [--events N] [--faults N] [--seed S]\n\
         \x20                 [--brokers HOST:PORT] [--waymark PATH] [--kafka-script PATH] [--partitions N] [--homes N]\n\
         \x20                 [--fault-every SECONDS] [--settle-timeout SECONDS] [--work-dir DIR]\n\
         (see the header of benches/src/bin/chaos_soak.rs and docs/chaos-soak.md)"
    );
    std::process::exit(2)
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}.{}.{nanos:x}", std::process::id())
}

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client")
}

fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    let topics: Vec<NewTopic> = topics.iter().map(|(n, p)| NewTopic::new(n, *p, TopicReplication::Fixed(1))).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // Admin calls are futures; a tiny executor keeps an async runtime out of this crate.
    let results = futures_executor::block_on(admin(brokers).create_topics(&topics, &options))
        .unwrap_or_else(|e| panic!("cannot reach the broker at {brokers}: {e}"));
    for result in results {
        result.unwrap_or_else(|(topic, e)| panic!("creating {topic}: {e}"));
    }
}

/// Delete this run's topics (inputs, outputs and the workers' internal topics,
/// all named after `unique`, so with this process id).
fn delete_own_topics(brokers: &str, prefix: &str) {
    let admin = admin(brokers);
    let metadata = match admin.inner().fetch_metadata(None, Duration::from_secs(30)) {
        Ok(metadata) => metadata,
        Err(e) => return eprintln!("chaos-soak: cannot list topics to delete them ({e}); `scripts/kafka.sh clean` removes them"),
    };
    let marker = format!(".{}.", std::process::id());
    let own: Vec<String> =
        metadata.topics().iter().map(|t| t.name().to_string()).filter(|n| n.starts_with(prefix) && n.contains(&marker)).collect();
    if own.is_empty() {
        return;
    }
    let refs: Vec<&str> = own.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    match futures_executor::block_on(admin.delete_topics(&refs, &options)) {
        Ok(results) if results.iter().all(Result::is_ok) => eprintln!("chaos-soak: deleted this mode's {} topics", own.len()),
        _ => eprintln!("chaos-soak: could not delete every topic of this mode; `scripts/kafka.sh clean` removes them"),
    }
}

// ---------------------------------------------------------------------------
// traffic
// ---------------------------------------------------------------------------

/// One generated chunk: records in send order (bad ones carry their id), the
/// milestone ids a correct pipeline emits for it and its canonical events.
struct Chunk {
    records: Vec<(Envelope, usize, Option<String>)>,
    expected: Vec<String>,
    events: usize,
}

/// Shipments per carrier per chunk: about 20 chunks for the whole stream (a
/// shipment yields about 30 canonical events), 4 to 200 shipments.
fn chunk_shipments(events: usize) -> usize {
    (events / 30 / 20).clamp(4, 200)
}

/// The `n`-th chunk: EasyPost and DHL traffic interleaved (chunks share no
/// tracking number: each has its own seeds), every other chunk's DHL bodies
/// merged in pairs, and about one bad record per 150 good ones.
fn chunk(seed: u64, n: u64, shipments: usize, topic: &str) -> Chunk {
    let spec = |seed, carrier| TrafficSpec { seed, shipments, carrier, topic: topic.to_string(), ..TrafficSpec::default() };
    // Tracking numbers are SYN<seed % 10^6><n>: keep the seeds distinct.
    let base = (seed % 1000) * 100_000 + 2 * n;
    let a = generate(&spec(base, SynthCarrier::EasyPost)).envelopes;
    let mut b = generate(&spec(base + 1, SynthCarrier::Dhl)).envelopes;
    if n % 2 == 1 {
        b = merge_dhl_pairs(&b);
    }
    let mut good = Vec::with_capacity(a.len() + b.len());
    for i in 0..a.len().max(b.len()) {
        good.extend(a.get(i).cloned());
        good.extend(b.get(i).cloned());
    }
    // What the test suite's `expected_upserts` computes: the in-memory pipeline
    // over the chunk in order.
    let pipeline = waymark::Pipeline::default();
    let now = chrono::Utc::now();
    let store = waymark::state::MemoryStore::default();
    let output = waymark::batch::process(&pipeline, &store, &good, now, false, None).expect("the in-memory pipeline cannot fail");
    let expected: Vec<String> = output.upserts.iter().map(|u| u.milestone_id.clone()).collect();
    let events = output.summary.events as usize;
    let mut rng = Rng::new(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let bad = (good.len() / 150).max(1);
    let mut records: Vec<(Envelope, usize, Option<String>)> = good
        .into_iter()
        .map(|e| {
            let events = pipeline.canonical_events(&e, now).map(|(_, ev)| ev.len()).unwrap_or(0);
            (e, events, None)
        })
        .collect();
    for k in 0..bad {
        let id = format!("bad-{n}-{k}");
        let (carrier, payload) = if k % 2 == 0 {
            ("easypost", format!("{{\"object\":\"Event\",\"id\":\"{id}\",\"result\":{{\"tracking_code\":"))
        } else {
            ("soak-no-such-carrier", format!("{{\"id\":\"{id}\",\"tracking_number\":\"BAD{n}X{k}\"}}"))
        };
        let envelope = Envelope {
            topic: topic.to_string(),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            headers: vec![
                ("tenant-id".into(), Some(b"acme".to_vec())),
                ("carrier".into(), Some(carrier.as_bytes().to_vec())),
                ("soak-bad".into(), Some(id.as_bytes().to_vec())),
            ],
            key: None,
            payload: payload.into_bytes(),
        };
        let at = rng.below(records.len() as u64 + 1) as usize;
        records.insert(at, (envelope, 0, Some(id)));
    }
    Chunk { records, expected, events }
}

/// What the sender has done (shared with the fault loop and the summary).
#[derive(Default)]
struct Progress {
    events: AtomicUsize,
    records: AtomicUsize,
    bad: AtomicUsize,
    acked: AtomicUsize,
    failed: AtomicUsize,
    /// Fault steps started: the sender stays at most one step ahead.
    steps: AtomicUsize,
    /// Current input partition count (grows with `partitions` faults).
    partitions: AtomicI32,
    done: AtomicBool,
    stop: AtomicBool,
    expected: Mutex<HashSet<String>>,
    expected_bad: Mutex<HashSet<String>>,
}

/// The input producer's context: counts delivery reports.
struct Delivery(Arc<Progress>);

impl ClientContext for Delivery {}
impl ProducerContext for Delivery {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.acked.fetch_add(1, Ordering::SeqCst),
            Err((e, _)) => {
                eprintln!("chaos-soak: an input record was not delivered: {e}");
                self.0.failed.fetch_add(1, Ordering::SeqCst)
            }
        };
    }
}

/// Generate (one thread, two chunks ahead) and send the stream, paced at
/// `events / ((faults + 1) * fault_every)` events/s and never past the current
/// fault step's share, until `events` canonical events are sent.
fn run_sender(args: Args, input: String, progress: Arc<Progress>, deadline: Instant) {
    let (tx, rx) = mpsc::sync_channel::<Chunk>(2);
    let (seed, target, shipments) = (args.seed, args.events, chunk_shipments(args.events));
    let topic = input.clone();
    let stop = progress.clone();
    let generator = std::thread::spawn(move || {
        let mut events = 0usize;
        for n in 0..1_000_000u64 {
            if events >= target || stop.stop.load(Ordering::SeqCst) {
                break;
            }
            let c = chunk(seed, n, shipments, &topic);
            events += c.events;
            if tx.send(c).is_err() {
                break;
            }
        }
    });
    let producer: ThreadedProducer<Delivery> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        // Broker outages last seconds (plus its start): keep retrying well past them.
        .set("message.timeout.ms", "600000")
        .create_with_context(Delivery(progress.clone()))
        .expect("producer");
    let steps = args.faults + 1;
    let rate = target as f64 / (steps as u64 * args.fault_every.max(1)) as f64;
    let started = Instant::now();
    let mut i = 0usize;
    let mut partitions = args.partitions;
    'chunks: for c in rx {
        progress.expected.lock().unwrap().extend(c.expected);
        for (envelope, events, bad) in c.records {
            // Pacing: bounded by the mode's deadline.
            loop {
                let step = progress.steps.load(Ordering::SeqCst);
                let by_time = rate * started.elapsed().as_secs_f64();
                let by_step = if step >= steps { f64::MAX } else { target as f64 * (step + 1) as f64 / steps as f64 };
                if progress.stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                    break 'chunks;
                }
                if (progress.events.load(Ordering::SeqCst) as f64) < by_time.min(by_step) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(id) = &bad {
                progress.expected_bad.lock().unwrap().insert(id.clone());
            }
            let added = progress.partitions.load(Ordering::SeqCst);
            if added > partitions && producer_knows(&producer, &input, added) {
                partitions = added;
            }
            send(&producer, &input, &envelope, i as i32 % partitions, deadline);
            i += 1;
            progress.records.fetch_add(1, Ordering::SeqCst);
            progress.events.fetch_add(events, Ordering::SeqCst);
            if bad.is_some() {
                progress.bad.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    progress.stop.store(true, Ordering::SeqCst);
    let _ = generator.join();
    if producer.flush(Duration::from_secs(600)).is_err() {
        eprintln!("chaos-soak: the input producer could not flush within 600 s");
    }
    progress.done.store(true, Ordering::SeqCst);
}

/// Whether the producer's metadata shows `partitions` partitions of `topic`
/// (asking the broker refreshes it: a send to a partition librdkafka does not
/// know yet fails at once, and it would not look for minutes).
fn producer_knows(p: &ThreadedProducer<Delivery>, topic: &str, partitions: i32) -> bool {
    p.client().fetch_metadata(Some(topic), Duration::from_secs(5)).ok().and_then(|m| m.topics().first().map(|t| t.partitions().len() as i32)).unwrap_or(0) >= partitions
}

fn send(p: &ThreadedProducer<Delivery>, topic: &str, e: &Envelope, partition: i32, deadline: Instant) {
    let mut headers = OwnedHeaders::new();
    for (k, v) in &e.headers {
        headers = headers.insert(Header { key: k, value: v.as_deref() });
    }
    let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).payload(&e.payload[..]).headers(headers).partition(partition);
    loop {
        match p.send(record) {
            Ok(()) => return,
            Err((e, back)) => {
                // Queue full while the broker is away: wait, within the deadline.
                if Instant::now() > deadline + Duration::from_secs(60) {
                    p.context().0.failed.fetch_add(1, Ordering::SeqCst);
                    return eprintln!("chaos-soak: could not enqueue an input record before the deadline: {e}");
                }
                record = back;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// the output reader and its checks
// ---------------------------------------------------------------------------

/// What a read_committed reader of the output and dead-letter topics saw.
#[derive(Default)]
struct Seen {
    records: usize,
    /// Per milestone id: hash of (key, value bytes) of its first emission, how
    /// often it came, and the first emission's source (input partition, offset).
    milestones: HashMap<String, (u64, u32, (i64, i64))>,
    repeats: usize,
    /// Repeats whose bytes differ from the first emission.
    differing: Vec<String>,
    /// Per shipment key: rank of the `shipment_status` of its latest first emission.
    status: HashMap<String, u8>,
    moved_back: Vec<String>,
    malformed: Vec<String>,
    dead_letters: usize,
    bad: HashMap<String, u32>,
    /// Dead letters that are not one of the bad records.
    unexpected_dead: Vec<String>,
}

impl Seen {
    fn output(&mut self, key: Option<&[u8]>, payload: &[u8]) {
        self.records += 1;
        let value: serde_json::Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => return self.note_malformed(format!("an output record is not JSON: {e}")),
        };
        let Some(id) = value["milestone_id"].as_str() else { return self.note_malformed(format!("an output record has no milestone_id: {value}")) };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        payload.hash(&mut hasher);
        let digest = hasher.finish();
        let source = (value["source"]["partition"].as_i64().unwrap_or(-1), value["source"]["offset"].as_i64().unwrap_or(-1));
        match self.milestones.get_mut(id) {
            Some((first, count, first_source)) => {
                *count += 1;
                self.repeats += 1;
                if *first != digest && self.differing.len() < 10 {
                    self.differing.push(format!(
                        "{id}: first from input {}@{}, again from {}@{}",
                        first_source.0, first_source.1, source.0, source.1
                    ));
                }
                // Only first emissions count for the order check (a repeat restates
                // an earlier status).
                return;
            }
            None => {
                self.milestones.insert(id.to_string(), (digest, 1, source));
            }
        }
        // Output records are keyed by shipment, so a shipment lives in one output
        // partition, which this reader gets in offset order: checking as they come
        // is `assert_no_status_moves_back` of tests/it/common.rs.
        let shipment = key.map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
        let rank = match value["shipment_status"].as_str().and_then(waymark::Status::parse) {
            Some(status) => status.rank(),
            None => return self.note_malformed(format!("milestone {id} has no known shipment_status")),
        };
        let previous = self.status.insert(shipment.clone(), rank).unwrap_or(0);
        if rank < previous {
            if self.moved_back.len() < 10 {
                self.moved_back.push(format!("shipment {shipment} moved back from rank {previous} to {rank} at milestone {id}"));
            } else {
                self.moved_back.push(String::new());
            }
        }
    }

    fn dead_letter(&mut self, payload: &[u8]) {
        self.dead_letters += 1;
        let value: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
        let id = value["envelope"]["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|h| h[0] == "soak-bad")
            .and_then(|h| h[1].as_str())
            .map(str::to_string);
        match id {
            Some(id) => *self.bad.entry(id).or_default() += 1,
            None if self.unexpected_dead.len() < 10 => self.unexpected_dead.push(format!(
                "{} ({}) from {}:{}",
                value["error_kind"].as_str().unwrap_or("?"),
                value["reason"].as_str().unwrap_or("?"),
                value["envelope"]["topic"].as_str().unwrap_or("?"),
                value["envelope"]["offset"]
            )),
            None => self.unexpected_dead.push(String::new()),
        }
    }

    fn note_malformed(&mut self, what: String) {
        if self.malformed.len() < 10 {
            self.malformed.push(what);
        }
    }
}

/// Read the output and dead-letter topics (read_committed, from the beginning)
/// until `stop`.
fn run_reader(brokers: String, output: String, dlq: String, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", unique("soak-reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..OUTPUT_PARTITIONS {
        tpl.add_partition_offset(&output, p, Offset::Beginning).unwrap();
    }
    for p in 0..DLQ_PARTITIONS {
        tpl.add_partition_offset(&dlq, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    while !stop.load(Ordering::SeqCst) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let payload = m.payload().unwrap_or_default();
            let mut seen = seen.lock().unwrap();
            if m.topic() == output {
                seen.output(m.key(), payload);
            } else {
                seen.dead_letter(payload);
            }
        }
    }
}

const OUTPUT_PARTITIONS: i32 = 4;
const DLQ_PARTITIONS: i32 = 2;

/// The group's lag on `topics`: per topic, the records a read_committed reader
/// still finds from the group's committed offset (the beginning when none) to
/// the end. Counting records rather than `high watermark - committed` matters
/// for the transactionally written repartition topic of exactly-once: its end
/// offset counts commit markers (and aborted records) that no consumer ever
/// gets, so the raw difference is >= 1 on an idle, fully consumed partition.
/// Also returns the raw difference for the record.
fn group_lag(brokers: &str, group: &str, topics: &[String]) -> Result<Vec<(String, usize, i64)>, String> {
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    let metadata = probe.fetch_metadata(None, Duration::from_secs(10)).map_err(|e| format!("metadata: {e}"))?;
    let mut wanted = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| topics.iter().any(|n| n == t.name())) {
        for p in t.partitions() {
            wanted.add_partition(t.name(), p.id());
        }
    }
    let committed = probe.committed_offsets(wanted, Duration::from_secs(10)).map_err(|e| format!("committed offsets: {e}"))?;
    let mut raw: BTreeMap<String, i64> = BTreeMap::new();
    let mut from = TopicPartitionList::new();
    for e in committed.elements() {
        let (_, high) = probe.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10)).map_err(|x| format!("watermarks: {x}"))?;
        let offset = match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        };
        *raw.entry(e.topic().to_string()).or_default() += (high - offset).max(0);
        from.add_partition_offset(e.topic(), e.partition(), if offset > 0 { Offset::Offset(offset) } else { Offset::Beginning }).unwrap();
    }
    let mut left: BTreeMap<String, usize> = BTreeMap::new();
    // One reader per topic: a partition's EOF names no topic.
    for topic in topics {
        let mut assignment = TopicPartitionList::new();
        for e in from.elements().iter().filter(|e| e.topic() == topic) {
            assignment.add_partition_offset(topic, e.partition(), e.offset()).unwrap();
        }
        let partitions = assignment.count();
        if partitions == 0 {
            continue;
        }
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("soak-lag"))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .map_err(|e| e.to_string())?;
        reader.assign(&assignment).map_err(|e| e.to_string())?;
        let mut at_end = HashSet::new();
        let started = Instant::now();
        while at_end.len() < partitions {
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("{} of {partitions} partitions of {topic} reached their end within 30 s", at_end.len()));
            }
            match reader.poll(Duration::from_millis(100)) {
                Some(Ok(_)) => *left.entry(topic.clone()).or_default() += 1,
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                _ => {}
            }
        }
    }
    Ok(topics.iter().map(|t| (t.clone(), left.get(t).copied().unwrap_or(0), raw.get(t).copied().unwrap_or(0))).collect())
}

// ---------------------------------------------------------------------------
// instances and the broker
// ---------------------------------------------------------------------------

struct Instance {
    name: String,
    state_dir: PathBuf,
    log: PathBuf,
    transactional_id: String,
    port: u16,
    child: Option<Child>,
    frozen: bool,
    starts: usize,
}

impl Instance {
    fn start(&mut self, waymark: &str, config: &Path, t: f64) {
        self.port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0);
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("instance log");
        let _ = writeln!(log, "==== chaos-soak: start #{} of {} at t={t:.1}s ====", self.starts, self.name);
        let child = Command::new(waymark)
            .args(["run", "--config"])
            .arg(config)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--transactional-id")
            .arg(&self.transactional_id)
            .env("WAYMARK_LOG", "warn,waymark=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {waymark} ({e}): build it with cargo build --bin waymark"));
        self.child = Some(child);
        self.frozen = false;
    }

    fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status();
        }
    }

    /// The last `lines` lines of its log.
    fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].iter().map(|l| format!("    | {l}\n")).collect()
    }

    fn ready(&self) -> bool {
        use std::io::Read as _;
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if write!(s, "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = s.read_to_string(&mut response);
        response.split_whitespace().nth(1) == Some("200")
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-CONT").arg(child.id().to_string()).status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The broker that `kafka.sh start` started with this process's environment.
struct Broker {
    script: PathBuf,
    data: PathBuf,
}

impl Broker {
    /// Check that `--brokers` is the kafka.sh broker of this environment, whose
    /// pid file names a live broker process.
    fn find(args: &Args) -> Result<Broker, String> {
        let port: u16 = std::env::var("WAYMARK_KAFKA_PORT").ok().filter(|p| !p.is_empty()).map_or(Ok(19092), |p| p.parse()).map_err(|_| "WAYMARK_KAFKA_PORT is not a port")?;
        if !args.brokers.split(',').all(|b| b.trim().rsplit(':').next() == Some(&port.to_string())) {
            return Err(format!(
                "--brokers {} is not the broker of {} start on port {port} (set WAYMARK_KAFKA_PORT / WAYMARK_KAFKA_DATA as when it was started)",
                args.brokers, args.kafka_script
            ));
        }
        let data = std::env::var("WAYMARK_KAFKA_DATA").ok().filter(|d| !d.is_empty()).map_or_else(|| PathBuf::from(format!("/tmp/waymark-kafka-{port}")), PathBuf::from);
        let data = if data.is_absolute() { data } else { std::env::current_dir().map_err(|e| e.to_string())?.join(data) };
        let broker = Broker { script: PathBuf::from(&args.kafka_script), data };
        if !broker.script.is_file() {
            return Err(format!("--kafka-script {} is not a file", broker.script.display()));
        }
        broker.pid().ok_or_else(|| format!("no live broker process in {}/kafka.pid: start it with {} start", broker.data.display(), args.kafka_script))?;
        Ok(broker)
    }

    /// As kafka.sh's `running_pid`: the pid file's process, if alive and started
    /// with this data dir's server.properties.
    fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.data.join("kafka.pid")).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let props = self.data.join("server.properties");
        String::from_utf8_lossy(&cmdline).contains(&*props.to_string_lossy()).then_some(pid)
    }
}

// ---------------------------------------------------------------------------
// faults
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Fault {
    Kill,
    Freeze,
    Broker,
    Rolling,
    Partitions,
}

impl Fault {
    const ALL: [Fault; 5] = [Fault::Kill, Fault::Freeze, Fault::Broker, Fault::Rolling, Fault::Partitions];

    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Freeze => "freeze",
            Fault::Broker => "broker",
            Fault::Rolling => "rolling",
            Fault::Partitions => "partitions",
        }
    }
}

/// The seeded schedule: the first five faults one of each kind (shuffled),
/// then kill 30%, freeze 25%, broker 15%, rolling 15%, partitions 15% (at most
/// 32 added partitions: later draws become kills).
fn schedule(rng: &mut Rng, faults: usize, quick: bool) -> Vec<Fault> {
    let mut first = Fault::ALL.to_vec();
    for i in (1..first.len()).rev() {
        first.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut out: Vec<Fault> = first.into_iter().take(faults).collect();
    let mut added = out.iter().filter(|f| **f == Fault::Partitions).count();
    while out.len() < faults {
        let fault = match if quick { 0 } else { rng.below(100) } {
            0..=29 => Fault::Kill,
            30..=54 => Fault::Freeze,
            55..=69 => Fault::Broker,
            70..=84 => Fault::Rolling,
            _ if added < 16 => Fault::Partitions,
            _ => Fault::Kill,
        };
        added += usize::from(fault == Fault::Partitions);
        out.push(fault);
    }
    out
}

/// One mode's run.
struct Soak<'a> {
    args: &'a Args,
    mode: &'static str,
    input: String,
    config: PathBuf,
    rng: Rng,
    instances: Vec<Instance>,
    broker: Broker,
    started: Instant,
    progress: Arc<Progress>,
    seen: Arc<Mutex<Seen>>,
    violations: Vec<String>,
    survived: BTreeMap<Fault, usize>,
    last_line: Instant,
    broker_log: PathBuf,
}

/// Longest wait in a rolling restart for an instance's `/readyz` (partitions
/// assigned) before it is stopped, and for its successor's after the restart:
/// a killed member's open transaction can keep the group from handing out
/// partitions for up to transaction.timeout.ms (60 s), and the soak goes on.
/// (`--quick`: 10 s, to stay within its time budget.)
const READY_WAIT: Duration = Duration::from_secs(20);

/// Instances that exit by themselves are restarted (and counted as violations)
/// at most this many times per mode before the mode gives up.
const MAX_UNEXPECTED_EXITS: usize = 20;

impl Soak<'_> {
    fn t(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn say(&self, what: &str) {
        eprintln!("[{} {:6.1}s] {what}", self.mode, self.t());
    }

    fn violation(&mut self, what: String) {
        self.say(&format!("VIOLATION: {what}"));
        self.violations.push(what);
    }

    /// The watchdog (any exit the harness did not cause is a violation: report
    /// it with the log's tail and restart the instance) and a progress line
    /// every 5 s.
    fn tick(&mut self) {
        for i in 0..self.instances.len() {
            let status = match self.instances[i].child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => status,
                _ => continue,
            };
            self.instances[i].child = None;
            let tail = self.instances[i].tail(25);
            let name = self.instances[i].name.clone();
            self.violation(format!("instance {name} exited by itself ({status}); the tail of {}:\n{tail}", self.instances[i].log.display()));
            if self.violations.len() <= MAX_UNEXPECTED_EXITS {
                let t = self.t();
                self.instances[i].start(&self.args.waymark, &self.config, t);
                self.say(&format!("restarted {name} after its exit"));
            }
        }
        if self.last_line.elapsed() >= Duration::from_secs(5) {
            self.last_line = Instant::now();
            let (records, milestones, dead) = {
                let seen = self.seen.lock().unwrap();
                (seen.records, seen.milestones.len(), seen.dead_letters)
            };
            let expected = self.progress.expected.lock().unwrap().len();
            let up = self.instances.iter().filter(|i| i.child.is_some() && !i.frozen).count();
            self.say(&format!(
                "sent {} of {} events ({} records, {} bad), out: {records} records, {milestones} of {expected} milestones, {dead} dead letters; {up} of {} instances up",
                self.progress.events.load(Ordering::SeqCst),
                self.args.events,
                self.progress.records.load(Ordering::SeqCst),
                self.progress.bad.load(Ordering::SeqCst),
                self.instances.len()
            ));
        }
    }

    fn wait(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.tick();
            std::thread::sleep(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
        }
    }

    /// Wait (with the watchdog running) for an instance the harness stopped to exit.
    fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + timeout;
        let mut child = self.instances[i].child.take()?;
        while Instant::now() < until {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            self.tick();
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    fn ready_wait(&self) -> Duration {
        if self.args.quick {
            READY_WAIT / 2
        } else {
            READY_WAIT
        }
    }

    fn pick(&mut self) -> Option<usize> {
        let up: Vec<usize> = (0..self.instances.len()).filter(|i| self.instances[*i].child.is_some()).collect();
        (!up.is_empty()).then(|| up[self.rng.below(up.len() as u64) as usize])
    }

    fn restart(&mut self, i: usize) {
        let t = self.t();
        self.instances[i].start(&self.args.waymark, &self.config, t);
    }

    fn fault(&mut self, n: usize, fault: Fault) {
        let total = self.args.faults;
        let survived = match fault {
            Fault::Kill => {
                let Some(i) = self.pick() else { return };
                let pause = 500 + self.rng.below(2500);
                self.say(&format!("fault {n}/{total}: kill -KILL {}, restart after {pause} ms", self.instances[i].name));
                self.instances[i].signal("KILL");
                self.wait_exit(i, Duration::from_secs(10));
                self.wait(Duration::from_millis(pause));
                self.restart(i);
                true
            }
            Fault::Freeze => {
                let Some(i) = self.pick() else { return };
                let seconds = 7 + self.rng.below(9);
                self.say(&format!("fault {n}/{total}: kill -STOP {} for {seconds} s (session timeout 6 s), then -CONT", self.instances[i].name));
                self.instances[i].signal("STOP");
                self.instances[i].frozen = true;
                self.wait(Duration::from_secs(seconds));
                self.instances[i].signal("CONT");
                self.instances[i].frozen = false;
                true
            }
            Fault::Broker => {
                let down = 2 + self.rng.below(11);
                let Some(pid) = self.broker.pid() else {
                    self.violation(format!("fault {n}: no live broker in {}/kafka.pid", self.broker.data.display()));
                    self.restart_broker();
                    return;
                };
                self.say(&format!("fault {n}/{total}: kill -KILL broker (pid {pid}), down {down} s, then {} start", self.broker.script.display()));
                let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
                let gone = Instant::now();
                while self.broker.pid().is_some() && gone.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                self.wait(Duration::from_secs(down));
                self.restart_broker()
            }
            Fault::Rolling => {
                self.say(&format!("fault {n}/{total}: rolling restart of {} instances (SIGTERM, wait for exit 0, start)", self.instances.len()));
                for i in 0..self.instances.len() {
                    if self.instances[i].child.is_none() {
                        continue;
                    }
                    // As a deploy does: the next one goes once this one is ready
                    // (bounded: a SIGTERM before the worker installs its handler,
                    // e.g. just after a restart or a freeze, ends it by the signal).
                    let ready = Instant::now();
                    while !self.instances[i].ready() && ready.elapsed() < self.ready_wait() {
                        self.wait(Duration::from_millis(250));
                    }
                    if self.instances[i].child.is_none() {
                        continue;
                    }
                    self.instances[i].signal("TERM");
                    let name = self.instances[i].name.clone();
                    match self.wait_exit(i, Duration::from_secs(60)) {
                        Some(status) if status.success() => {}
                        Some(status) => {
                            let tail = self.instances[i].tail(25);
                            self.violation(format!("instance {name} exited with {status} on SIGTERM (a rolling restart); its log's tail:\n{tail}"));
                        }
                        None => self.violation(format!("instance {name} did not exit within 60 s of SIGTERM (killed)")),
                    }
                    self.restart(i);
                    let joined = Instant::now();
                    while !self.instances[i].ready() && joined.elapsed() < self.ready_wait() {
                        self.wait(Duration::from_millis(250));
                    }
                }
                true
            }
            Fault::Partitions => {
                let before = self.progress.partitions.load(Ordering::SeqCst);
                let after = before + 1 + self.rng.below(2) as i32;
                self.say(&format!("fault {n}/{total}: input partitions {before} -> {after}"));
                self.add_partitions(after)
            }
        };
        if survived {
            *self.survived.entry(fault).or_default() += 1;
        }
    }

    /// `kafka.sh start` (it waits until a client can list topics), bounded.
    fn restart_broker(&mut self) -> bool {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.broker_log).expect("broker log");
        let mut child = match Command::new(&self.broker.script).arg("start").stdout(Stdio::null()).stderr(log).spawn() {
            Ok(child) => child,
            Err(e) => {
                self.violation(format!("cannot run {} start: {e}", self.broker.script.display()));
                return false;
            }
        };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(180) {
            if let Ok(Some(status)) = child.try_wait() {
                if status.success() {
                    self.say(&format!("broker back after {:.1} s of kafka.sh start", started.elapsed().as_secs_f64()));
                    return true;
                }
                self.violation(format!("{} start failed ({status}); see {}", self.broker.script.display(), self.broker_log.display()));
                return false;
            }
            self.wait(Duration::from_millis(200));
        }
        let _ = child.kill();
        let _ = child.wait();
        self.violation(format!("{} start did not finish within 180 s", self.broker.script.display()));
        false
    }

    /// CreatePartitions, then wait until the input producer's metadata (a fresh
    /// client's, the same broker) knows them before the sender uses them.
    fn add_partitions(&mut self, total: i32) -> bool {
        let admin = admin(&self.args.brokers);
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let request = [NewPartitions::new(&self.input, total as usize)];
        match futures_executor::block_on(admin.create_partitions(&request, &options)) {
            Ok(results) if results.iter().all(Result::is_ok) => {}
            other => {
                self.violation(format!("CreatePartitions {} -> {total} failed: {other:?}", self.input));
                return false;
            }
        }
        let known = Instant::now();
        while known.elapsed() < Duration::from_secs(30) {
            let count = admin
                .inner()
                .fetch_metadata(Some(&self.input), Duration::from_secs(5))
                .ok()
                .and_then(|m| m.topics().first().map(|t| t.partitions().len() as i32))
                .unwrap_or(0);
            if count >= total {
                // The sender's producer refreshes its metadata when a send names an
                // unknown partition; give it a moment.
                self.wait(Duration::from_millis(500));
                self.progress.partitions.store(total, Ordering::SeqCst);
                return true;
            }
            self.wait(Duration::from_millis(200));
        }
        self.violation(format!("the broker did not show {total} partitions of {} within 30 s", self.input));
        false
    }
}

fn worker_config(args: &Args, mode: &str, group: &str, input: &str, output: &str, dlq: &str) -> String {
    format!(
        r#"# written by chaos-soak
[kafka]
brokers = "{brokers}"
group_id = "{group}"
input_topics = ["{input}"]
output_topic = "{output}"
dead_letter_topic = "{dlq}"
delivery = "{mode}"
[kafka.consumer_properties]
# The default (45 s) would outlive every freeze: 6 s makes a 7-15 s SIGSTOP cost
# the member its partitions, as a long GC pause or a stalled VM would.
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
# New input partitions are found within 2 s (the default is 5 minutes).
"topic.metadata.refresh.interval.ms" = "2000"
[routing]
partitions = {homes}
[state]
sync_writes = true
[worker]
shutdown_timeout = "20s"
"#,
        brokers = args.brokers,
        homes = args.homes,
    )
}

/// One mode: returns its summary lines and violations.
fn run_mode(args: &Args, mode: &'static str, broker: Broker) -> (Vec<String>, Vec<String>) {
    let started = Instant::now();
    let tag = format!("soak.{}", if mode == "exactly-once" { "eos" } else { "alo" });
    let input = unique(&format!("{tag}.in"));
    let output = unique(&format!("{tag}.out"));
    let dlq = unique(&format!("{tag}.dlq"));
    let group = unique(&format!("{tag}.group"));
    let repartition = format!("{group}-repartition");
    create_topics(&args.brokers, &[(&input, args.partitions), (&output, OUTPUT_PARTITIONS), (&dlq, DLQ_PARTITIONS)]);
    let root = args.work_dir.join(mode);
    std::fs::create_dir_all(&root).expect("work dir");
    let config = root.join("waymark.toml");
    std::fs::write(&config, worker_config(args, mode, &group, &input, &output, &dlq)).expect("config");
    let mut rng = Rng::new(args.seed ^ if mode == "exactly-once" { 0xE05 } else { 0xA10 });
    let faults = schedule(&mut rng, args.faults, args.quick);
    eprintln!(
        "[{mode}] group {group}: {} instances, {} events, faults {}; logs in {}",
        args.instances,
        args.events,
        faults.iter().map(|f| f.name()).collect::<Vec<_>>().join(","),
        root.display()
    );

    let progress = Arc::new(Progress::default());
    progress.partitions.store(args.partitions, Ordering::SeqCst);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop_reader = Arc::new(AtomicBool::new(false));
    let reader = {
        let (b, o, d, s, stop) = (args.brokers.clone(), output.clone(), dlq.clone(), seen.clone(), stop_reader.clone());
        std::thread::spawn(move || run_reader(b, o, d, s, stop))
    };
    // Every wait below is bounded; this bounds the sender's pacing waits too.
    let deadline = Instant::now() + Duration::from_secs(120 + args.faults as u64 * (args.fault_every + 90) + args.events as u64 / 20);
    let mut soak = Soak {
        args,
        mode,
        input: input.clone(),
        config: config.clone(),
        rng,
        instances: (0..args.instances)
            .map(|n| {
                let name = format!("w{n}");
                Instance {
                    state_dir: root.join(format!("{name}.state")),
                    log: root.join(format!("{name}.log")),
                    transactional_id: unique(&format!("{tag}.txn.{name}")),
                    name,
                    port: 0,
                    child: None,
                    frozen: false,
                    starts: 0,
                }
            })
            .collect(),
        broker,
        started,
        progress: progress.clone(),
        seen: seen.clone(),
        violations: Vec::new(),
        survived: BTreeMap::new(),
        last_line: Instant::now(),
        broker_log: root.join("broker-restarts.log"),
    };
    for i in 0..soak.instances.len() {
        soak.restart(i);
    }
    let sender = {
        let (a, i, p) = (args.clone(), input.clone(), progress.clone());
        std::thread::spawn(move || run_sender(a, i, p, deadline))
    };

    // The schedule: fault n starts at n * fault_every s (or when fault n-1 ends).
    for (n, fault) in faults.iter().enumerate() {
        let at = soak.started + Duration::from_secs((n as u64 + 1) * args.fault_every);
        soak.wait(at.saturating_duration_since(Instant::now()));
        if Instant::now() > deadline || soak.violations.len() > MAX_UNEXPECTED_EXITS {
            soak.violation(format!("gave up after {n} faults (deadline or too many violations)"));
            break;
        }
        progress.steps.store(n + 1, Ordering::SeqCst);
        soak.fault(n + 1, *fault);
    }
    progress.steps.store(usize::MAX, Ordering::SeqCst);
    soak.say("faults over; producing the rest");
    while !progress.done.load(Ordering::SeqCst) && Instant::now() < deadline {
        soak.wait(Duration::from_millis(200));
    }
    progress.stop.store(true, Ordering::SeqCst);
    let _ = sender.join();
    let failed = progress.failed.load(Ordering::SeqCst);
    if failed > 0 {
        soak.violation(format!("{failed} input records were not delivered (the expected output is then wrong)"));
    }
    let expected = progress.expected.lock().unwrap().clone();
    let expected_bad = progress.expected_bad.lock().unwrap().clone();

    // Settle: every expected milestone and dead letter read, then 5 s more to
    // catch repeats, then the group's lag must reach 0.
    soak.say(&format!("sent everything; waiting up to {} s for {} milestones and {} dead letters", args.settle_timeout, expected.len(), expected_bad.len()));
    let settle = Instant::now();
    loop {
        let complete = {
            let seen = seen.lock().unwrap();
            expected.iter().all(|id| seen.milestones.contains_key(id)) && expected_bad.iter().all(|id| seen.bad.contains_key(id))
        };
        if complete || settle.elapsed() > Duration::from_secs(args.settle_timeout) {
            break;
        }
        if soak.instances.iter().all(|i| i.child.is_none()) {
            soak.violation("no instance left running (each exited too often to restart): the output cannot settle".into());
            break;
        }
        soak.wait(Duration::from_millis(500));
    }
    soak.wait(Duration::from_secs(5));
    let topics = vec![input.clone(), repartition.clone()];
    let mut lag = Err("not measured".to_string());
    let lag_started = Instant::now();
    while lag_started.elapsed() < Duration::from_secs(60) {
        lag = group_lag(&args.brokers, &group, &topics);
        if matches!(&lag, Ok(l) if l.iter().all(|(_, left, _)| *left == 0)) {
            break;
        }
        soak.wait(Duration::from_secs(2));
    }
    soak.wait(Duration::from_secs(1));
    // The final stop: SIGTERM to all, exit 0 expected from each. The children
    // are taken out first, so that the watchdog does not count these exits.
    let mut stopping: Vec<(usize, Child)> = Vec::new();
    for i in 0..soak.instances.len() {
        soak.instances[i].signal("TERM");
        stopping.extend(soak.instances[i].child.take().map(|c| (i, c)));
    }
    let stop_started = Instant::now();
    while !stopping.is_empty() && stop_started.elapsed() < Duration::from_secs(60) {
        let mut still = Vec::new();
        for (i, mut child) in stopping {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => {}
                Ok(Some(status)) => {
                    let tail = soak.instances[i].tail(25);
                    soak.violation(format!("instance {} exited with {status} on the final SIGTERM; its log's tail:\n{tail}", soak.instances[i].name));
                }
                _ => still.push((i, child)),
            }
        }
        stopping = still;
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, mut child) in stopping {
        let _ = child.kill();
        let _ = child.wait();
        soak.violation(format!("instance {} did not exit within 60 s of the final SIGTERM (killed)", soak.instances[i].name));
    }
    stop_reader.store(true, Ordering::SeqCst);
    let _ = reader.join();

    // The checks.
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let missing: Vec<&String> = expected.iter().filter(|id| !seen.milestones.contains_key(*id)).collect();
    if !missing.is_empty() {
        soak.violation(format!("{} of {} expected milestones never came out, e.g. {:?}", missing.len(), expected.len(), &missing[..missing.len().min(3)]));
    }
    let unexpected = seen.milestones.keys().filter(|id| !expected.contains(*id)).count();
    if unexpected > 0 {
        soak.violation(format!("{unexpected} milestones that a correct pipeline would not emit"));
    }
    if mode == "exactly-once" && seen.repeats > 0 {
        let example = seen.milestones.iter().find(|(_, (_, n, _))| *n > 1).map(|(id, (_, n, _))| format!("{id} x{n}"));
        soak.violation(format!("exactly-once: a read_committed reader saw {} repeated milestones, e.g. {example:?}", seen.repeats));
    }
    if !seen.differing.is_empty() {
        soak.violation(format!(
            "re-emitted upserts differ from their first emission (at-least-once repeats must be byte-identical), e.g. {}",
            seen.differing[..seen.differing.len().min(3)].join("; ")
        ));
    }
    if !seen.moved_back.is_empty() {
        soak.violation(format!("{} shipment statuses moved back in output order, e.g. {:?}", seen.moved_back.len(), &seen.moved_back[..seen.moved_back.len().min(3)]));
    }
    if !seen.malformed.is_empty() {
        soak.violation(format!("malformed output: {:?}", seen.malformed));
    }
    let dead_missing: Vec<&String> = expected_bad.iter().filter(|id| !seen.bad.contains_key(*id)).collect();
    if !dead_missing.is_empty() {
        soak.violation(format!("{} of {} bad records have no dead letter, e.g. {:?}", dead_missing.len(), expected_bad.len(), dead_missing.first()));
    }
    let dead_repeats: usize = seen.bad.values().map(|n| *n as usize - 1).sum();
    if mode == "exactly-once" && dead_repeats > 0 {
        soak.violation(format!("exactly-once: {dead_repeats} dead letters came more than once"));
    }
    let dead_unknown = seen.bad.keys().filter(|id| !expected_bad.contains(*id)).count();
    if !seen.unexpected_dead.is_empty() || dead_unknown > 0 {
        soak.violation(format!("{} dead letters for records that are not bad, e.g. {:?}", seen.unexpected_dead.len() + dead_unknown, seen.unexpected_dead.first()));
    }
    let lag_line = match &lag {
        Ok(lags) => {
            for (topic, left, _) in lags {
                if *left > 0 {
                    soak.violation(format!("consumer lag at the end: {left} records of {topic} not consumed by the group"));
                }
            }
            lags.iter().map(|(t, left, raw)| format!("{} {left} (end - committed {raw})", if *t == input { "input" } else { "repartition" })).collect::<Vec<_>>().join(", ")
        }
        Err(e) => {
            soak.violation(format!("cannot measure the group's lag: {e}"));
            "unknown".into()
        }
    };

    let kinds: Vec<String> = Fault::ALL
        .iter()
        .map(|f| format!("{} {}/{}", f.name(), soak.survived.get(f).copied().unwrap_or(0), faults.iter().filter(|x| *x == f).count()))
        .collect();
    let restarts: usize = soak.instances.iter().map(|i| i.starts.saturating_sub(1)).sum();
    let summary = vec![
        format!("[{mode}] seed {}: {} instances, faults survived {} of {}: {}", args.seed, args.instances, soak.survived.values().sum::<usize>(), faults.len(), kinds.join(", ")),
        format!(
            "[{mode}] input: {} events in {} records ({} bad) on {} -> {} partitions; {} instance starts after the first",
            progress.events.load(Ordering::SeqCst),
            progress.records.load(Ordering::SeqCst),
            progress.bad.load(Ordering::SeqCst),
            args.partitions,
            progress.partitions.load(Ordering::SeqCst),
            restarts
        ),
        format!(
            "[{mode}] output: {} records, {} distinct milestones of {} expected, {} repeats ({}), {} dead letters for {} bad records ({} repeats)",
            seen.records,
            seen.milestones.len(),
            expected.len(),
            seen.repeats,
            if mode == "exactly-once" { "must be 0" } else { "byte-identical unless reported" },
            seen.dead_letters,
            expected_bad.len(),
            dead_repeats
        ),
        format!("[{mode}] lag at the end: {lag_line}; wall time {:.0} s", started.elapsed().as_secs_f64()),
    ];
    let violations = std::mem::take(&mut soak.violations);
    drop(soak);
    if violations.is_empty() {
        delete_own_topics(&args.brokers, &tag);
        for n in 0..args.instances {
            let _ = std::fs::remove_dir_all(root.join(format!("w{n}.state")));
        }
    } else {
        eprintln!("[{mode}] topics kept for inspection: {input}, {output}, {dlq}, {repartition}; logs in {}", root.display());
    }
    (summary, violations)
}

fn main() {
    let args = args();
    if !Path::new(&args.waymark).is_file() {
        usage(&format!("--waymark {} is not a file: build it with cargo build --bin waymark", args.waymark));
    }
    println!(
        "chaos-soak: brokers {}, worker {}, seed {} (same seed, same schedule and traffic), {} instances, {} events, {} faults every {} s, modes {}",
        args.brokers,
        args.waymark,
        args.seed,
        args.instances,
        args.events,
        args.faults,
        args.fault_every,
        args.modes.join(", ")
    );
    let mut failed = Vec::new();
    for mode in args.modes.clone() {
        let broker = Broker::find(&args).unwrap_or_else(|e| {
            eprintln!("chaos-soak: broker faults need the kafka.sh broker: {e}");
            std::process::exit(2)
        });
        let (summary, violations) = run_mode(&args, mode, broker);
        for line in &summary {
            println!("{line}");
        }
        if violations.is_empty() {
            println!("[{mode}] PASS");
        } else {
            println!("[{mode}] FAIL: {} violations", violations.len());
            for v in &violations {
                println!("[{mode}]   - {}", v.lines().next().unwrap_or_default());
            }
            failed.push(mode);
        }
    }
    if !failed.is_empty() {
        println!("chaos-soak: FAILED in {} (details above and on stderr; logs in {})", failed.join(", "), args.work_dir.display());
        std::process::exit(1);
    }
    let _ = std::fs::remove_dir_all(&args.work_dir);
    println!("chaos-soak: passed");
}
