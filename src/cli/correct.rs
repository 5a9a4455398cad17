//! `waymark correct`: retract a milestone the carrier got wrong. Writes one
//! correction record to the control topic (`kafka.control_topic`) and waits
//! until Kafka acknowledges it; the worker applies it at the shipment's home,
//! in order with the shipment's events (see `waymark::correction`).

use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use waymark::correction::Correction;

use super::args::{parse_shipment, ConfigArgs, KafkaArgs, Shipment};
use super::{load_config, validate_kafka, Failure};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// The shipment, as TENANT:CARRIER:TRACKING_NUMBER (the tracking number may contain `:`).
    #[arg(long, value_name = "TENANT:CARRIER:TRACKING", value_parser = parse_shipment)]
    shipment: Shipment,
    /// The milestone to retract: its `milestone_id` (the upsert's, or
    /// `waymark explain --shipment`'s).
    #[arg(long)]
    retract: String,
    /// Why (kept in the retraction upsert and the worker's log).
    #[arg(long)]
    reason: String,
    /// Who asks (default: $USER).
    #[arg(long)]
    by: Option<String>,
    /// Print the correction record and send nothing.
    #[arg(long)]
    dry_run: bool,
}

pub fn exec(args: Args) -> Result<(), Failure> {
    let config = load_config(&args.config, args.kafka.overrides())?;
    let by = args.by.or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "unknown".into());
    let Shipment { tenant, carrier, tracking_number } = &args.shipment;
    let correction = Correction::retract(tenant, carrier, tracking_number, &args.retract, &args.reason, &by, chrono::Utc::now());
    correction.check().map_err(|e| Failure::usage(anyhow::anyhow!("{e}")))?;
    let body = serde_json::to_vec(&correction).context("encoding the correction")?;
    if args.dry_run {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let Some(topic) = config.kafka.control_topic.clone() else {
        return Err(Failure::usage(anyhow::anyhow!(
            "kafka.control_topic is not set: set it (e.g. WAYMARK_KAFKA__CONTROL_TOPIC=tracking.control) here and on the workers, which read corrections from it"
        )));
    };
    validate_kafka(&config)?;
    let producer: ThreadedProducer<_> = waymark::worker::producer_config(&config).create().context("creating the Kafka producer")?;
    let key = waymark::output::shipment_key(&correction.tenant_id, &correction.carrier, &correction.tracking_number);
    producer
        .send(BaseRecord::to(&topic).key(&key).payload(&body))
        .map_err(|(e, _)| anyhow::anyhow!("cannot send the correction to {topic}: {e}"))?;
    producer
        .flush(Duration::from_secs(30))
        .with_context(|| format!("Kafka did not acknowledge the correction on {topic} within 30 s (is {} reachable?); nothing was applied, run the command again", config.kafka.brokers))?;
    println!(
        "correction sent to {topic}: retract {} of {key} ({}). The worker applies it in order with the shipment's events and emits a retract_milestone upsert; `waymark explain --shipment {key}` shows the result.",
        correction.milestone_id, correction.reason
    );
    Ok(())
}
