//! `waymark check`: everything that can be checked before `run`, with the
//! same file, variables and flags `run` takes; with `--connect`, the brokers
//! and topics too.

use std::time::Duration;

use waymark::config::Config;

use super::args::{ConfigArgs, KafkaArgs, WorkerArgs};
use super::{load_config, validate_kafka, Failure};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    worker: WorkerArgs,
    /// Also connect: brokers reachable; input, output and dead-letter topics, and
    /// the topics of `[[ingest.sources]]`, present.
    #[arg(long)]
    connect: bool,
}

pub fn exec(args: Args) -> Result<(), Failure> {
    let config = load_config(&args.config, args.worker.overrides(args.kafka))?;
    check(&config, args.connect)
}

/// `waymark check`: everything that can be checked before `run`.
fn check(config: &Config, connect: bool) -> Result<(), Failure> {
    validate_kafka(config)?;
    println!("configuration ok: {} input topic(s), delivery {}, routing {}", config.kafka.input_topics.len(), config.delivery, config.placement.layout());
    // `[ingest]` (secrets resolved, keys read) only when it has sources: a
    // worker's configuration need not name any.
    let ingest = if config.ingest.section.sources.is_empty() { None } else { Some(config.ingest.validate()?) };
    for source in ingest.iter().flat_map(|i| &i.sources) {
        println!("ingest source {}: {} webhooks, {} authentication, to {}", source.name, source.carrier, source.scheme.name(), source.topic);
    }
    if !connect {
        return Ok(());
    }
    let admin = waymark::worker::topics::Admin::new(&waymark::worker::base_config(config), Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("cannot create an admin client: {e}"))?;
    let mut missing = Vec::new();
    let topics = config.kafka.input_topics.iter().chain([&config.kafka.output_topic, &config.kafka.dead_letter_topic]).chain(ingest.iter().flat_map(|i| &i.sources).map(|s| &s.topic));
    let topics: std::collections::BTreeSet<&String> = topics.collect();
    for topic in topics {
        let partitions = admin
            .partitions_of(topic)
            .map_err(|e| anyhow::anyhow!("cannot reach the brokers at {} ({e}): check kafka.brokers and the security properties", config.kafka.brokers))?;
        println!("topic {topic}: {}", if partitions == 0 { "MISSING".to_string() } else { format!("{partitions} partitions") });
        if partitions == 0 {
            missing.push(topic.clone());
        }
    }
    if !missing.is_empty() {
        return Err(anyhow::anyhow!("missing topics: {} (create them; the worker creates only its internal topics)", missing.join(", ")).into());
    }
    println!("brokers at {} reachable; every topic present", config.kafka.brokers);
    Ok(())
}
