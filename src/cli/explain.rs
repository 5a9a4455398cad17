//! `waymark explain`: why a record's events came out as they did, or where a
//! shipment stands, from a state directory (read-only: it works beside a
//! running worker) and, for `--record`, the record itself from Kafka.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;

use waymark::config::{Config, Overrides};
use waymark::envelope::Envelope;
use waymark::explain;

use super::args::{parse_shipment, ConfigArgs, KafkaArgs, Shipment};
use super::{load_config, open_existing_read_only, validate_kafka, write_stdout, Failure};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["record", "input", "shipment"])))]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// State directory (default: state.dir of the configuration, WAYMARK_STATE_DIR).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// A record on Kafka, as TOPIC:PARTITION:OFFSET (a dead letter's key names its record this way).
    #[arg(long, value_name = "TOPIC:PARTITION:OFFSET")]
    record: Option<String>,
    /// A webhook body in a file (- for stdin), with --carrier and --tenant.
    #[arg(long, requires = "carrier")]
    input: Option<String>,
    /// With --input: the carrier of the body.
    #[arg(long)]
    carrier: Option<String>,
    /// With --input: the tenant of the body.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// A shipment, as TENANT:CARRIER:TRACKING_NUMBER (the tracking number may contain `:`).
    #[arg(long, value_name = "TENANT:CARRIER:TRACKING", value_parser = parse_shipment)]
    shipment: Option<Shipment>,
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn exec(args: Args) -> Result<(), Failure> {
    let config = load_config(&args.config, Overrides { state_dir: args.state_dir.clone(), ..args.kafka.overrides() })?;
    let store = open_existing_read_only(&config.state_dir)?;
    let pipeline = config.pipeline();
    let now = Utc::now();
    let text = if let Some(shipment) = &args.shipment {
        let report = explain::shipment(&pipeline, &store, &shipment.tenant, &shipment.carrier, &shipment.tracking_number, now)
            .map_err(|e| Failure::usage(e.into()))?;
        if args.json { json(&report)? } else { explain::render_shipment(&report) }
    } else {
        let envelope = match (&args.record, &args.input) {
            (Some(record), _) => fetch(&config, record)?,
            (None, Some(input)) => body(input, args.carrier.as_deref().unwrap_or_default(), &args.tenant)?,
            (None, None) => unreachable!("clap requires one of --record, --input, --shipment"),
        };
        let report = explain::record(&pipeline, &store, &envelope, now).map_err(anyhow::Error::new)?;
        if args.json { json(&report)? } else { explain::render_record(&report) }
    };
    write_stdout(text.as_bytes())
}

fn json(value: &impl serde::Serialize) -> Result<String, Failure> {
    let mut text = serde_json::to_string_pretty(value).context("cannot encode the report")?;
    text.push('\n');
    Ok(text)
}

/// A webhook body from a file or stdin, as the worker would see it on the
/// carrier's raw topic.
fn body(input: &str, carrier: &str, tenant: &str) -> Result<Envelope, Failure> {
    let payload = if input == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf).context("cannot read stdin")?;
        buf
    } else {
        std::fs::read(input).with_context(|| format!("cannot read {input}"))?
    };
    Ok(Envelope {
        topic: format!("{}{carrier}", waymark::envelope::RAW_TOPIC_PREFIX),
        // Not a record of any topic: no sighting can be this body's own.
        partition: -1,
        offset: -1,
        timestamp_ms: Some(Utc::now().timestamp_millis()),
        headers: vec![("tenant-id".into(), Some(tenant.as_bytes().to_vec()))],
        key: None,
        payload,
    })
}

/// The record at TOPIC:PARTITION:OFFSET, read from Kafka without a consumer
/// group (nothing committed, the live group untouched).
pub(super) fn fetch(config: &Config, at: &str) -> Result<Envelope, Failure> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let parsed = at.rsplitn(3, ':').collect::<Vec<_>>();
    let (topic, partition, offset) = match parsed.as_slice() {
        [offset, partition, topic] => (
            topic.to_string(),
            partition.parse::<i32>().map_err(|_| usage(at))?,
            offset.parse::<i64>().map_err(|_| usage(at))?,
        ),
        _ => return Err(usage(at)),
    };
    validate_kafka(config)?;
    let mut client = waymark::worker::base_config(config);
    client
        .set("group.id", format!("waymark-explain-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true");
    let consumer: BaseConsumer = client.create().map_err(|e| anyhow::anyhow!("cannot create a Kafka consumer: {e}"))?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment.add_partition_offset(&topic, partition, rdkafka::Offset::Offset(offset)).map_err(|e| anyhow::anyhow!("{e}"))?;
    consumer.assign(&assignment).map_err(|e| anyhow::anyhow!("cannot read {topic} [{partition}]: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) if message.offset() == offset => return Ok(waymark::worker::consumer::envelope_of(&message)),
            Some(Ok(message)) => {
                return Err(anyhow::anyhow!(
                    "{topic} [{partition}] has no record at offset {offset} (the next is {}: it was deleted by retention or compaction, or is a transaction marker)",
                    message.offset()
                )
                .into())
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                return Err(anyhow::anyhow!("{topic} [{partition}] ends before offset {offset}").into());
            }
            Some(Err(e)) => tracing::warn!(error = %e, "reading the record; retrying"),
            None => {}
        }
    }
    let _ = std::io::stderr().flush();
    Err(anyhow::anyhow!("no answer from {} for {topic} [{partition}] offset {offset} within 30 s: check kafka.brokers and that the topic exists", config.kafka.brokers).into())
}

fn usage(at: &str) -> Failure {
    Failure::usage(anyhow::anyhow!("--record {at}: write TOPIC:PARTITION:OFFSET, e.g. tracking.raw.easypost:0:1042"))
}
