//! End-to-end load harness against a real Kafka broker: the worker under test
//! (`waymark run`, spawned from `--waymark PATH`) beside a bare rdkafka
//! consume -> produce pass-through in the same delivery mode (the floor).
//!
//! For each delivery mode it:
//! 1. generates realistic multi-carrier traffic (EasyPost and DHL webhooks with
//!    growing histories, redeliveries at `--duplicates`, out-of-order snapshots
//!    and provider replays; `--keyed` keys records by tracking number, otherwise
//!    no key), counts its records and events (an event is one history entry);
//! 2. runs the floor on a preloaded topic and measures records/s;
//! 3. runs the worker on the same preloaded stream, from its first output to the
//!    last expected milestone (a read_committed reader), sampling its RSS and
//!    CPU from /proc;
//! 4. runs the worker again with the input paced at half its measured rate
//!    (`--rate N` records/s instead) for `--latency-seconds` and reports
//!    end-to-end latency percentiles (input send time to the output record's
//!    arrival at the reader, matched through the upsert's `source` offset) and
//!    the worker's RSS over the run (first and last minute's peaks for runs of
//!    two minutes or more: `--latency-seconds 600` is the memory soak). The
//!    reader is polling before anything is sent; the traffic is generated before
//!    the worker starts (up to 600k records; a longer run generates the rest as
//!    it goes); the clock starts once a first record's milestone came out, and
//!    the first 2 s of paced traffic are not counted. `E2E_LATENCY_DUMP=FILE`
//!    writes (seconds into the run, latency ms) per milestone.
//!
//! ```text
//! cargo build --release --bin waymark
//! cargo run --release --manifest-path benches/Cargo.toml --features e2e --bin e2e-load -- \
//!     --brokers 127.0.0.1:19092 --waymark $CARGO_TARGET_DIR/release/waymark
//! ```
//!
//! Everything is bounded in count and time and talks only to `--brokers`.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use waymark::synth::{generate, SynthCarrier, TrafficSpec};
use waymark::Envelope;

#[derive(Clone)]
struct Args {
    brokers: String,
    waymark: String,
    shipments: usize,
    duplicates: f64,
    keyed: bool,
    partitions: i32,
    latency_seconds: u64,
    /// Records/s of the paced run (default: half the measured maximum).
    rate: Option<f64>,
    modes: Vec<&'static str>,
    /// `home` (the default: the repartition hop) or `input` (the opt-out).
    routing: String,
}

fn args() -> Args {
    let mut a = Args {
        brokers: "127.0.0.1:19092".into(),
        waymark: "target/release/waymark".into(),
        shipments: 4000,
        duplicates: 0.3,
        keyed: false,
        partitions: 4,
        latency_seconds: 20,
        rate: None,
        modes: vec!["at-least-once", "exactly-once"],
        routing: "home".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--brokers" => a.brokers = value(),
            "--waymark" => a.waymark = value(),
            "--shipments" => a.shipments = value().parse().expect("--shipments N"),
            "--duplicates" => a.duplicates = value().parse().expect("--duplicates 0.3"),
            "--partitions" => a.partitions = value().parse().expect("--partitions N"),
            "--latency-seconds" => a.latency_seconds = value().parse().expect("--latency-seconds N"),
            "--rate" => a.rate = Some(value().parse().expect("--rate RECORDS_PER_SECOND")),
            "--keyed" => a.keyed = true,
            "--routing" => a.routing = value(),
            "--mode" => {
                a.modes = match value().as_str() {
                    "at-least-once" => vec!["at-least-once"],
                    "exactly-once" => vec!["exactly-once"],
                    _ => vec!["at-least-once", "exactly-once"],
                }
            }
            "--quick" => {
                a.shipments = 200;
                a.latency_seconds = 5;
            }
            other => panic!("unknown flag {other}; see the header of benches/src/bin/e2e_load.rs"),
        }
    }
    a
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}.{}.{nanos:x}", std::process::id())
}

/// The stream: EasyPost and DHL traffic interleaved, raw topic `topic`.
fn traffic(args: &Args, topic: &str) -> (Vec<Envelope>, usize, usize) {
    let (out, milestones) = chunk(args, topic, 0);
    let pipeline = waymark::Pipeline::default();
    let now = chrono::Utc::now();
    let events = out.iter().filter_map(|e| pipeline.canonical_events(e, now).ok()).map(|(_, ev)| ev.len()).sum();
    (out, events, milestones)
}

/// The `n`-th chunk of `args.shipments` shipments (chunks share no tracking
/// number: each has its own seeds), and its distinct milestones.
fn chunk(args: &Args, topic: &str, n: u64) -> (Vec<Envelope>, usize) {
    let spec = |seed, carrier| TrafficSpec {
        seed,
        shipments: args.shipments / 2,
        carrier,
        topic: topic.to_string(),
        redelivery: args.duplicates,
        ..TrafficSpec::default()
    };
    let mut a = generate(&spec(7 + 2 * n, SynthCarrier::EasyPost));
    let b = generate(&spec(8 + 2 * n, SynthCarrier::Dhl));
    let milestones = a.distinct_events + b.distinct_events;
    a.envelopes.extend(b.envelopes);
    // Interleave deterministically: even positions from one, odd from the other.
    let half = a.envelopes.len() / 2;
    let (first, second) = a.envelopes.split_at(half);
    let mut out = Vec::with_capacity(a.envelopes.len());
    for i in 0..first.len().max(second.len()) {
        out.extend(first.get(i).cloned());
        out.extend(second.get(i).cloned());
    }
    (out, milestones)
}

fn tracking_of(envelope: &Envelope) -> String {
    let body: serde_json::Value = serde_json::from_slice(&envelope.payload).unwrap_or_default();
    body["result"]["tracking_code"].as_str().or_else(|| body["shipments"][0]["id"].as_str()).unwrap_or_default().to_string()
}

fn create_topics(brokers: &str, names: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let topics: Vec<NewTopic> = names.iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1))).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // Admin calls are futures; a tiny executor keeps an async runtime out of this crate.
    let results = futures_executor::block_on(admin.create_topics(&topics, &options)).expect("cannot reach the broker");
    for result in results {
        result.unwrap_or_else(|(topic, e)| panic!("creating {topic}: {e}"));
    }
}

/// Delete every topic this process created (its inputs, outputs and the
/// workers' internal topics, all named after `unique`), so that a series of
/// runs does not fill the broker's disk.
fn delete_own_topics(brokers: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let metadata = match admin.inner().fetch_metadata(None, Duration::from_secs(30)) {
        Ok(metadata) => metadata,
        Err(e) => return eprintln!("e2e-load: cannot list topics to delete them ({e}); `scripts/kafka.sh clean` removes them"),
    };
    let marker = format!(".{}.", std::process::id());
    let own: Vec<String> =
        metadata.topics().iter().map(|t| t.name().to_string()).filter(|n| n.starts_with("bench") && n.contains(&marker)).collect();
    if own.is_empty() {
        return;
    }
    let refs: Vec<&str> = own.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    match futures_executor::block_on(admin.delete_topics(&refs, &options)) {
        Ok(results) => {
            let failed: Vec<String> = results.into_iter().filter_map(|r| r.err().map(|(t, e)| format!("{t}: {e}"))).collect();
            if failed.is_empty() {
                println!("deleted this run's {} topics", own.len());
            } else {
                eprintln!("e2e-load: could not delete {} ({}); `scripts/kafka.sh clean` removes them", failed.join(", "), own.len());
            }
        }
        Err(e) => eprintln!("e2e-load: cannot delete this run's topics ({e}); `scripts/kafka.sh clean` removes them"),
    }
}

/// Delivery reports: count and remember each record's (partition, offset) send time.
#[derive(Default)]
struct Sent {
    acked: AtomicUsize,
    at: Mutex<HashMap<(i32, i64), Instant>>,
    record_times: bool,
}

impl ClientContext for Sent {}
impl ProducerContext for Sent {
    type DeliveryOpaque = Box<Instant>;
    fn delivery(&self, result: &DeliveryResult<'_>, sent_at: Box<Instant>) {
        if let Ok(m) = result {
            if self.record_times {
                self.at.lock().unwrap().insert((m.partition(), m.offset()), *sent_at);
            }
            self.acked.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn producer(brokers: &str, record_times: bool) -> ThreadedProducer<Sent> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create_with_context(Sent { record_times, ..Sent::default() })
        .expect("producer")
}

fn send(p: &ThreadedProducer<Sent>, topic: &str, e: &Envelope, keyed: bool, partitions: i32, i: usize) {
    let mut headers = OwnedHeaders::new();
    for (k, v) in &e.headers {
        headers = headers.insert(Header { key: k, value: v.as_deref() });
    }
    let key = tracking_of(e);
    let mut record: BaseRecord<'_, str, [u8], Box<Instant>> =
        BaseRecord::with_opaque_to(topic, Box::new(Instant::now())).payload(&e.payload[..]).headers(headers);
    record = if keyed { record.key(key.as_str()) } else { record.partition(i as i32 % partitions) };
    loop {
        match p.send(record) {
            Ok(()) => return,
            Err((_, back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

fn preload(args: &Args, topic: &str, records: &[Envelope]) {
    let p = producer(&args.brokers, false);
    for (i, e) in records.iter().enumerate() {
        send(&p, topic, e, args.keyed, args.partitions, i);
    }
    p.flush(Duration::from_secs(120)).expect("preload acknowledged");
}

/// Records per floor batch: the worker's largest adaptive batch (8 x 500), so
/// both commit (and, exactly-once, run a transaction) as rarely.
const FLOOR_BATCH: usize = 4000;

/// The floor: consume -> produce the same bytes, batch by batch, committing
/// offsets after each batch's acknowledgements (at-least-once) or in a
/// transaction with them (exactly-once). Returns records/s.
fn pass_through(args: &Args, mode: &str, input: &str, output: &str, total: usize) -> f64 {
    let group = unique("floor");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[input]).expect("subscribe");
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &args.brokers).set("enable.idempotence", "true").set("linger.ms", "5");
    if mode == "exactly-once" {
        config.set("transactional.id", unique("floor-txn"));
    }
    let producer: ThreadedProducer<Sent> = config.create_with_context(Sent::default()).expect("producer");
    if mode == "exactly-once" {
        producer.init_transactions(Duration::from_secs(30)).expect("init_transactions");
    }
    let mut done = 0usize;
    let mut started: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while done < total && Instant::now() < deadline {
        let mut batch = Vec::new();
        while batch.len() < FLOOR_BATCH {
            match consumer.poll(Duration::from_millis(if batch.is_empty() { 200 } else { 5 })) {
                Some(Ok(m)) => batch.push((m.partition(), m.offset(), m.key().map(<[u8]>::to_vec), m.payload().unwrap_or_default().to_vec())),
                _ => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        started.get_or_insert_with(Instant::now);
        if mode == "exactly-once" {
            producer.begin_transaction().expect("begin");
        }
        let before = producer.context().acked.load(Ordering::SeqCst);
        for (_, _, key, payload) in &batch {
            let mut record: BaseRecord<'_, [u8], [u8], Box<Instant>> = BaseRecord::with_opaque_to(output, Box::new(Instant::now())).payload(&payload[..]);
            if let Some(key) = key {
                record = record.key(&key[..]);
            }
            let mut record = record;
            while let Err((_, back)) = producer.send(record) {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut offsets = TopicPartitionList::new();
        let mut next: HashMap<i32, i64> = HashMap::new();
        for (p, o, _, _) in &batch {
            next.insert(*p, o + 1);
        }
        for (p, o) in &next {
            offsets.add_partition_offset(input, *p, Offset::Offset(*o)).unwrap();
        }
        if mode == "exactly-once" {
            let group = consumer.group_metadata().expect("group metadata");
            producer.send_offsets_to_transaction(&offsets, &group, Duration::from_secs(30)).expect("send offsets");
            // As the worker does: wait for the acknowledgements before the
            // commit, whose flush would otherwise sit in a 100 ms poll (see
            // KafkaTransaction::commit in src/worker/transaction.rs).
            while producer.context().acked.load(Ordering::SeqCst) < before + batch.len() || producer.in_flight_count() > 0 {
                std::thread::yield_now();
            }
            producer.commit_transaction(Duration::from_secs(30)).expect("commit");
        } else {
            while producer.context().acked.load(Ordering::SeqCst) < before + batch.len() {
                std::thread::yield_now();
            }
            consumer.commit(&offsets, CommitMode::Async).expect("commit");
        }
        done += batch.len();
    }
    done as f64 / started.map_or(1.0, |s| s.elapsed().as_secs_f64())
}

/// RSS (bytes) and CPU seconds (user + system) of a process, from /proc.
fn proc_sample(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((rss_kb * 1024, ticks / 100.0))
}

struct Worker {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_worker(args: &Args, mode: &str, input: &str, output: &str, dlq: &str) -> Worker {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("waymark.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\ngroup_id = \"{}\"\ninput_topics = [\"{input}\"]\noutput_topic = \"{output}\"\ndead_letter_topic = \"{dlq}\"\ndelivery = \"{mode}\"\ntransactional_id = \"{}\"\n[state]\ndir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[routing]\nmode = \"{}\"\npartitions = {}\n",
            args.brokers,
            unique("bench-group"),
            unique("bench-txn"),
            dir.path().join("state").display(),
            args.routing,
            args.partitions
        ),
    )
    .expect("config");
    let child = Command::new(&args.waymark)
        .args(["run", "--config"])
        .arg(&config)
        .env("WAYMARK_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} ({e}): build it with cargo build --release", args.waymark));
    Worker { child, _dir: dir }
}

/// Read the output topic (read_committed) until `expected` distinct milestones
/// arrived or `timeout`; returns (arrival per milestone's source, first, last,
/// RSS and CPU samples of `pid` every 500 ms).
fn read_output(args: &Args, output: &str, expected: usize, timeout: Duration, pid: u32) -> Output {
    read_until(args, output, &Expected::fixed(expected), timeout, pid)
}

/// How many milestones a reader waits for: grows while a paced sender is still
/// generating; `done` once it is final.
#[derive(Default)]
struct Expected {
    count: AtomicUsize,
    done: std::sync::atomic::AtomicBool,
    /// Distinct milestones read so far.
    seen: AtomicUsize,
}

impl Expected {
    fn fixed(count: usize) -> Expected {
        Expected { count: AtomicUsize::new(count), done: std::sync::atomic::AtomicBool::new(true), seen: AtomicUsize::new(0) }
    }

    fn reached(&self, seen: usize) -> bool {
        self.done.load(Ordering::SeqCst) && seen >= self.count.load(Ordering::SeqCst)
    }
}

type Output = (HashMap<(i32, i64), Instant>, Option<Instant>, Option<Instant>, Vec<(u64, f64)>);

fn read_until(args: &Args, output: &str, expected: &Expected, timeout: Duration, pid: u32) -> Output {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", unique("bench-reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..args.partitions {
        tpl.add_partition_offset(output, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen: HashMap<String, ()> = HashMap::new();
    let mut arrivals = HashMap::new();
    let (mut first, mut last) = (None, None);
    let mut samples = Vec::new();
    let mut last_sample = Instant::now();
    let started = Instant::now();
    while !expected.reached(seen.len()) && started.elapsed() < timeout {
        if last_sample.elapsed() >= Duration::from_millis(500) {
            samples.extend(proc_sample(pid));
            last_sample = Instant::now();
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            let now = Instant::now();
            let value: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or_default();
            let id = value["milestone_id"].as_str().unwrap_or_default().to_string();
            if seen.insert(id, ()).is_none() {
                expected.seen.fetch_add(1, Ordering::SeqCst);
                first.get_or_insert(now);
                last = Some(now);
                let source = (value["source"]["partition"].as_i64().unwrap_or(-1) as i32, value["source"]["offset"].as_i64().unwrap_or(-1));
                arrivals.entry(source).or_insert(now);
            }
        }
    }
    (arrivals, first, last, samples)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args = args();
    println!(
        "e2e-load: brokers {}, worker {}, {} shipments, duplicates {}, {}, routing {}",
        args.brokers,
        args.waymark,
        args.shipments,
        args.duplicates,
        if args.keyed { "keyed by tracking number" } else { "no keys" },
        args.routing
    );
    for mode in args.modes.clone() {
        let names: Vec<String> = ["in", "floor-out", "out", "dlq", "lat-in", "lat-out", "lat-dlq"].iter().map(|n| unique(&format!("bench.{mode}.{n}"))).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        create_topics(&args.brokers, &refs, args.partitions);
        let (records, events, milestones) = traffic(&args, &names[0]);
        preload(&args, &names[0], &records);
        println!("\n[{mode}] stream: {} records, {events} events, {milestones} distinct milestones", records.len());

        let floor = pass_through(&args, mode, &names[0], &names[1], records.len());
        println!("[{mode}] floor (bare pass-through): {floor:.0} records/s, {:.0} events/s", floor * events as f64 / records.len() as f64);

        let worker = spawn_worker(&args, mode, &names[0], &names[2], &names[3]);
        let (_, first, last, samples) = read_output(&args, &names[2], milestones, Duration::from_secs(900), worker.child.id());
        let (first, last) = (first.expect("no output at all"), last.expect("no output"));
        let seconds = last.duration_since(first).as_secs_f64().max(0.001);
        let rate = records.len() as f64 / seconds;
        let rss_max = samples.iter().map(|s| s.0).max().unwrap_or(0);
        let cpu = match (samples.first(), samples.last()) {
            (Some(a), Some(b)) if samples.len() > 1 => (b.1 - a.1) / (0.5 * (samples.len() - 1) as f64),
            _ => f64::NAN,
        };
        drop(worker);
        println!(
            "[{mode}] waymark: {rate:.0} records/s, {:.0} events/s ({:.2}x the floor), peak RSS {} MiB, {cpu:.2} cores",
            rate * events as f64 / records.len() as f64,
            rate / floor,
            rss_max >> 20
        );

        paced_run(&args, mode, &names[4..7], args.rate.unwrap_or(rate / 2.0).max(1.0));
        delete_own_topics(&args.brokers);
    }
}

/// The worker at a fixed input rate for about `--latency-seconds`: end-to-end
/// latency percentiles (input send to the reader's receipt) and its RSS over
/// the run. The reader is assigned and polling before anything is sent, and the
/// clock starts only once a warm-up record's milestone has come out (the group
/// has assigned the partitions, the repartition topic exists): start-up is not
/// latency. Traffic is generated in whole chunks ahead of the sender (a queue
/// of two), so a long run holds only a few chunks.
/// Seconds of paced traffic before latencies count (the first batches of a
/// fresh worker: connections, metadata, the first fetches of every partition).
const PACED_WARM_UP_SECONDS: u64 = 2;

/// Records of paced traffic generated before the run starts (about 1.6 KiB each).
const PREGENERATED: usize = 600_000;

fn paced_run(args: &Args, mode: &str, topics: &[String], paced: f64) {
    let [input, output, dlq] = topics else { panic!("three topics") };
    let worker = spawn_worker(args, mode, input, output, dlq);
    let pid = worker.child.id();
    let p = producer(&args.brokers, true);
    let expected = Arc::new(Expected::default());
    let reader = {
        let (expected, output, args) = (expected.clone(), output.clone(), args.clone());
        std::thread::spawn(move || read_until(&args, &output, &expected, Duration::from_secs(args.latency_seconds + 300), pid))
    };
    let target = (paced * (args.latency_seconds + PACED_WARM_UP_SECONDS) as f64) as usize;
    // Generating traffic takes a core for a second or more per chunk: on two
    // cores that would show up as the worker's latency. Up to PREGENERATED
    // records are generated before the worker gets any; only longer runs
    // (memory soaks) generate the rest while sending.
    let ahead = target.min(PREGENERATED) / (args.shipments * 10).max(1) + 1;
    let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel::<(Vec<Envelope>, usize)>(ahead);
    let generated = Arc::new(AtomicUsize::new(0));
    {
        let (args, input, generated) = (args.clone(), input.clone(), generated.clone());
        std::thread::spawn(move || {
            let mut queued = 0usize;
            for n in 1000.. {
                let (records, milestones) = chunk(&args, &input, n);
                queued += records.len();
                generated.fetch_add(1, Ordering::SeqCst);
                if chunks_tx.send((records, milestones)).is_err() || queued >= target {
                    break;
                }
            }
            generated.store(usize::MAX, Ordering::SeqCst);
        });
    }
    while generated.load(Ordering::SeqCst) < ahead {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Warm-up: the first record alone, until its milestone is read.
    let (mut records, milestones) = chunks_rx.recv().expect("a first chunk");
    expected.count.store(milestones, Ordering::SeqCst);
    let warm_up = Instant::now();
    send(&p, input, &records.remove(0), args.keyed, args.partitions, 0);
    while expected.seen.load(Ordering::SeqCst) == 0 {
        assert!(warm_up.elapsed() < Duration::from_secs(120), "the worker emitted no milestone within 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "[{mode}] warm-up: first milestone {:.1} s after the first record; pacing at {paced:.0} records/s, measuring after {PACED_WARM_UP_SECONDS} s",
        warm_up.elapsed().as_secs_f64()
    );
    let pacing = Instant::now();
    let clock = pacing + Duration::from_secs(PACED_WARM_UP_SECONDS);
    let mut sent = 0usize;
    loop {
        for e in &records {
            if let Some(wait) = (pacing + Duration::from_secs_f64(sent as f64 / paced)).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            send(&p, input, e, args.keyed, args.partitions, sent + 1);
            sent += 1;
        }
        match chunks_rx.recv() {
            Ok((next, milestones)) => {
                records = next;
                expected.count.fetch_add(milestones, Ordering::SeqCst);
            }
            Err(_) => break,
        }
    }
    let sending = pacing.elapsed().as_secs_f64();
    expected.done.store(true, Ordering::SeqCst);
    p.flush(Duration::from_secs(60)).ok();
    let (arrivals, _, _, samples) = reader.join().expect("reader");
    drop(worker);
    let read = expected.seen.load(Ordering::SeqCst);
    let wanted = expected.count.load(Ordering::SeqCst);
    let sent_at = p.context().at.lock().unwrap().clone();
    let mut latencies: Vec<f64> = arrivals
        .iter()
        .filter_map(|(source, arrived)| sent_at.get(source).filter(|at| **at >= clock).map(|at| arrived.duration_since(*at).as_secs_f64() * 1000.0))
        .collect();
    if let Ok(path) = std::env::var("E2E_LATENCY_DUMP") {
        // (seconds since the clock started, latency ms) per milestone, for plots.
        let mut lines: Vec<(f64, f64)> = arrivals
            .iter()
            .filter_map(|(source, arrived)| {
                let at = sent_at.get(source).filter(|at| **at >= clock)?;
                Some((at.duration_since(clock).as_secs_f64(), arrived.duration_since(*at).as_secs_f64() * 1000.0))
            })
            .collect();
        lines.sort_by(|a, b| a.0.total_cmp(&b.0));
        let text: String = lines.iter().map(|(t, l)| format!("{t:.3} {l:.1}\n")).collect();
        std::fs::write(&path, text).expect("E2E_LATENCY_DUMP");
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    println!(
        "[{mode}] latency at {:.0} records/s ({sent} records over {sending:.0} s), {read} of {wanted} milestones read: p50 {:.1} ms, p99 {:.1} ms, p999 {:.1} ms, max {:.1} ms",
        sent as f64 / sending.max(0.001),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    rss_report(mode, &samples);
}

/// RSS over a paced run, sampled every 500 ms: the first and the last minute's
/// peaks for runs of two minutes or more (is memory flat?), else min and max.
fn rss_report(mode: &str, samples: &[(u64, f64)]) {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let peak = |s: &[(u64, f64)]| s.iter().map(|x| x.0).max().unwrap_or(0);
    if samples.len() >= 240 {
        let minutes: Vec<String> = samples.chunks(120).map(|minute| format!("{:.0}", mib(peak(minute)))).collect();
        println!("[{mode}] RSS peak per minute (MiB): {}", minutes.join(" "));
        let (first, last) = (peak(&samples[..120]), peak(&samples[samples.len() - 120..]));
        println!(
            "[{mode}] RSS over {:.0} s: first minute peak {:.0} MiB, last minute peak {:.0} MiB ({:+.1}%), overall peak {:.0} MiB",
            samples.len() as f64 / 2.0,
            mib(first),
            mib(last),
            (last as f64 / first.max(1) as f64 - 1.0) * 100.0,
            mib(peak(samples))
        );
    } else {
        let low = samples.iter().map(|x| x.0).min().unwrap_or(0);
        println!("[{mode}] RSS over {:.0} s: {:.0} to {:.0} MiB", samples.len() as f64 / 2.0, mib(low), mib(peak(samples)));
    }
}
