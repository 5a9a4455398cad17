//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz`, `/readyz`.
//!
//! Three fixed GET routes do not justify a web framework's compile time; this is a
//! minimal HTTP/1.1 responder on tokio that reads the request line and closes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::telemetry::*;

/// Install the Prometheus recorder for this process (once).
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(PROCESS_SECONDS.into()),
            &[0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0],
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(BATCH_STAGE_SECONDS.into()),
            &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0],
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(STORE_LOOKUP_SECONDS.into()),
            &[0.000_002, 0.000_005, 0.000_01, 0.000_02, 0.000_05, 0.000_1, 0.000_2, 0.000_5, 0.001, 0.01],
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
    metrics::describe_gauge!(STORE_MEMORY, "Memory the state store holds, by kind (memtables, block_cache, table_readers)");
    metrics::describe_counter!(STORE_EXPIRED, "State entries dropped by compaction after their TTL");
    metrics::describe_histogram!(PROCESS_SECONDS, "Pipeline time per record (normalize, dedupe, order)");
    metrics::describe_histogram!(STORE_LOOKUP_SECONDS, "State store lookup latency, by operation and keyspace");
    metrics::describe_histogram!(
        BATCH_STAGE_SECONDS,
        "Time of each stage of a batch: poll (waiting for and reading records), process, output (until acknowledged or committed), changelog, state"
    );
    metrics::describe_gauge!(CONSUMER_LAG, "High watermark minus next offset, per input partition");
    metrics::describe_gauge!(REORDER_HELD, "Records held by the bounded reorder window, not yet processed or committed");
    Ok(handle)
}

/// Liveness and readiness, shared with the HTTP endpoint.
#[derive(Debug, Default)]
pub struct Health {
    /// The worker has its store open and its consumer subscribed.
    pub ready: AtomicBool,
    /// The worker hit a fatal error (liveness fails, so an orchestrator restarts it).
    pub failed: AtomicBool,
    /// Partitions assigned to this instance right now.
    pub assigned: AtomicUsize,
    /// At least one broker connection is up (librdkafka's statistics).
    pub broker_up: AtomicBool,
    /// Records behind the log end over the assigned partitions (statistics).
    pub lag: AtomicI64,
    /// Wall-clock ms of the last completed batch (or of the start).
    pub last_progress_ms: AtomicI64,
    /// Liveness fails when there is lag and no batch completed for this long (ms; 0: never).
    pub stall_after_ms: AtomicI64,
    /// Shutdown: every in-flight batch is committed; only closing the consumer
    /// (leaving the group) remains, which a rebalance in progress can hold up.
    pub drained: AtomicBool,
}

impl Health {
    /// `Err(why)` when the worker is dead or stuck: it failed, or it has work
    /// (lag) and has completed no batch for `stall_after_ms`.
    pub fn liveness(&self, now_ms: i64) -> Result<(), String> {
        if self.failed.load(Ordering::SeqCst) {
            return Err("failed".into());
        }
        let stall_after = self.stall_after_ms.load(Ordering::SeqCst);
        let lag = self.lag.load(Ordering::SeqCst);
        let idle = now_ms.saturating_sub(self.last_progress_ms.load(Ordering::SeqCst));
        if stall_after > 0 && lag > 0 && idle > stall_after {
            return Err(format!("stalled: {lag} records to process and no batch completed for {} s", idle / 1000));
        }
        Ok(())
    }

    /// `Err(why)` unless subscribed, with partitions assigned and a broker reachable.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::SeqCst) {
            return Err("not ready: starting or stopping".into());
        }
        if !self.broker_up.load(Ordering::SeqCst) {
            return Err("not ready: no broker reachable".into());
        }
        if self.assigned.load(Ordering::SeqCst) == 0 {
            return Err("not ready: no partitions assigned".into());
        }
        Ok(())
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // The recorder buffers every histogram sample until upkeep drains it into the
    // buckets; without this tick, a worker nobody scrapes would grow without bound
    // (several samples per record).
    let mut upkeep = tokio::time::interval(Duration::from_secs(5));
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = upkeep.tick() => handle.run_upkeep(),
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, say: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting an HTTP connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Bounded: at most MAX_CONNECTIONS at once (a slow or hostile client
                // cannot take the file descriptors the store and Kafka need), and
                // each has MAX_CONNECTION_TIME in all.
                let Ok(permit) = connections.clone().try_acquire_owned() else { continue };
                let handle = handle.clone();
                let health = health.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(MAX_CONNECTION_TIME, respond(stream, &handle, &health)).await;
                    drop(permit);
                });
            }
        }
    }
}

/// Most HTTP connections served at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 64;

/// Longest one HTTP connection may take, request and response together.
const MAX_CONNECTION_TIME: Duration = Duration::from_secs(10);

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
        ("GET", "/healthz") => match health.liveness(chrono::Utc::now().timestamp_millis()) {
            Ok(()) => ("200 OK", "text/plain", "ok\n".into()),
            Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
        },
        ("GET", "/readyz") => match health.readiness() {
            Ok(()) => ("200 OK", "text/plain", "ready\n".into()),
            Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
        },
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

#[cfg(test)]
mod tests {
    use super::*;
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
                outcome(Verdict::New, Applied { regression_prevented: true, out_of_order: true }),
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
        health.last_progress_ms.store(1_000_000, Ordering::SeqCst);
        assert!(health.liveness(1_000_000 + 3_600_000).is_ok(), "idle without lag is healthy");
        health.lag.store(617, Ordering::SeqCst);
        assert!(health.liveness(1_000_000 + 60_000).is_ok(), "at the limit: still healthy");
        let why = health.liveness(1_000_000 + 60_001).unwrap_err();
        assert!(why.contains("617") && why.contains("60 s"), "{why}");
        health.last_progress_ms.store(1_000_000 + 60_000, Ordering::SeqCst);
        assert!(health.liveness(1_000_000 + 60_001).is_ok(), "progress resets the clock");
        health.stall_after_ms.store(0, Ordering::SeqCst);
        assert!(health.liveness(i64::MAX).is_ok(), "0 switches the check off");
    }

    #[test]
    fn connections_are_capped_so_idle_clients_cannot_take_every_descriptor() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let handle = PrometheusBuilder::new().build_recorder().handle();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(serve(listener, handle, Arc::new(Health::default()), async {
                let _ = stopped.await;
            }));
            let get = || async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
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
            let server = tokio::spawn(serve(listener, handle, health.clone(), async {
                let _ = stopped.await;
            }));
            let get = |path: &'static str| async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
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
}
