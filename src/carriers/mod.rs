//! Carrier normalizers: one module per carrier behind [`Carrier`], all pure
//! functions from a parsed body to [`CarrierEvent`]s (no I/O, no clock), so each is
//! fuzzable and table-testable. Adding a carrier is one file here plus its fixtures.
//!
//! The registry does the work common to every carrier once: the size limit, UTF-8
//! and JSON checks before a carrier sees the body, and the plausibility check on
//! every timestamp after.

pub mod aftership;
pub mod declared;
pub mod dhl;
pub mod easypost;
pub mod fedex;
pub mod json;
pub mod shippo;
pub mod time;
pub mod ups;
pub mod usps;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::Value;

use crate::error::RecordError;
use crate::event::CarrierEvent;

/// One carrier's documented payload format.
pub trait Carrier: Send + Sync {
    /// Lower-case name used in topics, headers, config and metric labels.
    fn name(&self) -> &str;

    /// Turn one webhook body (already parsed as JSON) into one event per history
    /// entry. An empty history is `Ok(vec![])`, not an error.
    fn normalize(&self, body: &Value) -> Result<Vec<CarrierEvent>, RecordError>;
}

/// Default body size limit (1 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// The carriers Waymark knows, by name.
#[derive(Clone)]
pub struct CarrierRegistry {
    carriers: BTreeMap<String, Arc<dyn Carrier>>,
    /// Bodies above this many bytes are dead-lettered unparsed.
    pub max_body_bytes: usize,
}

impl std::fmt::Debug for CarrierRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CarrierRegistry").field("carriers", &self.names()).finish()
    }
}

impl Default for CarrierRegistry {
    fn default() -> Self {
        Self::builtin()
    }
}

impl CarrierRegistry {
    /// Every built-in carrier.
    pub fn builtin() -> Self {
        let mut registry = CarrierRegistry { carriers: BTreeMap::new(), max_body_bytes: DEFAULT_MAX_BODY_BYTES };
        registry.register(Arc::new(easypost::EasyPost));
        registry.register(Arc::new(shippo::Shippo));
        registry.register(Arc::new(aftership::AfterShip));
        registry.register(Arc::new(fedex::FedEx));
        registry.register(Arc::new(usps::Usps));
        registry.register(Arc::new(ups::Ups));
        registry.register(Arc::new(dhl::Dhl));
        registry
    }

    /// Add (or replace) a carrier.
    pub fn register(&mut self, carrier: Arc<dyn Carrier>) {
        self.carriers.insert(carrier.name().to_ascii_lowercase(), carrier);
    }

    pub fn names(&self) -> Vec<&str> {
        self.carriers.keys().map(String::as_str).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Carrier>> {
        self.carriers.get(name)
    }

    /// Bytes in, canonical carrier events out, or the precise reason why not.
    /// `now` (injected) bounds plausible timestamps.
    pub fn normalize(&self, carrier: &str, body: &[u8], now: DateTime<Utc>) -> Result<Vec<CarrierEvent>, RecordError> {
        let normalizer = self.get(carrier).ok_or_else(|| {
            RecordError::UnknownCarrier(format!(
                "`{}` is not a known carrier (known: {})",
                crate::error::clip(carrier),
                self.names().join(", ")
            ))
        })?;
        if body.len() > self.max_body_bytes {
            return Err(RecordError::TooLarge { size: body.len(), limit: self.max_body_bytes });
        }
        let text = std::str::from_utf8(body).map_err(|e| RecordError::InvalidUtf8 { at: e.valid_up_to() })?;
        let value: Value = serde_json::from_str(text).map_err(|e| RecordError::InvalidJson(e.to_string()))?;
        // A panic in one carrier's code is a bug, but it must cost this record (as
        // its dead letter), not the worker: a restarted worker would read the same
        // record and panic again. No panic hook is installed, so the default hook
        // still reports the panic once on stderr, and a fuzzer's hook still aborts.
        // AssertUnwindSafe: carriers are pure (`&self` without interior mutability,
        // `&value` is dropped right after), so a panic leaves nothing half-updated.
        let events = std::panic::catch_unwind(AssertUnwindSafe(|| normalizer.normalize(&value))).map_err(|payload| {
            RecordError::CarrierPanic { carrier: carrier.to_string(), message: panic_message(payload.as_ref()) }
        })??;
        let (min, max) = plausible_range(now);
        for event in &events {
            if event.occurred_at < min || event.occurred_at > max {
                return Err(RecordError::AbsurdTimestamp {
                    field: "occurred_at".into(),
                    value: crate::event::format_utc(&event.occurred_at),
                    min: crate::event::format_utc(&min),
                    max: crate::event::format_utc(&max),
                });
            }
        }
        Ok(events)
    }
}

/// The text a panic was raised with (`panic!`, `unwrap`, slicing), bounded because
/// it can quote input values.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = if let Some(text) = payload.downcast_ref::<&str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.as_str()
    } else {
        "(the panic carried no message)"
    };
    crate::error::clip(text).into_owned()
}

/// Scans before 1990 predate every carrier API we read; scans more than a year
/// after `now` are clock or parsing errors (estimated delivery dates are not scans).
pub fn plausible_range(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let min = Utc.with_ymd_and_hms(1990, 1, 1, 0, 0, 0).single().unwrap_or(DateTime::<Utc>::MIN_UTC);
    (min, now + Duration::days(366))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap()
    }

    #[test]
    fn generic_checks_run_before_the_carrier() {
        let registry = CarrierRegistry { max_body_bytes: 16, ..CarrierRegistry::builtin() };
        assert_eq!(registry.normalize("nope", b"{}", now()).unwrap_err().kind(), "unknown_carrier");
        assert_eq!(registry.normalize("easypost", &[b' '; 17], now()).unwrap_err().kind(), "too_large");
        assert_eq!(registry.normalize("easypost", b"{\"a\":\"\xff\"}", now()).unwrap_err().kind(), "invalid_utf8");
        assert_eq!(registry.normalize("easypost", b"{\"a\":", now()).unwrap_err().kind(), "invalid_json");
    }

    /// Values quoted in reasons come from the record (a header, a body field) and
    /// are cut; the rest of the reason is kept.
    #[test]
    fn reasons_quote_at_most_a_bounded_part_of_a_value() {
        let registry = CarrierRegistry::builtin();
        let name = "x".repeat(100_000);
        let reason = registry.normalize(&name, b"{}", now()).unwrap_err().to_string();
        assert!(reason.len() < 1_000 && reason.contains("(known: aftership, dhl"), "{}", crate::error::clip(&reason));
        let body = serde_json::json!({"trackingNumber": "1", "trackingEvents": [
            {"eventTimestamp": "2024-11-22T13:58:00", "GMTOffset": format!("-{}", "€".repeat(300_000))}
        ]});
        let reason = registry.normalize("usps", body.to_string().as_bytes(), now()).unwrap_err().to_string();
        assert!(reason.len() < 1_000 && reason.contains("trackingEvents[0].GMTOffset"), "{}", crate::error::clip(&reason));
        for (carrier, body) in [
            ("ups", serde_json::json!({"response": {"errors": [{"code": "E", "message": name}]}})),
            ("dhl", serde_json::json!({"status": 404, "detail": name})),
            ("shippo", serde_json::json!({"event": name, "data": {}})),
            ("easypost", serde_json::json!({"object": name})),
            ("aftership", serde_json::json!({"event": name, "msg": {}})),
            ("fedex", serde_json::json!({"errors": [{"code": name}]})),
        ] {
            let error = registry.normalize(carrier, body.to_string().as_bytes(), now()).unwrap_err();
            assert_eq!(error.kind(), "unsupported", "{carrier}: {}", crate::error::clip(&error.to_string()));
            assert!(error.to_string().len() < 1_000, "{carrier}: {} bytes", error.to_string().len());
        }
    }

    /// A carrier with a bug: panics on every body.
    struct Panicky;

    impl Carrier for Panicky {
        fn name(&self) -> &str {
            "panicky"
        }

        fn normalize(&self, body: &Value) -> Result<Vec<CarrierEvent>, RecordError> {
            let text = body.get("text").and_then(Value::as_str).unwrap_or_default();
            // A byte index inside a character, like the USPS offset bug.
            let (_head, _tail) = text.split_at(2);
            Ok(vec![])
        }
    }

    #[test]
    fn a_panicking_carrier_is_that_records_dead_letter() {
        let mut registry = CarrierRegistry::builtin();
        registry.register(Arc::new(Panicky));
        let err = registry.normalize("panicky", "{\"text\":\"1€\"}".as_bytes(), now()).unwrap_err();
        assert_eq!(err.kind(), "internal_error");
        let reason = err.to_string();
        assert!(reason.contains("carrier `panicky` panicked"), "{reason}");
        assert!(reason.contains("byte index 2 is not a char boundary"), "{reason}");
        // The registry keeps working for the next record.
        assert_eq!(registry.normalize("usps", b"{}", now()).unwrap_err().kind(), "missing_field");
    }

    /// Every built-in carrier's `fixtures/<carrier>/bad_*.json` gives the dead-letter
    /// kind of its `.expected.ndjson` (`error: <kind>`). `tests/it/fixtures.rs` checks
    /// all fixtures through the whole pipeline; this runs the bad ones in the core
    /// build too, so a panic on a bad body is caught without the runtime feature.
    #[test]
    fn bad_fixtures_give_their_dead_letter_kind() {
        let registry = CarrierRegistry::builtin();
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let mut checked = 0;
        for carrier in registry.names() {
            let mut bodies: Vec<_> = std::fs::read_dir(fixtures.join(carrier))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    let name = p.file_name().unwrap().to_string_lossy();
                    name.starts_with("bad_") && name.ends_with(".json")
                })
                .collect();
            bodies.sort();
            for body in bodies {
                let expected = std::fs::read_to_string(body.with_extension("expected.ndjson")).unwrap();
                let kind = registry.normalize(carrier, &std::fs::read(&body).unwrap(), now).unwrap_err().kind();
                assert_eq!(format!("error: {kind}\n"), expected, "{}", body.display());
                checked += 1;
            }
        }
        assert!(checked > 50, "only {checked} bad fixtures found");
    }
}
