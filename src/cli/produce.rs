//! `waymark produce`: a kcat -J archive (file, .gz, directory, or stdin) back
//! on Kafka with its keys and headers: re-drive dumps, backfills and dead
//! letters.

use std::io::Write;
use std::path::Path;

use waymark::config::Config;
use waymark::replay;

use super::args::{ConfigArgs, KafkaArgs};
use super::{load_config, validate_kafka, Failure};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Archive file (gzip recognised by content), directory of archives (name order), or - for stdin.
    #[arg(long)]
    input: String,
    /// Topic for every record (default: each record's own topic).
    #[arg(long)]
    topic: Option<String>,
    /// Keep each record's partition (default: the producer's partitioner, by key).
    #[arg(long)]
    keep_partitions: bool,
    /// The archive is a dump of the dead-letter topic: produce the original
    /// record of each dead letter (to its own topic unless --topic).
    #[arg(long)]
    dead_letters: bool,
    /// Keep the archive's record timestamps (default: the current time, so
    /// the topic's retention cannot delete a backfill before it is read).
    /// A record older than its topic's retention is refused (exit 2).
    #[arg(long)]
    keep_timestamps: bool,
}

pub fn exec(args: Args) -> Result<(), Failure> {
    let config = load_config(&args.config, args.kafka.overrides())?;
    let options = waymark::produce::ProduceOptions {
        topic: args.topic,
        keep_partitions: args.keep_partitions,
        dead_letters: args.dead_letters,
        keep_timestamps: args.keep_timestamps,
    };
    produce_cmd(&config, &args.input, &options)
}

/// `waymark produce`.
fn produce_cmd(config: &Config, input: &str, options: &waymark::produce::ProduceOptions) -> Result<(), Failure> {
    validate_kafka(config)?;
    let mut client = waymark::worker::producer_config(config);
    client.set("linger.ms", "20");
    let files = if input == "-" { vec![] } else { replay::archive_files(Path::new(input)).map_err(anyhow::Error::new)? };
    let started = std::time::Instant::now();
    let mut report = |p: &waymark::produce::Produced| {
        tracing::info!(records = p.records, bytes = p.bytes, seconds = started.elapsed().as_secs(), "producing");
    };
    let mut total = waymark::produce::Produced::default();
    let mut readers: Vec<(String, Box<dyn std::io::BufRead>)> = Vec::new();
    if input == "-" {
        readers.push(("stdin".into(), replay::open_stdin().map_err(anyhow::Error::new)?));
    }
    for file in files {
        readers.push((file.display().to_string(), replay::open_archive(&file).map_err(anyhow::Error::new)?));
    }
    for (name, mut reader) in readers {
        let produced = waymark::produce::produce(&client, &mut *reader, options, &mut report)
            .map_err(|e| Failure { code: e.exit_code(), error: anyhow::Error::new(e).context(format!("archive {name}")) })?;
        total.records += produced.records;
        total.bytes += produced.bytes;
        total.skipped_truncated.extend(produced.skipped_truncated.into_iter().map(|s| format!("{name} {s}")));
        for (topic, n) in produced.per_topic {
            *total.per_topic.entry(topic).or_default() += n;
        }
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "produced {} records ({} bytes of bodies), every one acknowledged:", total.records, total.bytes);
    for (topic, n) in &total.per_topic {
        let _ = writeln!(err, "  {topic}: {n}");
    }
    if !total.skipped_truncated.is_empty() {
        let _ = writeln!(
            err,
            "skipped {} dead letters whose record was trimmed to fit ({}): fetch those originals from their topic, partition and offset",
            total.skipped_truncated.len(),
            total.skipped_truncated.join(", ")
        );
    }
    Ok(())
}
