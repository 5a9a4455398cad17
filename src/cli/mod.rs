//! The commands of the `waymark` binary, one file each; `main.rs` only parses
//! the command line and dispatches.
//!
//! Every command reads its settings the same way: the configuration file
//! (`--config`, `WAYMARK_CONFIG`), then the `WAYMARK_*` variables (one rule,
//! `waymark::config::RawConfig::apply_env`, short aliases included), then its
//! flags. Every command that talks to Kafka takes the same connection flags,
//! `--brokers` and `-X` ([`args::KafkaArgs`]), and checks every librdkafka
//! property before it creates a client ([`validate_kafka`]).
//!
//! Exit codes: 0 success, 2 usage or configuration error, 1 runtime failure.

pub mod args;
pub mod audit;
pub mod check;
pub mod correct;
pub mod explain;
pub mod health;
pub mod ingest;
pub mod normalize;
pub mod produce;
pub mod replay;
pub mod run;
pub mod state;

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use waymark::clock::GuardedClock;
use waymark::config::{Config, ConfigError, LogFormat, Overrides, RawConfig};

/// An error with its exit code.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    /// A usage or configuration error (exit 2).
    pub fn usage(error: anyhow::Error) -> Failure {
        Failure { code: 2, error }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure { code: 1, error }
    }
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        Failure { code: 2, error: error.into() }
    }
}

/// A state directory of another layout: the configuration (or the directory) must change.
pub fn layout_failure(error: waymark::store::LayoutError) -> Failure {
    let code = match error {
        waymark::store::LayoutError::Store(_) => 1,
        _ => 2,
    };
    Failure { code, error: error.into() }
}

/// The log format in use, once logging is set up.
static LOG_FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Logs to stderr: `WAYMARK_LOG` filters (`info` by default; a filter that
/// does not parse is an error, not a silent `info`); text with colour only on
/// a terminal, or JSON lines. Set once, from the first configuration loaded.
pub fn init_logging(format: LogFormat) -> Result<(), Failure> {
    let filter = match std::env::var("WAYMARK_LOG") {
        Ok(text) => tracing_subscriber::EnvFilter::try_new(&text).map_err(|e| {
            Failure::usage(anyhow::anyhow!(
                "environment variable WAYMARK_LOG = \"{text}\" is not a log filter ({e}): write a level such as info, debug or warn, or e.g. waymark=debug,info"
            ))
        })?,
        Err(_) => tracing_subscriber::EnvFilter::new("info"),
    };
    if LOG_FORMAT.set(format).is_err() {
        return Ok(());
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    Ok(())
}

/// The configuration a command runs with: `--config` (or the defaults), the
/// `WAYMARK_*` variables, then the command's flags.
pub fn load_config(config: &args::ConfigArgs, overrides: Overrides) -> Result<Config, Failure> {
    let mut raw = match &config.config {
        Some(path) => RawConfig::from_file(path)?,
        None => RawConfig::default(),
    };
    raw.apply_env(std::env::vars())?;
    raw.apply(overrides);
    let config = raw.validate()?;
    init_logging(config.log_format)?;
    Ok(config)
}

/// Every librdkafka property of the configuration, checked before a command
/// creates a client: a bad one exits 2 naming the property and never its value
/// (librdkafka's own message quotes the value, which may be a password).
pub fn validate_kafka(config: &Config) -> Result<(), Failure> {
    waymark::worker::client::validate(config).map_err(|e| Failure::usage(anyhow::anyhow!(e)))
}

/// The guarded clock as RocksDB's compaction filter reads it.
pub fn millis_clock(clock: &Arc<GuardedClock>) -> waymark::store::MillisClock {
    let clock = clock.clone();
    Arc::new(move || clock.now_ms())
}

/// Write `bytes` to stdout. A reader that went away (`waymark man | head`)
/// ends the command quietly; it is not an error.
pub fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(anyhow::anyhow!("cannot write to stdout: {e}").into()),
        _ => Ok(()),
    }
}

/// The process's end: the exit code, and the reason of a failure on stderr, as
/// one JSON log line when logs are JSON (the reason is often the only line a
/// log pipeline must not lose), else as `error: ...`. A closed stdout (the
/// reader of the output stopped, as `head` does) ends quietly with 0.
pub fn exit(result: Result<(), Failure>) -> ExitCode {
    let failure = match result {
        Ok(()) => return ExitCode::SUCCESS,
        Err(failure) => failure,
    };
    let broken_pipe = failure.error.chain().any(|cause| cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe));
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    // A configuration that failed to load still says how logs should look.
    let format = LOG_FORMAT.get().copied().unwrap_or_else(|| {
        let requested = std::env::var("WAYMARK_LOG__FORMAT").or_else(|_| std::env::var("WAYMARK_LOG_FORMAT"));
        requested.ok().and_then(|f| LogFormat::parse(&f).ok()).unwrap_or(LogFormat::Text)
    });
    let reason = format!("{:#}", failure.error);
    match format {
        LogFormat::Json => {
            let line = serde_json::json!({
                "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "level": "ERROR",
                "fields": { "message": "stopped", "error": reason, "exit_code": failure.code },
            });
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
        LogFormat::Text => {
            let _ = writeln!(std::io::stderr().lock(), "error: {reason}");
        }
    }
    ExitCode::from(failure.code)
}

/// Open a state directory read-only (beside a running worker).
pub fn open_existing_read_only(dir: &Path) -> Result<waymark::store::RocksStore, Failure> {
    check_state_dir(dir)?;
    Ok(waymark::store::RocksStore::open_read_only(dir).map_err(anyhow::Error::new)?)
}

/// Open a state directory that must already hold state (takes its lock).
pub fn open_existing(dir: &Path) -> Result<waymark::store::RocksStore, Failure> {
    check_state_dir(dir)?;
    Ok(waymark::store::RocksStore::open(dir, &Default::default(), waymark::store::system_clock()).map_err(anyhow::Error::new)?)
}

fn check_state_dir(dir: &Path) -> Result<(), Failure> {
    if !dir.join("CURRENT").exists() {
        return Err(Failure::usage(anyhow::anyhow!(
            "{} holds no waymark state (pass --state-dir, or set state.dir in --config or WAYMARK_STATE_DIR)",
            dir.display()
        )));
    }
    Ok(())
}
