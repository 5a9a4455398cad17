//! The webhook receiver: `POST /webhooks/<source>[/<tenant>]`, verified, produced
//! to the source's raw topic byte for byte, and answered only once the broker
//! has acknowledged the record.
//!
//! The answers, and why:
//! - 200: the record is on the broker (`acks=all`, idempotent producer).
//! - 401: authentication failed (never produced); 404: no such source.
//! - 413: the body is over `limits.max_body_bytes`; 408: it did not arrive
//!   within `ingest.body_timeout`.
//! - 503 with `Retry-After`: the broker did not acknowledge within
//!   `ingest.ack_timeout`, or the producer's queue is full, or the receiver is
//!   stopping. The provider retries; a record that did land after all is a
//!   duplicate the worker absorbs, never a loss.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics::{counter, gauge, histogram};
use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::auth::{AuthFailure, Headers, Presented, ReplayGuard, Scheme};
use super::config::{IngestSettings, Source, TenantFrom};
use crate::telemetry::{INGEST_ACK_SECONDS, INGEST_AUTH_FAILURES, INGEST_BROKER_UP, INGEST_BYTES, INGEST_IN_FLIGHT, INGEST_REQUESTS};

/// The wall clock of signature timestamps and `received-at` (unix ms). Injected
/// so tests can verify stale and future timestamps without waiting.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The producer's context: librdkafka reports a broker outage many times a
/// second; this logs the first report and then one line per 10 s with the
/// number left out, so an outage cannot flood the log.
#[derive(Default)]
pub struct ProducerLog {
    last: Mutex<Option<Instant>>,
    suppressed: std::sync::atomic::AtomicU64,
}

impl ClientContext for ProducerLog {
    fn error(&self, error: KafkaError, reason: &str) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(10)) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(error = %error, suppressed, "Kafka producer: {reason} (requests are answered 503 until the broker acknowledges again)");
    }
}

/// The receiver's producer.
pub type IngestProducer = FutureProducer<ProducerLog>;

/// One source with its mutable parts: the replay guard and (ShipEngine) the
/// keys re-read from the JWKS file.
struct SourceState {
    source: Source,
    scheme: RwLock<Scheme>,
    replays: Mutex<ReplayGuard>,
    metrics: SourceMetrics,
}

/// A source's metric handles, registered once: a request updates them without
/// building label sets or looking series up (authentication failures, rare,
/// still go through the macro).
struct SourceMetrics {
    /// By [`Outcome`] (its discriminant).
    outcomes: [metrics::Counter; Outcome::ALL.len()],
    bytes: metrics::Counter,
    ack_seconds: metrics::Histogram,
}

impl SourceMetrics {
    fn new(source: &str) -> SourceMetrics {
        SourceMetrics {
            outcomes: Outcome::ALL.map(|outcome| counter!(INGEST_REQUESTS, "source" => source.to_string(), "outcome" => outcome.label())),
            bytes: counter!(INGEST_BYTES, "source" => source.to_string()),
            ack_seconds: histogram!(INGEST_ACK_SECONDS, "source" => source.to_string()),
        }
    }
}

/// Everything a request needs.
pub struct Receiver {
    settings: IngestSettings,
    max_body_bytes: usize,
    sources: HashMap<String, SourceState>,
    producer: IngestProducer,
    clock: Clock,
    /// The broker answered the last metadata request and every topic exists.
    broker_ready: AtomicBool,
    /// SIGTERM received: readiness fails so the load balancer stops sending.
    draining: AtomicBool,
    in_flight: metrics::Gauge,
}

impl Receiver {
    pub fn new(settings: IngestSettings, max_body_bytes: usize, producer: IngestProducer, clock: Clock) -> Arc<Receiver> {
        let sources = settings
            .sources
            .iter()
            .map(|source| {
                let state = SourceState {
                    scheme: RwLock::new(source.scheme.clone()),
                    replays: Mutex::new(ReplayGuard::new(settings.replay_capacity)),
                    metrics: SourceMetrics::new(&source.name),
                    source: source.clone(),
                };
                (source.name.clone(), state)
            })
            .collect();
        Arc::new(Receiver {
            settings,
            max_body_bytes,
            sources,
            producer,
            clock,
            broker_ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            in_flight: gauge!(INGEST_IN_FLIGHT),
        })
    }

    /// The routes: webhooks, and the operator endpoints beside them.
    pub fn router(self: &Arc<Self>, metrics: metrics_exporter_prometheus::PrometheusHandle) -> Router {
        Router::new()
            .route("/webhooks/{source}", post(webhook))
            .route("/webhooks/{source}/{tenant}", post(webhook_with_tenant))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(move || std::future::ready(metrics.render())))
            .with_state(self.clone())
    }

    /// Stop answering ready (SIGTERM): in-flight requests still complete.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The producer, to flush on shutdown.
    pub fn producer(&self) -> &IngestProducer {
        &self.producer
    }

    /// Ask the broker for every source's topic; readiness follows the answer.
    /// Runs on a blocking thread (librdkafka's metadata call blocks).
    pub fn probe_broker(&self, timeout: Duration) -> Result<(), String> {
        let result = (|| {
            let metadata = self.producer.client().fetch_metadata(None, timeout).map_err(|e| format!("no broker answered: {e}"))?;
            for state in self.sources.values() {
                let topic = &state.source.topic;
                let known = metadata.topics().iter().any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
                if !known {
                    return Err(format!("topic {topic} (source {}) does not exist: create it, or set the source's topic", state.source.name));
                }
            }
            Ok(())
        })();
        self.broker_ready.store(result.is_ok(), Ordering::SeqCst);
        gauge!(INGEST_BROKER_UP).set(if result.is_ok() { 1.0 } else { 0.0 });
        result
    }
}

async fn readyz(State(receiver): State<Arc<Receiver>>) -> Response {
    if receiver.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: stopping\n").into_response();
    }
    if !receiver.broker_ready.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: the broker is not reachable or a source's topic is missing (see waymark_ingest_broker_up and the log)\n").into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

async fn webhook(State(receiver): State<Arc<Receiver>>, ConnectInfo(peer): ConnectInfo<SocketAddr>, Path(source): Path<String>, method: Method, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    receive(&receiver, peer, &source, None, &method, &uri, &headers, body).await
}

async fn webhook_with_tenant(
    State(receiver): State<Arc<Receiver>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((source, tenant)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    receive(&receiver, peer, &source, Some(&tenant), &method, &uri, &headers, body).await
}

/// The request's fate, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
enum Outcome {
    Accepted,
    Unauthorized,
    TooLarge,
    Timeout,
    Unavailable,
    BadRequest,
}

impl Outcome {
    /// In discriminant order.
    const ALL: [Outcome; 6] = [Outcome::Accepted, Outcome::Unauthorized, Outcome::TooLarge, Outcome::Timeout, Outcome::Unavailable, Outcome::BadRequest];

    fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Unauthorized => "unauthorized",
            Outcome::TooLarge => "too_large",
            Outcome::Timeout => "timeout",
            Outcome::Unavailable => "unavailable",
            Outcome::BadRequest => "bad_request",
        }
    }
}

/// Decrements the in-flight gauge however the request ends (a client that
/// hangs up drops the future).
struct InFlight<'a>(&'a metrics::Gauge);
impl<'a> InFlight<'a> {
    fn start(gauge: &'a metrics::Gauge) -> InFlight<'a> {
        gauge.increment(1.0);
        InFlight(gauge)
    }
}
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

struct HeaderLookup<'a>(&'a HeaderMap);
impl Headers for HeaderLookup<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

#[allow(clippy::too_many_arguments)]
async fn receive(receiver: &Receiver, peer: SocketAddr, name: &str, path_tenant: Option<&str>, method: &Method, uri: &Uri, headers: &HeaderMap, body: Body) -> Response {
    let Some(state) = receiver.sources.get(name) else {
        return plain(StatusCode::NOT_FOUND, format!("no source named \"{name}\" (see [[ingest.sources]] in the configuration)\n"));
    };
    let _in_flight = InFlight::start(&receiver.in_flight);
    let (outcome, response) = handle(receiver, state, peer, path_tenant, method, uri, headers, body).await;
    state.metrics.outcomes[outcome as usize].increment(1);
    response
}

#[allow(clippy::too_many_arguments)]
async fn handle(receiver: &Receiver, state: &SourceState, peer: SocketAddr, path_tenant: Option<&str>, method: &Method, uri: &Uri, headers: &HeaderMap, body: Body) -> (Outcome, Response) {
    let source = &state.source;
    let settings = &receiver.settings;
    let refuse = |failure: AuthFailure| {
        counter!(INGEST_AUTH_FAILURES, "source" => source.name.clone(), "reason" => failure.reason()).increment(1);
        tracing::warn!(source = %source.name, peer = %peer, reason = failure.reason(), "webhook refused: {failure}");
        (Outcome::Unauthorized, plain(StatusCode::UNAUTHORIZED, "unauthorized\n".into()))
    };
    if !source.allow.is_empty() {
        let forwarded = headers.get(settings.client_ip_header.as_str()).and_then(|v| v.to_str().ok());
        let client = settings.client_address(peer.ip(), forwarded);
        if !source.allow.iter().any(|net| net.contains(&client)) {
            return refuse(AuthFailure::AddressNotAllowed);
        }
    }
    if (path_tenant.is_some()) != (source.tenant == TenantFrom::Path) {
        return (Outcome::BadRequest, plain(StatusCode::NOT_FOUND, format!("source \"{}\" takes POST {}\n", source.name, route_of(source))));
    }
    // The body, bounded in size and in time.
    let declared = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > receiver.max_body_bytes) {
        return too_large(receiver.max_body_bytes);
    }
    let body = match tokio::time::timeout(settings.body_timeout, axum::body::to_bytes(body, receiver.max_body_bytes)).await {
        Err(_) => return (Outcome::Timeout, plain(StatusCode::REQUEST_TIMEOUT, "the body did not arrive in time\n".into())),
        Ok(Err(e)) if is_length_limit(&e) => return too_large(receiver.max_body_bytes),
        Ok(Err(_)) => return (Outcome::BadRequest, plain(StatusCode::BAD_REQUEST, "the body could not be read\n".into())),
        Ok(Ok(body)) => body,
    };
    let now_ms = (receiver.clock)();
    let now_unix = now_ms.div_euclid(1000);
    let verdict = {
        // Scoped: `Presented` holds a `&dyn Headers`, which must not live across an await.
        let lookup = HeaderLookup(headers);
        let presented = Presented { method: method.as_str(), path: uri.path(), query: uri.query(), headers: &lookup, body: &body };
        // The read guard lives for this statement only: a reload takes the write lock.
        let first = state.scheme.read().unwrap_or_else(|e| e.into_inner()).verify(&presented, now_unix);
        match first {
            // ShipEngine rotates keys: re-read the JWKS file once for a key id it lacks.
            Err(AuthFailure::UnknownKey) if reload_keys(state) => state.scheme.read().unwrap_or_else(|e| e.into_inner()).verify(&presented, now_unix),
            other => other,
        }
    };
    let verified = match verdict {
        Ok(verified) => verified,
        Err(failure) => return refuse(failure),
    };
    let tenant = match (&source.tenant, path_tenant) {
        (TenantFrom::Unset, _) => None,
        (TenantFrom::Fixed(tenant), _) => Some(tenant.clone()),
        (TenantFrom::Path, Some(tenant)) => Some(tenant.to_string()),
        (TenantFrom::Path, None) => None,
        (TenantFrom::Header(name), _) => match headers.get(name.as_str()).and_then(|v| v.to_str().ok()).map(str::trim).filter(|t| !t.is_empty()) {
            Some(tenant) => Some(tenant.to_string()),
            None => return (Outcome::BadRequest, plain(StatusCode::BAD_REQUEST, format!("the tenant header {name} is missing\n"))),
        },
    };
    if let Some(key) = verified.replay_key {
        // A signature stays valid until its timestamp plus the tolerance, and a
        // timestamp may be up to the tolerance ahead: remember it twice as long.
        let tolerance = i64::try_from(source.tolerance.as_secs()).unwrap_or(i64::MAX / 4);
        let expires = now_unix.saturating_add(tolerance.saturating_mul(2));
        let reserved = state.replays.lock().unwrap_or_else(|e| e.into_inner()).reserve(key, expires, now_unix);
        if let Err(failure) = reserved {
            return refuse(failure);
        }
    }
    let delivery_id = source.delivery_id_header.as_deref().and_then(|name| headers.get(name)).and_then(|v| v.to_str().ok());
    let acked = produce(receiver, state, tenant.as_deref(), delivery_id, now_ms, &body).await;
    match acked {
        Ok(()) => {
            state.metrics.bytes.increment(body.len() as u64);
            (Outcome::Accepted, plain(StatusCode::OK, "accepted\n".into()))
        }
        Err(why) => {
            if let Some(key) = verified.replay_key {
                // Not on the broker: the provider's retry with this signature must pass.
                state.replays.lock().unwrap_or_else(|e| e.into_inner()).release(&key);
            }
            tracing::warn!(source = %source.name, topic = %source.topic, "webhook answered 503: {why}");
            let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, format!("not stored, retry later: {why}\n"));
            let seconds = settings.retry_after.as_secs().max(1).to_string();
            if let Ok(value) = HeaderValue::from_str(&seconds) {
                response.headers_mut().insert("retry-after", value);
            }
            (Outcome::Unavailable, response)
        }
    }
}

/// Produce the body as it came and wait for the broker's acknowledgement.
async fn produce(receiver: &Receiver, state: &SourceState, tenant: Option<&str>, delivery_id: Option<&str>, received_ms: i64, body: &Bytes) -> Result<(), String> {
    let source = &state.source;
    let received_at = received_ms.to_string();
    let mut record_headers = OwnedHeaders::new_with_capacity(5)
        .insert(Header { key: "carrier", value: Some(source.carrier.as_str()) })
        .insert(Header { key: "received-at", value: Some(received_at.as_str()) })
        .insert(Header { key: "source", value: Some(source.name.as_str()) });
    if let Some(tenant) = tenant {
        record_headers = record_headers.insert(Header { key: "tenant-id", value: Some(tenant) });
    }
    if let Some(id) = delivery_id {
        record_headers = record_headers.insert(Header { key: "delivery-id", value: Some(id) });
    }
    let key = super::keys::tracking_number(&source.carrier, body);
    let mut record = FutureRecord::to(&source.topic).payload(body.as_ref()).headers(record_headers);
    if let Some(key) = key.as_deref() {
        record = record.key(key);
    }
    let started = Instant::now();
    // Enqueued at once or refused (queue full): a request never waits for room.
    let delivery = receiver.producer.send_result(record).map_err(|(e, _)| format!("the producer's queue is full ({e})"))?;
    let outcome = tokio::time::timeout(receiver.settings.ack_timeout, delivery).await;
    state.metrics.ack_seconds.record(started.elapsed().as_secs_f64());
    match outcome {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err((e, _)))) => Err(format!("the broker refused the record ({e})")),
        Ok(Err(_)) => Err("the producer went away".into()),
        Err(_) => Err(format!("no acknowledgement within {:?}", receiver.settings.ack_timeout)),
    }
}

/// Re-read a ShipEngine source's JWKS file; `true` when it changed the keys.
fn reload_keys(state: &SourceState) -> bool {
    let Some(path) = &state.source.jwks_file else { return false };
    match super::jwks::read_file(path) {
        Ok(keys) => {
            let mut scheme = state.scheme.write().unwrap_or_else(|e| e.into_inner());
            if let Scheme::ShipEngine { keys: held, .. } = &mut *scheme {
                let changed = held.iter().map(|(id, _)| id).ne(keys.iter().map(|(id, _)| id));
                *held = keys;
                return changed;
            }
            false
        }
        Err(e) => {
            tracing::warn!(source = %state.source.name, "cannot re-read the JWKS file: {e}");
            false
        }
    }
}

/// The path a source's webhooks are POSTed to.
pub fn route_of(source: &Source) -> String {
    match source.tenant {
        TenantFrom::Path => format!("/webhooks/{}/<tenant>", source.name),
        _ => format!("/webhooks/{}", source.name),
    }
}

fn too_large(limit: usize) -> (Outcome, Response) {
    (Outcome::TooLarge, plain(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is over {limit} bytes (limits.max_body_bytes)\n")))
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn plain(status: StatusCode, text: String) -> Response {
    (status, [("content-type", "text/plain; charset=utf-8")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SourceMetrics::outcomes` is indexed by the discriminant.
    #[test]
    fn outcomes_are_listed_in_discriminant_order() {
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, i, "{outcome:?}");
        }
    }
}
