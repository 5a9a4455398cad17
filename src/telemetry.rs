//! Metrics (DESIGN section 8) and the small HTTP endpoint that serves them.
//!
//! The core returns outcomes; this module turns them into metrics, so the core
//! never touches a global recorder. Label cardinality is bounded: carrier, status,
//! outcome and error kind are closed sets; the tenant label is added only when
//! `telemetry.tenant_label = true`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::dedupe::Verdict;
use crate::pipeline::RecordResult;

pub const EVENTS: &str = "waymark_events_total";
pub const DEDUPE_HIT_RATIO: &str = "waymark_dedupe_hit_ratio";
pub const MILESTONES: &str = "waymark_milestones_emitted_total";
pub const REGRESSIONS: &str = "waymark_status_regressions_prevented_total";
pub const OUT_OF_ORDER: &str = "waymark_out_of_order_total";
pub const DEAD_LETTERS: &str = "waymark_dead_letter_total";
pub const KEY_COLLISIONS: &str = "waymark_key_collisions_total";
pub const STORE_KEYS: &str = "waymark_store_keys";
pub const PROCESS_SECONDS: &str = "waymark_process_seconds";
pub const CONSUMER_LAG: &str = "waymark_consumer_lag";
pub const RECORDS: &str = "waymark_records_total";

/// Turns pipeline outcomes into metrics.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// Add a `tenant` label to the events counter (bounded tenants only).
    pub tenant_label: bool,
    /// (events, duplicates) per carrier, for the hit-ratio gauge.
    totals: Mutex<HashMap<String, (u64, u64)>>,
}

impl Telemetry {
    pub fn new(tenant_label: bool) -> Self {
        Telemetry { tenant_label, totals: Mutex::default() }
    }

    /// Record one processed record.
    pub fn record(&self, result: &RecordResult, elapsed: Duration) {
        histogram!(PROCESS_SECONDS).record(elapsed.as_secs_f64());
        let carrier = result.carrier.clone().unwrap_or_else(|| "unknown".into());
        if let Some(dead) = &result.dead_letter {
            counter!(RECORDS, "carrier" => carrier.clone(), "outcome" => "dead_letter").increment(1);
            counter!(DEAD_LETTERS, "carrier" => carrier.clone(), "reason" => dead.error_kind.clone()).increment(1);
            self.events(&carrier, result.tenant_id.as_deref(), "invalid", 1);
            return;
        }
        counter!(RECORDS, "carrier" => carrier.clone(), "outcome" => "processed").increment(1);
        let mut duplicates = 0u64;
        for event in &result.events {
            self.events(&carrier, result.tenant_id.as_deref(), event.verdict.label(), 1);
            match event.verdict {
                Verdict::New => {
                    counter!(MILESTONES, "carrier" => carrier.clone(), "status" => event.status.as_str()).increment(1);
                    if event.applied.regression_prevented {
                        counter!(REGRESSIONS, "carrier" => carrier.clone()).increment(1);
                    }
                    if event.applied.out_of_order {
                        counter!(OUT_OF_ORDER, "carrier" => carrier.clone()).increment(1);
                    }
                }
                Verdict::DuplicateHash => duplicates += 1,
                Verdict::DuplicateKey { collision } => {
                    duplicates += 1;
                    if collision {
                        counter!(KEY_COLLISIONS, "carrier" => carrier.clone()).increment(1);
                    }
                }
            }
        }
        if !result.events.is_empty() {
            let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
            let entry = totals.entry(carrier.clone()).or_default();
            entry.0 += result.events.len() as u64;
            entry.1 += duplicates;
            gauge!(DEDUPE_HIT_RATIO, "carrier" => carrier).set(entry.1 as f64 / entry.0 as f64);
        }
    }

    fn events(&self, carrier: &str, tenant: Option<&str>, outcome: &'static str, n: u64) {
        match (self.tenant_label, tenant) {
            (true, Some(tenant)) => counter!(EVENTS, "carrier" => carrier.to_string(), "tenant" => tenant.to_string(), "outcome" => outcome).increment(n),
            _ => counter!(EVENTS, "carrier" => carrier.to_string(), "outcome" => outcome).increment(n),
        }
    }
}

/// Install the Prometheus recorder for this process (once).
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(PROCESS_SECONDS.into()),
            &[0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0],
        )?
        .install_recorder()?;
    metrics::describe_counter!(EVENTS, "Canonical events by carrier and dedupe outcome (new, duplicate_key, duplicate_hash, invalid)");
    metrics::describe_gauge!(DEDUPE_HIT_RATIO, "Share of canonical events found to be duplicates, per carrier, since start");
    metrics::describe_counter!(MILESTONES, "Ensure-milestone upserts emitted");
    metrics::describe_counter!(REGRESSIONS, "Events that would have moved a shipment status backwards");
    metrics::describe_counter!(OUT_OF_ORDER, "New events older than the latest seen for their shipment");
    metrics::describe_counter!(DEAD_LETTERS, "Records sent to the dead-letter output, by reason");
    metrics::describe_counter!(KEY_COLLISIONS, "Same composite key, different content hash");
    metrics::describe_gauge!(STORE_KEYS, "Estimated live keys per state keyspace");
    metrics::describe_counter!(crate::store::EXPIRED_METRIC, "State entries dropped by compaction after their TTL");
    metrics::describe_histogram!(PROCESS_SECONDS, "Pipeline time per record (normalize, dedupe, order)");
    metrics::describe_gauge!(CONSUMER_LAG, "High watermark minus next offset, per input partition");
    Ok(handle)
}

/// Liveness and readiness, shared with the HTTP endpoint.
#[derive(Debug, Default)]
pub struct Health {
    /// The worker has its store open and its consumer subscribed.
    pub ready: AtomicBool,
    /// The worker hit a fatal error (liveness fails, so an orchestrator restarts it).
    pub failed: AtomicBool,
}

/// Serve `/metrics`, `/healthz` and `/readyz` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let handle = handle.clone();
                let health = health.clone();
                tokio::spawn(async move { let _ = respond(stream, &handle, &health).await; });
            }
        }
    }
}

/// Bind the HTTP endpoint (fails early with a clear message).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} for /metrics: {e} (set http.listen / WAYMARK_HTTP_LISTEN to a free address)")
    })
}

async fn respond(mut stream: tokio::net::TcpStream, handle: &PrometheusHandle, health: &Health) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // Read the request head (bounded); we only need the request line.
    while len < buf.len() {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[len..])).await.unwrap_or(Ok(0))?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", handle.render()),
        ("GET", "/healthz") if !health.failed.load(Ordering::SeqCst) => ("200 OK", "text/plain", "ok\n".into()),
        ("GET", "/healthz") => ("503 Service Unavailable", "text/plain", "failed\n".into()),
        ("GET", "/readyz") if health.ready.load(Ordering::SeqCst) => ("200 OK", "text/plain", "ready\n".into()),
        ("GET", "/readyz") => ("503 Service Unavailable", "text/plain", "not ready\n".into()),
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics, /healthz or /readyz\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
