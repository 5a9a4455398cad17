//! "Why was this dropped?" on real runs: `waymark explain` against the state
//! directories a worker wrote on the real broker (both delivery modes), the
//! worker's `/explain`, its decisions topic, and `waymark audit` of its output
//! topic, untouched and tampered with.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use waymark::Envelope;

use crate::common::*;

/// The sample archive on `topic` (carrier header added), plus one copy of a
/// record with one scan moved 10 s: outside the 2 s skew, so a new milestone.
fn stream(topic: &str) -> Vec<Envelope> {
    let mut input: Vec<Envelope> = sample_envelopes()
        .into_iter()
        .map(|mut e| {
            e.topic = topic.to_string();
            if e.header("carrier").is_none() {
                e.headers.push(("carrier".into(), Some(b"easypost".to_vec())));
            }
            e
        })
        .collect();
    let moved = input
        .iter()
        .find(|e| String::from_utf8_lossy(&e.payload).contains("2024-08-12T08:05:00Z"))
        .expect("the sample has a scan at 2024-08-12T08:05:00Z")
        .clone();
    let mut moved = moved;
    moved.payload = String::from_utf8_lossy(&moved.payload).replace("2024-08-12T08:05:00Z", "2024-08-12T08:05:10Z").into_bytes();
    input.push(moved);
    input
}

/// Each event's verdict as the in-memory pipeline decides it, record by record:
/// (record index, status, occurred_at) -> decision name as `explain` spells it.
fn truth(input: &[Envelope]) -> Vec<Vec<(String, String, String)>> {
    let pipeline = waymark::Pipeline::default();
    let store = waymark::state::MemoryStore::default();
    let now = chrono::Utc::now();
    let mut out = Vec::new();
    for envelope in input {
        let (prepared, _) = pipeline.prepare_batch(std::slice::from_ref(envelope), now).pop().unwrap();
        let mut staged = waymark::state::Staged::new(&store);
        let result = pipeline.apply(envelope, prepared, now, &mut staged).unwrap();
        waymark::state::StateStore::write(&store, staged.take_batch()).unwrap();
        out.push(
            result
                .events
                .iter()
                .map(|o| {
                    let decision = match o.verdict {
                        waymark::dedupe::Verdict::Revision { .. } => "revision",
                        waymark::dedupe::Verdict::New if o.applied.regression_prevented => "regression_prevented",
                        waymark::dedupe::Verdict::New => "new",
                        waymark::dedupe::Verdict::DuplicateHash => "duplicate_hash",
                        waymark::dedupe::Verdict::DuplicateKey { collision: false } => "duplicate_key",
                        waymark::dedupe::Verdict::DuplicateKey { collision: true } => "duplicate_key_different_content",
                    };
                    (o.status.as_str().to_string(), o.occurred_at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(), decision.to_string())
                })
                .collect(),
        );
    }
    out
}

fn waymark_json(args: &[&str]) -> Value {
    let out = Command::new(waymark_bin()).args(args).output().unwrap();
    assert!(out.status.success(), "waymark {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("waymark {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn explain_run(mode: &[&str]) {
    let setup = WorkerSetup::new("explain", 1);
    let token = "explain-token-0123456789";
    setup.configure("http", &format!("explain_token = \"{token}\""));
    let decisions_topic = unique("it.explain.decisions");
    create_topics(&[&decisions_topic], 1);
    setup.configure("kafka", &format!("decisions_topic = \"{decisions_topic}\""));
    let input = stream(&setup.input);
    let expected = expected_upserts(&input);
    produce(&setup.input, &input, 1);
    let mut worker = setup.spawn_with(None, None, mode);
    let output = read_all(&setup.output, 1, expected.len(), Duration::from_secs(90), Duration::from_secs(2));
    assert_eq!(output.iter().map(|r| r.value["milestone_id"].as_str().unwrap().to_string()).collect::<BTreeSet<_>>(), expected.keys().cloned().collect());

    // Over HTTP, on the running worker: the token is required.
    let tracking = output[0].value["tracking_number"].as_str().unwrap().to_string();
    let shipment = format!("acme:easypost:{tracking}");
    let url = format!("/explain?shipment={}", shipment.replace(':', "%3A"));
    assert_eq!(http_get(setup.http_port, &url).map(|r| r.0), Some(401));
    let (code, body) = http_get_with(setup.http_port, &url, &[("Authorization", &format!("Bearer {token}"))]).expect("an answer");
    assert_eq!(code, 200, "{body}");
    let over_http: Value = serde_json::from_str(&body).unwrap();
    let emitted = output.iter().filter(|r| r.value["tracking_number"] == tracking.as_str() && r.value["tenant_id"] == "acme").count();
    assert_eq!(over_http["milestones"].as_array().map(Vec::len), Some(emitted), "{over_http}");

    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).is_some_and(|s| s.success()));

    // From the state directory and the record on Kafka: every event's decision is
    // the pipeline's, and its first sighting is the record that was first.
    let config = setup.config_path.to_str().unwrap();
    let mut kinds = BTreeSet::new();
    for (offset, decided) in truth(&input).iter().enumerate() {
        let record = format!("{}:0:{offset}", setup.input);
        let report = waymark_json(&["explain", "--config", config, "--record", &record, "--json"]);
        if let Some(dead) = report.get("dead_letter") {
            assert_eq!(dead["error_kind"], "invalid_json", "{report}");
            kinds.insert("dead_letter".to_string());
            continue;
        }
        let events = report["events"].as_array().expect("events");
        assert_eq!(events.len(), decided.len(), "{report}");
        for event in events {
            let key = (event["status"].as_str().unwrap().to_string(), event["occurred_at"].as_str().unwrap().to_string());
            let (_, _, decision) = decided.iter().find(|(s, t, _)| (s, t) == (&key.0, &key.1)).unwrap_or_else(|| panic!("{event}"));
            assert_eq!(event["decision"].as_str(), Some(decision.as_str()), "record {offset}: {event}");
            kinds.insert(decision.clone());
            let source = &event["matched"]["sighting"]["source"];
            assert_eq!(source["topic"].as_str(), Some(setup.input.as_str()), "{event}");
            let first = source["offset"].as_i64().unwrap();
            if decision == "new" || decision == "regression_prevented" {
                assert_eq!(first, offset as i64, "a new event's first sighting is its own record: {event}");
            } else {
                assert!(first < offset as i64, "a duplicate matches an earlier record: {event}");
            }
        }
    }
    for kind in ["dead_letter", "new", "regression_prevented", "duplicate_hash", "duplicate_key_different_content"] {
        assert!(kinds.contains(kind), "no {kind} decision among {kinds:?}");
    }
    // The decisions topic holds every non-new decision, once each here (one
    // worker, no fault), with the record it came from and what it matched.
    let wanted: BTreeSet<(i64, String, String, String)> = truth(&input)
        .iter()
        .enumerate()
        .flat_map(|(offset, decided)| decided.iter().map(move |(status, at, decision)| (offset as i64, status.clone(), at.clone(), decision.clone())))
        .filter(|(.., decision)| decision != "new")
        .collect();
    let recorded = read_all(&decisions_topic, 1, wanted.len(), Duration::from_secs(60), Duration::from_secs(2));
    assert_eq!(recorded.len(), wanted.len(), "one record per non-new decision");
    let milestone_ids: BTreeSet<String> = output.iter().map(|r| r.value["milestone_id"].as_str().unwrap().to_string()).collect();
    let mut got = BTreeSet::new();
    for record in &recorded {
        let d = &record.value;
        assert_eq!(d["kind"], "decision", "{d}");
        assert_eq!(record.headers.get("decision").map(String::as_str), d["decision"].as_str(), "{d}");
        assert_eq!(d["source"]["topic"].as_str(), Some(setup.input.as_str()), "{d}");
        let offset = d["source"]["offset"].as_i64().unwrap();
        if d["decision"] != "regression_prevented" {
            assert!(d["matched"]["source"]["offset"].as_i64().unwrap() < offset, "a duplicate matches an earlier record: {d}");
        }
        if let Some(id) = d["milestone_id"].as_str() {
            assert!(milestone_ids.contains(id), "a decision names an emitted milestone: {d}");
        }
        assert_eq!(record.key.as_deref(), Some(format!("acme:easypost:{}", d["tracking_number"].as_str().unwrap()).as_str()), "{d}");
        got.insert((offset, d["status"].as_str().unwrap().to_string(), d["occurred_at"].as_str().unwrap().to_string(), d["decision"].as_str().unwrap().to_string()));
    }
    assert_eq!(got, wanted);

    let report = waymark_json(&["explain", "--config", config, "--shipment", &shipment, "--json"]);
    assert_eq!(report["milestones"].as_array().map(Vec::len), Some(emitted), "{report}");
    let last = output.iter().rfind(|r| r.value["tracking_number"] == tracking.as_str() && r.value["tenant_id"] == "acme").unwrap();
    assert_eq!(report["state"]["shipment_status"], last.value["shipment_status"], "{report}");

    // Audit: the untouched output matches; one milestone removed and one
    // duplicated by hand are both reported, exit 1.
    let audit = |against: &str| {
        let report = setup.state_dir.with_extension("audit.json");
        let out = Command::new(waymark_bin())
            .args(["audit", "--config", config, "--from-topic", &setup.input, "--against", against, "--settle", "0s", "--report"])
            .arg(&report)
            .output()
            .unwrap();
        let json: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), json)
    };
    let (code, said, report) = audit(&setup.output);
    assert_eq!(code, Some(0), "{said}");
    assert_eq!(report["missing"].as_array().map(Vec::len), Some(0), "{report}");
    let tampered = unique("it.explain.tampered");
    create_topics(&[&tampered], 1);
    let mut copy: Vec<Envelope> = output
        .iter()
        .map(|r| Envelope {
            topic: tampered.clone(),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            headers: Vec::new(),
            key: r.key.clone().map(String::into_bytes),
            payload: serde_json::to_vec(&r.value).unwrap(),
        })
        .collect();
    let removed = copy.remove(2);
    copy.push(copy[0].clone());
    produce(&tampered, &copy, 1);
    let (code, said, report) = audit(&tampered);
    assert_eq!(code, Some(1), "{said}");
    let removed_id = serde_json::from_slice::<Value>(&removed.payload).unwrap()["milestone_id"].clone();
    assert_eq!(report["missing"].as_array().map(|m| m.iter().map(|f| f["milestone_id"].clone()).collect::<Vec<_>>()), Some(vec![removed_id]), "{report}");
    let repeated = serde_json::from_slice::<Value>(&copy[0].payload).unwrap()["milestone_id"].clone();
    assert_eq!(report["repeated"][0]["milestone_id"], repeated, "{report}");
    assert!(said.contains("missing: 1") && said.contains("DIVERGES"), "{said}");
}

#[test]
fn explain_and_audit_at_least_once() {
    explain_run(&[]);
}

#[test]
fn explain_and_audit_exactly_once() {
    let transactional_id = unique("explain-txn");
    explain_run(&["--delivery", "exactly-once", "--transactional-id", &transactional_id]);
}
