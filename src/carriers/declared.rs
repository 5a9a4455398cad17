//! User-declared carriers: a TOML mapping that turns an unknown carrier's JSON into
//! canonical events without writing Rust.
//!
//! ```toml
//! name = "nordpost"                       # lower case; used in topics, headers, metrics
//! tracking_number = "/consignment/number" # JSON pointers (RFC 6901) into the body
//! shipment_ref = "/consignment/id"        # optional
//! events = "/consignment/scans"           # the history array
//! time_format = "%Y%m%d %H%M%S"           # rfc3339 | naive_utc | epoch_seconds | epoch_millis | strftime
//! default_status = "unknown"              # for codes not in [codes] (default "unknown")
//!
//! [event]                                 # pointers relative to one history entry
//! code = "/code"
//! sub_code = "/reason"                    # optional, and so is everything below
//! description = "/text"
//! time = "/stamp"
//! city = "/site/town"
//! region = "/site/county"
//! postal_code = "/site/zip"
//! country = "/site/cc"                    # ISO 3166-1 alpha-2; other values are dropped
//! id = "/scan_id"                         # the carrier's event id (volatile)
//!
//! [codes]                                 # code -> canonical status name
//! "10" = "label_created"
//! "20" = "picked_up"
//! ```
//!
//! Rules, the same as for the built-in carriers:
//! - Text fields accept JSON strings (trimmed; blank is absent) and numbers (their
//!   decimal text), since carriers flip between the two; other types are an error.
//!   A code is matched against `[codes]` exactly as written (after trimming).
//! - The tracking number, the history array, and each entry's code and time are
//!   required: a body without them is dead-lettered with the JSON pointer of the
//!   missing field. A missing history is an error rather than "no events" so that a
//!   mistyped pointer fails loudly instead of silently dropping every body. An empty
//!   array is no events.
//! - `time_format`: `rfc3339` honours offsets and reads a time without one as UTC,
//!   flagged (`time_assumed_utc`); `naive_utc` is for carriers that send local times
//!   without a zone: read as UTC and flagged, and a value that does carry an offset
//!   is rejected, since it means the mapping does not describe the body; `epoch_*`
//!   take a number or numeric string; anything containing `%` is a chrono strftime
//!   pattern, flagged unless it parses an offset (`%z`).
//! - The raw code goes verbatim into `carrier_status_code`, the sub-code into
//!   `carrier_status_detail`.
//!
//! The mapping is validated when it is loaded (configuration time), so a bad
//! pointer or status name stops start-up with the file and key to fix instead of
//! dead-lettering every record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

use super::json::country_code;
use super::time::{parse_iso, Instant};
use super::Carrier;
use crate::error::RecordError;
use crate::event::{CarrierEvent, Location, Status};

/// Why a mapping was refused. Each message names the key to fix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MappingError {
    #[error("{0}")]
    Toml(String),
    #[error("`name` is empty")]
    EmptyName,
    #[error("`name = \"{0}\"`: use lower-case ASCII letters, digits, `-`, `_` or `.` (the name appears in topics, headers and metric labels)")]
    BadName(String),
    #[error("`name = \"{0}\"` is a built-in carrier; a declared carrier needs a name of its own")]
    BuiltinName(String),
    #[error("`{key} = \"{pointer}\"` is not a JSON pointer (RFC 6901): {reason}")]
    BadPointer { key: String, pointer: String, reason: &'static str },
    #[error("`{key} = \"{value}\"` is not a canonical status (one of: {known})")]
    UnknownStatus { key: String, value: String, known: String },
    #[error("`[codes]` has an empty code; a blank code in a body counts as missing, so it can never match")]
    EmptyCode,
    #[error("`time_format = \"{value}\"`: {reason}")]
    BadTimeFormat { value: String, reason: String },
}

/// A mapping file that could not be used. The cause is part of the message (and
/// deliberately not an error `source`, which `{:#}` would print a second time).
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot read carrier mapping {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    #[error("carrier mapping {} is invalid: {error}", path.display())]
    Invalid { path: PathBuf, error: MappingError },
}

/// The mapping file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapping {
    name: String,
    tracking_number: String,
    #[serde(default)]
    shipment_ref: Option<String>,
    events: String,
    #[serde(default = "default_time_format")]
    time_format: String,
    #[serde(default)]
    default_status: Option<String>,
    event: RawEventFields,
    #[serde(default)]
    codes: BTreeMap<String, String>,
}

fn default_time_format() -> String {
    "rfc3339".into()
}

/// `[event]`: pointers relative to one history entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEventFields {
    code: String,
    #[serde(default)]
    sub_code: Option<String>,
    #[serde(default)]
    description: Option<String>,
    time: String,
    #[serde(default)]
    city: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    postal_code: Option<String>,
    #[serde(default)]
    country: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

/// A syntactically valid RFC 6901 pointer (`""` is the value itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer(String);

impl Pointer {
    pub fn parse(key: &str, text: &str) -> Result<Pointer, MappingError> {
        let bad = |reason| MappingError::BadPointer { key: key.into(), pointer: text.into(), reason };
        if !text.is_empty() && !text.starts_with('/') {
            return Err(bad("it must be empty or start with `/` (write `/tracking/number`, not `tracking.number`)"));
        }
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
                return Err(bad("`~` must be followed by `0` (for `~`) or `1` (for `/`)"));
            }
        }
        Ok(Pointer(text.to_string()))
    }

    /// The value it points at; `null` counts as absent.
    fn find<'a>(&self, value: &'a Value) -> Option<&'a Value> {
        value.pointer(&self.0).filter(|v| !v.is_null())
    }
}

impl std::fmt::Display for Pointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a declared carrier writes its event times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeFormat {
    Rfc3339,
    NaiveUtc,
    EpochSeconds,
    EpochMillis,
    /// A chrono strftime pattern.
    Strftime(String),
}

impl TimeFormat {
    pub fn parse(text: &str) -> Result<TimeFormat, MappingError> {
        let format = match text {
            "rfc3339" => TimeFormat::Rfc3339,
            "naive_utc" => TimeFormat::NaiveUtc,
            "epoch_seconds" => TimeFormat::EpochSeconds,
            "epoch_millis" => TimeFormat::EpochMillis,
            pattern if pattern.contains('%') => {
                if StrftimeItems::new(pattern).any(|item| matches!(item, Item::Error)) {
                    return Err(MappingError::BadTimeFormat {
                        value: text.into(),
                        reason: "not a valid chrono strftime pattern (see https://docs.rs/chrono/latest/chrono/format/strftime/)".into(),
                    });
                }
                TimeFormat::Strftime(pattern.to_string())
            }
            _ => {
                return Err(MappingError::BadTimeFormat {
                    value: text.into(),
                    reason: "use rfc3339, naive_utc, epoch_seconds, epoch_millis or a strftime pattern such as \"%Y%m%d %H%M%S\"".into(),
                })
            }
        };
        Ok(format)
    }

    /// One event time to UTC. `field` is the JSON pointer named in errors.
    fn read(&self, field: &str, value: &Value) -> Result<Instant, RecordError> {
        let invalid = |shown: String, reason: String| RecordError::InvalidTimestamp { field: field.into(), value: shown, reason };
        match self {
            TimeFormat::Rfc3339 => parse_iso(field, &time_text(field, value)?),
            TimeFormat::NaiveUtc => {
                let text = time_text(field, value)?;
                let instant = parse_iso(field, &text)?;
                if !instant.assumed_utc {
                    return Err(invalid(text, "time_format naive_utc expects a local time without an offset".into()));
                }
                Ok(instant)
            }
            TimeFormat::EpochSeconds | TimeFormat::EpochMillis => {
                let per_second = if *self == TimeFormat::EpochSeconds { 1000.0 } else { 1.0 };
                let number = match value {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => s.trim().parse::<f64>().ok(),
                    _ => return Err(RecordError::WrongType { field: field.into(), expected: "number" }),
                };
                let shown = match value {
                    Value::String(s) => s.trim().to_string(),
                    other => other.to_string(),
                };
                let millis = number
                    .filter(|n| n.is_finite())
                    .map(|n| (n * per_second).round())
                    // i64 range check before the cast, which would otherwise saturate.
                    .filter(|ms| ms.abs() < 9.0e15)
                    .ok_or_else(|| invalid(shown.clone(), "expected a Unix timestamp".into()))?;
                let utc = Utc
                    .timestamp_millis_opt(millis as i64)
                    .single()
                    .ok_or_else(|| invalid(shown, "outside the representable range".into()))?;
                Ok(Instant { utc, assumed_utc: false })
            }
            TimeFormat::Strftime(pattern) => {
                let text = time_text(field, value)?;
                if let Ok(t) = DateTime::parse_from_str(&text, pattern) {
                    return Ok(Instant { utc: t.with_timezone(&Utc), assumed_utc: false });
                }
                if let Ok(naive) = NaiveDateTime::parse_from_str(&text, pattern) {
                    return Ok(Instant { utc: Utc.from_utc_datetime(&naive), assumed_utc: true });
                }
                // A date-only pattern: midnight of that date, like date-only ISO times.
                if let Some(naive) = NaiveDate::parse_from_str(&text, pattern).ok().and_then(|d| d.and_hms_opt(0, 0, 0)) {
                    return Ok(Instant { utc: Utc.from_utc_datetime(&naive), assumed_utc: true });
                }
                Err(invalid(text, format!("does not match time_format \"{pattern}\"")))
            }
        }
    }
}

/// A time given as text (a number is taken as its decimal text, e.g. `20251104`).
fn time_text(field: &str, value: &Value) -> Result<String, RecordError> {
    match value {
        Value::String(s) => Ok(s.trim().to_string()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(RecordError::WrongType { field: field.into(), expected: "string" }),
    }
}

/// Optional text at `pointer` under `value`: absent, null or blank is `None`.
fn text(value: &Value, pointer: &Pointer, field: &str) -> Result<Option<String>, RecordError> {
    match pointer.find(value) {
        None => Ok(None),
        Some(Value::String(s)) => {
            let trimmed = s.trim();
            Ok((!trimmed.is_empty()).then(|| trimmed.to_string()))
        }
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(RecordError::WrongType { field: field.into(), expected: "string" }),
    }
}

fn opt_text(value: &Value, pointer: Option<&Pointer>, base: &str) -> Result<Option<String>, RecordError> {
    match pointer {
        Some(p) => text(value, p, &format!("{base}{p}")),
        None => Ok(None),
    }
}

/// `[event]`, validated.
#[derive(Debug, Clone)]
struct EventFields {
    code: Pointer,
    sub_code: Option<Pointer>,
    description: Option<Pointer>,
    time: Pointer,
    city: Option<Pointer>,
    region: Option<Pointer>,
    postal_code: Option<Pointer>,
    country: Option<Pointer>,
    id: Option<Pointer>,
}

/// A carrier described by a mapping file.
#[derive(Debug, Clone)]
pub struct DeclaredCarrier {
    name: String,
    tracking_number: Pointer,
    shipment_ref: Option<Pointer>,
    events: Pointer,
    fields: EventFields,
    time_format: TimeFormat,
    codes: BTreeMap<String, Status>,
    default_status: Status,
}

impl DeclaredCarrier {
    /// Read and validate a mapping file.
    pub fn from_file(path: &Path) -> Result<DeclaredCarrier, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|error| LoadError::Read { path: path.into(), error })?;
        DeclaredCarrier::from_toml(&text).map_err(|error| LoadError::Invalid { path: path.into(), error })
    }

    /// Parse and validate a mapping.
    pub fn from_toml(text: &str) -> Result<DeclaredCarrier, MappingError> {
        let raw: RawMapping = toml::from_str(text).map_err(|e| MappingError::Toml(e.to_string().trim_end().to_string()))?;
        let name = raw.name.trim().to_string();
        if name.is_empty() {
            return Err(MappingError::EmptyName);
        }
        if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')) {
            return Err(MappingError::BadName(name));
        }
        if super::CarrierRegistry::builtin().get(&name).is_some() {
            return Err(MappingError::BuiltinName(name));
        }
        let optional = |key: &str, p: &Option<String>| p.as_deref().map(|p| Pointer::parse(key, p)).transpose();
        let e = &raw.event;
        let fields = EventFields {
            code: Pointer::parse("event.code", &e.code)?,
            sub_code: optional("event.sub_code", &e.sub_code)?,
            description: optional("event.description", &e.description)?,
            time: Pointer::parse("event.time", &e.time)?,
            city: optional("event.city", &e.city)?,
            region: optional("event.region", &e.region)?,
            postal_code: optional("event.postal_code", &e.postal_code)?,
            country: optional("event.country", &e.country)?,
            id: optional("event.id", &e.id)?,
        };
        let status = |key: String, value: &str| {
            Status::parse(value.trim()).ok_or_else(|| MappingError::UnknownStatus {
                key,
                value: value.into(),
                known: Status::ALL.map(Status::as_str).join(", "),
            })
        };
        let mut codes = BTreeMap::new();
        for (code, name) in &raw.codes {
            let code = code.trim();
            if code.is_empty() {
                return Err(MappingError::EmptyCode);
            }
            codes.insert(code.to_string(), status(format!("codes.\"{code}\""), name)?);
        }
        let default_status = match &raw.default_status {
            Some(value) => status("default_status".into(), value)?,
            None => Status::Unknown,
        };
        Ok(DeclaredCarrier {
            tracking_number: Pointer::parse("tracking_number", &raw.tracking_number)?,
            shipment_ref: optional("shipment_ref", &raw.shipment_ref)?,
            events: Pointer::parse("events", &raw.events)?,
            fields,
            time_format: TimeFormat::parse(raw.time_format.trim())?,
            codes,
            default_status,
            name,
        })
    }

    /// Canonical status of a raw code.
    pub fn map_status(&self, code: &str) -> Status {
        self.codes.get(code).copied().unwrap_or(self.default_status)
    }
}

impl Carrier for DeclaredCarrier {
    fn name(&self) -> &str {
        &self.name
    }

    fn normalize(&self, body: &Value) -> Result<Vec<CarrierEvent>, RecordError> {
        let tracking_number = text(body, &self.tracking_number, &self.tracking_number.0)?
            .ok_or_else(|| RecordError::MissingField(self.tracking_number.to_string()))?;
        let shipment_ref = opt_text(body, self.shipment_ref.as_ref(), "")?;
        let entries = match self.events.find(body) {
            Some(Value::Array(entries)) => entries,
            Some(_) => return Err(RecordError::WrongType { field: self.events.to_string(), expected: "array" }),
            None => return Err(RecordError::MissingField(self.events.to_string())),
        };
        let f = &self.fields;
        let mut events = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            // Errors name the absolute pointer, e.g. `/consignment/scans/3/stamp`.
            let base = format!("{}/{index}", self.events);
            let code_field = format!("{base}{}", f.code);
            let code = text(entry, &f.code, &code_field)?.ok_or(RecordError::MissingField(code_field))?;
            let time_field = format!("{base}{}", f.time);
            let time = f.time.find(entry).ok_or_else(|| RecordError::MissingField(time_field.clone()))?;
            let instant = self.time_format.read(&time_field, time)?;
            events.push(CarrierEvent {
                tracking_number: tracking_number.clone(),
                shipment_ref: shipment_ref.clone(),
                status: self.map_status(&code),
                carrier_status_code: code,
                carrier_status_detail: opt_text(entry, f.sub_code.as_ref(), &base)?,
                description: opt_text(entry, f.description.as_ref(), &base)?,
                occurred_at: instant.utc,
                time_assumed_utc: instant.assumed_utc,
                location: Location {
                    city: opt_text(entry, f.city.as_ref(), &base)?,
                    region: opt_text(entry, f.region.as_ref(), &base)?,
                    postal_code: opt_text(entry, f.postal_code.as_ref(), &base)?,
                    country: country_code(opt_text(entry, f.country.as_ref(), &base)?),
                },
                source_event_id: opt_text(entry, f.id.as_ref(), &base)?,
            });
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MAPPING: &str = r#"
        name = "nordpost"
        tracking_number = "/consignment/number"
        shipment_ref = "/consignment/id"
        events = "/consignment/scans"
        time_format = "%Y%m%d %H%M%S"
        default_status = "unknown"

        [event]
        code = "/code"
        sub_code = "/reason"
        description = "/text"
        time = "/stamp"
        city = "/site/town"
        postal_code = "/site/zip"
        country = "/site/cc"
        id = "/scan_id"

        [codes]
        "10" = "label_created"
        "20" = "picked_up"
        "30" = "in_transit"
        "90" = "delivered"
    "#;

    fn mapping(replace: &str, with: &str) -> Result<DeclaredCarrier, MappingError> {
        DeclaredCarrier::from_toml(&MAPPING.replacen(replace, with, 1))
    }

    #[test]
    fn a_valid_mapping_loads() {
        let carrier = DeclaredCarrier::from_toml(MAPPING).unwrap();
        assert_eq!(carrier.name(), "nordpost");
        assert_eq!(carrier.time_format, TimeFormat::Strftime("%Y%m%d %H%M%S".into()));
        assert_eq!(carrier.map_status("20"), Status::PickedUp);
        assert_eq!(carrier.map_status("77"), Status::Unknown);
        assert_eq!(carrier.map_status(" 20"), Status::Unknown, "codes match as written");
    }

    #[test]
    fn invalid_mappings_are_refused_precisely() {
        assert_eq!(mapping(r#"name = "nordpost""#, r#"name = "  ""#).unwrap_err(), MappingError::EmptyName);
        assert_eq!(
            mapping(r#"name = "nordpost""#, r#"name = "Nord Post""#).unwrap_err(),
            MappingError::BadName("Nord Post".into())
        );
        assert_eq!(
            mapping(r#"name = "nordpost""#, r#"name = "easypost""#).unwrap_err(),
            MappingError::BuiltinName("easypost".into())
        );
        let err = mapping(r#""/consignment/scans""#, r#""consignment.scans""#).unwrap_err();
        assert!(matches!(&err, MappingError::BadPointer { key, .. } if key == "events"), "{err}");
        let err = mapping(r#"time = "/stamp""#, r#"time = "/st~2amp""#).unwrap_err();
        assert!(matches!(&err, MappingError::BadPointer { key, .. } if key == "event.time"), "{err}");
        let err = mapping(r#""90" = "delivered""#, r#""90" = "delivred""#).unwrap_err();
        assert_eq!(err.to_string().split(" (one of").next(), Some("`codes.\"90\" = \"delivred\"` is not a canonical status"));
        let err = mapping(r#"default_status = "unknown""#, r#"default_status = "lost""#).unwrap_err();
        assert!(matches!(&err, MappingError::UnknownStatus { key, .. } if key == "default_status"), "{err}");
        assert_eq!(mapping(r#""90" = "delivered""#, r#""" = "delivered""#).unwrap_err(), MappingError::EmptyCode);
        let err = mapping(r#""%Y%m%d %H%M%S""#, r#""yyyymmdd""#).unwrap_err();
        assert!(matches!(err, MappingError::BadTimeFormat { .. }), "{err}");
        let err = mapping(r#""%Y%m%d %H%M%S""#, r#""%Y-%m-%d %Q""#).unwrap_err();
        assert!(matches!(err, MappingError::BadTimeFormat { .. }), "{err}");
        // Unknown keys and missing required keys are TOML errors that name the key.
        let err = mapping("[codes]", "typo = 1\n[codes]").unwrap_err();
        assert!(err.to_string().contains("typo"), "{err}");
        let err = mapping(r#"time = "/stamp""#, "").unwrap_err();
        assert!(err.to_string().contains("time"), "{err}");
    }

    #[test]
    fn normalizes_a_history() {
        let carrier = DeclaredCarrier::from_toml(MAPPING).unwrap();
        let body = json!({"consignment": {"number": " NP1 ", "id": 8841, "scans": [
            {"scan_id": "s1", "code": 10, "text": "Pre-advice", "stamp": "20251104 081512",
             "site": {"town": "Malmö", "zip": "211 20", "cc": "se"}},
            {"code": "90", "reason": "MAILBOX", "stamp": "20251106 143000", "site": null},
            {"code": "55", "stamp": "20251106 120000", "extra": [1, 2]}
        ]}});
        let events = carrier.normalize(&body).unwrap();
        assert_eq!(events.len(), 3);
        let first = &events[0];
        assert_eq!(first.tracking_number, "NP1");
        assert_eq!(first.shipment_ref.as_deref(), Some("8841"));
        assert_eq!((first.status, first.carrier_status_code.as_str()), (Status::LabelCreated, "10"));
        assert_eq!(crate::event::format_utc(&first.occurred_at), "2025-11-04T08:15:12.000Z");
        assert!(first.time_assumed_utc);
        assert_eq!(first.location.city.as_deref(), Some("Malmö"));
        assert_eq!(first.location.country.as_deref(), Some("SE"));
        assert_eq!(first.source_event_id.as_deref(), Some("s1"));
        assert_eq!(events[1].status, Status::Delivered);
        assert_eq!(events[1].carrier_status_detail.as_deref(), Some("MAILBOX"));
        assert_eq!(events[2].status, Status::Unknown);
    }

    #[test]
    fn bad_bodies_name_the_pointer() {
        let carrier = DeclaredCarrier::from_toml(MAPPING).unwrap();
        let scans = |scans: Value| json!({"consignment": {"number": "NP1", "scans": scans}});
        assert_eq!(
            carrier.normalize(&json!({"consignment": {"scans": []}})).unwrap_err(),
            RecordError::MissingField("/consignment/number".into())
        );
        assert_eq!(
            carrier.normalize(&json!({"consignment": {"number": "NP1"}})).unwrap_err(),
            RecordError::MissingField("/consignment/scans".into())
        );
        assert_eq!(carrier.normalize(&scans(json!([]))).unwrap(), vec![]);
        assert_eq!(carrier.normalize(&scans(json!({}))).unwrap_err().kind(), "wrong_type");
        assert_eq!(
            carrier.normalize(&scans(json!([{"stamp": "20251104 081512"}]))).unwrap_err(),
            RecordError::MissingField("/consignment/scans/0/code".into())
        );
        assert_eq!(
            carrier.normalize(&scans(json!([{"code": "10"}]))).unwrap_err(),
            RecordError::MissingField("/consignment/scans/0/stamp".into())
        );
        let err = carrier.normalize(&scans(json!([{"code": "10", "stamp": "2025-11-04T08:15:12Z"}]))).unwrap_err();
        assert!(matches!(&err, RecordError::InvalidTimestamp { field, .. } if field == "/consignment/scans/0/stamp"), "{err}");
        let err = carrier.normalize(&scans(json!([{"code": {"x": 1}, "stamp": "20251104 081512"}]))).unwrap_err();
        assert_eq!(err, RecordError::WrongType { field: "/consignment/scans/0/code".into(), expected: "string" });
    }

    #[test]
    fn time_formats() {
        let read = |format: &str, value: Value| {
            TimeFormat::parse(format).unwrap().read("/t", &value).map(|i| (crate::event::format_utc(&i.utc), i.assumed_utc))
        };
        let at = |s: &str, flagged: bool| Ok((s.to_string(), flagged));
        assert_eq!(read("rfc3339", json!("2025-11-04T09:15:12+01:00")), at("2025-11-04T08:15:12.000Z", false));
        assert_eq!(read("rfc3339", json!("2025-11-04T08:15:12")), at("2025-11-04T08:15:12.000Z", true));
        assert_eq!(read("naive_utc", json!("2025-11-04 08:15:12")), at("2025-11-04T08:15:12.000Z", true));
        assert_eq!(read("naive_utc", json!("2025-11-04T09:15:12+01:00")).unwrap_err().kind(), "invalid_timestamp");
        assert_eq!(read("epoch_seconds", json!(1_762_244_112)), at("2025-11-04T08:15:12.000Z", false));
        assert_eq!(read("epoch_seconds", json!("1762244112.5")), at("2025-11-04T08:15:12.500Z", false));
        assert_eq!(read("epoch_millis", json!(1_762_244_112_250_i64)), at("2025-11-04T08:15:12.250Z", false));
        assert_eq!(read("epoch_millis", json!("soon")).unwrap_err().kind(), "invalid_timestamp");
        assert_eq!(read("epoch_seconds", json!(1e300)).unwrap_err().kind(), "invalid_timestamp");
        assert_eq!(read("epoch_seconds", json!(true)).unwrap_err().kind(), "wrong_type");
        assert_eq!(read("%d.%m.%Y %H:%M %z", json!("04.11.2025 09:15 +0100")), at("2025-11-04T08:15:00.000Z", false));
        assert_eq!(read("%Y%m%d", json!(20251104)), at("2025-11-04T00:00:00.000Z", true));
        assert_eq!(read("%Y%m%d %H%M%S", json!("2025-11-04")).unwrap_err().kind(), "invalid_timestamp");
    }

    #[test]
    fn pointers() {
        assert!(Pointer::parse("k", "").is_ok());
        assert!(Pointer::parse("k", "/a~1b/~0c/0").is_ok());
        assert!(Pointer::parse("k", "a/b").is_err());
        assert!(Pointer::parse("k", "/a~").is_err());
        let value = json!({"a/b": {"~c": [null, "x"]}});
        assert_eq!(Pointer::parse("k", "/a~1b/~0c/1").unwrap().find(&value), Some(&json!("x")));
        assert_eq!(Pointer::parse("k", "/a~1b/~0c/0").unwrap().find(&value), None);
    }
}
