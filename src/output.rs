//! Records the pipeline emits: "ensure milestone" upserts
//! (schemas/milestone-upsert.schema.json) and dead letters
//! (schemas/dead-letter.schema.json).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;
use crate::error::RecordError;
use crate::event::{rfc3339_millis, Location, SourceRef, Status, TrackingEvent};

/// One idempotent upsert per new milestone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MilestoneUpsert {
    /// Always `ensure_milestone`.
    pub kind: String,
    /// Deterministic: applying the upsert twice changes nothing downstream.
    pub milestone_id: String,
    pub tenant_id: String,
    pub carrier: String,
    pub tracking_number: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shipment_ref: Option<String>,
    pub status: Status,
    pub carrier_status_code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub carrier_status_detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(with = "rfc3339_millis")]
    pub occurred_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub time_assumed_utc: bool,
    pub location: Location,
    /// Furthest point on the forward path after this event (never moves back).
    pub shipment_status: Status,
    /// Status of the latest event by occurred_at (ties by rank).
    pub latest_status: Status,
    pub source: SourceRef,
}

impl MilestoneUpsert {
    /// Output record key: one shipment stays in one output partition, in order.
    pub fn key(&self) -> String {
        format!("{}:{}:{}", self.tenant_id, self.carrier, self.tracking_number)
    }
}

/// `milestone_id`: hex blake3 over tenant, carrier, tracking number, status, code,
/// occurred_at (DESIGN section 6) and the location, since two scans of one status
/// at one instant in two places are two milestones (DESIGN section 4).
pub fn milestone_id(event: &TrackingEvent) -> String {
    let mut enc = crate::dedupe::Encoder::new(b"waymark.milestone.v1");
    enc.str(&event.tenant_id);
    enc.str(&event.carrier);
    enc.str(&event.tracking_number);
    enc.str(event.status.as_str());
    enc.str(&event.carrier_status_code);
    enc.i64(event.occurred_at.timestamp_millis());
    crate::dedupe::location_fields(&mut enc, event);
    enc.finish().to_hex().to_string()
}

impl MilestoneUpsert {
    pub fn new(event: TrackingEvent, shipment_status: Status, latest_status: Status) -> Self {
        MilestoneUpsert {
            kind: "ensure_milestone".into(),
            milestone_id: milestone_id(&event),
            tenant_id: event.tenant_id,
            carrier: event.carrier,
            tracking_number: event.tracking_number,
            shipment_ref: event.shipment_ref,
            status: event.status,
            carrier_status_code: event.carrier_status_code,
            carrier_status_detail: event.carrier_status_detail,
            description: event.description,
            occurred_at: event.occurred_at,
            time_assumed_utc: event.time_assumed_utc,
            location: event.location,
            shipment_status,
            latest_status,
            source: event.source,
        }
    }
}

/// A record that could not be turned into events, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Always `dead_letter`.
    pub kind: String,
    /// Bounded machine-readable kind (`invalid_json`, `missing_field`, ...).
    pub error_kind: String,
    /// What was wrong, for a human.
    pub reason: String,
    #[serde(with = "rfc3339_millis")]
    pub failed_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub carrier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    pub envelope: DeadEnvelope,
}

/// The original envelope, losslessly: a body that is not UTF-8 travels as base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadEnvelope {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp_ms: Option<i64>,
    /// `[name, value]` pairs; a value that is not UTF-8 is base64 with a `base64:` prefix.
    pub headers: Vec<(String, Option<String>)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

impl DeadLetter {
    pub fn new(
        envelope: &Envelope,
        error: &RecordError,
        carrier: Option<String>,
        tenant_id: Option<String>,
        now: DateTime<Utc>,
    ) -> Self {
        use base64::Engine;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let text_or_b64 = |bytes: &[u8]| match std::str::from_utf8(bytes) {
            Ok(text) => text.to_string(),
            Err(_) => format!("base64:{}", b64(bytes)),
        };
        let (payload, payload_base64) = match std::str::from_utf8(&envelope.payload) {
            Ok(text) => (Some(text.to_string()), None),
            Err(_) => (None, Some(b64(&envelope.payload))),
        };
        DeadLetter {
            kind: "dead_letter".into(),
            error_kind: error.kind().into(),
            reason: error.to_string(),
            failed_at: now,
            carrier,
            tenant_id,
            envelope: DeadEnvelope {
                topic: envelope.topic.clone(),
                partition: envelope.partition,
                offset: envelope.offset,
                timestamp_ms: envelope.timestamp_ms,
                headers: envelope.headers.iter().map(|(k, v)| (k.clone(), v.as_deref().map(text_or_b64))).collect(),
                key: envelope.key.as_deref().map(text_or_b64),
                payload,
                payload_base64,
            },
        }
    }

    /// Output key of the dead-letter topic: where the record came from.
    pub fn key(&self) -> String {
        format!("{}:{}:{}", self.envelope.topic, self.envelope.partition, self.envelope.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use jsonschema::{Retrieve, Uri, Validator};
    use serde_json::Value;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    fn envelope(payload: Vec<u8>) -> Envelope {
        Envelope {
            topic: "tracking.raw.usps".into(),
            partition: 3,
            offset: 42,
            timestamp_ms: Some(1_767_225_600_000),
            headers: vec![("tenant-id".into(), Some(b"acme".to_vec())), ("trace".into(), None)],
            key: Some(b"9400111206213859014819".to_vec()),
            payload,
        }
    }

    /// Resolves the schemas' `https://waymark.dev/schemas/<file>` references to
    /// `schemas/<file>`: tests never touch the network.
    struct LocalSchemas;

    fn schema_file(name: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas").join(name);
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    impl Retrieve for LocalSchemas {
        fn retrieve(&self, uri: &Uri<String>) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
            Ok(schema_file(uri.path().as_str().rsplit('/').next().unwrap_or_default()))
        }
    }

    fn dead_letter_schema() -> Validator {
        jsonschema::options().with_retriever(LocalSchemas).build(&schema_file("dead-letter.schema.json")).unwrap()
    }

    fn assert_valid(schema: &Validator, dead: &DeadLetter) {
        let value = serde_json::to_value(dead).unwrap();
        let errors: Vec<String> = schema.iter_errors(&value).map(|e| format!("{e} at {}", e.instance_path())).collect();
        assert!(errors.is_empty(), "dead letter does not validate: {errors:?}");
    }

    /// One error of every kind. The match below stops compiling when a variant is
    /// added, as a reminder to list it here (and so in the schema check).
    fn one_of_each_kind() -> Vec<RecordError> {
        let all = vec![
            RecordError::TooLarge { size: 2, limit: 1 },
            RecordError::InvalidUtf8 { at: 0 },
            RecordError::InvalidJson("x".into()),
            RecordError::WrongType { field: "f".into(), expected: "string" },
            RecordError::MissingField("f".into()),
            RecordError::UnknownCarrier("x".into()),
            RecordError::MissingTenant,
            RecordError::InvalidHeader { name: "h".into(), reason: "r".into() },
            RecordError::InvalidTimestamp { field: "f".into(), value: "v".into(), reason: "r".into() },
            RecordError::AbsurdTimestamp { field: "f".into(), value: "v".into(), min: "a".into(), max: "b".into() },
            RecordError::InvalidEnvelope("x".into()),
            RecordError::Unsupported("x".into()),
            RecordError::Internal { carrier: "c".into(), message: "m".into() },
        ];
        for error in &all {
            match error {
                RecordError::TooLarge { .. }
                | RecordError::InvalidUtf8 { .. }
                | RecordError::InvalidJson(_)
                | RecordError::WrongType { .. }
                | RecordError::MissingField(_)
                | RecordError::UnknownCarrier(_)
                | RecordError::MissingTenant
                | RecordError::InvalidHeader { .. }
                | RecordError::InvalidTimestamp { .. }
                | RecordError::AbsurdTimestamp { .. }
                | RecordError::InvalidEnvelope(_)
                | RecordError::Unsupported(_)
                | RecordError::Internal { .. } => {}
            }
        }
        all
    }

    #[test]
    fn every_error_kind_makes_a_valid_dead_letter() {
        let schema = dead_letter_schema();
        for error in one_of_each_kind() {
            let dead = DeadLetter::new(&envelope(b"{}".to_vec()), &error, Some("usps".into()), Some("acme".into()), now());
            assert_eq!(dead.error_kind, error.kind());
            assert_valid(&schema, &dead);
        }
    }
}
