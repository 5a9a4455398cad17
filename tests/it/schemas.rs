//! Every record the pipeline emits validates against the published JSON Schemas.

use jsonschema::{Retrieve, Uri, Validator};
use serde_json::Value;

use crate::common::{repo, sample_envelopes};
use waymark::batch;
use waymark::state::MemoryStore;

fn schema(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join("schemas").join(name)).unwrap()).unwrap()
}

/// Resolves `https://waymark.dev/schemas/<file>` to `schemas/<file>` in the repo:
/// the schemas reference each other, and tests never touch the network.
struct LocalSchemas;

impl Retrieve for LocalSchemas {
    fn retrieve(&self, uri: &Uri<String>) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let file = uri.path().as_str().rsplit('/').next().unwrap_or_default().to_string();
        let text = std::fs::read_to_string(repo().join("schemas").join(&file))?;
        Ok(serde_json::from_str(&text)?)
    }
}

fn validator(name: &str) -> Validator {
    jsonschema::options()
        .with_retriever(LocalSchemas)
        .build(&schema(name))
        .unwrap_or_else(|e| panic!("schema {name} does not compile: {e}"))
}

fn assert_valid(v: &Validator, instance: &Value) {
    let errors: Vec<String> = v.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{instance}\n does not validate: {errors:?}");
}

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339("2024-09-01T00:00:00Z").unwrap().into()
}

#[test]
fn upserts_dead_letters_events_and_envelopes_validate() {
    let envelopes = sample_envelopes();
    let pipeline = waymark::Pipeline::default();
    let store = MemoryStore::default();
    let output = batch::process(&pipeline, &store, &envelopes, now(), false, None).unwrap();
    assert!(!output.upserts.is_empty() && !output.dead_letters.is_empty());

    let upsert_schema = validator("milestone-upsert.schema.json");
    for upsert in &output.upserts {
        assert_valid(&upsert_schema, &serde_json::to_value(upsert).unwrap());
    }
    let dead_schema = validator("dead-letter.schema.json");
    for dead in &output.dead_letters {
        assert_valid(&dead_schema, &serde_json::to_value(dead).unwrap());
    }
    let event_schema = validator("tracking-event.schema.json");
    for envelope in &envelopes {
        if let Ok((_, events)) = pipeline.canonical_events(envelope, now()) {
            for event in events {
                assert_valid(&event_schema, &serde_json::to_value(&event).unwrap());
            }
        }
    }
    // The worker's first stage: the same records routed to their homes.
    let hop = waymark::Pipeline { hop: true, ..waymark::Pipeline::default() };
    let routed = batch::process(&hop, &MemoryStore::default(), &envelopes, now(), false, None).unwrap().routed;
    assert!(!routed.is_empty());
    let routed_schema = validator("repartition-record.schema.json");
    for record in &routed {
        assert_valid(&routed_schema, &serde_json::from_slice(&record.payload).unwrap());
    }
    let envelope_schema = validator("envelope.schema.json");
    for line in std::fs::read_to_string(repo().join("replay/sample.ndjson")).unwrap().lines() {
        assert_valid(&envelope_schema, &serde_json::from_str(line).unwrap());
    }
}

#[test]
fn schemas_reject_what_they_must() {
    let upsert_schema = validator("milestone-upsert.schema.json");
    let envelopes = sample_envelopes();
    let output = batch::process(&waymark::Pipeline::default(), &MemoryStore::default(), &envelopes, now(), false, None).unwrap();
    let mut bad = serde_json::to_value(&output.upserts[0]).unwrap();
    bad["status"] = "teleported".into();
    assert!(!upsert_schema.is_valid(&bad), "an unknown status must not validate");
    let mut bad = serde_json::to_value(&output.upserts[0]).unwrap();
    bad["occurred_at"] = "2024-07-31 15:00".into();
    assert!(!upsert_schema.is_valid(&bad), "a non-UTC timestamp must not validate");
}

/// Decisions (duplicates, revisions, prevented regressions) validate against
/// schemas/decision.schema.json: the sample archive, then all of it again, then
/// one scan with corrected text.
#[test]
fn decisions_validate() {
    let envelopes = sample_envelopes();
    let pipeline = waymark::Pipeline { record_decisions: true, ..waymark::Pipeline::default() };
    let store = MemoryStore::default();
    let mut decisions = Vec::new();
    for _ in 0..2 {
        let output = batch::process(&pipeline, &store, &envelopes, now(), false, None).unwrap();
        waymark::state::StateStore::write(&store, output.state).unwrap();
        decisions.extend(output.decisions);
    }
    let first = &envelopes[0];
    let text = String::from_utf8(first.payload.clone()).unwrap();
    let message = batch::process(&pipeline, &MemoryStore::default(), std::slice::from_ref(first), now(), false, None).unwrap().upserts[0]
        .description
        .clone()
        .expect("the sample's first scan has a description");
    let mut corrected = first.clone();
    corrected.offset += 1000;
    corrected.payload = text.replace(&message, "corrected").into_bytes();
    decisions.extend(batch::process(&pipeline, &store, &[corrected], now(), false, None).unwrap().decisions);

    let kinds: std::collections::BTreeSet<&str> = decisions.iter().map(|d| d.decision.label()).collect();
    for kind in ["duplicate_hash", "regression_prevented", "revision"] {
        assert!(kinds.contains(kind), "no {kind} among {kinds:?}");
    }
    let schema = validator("decision.schema.json");
    for decision in &decisions {
        assert_valid(&schema, &serde_json::to_value(decision).unwrap());
    }
}

/// A correction record and the retraction upsert it produces validate
/// against schemas/correction.schema.json and the upsert schema; an ordinary
/// upsert carrying a `retraction` does not.
#[test]
fn corrections_and_retractions_validate() {
    let envelopes = sample_envelopes();
    let pipeline = waymark::Pipeline { control_topic: Some("tracking.control".into()), ..waymark::Pipeline::default() };
    let store = MemoryStore::default();
    let output = batch::process(&pipeline, &store, &envelopes, now(), false, None).unwrap();
    waymark::state::StateStore::write(&store, output.state).unwrap();
    let target = &output.upserts[0];
    let correction = waymark::correction::Correction::retract(&target.tenant_id, &target.carrier, &target.tracking_number, &target.milestone_id, "mis-scan", "ops", now());
    assert_valid(&validator("correction.schema.json"), &serde_json::to_value(&correction).unwrap());
    let record = waymark::Envelope { topic: "tracking.control".into(), partition: 0, offset: 0, timestamp_ms: None, headers: Vec::new(), key: None, payload: serde_json::to_vec(&correction).unwrap() };
    let retracted = batch::process(&pipeline, &store, &[record], now(), false, None).unwrap();
    assert!(retracted.dead_letters.is_empty(), "{:?}", retracted.dead_letters);
    let upsert = serde_json::to_value(&retracted.upserts[0]).unwrap();
    assert_eq!(upsert["kind"], "retract_milestone");
    let schema = validator("milestone-upsert.schema.json");
    assert_valid(&schema, &upsert);
    let mut forged = serde_json::to_value(target).unwrap();
    forged["retraction"] = upsert["retraction"].clone();
    assert!(!schema.is_valid(&forged), "an ensure_milestone with a retraction must not validate");
    let mut bare = upsert.clone();
    bare.as_object_mut().unwrap().remove("retraction");
    assert!(!schema.is_valid(&bare), "a retraction without its audit trail must not validate");
}
