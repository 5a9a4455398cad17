//! A carrier defined only by a mapping file (fixtures/declared/nordpost.toml), end to
//! end: `waymark replay --config` with `declared_carriers` on an archive of records
//! addressed to it by header and by topic.

use std::process::Command;

use waymark::Envelope;

use crate::common::{repo, waymark_bin};

fn record(topic: &str, offset: i64, headers: &[(&str, &str)], body_file: &str) -> String {
    let body = std::fs::read(repo().join("fixtures/nordpost").join(body_file)).unwrap();
    // Compact the body: one archive line per record, as kcat writes it.
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    Envelope {
        topic: topic.into(),
        partition: 0,
        offset,
        timestamp_ms: Some(1_762_500_000_000),
        headers: headers.iter().map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec()))).collect(),
        key: None,
        payload: serde_json::to_vec(&body).unwrap(),
    }
    .to_kcat_json()
}

/// A config file in its own directory naming the mapping by a path relative to it.
fn config_dir(mapping: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("carriers")).unwrap();
    std::fs::write(dir.path().join("carriers/nordpost.toml"), mapping).unwrap();
    std::fs::write(dir.path().join("waymark.toml"), "declared_carriers = [\"carriers/nordpost.toml\"]\n").unwrap();
    dir
}

fn replay(config: &std::path::Path, archive: &std::path::Path, dlq: &std::path::Path) -> std::process::Output {
    // Run from the repository root: the mapping path must resolve against the
    // config file's directory, not the working directory.
    Command::new(waymark_bin())
        .arg("replay")
        .arg("--config")
        .arg(config)
        .arg("--input")
        .arg(archive)
        .arg("--dlq")
        .arg(dlq)
        .current_dir(repo())
        .env_remove("WAYMARK_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn replay_normalizes_a_declared_carrier_end_to_end() {
    let mapping = std::fs::read_to_string(repo().join("fixtures/declared/nordpost.toml")).unwrap();
    let dir = config_dir(&mapping);
    let archive = dir.path().join("archive.ndjson");
    let lines = [
        // Addressed by topic convention.
        record("tracking.raw.nordpost", 0, &[("tenant-id", "acme")], "service_point_pickup.json"),
        // Addressed by header on a shared topic, then the same webhook delivered again
        // (dedupe is scoped per topic partition, so the redelivery shares the topic).
        record("webhooks.in", 0, &[("tenant-id", "acme"), ("carrier", "nordpost")], "consignment_history.json"),
        record("webhooks.in", 1, &[("tenant-id", "acme"), ("carrier", "nordpost")], "consignment_history.json"),
        // A body the mapping cannot read.
        record("webhooks.in", 2, &[("tenant-id", "acme"), ("carrier", "nordpost")], "bad_unreadable_stamp.json"),
    ];
    std::fs::write(&archive, lines.join("\n") + "\n").unwrap();
    let dlq = dir.path().join("dlq.ndjson");

    let out = replay(&dir.path().join("waymark.toml"), &archive, &dlq);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "replay failed: {stderr}");
    let upserts: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for u in &upserts {
        assert_eq!(u["kind"], "ensure_milestone");
        assert_eq!(u["carrier"], "nordpost");
        assert_eq!(u["tenant_id"], "acme");
        assert_eq!(u["time_assumed_utc"], true, "zone-less local times are flagged");
    }
    let statuses = |tracking: &str| -> Vec<String> {
        upserts
            .iter()
            .filter(|u| u["tracking_number"] == tracking)
            .map(|u| u["status"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(statuses("NP118306452NO"), ["out_for_delivery", "delivery_attempted", "available_for_pickup", "delivered"]);
    assert_eq!(
        statuses("NP734512908SE"),
        ["label_created", "picked_up", "in_transit", "in_transit", "out_for_delivery", "delivered"],
        "one upsert per scan; the redelivered webhook adds none"
    );
    assert_eq!(upserts.len(), 10);

    let history: Vec<&serde_json::Value> = upserts.iter().filter(|u| u["tracking_number"] == "NP734512908SE").collect();
    for u in &history {
        assert_eq!(u["shipment_ref"], "c-2025-884120");
        assert_eq!(u["source"]["topic"], "webhooks.in");
        assert_eq!(u["source"]["offset"], 0);
    }
    let last = history.last().unwrap();
    assert_eq!(last["shipment_status"], "delivered");
    assert_eq!(last["carrier_status_code"], "60");
    assert_eq!(last["carrier_status_detail"], "DOOR");
    assert_eq!(last["occurred_at"], "2025-11-06T09:27:40.000Z");
    assert_eq!(last["location"], serde_json::json!({"city": "Umeå", "region": "Västerbotten", "postal_code": "903 27", "country": "SE"}));

    assert!(stderr.contains("records read:           4"), "{stderr}");
    assert!(stderr.contains("milestones emitted:     10"), "{stderr}");
    assert!(stderr.contains("duplicates (hash):      6"), "{stderr}");
    assert!(stderr.contains("invalid (dead letters): 1"), "{stderr}");
    let dead: Vec<serde_json::Value> =
        std::fs::read_to_string(&dlq).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["error_kind"], "invalid_timestamp");
    assert_eq!(dead[0]["carrier"], "nordpost");
}

#[test]
fn a_bad_mapping_stops_replay_with_the_file_and_key_to_fix() {
    let mapping = std::fs::read_to_string(repo().join("fixtures/declared/nordpost.toml")).unwrap();
    let dir = config_dir(&mapping.replace(r#""60" = "delivered""#, r#""60" = "delivred""#));
    let archive = dir.path().join("archive.ndjson");
    std::fs::write(&archive, "").unwrap();
    let out = replay(&dir.path().join("waymark.toml"), &archive, &dir.path().join("dlq.ndjson"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "configuration errors exit 2: {stderr}");
    assert!(stderr.contains("nordpost.toml") && stderr.contains(r#"`codes."60" = "delivred"`"#), "{stderr}");
}
