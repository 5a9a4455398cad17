//! One typed configuration: a TOML file, then `WAYMARK_*` environment overrides,
//! then command-line flags, validated once into [`Config`] that the rest of the
//! program trusts. Every field has a default, so `waymark run` starts with no file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::carriers::DEFAULT_MAX_BODY_BYTES;
use crate::dedupe::{DedupeConfig, DedupePolicy};
use crate::envelope::EnvelopeRules;
use crate::routing::{repartition_topic, Placement};
use crate::store::StoreOptions;

/// A configuration problem: always exit code 2, with what to change.
#[derive(Debug, Error)]
pub enum ConfigError {
    // `error`, not `source`: the message already quotes it, and a source would
    // be printed a second time by callers that print the error's chain.
    #[error("cannot read config file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The mapping's own message says what to fix (not a `source`: see `LoadError`).
    #[error("declared_carriers: {0}")]
    DeclaredCarrier(crate::carriers::declared::LoadError),
}

/// How outputs and input offsets are committed (see `kafka` for the guarantees).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    /// Idempotent producer; state and offsets written after outputs are acknowledged.
    #[default]
    AtLeastOnce,
    /// Outputs and consumer offsets in one Kafka transaction; state written after it
    /// commits and caught up from the input on assignment.
    ExactlyOnce,
}

impl DeliveryMode {
    /// Are the input offsets committed inside the batch's transaction (and
    /// never by the consumer itself)? Exactly-once: yes, so the consumer's
    /// own commits (per batch, when idle, on revocation and shutdown) are off,
    /// and the group's committed offset is the one truth of a partition's
    /// progress. At-least-once: the consumer commits them after each batch.
    pub fn offsets_in_transaction(self) -> bool {
        matches!(self, DeliveryMode::ExactlyOnce)
    }
}

/// `--delivery`'s parser: the configuration's spelling.
impl std::str::FromStr for DeliveryMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "at-least-once" => Ok(DeliveryMode::AtLeastOnce),
            "exactly-once" => Ok(DeliveryMode::ExactlyOnce),
            other => Err(format!("`{other}`: write at-least-once or exactly-once")),
        }
    }
}

/// The mode as the configuration spells it.
impl std::fmt::Display for DeliveryMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeliveryMode::AtLeastOnce => "at-least-once",
            DeliveryMode::ExactlyOnce => "exactly-once",
        })
    }
}

/// `[kafka]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSection {
    /// bootstrap.servers
    pub brokers: String,
    /// Consumer group: instances with the same id share the input partitions.
    pub group_id: String,
    pub input_topics: Vec<String>,
    pub output_topic: String,
    pub dead_letter_topic: String,
    /// Where every decision that was not a plain new milestone goes
    /// (duplicates, revisions, prevented regressions; schemas/decision.schema.json).
    /// Unset (the default): no decisions are recorded.
    pub decisions_topic: Option<String>,
    /// Where corrections arrive (`waymark correct` writes them;
    /// schemas/correction.schema.json). Unset (the default): none are read.
    pub control_topic: Option<String>,
    /// `at-least-once` (default) or `exactly-once` (Kafka transactions).
    pub delivery: DeliveryMode,
    /// transactional.id of this instance (`exactly-once` outputs, and the
    /// changelog writes of `at-least-once` with state hand-over): stable across
    /// restarts of one instance, distinct between instances. Default:
    /// `waymark-<group_id>-<hostname>-<8 hex digits of the state directory>`.
    pub transactional_id: Option<String>,
    /// librdkafka properties for both consumer and producer (security settings go here).
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only.
    pub consumer_properties: BTreeMap<String, String>,
    /// librdkafka properties for the producer only.
    pub producer_properties: BTreeMap<String, String>,
}

impl Default for KafkaSection {
    fn default() -> Self {
        KafkaSection {
            brokers: "127.0.0.1:9092".into(),
            group_id: crate::routing::DEFAULT_GROUP.into(),
            input_topics: vec!["tracking.raw.easypost".into()],
            output_topic: "tracking.milestones".into(),
            dead_letter_topic: "tracking.dead-letter".into(),
            decisions_topic: None,
            control_topic: None,
            delivery: DeliveryMode::AtLeastOnce,
            transactional_id: None,
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
        }
    }
}

/// `[tenancy]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenancySection {
    pub require_tenant: bool,
    pub default_tenant: String,
}
impl Default for TenancySection {
    fn default() -> Self {
        TenancySection { require_tenant: false, default_tenant: "default".into() }
    }
}

/// `[state]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateSection {
    pub dir: PathBuf,
    pub block_cache_mb: usize,
    pub memtable_mb: usize,
    pub sync_writes: bool,
    /// Log state changes to a compacted changelog topic per input topic, so a
    /// partition's dedupe and shipment state moves with it between instances.
    pub changelog: bool,
    /// Replication factor of changelog topics the worker creates (-1: the broker's
    /// `default.replication.factor`).
    pub changelog_replication: i32,
}
impl Default for StateSection {
    fn default() -> Self {
        StateSection {
            dir: PathBuf::from("waymark-state"),
            block_cache_mb: 128,
            memtable_mb: 32,
            sync_writes: true,
            changelog: true,
            changelog_replication: -1,
        }
    }
}

/// A dedupe policy as written in TOML (`ttl = "30d"`, `skew = "2s"`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySection {
    pub ttl: Option<String>,
    pub skew: Option<String>,
}

/// `[dedupe]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupeSection {
    pub ttl: Option<String>,
    pub skew: Option<String>,
    /// `[dedupe.carriers.<name>]` overrides.
    pub carriers: BTreeMap<String, PolicySection>,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    pub max_body_bytes: usize,
}
impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection { max_body_bytes: DEFAULT_MAX_BODY_BYTES }
    }
}

/// `[worker]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSection {
    /// Records per batch: one output flush and one state write per batch.
    pub batch_size: usize,
    /// Longest wait to fill a batch once its first record is in. The default,
    /// `0ms`, takes what has arrived and goes: under load the consumer's
    /// prefetched records fill batches at once (and batches grow, see
    /// `AdaptiveBatch`), and a quiet stream is not held back. A positive wait
    /// trades latency for fewer, larger batches.
    pub batch_wait: String,
    /// A batch also closes when its records' bodies reach this many bytes, so
    /// what the worker holds is bounded in bytes, not only in records.
    pub batch_max_bytes: usize,
    /// Deadline for finishing in-flight work on SIGTERM.
    pub shutdown_timeout: String,
    /// Longest a partition's state restore from its changelog may take on
    /// assignment before the worker stops with an error.
    pub restore_timeout: String,
    /// `/healthz` fails when there is lag and no batch has completed for this
    /// long ("0s": never), so an orchestrator restarts a stuck worker.
    pub stall_timeout: String,
    /// Threads that read and normalize a batch's records (the worker's and
    /// replay's): 0 is one per core. Dedupe and ordering use one thread whatever
    /// this is, and results do not depend on it.
    pub normalize_threads: usize,
}
impl Default for WorkerSection {
    fn default() -> Self {
        WorkerSection {
            batch_size: 500,
            batch_wait: "0ms".into(),
            batch_max_bytes: 16 << 20,
            shutdown_timeout: "30s".into(),
            restore_timeout: "10m".into(),
            stall_timeout: "5m".into(),
            normalize_threads: 0,
        }
    }
}

/// `[order]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrderSection {
    /// Bounded reorder window: hold records up to this long ("0s": off) and emit
    /// their new milestones in status-hierarchy order per shipment.
    pub reorder_window: String,
    /// ...or until this many records are held, whichever comes first.
    pub reorder_max_records: usize,
    /// ...or until the held records' bodies reach this many bytes.
    pub reorder_max_bytes: usize,
    /// A delivered (returned, cancelled) shipment followed by a label-created or
    /// picked-up scan more than this long after its latest event, by event
    /// times, is a reused tracking number: a new generation with its own
    /// milestone ids. 30 days: longer than a parcel's own early scans after a
    /// terminal one (a return picked up in the usual return window), shorter
    /// than the months after which carriers reuse numbers.
    pub generation_gap: String,
    /// The same per carrier (`[order.generation_gaps] usps = "60d"`).
    pub generation_gaps: BTreeMap<String, String>,
}
impl Default for OrderSection {
    fn default() -> Self {
        OrderSection {
            reorder_window: "0s".into(),
            reorder_max_records: 10_000,
            reorder_max_bytes: 64 << 20,
            generation_gap: "30d".into(),
            generation_gaps: BTreeMap::new(),
        }
    }
}

/// Where shipment state lives, as `routing.mode` spells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    /// Every shipment's events go through the repartition topic to one home partition.
    #[default]
    Home,
    /// The input partition is the home (only when producers key by shipment).
    Input,
}

/// `[routing]`: where a shipment's state lives (see `routing`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingSection {
    /// `home` (default): every shipment's events are routed through the
    /// repartition topic to one home partition, whatever the producer's keying.
    /// `input`: the input is keyed by shipment, the input partition is the home
    /// (no extra hop; a runtime check counts shipments seen on two partitions).
    pub mode: RoutingMode,
    /// Partitions of the processing stage (the repartition topic): fixed when a
    /// group is first deployed; a state directory made with another count is refused.
    pub partitions: u32,
    /// `retention.ms` of the repartition topic the worker creates: longer than the
    /// group can ever lag (its records are consumed within seconds normally).
    pub retention: String,
    /// Replication factor of the repartition topic the worker creates (-1: the broker's default).
    pub replication: i32,
}
impl Default for RoutingSection {
    fn default() -> Self {
        RoutingSection { mode: RoutingMode::Home, partitions: crate::routing::DEFAULT_PARTITIONS, retention: "7d".into(), replication: -1 }
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    pub listen: String,
    /// Bearer token that turns on `/explain` (it shows tenants' tracking data,
    /// so it is off without one). At least 16 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain_token: Option<String>,
}
impl Default for HttpSection {
    fn default() -> Self {
        HttpSection { listen: "127.0.0.1:9464".into(), explain_token: None }
    }
}

/// A secret that never shows in a log line, an error or a `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// `text` (human-readable; colour only on a terminal) or `json` (one JSON
    /// object per line, for log shippers). `WAYMARK_LOG_FORMAT` overrides it.
    pub format: LogFormat,
}
impl Default for LogSection {
    fn default() -> Self {
        LogSection { format: LogFormat::Text }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub fn parse(text: &str) -> Result<LogFormat, ConfigError> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(ConfigError::Invalid(format!("log.format = \"{other}\": write \"text\" or \"json\""))),
        }
    }
}

/// `[telemetry]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySection {
    /// Label events with the tenant (only with a bounded number of tenants).
    pub tenant_label: bool,
}

/// The file as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    pub kafka: KafkaSection,
    /// topic -> carrier, beyond the `tracking.raw.<carrier>` convention.
    pub topics: BTreeMap<String, String>,
    pub tenancy: TenancySection,
    pub state: StateSection,
    pub dedupe: DedupeSection,
    pub limits: LimitsSection,
    pub worker: WorkerSection,
    pub order: OrderSection,
    pub routing: RoutingSection,
    pub http: HttpSection,
    pub telemetry: TelemetrySection,
    pub log: LogSection,
    /// `waymark ingest`, the webhook receiver.
    pub ingest: crate::ingest::config::IngestSection,
    /// Mapping files of user-declared carriers (`declared_carriers = ["carriers/acme.toml"]`,
    /// a top-level key). Relative paths are relative to the config file's directory.
    pub declared_carriers: Vec<PathBuf>,
    /// Directory of the config file, for relative paths in it (`None`: the working
    /// directory). Set by [`RawConfig::from_file`], never read from TOML.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// Overrides from command-line flags: applied after the file and the `WAYMARK_*`
/// variables, so a flag wins.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub brokers: Option<String>,
    pub group_id: Option<String>,
    pub input_topics: Vec<String>,
    pub output_topic: Option<String>,
    pub dead_letter_topic: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub http_listen: Option<String>,
    pub ingest_listen: Option<String>,
    pub delivery: Option<DeliveryMode>,
    pub transactional_id: Option<String>,
    /// `-X name=value` librdkafka properties.
    pub kafka_properties: Vec<(String, String)>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaSection,
    pub delivery: DeliveryMode,
    /// This instance's transactional.id: the producer of `exactly-once`, and the
    /// changelog producer of `at-least-once` with state hand-over (which fences a
    /// member the group has replaced).
    pub transactional_id: String,
    pub envelope: EnvelopeRules,
    pub state_dir: PathBuf,
    pub store: StoreOptions,
    pub dedupe: DedupeConfig,
    pub max_body_bytes: usize,
    pub batch_size: usize,
    pub batch_wait: Duration,
    pub batch_max_bytes: usize,
    pub shutdown_timeout: Duration,
    /// Liveness fails after this long with lag and no progress (zero: never).
    pub stall_timeout: Duration,
    /// Threads that prepare a batch's records (resolved: at least 1).
    pub normalize_threads: usize,
    pub http_listen: SocketAddr,
    /// `/explain` is served only with a token (`http.explain_token`).
    pub explain_token: Option<Secret>,
    pub tenant_label: bool,
    pub log_format: LogFormat,
    /// State hand-over through changelog topics (`None`: state stays local).
    pub changelog: Option<ChangelogSettings>,
    /// The bounded reorder window (`None`: off, each batch emits in arrival order).
    pub reorder: Option<ReorderWindow>,
    /// User-declared carriers, loaded and validated from `declared_carriers`.
    pub declared_carriers: Vec<std::sync::Arc<crate::carriers::declared::DeclaredCarrier>>,
    /// Where shipment state lives.
    pub placement: Placement,
    /// How the worker creates the repartition topic.
    pub repartition: RepartitionSettings,
    /// When an early scan after a terminal status is a reused tracking number
    /// (`order.generation_gap`), and per carrier (`[order.generation_gaps]`).
    pub default_generation_gap: Duration,
    pub generation_gaps: BTreeMap<String, Duration>,
    /// `waymark ingest`'s listener and sources, validated by the commands that
    /// use them (`ingest`, `check`): the worker needs none of the webhook secrets.
    pub ingest: crate::ingest::config::IngestConfig,
}

/// How the repartition topic is created when missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepartitionSettings {
    pub retention: Duration,
    pub replication: i32,
}

/// Limits of the bounded reorder window: a window closes when its first record
/// has been held `window` long, or `max_records` or `max_bytes` of bodies are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReorderWindow {
    pub window: Duration,
    pub max_records: usize,
    pub max_bytes: usize,
}

/// How changelog topics are created and read (see `changelog`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogSettings {
    pub replication: i32,
    /// `retention.ms` of the topics: the longest dedupe TTL plus a day.
    pub retention: Duration,
    pub restore_timeout: Duration,
}

/// The `[kafka]` settings (`WAYMARK_KAFKA__<name>` sets them; any other
/// `WAYMARK_KAFKA__` name is a librdkafka property).
const KAFKA_SETTINGS: [&str; 12] = [
    "brokers",
    "group_id",
    "input_topics",
    "output_topic",
    "dead_letter_topic",
    "decisions_topic",
    "control_topic",
    "delivery",
    "transactional_id",
    "properties",
    "consumer_properties",
    "producer_properties",
];

/// Short names of the settings an orchestrator most often sets, kept beside the
/// `WAYMARK_<SECTION>__<KEY>` rule as exact aliases: every command reads them
/// the same way, and setting both names of one setting to different values is
/// an error.
pub const ENV_ALIASES: [(&str, &str); 10] = [
    ("WAYMARK_BROKERS", "WAYMARK_KAFKA__BROKERS"),
    ("WAYMARK_GROUP_ID", "WAYMARK_KAFKA__GROUP_ID"),
    ("WAYMARK_INPUT_TOPICS", "WAYMARK_KAFKA__INPUT_TOPICS"),
    ("WAYMARK_OUTPUT_TOPIC", "WAYMARK_KAFKA__OUTPUT_TOPIC"),
    ("WAYMARK_DEAD_LETTER_TOPIC", "WAYMARK_KAFKA__DEAD_LETTER_TOPIC"),
    ("WAYMARK_DELIVERY", "WAYMARK_KAFKA__DELIVERY"),
    ("WAYMARK_TRANSACTIONAL_ID", "WAYMARK_KAFKA__TRANSACTIONAL_ID"),
    ("WAYMARK_STATE_DIR", "WAYMARK_STATE__DIR"),
    ("WAYMARK_HTTP_LISTEN", "WAYMARK_HTTP__LISTEN"),
    ("WAYMARK_LOG_FORMAT", "WAYMARK_LOG__FORMAT"),
];

/// `WAYMARK_` variables that are not settings: the configuration file's path,
/// the log filter, the test failpoint, and the variables of the repository's
/// scripts, tests and benchmarks (a developer's shell exports some of them, and
/// the tests' workers inherit them). Any other `WAYMARK_` name is refused, so a
/// misspelled setting (`WAYMARK_BROKER`, `WAYMARK_WORKER_BATCH_SIZE`) is an
/// error instead of a default silently kept.
pub const NON_SETTING_VARIABLES: [&str; 26] = [
    "WAYMARK_CONFIG",
    "WAYMARK_LOG",
    "WAYMARK_FAILPOINT",
    "WAYMARK_TEST_BROKERS",
    "WAYMARK_KAFKA_PORT",
    "WAYMARK_KAFKA_CONTROLLER_PORT",
    "WAYMARK_KAFKA_DATA",
    "WAYMARK_KAFKA_HOME",
    "WAYMARK_KAFKA_HEAP",
    "WAYMARK_KAFKA_JAVA_OPTS",
    "WAYMARK_KAFKA_START_TIMEOUT",
    "WAYMARK_KAFKA_STOP_TIMEOUT",
    "WAYMARK_MVN_ARGS",
    "WAYMARK_GIT_COMMIT",
    "WAYMARK_FUZZ_SECONDS",
    "WAYMARK_FUZZ_RUNS",
    "WAYMARK_FUZZ_SANITIZER",
    "WAYMARK_FUZZ_TARGET_DIR",
    "WAYMARK_BLESS",
    "WAYMARK_FIXTURES",
    "WAYMARK_SIM_SEED",
    "WAYMARK_SIM_SEEDS",
    "WAYMARK_FAULT_SCALE",
    "WAYMARK_GROUP_CONTROL",
    "WAYMARK_E2E_SMOKE",
    "WAYMARK_CHAOS_SMOKE",
];

/// The canonical `WAYMARK_<SECTION>__<KEY>` name of a `WAYMARK_` variable, or
/// `None` for a variable that is not a setting ([`NON_SETTING_VARIABLES`]).
/// An unknown name is an error that suggests the setting it probably meant.
fn canonical_env_name(name: &str, table: &toml::Table) -> Result<Option<String>, ConfigError> {
    if let Some((_, canonical)) = ENV_ALIASES.iter().find(|(alias, _)| *alias == name) {
        return Ok(Some((*canonical).to_string()));
    }
    if name.contains("__") {
        return Ok(Some(name.to_string()));
    }
    if NON_SETTING_VARIABLES.contains(&name) {
        return Ok(None);
    }
    // `WAYMARK_WORKER_BATCH_SIZE` for `WAYMARK_WORKER__BATCH_SIZE`.
    let wanted = name.trim_start_matches("WAYMARK_").to_ascii_lowercase();
    let suggestion = table
        .iter()
        .filter_map(|(section, value)| value.as_table().map(|keys| (section, keys)))
        .flat_map(|(section, keys)| keys.keys().map(move |key| (section, key)))
        .find(|(section, key)| wanted == format!("{section}_{key}"))
        .map(|(section, key)| format!("; did you mean WAYMARK_{}__{}?", section.to_ascii_uppercase(), key.to_ascii_uppercase()))
        .unwrap_or_default();
    let aliases: Vec<&str> = ENV_ALIASES.iter().map(|(alias, _)| *alias).collect();
    Err(ConfigError::Env {
        name: name.to_string(),
        message: format!(
            "not a Waymark setting{suggestion} (settings are WAYMARK_<SECTION>__<KEY>, e.g. WAYMARK_WORKER__BATCH_SIZE, or one of {}); unset it",
            aliases.join(", ")
        ),
    })
}

impl RawConfig {
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.into(), error })?;
        let mut raw = RawConfig::from_toml(&text).map_err(|message| ConfigError::Parse { path: path.into(), message })?;
        raw.base_dir = path.parent().map(Path::to_path_buf);
        Ok(raw)
    }

    pub fn from_toml(text: &str) -> Result<RawConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Apply environment overrides, one rule for every setting:
    /// `WAYMARK_<SECTION>__<KEY>=value` sets `key` of `[section]`
    /// (`WAYMARK_WORKER__BATCH_SIZE=1000`, `WAYMARK_ROUTING__PARTITIONS=32`,
    /// lists comma-separated). Under `KAFKA`, a name that is not a `[kafka]`
    /// setting is a librdkafka property, dots written as `_`
    /// (`WAYMARK_KAFKA__SECURITY_PROTOCOL=SASL_SSL`). The short names of
    /// [`ENV_ALIASES`] are the same settings; any other `WAYMARK_` variable that
    /// is not in [`NON_SETTING_VARIABLES`] is refused, naming it.
    pub fn apply_env(&mut self, vars: impl Iterator<Item = (String, String)>) -> Result<(), ConfigError> {
        let base_dir = self.base_dir.take();
        let mut table = toml::Table::try_from(&*self).map_err(|e| ConfigError::Invalid(format!("configuration cannot be re-read: {e}")))?;
        let mut touched = Vec::new();
        // Each setting once, by its canonical name; a short alias and the
        // canonical name may both be set only to the same value.
        let mut settings: std::collections::BTreeMap<String, (String, String)> = std::collections::BTreeMap::new();
        for (name, value) in vars {
            if !name.starts_with("WAYMARK_") {
                continue;
            }
            let Some(canonical) = canonical_env_name(&name, &table)? else { continue };
            match settings.get(&canonical) {
                Some((other, earlier)) if *earlier != value => {
                    return Err(ConfigError::Env {
                        name: format!("{other} and {name}"),
                        message: "both set the same setting, to different values: keep one".into(),
                    })
                }
                _ => {
                    settings.insert(canonical, (name, value));
                }
            }
        }
        for (canonical, (name, value)) in settings {
            let Some((section, key)) = canonical.strip_prefix("WAYMARK_").and_then(|rest| rest.split_once("__")) else {
                continue;
            };
            let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
            if section == "kafka" && !KAFKA_SETTINGS.contains(&key.as_str()) {
                let property = key.replace('_', ".");
                let properties = table
                    .entry("kafka")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .and_then(|kafka| kafka.entry("properties").or_insert_with(|| toml::Value::Table(toml::Table::new())).as_table_mut());
                if let Some(properties) = properties {
                    properties.insert(property, toml::Value::String(value));
                }
                continue;
            }
            let Some(section_table) = table.get_mut(&section).and_then(toml::Value::as_table_mut) else {
                return Err(ConfigError::Env { name, message: format!("there is no [{section}] section") });
            };
            let typed = match section_table.get(&key) {
                Some(toml::Value::Integer(_)) => value
                    .trim()
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|e| ConfigError::Env { name: name.clone(), message: format!("expected a whole number: {e}") })?,
                Some(toml::Value::Boolean(_)) => value
                    .trim()
                    .parse::<bool>()
                    .map(toml::Value::Boolean)
                    .map_err(|_| ConfigError::Env { name: name.clone(), message: "expected true or false".into() })?,
                Some(toml::Value::Array(_)) => toml::Value::Array(
                    value.split(',').map(str::trim).filter(|v| !v.is_empty()).map(|v| toml::Value::String(v.into())).collect(),
                ),
                Some(toml::Value::Table(_)) => {
                    return Err(ConfigError::Env { name, message: format!("[{section}.{key}] is a table: set its entries in the config file") })
                }
                _ => toml::Value::String(value),
            };
            section_table.insert(key, typed);
            touched.push(name);
        }
        let mut raw: RawConfig = table.try_into().map_err(|e: toml::de::Error| ConfigError::Env {
            name: touched.join(", "),
            message: e.message().to_string(),
        })?;
        raw.base_dir = base_dir;
        *self = raw;
        Ok(())
    }

    pub fn apply(&mut self, o: Overrides) {
        if let Some(v) = o.brokers {
            self.kafka.brokers = v;
        }
        if let Some(v) = o.group_id {
            self.kafka.group_id = v;
        }
        if !o.input_topics.is_empty() {
            self.kafka.input_topics = o.input_topics;
        }
        if let Some(v) = o.output_topic {
            self.kafka.output_topic = v;
        }
        if let Some(v) = o.dead_letter_topic {
            self.kafka.dead_letter_topic = v;
        }
        if let Some(v) = o.state_dir {
            self.state.dir = v;
        }
        if let Some(v) = o.http_listen {
            self.http.listen = v;
        }
        if let Some(v) = o.ingest_listen {
            self.ingest.listen = v;
        }
        if let Some(v) = o.delivery {
            self.kafka.delivery = v;
        }
        if let Some(v) = o.transactional_id {
            self.kafka.transactional_id = Some(v);
        }
        for (k, v) in o.kafka_properties {
            self.kafka.properties.insert(k, v);
        }
    }

    /// Validate into the trusted [`Config`]: each section checks its own
    /// settings; what spans sections (topic clashes) is checked here.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let dedupe = self.dedupe.validate()?;
        self.kafka.validate()?;
        let placement = self.routing.placement(&self.kafka)?;
        let order = self.order.validate()?;
        let (http_listen, explain_token) = self.http.validate()?;
        let worker = self.worker.validate()?;
        if self.limits.max_body_bytes == 0 {
            return Err(ConfigError::Invalid("limits.max_body_bytes must be at least 1".into()));
        }
        let kafka = self.kafka;
        let transactional_id = kafka.transactional_id.clone().unwrap_or_else(|| default_transactional_id(&kafka.group_id, &self.state.dir));
        let declared_carriers = load_declared_carriers(&self.declared_carriers, self.base_dir.as_deref())?;
        let mut carrier_names: Vec<String> = crate::carriers::CarrierRegistry::builtin().names().into_iter().map(String::from).collect();
        carrier_names.extend(declared_carriers.iter().map(|c| crate::carriers::Carrier::name(&**c).to_ascii_lowercase()));
        let ingest = crate::ingest::config::IngestConfig { section: self.ingest, carriers: carrier_names, base_dir: self.base_dir.clone() };
        let changelog = self.state.changelog.then(|| ChangelogSettings {
            replication: self.state.changelog_replication,
            retention: dedupe.longest_ttl().saturating_add(Duration::from_secs(24 * 3600)),
            restore_timeout: worker.restore_timeout,
        });
        let repartition = RepartitionSettings { retention: duration("routing.retention", &self.routing.retention)?, replication: self.routing.replication };
        Ok(Config {
            placement,
            repartition,
            default_generation_gap: order.generation_gap,
            generation_gaps: order.generation_gaps,
            delivery: kafka.delivery,
            transactional_id,
            envelope: EnvelopeRules {
                topic_carriers: self.topics,
                require_tenant: self.tenancy.require_tenant,
                default_tenant: self.tenancy.default_tenant,
            },
            kafka,
            state_dir: self.state.dir,
            store: StoreOptions {
                block_cache_bytes: self.state.block_cache_mb << 20,
                memtable_bytes: self.state.memtable_mb << 20,
                sync_writes: self.state.sync_writes,
            },
            dedupe,
            max_body_bytes: self.limits.max_body_bytes,
            batch_size: self.worker.batch_size,
            batch_max_bytes: self.worker.batch_max_bytes.max(1),
            batch_wait: worker.batch_wait,
            shutdown_timeout: worker.shutdown_timeout,
            stall_timeout: worker.stall_timeout,
            normalize_threads: match self.worker.normalize_threads {
                0 => crate::parallel::default_threads(),
                n => n,
            },
            http_listen,
            explain_token,
            tenant_label: self.telemetry.tenant_label,
            log_format: self.log.format,
            changelog,
            reorder: order.reorder,
            declared_carriers,
            ingest,
        })
    }
}

/// A duration setting, or an error naming it with an example.
pub(crate) fn duration(field: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|e| ConfigError::Invalid(format!("{field} = \"{text}\": {e} (write e.g. \"2s\", \"500ms\", \"30d\")")))
}

/// `waymark-<group>-<host>-<8 hex digits of the state directory>`. The host
/// alone can collide (host networking, two processes on one machine: they
/// would fence each other forever); the state directory tells instances on one
/// host apart and is stable across restarts of each.
fn default_transactional_id(group_id: &str, state_dir: &Path) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let dir = blake3::hash(state_dir.to_string_lossy().as_bytes()).to_hex();
    format!("waymark-{group_id}-{host}-{}", &dir[..8])
}

impl DedupeSection {
    fn validate(&self) -> Result<DedupeConfig, ConfigError> {
        let base = DedupePolicy::default();
        let policy = |name: &str, ttl: &Option<String>, skew: &Option<String>, fallback: DedupePolicy| -> Result<DedupePolicy, ConfigError> {
            let policy = DedupePolicy {
                ttl: match ttl {
                    Some(t) => duration(&format!("{name}.ttl"), t)?,
                    None => fallback.ttl,
                },
                skew: match skew {
                    Some(s) => duration(&format!("{name}.skew"), s)?,
                    None => fallback.skew,
                },
            };
            if policy.ttl.is_zero() || policy.skew >= policy.ttl {
                return Err(ConfigError::Invalid(format!("{name}: ttl must be positive and larger than skew")));
            }
            Ok(policy)
        };
        let default = policy("dedupe", &self.ttl, &self.skew, base)?;
        let mut per_carrier = BTreeMap::new();
        for (carrier, section) in &self.carriers {
            let name = format!("dedupe.carriers.{carrier}");
            per_carrier.insert(carrier.to_ascii_lowercase(), policy(&name, &section.ttl, &section.skew, default)?);
        }
        Ok(DedupeConfig { default, per_carrier })
    }
}

impl KafkaSection {
    /// Topics and reserved properties.
    fn validate(&self) -> Result<(), ConfigError> {
        check_reserved_properties(self)?;
        for (field, topics) in [
            ("kafka.input_topics", self.input_topics.clone()),
            ("kafka.output_topic", vec![self.output_topic.clone()]),
            ("kafka.dead_letter_topic", vec![self.dead_letter_topic.clone()]),
            ("kafka.decisions_topic", self.decisions_topic.iter().cloned().collect()),
            ("kafka.control_topic", self.control_topic.iter().cloned().collect()),
        ] {
            for topic in topics {
                check_topic_name(field, &topic)?;
            }
        }
        if self.input_topics.is_empty() {
            return Err(ConfigError::Invalid("kafka.input_topics is empty: name at least one raw carrier topic".into()));
        }
        for topic in self.output_topics() {
            if self.input_topics.contains(topic) {
                return Err(ConfigError::Invalid(format!("`{topic}` is both an input and an output topic")));
            }
        }
        if let Some(control) = &self.control_topic {
            if self.input_topics.contains(control) || self.output_topics().any(|t| t == control) {
                return Err(ConfigError::Invalid(format!(
                    "kafka.control_topic = \"{control}\" is also an input or output topic: corrections need a topic of their own"
                )));
            }
        }
        if let Some(decisions) = &self.decisions_topic {
            if [&self.output_topic, &self.dead_letter_topic].contains(&decisions) {
                return Err(ConfigError::Invalid(format!(
                    "kafka.decisions_topic = \"{decisions}\" is also the output or dead-letter topic: give decisions a topic of their own"
                )));
            }
        }
        Ok(())
    }

    /// The topics Waymark writes (besides its internal ones).
    fn output_topics(&self) -> impl Iterator<Item = &String> {
        [&self.output_topic, &self.dead_letter_topic].into_iter().chain(self.decisions_topic.as_ref())
    }
}

impl RoutingSection {
    /// Where shipment state lives; the repartition topic must be nobody else's.
    fn placement(&self, kafka: &KafkaSection) -> Result<Placement, ConfigError> {
        let placement = match self.mode {
            RoutingMode::Home => {
                if self.partitions == 0 || self.partitions > 100_000 {
                    return Err(ConfigError::Invalid(format!(
                        "routing.partitions = {}: write a partition count from 1 to 100000 (fixed for the life of a group)",
                        self.partitions
                    )));
                }
                Placement::Home { topic: repartition_topic(&kafka.group_id), partitions: self.partitions }
            }
            RoutingMode::Input => Placement::Input,
        };
        if placement == Placement::Input && kafka.control_topic.is_some() {
            return Err(ConfigError::Invalid(
                "kafka.control_topic needs routing.mode = \"home\": with \"input\" a shipment's state lives where its records arrive, which a correction cannot know".into(),
            ));
        }
        if let Placement::Home { topic, .. } = &placement {
            if kafka.input_topics.contains(topic) || kafka.output_topics().any(|t| t == topic) || kafka.control_topic.as_ref() == Some(topic) {
                return Err(ConfigError::Invalid(format!("`{topic}` is the group's internal repartition topic: use it for nothing else")));
            }
        }
        Ok(placement)
    }
}

/// `[order]`, validated.
struct OrderSettings {
    reorder: Option<ReorderWindow>,
    generation_gap: Duration,
    generation_gaps: BTreeMap<String, Duration>,
}

impl OrderSection {
    fn validate(&self) -> Result<OrderSettings, ConfigError> {
        let window = duration("order.reorder_window", &self.reorder_window)?;
        if !window.is_zero() && self.reorder_max_records == 0 {
            return Err(ConfigError::Invalid("order.reorder_max_records must be at least 1 when the reorder window is on".into()));
        }
        let reorder = (!window.is_zero()).then_some(ReorderWindow { window, max_records: self.reorder_max_records, max_bytes: self.reorder_max_bytes.max(1) });
        let gap = |field: &str, text: &str| {
            let gap = duration(field, text)?;
            if gap.is_zero() {
                return Err(ConfigError::Invalid(format!("{field} = \"{text}\": the gap must be positive (every early scan after a delivery would begin a new parcel)")));
            }
            Ok(gap)
        };
        let mut generation_gaps = BTreeMap::new();
        for (carrier, text) in &self.generation_gaps {
            generation_gaps.insert(carrier.to_ascii_lowercase(), gap(&format!("order.generation_gaps.{carrier}"), text)?);
        }
        Ok(OrderSettings { reorder, generation_gap: gap("order.generation_gap", &self.generation_gap)?, generation_gaps })
    }
}

impl HttpSection {
    /// The listen address and the `/explain` token.
    fn validate(&self) -> Result<(SocketAddr, Option<Secret>), ConfigError> {
        let listen = self.listen.parse().map_err(|e| {
            ConfigError::Invalid(format!("http.listen = \"{}\": {e} (write host:port, e.g. 0.0.0.0:9464)", self.listen))
        })?;
        let token = match self.explain_token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(token) if token.len() < 16 => {
                return Err(ConfigError::Invalid("http.explain_token is shorter than 16 characters: use a long random token (e.g. `openssl rand -hex 24`)".into()))
            }
            Some(token) => Some(Secret(token.to_string())),
        };
        Ok((listen, token))
    }
}

/// `[worker]`'s durations, validated.
struct WorkerTimes {
    batch_wait: Duration,
    shutdown_timeout: Duration,
    stall_timeout: Duration,
    restore_timeout: Duration,
}

impl WorkerSection {
    fn validate(&self) -> Result<WorkerTimes, ConfigError> {
        if self.batch_size == 0 {
            return Err(ConfigError::Invalid("worker.batch_size must be at least 1".into()));
        }
        Ok(WorkerTimes {
            batch_wait: duration("worker.batch_wait", &self.batch_wait)?,
            shutdown_timeout: duration("worker.shutdown_timeout", &self.shutdown_timeout)?,
            stall_timeout: duration("worker.stall_timeout", &self.stall_timeout)?,
            restore_timeout: duration("worker.restore_timeout", &self.restore_timeout)?,
        })
    }
}

/// librdkafka properties that carry Waymark's guarantees: a user value would
/// silently break them (auto-commit loses records, read_uncommitted restores
/// aborted state, a non-idempotent producer duplicates), so they are refused.
const RESERVED_PROPERTIES: [(&str, &str); 9] = [
    ("enable.auto.commit", "offsets are committed only after a batch's outputs are acknowledged"),
    ("enable.auto.offset.store", "offsets are committed only after a batch's outputs are acknowledged"),
    ("isolation.level", "the worker and the changelog restore read committed data only"),
    ("group.id", "set kafka.group_id instead"),
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("enable.idempotence", "the producer must be idempotent for repeats to stay identical"),
    ("acks", "every output is acknowledged by all in-sync replicas (acks=all)"),
    ("request.required.acks", "every output is acknowledged by all in-sync replicas (acks=all)"),
    ("transactional.id", "set kafka.transactional_id instead"),
];

fn check_reserved_properties(kafka: &KafkaSection) -> Result<(), ConfigError> {
    for (section, properties) in [
        ("kafka.properties", &kafka.properties),
        ("kafka.consumer_properties", &kafka.consumer_properties),
        ("kafka.producer_properties", &kafka.producer_properties),
    ] {
        for name in properties.keys() {
            if let Some((_, why)) = RESERVED_PROPERTIES.iter().find(|(reserved, _)| reserved.eq_ignore_ascii_case(name)) {
                return Err(ConfigError::Invalid(format!("{section}: `{name}` is set by Waymark ({why}); remove it")));
            }
        }
    }
    Ok(())
}

/// Kafka's rule for topic names: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
fn check_topic_name(field: &str, topic: &str) -> Result<(), ConfigError> {
    let legal = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if legal {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!(
        "{field}: `{topic}` is not a valid Kafka topic name (1 to 249 of letters, digits, `.`, `_`, `-`)"
    )))
}

/// Load every mapping file; two files declaring one name is an error (the later one
/// would silently replace the earlier one's normalizer).
fn load_declared_carriers(
    paths: &[PathBuf],
    base_dir: Option<&Path>,
) -> Result<Vec<std::sync::Arc<crate::carriers::declared::DeclaredCarrier>>, ConfigError> {
    use crate::carriers::Carrier as _;
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut carriers = Vec::with_capacity(paths.len());
    for path in paths {
        let path = match base_dir {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.clone(),
        };
        let carrier = crate::carriers::declared::DeclaredCarrier::from_file(&path).map_err(ConfigError::DeclaredCarrier)?;
        if let Some(first) = seen.insert(carrier.name().to_string(), path.clone()) {
            return Err(ConfigError::Invalid(format!(
                "declared_carriers: carrier `{}` is declared by both {} and {}",
                carrier.name(),
                first.display(),
                path.display()
            )));
        }
        carriers.push(std::sync::Arc::new(carrier));
    }
    Ok(carriers)
}

impl Config {
    /// The pipeline this configuration describes.
    pub fn pipeline(&self) -> crate::pipeline::Pipeline {
        let mut carriers = crate::carriers::CarrierRegistry::builtin();
        carriers.max_body_bytes = self.max_body_bytes;
        for declared in &self.declared_carriers {
            // Names were checked against the built-ins on load: this only adds.
            carriers.register(declared.clone());
        }
        crate::pipeline::Pipeline {
            rules: self.envelope.clone(),
            carriers,
            dedupe: self.dedupe.clone(),
            placement: self.placement.clone(),
            // Replay and `normalize` apply events in their home's scope directly;
            // the worker turns the hop on (see `worker`).
            hop: false,
            keying_check: None,
            threads: self.normalize_threads,
            generation_gaps: self.generation_gaps.clone(),
            default_generation_gap: Some(self.default_generation_gap),
            record_decisions: self.kafka.decisions_topic.is_some(),
            control_topic: self.kafka.control_topic.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_out_of_the_box() {
        let config = RawConfig::default().validate().unwrap();
        assert_eq!(config.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(config.dedupe.default.skew, Duration::from_secs(2));
        assert_eq!(config.dedupe.default.ttl, Duration::from_secs(30 * 86400));
        assert_eq!(config.max_body_bytes, 1 << 20);
    }

    #[test]
    fn file_then_env_then_flags() {
        let mut raw = RawConfig::from_toml(
            r#"
            [kafka]
            brokers = "file:9092"
            [kafka.properties]
            "security.protocol" = "SSL"
            [dedupe]
            skew = "3s"
            [dedupe.carriers.UPS]
            ttl = "14d"
            [topics]
            "in.ups" = "ups"
            "#,
        )
        .unwrap();
        raw.apply_env(vec![("WAYMARK_KAFKA__SASL_MECHANISMS".to_string(), "SCRAM-SHA-512".to_string())].into_iter()).unwrap();
        raw.apply(Overrides { brokers: Some("flag:9092".into()), ..Overrides::default() });
        let config = raw.validate().unwrap();
        assert_eq!(config.kafka.brokers, "flag:9092");
        assert_eq!(config.kafka.properties["security.protocol"], "SSL");
        assert_eq!(config.kafka.properties["sasl.mechanisms"], "SCRAM-SHA-512");
        let ups = config.dedupe.policy("ups");
        assert_eq!((ups.ttl, ups.skew), (Duration::from_secs(14 * 86400), Duration::from_secs(3)));
        assert_eq!(config.envelope.topic_carriers["in.ups"], "ups");
    }

    #[test]
    fn every_setting_follows_one_environment_rule() {
        let mut raw = RawConfig::from_toml("[worker]\nbatch_size = 10\n[kafka.properties]\n\"client.id\" = \"x\"\n").unwrap();
        let vars = [
            ("WAYMARK_WORKER__BATCH_SIZE", "1000"),
            ("WAYMARK_ROUTING__PARTITIONS", "32"),
            ("WAYMARK_STATE__CHANGELOG", "false"),
            ("WAYMARK_KAFKA__INPUT_TOPICS", "tracking.raw.ups, tracking.raw.dhl"),
            ("WAYMARK_KAFKA__TRANSACTIONAL_ID", "w-7"),
            ("WAYMARK_KAFKA__SECURITY_PROTOCOL", "SASL_SSL"),
            ("WAYMARK_DEDUPE__SKEW", "5s"),
            ("WAYMARK_LOG_FORMAT", "json"),
            ("UNRELATED", "x"),
        ];
        raw.apply_env(vars.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap();
        let config = raw.validate().unwrap();
        assert_eq!(config.batch_size, 1000);
        assert_eq!(config.placement, Placement::Home { topic: "waymark-repartition".into(), partitions: 32 });
        assert!(config.changelog.is_none());
        assert_eq!(config.kafka.input_topics, vec!["tracking.raw.ups", "tracking.raw.dhl"]);
        assert_eq!(config.kafka.transactional_id.as_deref(), Some("w-7"));
        assert_eq!(config.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(config.kafka.properties["client.id"], "x", "the file's properties stay");
        assert_eq!(config.dedupe.default.skew, Duration::from_secs(5));
        assert_eq!(config.log_format, LogFormat::Json);

        let err = RawConfig::default().apply_env([("WAYMARK_WORKER__BATCH_SIZE".to_string(), "many".to_string())].into_iter()).unwrap_err();
        assert!(err.to_string().contains("WAYMARK_WORKER__BATCH_SIZE") && err.to_string().contains("whole number"), "{err}");
        let err = RawConfig::default().apply_env([("WAYMARK_WORKER__BATCH_SIZ".to_string(), "1".to_string())].into_iter()).unwrap_err();
        assert!(err.to_string().contains("WAYMARK_WORKER__BATCH_SIZ") && err.to_string().contains("batch_siz"), "{err}");
        let err = RawConfig::default().apply_env([("WAYMARK_NOPE__X".to_string(), "1".to_string())].into_iter()).unwrap_err();
        assert!(err.to_string().contains("no [nope] section"), "{err}");
    }

    #[test]
    fn delivery_mode_is_a_type() {
        assert_eq!(RawConfig::default().validate().unwrap().delivery, DeliveryMode::AtLeastOnce);
        let raw = RawConfig::from_toml("[kafka]\ndelivery = \"exactly-once\"\ntransactional_id = \"w-1\"").unwrap();
        let config = raw.clone().validate().unwrap();
        assert_eq!((config.delivery, config.transactional_id.as_str()), (DeliveryMode::ExactlyOnce, "w-1"));
        // The default id (both modes have one): stable for one instance,
        // distinct for two on one host.
        let id = |dir: &str| {
            let mut raw = RawConfig::default();
            raw.state.dir = dir.into();
            raw.validate().unwrap().transactional_id
        };
        assert_eq!(id("/var/lib/waymark/a"), id("/var/lib/waymark/a"));
        assert_ne!(id("/var/lib/waymark/a"), id("/var/lib/waymark/b"));
        let err = RawConfig::from_toml("[kafka]\ndelivery = \"maybe-once\"").unwrap_err();
        assert!(err.contains("maybe-once") && err.contains("exactly-once"), "{err}");
        assert_eq!("exactly-once".parse::<DeliveryMode>(), Ok(DeliveryMode::ExactlyOnce));
        assert!("maybe".parse::<DeliveryMode>().unwrap_err().contains("exactly-once"));
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected_with_hints() {
        assert!(RawConfig::from_toml("[kafka]\nbrokerz = \"x\"").unwrap_err().contains("brokerz"));
        let mut raw = RawConfig::default();
        raw.dedupe.skew = Some("soon".into());
        assert!(raw.validate().unwrap_err().to_string().contains("dedupe.skew"));
        let mut raw = RawConfig::default();
        raw.kafka.output_topic = raw.kafka.input_topics[0].clone();
        assert!(raw.validate().is_err());
    }

    #[test]
    fn properties_that_carry_guarantees_and_bad_topic_names_are_refused() {
        for (section, name) in [("kafka.properties", "isolation.level"), ("kafka.consumer_properties", "enable.auto.commit"), ("kafka.producer_properties", "acks")] {
            let (table, key) = section.split_once('.').unwrap();
            let text = format!("[{table}.{key}]\n\"{name}\" = \"x\"\n");
            let err = RawConfig::from_toml(&text).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(section) && err.contains(name) && err.contains("remove it"), "{err}");
        }
        for bad in ["", "has space", "tracking.raw.ups!", ".."] {
            let mut raw = RawConfig::default();
            raw.kafka.output_topic = bad.into();
            let err = raw.validate().unwrap_err().to_string();
            assert!(err.contains("kafka.output_topic") && err.contains("not a valid Kafka topic name"), "{err}");
        }
        let mut raw = RawConfig::default();
        raw.kafka.input_topics = vec![String::new()];
        assert!(raw.validate().unwrap_err().to_string().contains("kafka.input_topics"));
    }

    #[test]
    fn the_decisions_topic_is_off_by_default_and_a_topic_of_its_own() {
        let config = RawConfig::default().validate().unwrap();
        assert!(config.kafka.decisions_topic.is_none() && !config.pipeline().record_decisions);
        let config = RawConfig::from_toml("[kafka]\ndecisions_topic = \"tracking.decisions\"").unwrap().validate().unwrap();
        assert!(config.pipeline().record_decisions);
        for clash in ["tracking.milestones", "tracking.dead-letter", "tracking.raw.easypost", "waymark-repartition", "bad name"] {
            let text = format!("[kafka]\ndecisions_topic = \"{clash}\"");
            let err = RawConfig::from_toml(&text).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(clash), "{clash}: {err}");
        }
    }

    #[test]
    fn generation_gaps_default_to_30_days_and_are_set_per_carrier() {
        let pipeline = RawConfig::default().validate().unwrap().pipeline();
        assert_eq!(pipeline.generation_gap("ups"), crate::order::DEFAULT_GENERATION_GAP);
        let text = "[order]\ngeneration_gap = \"45d\"\n[order.generation_gaps]\nUSPS = \"90d\"\n";
        let pipeline = RawConfig::from_toml(text).unwrap().validate().unwrap().pipeline();
        assert_eq!(pipeline.generation_gap("usps"), Duration::from_secs(90 * 86_400));
        assert_eq!(pipeline.generation_gap("ups"), Duration::from_secs(45 * 86_400));
        for bad in ["[order]\ngeneration_gap = \"0s\"", "[order.generation_gaps]\nusps = \"soon\""] {
            let err = RawConfig::from_toml(bad).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains("generation_gap"), "{err}");
        }
    }

    #[test]
    fn declared_carriers_load_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let mapping = |name: &str| {
            format!(
                "name = \"{name}\"\ntracking_number = \"/n\"\nevents = \"/e\"\n[event]\ncode = \"/c\"\ntime = \"/t\"\n[codes]\nD = \"delivered\"\n"
            )
        };
        std::fs::create_dir(dir.path().join("carriers")).unwrap();
        std::fs::write(dir.path().join("carriers/acme.toml"), mapping("acme")).unwrap();
        std::fs::write(dir.path().join("carriers/acme-again.toml"), mapping("acme")).unwrap();
        std::fs::write(dir.path().join("carriers/bad.toml"), mapping("acme").replace("delivered", "arrived")).unwrap();
        let config_at = |keys: &str| {
            let path = dir.path().join("waymark.toml");
            std::fs::write(&path, format!("declared_carriers = [{keys}]\n")).unwrap();
            RawConfig::from_file(&path).unwrap().validate()
        };

        let config = config_at(r#""carriers/acme.toml""#).unwrap();
        assert_eq!(config.declared_carriers.len(), 1);
        assert!(config.pipeline().carriers.get("acme").is_some());
        assert!(config.pipeline().carriers.get("easypost").is_some());

        let err = config_at(r#""carriers/acme.toml", "carriers/acme-again.toml""#).unwrap_err().to_string();
        assert!(err.contains("`acme` is declared by both"), "{err}");
        let err = config_at(r#""carriers/missing.toml""#).unwrap_err().to_string();
        assert!(err.contains("cannot read carrier mapping") && err.contains("missing.toml"), "{err}");
        let err = config_at(r#""carriers/bad.toml""#).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("`codes.\"D\" = \"arrived\"`"), "{err}");
    }
}
