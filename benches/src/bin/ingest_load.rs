//! Load harness of the webhook receiver (`waymark ingest`, spawned from
//! `--waymark PATH`) against a real Kafka broker, on loopback, beside two
//! floors: what the receiver costs over the broker alone and over its HTTP
//! stack alone.
//!
//! In one run, in this order:
//! 1. creates a fresh topic (`--partitions`, replication 1);
//! 2. produce floor: a bare rdkafka `FutureProducer` with the receiver's
//!    settings (idempotent, `acks=all`, `linger.ms=0`, lz4) and its record (the
//!    fixture body, its key and headers); `--connections` tasks each send and
//!    await the acknowledgement in a closed loop for `--seconds`: records/s and
//!    send-to-ack latency;
//! 3. HTTP floor: an in-process axum/hyper HTTP/1.1 server on the receiver's
//!    stack (two runtime threads, keep-alive, the same router and connection
//!    builder) whose handler reads the body and verifies its EasyPost v1
//!    signature, then answers 200 without producing; closed loop as above;
//! 4. the receiver: `waymark ingest` with one EasyPost source on the topic;
//!    (a) closed loop for `--seconds`: its maximum rate; (b) open loop at half
//!    that rate for `--seconds`, requests due at fixed times spread over the
//!    connections, latency counted from the due time (a late answer delays the
//!    next request on its connection, and that delay is counted: no coordinated
//!    omission); its RSS every second over (a) and (b); then SIGTERM, which
//!    must end it with 0 within 30 s, and the topic must hold at least as
//!    many of its records as it answered 200 (end offsets, nothing consumed).
//!
//! Every request is the 3.5 KB EasyPost webhook of
//! `fixtures/easypost/client_library_event_body.json` with its v1 signature (secret
//! `sécret`); one body means one key, so every record of a run goes to one
//! partition, for the floor as for the receiver. The client is hyper's own
//! HTTP/1.1 connection on a single-threaded runtime (the cheapest client there
//! is: the machine's cores are the servers'); requests/s counts 200 answers
//! (acknowledged records for the produce floor) over the time from the start
//! (the first due time, open loop) to the last answer. Stdout gets a table and one
//! `json: ` line; progress goes to stderr. The run fails (exit 1) when an
//! answer was not 200, a request got no answer, the receiver did not stop
//! cleanly or the topic holds fewer records than 200 answers. `--quick`
//! (2 s, 8 connections) is the test script's smoke run; its figures mean
//! nothing.
//!
//! ```text
//! cargo build --release --bin waymark
//! cargo run --release --manifest-path benches/Cargo.toml --features ingest --bin ingest-load -- \
//!     --brokers 127.0.0.1:19092 --waymark $CARGO_TARGET_DIR/release/waymark \
//!     [--seconds 10] [--connections 128] [--partitions 4] [--quick]
//! ```
//!
//! Everything is bounded in count and time and talks only to `--brokers` and
//! loopback.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use waymark::ingest::auth::{easypost_key, HeaderList, Headers, Presented, Scheme};

/// The allocator the `waymark` binary ships with, so the in-process HTTP floor
/// allocates as the receiver does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The webhook every request carries.
const BODY: &[u8] = include_bytes!("../../../fixtures/easypost/client_library_event_body.json");
/// Its EasyPost webhook secret (not ASCII: the key is its NFKD form).
const SECRET: &str = "sécret";
/// `X-Hmac-Signature` of [`BODY`] under [`SECRET`]; checked at start, so a
/// changed fixture fails with a clear message rather than 401s.
const SIGNATURE: &str = "hmac-sha256-hex=38f3f53c103713df81616a0a186d77141957323ec21d5fe9363db93840f527db";
/// The source (and path) of the receiver's configuration and of the HTTP floor.
const SOURCE: &str = "easypost";
const WEBHOOK_PATH: &str = "/webhooks/easypost";
const TENANT: &str = "bench";

const MAX_SECONDS: u64 = 3600;
/// Below the receiver's default `ingest.max_connections` (1024), which would
/// close the connections over it.
const MAX_CONNECTIONS: usize = 1000;
/// A count bound for every load loop besides its time bound.
const MAX_REQUESTS_PER_CONNECTION: u64 = 100_000_000;
/// Longer than the receiver's `ingest.ack_timeout` (10 s): a record the broker
/// does not acknowledge is answered 503 before the client gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The receiver's `message.timeout.ms` for the default `ingest.ack_timeout`
/// (src/cli/ingest.rs): the produce floor gives up on a record as it does.
const MESSAGE_TIMEOUT_MS: &str = "10000";
/// Pause after a failed connect before the next attempt (closed loop).
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// The open loop's first request is due this long after the tasks start, so
/// that connecting is not counted as the first requests' latency.
const OPEN_LOOP_LEAD: Duration = Duration::from_millis(200);
/// The open loop stops sending this long after its last request was due (the
/// rest is counted as not sent).
const OPEN_LOOP_GRACE: Duration = Duration::from_secs(30);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const RSS_INTERVAL: Duration = Duration::from_secs(1);
/// The HTTP floor's `header_read_timeout`: the receiver's default.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The HTTP floor's body limit: the receiver's default `limits.max_body_bytes`.
const MAX_BODY_BYTES: usize = 1 << 20;
/// Connections the HTTP floor's accept loop takes before it stops accepting.
const MAX_ACCEPTED_CONNECTIONS: usize = 1_000_000;
/// The broker's answer to admin and metadata requests.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

struct Args {
    brokers: String,
    waymark: String,
    seconds: u64,
    connections: usize,
    partitions: i32,
}

fn args() -> Args {
    // 128 connections by default: a closed loop's rate is connections over
    // latency, and at 32 the receiver's ~1.7 ms per request (which includes the
    // broker's acknowledgement) capped it well below what it can serve.
    let mut a = Args { brokers: "127.0.0.1:19092".into(), waymark: "target/release/waymark".into(), seconds: 10, connections: 128, partitions: 4 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--brokers" => a.brokers = value(),
            "--waymark" => a.waymark = value(),
            "--seconds" => a.seconds = value().parse().expect("--seconds N"),
            "--connections" => a.connections = value().parse().expect("--connections N"),
            "--partitions" => a.partitions = value().parse().expect("--partitions N"),
            "--quick" => {
                a.seconds = 2;
                a.connections = 8;
            }
            other => panic!("unknown flag {other}; see the header of benches/src/bin/ingest_load.rs"),
        }
    }
    assert!((1..=MAX_SECONDS).contains(&a.seconds), "--seconds must be 1 to {MAX_SECONDS}");
    assert!((1..=MAX_CONNECTIONS).contains(&a.connections), "--connections must be 1 to {MAX_CONNECTIONS}");
    assert!(a.partitions >= 1, "--partitions must be at least 1");
    a
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}.{}.{nanos:x}", std::process::id())
}

fn progress(line: std::fmt::Arguments<'_>) {
    eprintln!("ingest-load: {line}");
}

/// The EasyPost scheme as the receiver builds it for `secrets = ["sécret"]`
/// (src/ingest/config.rs: the NFKD key first, then the secret as written).
fn easypost_scheme() -> Scheme {
    Scheme::EasyPost { secrets: vec![easypost_key(SECRET), SECRET.as_bytes().to_vec()], basic: Vec::new(), tolerance: Duration::from_secs(300) }
}

fn check_fixture_signature() {
    let headers = [("x-hmac-signature", SIGNATURE)];
    let presented = Presented { method: "POST", path: WEBHOOK_PATH, query: None, headers: &HeaderList(&headers), body: BODY };
    if let Err(failure) = easypost_scheme().verify(&presented, chrono::Utc::now().timestamp()) {
        panic!("the fixture's signature does not verify ({failure}): fixtures/easypost/client_library_event_body.json changed; update SIGNATURE in benches/src/bin/ingest_load.rs");
    }
}

/// The record key the receiver gives the body (src/ingest/keys.rs: EasyPost's
/// `result.tracking_code`).
fn tracking_code(body: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(body).expect("the fixture is JSON");
    value["result"]["tracking_code"].as_str().expect("the fixture has result.tracking_code").to_string()
}

// ---------------------------------------------------------------------------------
// Kafka: the topic, its end offsets

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new().set("bootstrap.servers", brokers).create().expect("cannot create the Kafka admin client")
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)).request_timeout(Some(ADMIN_TIMEOUT))
}

fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    // Admin calls are plain futures; a tiny executor does, as in e2e-load.
    let results = futures_executor::block_on(admin(brokers).create_topics(&[new], &admin_options()))
        .unwrap_or_else(|e| panic!("cannot create topic {topic} on {brokers}: {e} (is the broker running?)"));
    for result in results {
        result.unwrap_or_else(|(topic, e)| panic!("creating {topic}: {e}"));
    }
}

/// The run writes about a gigabyte a minute: delete its topic afterwards
/// (`scripts/kafka.sh clean` removes one a failed run left).
fn delete_topic(brokers: &str, topic: &str) {
    match futures_executor::block_on(admin(brokers).delete_topics(&[topic], &admin_options())) {
        Ok(results) => {
            for result in results {
                if let Err((topic, e)) = result {
                    progress(format_args!("could not delete {topic} ({e}); `scripts/kafka.sh clean` removes it"));
                }
            }
        }
        Err(e) => progress(format_args!("could not delete {topic} ({e}); `scripts/kafka.sh clean` removes it")),
    }
}

/// Records in the topic: the sum of its partitions' end offsets.
fn records_in(brokers: &str, topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("bench-ingest-load-offsets"))
        .create()
        .expect("cannot create the Kafka consumer");
    (0..partitions)
        .map(|p| consumer.fetch_watermarks(topic, p, ADMIN_TIMEOUT).unwrap_or_else(|e| panic!("end offset of {topic}[{p}]: {e}")).1)
        .sum()
}

// ---------------------------------------------------------------------------------
// Tallies and figures

/// What one load task saw.
#[derive(Default)]
struct Tally {
    /// 200 answers (acknowledged records for the produce floor).
    ok: u64,
    /// Other answers, by status.
    other: BTreeMap<u16, u64>,
    /// Requests without an answer: connection errors, timeouts.
    failed: u64,
    first_failure: Option<String>,
    /// Open loop: requests not sent because the run ran past its grace time.
    unsent: u64,
    /// Microseconds from send (closed loop) or due time (open loop) to the
    /// whole answer, for every answer whatever its status.
    latencies_us: Vec<u32>,
}

impl Tally {
    fn answered(&mut self, status: u16, latency: Duration) {
        if status == 200 {
            self.ok += 1;
        } else {
            *self.other.entry(status).or_default() += 1;
        }
        self.latencies_us.push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
    }

    fn failed(&mut self, why: String) {
        self.failed += 1;
        self.first_failure.get_or_insert(why);
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        for (status, count) in other.other {
            *self.other.entry(status).or_default() += count;
        }
        self.failed += other.failed;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
        self.unsent += other.unsent;
        self.latencies_us.extend(other.latencies_us);
    }

    fn not_ok(&self) -> u64 {
        self.other.values().sum()
    }
}

/// One row of the table.
struct Figures {
    name: &'static str,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    ok: u64,
    not_ok: u64,
    other: BTreeMap<u16, u64>,
    failed: u64,
    first_failure: Option<String>,
    unsent: u64,
    seconds: f64,
}

impl Figures {
    fn of(name: &'static str, mut tally: Tally, elapsed: Duration) -> Figures {
        tally.latencies_us.sort_unstable();
        let ms = |p: f64| percentile(&tally.latencies_us, p);
        let seconds = elapsed.as_secs_f64().max(1e-3);
        Figures {
            name,
            per_second: tally.ok as f64 / seconds,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            max_ms: ms(1.0),
            ok: tally.ok,
            not_ok: tally.not_ok(),
            other: tally.other.clone(),
            failed: tally.failed,
            first_failure: tally.first_failure.take(),
            unsent: tally.unsent,
            seconds,
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "per_second": self.per_second,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "ok": self.ok,
            "not_ok": self.not_ok,
            "not_ok_by_status": self.other.iter().map(|(s, n)| (s.to_string(), *n)).collect::<BTreeMap<_, _>>(),
            "failed": self.failed,
            "unsent": self.unsent,
            "seconds": self.seconds,
        })
    }

    fn report(&self) {
        progress(format_args!(
            "{}: {:.0}/s over {:.1} s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} ok, {} other answers {:?}, {} without answer{})",
            self.name,
            self.per_second,
            self.seconds,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.ok,
            self.not_ok,
            self.other,
            self.failed,
            self.first_failure.as_deref().map(|why| format!(", first: {why}")).unwrap_or_default()
        ));
    }
}

/// The `p` quantile (nearest rank) of sorted microseconds, in milliseconds.
fn percentile(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    sorted_us[((sorted_us.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

// ---------------------------------------------------------------------------------
// The HTTP client

/// The client's runtime: one thread, so the client takes as little of the
/// machine as it can (each request is a few microseconds of its time).
fn client_runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("cannot start the client's runtime")
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(port: u16) -> Result<Sender, String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| format!("connecting to 127.0.0.1:{port}: {e}"))?;
    // As the servers do: an answer must not wait for Nagle's timer.
    stream.set_nodelay(true).map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the server closes the connection.
        let _ = connection.await;
    });
    Ok(sender)
}

/// `POST /webhooks/easypost` with the fixture and its signature.
fn webhook_request(host: &HeaderValue, body: &Bytes) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body.clone()));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = Uri::from_static(WEBHOOK_PATH);
    let headers = request.headers_mut();
    headers.insert(HOST, host.clone());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("x-hmac-signature", HeaderValue::from_static(SIGNATURE));
    request
}

/// Send one request and read its whole answer (so the connection can carry the
/// next); returns the status and the answer's text.
async fn exchange(sender: &mut Sender, request: Request<Full<Bytes>>) -> Result<(u16, Bytes), String> {
    sender.ready().await.map_err(|e| format!("connection closed: {e}"))?;
    let response = sender.send_request(request).await.map_err(|e| format!("request failed: {e}"))?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(|e| format!("reading the answer: {e}"))?.to_bytes();
    Ok((status, body))
}

/// How a load task sends.
#[derive(Clone, Copy)]
enum Pace {
    /// Each connection sends its next request as soon as it has the previous
    /// answer, until `until`.
    Closed { until: Instant },
    /// Request `i` (counted over all connections) is due at `start + i / rate`;
    /// connection `c` of `connections` sends requests c, c + connections, ...
    /// Nothing is sent after `give_up`.
    Open { start: Instant, rate: f64, total: u64, connections: u64, give_up: Instant },
}

/// One connection's requests.
async fn drive(port: u16, index: u64, pace: Pace, body: Bytes) -> Tally {
    let host = HeaderValue::from_str(&format!("127.0.0.1:{port}")).expect("a valid Host header");
    let mut tally = Tally::default();
    let mut sender = match connect(port).await {
        Ok(sender) => Some(sender),
        Err(why) => {
            tally.failed(why);
            None
        }
    };
    for k in 0..MAX_REQUESTS_PER_CONNECTION {
        let due = match pace {
            Pace::Closed { until } => {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                now
            }
            Pace::Open { start, rate, total, connections, give_up } => {
                let i = index + k * connections;
                if i >= total {
                    break;
                }
                if Instant::now() >= give_up {
                    tally.unsent += (total - i).div_ceil(connections);
                    break;
                }
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                // Tokio's timer ticks in milliseconds: a request leaves up to
                // 1 ms after its due time, and that is counted in its latency
                // (the HTTP floor paced so reads p50 1.3 ms, p99 2.6 ms at 7.5k/s).
                tokio::time::sleep_until(due.into()).await;
                due
            }
        };
        if sender.is_none() {
            match connect(port).await {
                Ok(connected) => sender = Some(connected),
                Err(why) => {
                    tally.failed(why);
                    if matches!(pace, Pace::Closed { .. }) {
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                    }
                    continue;
                }
            }
        }
        let Some(connection) = sender.as_mut() else { continue };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange(connection, webhook_request(&host, &body))).await {
            Ok(Ok((status, _))) => tally.answered(status, due.elapsed()),
            Ok(Err(why)) => {
                tally.failed(why);
                sender = None;
            }
            Err(_) => {
                tally.failed(format!("no answer within {REQUEST_TIMEOUT:?}"));
                sender = None;
            }
        }
    }
    tally
}

/// `connections` tasks at `pace`; the tally and the time from the start (the
/// first due time for the open loop) to the last answer.
fn load(runtime: &Runtime, port: u16, connections: usize, pace: Pace) -> (Tally, Duration) {
    let body = Bytes::from_static(BODY);
    let began = match pace {
        Pace::Closed { .. } => Instant::now(),
        Pace::Open { start, .. } => start,
    };
    let tally = runtime.block_on(async {
        let tasks: Vec<_> = (0..connections as u64).map(|index| tokio::spawn(drive(port, index, pace, body.clone()))).collect();
        let mut total = Tally::default();
        for task in tasks {
            total.merge(task.await.expect("a load task panicked"));
        }
        total
    });
    (tally, began.elapsed())
}

/// One request before the clock starts: connections and first-use costs are
/// not measured, and a receiver that refuses the webhook stops the run with its
/// answer rather than a table of errors.
fn warm_up(runtime: &Runtime, port: u16, what: &str) -> Result<(), String> {
    let body = Bytes::from_static(BODY);
    runtime.block_on(async {
        let host = HeaderValue::from_str(&format!("127.0.0.1:{port}")).expect("a valid Host header");
        let mut sender = connect(port).await?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange(&mut sender, webhook_request(&host, &body))).await;
        match answer {
            Ok(Ok((200, _))) => Ok(()),
            Ok(Ok((status, text))) => Err(format!("{what} answered {status} to the warm-up webhook: {}", String::from_utf8_lossy(&text).trim())),
            Ok(Err(why)) => Err(format!("{what}: warm-up webhook: {why}")),
            Err(_) => Err(format!("{what}: no answer to the warm-up webhook within {REQUEST_TIMEOUT:?}")),
        }
    })
}

// ---------------------------------------------------------------------------------
// Floor: bare produce and await

/// A producer with the receiver's settings (src/worker/client.rs
/// `producer_config`, src/cli/ingest.rs `message.timeout.ms`).
fn receiver_like_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", MESSAGE_TIMEOUT_MS)
        .create()
        .expect("cannot create the Kafka producer")
}

/// The headers the receiver writes on each record (src/ingest/server.rs `produce`).
fn receiver_headers() -> OwnedHeaders {
    let received_at = chrono::Utc::now().timestamp_millis().to_string();
    OwnedHeaders::new_with_capacity(4)
        .insert(Header { key: "carrier", value: Some("easypost") })
        .insert(Header { key: "received-at", value: Some(received_at.as_str()) })
        .insert(Header { key: "source", value: Some(SOURCE) })
        .insert(Header { key: "tenant-id", value: Some(TENANT) })
}

async fn produce_and_await(producer: &FutureProducer, topic: &str, key: &str, body: &[u8]) -> Result<(), String> {
    let record = FutureRecord::to(topic).payload(body).key(key).headers(receiver_headers());
    // Queue full: wait for room (up to the whole request time) as a closed loop can.
    match tokio::time::timeout(REQUEST_TIMEOUT, producer.send(record, Timeout::After(REQUEST_TIMEOUT))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(format!("not acknowledged: {e}")),
        Err(_) => Err(format!("no acknowledgement within {REQUEST_TIMEOUT:?}")),
    }
}

fn produce_floor(runtime: &Runtime, args: &Args, topic: &str, key: &str) -> Figures {
    let producer = receiver_like_producer(&args.brokers);
    // The first record waits for the producer id and the partition's leader:
    // start-up, not throughput.
    runtime
        .block_on(produce_and_await(&producer, topic, key, BODY))
        .unwrap_or_else(|why| panic!("produce floor: the first record to {topic}: {why}"));
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let tally = runtime.block_on(async {
        let tasks: Vec<_> = (0..args.connections)
            .map(|_| {
                let (producer, topic, key) = (producer.clone(), topic.to_string(), key.to_string());
                tokio::spawn(async move {
                    let mut tally = Tally::default();
                    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
                        if Instant::now() >= until {
                            break;
                        }
                        let sent = Instant::now();
                        match produce_and_await(&producer, &topic, &key, BODY).await {
                            Ok(()) => tally.answered(200, sent.elapsed()),
                            Err(why) => tally.failed(why),
                        }
                    }
                    tally
                })
            })
            .collect();
        let mut total = Tally::default();
        for task in tasks {
            total.merge(task.await.expect("a produce task panicked"));
        }
        total
    });
    Figures::of("produce-floor", tally, started.elapsed())
}

// ---------------------------------------------------------------------------------
// Floor: the HTTP stack, verifying and answering without producing

/// Header lookup over a request's headers, as the receiver's (src/ingest/server.rs).
struct HeaderLookup<'a>(&'a HeaderMap);

impl Headers for HeaderLookup<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The receiver's handler up to producing: find the source, read the body
/// (bounded), verify the signature, answer as it does.
async fn floor_webhook(State(scheme): State<Arc<Scheme>>, Path(source): Path<String>, headers: HeaderMap, body: Body) -> Response {
    if source != SOURCE {
        return (StatusCode::NOT_FOUND, "no such source\n").into_response();
    }
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return (StatusCode::BAD_REQUEST, "the body could not be read\n").into_response();
    };
    let presented = Presented { method: "POST", path: WEBHOOK_PATH, query: None, headers: &HeaderLookup(&headers), body: &body };
    match scheme.verify(&presented, chrono::Utc::now().timestamp()) {
        Ok(_) => (StatusCode::OK, [("content-type", "text/plain; charset=utf-8")], "accepted\n").into_response(),
        Err(_) => (StatusCode::UNAUTHORIZED, "unauthorized\n").into_response(),
    }
}

/// The accept loop of src/http.rs `serve_router`: TCP_NODELAY, hyper's
/// HTTP/1.1 connection with the receiver's header timeout, keep-alive.
async fn serve_floor(listener: TcpListener, router: Router) {
    for _ in 0..MAX_ACCEPTED_CONNECTIONS {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of file descriptors, say: back off instead of spinning.
                progress(format_args!("http floor: accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).keep_alive(true);
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

fn http_floor(client: &Runtime, args: &Args) -> Result<Figures, String> {
    // The receiver's runtime has a worker per core: two here.
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("http-floor")
        .enable_all()
        .build()
        .expect("cannot start the HTTP floor's runtime");
    let router = Router::new().route("/webhooks/{source}", post(floor_webhook)).with_state(Arc::new(easypost_scheme()));
    let listener = server.block_on(TcpListener::bind("127.0.0.1:0")).expect("cannot bind the HTTP floor to 127.0.0.1:0");
    let port = listener.local_addr().expect("the HTTP floor's address").port();
    let accepting = server.spawn(serve_floor(listener, router));
    let result = warm_up(client, port, "the HTTP floor").map(|()| {
        let (tally, elapsed) = load(client, port, args.connections, Pace::Closed { until: Instant::now() + Duration::from_secs(args.seconds) });
        Figures::of("http-floor", tally, elapsed)
    });
    accepting.abort();
    // The clients have closed their connections; whatever is left is cut.
    server.shutdown_timeout(Duration::from_secs(1));
    result
}

// ---------------------------------------------------------------------------------
// The receiver: `waymark ingest`

/// The spawned receiver; killed if the harness ends before it stopped it.
struct Ingest {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0 to find a free port");
    listener.local_addr().expect("a bound address").port()
}

/// A TOML basic string: a JSON string is one for any text (same escapes).
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

fn spawn_ingest(args: &Args, topic: &str) -> Ingest {
    let dir = tempfile::tempdir().expect("cannot create a temporary directory");
    let port = free_port();
    let config = dir.path().join("waymark.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = {}\n\n[ingest]\nlisten = \"127.0.0.1:{port}\"\n\n[[ingest.sources]]\nname = \"{SOURCE}\"\ncarrier = \"easypost\"\ntenant = \"{TENANT}\"\ntopic = {}\nauth = {{ scheme = \"easypost\", secrets = [{}] }}\n",
            toml_string(&args.brokers),
            toml_string(topic),
            toml_string(SECRET),
        ),
    )
    .expect("cannot write the receiver's configuration");
    let child = Command::new(&args.waymark)
        .args(["ingest", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("WAYMARK_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} ({e}): build it with cargo build --release --bin waymark", args.waymark));
    Ingest { child, port, _dir: dir }
}

/// `GET path` on loopback: the status, or `None` when nothing answered.
fn http_get_status(port: u16, path: &str) -> Option<u16> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = StdTcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").ok()?;
    // The status line is all that is needed; the answer is a few hundred bytes.
    let mut head = [0u8; 64];
    let read = stream.read(&mut head).ok()?;
    let line = std::str::from_utf8(&head[..read]).ok()?;
    line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn wait_ready(ingest: &mut Ingest) -> Result<Duration, String> {
    let started = Instant::now();
    while started.elapsed() < READY_TIMEOUT {
        if let Ok(Some(status)) = ingest.child.try_wait() {
            return Err(format!("waymark ingest exited at start with {status} (its log is above)"));
        }
        if http_get_status(ingest.port, "/readyz") == Some(200) {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("waymark ingest did not answer /readyz with 200 within {READY_TIMEOUT:?} (last: {:?})", http_get_status(ingest.port, "/readyz")))
}

/// SIGTERM, and the exit within [`STOP_TIMEOUT`]: its status and how long it took.
fn stop(ingest: &mut Ingest) -> Result<(ExitStatus, Duration), String> {
    let pid = ingest.child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().map_err(|e| format!("cannot run kill -TERM {pid}: {e}"))?;
    if !sent.success() {
        return Err(format!("kill -TERM {pid} failed ({sent})"));
    }
    let started = Instant::now();
    while started.elapsed() < STOP_TIMEOUT {
        match ingest.child.try_wait() {
            Ok(Some(status)) => return Ok((status, started.elapsed())),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for waymark ingest: {e}")),
        }
    }
    Err(format!("waymark ingest did not exit within {STOP_TIMEOUT:?} of SIGTERM"))
}

/// VmRSS of a process, in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Samples a process's RSS every [`RSS_INTERVAL`] on its own thread until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u64>>,
}

impl RssSampler {
    fn start(pid: u32, max_samples: usize) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while samples.len() < max_samples && !stopped.load(Ordering::SeqCst) {
                samples.extend(rss_bytes(pid));
                // Sleep in short steps, so that stopping does not wait a second.
                let slept = Instant::now();
                while slept.elapsed() < RSS_INTERVAL && !stopped.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // The last sample is the end of the load, whatever the phase of the interval.
            samples.extend(rss_bytes(pid));
            samples
        });
        RssSampler { stop, thread }
    }

    fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the RSS sampler panicked")
    }
}

struct IngestRun {
    max: Figures,
    half: Option<Figures>,
    half_target: f64,
    rss: Vec<u64>,
    ready_after: Duration,
    warm_up_ok: u64,
    stopped: Result<(ExitStatus, Duration), String>,
}

fn ingest_runs(client: &Runtime, args: &Args, topic: &str) -> Result<IngestRun, String> {
    let mut ingest = spawn_ingest(args, topic);
    let ready_after = wait_ready(&mut ingest)?;
    progress(format_args!("waymark ingest (pid {}) ready on 127.0.0.1:{} after {:.1} s", ingest.child.id(), ingest.port, ready_after.as_secs_f64()));
    warm_up(client, ingest.port, "waymark ingest")?;
    // Two runs, a sample a second, and slack for the tails.
    let sampler = RssSampler::start(ingest.child.id(), (2 * args.seconds + 120) as usize);

    progress(format_args!("ingest max: closed loop, {} connections, {} s", args.connections, args.seconds));
    let (tally, elapsed) = load(client, ingest.port, args.connections, Pace::Closed { until: Instant::now() + Duration::from_secs(args.seconds) });
    let max = Figures::of("ingest-max", tally, elapsed);
    max.report();

    let half_target = max.per_second / 2.0;
    let half = if half_target > 0.0 {
        progress(format_args!("ingest half rate: open loop at {half_target:.0}/s over {} connections, {} s", args.connections, args.seconds));
        let start = Instant::now() + OPEN_LOOP_LEAD;
        let total = (half_target * args.seconds as f64).round().max(1.0) as u64;
        let give_up = start + Duration::from_secs(args.seconds) + OPEN_LOOP_GRACE;
        let pace = Pace::Open { start, rate: half_target, total, connections: args.connections as u64, give_up };
        let (tally, elapsed) = load(client, ingest.port, args.connections, pace);
        let half = Figures::of("ingest-half-rate", tally, elapsed);
        half.report();
        Some(half)
    } else {
        None
    };
    let rss = sampler.finish();
    let stopped = stop(&mut ingest);
    Ok(IngestRun { max, half, half_target, rss, ready_after, warm_up_ok: 1, stopped })
}

// ---------------------------------------------------------------------------------

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn row(f: &Figures) -> String {
    format!("{:<18} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>10} {:>8} {:>8}", f.name, f.per_second, f.p50_ms, f.p99_ms, f.max_ms, f.ok, f.not_ok, f.failed)
}

fn main() -> ExitCode {
    let args = args();
    check_fixture_signature();
    if !std::path::Path::new(&args.waymark).is_file() {
        panic!("--waymark {}: no such file (build it with cargo build --release --bin waymark)", args.waymark);
    }
    let key = tracking_code(BODY);
    let topic = unique("bench.ingest-load");
    progress(format_args!(
        "brokers {}, receiver {}, {} s per run, {} connections, body {} bytes (EasyPost v1 signature), topic {topic} ({} partitions)",
        args.brokers,
        args.waymark,
        args.seconds,
        args.connections,
        BODY.len(),
        args.partitions
    ));
    create_topic(&args.brokers, &topic, args.partitions);
    let client = client_runtime();
    let mut failures: Vec<String> = Vec::new();

    progress(format_args!("produce floor: {} tasks, produce and await, {} s", args.connections, args.seconds));
    let produce = produce_floor(&client, &args, &topic, &key);
    produce.report();
    if produce.failed > 0 {
        failures.push(format!("produce floor: {} records not acknowledged", produce.failed));
    }

    progress(format_args!("http floor: closed loop, {} connections, {} s", args.connections, args.seconds));
    let http = match http_floor(&client, &args) {
        Ok(http) => {
            http.report();
            if http.not_ok + http.failed > 0 {
                failures.push(format!("http floor: {} answers not 200, {} without answer", http.not_ok, http.failed));
            }
            Some(http)
        }
        Err(why) => {
            failures.push(why);
            None
        }
    };

    // What the floor wrote, so that the receiver's records can be told apart.
    let before_ingest = records_in(&args.brokers, &topic, args.partitions);
    let run = ingest_runs(&client, &args, &topic);
    let in_topic = records_in(&args.brokers, &topic, args.partitions) - before_ingest;
    delete_topic(&args.brokers, &topic);

    let mut json = serde_json::json!({
        "seconds": args.seconds,
        "connections": args.connections,
        "partitions": args.partitions,
        "body_bytes": BODY.len(),
        "produce_floor": produce.json(),
        "http_floor": http.as_ref().map(Figures::json),
    });
    println!("{:<18} {:>12} {:>9} {:>9} {:>9} {:>10} {:>8} {:>8}", "run", "requests/s", "p50 ms", "p99 ms", "max ms", "200", "other", "failed");
    println!("{}", row(&produce));
    if let Some(http) = &http {
        println!("{}", row(http));
    }
    match run {
        Err(why) => failures.push(why),
        Ok(run) => {
            println!("{}", row(&run.max));
            if let Some(half) = &run.half {
                println!("{}   (target {:.0}/s, {} not sent)", row(half), run.half_target, half.unsent);
            }
            let (first, last, peak) = (run.rss.first().copied().unwrap_or(0), run.rss.last().copied().unwrap_or(0), run.rss.iter().copied().max().unwrap_or(0));
            println!("ingest RSS (MiB, every {} s, {} samples): first {:.1}, peak {:.1}, last {:.1}", RSS_INTERVAL.as_secs(), run.rss.len(), mib(first), mib(peak), mib(last));
            let over_http = http.as_ref().map_or(f64::NAN, |h| run.max.per_second / h.per_second);
            let over_produce = run.max.per_second / produce.per_second;
            println!("ingest-max / http-floor: {over_http:.2}   ingest-max / produce-floor: {over_produce:.2}");
            let answered_ok = run.warm_up_ok + run.max.ok + run.half.as_ref().map_or(0, |h| h.ok);
            let stop_text = match &run.stopped {
                Ok((status, took)) => format!("{status} {:.1} s after SIGTERM", took.as_secs_f64()),
                Err(why) => why.clone(),
            };
            println!("receiver: ready after {:.1} s; {answered_ok} answered 200, {in_topic} records in the topic; {stop_text}", run.ready_after.as_secs_f64());

            for figures in std::iter::once(&run.max).chain(&run.half) {
                if figures.not_ok + figures.failed + figures.unsent > 0 {
                    failures.push(format!(
                        "{}: {} answers not 200 {:?}, {} without answer{}, {} not sent",
                        figures.name,
                        figures.not_ok,
                        figures.other,
                        figures.failed,
                        figures.first_failure.as_deref().map(|why| format!(" (first: {why})")).unwrap_or_default(),
                        figures.unsent
                    ));
                }
            }
            if run.half.is_none() {
                failures.push("ingest-half-rate: not run (no 200 answer in the closed loop)".into());
            }
            match &run.stopped {
                Ok((status, _)) if status.success() => {}
                Ok((status, _)) => failures.push(format!("waymark ingest ended with {status} after SIGTERM, not 0")),
                Err(why) => failures.push(why.clone()),
            }
            if in_topic < answered_ok as i64 {
                failures.push(format!("the topic holds {in_topic} records of the receiver's, fewer than its {answered_ok} 200 answers"));
            }
            let record = json.as_object_mut().expect("a JSON object");
            record.insert("ingest_max".into(), run.max.json());
            record.insert("ingest_half_rate".into(), run.half.as_ref().map(Figures::json).unwrap_or_default());
            record.insert("ingest_half_rate_target".into(), run.half_target.into());
            record.insert("ingest_rss_mib".into(), serde_json::json!({"first": mib(first), "peak": mib(peak), "last": mib(last), "samples": run.rss.len()}));
            record.insert("ratio_ingest_http_floor".into(), over_http.into());
            record.insert("ratio_ingest_produce_floor".into(), over_produce.into());
            record.insert("ingest_answered_200".into(), answered_ok.into());
            record.insert("ingest_records_in_topic".into(), in_topic.into());
            record.insert("ingest_exit".into(), run.stopped.as_ref().ok().and_then(|(s, _)| s.code()).into());
        }
    }
    let record = json.as_object_mut().expect("a JSON object");
    record.insert("passed".into(), failures.is_empty().into());
    record.insert("failures".into(), failures.clone().into());
    println!("json: {json}");
    if failures.is_empty() {
        progress(format_args!("passed"));
        ExitCode::SUCCESS
    } else {
        for failure in &failures {
            progress(format_args!("FAILED: {failure}"));
        }
        ExitCode::FAILURE
    }
}
