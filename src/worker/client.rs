//! librdkafka properties of the worker's clients: ours first, then the user's.

use rdkafka::config::ClientConfig;

use crate::config::Config;

/// Connection properties shared by every client (admin, changelog restore).
pub fn base_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.brokers);
    for (k, v) in &config.kafka.properties {
        client.set(k, v);
    }
    client
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
        .set("statistics.interval.ms", "5000");
    for (k, v) in config.kafka.properties.iter().chain(&config.kafka.consumer_properties) {
        client.set(k, v);
    }
    client
}

/// librdkafka properties for the producer: idempotent, acks=all.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    for (k, v) in config.kafka.properties.iter().chain(&config.kafka.producer_properties) {
        client.set(k, v);
    }
    client
}
