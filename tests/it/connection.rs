//! Every command that talks to Kafka reaches a broker that is not the default
//! one through `WAYMARK_BROKERS` alone, as the deployment files pass it (no
//! `--brokers`, no `WAYMARK_KAFKA__BROKERS`), against the real broker.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::common::*;

/// `waymark <args>` with `env` and nothing on the command line about the broker.
fn waymark(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Output {
    let mut child = Command::new(waymark_bin())
        .args(args)
        .env_remove("WAYMARK_KAFKA__BROKERS")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn every_kafka_command_reaches_the_broker_named_by_waymark_brokers() {
    let brokers = brokers();
    assert_ne!(brokers, "127.0.0.1:9092", "the test needs a broker other than the default address");
    let (input, output, dead) = (unique("conn-in"), unique("conn-out"), unique("conn-dlq"));
    create_topics(&[&input, &output, &dead], 1);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("waymark.toml");
    std::fs::write(&config, format!("[topics]\n\"{input}\" = \"easypost\"\n")).unwrap();
    let config = config.to_str().unwrap();
    let group = unique("conn-group");
    let env = [
        ("WAYMARK_BROKERS", brokers.as_str()),
        ("WAYMARK_GROUP_ID", group.as_str()),
        ("WAYMARK_INPUT_TOPICS", input.as_str()),
        ("WAYMARK_OUTPUT_TOPIC", output.as_str()),
        ("WAYMARK_DEAD_LETTER_TOPIC", dead.as_str()),
    ];

    // produce: the sample archive onto the input topic.
    let archive = std::fs::read(repo().join("replay/sample.ndjson")).unwrap();
    let out = waymark(&["produce", "--config", config, "--input", "-", "--topic", &input], &env, &archive);
    assert!(out.status.success(), "produce: {}", text(&out.stderr));

    // check --connect: the brokers and the three topics the variables name.
    let out = waymark(&["check", "--config", config, "--connect"], &env, b"");
    assert!(out.status.success(), "check --connect: {}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains(&format!("topic {input}: 1 partitions")) && said.contains(&brokers), "{said}");

    // replay --from-topic: the topic's history, the sample's milestones.
    let out = waymark(&["replay", "--config", config, "--from-topic", &input], &env, b"");
    assert!(out.status.success(), "replay --from-topic: {}", text(&out.stderr));
    let ids = |ndjson: &str| -> BTreeSet<String> {
        ndjson
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["milestone_id"].as_str().unwrap().to_string())
            .collect()
    };
    let expected = ids(&std::fs::read_to_string(repo().join("replay/sample.expected.ndjson")).unwrap());
    assert_eq!(ids(&text(&out.stdout)), expected, "the topic's replay gives the sample's milestones");

    // state drop: asks the broker whether the group runs, then for its changelog.
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let out = waymark(&["replay", "--input", "/dev/null", "--state-dir", state], &[], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let repartition = format!("{group}-repartition");
    let out = waymark(&["state", "drop", "--config", config, "--state-dir", state, "--topic", &repartition, "--partition", "0"], &env, b"");
    let said = text(&out.stderr);
    assert!(out.status.success(), "state drop: {said}");
    assert!(said.contains(&format!("no changelog topic {repartition}-changelog on {brokers}")), "{said}");
}
