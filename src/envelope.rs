//! The record envelope: a raw carrier body plus the Kafka
//! metadata around it, whether it came from a live topic or a `kcat -C -J` archive.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::error::RecordError;
use crate::event::SourceRef;

/// One raw record, as read from Kafka or an archive line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Kafka record timestamp (ms since epoch), if the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// Headers in record order; a header may repeat or carry no value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Never trusted for identity; carried only into dead letters.
    pub key: Option<Vec<u8>>,
    /// The webhook body exactly as the carrier sent it.
    pub payload: Vec<u8>,
}

impl Envelope {
    /// Last value of a header, if present (later headers win, as in most clients).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_deref())
    }

    pub fn source(&self) -> SourceRef {
        SourceRef { topic: self.topic.clone(), partition: self.partition, offset: self.offset }
    }

    /// Parse one line of a `kcat -C -J` archive.
    pub fn from_kcat_json(line: &str) -> Result<Envelope, RecordError> {
        let raw: KcatRecord =
            serde_json::from_str(line).map_err(|e| RecordError::InvalidEnvelope(e.to_string()))?;
        if raw.headers.len() % 2 != 0 {
            return Err(RecordError::InvalidEnvelope(
                "headers must be a flat [name, value, ...] array of even length".into(),
            ));
        }
        let mut headers = Vec::with_capacity(raw.headers.len() / 2);
        for pair in raw.headers.chunks(2) {
            let name = pair[0]
                .clone()
                .ok_or_else(|| RecordError::InvalidEnvelope("a header name is null".into()))?;
            headers.push((name, pair[1].clone().map(String::into_bytes)));
        }
        let base64 = |field: &str, text: String| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|e| RecordError::InvalidEnvelope(format!("`{field}` is not base64: {e}")))
        };
        let key = match raw.key_base64 {
            Some(encoded) => Some(base64("key_base64", encoded)?),
            None => raw.key.map(String::into_bytes),
        };
        let payload = match raw.payload_base64 {
            Some(encoded) => base64("payload_base64", encoded)?,
            None => raw.payload.map(String::into_bytes).unwrap_or_default(),
        };
        Ok(Envelope { topic: raw.topic, partition: raw.partition, offset: raw.offset, timestamp_ms: raw.ts, headers, key, payload })
    }

    /// Render in `kcat -C -J` form (used by tests and the load generator). A key
    /// or body that is not UTF-8 goes to `key_base64` / `payload_base64` (our
    /// extension: kcat itself has no lossless form for it), so it survives.
    pub fn to_kcat_json(&self) -> String {
        use base64::Engine;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let mut headers = Vec::with_capacity(self.headers.len() * 2);
        for (k, v) in &self.headers {
            headers.push(Some(k.clone()));
            headers.push(v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()));
        }
        let record = KcatRecord {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            tstype: Some("create".into()),
            ts: self.timestamp_ms,
            broker: None,
            headers,
            key: self.key.as_ref().and_then(|k| std::str::from_utf8(k).ok().map(str::to_string)),
            key_base64: self.key.as_ref().filter(|k| std::str::from_utf8(k).is_err()).map(|k| b64(k)),
            payload: std::str::from_utf8(&self.payload).ok().map(str::to_string),
            payload_base64: std::str::from_utf8(&self.payload).is_err().then(|| b64(&self.payload)),
        };
        serde_json::to_string(&record).unwrap_or_default()
    }
}

/// The line format `kcat -C -J` writes.
#[derive(Debug, Serialize, Deserialize)]
struct KcatRecord {
    topic: String,
    partition: i32,
    offset: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tstype: Option<String>,
    #[serde(default)]
    ts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    broker: Option<i32>,
    #[serde(default)]
    headers: Vec<Option<String>>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    payload: Option<String>,
    /// Not kcat's: a key that is not UTF-8, base64 (written by Waymark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_base64: Option<String>,
    /// Not kcat's: a body that is not UTF-8, base64 (written by Waymark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

/// How envelope metadata turns into tenant and carrier (config `[tenancy]` and `[topics]`).
#[derive(Debug, Clone)]
pub struct EnvelopeRules {
    /// Explicit topic -> carrier map; otherwise the `tracking.raw.<carrier>` convention.
    pub topic_carriers: BTreeMap<String, String>,
    /// Reject records without a `tenant-id` header instead of using the default tenant.
    pub require_tenant: bool,
    pub default_tenant: String,
}

impl Default for EnvelopeRules {
    fn default() -> Self {
        EnvelopeRules { topic_carriers: BTreeMap::new(), require_tenant: false, default_tenant: "default".into() }
    }
}

/// Tenant, carrier and arrival time of one record, resolved from its envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordContext {
    pub tenant_id: String,
    pub carrier: String,
    pub received_at: DateTime<Utc>,
}

/// Topic naming convention for raw carrier topics.
pub const RAW_TOPIC_PREFIX: &str = "tracking.raw.";

impl EnvelopeRules {
    /// Resolve tenant, carrier and received_at. `now` (the injected clock) is the
    /// fallback arrival time when neither a header nor a Kafka timestamp says it.
    pub fn resolve(&self, env: &Envelope, now: DateTime<Utc>) -> Result<RecordContext, RecordError> {
        let tenant_id = match env.header("tenant-id") {
            Some(raw) => {
                let value = header_text("tenant-id", raw)?;
                if value.is_empty() {
                    return Err(RecordError::InvalidHeader { name: "tenant-id".into(), reason: "empty".into() });
                }
                value.to_string()
            }
            None if self.require_tenant => return Err(RecordError::MissingTenant),
            None => self.default_tenant.clone(),
        };
        let carrier = match env.header("carrier") {
            Some(raw) => normalize_carrier_name(header_text("carrier", raw)?),
            None => self.carrier_for_topic(&env.topic).ok_or_else(|| {
                RecordError::UnknownCarrier(format!(
                    "topic `{}` is not mapped in [topics] and does not follow `{RAW_TOPIC_PREFIX}<carrier>`, and the record has no `carrier` header",
                    env.topic
                ))
            })?,
        };
        if carrier.is_empty() {
            return Err(RecordError::InvalidHeader { name: "carrier".into(), reason: "empty".into() });
        }
        let received_at = match env.header("received-at") {
            Some(raw) => parse_received_at(header_text("received-at", raw)?)?,
            None => env
                .timestamp_ms
                .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
                .unwrap_or(now),
        };
        Ok(RecordContext { tenant_id, carrier, received_at })
    }

    /// The carrier a topic carries, by explicit map first, then by convention.
    pub fn carrier_for_topic(&self, topic: &str) -> Option<String> {
        if let Some(carrier) = self.topic_carriers.get(topic) {
            return Some(normalize_carrier_name(carrier));
        }
        topic
            .strip_prefix(RAW_TOPIC_PREFIX)
            .filter(|rest| !rest.is_empty())
            .map(normalize_carrier_name)
    }
}

fn normalize_carrier_name(name: &str) -> String {
    name.trim().to_ascii_lowercase()
}

fn header_text<'a>(name: &str, raw: &'a [u8]) -> Result<&'a str, RecordError> {
    std::str::from_utf8(raw)
        .map(str::trim)
        .map_err(|_| RecordError::InvalidHeader { name: name.into(), reason: "not UTF-8".into() })
}

/// `received-at` is RFC 3339 or epoch milliseconds.
fn parse_received_at(text: &str) -> Result<DateTime<Utc>, RecordError> {
    if let Ok(ms) = text.parse::<i64>() {
        return Utc.timestamp_millis_opt(ms).single().ok_or_else(|| RecordError::InvalidHeader {
            name: "received-at".into(),
            reason: format!("epoch milliseconds {ms} out of range"),
        });
    }
    DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc)).map_err(|e| RecordError::InvalidHeader {
        name: "received-at".into(),
        reason: format!("`{}` is neither RFC 3339 nor epoch milliseconds: {e}", crate::error::clip(text)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(topic: &str, headers: &[(&str, &str)]) -> Envelope {
        Envelope {
            topic: topic.into(),
            partition: 0,
            offset: 7,
            timestamp_ms: Some(1_700_000_000_000),
            headers: headers.iter().map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec()))).collect(),
            key: None,
            payload: b"{}".to_vec(),
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_800_000_000_000).unwrap()
    }

    #[test]
    fn kcat_line_round_trips() {
        let line = r#"{"topic":"tracking.raw.ups","partition":0,"offset":42,"tstype":"create","ts":1700000000000,"broker":0,"headers":["tenant-id","acme","carrier","ups"],"key":"1Z999AA10123456784","payload":"{\"a\":1}"}"#;
        let env = Envelope::from_kcat_json(line).unwrap();
        assert_eq!(env.offset, 42);
        assert_eq!(env.header("tenant-id"), Some(&b"acme"[..]));
        assert_eq!(env.payload, br#"{"a":1}"#);
        let again = Envelope::from_kcat_json(&env.to_kcat_json()).unwrap();
        assert_eq!(again, env);
    }

    #[test]
    fn non_utf8_keys_and_bodies_survive_the_archive_line() {
        let env = Envelope {
            topic: "t".into(),
            partition: 1,
            offset: 7,
            timestamp_ms: Some(5),
            headers: vec![("tenant-id".into(), Some(b"acme".to_vec()))],
            key: Some(vec![0xff, 0x00, 0x80]),
            payload: vec![0x1f, 0x8b, 0x08, 0x00, 0xfe],
        };
        let line = env.to_kcat_json();
        assert!(line.contains("payload_base64") && line.contains("key_base64"), "{line}");
        assert_eq!(Envelope::from_kcat_json(&line).unwrap(), env);
        let bad = r#"{"topic":"t","partition":0,"offset":1,"payload_base64":"%%%"}"#;
        assert!(Envelope::from_kcat_json(bad).unwrap_err().to_string().contains("payload_base64"));
    }

    #[test]
    fn odd_header_array_is_rejected() {
        let line = r#"{"topic":"t","partition":0,"offset":1,"headers":["tenant-id"],"payload":"{}"}"#;
        assert_eq!(Envelope::from_kcat_json(line).unwrap_err().kind(), "invalid_envelope");
    }

    #[test]
    fn tenant_defaults_unless_required() {
        let rules = EnvelopeRules::default();
        let ctx = rules.resolve(&envelope("tracking.raw.easypost", &[]), now()).unwrap();
        assert_eq!(ctx.tenant_id, "default");
        assert_eq!(ctx.carrier, "easypost");
        assert_eq!(ctx.received_at.timestamp_millis(), 1_700_000_000_000);
        let strict = EnvelopeRules { require_tenant: true, ..EnvelopeRules::default() };
        assert_eq!(strict.resolve(&envelope("tracking.raw.easypost", &[]), now()), Err(RecordError::MissingTenant));
    }

    #[test]
    fn carrier_header_beats_topic_and_map_beats_convention() {
        let mut rules = EnvelopeRules::default();
        rules.topic_carriers.insert("webhooks.in".into(), "UPS".into());
        assert_eq!(rules.resolve(&envelope("webhooks.in", &[]), now()).unwrap().carrier, "ups");
        let ctx = rules.resolve(&envelope("webhooks.in", &[("carrier", " FedEx ")]), now()).unwrap();
        assert_eq!(ctx.carrier, "fedex");
        let err = rules.resolve(&envelope("random", &[]), now()).unwrap_err();
        assert_eq!(err.kind(), "unknown_carrier");
    }

    #[test]
    fn received_at_header_forms() {
        let rules = EnvelopeRules::default();
        let a = rules.resolve(&envelope("tracking.raw.ups", &[("received-at", "1700000000123")]), now()).unwrap();
        assert_eq!(a.received_at.timestamp_millis(), 1_700_000_000_123);
        let b = rules
            .resolve(&envelope("tracking.raw.ups", &[("received-at", "2023-11-14T22:13:20+01:00")]), now())
            .unwrap();
        assert_eq!(b.received_at.timestamp(), 1_699_996_400);
        let bad = rules.resolve(&envelope("tracking.raw.ups", &[("received-at", "yesterday")]), now());
        assert_eq!(bad.unwrap_err().kind(), "invalid_header");
    }
}
