//! librdkafka properties of the worker's clients: ours first, then the user's.

use rdkafka::config::ClientConfig;

use crate::config::Config;

/// Connection properties shared by every client (admin, changelog restore).
pub fn base_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.brokers);
    with_user_properties(client, config.kafka.properties.iter())
}

/// The user's properties over ours (reserved ones are refused at validation).
fn with_user_properties<'a>(mut client: ClientConfig, properties: impl Iterator<Item = (&'a String, &'a String)>) -> ClientConfig {
    for (k, v) in properties {
        client.set(k, v);
    }
    client
}

/// Connection properties of the changelog restore consumer: a consumer like the
/// worker's, so the user's consumer properties (security settings among them)
/// apply to it too. It joins no group; the [`super::changelog::Restorer`] sets
/// what it needs over these.
pub fn restore_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.brokers);
    with_user_properties(client, config.kafka.properties.iter().chain(&config.kafka.consumer_properties))
}

/// librdkafka properties for the consumer: ours first, then the user's.
pub fn consumer_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "5000")
        // Partitions added to an input topic are found at the next metadata
        // refresh (then the group rebalances to hand them out): librdkafka's
        // default of 5 minutes left their records unread and unseen in the lag
        // for that long. One small metadata request every 10 s costs nothing.
        .set("topic.metadata.refresh.interval.ms", "10000");
    with_user_properties(client, config.kafka.properties.iter().chain(&config.kafka.consumer_properties))
}

/// librdkafka properties for the producer: idempotent, acks=all.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // The worker waits for each batch's acknowledgements before it goes
        // on, so lingering only adds latency: a batch's records are enqueued
        // at once and batch up by themselves while a request is in flight.
        .set("linger.ms", "0")
        .set("compression.type", "lz4");
    with_user_properties(client, config.kafka.properties.iter().chain(&config.kafka.producer_properties))
}

/// [`producer_config`] with a transactional.id (the worker's exactly-once mode,
/// its changelog writes in at-least-once mode, `replay --to-topic --transactional-id`).
pub fn transactional_producer_config(config: &Config, transactional_id: &str) -> ClientConfig {
    let mut client = producer_config(config);
    client.set("transactional.id", transactional_id);
    client
}

/// Check every librdkafka property of the worker's clients without connecting:
/// librdkafka rejects unknown names and bad values when a client is created.
/// The error names the property and librdkafka's reason, never the value (it may
/// be a password).
pub fn validate(config: &Config) -> Result<(), String> {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::producer::BaseProducer;
    let describe = |side: &str, e: rdkafka::error::KafkaError| match e {
        rdkafka::error::KafkaError::ClientConfig(_, reason, key, _value) => {
            format!("librdkafka property `{key}` of the {side}: {reason} (fix or remove it in kafka.properties / kafka.{side}_properties)")
        }
        other => format!("the {side} cannot be created: {other}"),
    };
    consumer_config(config).create::<BaseConsumer>().map_err(|e| describe("consumer", e))?;
    producer_config(config).create::<BaseProducer>().map_err(|e| describe("producer", e))?;
    // Exactly-once's producer, and at-least-once's changelog producer.
    if matches!(config.delivery, crate::config::DeliveryMode::ExactlyOnce) || config.changelog.is_some() {
        transactional_producer_config(config, &config.transactional_id)
            .create::<BaseProducer>()
            .map_err(|e| describe("producer", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    #[test]
    fn a_misspelled_secret_property_is_named_without_its_value() {
        let config = RawConfig::from_toml("[kafka.properties]\n\"sasl.pasword\" = \"hunter2\"\n").unwrap().validate().unwrap();
        let err = validate(&config).unwrap_err();
        assert!(err.contains("sasl.pasword"), "{err}");
        assert!(!err.contains("hunter2"), "the value must never be echoed: {err}");
        let config = RawConfig::from_toml("[kafka.consumer_properties]\n\"fetch.wait.max.ms\" = \"soon\"\n").unwrap().validate().unwrap();
        let err = validate(&config).unwrap_err();
        assert!(err.contains("fetch.wait.max.ms") && err.contains("consumer"), "{err}");
        assert!(validate(&RawConfig::default().validate().unwrap()).is_ok());
    }
}
