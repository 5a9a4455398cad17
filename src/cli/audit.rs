//! `waymark audit`: recompute what a raw topic's range should have produced
//! (scratch state, nothing written, no consumer group) and compare it with the
//! output topic. Exit 1 on any divergence, so it can run on a schedule and alert.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;

use waymark::batch::Summary;
use waymark::config::DeliveryMode;
use waymark::replay;
use waymark::sink::MemorySink;
use waymark::state::MemoryStore;

use super::args::{parse_time, ConfigArgs, KafkaArgs};
use super::{load_config, validate_kafka, write_stdout, Failure};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// The raw topic whose range is audited.
    #[arg(long)]
    from_topic: String,
    /// Start at raw records from this time (RFC 3339); default: the topic's beginning.
    #[arg(long, value_parser = parse_time)]
    since: Option<chrono::DateTime<Utc>>,
    /// Stop before raw records from this time (RFC 3339); default: the topic's end now.
    #[arg(long, value_parser = parse_time)]
    until: Option<chrono::DateTime<Utc>>,
    /// The output topic to check (default: kafka.output_topic).
    #[arg(long)]
    against: Option<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn exec(args: Args) -> Result<(), Failure> {
    let config = load_config(&args.config, args.kafka.overrides())?;
    validate_kafka(&config)?;
    let output_topic = args.against.clone().unwrap_or_else(|| config.kafka.output_topic.clone());
    let client = waymark::worker::base_config(&config);

    // 1. What the range should have produced: the same pipeline, scratch state.
    let pipeline = config.pipeline();
    let store = MemoryStore::default();
    let mut sink = MemorySink::default();
    let clock = Utc::now;
    let started = Instant::now();
    let mut last_log = started;
    let mut on_progress = |s: &Summary| {
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::info!(records = s.records, milestones = s.new_milestones, "audit: recomputing the range");
        }
    };
    let mut run = replay::Replay { pipeline: &pipeline, store: &store, sink: &mut sink, now: &clock, summary: Summary::default(), on_progress: &mut on_progress, resume: false };
    let range = replay::TopicRange { since: args.since, until: args.until, ..replay::TopicRange::default() };
    let read = run.topic(&client, &args.from_topic, &range).map_err(anyhow::Error::new)?;
    tracing::info!(milestones = sink.upserts.len(), seconds = started.elapsed().as_secs(), "audit: range recomputed; reading the output topic");

    // 2. What the output topic holds.
    let output = waymark::audit::read_topic(&client, &output_topic, replay::TOPIC_STALL_TIMEOUT)
        .map_err(|e| anyhow::anyhow!("reading the output topic {output_topic}: {e} (check --against, kafka.brokers and read access)"))?;

    // 3. Compare. At-least-once output may repeat a milestone byte for byte.
    let repeats_allowed = config.delivery == DeliveryMode::AtLeastOnce;
    let report = waymark::audit::compare(&args.from_topic, &output_topic, read, &sink.upserts, &output, &pipeline.dedupe, repeats_allowed);
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report).context("cannot encode the report")?)
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    write_stdout(waymark::audit::render(&report).as_bytes())?;
    if report.diverges {
        return Err(Failure {
            code: 1,
            error: anyhow::anyhow!("the output topic {output_topic} diverges from what {} should have produced (see above)", args.from_topic),
        });
    }
    Ok(())
}
