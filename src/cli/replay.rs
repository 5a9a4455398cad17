//! `waymark replay`: kcat -J archives, or a topic's retained history, through
//! the same pipeline and state as the worker; upserts as NDJSON or to a topic.

use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;

use waymark::batch::Summary;
use waymark::clock::GuardedClock;
use waymark::config::Config;
use waymark::replay;
use waymark::sink::NdjsonSink;
use waymark::state::{MemoryStore, Overlay, StateStore};
use waymark::store::RocksStore;

use super::args::{parse_time, ConfigArgs, KafkaArgs};
use super::{layout_failure, load_config, millis_clock, validate_kafka, Failure};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Archive file (.gz ok), directory of archives (name order), or - for stdin.
    #[arg(long, required_unless_present = "from_topic", conflicts_with = "from_topic")]
    input: Option<String>,
    /// Replay a topic's retained history instead (all partitions,
    /// read_committed, no consumer-group side effects).
    #[arg(long)]
    from_topic: Option<String>,
    /// With --from-topic: start at records from this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    since: Option<chrono::DateTime<Utc>>,
    /// With --from-topic: stop before records from this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    until: Option<chrono::DateTime<Utc>>,
    /// Where upserts go as NDJSON (- for stdout).
    #[arg(long, default_value = "-")]
    output: String,
    /// Where dead letters go as NDJSON (without it they are counted, not kept).
    #[arg(long)]
    dlq: Option<PathBuf>,
    /// Where decisions go as NDJSON: every event that was not a plain new
    /// milestone (duplicates, revisions, prevented regressions) with what it
    /// matched, as on the worker's decisions topic. With --to-topic they go to
    /// kafka.decisions_topic when it is set.
    #[arg(long, conflicts_with = "to_topic")]
    decisions: Option<PathBuf>,
    /// State directory to dedupe against and update (the worker's, while it is
    /// stopped). Without it, state lives in memory for this run only (state.dir
    /// of the configuration is not used: a replay writes a worker's state only
    /// when asked to).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Dedupe against --state-dir but leave it untouched.
    #[arg(long)]
    dry_run: bool,
    /// Also write the summary as JSON to this file (records, events, new
    /// milestones, duplicates and invalid by reason, per carrier and tenant,
    /// the events' time span, milestones per status).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Read the whole source again, ignoring how far an earlier run with the
    /// same arguments got (by default a replay with --state-dir resumes).
    #[arg(long)]
    from_start: bool,
    /// Send the upserts to this Kafka topic (same keys, headers and milestone
    /// ids as the worker) instead of NDJSON, at least once (a re-run with the
    /// same --state-dir emits nothing again); dead letters go to
    /// kafka.dead_letter_topic.
    #[arg(long, conflicts_with = "output")]
    to_topic: Option<String>,
    /// With --to-topic: commit each batch in a Kafka transaction with this
    /// transactional.id (exactly once to read_committed readers).
    #[arg(long, requires = "to_topic")]
    transactional_id: Option<String>,
}

pub fn exec(args: Args) -> Result<(), Failure> {
    if args.from_topic.is_none() && (args.since.is_some() || args.until.is_some()) {
        // An archive has no time index to cut by: a range there would be
        // ignored and the whole archive replayed (and committed to state).
        return Err(Failure::usage(anyhow::anyhow!(
            "--since and --until select a range of a topic's history (with --from-topic); an archive is replayed whole. Cut the archive first (e.g. with jq on its \"ts\" field), or replay the topic it came from"
        )));
    }
    let config = load_config(&args.config, args.kafka.overrides())?;
    let source = match args.from_topic {
        Some(topic) => ReplaySource::Topic(topic, replay::TopicRange { since: args.since, until: args.until, ..replay::TopicRange::default() }),
        None => ReplaySource::Archive(args.input.unwrap_or_else(|| "-".into())),
    };
    let target = ReplayTarget {
        output: &args.output,
        dlq: args.dlq.as_deref(),
        decisions: args.decisions.as_deref(),
        to_topic: args.to_topic.as_deref(),
        transactional_id: args.transactional_id.as_deref(),
    };
    replay_cmd(&config, source, target, args.state_dir.as_deref(), args.dry_run, args.report.as_deref(), !args.from_start)
}

/// What replay reads.
enum ReplaySource {
    /// A file, a directory of files, or `-` (stdin).
    Archive(String),
    /// A topic's retained history.
    Topic(String, replay::TopicRange),
}

/// Where replay's upserts and dead letters go.
struct ReplayTarget<'a> {
    output: &'a str,
    dlq: Option<&'a Path>,
    decisions: Option<&'a Path>,
    to_topic: Option<&'a str>,
    transactional_id: Option<&'a str>,
}

fn replay_cmd(
    config: &Config,
    source: ReplaySource,
    target: ReplayTarget<'_>,
    state_dir: Option<&Path>,
    dry_run: bool,
    report: Option<&Path>,
    resume: bool,
) -> Result<(), Failure> {
    if matches!(source, ReplaySource::Topic(..)) || target.to_topic.is_some() {
        validate_kafka(config)?;
    }
    let mut pipeline = config.pipeline();
    if target.decisions.is_some() {
        pipeline.record_decisions = true;
    } else if target.to_topic.is_none() {
        // kafka.decisions_topic is the worker's (and --to-topic's) destination;
        // an NDJSON replay writes decisions only where --decisions says.
        pipeline.record_decisions = false;
    }
    let guarded = Arc::new(GuardedClock::system(waymark::clock::DEFAULT_MAX_STEP));
    let rocks = match state_dir {
        Some(dir) if dry_run && !dir.join("CURRENT").exists() => {
            eprintln!("note: {} holds no state yet; the dry run dedupes the archive within itself", dir.display());
            None
        }
        Some(dir) => {
            // A dry run only reads: read-only, so it works beside a running worker.
            let store = if dry_run {
                RocksStore::open_read_only(dir)
            } else {
                RocksStore::open(dir, &config.store, millis_clock(&guarded))
            }
            .with_context(|| format!("state directory {}", dir.display()))?;
            // The archive meets the worker's state in the same homes, or not at all.
            store.check_layout(&config.placement.layout(), !dry_run).map_err(layout_failure)?;
            Some(store)
        }
        None => None,
    };
    let memory = MemoryStore::default();
    let base: &dyn StateStore = match &rocks {
        Some(store) => store,
        None => &memory,
    };
    let overlay = Overlay::new(base);
    let store: &dyn StateStore = if dry_run { &overlay } else { base };

    let ReplayTarget { output, dlq, decisions, to_topic, transactional_id } = target;
    let upserts: Box<dyn Write> = if dry_run || to_topic.is_some() {
        Box::new(std::io::sink())
    } else if output == "-" {
        Box::new(BufWriter::new(std::io::stdout().lock()))
    } else {
        Box::new(BufWriter::new(
            std::fs::File::create(output).with_context(|| format!("cannot create output file {output}"))?,
        ))
    };
    let dead_letters: Option<Box<dyn Write>> = match dlq {
        Some(path) if !dry_run => Some(Box::new(BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create dead-letter file {}", path.display()))?,
        ))),
        _ => None,
    };
    let decisions: Option<Box<dyn Write>> = match decisions {
        Some(path) if !dry_run => Some(Box::new(BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create decisions file {}", path.display()))?,
        ))),
        _ => None,
    };
    let mut ndjson = NdjsonSink { upserts, dead_letters, decisions };
    let mut kafka: Option<Box<dyn waymark::sink::Sink>> = match to_topic {
        Some(topic) if !dry_run => {
            // The worker's own sink: same keys, headers and records. Replay keeps
            // its state in --state-dir, not in the changelog.
            let mut kafka_config = config.clone();
            kafka_config.kafka.output_topic = topic.to_string();
            kafka_config.changelog = None;
            let sink: Box<dyn waymark::sink::Sink> = match transactional_id {
                Some(id) => Box::new(
                    waymark::worker::transaction::ReplayTransactions::new(&kafka_config, id)
                        .map_err(|e| anyhow::anyhow!("Kafka transactional producer: {e}"))?,
                ),
                None => Box::new(
                    waymark::worker::producer::KafkaSink::new(&kafka_config).map_err(|e| anyhow::anyhow!("Kafka producer: {e}"))?,
                ),
            };
            Some(sink)
        }
        _ => None,
    };
    let sink: &mut dyn waymark::sink::Sink = match kafka.as_mut() {
        Some(kafka) => kafka.as_mut(),
        None => &mut ndjson,
    };

    // Progress: a bar with bytes, rate and ETA on a terminal (the archives' size
    // is known unless reading stdin); a log line every 5 s otherwise.
    let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let files = match &source {
        ReplaySource::Archive(input) if input != "-" => replay::archive_files(Path::new(input)).map_err(anyhow::Error::new)?,
        _ => Vec::new(),
    };
    let total_bytes: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    let on_terminal = std::io::stderr().is_terminal();
    let bar = if on_terminal {
        indicatif::ProgressBar::with_draw_target(Some(total_bytes).filter(|t| *t > 0), indicatif::ProgressDrawTarget::stderr())
    } else {
        indicatif::ProgressBar::hidden()
    };
    let template = if total_bytes > 0 {
        "{elapsed} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}"
    } else {
        "{spinner} {elapsed} {bytes} {bytes_per_sec} {msg}"
    };
    bar.set_style(indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()));
    let clock = || guarded.now();
    let started = std::time::Instant::now();
    let mut last_log = started;
    let mut on_progress = |s: &Summary| {
        let bytes = read.load(std::sync::atomic::Ordering::Relaxed);
        let counts = format!("{} records, {} milestones, {} duplicates, {} invalid", s.records, s.new_milestones, s.duplicate_hash + s.duplicate_key, s.invalid);
        if on_terminal {
            bar.set_position(bytes);
            bar.set_message(counts);
        } else if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = std::time::Instant::now();
            let rate = s.records as f64 / started.elapsed().as_secs_f64().max(0.001);
            let eta = (total_bytes > bytes && bytes > 0)
                .then(|| format!(", ETA {:.0} s", started.elapsed().as_secs_f64() * (total_bytes - bytes) as f64 / bytes as f64))
                .unwrap_or_default();
            tracing::info!("replay progress: {counts}; {bytes} of {} bytes read, {rate:.0} records/s{eta}", if total_bytes > 0 { total_bytes.to_string() } else { "?".into() });
        }
    };
    let input = match &source {
        ReplaySource::Archive(input) => input.clone(),
        ReplaySource::Topic(topic, _) => format!("topic:{topic}"),
    };
    let mut run = replay::Replay {
        pipeline: &pipeline,
        store,
        sink,
        now: &clock,
        summary: Summary::default(),
        on_progress: &mut on_progress,
        resume,
    };
    match &source {
        ReplaySource::Topic(topic, range) => {
            run.topic(&waymark::worker::base_config(config), topic, range).map_err(anyhow::Error::new)?;
        }
        ReplaySource::Archive(input) if input == "-" => {
            let mut stdin = replay::open_stdin_counted(&read).map_err(anyhow::Error::new)?;
            run.stream(&mut stdin, "stdin").map_err(anyhow::Error::new)?;
        }
        ReplaySource::Archive(_) => {
            for file in files {
                let mut reader = replay::open_archive_counted(&file, &read).map_err(anyhow::Error::new)?;
                run.stream(&mut reader, &file.display().to_string()).map_err(anyhow::Error::new)?;
            }
        }
    }
    let summary = run.summary;
    bar.finish_and_clear();
    drop(ndjson);
    drop(kafka);
    if let Some(path) = report {
        let json = serde_json::json!({"kind": "replay_report", "dry_run": dry_run, "input": input, "summary": summary});
        std::fs::write(path, serde_json::to_vec_pretty(&json).context("cannot encode the report")?)
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "replay {}:\n{summary}", if dry_run { "(dry run, nothing written)" } else { "done" });
    if summary.invalid > 0 && dlq.is_none() && !dry_run {
        let _ = writeln!(err, "note: {} dead letters were counted but not kept; pass --dlq PATH to keep them", summary.invalid);
    }
    Ok(())
}
