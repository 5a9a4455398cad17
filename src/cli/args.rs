//! Argument groups shared by the commands, so one setting is given the same
//! way everywhere. Flags beat the `WAYMARK_*` variables, which beat the file;
//! the variables (short aliases included) are read by the configuration loader,
//! not here, so a command without a flag for a setting still honours its
//! variable.

use std::path::PathBuf;

use waymark::config::Overrides;

/// The configuration file.
#[derive(clap::Args, Default)]
pub struct ConfigArgs {
    /// TOML configuration file (every setting has a default; see the README's
    /// Configuration section and deploy/waymark.toml).
    #[arg(long, short = 'c', env = "WAYMARK_CONFIG")]
    pub config: Option<PathBuf>,
}

/// How a command reaches Kafka: every command that talks to it takes these.
#[derive(clap::Args, Default)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (kafka.brokers; variable WAYMARK_BROKERS).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Any librdkafka property, as name=value (repeatable), e.g.
    /// -X security.protocol=SASL_SSL (kafka.properties; variables
    /// WAYMARK_KAFKA__<NAME> with dots written as _).
    #[arg(short = 'X', value_name = "NAME=VALUE", value_parser = parse_property)]
    pub kafka_property: Vec<(String, String)>,
}

impl KafkaArgs {
    /// These flags as configuration overrides.
    pub fn overrides(self) -> Overrides {
        Overrides { brokers: self.brokers, kafka_properties: self.kafka_property, ..Overrides::default() }
    }
}

/// The worker's own settings, for `run` and for `check` (which validates what
/// `run` with the same flags would use).
#[derive(clap::Args, Default)]
pub struct WorkerArgs {
    /// Consumer group id (kafka.group_id; WAYMARK_GROUP_ID).
    #[arg(long)]
    pub group_id: Option<String>,
    /// Input topic, repeatable (kafka.input_topics; WAYMARK_INPUT_TOPICS, comma-separated).
    #[arg(long = "input-topic")]
    pub input_topics: Vec<String>,
    /// Output topic for ensure-milestone upserts (kafka.output_topic; WAYMARK_OUTPUT_TOPIC).
    #[arg(long)]
    pub output_topic: Option<String>,
    /// Dead-letter topic (kafka.dead_letter_topic; WAYMARK_DEAD_LETTER_TOPIC).
    #[arg(long)]
    pub dead_letter_topic: Option<String>,
    /// State directory, RocksDB (state.dir; WAYMARK_STATE_DIR).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz (http.listen; WAYMARK_HTTP_LISTEN).
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Delivery mode: at-least-once (default) or exactly-once, with Kafka
    /// transactions (kafka.delivery; WAYMARK_DELIVERY).
    #[arg(long)]
    pub delivery: Option<waymark::config::DeliveryMode>,
    /// transactional.id: stable per instance, distinct between instances
    /// (kafka.transactional_id; WAYMARK_TRANSACTIONAL_ID).
    #[arg(long)]
    pub transactional_id: Option<String>,
}

impl WorkerArgs {
    /// These flags and the connection flags as configuration overrides.
    pub fn overrides(self, kafka: KafkaArgs) -> Overrides {
        Overrides {
            group_id: self.group_id,
            input_topics: self.input_topics,
            output_topic: self.output_topic,
            dead_letter_topic: self.dead_letter_topic,
            state_dir: self.state_dir,
            http_listen: self.http_listen,
            delivery: self.delivery,
            transactional_id: self.transactional_id,
            ..kafka.overrides()
        }
    }
}

/// `-X name=value`.
fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(name, value)| (name.trim().to_string(), value.to_string()))
        .filter(|(name, _)| !name.is_empty())
        .ok_or_else(|| "write librdkafka properties as name=value".to_string())
}

/// An RFC 3339 instant on the command line.
pub fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{e}: write an RFC 3339 time such as 2026-11-02T00:00:00Z"))
}

/// A shipment as the commands name it: `TENANT:CARRIER:TRACKING_NUMBER`.
#[derive(Debug, Clone)]
pub struct Shipment {
    pub tenant: String,
    pub carrier: String,
    /// May contain `:` (everything after the second one).
    pub tracking_number: String,
}

/// `--shipment`'s parser.
pub fn parse_shipment(text: &str) -> Result<Shipment, String> {
    let mut parts = text.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(tenant), Some(carrier), Some(tracking)) if !tenant.is_empty() && !carrier.is_empty() && !tracking.is_empty() => {
            Ok(Shipment { tenant: tenant.into(), carrier: carrier.into(), tracking_number: tracking.into() })
        }
        _ => Err(format!("`{text}`: write TENANT:CARRIER:TRACKING_NUMBER")),
    }
}
