//! Records the pipeline emits: "ensure milestone" upserts
//! (schemas/milestone-upsert.schema.json), dead letters
//! (schemas/dead-letter.schema.json) and, when a decisions topic is set, the
//! decisions that emitted no new milestone (schemas/decision.schema.json).

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
    /// Corrections of this milestone's text or place so far: absent (0) for the
    /// first emission, 1 for the first correction the provider sent, ... A
    /// revision has the same `milestone_id`: apply it as an update, never as a
    /// new milestone (no second notification).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u32,
    /// Which use of the tracking number the milestone belongs to: absent (0)
    /// for the first known, 1 for the parcel that reused it, ...
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u32,
    /// On a retraction (`kind` = `retract_milestone`): who asked, when, why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retraction: Option<crate::correction::Retraction>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl MilestoneUpsert {
    /// Output record key: one shipment stays in one output partition, in order.
    pub fn key(&self) -> String {
        shipment_key(&self.tenant_id, &self.carrier, &self.tracking_number)
    }
}

/// `tenant_id:carrier:tracking_number`, the key of a shipment's records on the
/// output and repartition topics. Carrier names never contain `:` (built-in
/// names, and declared ones are refused with it) and tracking numbers may, so
/// the tenant id is the one field that must not: a `:` in it is written `%3A`
/// (and `%` as `%25`). Without that, tenant `a:ups` with carrier `fedex` and
/// tenant `a` with carrier `ups` and a tracking number starting `fedex:` would
/// share a key, and a consumer that compacts or materializes by key would mix
/// two tenants' shipments. Tenant ids without `:` or `%` (nearly all) keep
/// their key unchanged.
pub fn shipment_key(tenant_id: &str, carrier: &str, tracking_number: &str) -> String {
    let mut key = String::with_capacity(tenant_id.len() + carrier.len() + tracking_number.len() + 2);
    for c in tenant_id.chars() {
        match c {
            ':' => key.push_str("%3A"),
            '%' => key.push_str("%25"),
            c => key.push(c),
        }
    }
    key.push(':');
    key.push_str(carrier);
    key.push(':');
    key.push_str(tracking_number);
    key
}

/// `milestone_id`: hex blake3 over tenant, carrier, tracking number, status, code,
/// occurred_at and the location, since two scans of one status
/// at one instant in two places are two milestones.
pub fn milestone_id(event: &TrackingEvent) -> String {
    milestone_id_in(event, 0)
}

/// [`milestone_id`] of a scan in `generation` of its tracking number: the
/// generation is part of the id after the first, so a reused number's
/// milestones never meet the earlier parcel's (the first generation's ids are
/// the ids Waymark always gave).
pub fn milestone_id_in(event: &TrackingEvent, generation: u32) -> String {
    crate::dedupe::milestone_digest(event, generation).to_hex().to_string()
}

impl MilestoneUpsert {
    pub fn new(event: TrackingEvent, shipment_status: Status, latest_status: Status) -> Self {
        Self::new_in_generation(event, shipment_status, latest_status, 0)
    }

    /// The upsert of a scan in `generation` of its tracking number.
    pub fn new_in_generation(event: TrackingEvent, shipment_status: Status, latest_status: Status, generation: u32) -> Self {
        let milestone = crate::dedupe::milestone_digest(&event, generation);
        Self::of_milestone(event, &milestone, shipment_status, latest_status, generation)
    }

    /// [`MilestoneUpsert::new_in_generation`] with the milestone's digest
    /// ([`crate::dedupe::milestone_digest`]) computed already: the pipeline
    /// hashes a new event's milestone once, for its dedupe entry and its upsert.
    pub fn of_milestone(event: TrackingEvent, milestone: &blake3::Hash, shipment_status: Status, latest_status: Status, generation: u32) -> Self {
        MilestoneUpsert {
            kind: "ensure_milestone".into(),
            milestone_id: milestone.to_hex().to_string(),
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
            revision: 0,
            generation,
            retraction: None,
        }
    }
}

/// What became (or would become) of one canonical event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// This record was the event's first sighting: its milestone was emitted.
    New,
    /// New, and its milestone emitted, but the shipment's status did not move:
    /// it was already further along.
    RegressionPrevented,
    /// The same content was seen before (an exact redelivery or replay).
    DuplicateHash,
    /// The same composite key was seen within the carrier's skew tolerance,
    /// with the same content.
    DuplicateKey,
    /// The same composite key within the skew, only the time told differently
    /// (a skewed clock): still the same milestone.
    DuplicateKeyDifferentContent,
    /// The same scan with corrected text or place: emitted again under the
    /// same milestone id, as a revision.
    Revision,
    /// No live entry: the record was not processed yet (or not by this state
    /// directory), or its entries expired; processed now, the event is new.
    NotSeen,
}

impl Decision {
    /// The name the decisions topic and `explain --json` use.
    pub fn label(self) -> &'static str {
        match self {
            Decision::New => "new",
            Decision::RegressionPrevented => "regression_prevented",
            Decision::DuplicateHash => "duplicate_hash",
            Decision::DuplicateKey => "duplicate_key",
            Decision::DuplicateKeyDifferentContent => "duplicate_key_different_content",
            Decision::Revision => "revision",
            Decision::NotSeen => "not_seen",
        }
    }
}

/// One record on the decisions topic (schemas/decision.schema.json): an
/// event the pipeline did not simply emit as a new milestone, with what it
/// matched. Identifiers and times only, never the event's text or place, so a
/// record stays small (a few hundred bytes) and carries no more tenant data
/// than the key already does. At most one per event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Always `decision`.
    pub kind: String,
    pub decision: Decision,
    #[serde(with = "rfc3339_millis")]
    pub decided_at: DateTime<Utc>,
    pub tenant_id: String,
    pub carrier: String,
    pub tracking_number: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipment_ref: Option<String>,
    pub status: Status,
    pub carrier_status_code: String,
    #[serde(with = "rfc3339_millis")]
    pub occurred_at: DateTime<Utc>,
    /// The raw record this event came from.
    pub source: SourceRef,
    /// The milestone the event is (or repeats), where the state tells it
    /// exactly: absent for a duplicate whose content differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub milestone_id: Option<String>,
    /// The shipment's status after the event (a prevented regression: the
    /// status kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipment_status: Option<Status>,
    /// A scan later than the shipment's delivery (never applied; see the README).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspected_false_delivery: bool,
    /// The revision emitted (revisions only).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u32,
    /// The first sighting of the entry that decided (duplicates and revisions;
    /// absent for entries written before Waymark recorded sightings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<MatchedSighting>,
}

/// Where and when the entry a decision matched was first seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchedSighting {
    /// `content_hash` or `composite_key`.
    pub entry: String,
    #[serde(with = "rfc3339_millis")]
    pub first_seen: DateTime<Utc>,
    #[serde(with = "rfc3339_millis")]
    pub expires_at: DateTime<Utc>,
    pub source: SourceRef,
}

impl DecisionRecord {
    /// `event`'s record, decided `now`; the pipeline fills in the decision
    /// and what it matched.
    pub fn draft(event: &TrackingEvent, now: DateTime<Utc>) -> Self {
        DecisionRecord {
            kind: "decision".into(),
            decision: Decision::New,
            decided_at: now,
            tenant_id: event.tenant_id.clone(),
            carrier: event.carrier.clone(),
            tracking_number: event.tracking_number.clone(),
            shipment_ref: event.shipment_ref.clone(),
            status: event.status,
            carrier_status_code: event.carrier_status_code.clone(),
            occurred_at: event.occurred_at,
            source: event.source.clone(),
            milestone_id: None,
            shipment_status: None,
            suspected_false_delivery: false,
            revision: 0,
            matched: None,
        }
    }

    /// Keyed like the output: one shipment's decisions stay in order.
    pub fn key(&self) -> String {
        shipment_key(&self.tenant_id, &self.carrier, &self.tracking_number)
    }
}

/// Most of the serialized payload string (`payload`, or `payload_base64`) a dead
/// letter carries. A dead letter must stay producible: librdkafka refuses records
/// over `message.max.bytes` (1,000,000 by default) and the worker would retry such
/// a record forever. The whole body stays in the source topic at the envelope's
/// topic, partition and offset; `payload_bytes` and `payload_blake3` identify it.
pub const DEAD_LETTER_PAYLOAD_BUDGET_BYTES: usize = 256 * 1024;
/// Most serialized bytes of the key, of each header value, of the reason, the
/// carrier and the tenant id (each may come from a header).
pub const DEAD_LETTER_FIELD_BUDGET_BYTES: usize = 4 * 1024;
/// Most serialized bytes of each header name.
pub const DEAD_LETTER_HEADER_NAME_BUDGET_BYTES: usize = 256;
/// Headers kept, in record order; the rest are dropped.
pub const DEAD_LETTER_MAX_HEADERS: usize = 64;
// Worst case: 256 KiB payload + 64 x (256 + 4 KiB) headers + 4 x 4 KiB, plus the
// topic (at most 249 characters in Kafka) and fixed fields: about 560 kB, well
// below 1,000,000 (checked by `the_worst_case_dead_letter_stays_far_below_the_producer_limit`).

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

/// The original envelope: whole when it fits the budgets above, otherwise the
/// start of each part with a flag saying so. A body that is not UTF-8 travels as
/// base64.
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
    /// Size of the original body in bytes, also when only its start is carried.
    pub payload_bytes: u64,
    /// Hex blake3 of the original body: fetch the original from topic, partition
    /// and offset and check that it is this record's body.
    pub payload_blake3: String,
    /// `payload` or `payload_base64` holds only the first bytes of the body.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub payload_truncated: bool,
    /// Headers past the first [`DEAD_LETTER_MAX_HEADERS`] were dropped, or a name
    /// or value holds only its start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub headers_truncated: bool,
    /// `key` holds only its start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub key_truncated: bool,
}

impl DeadEnvelope {
    /// Anything of the original cut to fit?
    pub fn is_truncated(&self) -> bool {
        self.payload_truncated || self.headers_truncated || self.key_truncated
    }

    /// The original record, to produce again (`waymark produce --dead-letters`).
    /// Only whole envelopes can be rebuilt; base64 parts are decoded.
    pub fn to_envelope(&self) -> Result<Envelope, String> {
        use base64::Engine;
        if self.is_truncated() {
            return Err("the dead letter holds only the start of the record: fetch the original from its topic, partition and offset".into());
        }
        let decode = |text: &str| base64::engine::general_purpose::STANDARD.decode(text).map_err(|e| format!("bad base64: {e}"));
        let text_or_b64 = |text: &str| match text.strip_prefix("base64:") {
            Some(encoded) => decode(encoded),
            None => Ok(text.as_bytes().to_vec()),
        };
        let payload = match (&self.payload, &self.payload_base64) {
            (_, Some(encoded)) => decode(encoded)?,
            (Some(text), None) => text.as_bytes().to_vec(),
            (None, None) => Vec::new(),
        };
        let mut headers = Vec::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            headers.push((name.clone(), value.as_deref().map(text_or_b64).transpose()?));
        }
        Ok(Envelope {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            headers,
            key: self.key.as_deref().map(text_or_b64).transpose()?,
            payload,
        })
    }
}

impl DeadLetter {
    pub fn new(
        envelope: &Envelope,
        error: &RecordError,
        carrier: Option<String>,
        tenant_id: Option<String>,
        now: DateTime<Utc>,
    ) -> Self {
        let (payload, payload_base64, payload_truncated) = match std::str::from_utf8(&envelope.payload) {
            Ok(text) => {
                let (text, cut) = text_within(text, DEAD_LETTER_PAYLOAD_BUDGET_BYTES);
                (Some(text.to_string()), None, cut)
            }
            Err(_) => {
                let (b64, cut) = base64_within(&envelope.payload, DEAD_LETTER_PAYLOAD_BUDGET_BYTES);
                (None, Some(b64), cut)
            }
        };
        let mut headers_truncated = envelope.headers.len() > DEAD_LETTER_MAX_HEADERS;
        let headers = envelope
            .headers
            .iter()
            .take(DEAD_LETTER_MAX_HEADERS)
            .map(|(name, value)| {
                let (name, name_cut) = text_within(name, DEAD_LETTER_HEADER_NAME_BUDGET_BYTES);
                let value = value.as_deref().map(|v| text_or_base64_within(v, DEAD_LETTER_FIELD_BUDGET_BYTES));
                headers_truncated |= name_cut || value.as_ref().is_some_and(|(_, cut)| *cut);
                (name.to_string(), value.map(|(v, _)| v))
            })
            .collect();
        let key = envelope.key.as_deref().map(|k| text_or_base64_within(k, DEAD_LETTER_FIELD_BUDGET_BYTES));
        let field = |text: &str| text_within(text, DEAD_LETTER_FIELD_BUDGET_BYTES).0.to_string();
        DeadLetter {
            kind: "dead_letter".into(),
            error_kind: error.kind().into(),
            // Display already cuts the values it quotes; this bounds the bytes.
            reason: field(&error.to_string()),
            failed_at: now,
            carrier: carrier.as_deref().map(field),
            tenant_id: tenant_id.as_deref().map(field),
            envelope: DeadEnvelope {
                topic: envelope.topic.clone(),
                partition: envelope.partition,
                offset: envelope.offset,
                timestamp_ms: envelope.timestamp_ms,
                headers,
                key_truncated: key.as_ref().is_some_and(|(_, cut)| *cut),
                key: key.map(|(k, _)| k),
                payload,
                payload_base64,
                payload_bytes: envelope.payload.len() as u64,
                payload_blake3: blake3::hash(&envelope.payload).to_hex().to_string(),
                payload_truncated,
                headers_truncated,
            },
        }
    }

    /// Output key of the dead-letter topic: where the record came from.
    pub fn key(&self) -> String {
        format!("{}:{}:{}", self.envelope.topic, self.envelope.partition, self.envelope.offset)
    }
}

/// Bytes `c` takes inside a JSON string as serde_json writes it: `"` and `\` and
/// the short escapes take 2, other control characters 6 (`\u0001`), the rest
/// their UTF-8 length.
fn json_escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
        c if c < ' ' => 6,
        c => c.len_utf8(),
    }
}

/// The longest start of `text` whose JSON-escaped form fits in `budget` bytes,
/// cut between characters, and whether it was cut.
fn text_within(text: &str, budget: usize) -> (&str, bool) {
    // No character escapes to more than 6 bytes per byte of UTF-8.
    if text.len().saturating_mul(6) <= budget {
        return (text, false);
    }
    let mut used = 0;
    for (at, c) in text.char_indices() {
        used += json_escaped_len(c);
        if used > budget {
            // `at` comes from char_indices: a char boundary.
            return (&text[..at], true);
        }
    }
    (text, false)
}

/// Base64 of the longest start of `bytes` whose encoding fits in `budget` bytes,
/// and whether it was cut. Whole 3-byte groups only, so the text decodes to
/// exactly the body's first bytes.
fn base64_within(bytes: &[u8], budget: usize) -> (String, bool) {
    use base64::Engine;
    let keep = bytes.len().min(budget / 4 * 3);
    (base64::engine::general_purpose::STANDARD.encode(&bytes[..keep]), keep < bytes.len())
}

/// A header value or key: text when UTF-8, else `base64:` + base64, within `budget`.
fn text_or_base64_within(bytes: &[u8], budget: usize) -> (String, bool) {
    const PREFIX: &str = "base64:";
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            let (text, cut) = text_within(text, budget);
            (text.to_string(), cut)
        }
        Err(_) => {
            let (b64, cut) = base64_within(bytes, budget.saturating_sub(PREFIX.len()));
            (format!("{PREFIX}{b64}"), cut)
        }
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

    #[test]
    fn shipment_keys_of_two_tenants_never_meet() {
        // The case a plain `tenant:carrier:tracking` join merges.
        let a = shipment_key("a:ups", "fedex", "123");
        let b = shipment_key("a", "ups", "fedex:123");
        assert_ne!(a, b);
        assert_eq!(a, "a%3Aups:fedex:123");
        assert_eq!(b, "a:ups:fedex:123");
        // An escape's own text in a tenant id cannot pose as an escape.
        assert_ne!(shipment_key("a%3Aups", "fedex", "123"), a);
        // Ordinary tenant ids keep the key they always had.
        assert_eq!(shipment_key("acme", "usps", "9400 1112:06"), "acme:usps:9400 1112:06");
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
            RecordError::LineTooLong { size: 2, limit: 1 },
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
            RecordError::Correction("x".into()),
            RecordError::CarrierPanic { carrier: "c".into(), message: "m".into() },
            RecordError::Internal("m".into()),
        ];
        for error in &all {
            match error {
                RecordError::TooLarge { .. }
                | RecordError::LineTooLong { .. }
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
                | RecordError::Correction(_)
                | RecordError::CarrierPanic { .. }
                | RecordError::Internal(_) => {}
            }
        }
        all
    }

    fn serialized_len(dead: &DeadLetter) -> usize {
        serde_json::to_vec(dead).unwrap().len()
    }

    fn json_len(text: &str) -> usize {
        serde_json::to_string(text).unwrap().len() - 2
    }

    fn blake3_hex(bytes: &[u8]) -> String {
        blake3::hash(bytes).to_hex().to_string()
    }

    fn dead_letter(envelope: &Envelope) -> DeadLetter {
        DeadLetter::new(envelope, &RecordError::InvalidJson("x".into()), Some("usps".into()), Some("acme".into()), now())
    }

    /// A text body over the budget keeps its first characters (cut between two,
    /// never inside one), its size and its hash.
    fn assert_text_cut(body: &[u8]) {
        let dead = dead_letter(&envelope(body.to_vec()));
        assert!(serialized_len(&dead) < 600_000, "{} bytes", serialized_len(&dead));
        let out = &dead.envelope;
        assert!(out.payload_truncated && !out.headers_truncated && !out.key_truncated);
        assert_eq!((out.payload_bytes, out.payload_blake3.as_str()), (body.len() as u64, blake3_hex(body).as_str()));
        let payload = out.payload.as_deref().unwrap();
        assert!(body.starts_with(payload.as_bytes()));
        let escaped = json_len(payload);
        assert!(escaped <= DEAD_LETTER_PAYLOAD_BUDGET_BYTES && escaped + 6 > DEAD_LETTER_PAYLOAD_BUDGET_BYTES, "{escaped}");
        assert_valid(&dead_letter_schema(), &dead);
    }

    #[test]
    fn a_large_text_body_is_cut_at_a_character_with_its_size_and_hash() {
        let mut body = br#"{"trackingNumber": ""#.to_vec();
        body.extend("a€".repeat(300_000).as_bytes());
        body.extend(br#""}"#);
        assert!(body.len() > 1_200_000);
        assert_text_cut(&body);
    }

    /// JSON escaping doubles a `"` and makes a control character six bytes: the
    /// budget is on the serialized string, not on the body's bytes.
    #[test]
    fn escaped_characters_count_at_their_serialized_size() {
        assert_text_cut(&vec![b'"'; 300_000]);
        assert_text_cut(&vec![b'\\'; 300_000]);
        assert_text_cut(&vec![1u8; 300_000]);
        assert_text_cut("\n\"€\u{7}".repeat(100_000).as_bytes());
    }

    #[test]
    fn a_large_binary_body_keeps_a_decodable_prefix_with_its_size_and_hash() {
        use base64::Engine;
        let body: Vec<u8> = (0..800_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        assert!(std::str::from_utf8(&body).is_err());
        let dead = dead_letter(&envelope(body.clone()));
        assert!(serialized_len(&dead) < 600_000, "{} bytes", serialized_len(&dead));
        let out = &dead.envelope;
        assert!(out.payload_truncated && out.payload.is_none());
        assert_eq!((out.payload_bytes, out.payload_blake3.as_str()), (800_000, blake3_hex(&body).as_str()));
        let b64 = out.payload_base64.as_deref().unwrap();
        assert!(b64.len() <= DEAD_LETTER_PAYLOAD_BUDGET_BYTES && b64.len() + 4 > DEAD_LETTER_PAYLOAD_BUDGET_BYTES);
        let prefix = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        assert!(body.starts_with(&prefix));
        assert_valid(&dead_letter_schema(), &dead);
    }

    #[test]
    fn a_small_body_is_whole_and_only_gains_its_size_and_hash() {
        let body = r#"{"trackingNumber": "9400111206213859014819", "note": "\"quoted\" €"}"#.as_bytes().to_vec();
        let dead = dead_letter(&envelope(body.clone()));
        let out = &dead.envelope;
        assert_eq!(out.payload.as_deref().map(str::as_bytes), Some(&body[..]));
        assert_eq!((out.payload_bytes, out.payload_blake3.as_str()), (body.len() as u64, blake3_hex(&body).as_str()));
        assert_eq!(out.headers, vec![("tenant-id".to_string(), Some("acme".to_string())), ("trace".to_string(), None)]);
        assert_eq!(out.key.as_deref(), Some("9400111206213859014819"));
        let json = serde_json::to_value(&dead).unwrap();
        for flag in ["payload_truncated", "headers_truncated", "key_truncated"] {
            assert!(json["envelope"].get(flag).is_none(), "{flag} present on an untrimmed dead letter");
        }
        assert_valid(&dead_letter_schema(), &dead);
        let binary = dead_letter(&envelope(vec![0xff, 0xfe]));
        assert_eq!(binary.envelope.payload_base64.as_deref(), Some("//4="));
        assert!(!binary.envelope.payload_truncated);
    }

    /// Everything at once, as large as Kafka lets it be: many huge headers (text
    /// and binary), a huge key, carrier and tenant, an escaping-heavy body.
    #[test]
    fn the_worst_case_dead_letter_stays_far_below_the_producer_limit() {
        let mut env = envelope("\u{1}".repeat(1_000_000).into_bytes());
        env.topic = "t".repeat(249);
        env.headers = (0..1_000)
            .map(|i| {
                let value = if i % 2 == 0 { "\"".repeat(100_000).into_bytes() } else { vec![0xff; 100_000] };
                ("\u{1}".repeat(10_000 + i), Some(value))
            })
            .collect();
        env.key = Some(vec![0xfe; 1_000_000]);
        let huge = "\u{1}".repeat(1_000_000);
        let error = RecordError::UnknownCarrier(huge.clone());
        let dead = DeadLetter::new(&env, &error, Some(huge.clone()), Some(huge), now());
        let size = serialized_len(&dead);
        println!("worst-case dead letter: {size} bytes");
        assert!(size < 600_000, "{size} bytes");
        let out = &dead.envelope;
        assert!(out.payload_truncated && out.headers_truncated && out.key_truncated);
        assert_eq!(out.headers.len(), DEAD_LETTER_MAX_HEADERS);
        for (name, value) in &out.headers {
            assert!(json_len(name) <= DEAD_LETTER_HEADER_NAME_BUDGET_BYTES);
            assert!(json_len(value.as_deref().unwrap()) <= DEAD_LETTER_FIELD_BUDGET_BYTES);
        }
        assert!(out.headers[1].1.as_deref().unwrap().starts_with("base64:"));
        assert!(json_len(out.key.as_deref().unwrap()) <= DEAD_LETTER_FIELD_BUDGET_BYTES);
        for text in [&dead.reason, dead.carrier.as_ref().unwrap(), dead.tenant_id.as_ref().unwrap()] {
            assert!(json_len(text) <= DEAD_LETTER_FIELD_BUDGET_BYTES);
        }
        assert_valid(&dead_letter_schema(), &dead);
    }

    /// `RecordError::KINDS` (the metric label's closed set) lists exactly the kinds
    /// errors have, and the schema's `error_kind` enum is that list.
    #[test]
    fn error_kinds_schema_and_label_set_agree() {
        let mut kinds: Vec<&str> = one_of_each_kind().iter().map(RecordError::kind).collect();
        // Two variants share `internal_error` (a carrier's panic, any other defect).
        kinds.dedup();
        assert_eq!(kinds, RecordError::KINDS);
        let schema = schema_file("dead-letter.schema.json");
        let listed: Vec<&str> =
            schema["properties"]["error_kind"]["enum"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
        assert_eq!(listed, RecordError::KINDS);
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
