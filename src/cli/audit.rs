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
    /// Audit raw records from this time (RFC 3339); default: the topic's beginning.
    #[arg(long, value_parser = parse_time, conflicts_with = "last")]
    since: Option<chrono::DateTime<Utc>>,
    /// Audit raw records before this time (RFC 3339); default: now minus --settle.
    #[arg(long, value_parser = parse_time, conflicts_with = "last")]
    until: Option<chrono::DateTime<Utc>>,
    /// Audit the raw records of this long before now minus --settle (e.g. 1h): for a schedule.
    #[arg(long, value_parser = humantime::parse_duration)]
    last: Option<Duration>,
    /// Records newer than this are left out: the worker may not have processed them yet.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    settle: Duration,
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
    let until = args.until.unwrap_or_else(|| Utc::now() - chrono::Duration::from_std(args.settle).unwrap_or_default());
    let since = match args.last {
        Some(last) => Some(until - chrono::Duration::from_std(last).unwrap_or_default()),
        None => args.since,
    };
    // Read from the longest TTL before the range, so its events meet what came
    // before them; compare the range only.
    let longest_ttl = pipeline.dedupe.longest_ttl();
    let read_from = since.map(|s| s - chrono::Duration::from_std(longest_ttl).unwrap_or_default());
    let range = replay::TopicRange { since: read_from, until: Some(until), ..replay::TopicRange::default() };
    let read = run.topic(&client, &args.from_topic, &range).map_err(anyhow::Error::new)?;
    let audited = match since {
        Some(since) => {
            let starts = waymark::audit::offsets_at(&client, &args.from_topic, since).map_err(|e| anyhow::anyhow!("{}: {e}", args.from_topic))?;
            read.iter().map(|(p, (start, stop))| (*p, ((*start).max(starts.get(p).copied().unwrap_or(*start)), *stop))).collect()
        }
        None => read,
    };
    tracing::info!(milestones = sink.upserts.len(), seconds = started.elapsed().as_secs(), "audit: range recomputed; reading the output topic");

    // 2. What the output topic holds.
    let output = waymark::audit::read_topic(&client, &output_topic, replay::TOPIC_STALL_TIMEOUT)
        .map_err(|e| anyhow::anyhow!("reading the output topic {output_topic}: {e} (check --against, kafka.brokers and read access)"))?;

    // 3. Compare. At-least-once output may repeat a milestone byte for byte.
    let repeats_allowed = config.delivery == DeliveryMode::AtLeastOnce;
    let report = waymark::audit::compare(&args.from_topic, &output_topic, audited, &sink.upserts, &output, &pipeline.dedupe, repeats_allowed);
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
