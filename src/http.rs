//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz`, `/readyz`, and,
//! with a bearer token configured, `/explain`; and [`serve_router`], the one
//! HTTP/1.1 accept loop (hyper and axum) of this endpoint and of `waymark ingest`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::telemetry::*;

/// Install the Prometheus recorder for this process (once), with the buckets of
/// every histogram of [`CATALOG`]; `describe_and_zero` then describes them.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new();
    for metric in CATALOG {
        if let Kind::Histogram(buckets) = metric.kind {
            builder = builder.set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(metric.name.into()), buckets)?;
        }
    }
    Ok(builder.install_recorder()?)
}

/// Liveness and readiness, shared with the HTTP endpoint.
///
/// Every time in here is on one clock: milliseconds since this `Health` was
/// made, read from the monotonic clock. The wall clock never enters: a step of
/// it (which the guarded clock of the pipeline refuses) must not make a worker
/// look stalled, nor hide a stall.
#[derive(Debug)]
pub struct Health {
    /// The worker has its store open and its consumer subscribed.
    pub ready: AtomicBool,
    /// The worker hit a fatal error (liveness fails, so an orchestrator restarts it).
    pub failed: AtomicBool,
    /// Partitions assigned to this instance right now.
    pub assigned: AtomicUsize,
    /// Assigned partitions still waiting for their state's restore.
    pub restoring: AtomicUsize,
    /// Input topics the broker does not know (missing or misspelled), or that
    /// this worker may not read.
    pub missing_inputs: AtomicUsize,
    /// At least one broker connection is up (librdkafka's statistics).
    pub broker_up: AtomicBool,
    /// Records not read yet over the assigned partitions: each partition's end
    /// minus the consumer's own position (statistics).
    pub lag: AtomicI64,
    /// Liveness fails when the worker loop stood still, or there is lag and no
    /// batch completed, for this long (ms; 0: never).
    pub stall_after_ms: AtomicI64,
    /// Shutdown: every in-flight batch is committed; only closing the consumer
    /// (leaving the group) remains, which a rebalance in progress can hold up.
    pub drained: AtomicBool,
    epoch: Instant,
    /// When the worker loop last turned (ms since `epoch`).
    heartbeat_ms: AtomicI64,
    /// When a batch last completed, a restore last moved, or the worker started.
    progress_ms: AtomicI64,
    /// When the batch now being delivered was handed over (-1: none is).
    delivering_since_ms: AtomicI64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            ready: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            assigned: AtomicUsize::new(0),
            restoring: AtomicUsize::new(0),
            missing_inputs: AtomicUsize::new(0),
            broker_up: AtomicBool::new(false),
            lag: AtomicI64::new(0),
            stall_after_ms: AtomicI64::new(0),
            drained: AtomicBool::new(false),
            epoch: Instant::now(),
            heartbeat_ms: AtomicI64::new(0),
            progress_ms: AtomicI64::new(0),
            delivering_since_ms: AtomicI64::new(-1),
        }
    }
}

impl Health {
    /// Now, on this `Health`'s clock.
    pub fn now_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis().min(i64::MAX as u128) as i64
    }

    /// The worker loop turned (it is not blocked).
    pub fn beat(&self) {
        self.heartbeat_ms.store(self.now_ms(), Ordering::SeqCst);
    }

    /// A batch completed or a restore moved forward (or the worker started).
    pub fn mark_progress(&self) {
        let now = self.now_ms();
        self.progress_ms.store(now, Ordering::SeqCst);
        self.heartbeat_ms.store(now, Ordering::SeqCst);
    }

    /// A batch was handed to the delivery thread (`true`), or its delivery
    /// ended (`false`).
    pub fn delivering(&self, started: bool) {
        self.delivering_since_ms.store(if started { self.now_ms() } else { -1 }, Ordering::SeqCst);
    }

    /// `Err(why)` when the worker is dead or stuck: it failed; its loop has not
    /// turned for `stall_after_ms`; a batch has been in delivery that long (a
    /// delivery that cannot finish, while nothing new arrives to wait behind
    /// it); or it has records to read (lag) and has completed no batch for
    /// that long.
    pub fn liveness(&self) -> Result<(), String> {
        self.liveness_at(self.now_ms())
    }

    /// [`Health::liveness`] at `now_ms` on this `Health`'s clock.
    pub fn liveness_at(&self, now_ms: i64) -> Result<(), String> {
        if self.failed.load(Ordering::SeqCst) {
            return Err("failed".into());
        }
        let stall_after = self.stall_after_ms.load(Ordering::SeqCst);
        if stall_after <= 0 {
            return Ok(());
        }
        let stuck = now_ms.saturating_sub(self.heartbeat_ms.load(Ordering::SeqCst));
        if stuck > stall_after {
            return Err(format!(
                "stuck: the worker loop has not turned for {} s (a batch's delivery cannot finish: see the log for the broker's answers)",
                stuck / 1000
            ));
        }
        let delivering_since = self.delivering_since_ms.load(Ordering::SeqCst);
        if delivering_since >= 0 && now_ms.saturating_sub(delivering_since) > stall_after {
            return Err(format!(
                "stuck: a batch has been in delivery for {} s (the broker does not acknowledge it: see the log for its answers)",
                now_ms.saturating_sub(delivering_since) / 1000
            ));
        }
        let lag = self.lag.load(Ordering::SeqCst);
        let idle = now_ms.saturating_sub(self.progress_ms.load(Ordering::SeqCst));
        if lag > 0 && idle > stall_after {
            return Err(format!("stalled: {lag} records to process and no batch completed for {} s", idle / 1000));
        }
        Ok(())
    }

    /// `Err(why)` unless subscribed, with partitions assigned and restored, a
    /// broker reachable and every input topic known.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::SeqCst) {
            return Err("not ready: starting or stopping".into());
        }
        if !self.broker_up.load(Ordering::SeqCst) {
            return Err("not ready: no broker reachable".into());
        }
        let missing = self.missing_inputs.load(Ordering::SeqCst);
        if missing > 0 {
            return Err(format!("not ready: {missing} input topic(s) missing or not readable (see waymark_input_topic_missing and the log)"));
        }
        if self.assigned.load(Ordering::SeqCst) == 0 {
            return Err("not ready: no partitions assigned".into());
        }
        let restoring = self.restoring.load(Ordering::SeqCst);
        if restoring > 0 {
            return Err(format!("not ready: restoring the state of {restoring} partition(s)"));
        }
        Ok(())
    }
}

/// What `/explain` asks: `?shipment=TENANT:CARRIER:TRACKING` or
/// `?record=TOPIC:PARTITION:OFFSET` (percent-decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExplainQuery {
    Shipment(String),
    Record(String),
}

/// Answers `/explain` queries as JSON, or `Err((status, reason))`. It runs on a
/// blocking thread (it reads the state store, and for a record, Kafka).
pub type Explainer = dyn Fn(ExplainQuery) -> Result<String, (u16, String)> + Send + Sync;

/// `/explain`, served only with a token: it shows tenants' tracking data.
#[derive(Clone)]
pub struct ExplainRoute {
    pub token: String,
    pub explainer: Arc<Explainer>,
}

/// Serve `/metrics`, `/healthz`, `/readyz` (and `/explain` when `explain` is
/// given) until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    health: Arc<Health>,
    explain: Option<ExplainRoute>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let render = handle.clone();
    let router = Router::new()
        .route("/metrics", get(move || std::future::ready(render.render())))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/explain", get(explain_response))
        .fallback(|method: Method| async move {
            if method == Method::GET {
                plain(StatusCode::NOT_FOUND, "try /metrics, /healthz, /readyz or /explain\n".into())
            } else {
                plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into())
            }
        })
        .with_state(Endpoint { health, explain });
    let upkeep = spawn_upkeep(handle);
    // Operator endpoints: a few connections, no keep-alive, short timeouts (a
    // slow or hostile client cannot take the descriptors the store and Kafka need).
    let limits = ServeLimits { max_connections: MAX_CONNECTIONS, header_timeout: Duration::from_secs(5), keep_alive: false, drain_timeout: Duration::from_secs(2) };
    serve_router(listener, router, limits, shutdown).await;
    upkeep.abort();
}

/// Drain the recorder's buffered histogram samples into their buckets every 5 s.
/// Without this tick a process nobody scrapes would grow without bound (several
/// samples per record or request). Abort the task to stop it.
pub fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    })
}

#[derive(Clone)]
struct Endpoint {
    health: Arc<Health>,
    explain: Option<ExplainRoute>,
}

async fn healthz(State(endpoint): State<Endpoint>) -> Response {
    match endpoint.health.liveness() {
        Ok(()) => plain(StatusCode::OK, "ok\n".into()),
        Err(why) => plain(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn readyz(State(endpoint): State<Endpoint>) -> Response {
    match endpoint.health.readiness() {
        Ok(()) => plain(StatusCode::OK, "ready\n".into()),
        Err(why) => plain(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// `/explain`: off without a token (404 saying how to turn it on), 401 without
/// the right `Authorization: Bearer` header (compared in constant time), 400
/// for a query it cannot read; otherwise the explainer's JSON.
async fn explain_response(State(endpoint): State<Endpoint>, headers: HeaderMap, Query(query): Query<Vec<(String, String)>>) -> Response {
    let Some(route) = endpoint.explain else {
        return plain(StatusCode::NOT_FOUND, "/explain is off: set http.explain_token (WAYMARK_HTTP__EXPLAIN_TOKEN) to turn it on\n".into());
    };
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), route.token.as_bytes()) {
        return plain(StatusCode::UNAUTHORIZED, "/explain needs `Authorization: Bearer <http.explain_token>`\n".into());
    }
    let mut asked = None;
    for (name, value) in query {
        asked = match name.as_str() {
            "shipment" => Some(ExplainQuery::Shipment(value)),
            "record" => Some(ExplainQuery::Record(value)),
            _ => asked,
        };
    }
    let Some(asked) = asked else {
        return plain(StatusCode::BAD_REQUEST, "ask /explain?shipment=TENANT:CARRIER:TRACKING or /explain?record=TOPIC:PARTITION:OFFSET\n".into());
    };
    let explainer = route.explainer.clone();
    match tokio::task::spawn_blocking(move || explainer(asked)).await {
        Ok(Ok(json)) => (StatusCode::OK, [("content-type", "application/json")], json).into_response(),
        Ok(Err((code, why))) => plain(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), format!("{why}\n")),
        Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "the explanation failed (a bug: see the log)\n".into()),
    }
}

/// Equal bytes, in a time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn plain(status: StatusCode, text: String) -> Response {
    (status, [("content-type", "text/plain; charset=utf-8")], text).into_response()
}

/// Most HTTP connections served at once by the worker's endpoint; more are closed on accept.
const MAX_CONNECTIONS: usize = 64;

/// Bounds of an HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// A request's head must arrive within this.
    pub header_timeout: Duration,
    /// Keep connections open between requests.
    pub keep_alive: bool,
    /// On shutdown, requests in flight get this long to finish.
    pub drain_timeout: Duration,
}

/// Serve `router` on `listener` (HTTP/1.1, hyper) until `shutdown` resolves,
/// then stop accepting and let the requests in flight finish (up to
/// `drain_timeout`). Every request carries the peer's [`ConnectInfo`]. The one
/// accept loop of both the worker's operator endpoint and `waymark ingest`.
pub async fn serve_router(listener: TcpListener, router: Router, limits: ServeLimits, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, say: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting an HTTP connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Over the cap the connection is closed at once.
                let Ok(permit) = connections.clone().try_acquire_owned() else { continue };
                let _ = stream.set_nodelay(true);
                let router = router.clone();
                let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    tower::Service::call(&mut router.clone(), request)
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(limits.keep_alive);
                let connection = graceful.watch(builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _ = connection.await;
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(timeout = ?limits.drain_timeout, "HTTP requests still in flight at the end of the drain time were cut off");
    }
}

/// Bind an HTTP listener (fails early with a clear message naming `setting`).
pub async fn bind_for(addr: SocketAddr, setting: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e} (set {setting} to a free address)"))
}

/// Bind the worker's HTTP endpoint (fails early with a clear message).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    bind_for(addr, "http.listen / WAYMARK_HTTP_LISTEN").await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use crate::dedupe::Verdict;
    use crate::event::Status;
    use crate::order::Applied;
    use crate::pipeline::{EventOutcome, RecordResult};

    #[test]
    fn outcomes_become_the_documented_metrics() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let telemetry = Telemetry::new(false);
        let outcome = |verdict, applied| EventOutcome { verdict, status: Status::InTransit, occurred_at: chrono::DateTime::UNIX_EPOCH, applied };
        let result = RecordResult {
            carrier: Some("ups".into()),
            tenant_id: Some("acme".into()),
            events: vec![
                outcome(Verdict::New, Applied { regression_prevented: true, out_of_order: true, ..Applied::default() }),
                outcome(Verdict::DuplicateHash, Applied::default()),
                outcome(Verdict::DuplicateKey { collision: true }, Applied::default()),
                outcome(Verdict::DuplicateHash, Applied::default()),
            ],
            ..RecordResult::default()
        };
        metrics::with_local_recorder(&recorder, || telemetry.record(&result, Duration::from_micros(50)));
        let text = handle.render();
        for line in [
            "waymark_events_total{carrier=\"ups\",outcome=\"new\"} 1",
            "waymark_events_total{carrier=\"ups\",outcome=\"duplicate_hash\"} 2",
            "waymark_events_total{carrier=\"ups\",outcome=\"duplicate_key\"} 1",
            "waymark_dedupe_hit_ratio{carrier=\"ups\"} 0.75",
            "waymark_milestones_emitted_total{carrier=\"ups\",status=\"in_transit\"} 1",
            "waymark_status_regressions_prevented_total{carrier=\"ups\"} 1",
            "waymark_out_of_order_total{carrier=\"ups\"} 1",
            "waymark_key_collisions_total{carrier=\"ups\"} 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
        let tenant_labels = Telemetry::new(true);
        metrics::with_local_recorder(&recorder, || tenant_labels.record(&result, Duration::from_micros(50)));
        assert!(handle.render().contains("waymark_events_total{carrier=\"ups\",tenant=\"acme\",outcome=\"new\"} 1"));
    }

    #[test]
    fn liveness_fails_only_when_there_is_work_and_no_progress() {
        let health = Health::default();
        health.stall_after_ms.store(60_000, Ordering::SeqCst);
        health.mark_progress();
        let t0 = health.now_ms();
        // The loop keeps turning (heartbeats) in every case below but the last.
        let at = |ms: i64| {
            health.heartbeat_ms.store(ms, Ordering::SeqCst);
            health.liveness_at(ms)
        };
        assert!(at(t0 + 3_600_000).is_ok(), "idle without lag is healthy");
        health.lag.store(617, Ordering::SeqCst);
        assert!(at(t0 + 60_000).is_ok(), "at the limit: still healthy");
        let why = at(t0 + 60_001).unwrap_err();
        assert!(why.contains("617") && why.contains("60 s"), "{why}");
        health.progress_ms.store(t0 + 60_000, Ordering::SeqCst);
        assert!(at(t0 + 60_001).is_ok(), "progress resets the clock");
        health.lag.store(0, Ordering::SeqCst);
        health.delivering_since_ms.store(t0 + 60_001, Ordering::SeqCst);
        assert!(at(t0 + 120_001).is_ok(), "a delivery of a minute is not stuck yet");
        let why = at(t0 + 120_002).unwrap_err();
        assert!(why.contains("in delivery"), "a delivery that never ends is stuck, though the loop turns and nothing is left to read: {why}");
        health.delivering(false);
        let why = health.liveness_at(t0 + 120_002 + 60_001).unwrap_err();
        assert!(why.starts_with("stuck"), "a loop that stopped turning is stuck, whatever the last lag said: {why}");
        health.stall_after_ms.store(0, Ordering::SeqCst);
        assert!(health.liveness_at(i64::MAX).is_ok(), "0 switches the check off");
    }

    /// Progress and the check read one monotonic clock, this `Health`'s: the
    /// wall clock (whose steps the pipeline's guarded clock refuses) never
    /// enters, so a step neither makes a working worker look stalled nor hides
    /// a stall.
    #[test]
    fn progress_and_liveness_share_one_monotonic_clock() {
        let health = Health::default();
        health.stall_after_ms.store(60_000, Ordering::SeqCst);
        health.lag.store(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        health.mark_progress();
        let marked = health.progress_ms.load(Ordering::SeqCst);
        assert!((20..=health.now_ms()).contains(&marked), "progress at {marked} ms is not on the health clock");
        assert!(health.liveness().is_ok());
    }

    #[test]
    fn connections_are_capped_so_idle_clients_cannot_take_every_descriptor() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let handle = PrometheusBuilder::new().build_recorder().handle();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(serve(listener, handle, Arc::new(Health::default()), None, async {
                let _ = stopped.await;
            }));
            let get = || async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
                let mut response = String::new();
                let _ = stream.read_to_string(&mut response).await;
                response.split_whitespace().nth(1).unwrap_or("closed").to_string()
            };
            // MAX_CONNECTIONS clients that connect and say nothing.
            let mut idle = Vec::new();
            for _ in 0..MAX_CONNECTIONS {
                idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(get().await, "closed", "over the cap, a connection is closed at once");
            drop(idle);
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(get().await, "200", "once they are gone, requests are served again");
            let _ = stop.send(());
            server.await.unwrap();
        });
    }

    #[test]
    fn health_and_readiness_endpoints() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let health = Arc::new(Health::default());
            let handle = PrometheusBuilder::new().build_recorder().handle();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(serve(listener, handle, health.clone(), None, async {
                let _ = stopped.await;
            }));
            let get = |path: &'static str| async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
                let mut response = String::new();
                stream.read_to_string(&mut response).await.unwrap();
                response.split_whitespace().nth(1).unwrap().to_string()
            };
            assert_eq!(get("/healthz").await, "200");
            assert_eq!(get("/readyz").await, "503");
            health.ready.store(true, Ordering::SeqCst);
            assert_eq!(get("/readyz").await, "503", "no broker, no partitions: not ready");
            health.broker_up.store(true, Ordering::SeqCst);
            assert_eq!(get("/readyz").await, "503", "no partitions: not ready");
            health.assigned.store(3, Ordering::SeqCst);
            assert_eq!(get("/readyz").await, "200");
            health.failed.store(true, Ordering::SeqCst);
            assert_eq!(get("/healthz").await, "503");
            assert_eq!(get("/metrics").await, "200");
            assert_eq!(get("/nope").await, "404");
            let _ = stop.send(());
            server.await.unwrap();
        });
    }

    /// `/explain` is off without a token, refuses a missing or wrong one, reads
    /// percent-encoded queries, and hands them to the explainer.
    #[test]
    fn explain_needs_its_token_and_reads_the_query() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async {
            let start = |explain: Option<ExplainRoute>| async move {
                let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
                let addr = listener.local_addr().unwrap();
                let handle = PrometheusBuilder::new().build_recorder().handle();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let server = tokio::spawn(serve(listener, handle, Arc::new(Health::default()), explain, async {
                    let _ = stopped.await;
                }));
                (addr, stop, server)
            };
            let get = |addr: SocketAddr, target: &'static str, token: Option<&'static str>| async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
                stream.write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n").as_bytes()).await.unwrap();
                let mut response = String::new();
                let _ = stream.read_to_string(&mut response).await;
                let status = response.split_whitespace().nth(1).unwrap_or("closed").to_string();
                (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
            };

            let (addr, stop, server) = start(None).await;
            let (status, body) = get(addr, "/explain?shipment=a:b:c", Some("0123456789abcdef")).await;
            assert_eq!(status, "404");
            assert!(body.contains("http.explain_token"), "{body}");
            let _ = stop.send(());
            server.await.unwrap();

            let explainer: Arc<Explainer> = Arc::new(|query| match query {
                ExplainQuery::Shipment(s) => Ok(format!("{{\"shipment\":{s:?}}}")),
                ExplainQuery::Record(_) => Err((404, "no such record".into())),
            });
            let (addr, stop, server) = start(Some(ExplainRoute { token: "0123456789abcdef".into(), explainer })).await;
            assert_eq!(get(addr, "/explain?shipment=a:b:c", None).await.0, "401");
            assert_eq!(get(addr, "/explain?shipment=a:b:c", Some("0123456789abcdeX")).await.0, "401");
            assert_eq!(get(addr, "/explain?shipment=a:b:c", Some("0123456789abcde")).await.0, "401", "a prefix of the token is not the token");
            let (status, body) = get(addr, "/explain?shipment=acme%3Aups%3A1Z+9", Some("0123456789abcdef")).await;
            assert_eq!(status, "200");
            assert_eq!(body, "{\"shipment\":\"acme:ups:1Z 9\"}");
            assert_eq!(get(addr, "/explain?record=t:0:1", Some("0123456789abcdef")).await.0, "404");
            assert_eq!(get(addr, "/explain?nothing=1", Some("0123456789abcdef")).await.0, "400");
            let _ = stop.send(());
            server.await.unwrap();
        });
    }
}
