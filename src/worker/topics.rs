//! The worker's internal topics, created when missing:
//!
//! | topic | partitions | cleanup.policy | retention.ms |
//! |---|---|---|---|
//! | `<group_id>-repartition` | `routing.partitions` (fixed) | `delete` | `routing.retention` (7 days) |
//! | `<topic>-changelog` per stateful topic | as its topic | `compact,delete` | longest dedupe TTL + 1 day |
//!
//! The worker needs rights to describe and create them (or an operator creates
//! them beforehand with these settings), to read and write both, and to commit
//! transactions with its transactional id in `exactly-once` mode.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use thiserror::Error;

/// An admin request that failed (the caller names the topic and the fix).
#[derive(Debug, Error)]
#[error("{0}")]
pub struct TopicError(String);

/// A blocking admin client: one per start-up, never on the hot path.
pub struct Admin {
    admin: AdminClient<DefaultClientContext>,
    runtime: tokio::runtime::Runtime,
    options: AdminOptions,
    timeout: Duration,
}

impl Admin {
    pub fn new(client: &ClientConfig, timeout: Duration) -> Result<Admin, TopicError> {
        // An admin client is a producer to librdkafka, which may ask brokers with
        // auto.create.topics.enable to create a missing topic when it fetches its
        // metadata: that topic would have broker defaults (not compacted).
        let mut client = client.clone();
        client.set("allow.auto.create.topics", "false");
        let admin = client.create().map_err(|e| TopicError(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| TopicError(e.to_string()))?;
        let options = AdminOptions::new().operation_timeout(Some(timeout));
        Ok(Admin { admin, runtime, options, timeout })
    }

    /// Partition count of a topic; 0 when it does not exist.
    pub fn partitions_of(&self, topic: &str) -> Result<usize, TopicError> {
        let metadata = self.admin.inner().fetch_metadata(Some(topic), self.timeout).map_err(|e| TopicError(e.to_string()))?;
        Ok(metadata.topics().first().filter(|t| t.error().is_none()).map_or(0, |t| t.partitions().len()))
    }

    /// Create a topic (one that appeared meanwhile is fine).
    pub fn create(&self, topic: &str, partitions: usize, replication: i32, configs: &[(&str, &str)]) -> Result<(), TopicError> {
        let mut new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(replication));
        for (name, value) in configs {
            new = new.set(name, value);
        }
        let results = self.runtime.block_on(self.admin.create_topics([&new], &self.options)).map_err(|e| TopicError(e.to_string()))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(TopicError(code.to_string())),
            }
        }
        Ok(())
    }

    /// Grow a topic to `partitions`.
    pub fn grow(&self, topic: &str, partitions: usize) -> Result<(), TopicError> {
        let grow = NewPartitions::new(topic, partitions);
        let results = self.runtime.block_on(self.admin.create_partitions([&grow], &self.options)).map_err(|e| TopicError(e.to_string()))?;
        for result in results {
            result.map_err(|(_, code)| TopicError(code.to_string()))?;
        }
        Ok(())
    }

    /// One configuration value of a topic, best effort (`None` when unknown).
    pub fn config_value(&self, topic: &str, name: &str) -> Option<String> {
        let described = self.runtime.block_on(self.admin.describe_configs([&ResourceSpecifier::Topic(topic)], &self.options));
        described
            .ok()
            .and_then(|mut results| results.pop())
            .and_then(|result| result.ok())
            .and_then(|resource| resource.get(name).and_then(|entry| entry.value.clone()))
    }
}

impl Admin {
    /// Make a topic's `retention.ms` what the configuration says, whatever it
    /// was created with (a TTL raised later must raise the changelog's
    /// retention too, or live dedupe keys would leave the changelog). Kafka's
    /// AlterConfigs replaces a topic's whole dynamic configuration, so every
    /// other setting the topic has (an operator's too) is sent along unchanged.
    pub fn ensure_retention(&self, topic: &str, retention: Duration) -> Result<(), TopicError> {
        let wanted = retention.as_millis().to_string();
        let described = self
            .runtime
            .block_on(self.admin.describe_configs([&ResourceSpecifier::Topic(topic)], &self.options))
            .map_err(|e| TopicError(e.to_string()))?;
        let resource = described
            .into_iter()
            .next()
            .ok_or_else(|| TopicError("no configuration described".into()))?
            .map_err(|code| TopicError(code.to_string()))?;
        let current = resource.get("retention.ms").and_then(|entry| entry.value.clone());
        if current.as_deref() == Some(wanted.as_str()) {
            return Ok(());
        }
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
        for entry in resource.entries.iter().filter(|e| e.source == ConfigSource::DynamicTopic && e.name != "retention.ms") {
            if let Some(value) = &entry.value {
                alter = alter.set(&entry.name, value);
            }
        }
        alter = alter.set("retention.ms", &wanted);
        let results = self.runtime.block_on(self.admin.alter_configs([&alter], &self.options)).map_err(|e| TopicError(e.to_string()))?;
        for result in results {
            result.map_err(|(_, code)| TopicError(code.to_string()))?;
        }
        tracing::info!(%topic, from = current.as_deref().unwrap_or("unset"), to = %wanted, "set the topic's retention.ms to what the configuration says");
        Ok(())
    }
}

/// The members of a consumer group right now, as `client.id@host` (empty when
/// the group is stopped or does not exist).
pub fn group_members(client: &ClientConfig, group_id: &str, timeout: Duration) -> Result<Vec<String>, TopicError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = client.create().map_err(|e| TopicError(e.to_string()))?;
    let groups = consumer.fetch_group_list(Some(group_id), timeout).map_err(|e| TopicError(e.to_string()))?;
    Ok(groups
        .groups()
        .iter()
        .filter(|g| g.name() == group_id)
        .flat_map(|g| g.members().iter().map(|m| format!("{}@{}", m.client_id(), m.client_host())))
        .collect())
}

/// Why the repartition topic cannot be used.
#[derive(Debug, Error)]
pub enum RepartitionError {
    #[error("repartition topic `{topic}`: {source} (check that the brokers are reachable; the worker needs rights to describe and create topics, or create it yourself: {partitions} partitions, cleanup.policy=delete)")]
    Setup { topic: String, partitions: u32, source: TopicError },
    #[error("repartition topic `{topic}` has {have} partitions but routing.partitions = {wanted}: the partition count is fixed for the life of a group (every shipment's home depends on it). Set routing.partitions = {have}, or deploy a new group (a new kafka.group_id and empty state directories) to change it")]
    PartitionsChanged { topic: String, have: usize, wanted: u32 },
}

/// Make sure the repartition topic exists with exactly `partitions` partitions.
pub fn ensure_repartition_topic(admin: &Admin, topic: &str, partitions: u32, replication: i32, retention: Duration) -> Result<(), RepartitionError> {
    let setup = |source| RepartitionError::Setup { topic: topic.to_string(), partitions, source };
    let have = admin.partitions_of(topic).map_err(setup)?;
    if have == 0 {
        let retention_ms = retention.as_millis().to_string();
        admin
            .create(topic, partitions as usize, replication, &[("cleanup.policy", "delete"), ("retention.ms", &retention_ms)])
            .map_err(setup)?;
        tracing::info!(%topic, partitions, "created the repartition topic");
        return Ok(());
    }
    if have != partitions as usize {
        return Err(RepartitionError::PartitionsChanged { topic: topic.to_string(), have, wanted: partitions });
    }
    // Its retention bounds how long the group may be stopped before routed
    // events are deleted unread: it follows `routing.retention` on every start.
    admin.ensure_retention(topic, retention).map_err(setup)
}
