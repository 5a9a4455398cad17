//! The `waymark` binary: a thin CLI over the library. Exit codes: 0 success,
//! 2 usage or configuration error, 1 runtime failure.

use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use clap::{Parser, Subcommand};

use waymark::batch::Summary;

/// mimalloc instead of glibc's allocator: per event the pipeline allocates and
/// frees many small strings and buffers (see README, Benchmarks).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use waymark::clock::GuardedClock;
use waymark::config::{Config, ConfigError, LogFormat, Overrides, RawConfig};
use waymark::envelope::Envelope;
use waymark::replay;
use waymark::sink::NdjsonSink;
use waymark::state::{Keyspace, MemoryStore, Overlay, StateStore};
use waymark::store::{system_clock, RocksStore};
use waymark::http::{self, Health};
use waymark::telemetry::Telemetry;

/// `waymark --version`: the crate version, the commit and what the build can do.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("WAYMARK_GIT_COMMIT"),
    "; features: runtime; librdkafka bundled with gzip, snappy, lz4, zstd, ssl; RocksDB bundled with lz4)"
);

#[derive(Parser)]
#[command(name = "waymark", version = VERSION, about = "Carrier-tracking ingestion: raw carrier webhooks in, deduplicated ensure-milestone upserts out")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Default)]
struct ConfigArgs {
    /// TOML configuration file (every setting has a default; see README).
    #[arg(long, short = 'c', env = "WAYMARK_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Kafka worker (consumer group in, upserts and dead letters out).
    Run {
        #[command(flatten)]
        config: ConfigArgs,
        /// Kafka bootstrap servers.
        #[arg(long, env = "WAYMARK_BROKERS")]
        brokers: Option<String>,
        /// Consumer group id.
        #[arg(long, env = "WAYMARK_GROUP_ID")]
        group_id: Option<String>,
        /// Input topic (repeat, or comma-separated in the env var).
        #[arg(long = "input-topic", env = "WAYMARK_INPUT_TOPICS", value_delimiter = ',')]
        input_topics: Vec<String>,
        /// Output topic for ensure-milestone upserts.
        #[arg(long, env = "WAYMARK_OUTPUT_TOPIC")]
        output_topic: Option<String>,
        /// Dead-letter topic.
        #[arg(long, env = "WAYMARK_DEAD_LETTER_TOPIC")]
        dead_letter_topic: Option<String>,
        /// State directory (RocksDB).
        #[arg(long, env = "WAYMARK_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Address for /metrics, /healthz and /readyz.
        #[arg(long, env = "WAYMARK_HTTP_LISTEN")]
        http_listen: Option<String>,
        /// Delivery mode: at-least-once (default) or exactly-once (Kafka transactions).
        #[arg(long, env = "WAYMARK_DELIVERY")]
        delivery: Option<String>,
        /// transactional.id for exactly-once (stable per instance, distinct between instances).
        #[arg(long, env = "WAYMARK_TRANSACTIONAL_ID")]
        transactional_id: Option<String>,
        /// Any librdkafka property, as name=value (repeatable), e.g. -X security.protocol=SASL_SSL.
        #[arg(short = 'X', value_name = "NAME=VALUE")]
        kafka_property: Vec<String>,
    },
    /// Replay kcat -J archives through the same pipeline and state.
    Replay {
        #[command(flatten)]
        config: ConfigArgs,
        /// Archive file (.gz ok), directory of archives (name order), or - for stdin.
        #[arg(long, required_unless_present = "from_topic", conflicts_with = "from_topic")]
        input: Option<String>,
        /// Replay a topic's retained history instead (all partitions,
        /// read_committed, no consumer-group side effects).
        #[arg(long)]
        from_topic: Option<String>,
        /// With --from-topic: start at records from this time (RFC 3339).
        #[arg(long, requires = "from_topic", value_parser = parse_time)]
        since: Option<chrono::DateTime<Utc>>,
        /// With --from-topic: stop before records from this time (RFC 3339).
        #[arg(long, requires = "from_topic", value_parser = parse_time)]
        until: Option<chrono::DateTime<Utc>>,
        /// Where upserts go as NDJSON (- for stdout).
        #[arg(long, default_value = "-")]
        output: String,
        /// Where dead letters go as NDJSON (without it they are counted, not kept).
        #[arg(long)]
        dlq: Option<PathBuf>,
        /// State directory to dedupe against and update (the worker's, while it is
        /// stopped). Without it, state lives in memory for this run only.
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
    },
    /// Put a kcat -J archive (file, .gz, directory, or - for stdin) back on Kafka
    /// with its keys and headers: re-drive dumps, backfills and dead letters.
    Produce {
        #[command(flatten)]
        config: ConfigArgs,
        /// Archive file (gzip recognised by content), directory of archives (name order), or - for stdin.
        #[arg(long)]
        input: String,
        /// Topic for every record (default: each record's own topic).
        #[arg(long)]
        topic: Option<String>,
        /// Kafka bootstrap servers.
        #[arg(long, env = "WAYMARK_BROKERS")]
        brokers: Option<String>,
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
        /// Any librdkafka property, as name=value (repeatable).
        #[arg(short = 'X', value_name = "NAME=VALUE")]
        kafka_property: Vec<String>,
    },
    /// Normalize one webhook body and print its canonical events as NDJSON.
    Normalize {
        #[command(flatten)]
        config: ConfigArgs,
        /// Carrier name (easypost, ...).
        #[arg(long)]
        carrier: String,
        /// Tenant to stamp on the events.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Body file, or - for stdin.
        #[arg(default_value = "-")]
        file: String,
    },
    /// Validate a configuration: the file, environment overrides, declared carrier
    /// mappings and every librdkafka property (exit 2 naming what is wrong); with
    /// --connect, also reach the brokers and check the topics.
    Check {
        #[command(flatten)]
        config: ConfigArgs,
        /// Also connect: brokers reachable, input, output and dead-letter topics present.
        #[arg(long)]
        connect: bool,
    },
    /// Probe a running worker's /healthz (exit 0 healthy, 1 not): the container
    /// health check, with nothing but the binary.
    Health {
        #[command(flatten)]
        config: ConfigArgs,
        /// Address of the worker's HTTP endpoint (default: http.listen from the
        /// config; an unspecified address such as 0.0.0.0 is probed on loopback).
        #[arg(long, env = "WAYMARK_HTTP_LISTEN")]
        http_listen: Option<String>,
        /// Probe /readyz instead of /healthz.
        #[arg(long)]
        ready: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `waymark man > waymark.1`.
    Man,
    /// Inspect the state store.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Keys and disk use per keyspace.
    Stats {
        #[arg(long, env = "WAYMARK_STATE_DIR", default_value = "waymark-state")]
        state_dir: PathBuf,
    },
    /// Compact every keyspace now (drops expired entries).
    Compact {
        #[arg(long, env = "WAYMARK_STATE_DIR", default_value = "waymark-state")]
        state_dir: PathBuf,
    },
    /// Delete every entry whose TTL has passed, now, and say how many.
    Expire {
        #[arg(long, env = "WAYMARK_STATE_DIR", default_value = "waymark-state")]
        state_dir: PathBuf,
    },
    /// Write state as NDJSON ({"keyspace","key","value"} in hex), all or one partition.
    Export {
        #[arg(long, env = "WAYMARK_STATE_DIR", default_value = "waymark-state")]
        state_dir: PathBuf,
        #[command(flatten)]
        partition: PartitionArgs,
        /// Output file (- for stdout).
        #[arg(long, default_value = "-")]
        output: String,
    },
    /// Load NDJSON written by `state export` (into a new or existing state directory).
    Import {
        #[arg(long, env = "WAYMARK_STATE_DIR", default_value = "waymark-state")]
        state_dir: PathBuf,
        /// Input file (- for stdin).
        #[arg(long, default_value = "-")]
        input: String,
    },
    /// Delete all state of one partition (dedupe keys, shipments, progress), here
    /// and, with state.changelog on, in its changelog (a drop marker that every
    /// later restore honours). Stop the group's worker that owns it first.
    Drop {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, env = "WAYMARK_STATE_DIR", default_value = "waymark-state")]
        state_dir: PathBuf,
        #[command(flatten)]
        partition: PartitionArgs,
        /// Drop only this directory's copy; the changelog restores it at the next
        /// assignment (for when the broker is out of reach).
        #[arg(long)]
        local_only: bool,
    },
}

/// One partition that owns state, by topic and number: a home partition of the
/// repartition topic (`<group_id>-repartition`, the default routing), or an input
/// partition with `routing.mode = "input"`.
#[derive(clap::Args)]
struct PartitionArgs {
    /// Topic of the partition (with --partition), e.g. waymark-repartition.
    #[arg(long, requires = "partition")]
    topic: Option<String>,
    /// Partition number (with --topic).
    #[arg(long, requires = "topic")]
    partition: Option<i32>,
}

impl PartitionArgs {
    fn scope(&self) -> Option<waymark::state::Scope> {
        match (&self.topic, self.partition) {
            (Some(topic), Some(partition)) => Some(waymark::state::Scope::of(topic, partition)),
            _ => None,
        }
    }
}

/// The guarded clock as RocksDB's compaction filter reads it.
fn millis_clock(clock: &Arc<GuardedClock>) -> waymark::store::MillisClock {
    let clock = clock.clone();
    Arc::new(move || clock.now_ms())
}

/// An error with its exit code.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure { code: 1, error }
    }
}

/// A state directory of another layout: the configuration (or the directory) must change.
fn layout_failure(error: waymark::store::LayoutError) -> Failure {
    let code = match error {
        waymark::store::LayoutError::Store(_) => 1,
        _ => 2,
    };
    Failure { code, error: error.into() }
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        Failure { code: 2, error: error.into() }
    }
}

/// Logs to stderr: `WAYMARK_LOG` filters (`info` by default); text with colour
/// only on a terminal, or JSON lines. Set once, from the first config loaded.
fn init_logging(format: LogFormat) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("WAYMARK_LOG").unwrap_or_else(|_| "info".into());
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
        match format {
            LogFormat::Json => builder.json().with_current_span(false).init(),
            LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        }
    });
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            config,
            brokers,
            group_id,
            input_topics,
            output_topic,
            dead_letter_topic,
            state_dir,
            http_listen,
            delivery,
            transactional_id,
            kafka_property,
        } => parse_properties(&kafka_property).and_then(|kafka_properties| {
            let overrides = Overrides {
                brokers,
                group_id,
                input_topics,
                output_topic,
                dead_letter_topic,
                state_dir,
                http_listen,
                delivery,
                transactional_id,
                kafka_properties,
            };
            load_config(config.config.as_deref(), overrides).and_then(run)
        }),
        Command::Replay { config, input, from_topic, since, until, output, dlq, state_dir, dry_run, report, to_topic, from_start, transactional_id } => {
            if from_topic.is_none() && (since.is_some() || until.is_some()) {
                // An archive has no time index to cut by: a range there would be
                // ignored and the whole archive replayed (and committed to state).
                Err(Failure {
                    code: 2,
                    error: anyhow::anyhow!(
                        "--since and --until select a range of a topic's history (with --from-topic); an archive is replayed whole. Cut the archive first (e.g. with jq on its \"ts\" field), or replay the topic it came from"
                    ),
                })
            } else {
                load_config(config.config.as_deref(), Overrides::default()).and_then(|c| {
                    let source = match from_topic {
                        Some(topic) => ReplaySource::Topic(topic, replay::TopicRange { since, until, ..replay::TopicRange::default() }),
                        None => ReplaySource::Archive(input.unwrap_or_else(|| "-".into())),
                    };
                    let target = ReplayTarget {
                        output: &output,
                        dlq: dlq.as_deref(),
                        to_topic: to_topic.as_deref(),
                        transactional_id: transactional_id.as_deref(),
                    };
                    replay_cmd(&c, source, target, state_dir.as_deref(), dry_run, report.as_deref(), !from_start)
                })
            }
        }
        Command::Normalize { config, carrier, tenant, file } => {
            load_config(config.config.as_deref(), Overrides::default()).and_then(|c| normalize(&c, &carrier, &tenant, &file))
        }
        Command::State { command } => state_cmd(command),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "waymark", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut std::io::stdout())
            .map_err(|e| anyhow::anyhow!("cannot write the man page: {e}").into()),
        Command::Produce { config, input, topic, brokers, keep_partitions, dead_letters, keep_timestamps, kafka_property } => {
            parse_properties(&kafka_property).and_then(|kafka_properties| {
                let overrides = Overrides { brokers, kafka_properties, ..Overrides::default() };
                let options = waymark::produce::ProduceOptions { topic, keep_partitions, dead_letters, keep_timestamps };
                load_config(config.config.as_deref(), overrides).and_then(|c| produce_cmd(&c, &input, &options))
            })
        }
        Command::Check { config, connect } => load_config(config.config.as_deref(), Overrides::default()).and_then(|c| check(&c, connect)),
        Command::Health { config, http_listen, ready } => {
            let overrides = Overrides { http_listen, ..Overrides::default() };
            load_config(config.config.as_deref(), overrides).and_then(|c| health(&c, ready))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            init_logging(LogFormat::Text);
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

fn parse_properties(raw: &[String]) -> Result<Vec<(String, String)>, Failure> {
    raw.iter()
        .map(|p| {
            p.split_once('=').map(|(k, v)| (k.trim().to_string(), v.to_string())).ok_or_else(|| Failure {
                code: 2,
                error: anyhow::anyhow!("-X {p}: write librdkafka properties as name=value"),
            })
        })
        .collect()
}

fn load_config(path: Option<&Path>, overrides: Overrides) -> Result<Config, Failure> {
    let mut raw = match path {
        Some(path) => RawConfig::from_file(path)?,
        None => RawConfig::default(),
    };
    raw.apply_env(std::env::vars())?;
    raw.apply(overrides);
    let config = raw.validate()?;
    init_logging(config.log_format);
    Ok(config)
}

fn run(config: Config) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let handle = http::install_recorder().context("cannot install the metrics recorder")?;
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
    runtime.spawn(http::serve(listener, handle, health.clone(), async {
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
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => if worker.is_finished() { break },
            }
        }
    });
    shutdown.store(true, Ordering::SeqCst);
    tracing::info!(deadline = ?config.shutdown_timeout, "stopping");
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

/// Every librdkafka property of the configuration, checked before a command
/// creates a client: a bad one exits 2 naming the property and never its value
/// (librdkafka's own message quotes the value, which may be a password).
fn validate_kafka(config: &Config) -> Result<(), Failure> {
    waymark::worker::client::validate(config).map_err(|e| Failure { code: 2, error: anyhow::anyhow!(e) })
}

/// `waymark check`: everything that can be checked before `run`.
fn check(config: &Config, connect: bool) -> Result<(), Failure> {
    validate_kafka(config)?;
    println!("configuration ok: {} input topic(s), delivery {:?}, routing {}", config.kafka.input_topics.len(), config.delivery, config.placement.layout());
    if !connect {
        return Ok(());
    }
    let admin = waymark::worker::topics::Admin::new(&waymark::worker::base_config(config), Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("cannot create an admin client: {e}"))?;
    let mut missing = Vec::new();
    let topics = config.kafka.input_topics.iter().chain([&config.kafka.output_topic, &config.kafka.dead_letter_topic]);
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

/// GET /healthz (or /readyz) from the worker and report.
fn health(config: &Config, ready: bool) -> Result<(), Failure> {
    use std::io::Read;
    let mut addr = config.http_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { std::net::Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let path = if ready { "/readyz" } else { "/healthz" };
    let timeout = Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot reach the worker at {addr} (is `waymark run` up, with http.listen = {addr}?)"))?;
    stream.set_read_timeout(Some(timeout)).context("socket")?;
    stream.set_write_timeout(Some(timeout)).context("socket")?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").context("sending the probe")?;
    let mut response = String::new();
    stream.read_to_string(&mut response).context("reading the worker's answer")?;
    let status = response.split_whitespace().nth(1).unwrap_or("?");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or("");
    if status == "200" {
        println!("{path}: ok");
        Ok(())
    } else {
        Err(anyhow::anyhow!("{path} answered {status}: {body}").into())
    }
}

/// An RFC 3339 instant on the command line.
fn parse_time(text: &str) -> Result<chrono::DateTime<Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{e}: write an RFC 3339 time such as 2026-11-02T00:00:00Z"))
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
    let pipeline = config.pipeline();
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

    let ReplayTarget { output, dlq, to_topic, transactional_id } = target;
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
    let mut ndjson = NdjsonSink { upserts, dead_letters };
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

fn normalize(config: &Config, carrier: &str, tenant: &str, file: &str) -> Result<(), Failure> {
    let body = if file == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf).context("cannot read stdin")?;
        buf
    } else {
        std::fs::read(file).with_context(|| format!("cannot read {file}"))?
    };
    let now = Utc::now();
    let envelope = Envelope {
        topic: format!("{}{carrier}", waymark::envelope::RAW_TOPIC_PREFIX),
        partition: 0,
        offset: 0,
        timestamp_ms: Some(now.timestamp_millis()),
        headers: vec![("tenant-id".into(), Some(tenant.as_bytes().to_vec()))],
        key: None,
        payload: body,
    };
    match config.pipeline().canonical_events(&envelope, now) {
        Ok((_, events)) => {
            let mut out = BufWriter::new(std::io::stdout().lock());
            for event in events {
                serde_json::to_writer(&mut out, &event).context("cannot write to stdout")?;
                writeln!(out).context("cannot write to stdout")?;
            }
            out.flush().context("cannot write to stdout")?;
            Ok(())
        }
        Err(rejected) => Err(anyhow::anyhow!("dead letter ({}): {}", rejected.error.kind(), rejected.error).into()),
    }
}

fn state_cmd(command: StateCommand) -> Result<(), Failure> {
    let format = std::env::var("WAYMARK_LOG_FORMAT").ok().and_then(|f| LogFormat::parse(&f).ok()).unwrap_or(LogFormat::Text);
    init_logging(format);
    match command {
        StateCommand::Stats { state_dir } => {
            // Read-only: works beside a running worker.
            let store = open_existing_read_only(&state_dir)?;
            let mut out = std::io::stdout().lock();
            let layout = store.layout().map_err(anyhow::Error::new)?;
            let _ = writeln!(out, "layout: {}", layout.as_deref().unwrap_or("(none: empty, or written by a Waymark older than shipment homes)"));
            let _ = writeln!(out, "{:<10} {:>14} {:>14}", "keyspace", "keys (est.)", "sst bytes");
            for keyspace in Keyspace::ALL {
                let keys = store.estimated_keys(keyspace).map_err(anyhow::Error::new)?;
                let bytes = store.disk_bytes(keyspace).map_err(anyhow::Error::new)?;
                let _ = writeln!(out, "{:<10} {:>14} {:>14}", keyspace.name(), keys, bytes);
            }
            Ok(())
        }
        StateCommand::Compact { state_dir } => {
            let store = open_existing(&state_dir)?;
            if std::io::stderr().is_terminal() {
                eprintln!("compacting {} ...", state_dir.display());
            }
            store.flush().map_err(anyhow::Error::new)?;
            store.compact().map_err(anyhow::Error::new)?;
            eprintln!("compacted {}", state_dir.display());
            Ok(())
        }
        StateCommand::Expire { state_dir } => {
            let store = open_existing(&state_dir)?;
            for (keyspace, n) in store.expire(Utc::now().timestamp_millis()).map_err(anyhow::Error::new)? {
                println!("{:<10} {n} expired entries deleted", keyspace.name());
            }
            Ok(())
        }
        StateCommand::Export { state_dir, partition, output } => {
            let store = open_existing_read_only(&state_dir)?;
            let asked = partition.scope().is_some();
            let mut out: Box<dyn Write> = if output == "-" {
                Box::new(BufWriter::new(std::io::stdout().lock()))
            } else {
                Box::new(BufWriter::new(std::fs::File::create(&output).with_context(|| format!("cannot create {output}"))?))
            };
            let n = store.export(partition.scope(), &mut out).map_err(anyhow::Error::new)?;
            out.flush().context("cannot write the export")?;
            eprintln!("exported {n} entries");
            if asked && n == 0 {
                eprintln!("note: no state for that partition: check --topic (a home partition's topic is <group_id>-repartition) and --partition");
            }
            Ok(())
        }
        StateCommand::Import { state_dir, input } => {
            // The input first: a missing file must not leave an empty state directory behind.
            let mut reader: Box<dyn std::io::BufRead> = if input == "-" {
                Box::new(std::io::BufReader::new(std::io::stdin().lock()))
            } else {
                let file = std::fs::File::open(&input)
                    .map_err(|e| Failure { code: 2, error: anyhow::anyhow!("cannot open the import file {input}: {e}") })?;
                Box::new(std::io::BufReader::new(file))
            };
            let store = RocksStore::open(&state_dir, &Default::default(), system_clock()).map_err(anyhow::Error::new)?;
            let n = store.import(&mut reader).map_err(|e| match e {
                // The file is wrong, not the store: say so, and never suggest deleting state.
                waymark::error::StoreError::Corrupt { keyspace: "import", reason } => Failure {
                    code: 2,
                    error: anyhow::anyhow!("{input} is not a `waymark state export` file: {reason} (nothing after that line was imported)"),
                },
                other => anyhow::Error::new(other).into(),
            })?;
            eprintln!("imported {n} entries into {}", state_dir.display());
            Ok(())
        }
        StateCommand::Drop { config, state_dir, partition, local_only } => {
            let (Some(scope), Some(topic), Some(number)) = (partition.scope(), partition.topic.as_deref(), partition.partition) else {
                return Err(Failure { code: 2, error: anyhow::anyhow!("state drop needs --topic and --partition") });
            };
            // The directory's lock first: a worker that still runs on it would
            // write the partition's state straight back.
            let store = open_existing(&state_dir)?;
            let config = load_config(config.config.as_deref(), Overrides::default())?;
            if config.changelog.is_some() && !local_only {
                validate_kafka(&config)?;
            }
            let changelog = waymark::worker::changelog::topic_for(&config.kafka.group_id, topic);
            if config.changelog.is_none() {
                // No changelog: the local copy is the only one.
            } else if local_only {
                eprintln!(
                    "note: --local-only: the worker restores this partition from {changelog} at the next assignment; run `waymark state drop` without it while the broker is reachable to forget it for good"
                );
            } else {
                // A running group would not see the marker: the partition's
                // owner reads its changelog on from its own writes, so it keeps
                // the state while a later restore elsewhere drops it (instances
                // that disagree: duplicates and statuses moving back). Only a
                // stopped group can be dropped from.
                let members = waymark::worker::topics::group_members(&waymark::worker::base_config(&config), &config.kafka.group_id, Duration::from_secs(15))
                    .map_err(|e| Failure {
                        code: 1,
                        error: anyhow::anyhow!(
                            "cannot tell whether group `{}` is running ({e}); nothing was dropped. Check kafka.brokers (--config, WAYMARK_KAFKA__BROKERS), or pass --local-only to drop only this directory's copy",
                            config.kafka.group_id
                        ),
                    })?;
                if !members.is_empty() {
                    return Err(Failure {
                        code: 2,
                        error: anyhow::anyhow!(
                            "group `{}` has {} active member(s) ({}): stop every instance of the group first. Dropped while it runs, the marker lands among the partition owner's own changelog writes, which it never reads back: it keeps the state while later restores elsewhere drop it. Nothing was dropped",
                            config.kafka.group_id,
                            members.len(),
                            members.join(", ")
                        ),
                    });
                }
                // Marker before the local drop: if the drop then fails, the next
                // restore reads the marker and drops the local copy anyway.
                let client = waymark::worker::client::producer_config(&config);
                match waymark::worker::changelog::write_drop_marker(&client, &config.kafka.group_id, topic, number, Utc::now(), Duration::from_secs(15)) {
                    Ok(true) => eprintln!("wrote a drop marker to {changelog} [{number}]: restores from the changelog forget what came before it"),
                    Ok(false) => eprintln!("no changelog topic {changelog} on {}: nothing can restore this partition", config.kafka.brokers),
                    Err(e) => {
                        return Err(Failure {
                            code: 1,
                            error: anyhow::anyhow!(
                                "{e}; nothing was dropped. Check kafka.brokers and kafka.group_id (--config, WAYMARK_KAFKA__BROKERS), or pass --local-only to drop only this directory's copy"
                            ),
                        })
                    }
                }
            }
            store.drop_scope(scope).map_err(anyhow::Error::new)?;
            eprintln!("dropped the state of {topic} partition {number} in {}", state_dir.display());
            Ok(())
        }
    }
}

/// Open a state directory read-only (beside a running worker).
fn open_existing_read_only(dir: &Path) -> Result<RocksStore, Failure> {
    check_state_dir(dir)?;
    Ok(RocksStore::open_read_only(dir).map_err(anyhow::Error::new)?)
}

fn open_existing(dir: &Path) -> Result<RocksStore, Failure> {
    check_state_dir(dir)?;
    Ok(RocksStore::open(dir, &Default::default(), system_clock()).map_err(anyhow::Error::new)?)
}

fn check_state_dir(dir: &Path) -> Result<(), Failure> {
    if !dir.join("CURRENT").exists() {
        return Err(Failure {
            code: 2,
            error: anyhow::anyhow!("{} holds no waymark state (pass --state-dir or set WAYMARK_STATE_DIR)", dir.display()),
        });
    }
    Ok(())
}
