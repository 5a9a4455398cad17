//! Corrections: an operator, or their automation, retracts a milestone the
//! carrier got wrong (a parcel scanned as delivered by mistake, then scanned
//! again in transit). A correction is a record on the control topic
//! (`kafka.control_topic`, schemas/correction.schema.json), written by
//! `waymark correct` or by anything that writes JSON to Kafka. It goes through
//! the same pipeline as tracking events: routed to its shipment's home
//! partition, applied there in order with the shipment's events, against the
//! same state and changelog (so every instance agrees, and exactly once in
//! `exactly-once` mode). Applying one marks the milestone's dedupe entry
//! retracted (the scan re-sent later stays a duplicate), recomputes the
//! shipment's status from its remaining milestones, and emits a
//! `retract_milestone` upsert that carries who asked, when and why.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::RecordError;
use crate::event::rfc3339_millis;

/// Longest `reason` and `requested_by`, in bytes: an audit note, not a document.
pub const MAX_NOTE_BYTES: usize = 1024;

/// What a correction does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Withdraw one milestone: downstream removes it, the shipment's status
    /// becomes what its remaining milestones give.
    Retract,
}

/// One correction record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Correction {
    /// Always `correction`.
    pub kind: String,
    pub action: Action,
    pub tenant_id: String,
    pub carrier: String,
    pub tracking_number: String,
    /// The milestone to act on, as its upsert named it (64 hex digits).
    pub milestone_id: String,
    /// Why, for the audit trail (in the retraction upsert and the log).
    pub reason: String,
    /// Who asked (a person or a system).
    pub requested_by: String,
    #[serde(with = "rfc3339_millis")]
    pub requested_at: DateTime<Utc>,
}

impl Correction {
    /// A retraction of `milestone_id` of the shipment `(tenant, carrier, tracking)`.
    pub fn retract(tenant_id: &str, carrier: &str, tracking_number: &str, milestone_id: &str, reason: &str, requested_by: &str, requested_at: DateTime<Utc>) -> Correction {
        Correction {
            kind: "correction".into(),
            action: Action::Retract,
            tenant_id: tenant_id.into(),
            carrier: carrier.to_ascii_lowercase(),
            tracking_number: tracking_number.into(),
            milestone_id: milestone_id.to_ascii_lowercase(),
            reason: reason.into(),
            requested_by: requested_by.into(),
            requested_at,
        }
    }

    /// Is this a correction Waymark can act on? Every field named, the id a
    /// milestone id, the notes bounded.
    pub fn check(&self) -> Result<(), RecordError> {
        if self.kind != "correction" {
            return Err(RecordError::Correction(format!("`kind` is `{}`, not `correction`", self.kind)));
        }
        for (field, value) in [("tenant_id", &self.tenant_id), ("carrier", &self.carrier), ("tracking_number", &self.tracking_number), ("reason", &self.reason), ("requested_by", &self.requested_by)] {
            if value.trim().is_empty() {
                return Err(RecordError::MissingField(field.into()));
            }
        }
        for (field, value) in [("reason", &self.reason), ("requested_by", &self.requested_by)] {
            if value.len() > MAX_NOTE_BYTES {
                return Err(RecordError::Correction(format!("`{field}` is {} bytes long; at most {MAX_NOTE_BYTES}", value.len())));
            }
        }
        if self.milestone_id.len() != 64 || !self.milestone_id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(RecordError::Correction(format!("`milestone_id` `{}` is not a milestone id (64 lower-case hex digits, as the upsert gave it)", self.milestone_id)));
        }
        Ok(())
    }

    /// The milestone id's bytes, as dedupe entries keep them.
    pub fn milestone_bytes(&self) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(self.milestone_id.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    }
}

/// Read a control-topic record's body as a correction.
pub fn parse(body: &[u8]) -> Result<Correction, RecordError> {
    let correction: Correction = serde_json::from_slice(body).map_err(|e| RecordError::Correction(format!("not a correction record: {e}")))?;
    correction.check()?;
    Ok(correction)
}

/// Who asked, when and why: what a retraction upsert carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retraction {
    pub reason: String,
    pub requested_by: String,
    #[serde(with = "rfc3339_millis")]
    pub requested_at: DateTime<Utc>,
}

impl From<&Correction> for Retraction {
    fn from(c: &Correction) -> Self {
        Retraction { reason: c.reason.clone(), requested_by: c.requested_by.clone(), requested_at: c.requested_at }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn sample() -> Correction {
        let at = Utc.with_ymd_and_hms(2026, 12, 7, 9, 0, 0).unwrap();
        Correction::retract("acme", "USPS", "9400", &"ab".repeat(32), "mis-scanned as delivered", "ops@acme", at)
    }

    #[test]
    fn a_correction_reads_back_as_written_and_names_its_milestone() {
        let correction = sample();
        let body = serde_json::to_vec(&correction).unwrap();
        assert_eq!(parse(&body).unwrap(), correction);
        assert_eq!(correction.carrier, "usps");
        assert_eq!(correction.milestone_bytes(), Some([0xab; 32]));
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((json["kind"].as_str(), json["action"].as_str()), (Some("correction"), Some("retract")));
    }

    #[test]
    fn corrections_that_cannot_be_acted_on_are_refused_with_the_reason() {
        let mut short = sample();
        short.milestone_id = "abc".into();
        assert!(short.check().unwrap_err().to_string().contains("milestone id"));
        let mut silent = sample();
        silent.reason = " ".into();
        assert_eq!(silent.check().unwrap_err().kind(), "missing_field");
        let mut long = sample();
        long.reason = "x".repeat(MAX_NOTE_BYTES + 1);
        assert_eq!(long.check().unwrap_err().kind(), "invalid_correction");
        assert_eq!(parse(b"{\"kind\":\"correction\"}").unwrap_err().kind(), "invalid_correction");
        assert_eq!(parse(b"{").unwrap_err().kind(), "invalid_correction");
    }
}
