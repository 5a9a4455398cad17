//! `waymark ingest`: the webhook receiver, until SIGTERM or SIGINT. On a signal
//! it stops answering ready, stops accepting, lets the requests in flight
//! finish (`ingest.shutdown_timeout`), flushes the producer and exits 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::Producer;

use waymark::http::{self, ServeLimits};
use waymark::ingest::server::{IngestProducer, ProducerLog, Receiver};

use super::args::{ConfigArgs, KafkaArgs};
use super::{load_config, validate_kafka, Failure};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Address to listen on (ingest.listen; WAYMARK_INGEST__LISTEN).
    #[arg(long)]
    listen: Option<String>,
}

pub fn exec(args: Args) -> Result<(), Failure> {
    let mut overrides = args.kafka.overrides();
    overrides.ingest_listen = args.listen;
    let config = load_config(&args.config, overrides)?;
    let settings = config.ingest.validate()?;
    if settings.sources.is_empty() {
        return Err(Failure::usage(anyhow::anyhow!(
            "no webhook sources: add [[ingest.sources]] to the configuration (docs/ingest.md has one per provider)"
        )));
    }
    validate_kafka(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    let metrics = http::install_recorder().context("cannot install the metrics recorder")?;
    waymark::telemetry::describe_ingest(settings.sources.iter().map(|s| s.name.as_str()), &waymark::ingest::auth::AuthFailure::ALL.map(|f| f.reason()));

    let mut client = waymark::worker::producer_config(&config);
    // A request waits for its record's acknowledgement, so librdkafka gives up
    // on a record about when the request stops waiting for it (503).
    let timeout_ms = settings.ack_timeout.as_millis().max(1000).to_string();
    client.set("message.timeout.ms", &timeout_ms);
    // Requests arrive one by one, so produce requests are small: with Nagle's
    // algorithm on, one waits for the broker's delayed ACK of the previous one
    // (40 ms on Linux). ingest-load at half the maximum rate: p99 40 ms with
    // it on, 25 to 30 ms off. kafka.producer_properties can still set it back.
    if !config.kafka.properties.contains_key("socket.nagle.disable") && !config.kafka.producer_properties.contains_key("socket.nagle.disable") {
        client.set("socket.nagle.disable", "true");
    }
    let producer: IngestProducer = client.create_with_context(ProducerLog::default()).context("creating the Kafka producer")?;
    let clock: waymark::ingest::server::Clock = Arc::new(|| chrono::Utc::now().timestamp_millis());
    let receiver = Receiver::new(settings.clone(), config.max_body_bytes, producer, clock);

    let listener = runtime.block_on(http::bind_for(settings.listen, "ingest.listen / --listen"))?;
    for source in &settings.sources {
        tracing::info!(source = %source.name, scheme = source.scheme.name(), topic = %source.topic, "POST {}", waymark::ingest::server::route_of(source));
    }
    tracing::info!(addr = %settings.listen, brokers = %config.kafka.brokers, "receiving webhooks; /metrics, /healthz, /readyz beside them");

    let result: anyhow::Result<()> = runtime.block_on(async {
        // Readiness follows the broker and the sources' topics.
        let probe = {
            let receiver = receiver.clone();
            tokio::spawn(async move {
                let mut was: Option<bool> = None;
                loop {
                    let checked = receiver.clone();
                    let result = tokio::task::spawn_blocking(move || checked.probe_broker(Duration::from_secs(5))).await.unwrap_or_else(|e| Err(e.to_string()));
                    let ok = result.is_ok();
                    if was != Some(ok) {
                        match &result {
                            Ok(()) => tracing::info!("broker reachable and every source's topic present: ready"),
                            Err(why) => tracing::warn!("not ready: {why}"),
                        }
                    }
                    was = Some(ok);
                    tokio::time::sleep(Duration::from_secs(if ok { 5 } else { 1 })).await;
                }
            })
        };
        let upkeep = http::spawn_upkeep(metrics.clone());
        let limits = ServeLimits { max_connections: settings.max_connections, header_timeout: settings.header_timeout, keep_alive: true, drain_timeout: settings.shutdown_timeout };
        let draining = receiver.clone();
        http::serve_router(listener, receiver.router(metrics), limits, async move {
            super::run::terminated().await;
            tracing::info!("stopping: no new connections; finishing the requests in flight");
            draining.drain();
        })
        .await;
        probe.abort();
        upkeep.abort();
        Ok(())
    });
    result?;
    // Every answered request waited for its acknowledgement; this only covers
    // records whose requests were cut off.
    let _ = receiver.producer().flush(Duration::from_secs(5));
    tracing::info!("stopped cleanly");
    Ok(())
}
