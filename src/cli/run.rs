//! `waymark run`: the Kafka worker, with its HTTP endpoint, until SIGTERM or
//! SIGINT (or a fatal error).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use waymark::clock::GuardedClock;
use waymark::config::Config;
use waymark::http::{self, Health};
use waymark::store::RocksStore;
use waymark::telemetry::Telemetry;

use super::args::{ConfigArgs, KafkaArgs, WorkerArgs};
use super::{layout_failure, load_config, millis_clock, Failure};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    worker: WorkerArgs,
}

pub fn exec(args: Args) -> Result<(), Failure> {
    // The worker checks the librdkafka properties itself (exit 2 naming one).
    run(load_config(&args.config, args.worker.overrides(args.kafka))?)
}

fn run(config: Config) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let handle = http::install_recorder().context("cannot install the metrics recorder")?;
    waymark::telemetry::describe_and_zero(config.pipeline().carriers.names());
    let health = Arc::new(Health::default());
    let listener = runtime.block_on(http::bind(config.http_listen))?;
    tracing::info!(addr = %config.http_listen, "serving /metrics, /healthz, /readyz");
    // One guarded wall clock for decisions and for the compaction filter's expiry.
    let clock = Arc::new(GuardedClock::system(waymark::clock::DEFAULT_MAX_STEP));
    let store = Arc::new(
        RocksStore::open(&config.state_dir, &config.store, millis_clock(&clock))
            .with_context(|| format!("state directory {}", config.state_dir.display()))?,
    );
    store.check_layout(&config.placement.layout(), true).map_err(layout_failure)?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let explain = config.explain_token.as_ref().map(|token| {
        tracing::info!("serving /explain (bearer token required)");
        http::ExplainRoute { token: token.expose().to_string(), explainer: explainer(&config, store.clone(), clock.clone()) }
    });
    runtime.spawn(http::serve(listener, handle, health.clone(), explain, async {
        let _ = http_stopped.await;
    }));

    let worker = {
        let (config, store, health, shutdown, guarded) = (config.clone(), store.clone(), health.clone(), shutdown.clone(), clock.clone());
        std::thread::Builder::new()
            .name("waymark-worker".into())
            .spawn(move || {
                let pipeline = config.pipeline();
                let telemetry = Telemetry::new(config.tenant_label).with_carriers(pipeline.carriers.names());
                let clock = || guarded.now();
                let result = waymark::worker::run_worker(waymark::worker::WorkerDeps {
                    config: &config,
                    pipeline: &pipeline,
                    store,
                    telemetry: &telemetry,
                    health: health.clone(),
                    shutdown: &shutdown,
                    clock: &clock,
                });
                if result.is_err() {
                    health.failed.store(true, Ordering::SeqCst);
                }
                result
            })
            .context("cannot start the worker thread")?
    };

    // Wait for SIGTERM/SIGINT, or for the worker to stop by itself (a fatal error).
    runtime.block_on(async {
        let stopped = async {
            while !worker.is_finished() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            _ = terminated() => {}
            _ = stopped => {}
        }
    });
    shutdown.store(true, Ordering::SeqCst);
    tracing::info!(deadline = %humantime::format_duration(config.shutdown_timeout), "stopping");
    let deadline = std::time::Instant::now() + config.shutdown_timeout + Duration::from_secs(5);
    while !worker.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = stop_http.send(());
    if !worker.is_finished() && health.drained.load(Ordering::SeqCst) {
        // Everything in flight is committed; leaving the group is what hangs (a
        // rebalance in progress). The group notices the member is gone after
        // session.timeout.ms; nothing is lost, so this is a clean stop.
        tracing::warn!("leaving the consumer group did not finish in time; all work is committed, exiting");
        return Ok(());
    }
    if !worker.is_finished() {
        return Err(anyhow::anyhow!(
            "the worker did not finish within worker.shutdown_timeout ({:?}); uncommitted work will be re-processed on restart",
            config.shutdown_timeout
        )
        .into());
    }
    match worker.join() {
        Ok(Ok(())) => {
            tracing::info!("stopped cleanly");
            Ok(())
        }
        Ok(Err(e)) => Err(Failure { code: e.exit_code(), error: anyhow::Error::new(e).context("worker stopped") }),
        Err(_) => Err(anyhow::anyhow!("worker thread panicked (a bug: please report it with the log)").into()),
    }
}

/// SIGTERM or SIGINT.
pub async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

/// `/explain`'s answers: the same reports as `waymark explain --json`, from the
/// worker's own store (RocksDB serves reads beside the worker's writes).
fn explainer(config: &Config, store: Arc<RocksStore>, clock: Arc<GuardedClock>) -> Arc<http::Explainer> {
    let config = config.clone();
    let pipeline = config.pipeline();
    Arc::new(move |query| {
        let now = clock.now();
        let json = match query {
            http::ExplainQuery::Shipment(shipment) => {
                let mut parts = shipment.splitn(3, ':');
                let (Some(tenant), Some(carrier), Some(tracking)) = (parts.next(), parts.next(), parts.next()) else {
                    return Err((400, format!("shipment={shipment}: write TENANT:CARRIER:TRACKING_NUMBER")));
                };
                let report = waymark::explain::shipment(&pipeline, &*store, tenant, carrier, tracking, now).map_err(|e| (400, e.to_string()))?;
                serde_json::to_string_pretty(&report)
            }
            http::ExplainQuery::Record(at) => {
                let envelope = super::explain::fetch(&config, &at).map_err(|f| (if f.code == 2 { 400 } else { 404 }, format!("{:#}", f.error)))?;
                let report = waymark::explain::record(&pipeline, &*store, &envelope, now).map_err(|e| (500, e.to_string()))?;
                serde_json::to_string_pretty(&report)
            }
        };
        json.map_err(|e| (500, e.to_string()))
    })
}
