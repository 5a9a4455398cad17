//! DHL: the Shipment Tracking - Unified API response (`GET https://api-eu.dhl.com/
//! track/shipments?trackingNumber=...`), as a poller puts it on the topic. DHL's push
//! options deliver the same tracking format (eCommerce Americas webhooks say so; the
//! Unified Push payload itself is not published).
//!
//! Sources: the DHL OpenAPI example response (as
//! used in karrio `modules/connectors/dhl_universal/tests/dhl_universal/
//! test_tracking.py`, and the timestamp forms karrio's `tracking.py` accepts), the DHL
//! developer help center articles 47001197243 (the five `statusCode` values),
//! 47001251141 (`status` text is not unified across divisions), 47001251142 and
//! 47001251916 (`returnFlag`), developer.dhl.com/api-reference/shipment-tracking-
//! unified-push, and a third-party printout of a parcel-de history
//! (docs.digitalgenius.com/docs/dhl-track-trace-v2).
//!
//! Rules:
//! - One event per `shipments[].events[]` entry, across every shipment in the body.
//!   The shipment-level `status` repeats the latest event and is not an event of its
//!   own. No shipments, or shipments without events, yield no events. An RFC 7807
//!   problem body (`{"status":404,"title":"No result found",...}`) is rejected as
//!   unsupported.
//! - Tracking number: `shipments[].id`, a string or a number (DHL's own example has
//!   `7777777770` as a number), trimmed. No `shipment_ref`: DHL has no shipment id
//!   besides the tracking number. The same number can exist in several DHL services
//!   (`possibleAdditionalShipmentsUrl`); their events then share one tracking number.
//! - Time: `timestamp` is ISO 8601 in several forms: `...Z`, with an offset (the
//!   offset changes along an international route), with fractional seconds, zone-less
//!   local time (DHL's own example lists the same scan as `07:53:47Z` in `status` and
//!   `07:53:47` in `events`), and date-only. DHL documents no zone for the zone-less
//!   form and the event location is often a bare country, so zone-less times are read
//!   as UTC and flagged `time_assumed_utc`.
//! - Codes: `carrier_status_code` is `statusCode` verbatim (empty when absent);
//!   `carrier_status_detail` is the event's `status` text verbatim (sometimes a code
//!   with underscores, sometimes a sentence, per division); `description` is the
//!   event's `description`, else its `status`.
//! - Location: `location.address` `addressLocality` (verbatim: DHL sends a city, a
//!   "street, CITY", a "CITY - COUNTRY" or just a country name, depending on the
//!   division), `postalCode`, `countryCode`.
//!
//! Status mapping ([`map_status`]): `pre-transit` label created; `transit` in transit;
//! `delivered` delivered, but returned to sender when the shipment carries
//! `returnFlag: true` (DHL: a returned shipment ends `delivered`, the sender having
//! "become" the recipient; the flag is absent otherwise and not supported for
//! parcel-de); `failure` exception (DHL groups failed attempts, customs problems,
//! expiry and returns under it, and it is not terminal); `unknown` and anything DHL
//! adds later unknown. Values are compared case-insensitively (the push API spells
//! them `Pre-Transit`, `Transit`).
//! Out for delivery: DHL has no such `statusCode` yet ("planned"). A `transit` event
//! is `out_for_delivery` only when its `status` or `description` is exactly one of the
//! sentences DHL is documented to send for it (case, surrounding blanks and a final
//! period ignored): "The shipment has been loaded onto the delivery vehicle"
//! (parcel-de, English). Exact sentences rather than keywords, because DHL's free
//! text also says things like "not out for delivery today"; an unrecognised sentence
//! stays `in_transit`, which is safe. Texts in other languages are not recognised.
//! `returnFlag` only changes `delivered`: which earlier `transit` events belong to the
//! return leg is not in the payload.

use serde_json::Value;

use super::json::{country_code, join, opt, opt_array, opt_obj, opt_str, req_str, root_obj};
use super::time::parse_iso;
use super::Carrier;
use crate::error::{clip, RecordError};
use crate::event::{CarrierEvent, Location, Status};

pub struct Dhl;

/// Sentences DHL is documented to send for a shipment on the delivery vehicle,
/// normalized (lower case, no final period).
const OUT_FOR_DELIVERY_SENTENCES: [&str; 1] = ["the shipment has been loaded onto the delivery vehicle"];

/// Canonical status of one DHL event from its `statusCode`, the shipment's
/// `returnFlag` and the event's free texts (`status`, `description`).
pub fn map_status(status_code: &str, return_flag: bool, texts: &[&str]) -> Status {
    match status_code.trim().to_ascii_lowercase().as_str() {
        "pre-transit" => Status::LabelCreated,
        "transit" if texts.iter().any(|text| is_out_for_delivery(text)) => Status::OutForDelivery,
        "transit" => Status::InTransit,
        "delivered" if return_flag => Status::ReturnedToSender,
        "delivered" => Status::Delivered,
        "failure" => Status::Exception,
        // "unknown" and anything DHL adds later.
        _ => Status::Unknown,
    }
}

fn is_out_for_delivery(text: &str) -> bool {
    let sentence = text.trim();
    let sentence = sentence.strip_suffix('.').unwrap_or(sentence).trim_end();
    OUT_FOR_DELIVERY_SENTENCES.iter().any(|known| sentence.eq_ignore_ascii_case(known))
}

impl Carrier for Dhl {
    fn name(&self) -> &str {
        "dhl"
    }

    fn normalize(&self, body: &Value) -> Result<Vec<CarrierEvent>, RecordError> {
        let root = root_obj(body)?;
        let shipments = match opt(root, "shipments") {
            Some(Value::Array(shipments)) => shipments,
            Some(_) => return Err(RecordError::WrongType { field: "shipments".into(), expected: "array" }),
            None => return Err(problem(root).unwrap_or_else(|| RecordError::MissingField("shipments".into()))),
        };
        let mut events = Vec::new();
        for (s, shipment) in shipments.iter().enumerate() {
            let path = format!("shipments[{s}]");
            if !shipment.is_object() {
                return Err(RecordError::WrongType { field: path, expected: "object" });
            }
            let tracking_number = req_str(shipment, "id", &path)?;
            let return_flag = opt_bool(shipment, "returnFlag", &path)?.unwrap_or(false);
            for (e, entry) in opt_array(shipment, "events", &path)?.iter().enumerate() {
                let event_path = format!("{path}.events[{e}]");
                if !entry.is_object() {
                    return Err(RecordError::WrongType { field: event_path, expected: "object" });
                }
                let timestamp = req_str(entry, "timestamp", &event_path)?;
                let instant = parse_iso(&join(&event_path, "timestamp"), &timestamp)?;
                let status_code = opt_str(entry, "statusCode", &event_path)?.unwrap_or_default();
                let status_text = opt_str(entry, "status", &event_path)?;
                let description = opt_str(entry, "description", &event_path)?;
                let texts: Vec<&str> = [status_text.as_deref(), description.as_deref()].into_iter().flatten().collect();
                let status = map_status(&status_code, return_flag, &texts);
                let location = location(entry, &event_path)?;
                events.push(CarrierEvent {
                    tracking_number: tracking_number.clone(),
                    shipment_ref: None,
                    status,
                    carrier_status_code: status_code,
                    description: description.or_else(|| status_text.clone()),
                    carrier_status_detail: status_text,
                    occurred_at: instant.utc,
                    time_assumed_utc: instant.assumed_utc,
                    location,
                    // DHL gives no event id.
                    source_event_id: None,
                });
            }
        }
        Ok(events)
    }
}

fn location(entry: &Value, event_path: &str) -> Result<Location, RecordError> {
    let Some(location) = opt_obj(entry, "location", event_path)? else {
        return Ok(Location::default());
    };
    let location_path = join(event_path, "location");
    let Some(address) = opt_obj(location, "address", &location_path)? else {
        return Ok(Location::default());
    };
    let address_path = join(&location_path, "address");
    Ok(Location {
        city: opt_str(address, "addressLocality", &address_path)?,
        // DHL's address has no documented region field.
        region: None,
        postal_code: opt_str(address, "postalCode", &address_path)?,
        country: country_code(opt_str(address, "countryCode", &address_path)?),
    })
}

/// An RFC 7807 problem body (DHL's 4xx/5xx answers) instead of tracking data.
fn problem(root: &Value) -> Option<RecordError> {
    let status = root.get("status").and_then(Value::as_u64)?;
    let text = ["detail", "title"].iter().find_map(|key| root.get(*key).and_then(Value::as_str)).unwrap_or("");
    Some(RecordError::Unsupported(format!("DHL error response {status}, not tracking data: {}", clip(text.trim()))))
}

/// Optional boolean: absent, null or blank is `None`; `"true"`/`"false"` strings are
/// accepted (carriers flip booleans to strings); other types are an error.
fn opt_bool(parent: &Value, key: &str, path: &str) -> Result<Option<bool>, RecordError> {
    match opt(parent, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(_) => Err(RecordError::WrongType { field: join(path, key), expected: "boolean" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every documented `statusCode` (help center 47001197243), with and without the
    /// return flag, plus the text rule for out for delivery.
    #[test]
    fn every_documented_status_code_is_mapped() {
        use Status::*;
        let loaded = ["The shipment has been loaded onto the delivery vehicle"];
        let table: [(&str, bool, &[&str], Status); 16] = [
            ("pre-transit", false, &[], LabelCreated),
            ("transit", false, &[], InTransit),
            ("delivered", false, &[], Delivered),
            ("failure", false, &[], Exception),
            ("unknown", false, &[], Unknown),
            ("pre-transit", true, &[], LabelCreated),
            ("transit", true, &[], InTransit),
            ("delivered", true, &[], ReturnedToSender),
            ("failure", true, &[], Exception),
            ("unknown", true, &[], Unknown),
            ("transit", false, &loaded, OutForDelivery),
            // The sentence only refines `transit`.
            ("delivered", false, &loaded, Delivered),
            ("Pre-Transit", false, &[], LabelCreated),
            (" Delivered ", false, &[], Delivered),
            ("", false, &[], Unknown),
            ("out-for-delivery", false, &[], Unknown),
        ];
        for (code, return_flag, texts, expected) in table {
            assert_eq!(map_status(code, return_flag, texts), expected, "{code:?} returnFlag={return_flag} {texts:?}");
        }
    }

    #[test]
    fn out_for_delivery_needs_the_exact_sentence() {
        for text in [
            "The shipment has been loaded onto the delivery vehicle",
            "The shipment has been loaded onto the delivery vehicle.",
            "  the shipment has been LOADED onto the delivery vehicle . ",
        ] {
            assert_eq!(map_status("transit", false, &[text]), Status::OutForDelivery, "{text:?}");
        }
        for text in [
            "The shipment has not been loaded onto the delivery vehicle",
            "The shipment is not out for delivery today",
            "Out for delivery",
            "Die Sendung wurde in das Zustellfahrzeug geladen.",
            "",
        ] {
            assert_eq!(map_status("transit", false, &[text]), Status::InTransit, "{text:?}");
        }
        // Either text may carry the sentence: `status` is sometimes a code instead.
        let texts = ["ARRIVAL_AT_DELIVERY_BASE", "The shipment has been loaded onto the delivery vehicle"];
        assert_eq!(map_status("transit", false, &texts), Status::OutForDelivery);
    }

    #[test]
    fn numeric_and_string_ids_and_return_flag_forms() {
        let body = |id: Value, flag: Value| {
            json!({"shipments": [{"id": id, "service": "parcel-de", "returnFlag": flag, "events": [
                {"timestamp": "2025-02-03T10:15:00+01:00", "statusCode": "delivered", "status": "Delivered"}
            ]}]})
        };
        let number = Dhl.normalize(&body(json!(4_052_806_213u64), json!(null))).unwrap();
        assert_eq!(number[0].tracking_number, "4052806213");
        assert_eq!(number[0].status, Status::Delivered);
        let string = Dhl.normalize(&body(json!(" 00340434161094022115 "), json!("true"))).unwrap();
        assert_eq!(string[0].tracking_number, "00340434161094022115");
        assert_eq!(string[0].status, Status::ReturnedToSender);
        assert_eq!(Dhl.normalize(&body(json!("1"), json!(false))).unwrap()[0].status, Status::Delivered);
        assert_eq!(
            Dhl.normalize(&body(json!("1"), json!(1))).unwrap_err(),
            RecordError::WrongType { field: "shipments[0].returnFlag".into(), expected: "boolean" }
        );
    }

    #[test]
    fn shapes_empty_histories_and_precise_errors() {
        assert_eq!(Dhl.normalize(&json!({"shipments": []})).unwrap(), vec![]);
        let no_events = json!({"shipments": [
            {"id": "1", "status": {"timestamp": "2025-02-03T10:15:00Z", "statusCode": "transit"}}
        ]});
        assert_eq!(Dhl.normalize(&no_events).unwrap(), vec![]);
        let not_found = json!({
            "title": "No result found", "status": 404, "detail": "No shipment with given tracking number found."
        });
        let err = Dhl.normalize(&not_found).unwrap_err();
        assert_eq!(err.kind(), "unsupported");
        assert!(err.to_string().contains("404"), "{err}");
        assert_eq!(Dhl.normalize(&json!({})).unwrap_err(), RecordError::MissingField("shipments".into()));
        assert_eq!(
            Dhl.normalize(&json!({"shipments": {}})).unwrap_err(),
            RecordError::WrongType { field: "shipments".into(), expected: "array" }
        );
        assert_eq!(
            Dhl.normalize(&json!({"shipments": [{"id": "1", "events": [{"statusCode": "transit"}]}]})).unwrap_err(),
            RecordError::MissingField("shipments[0].events[0].timestamp".into())
        );
        assert_eq!(
            Dhl.normalize(&json!({"shipments": [{"id": "1", "events": [
                {"timestamp": "03.02.2025 10:15", "statusCode": "transit"}
            ]}]}))
            .unwrap_err()
            .kind(),
            "invalid_timestamp"
        );
        assert_eq!(
            Dhl.normalize(&json!({"shipments": [{"id": "1", "events": ["transit"]}]})).unwrap_err(),
            RecordError::WrongType { field: "shipments[0].events[0]".into(), expected: "object" }
        );
        assert_eq!(
            Dhl.normalize(&json!({"shipments": [{"id": "1", "events": [{"timestamp": "2025-02-03T10:15:00Z",
                "location": {"address": "Bonn"}}]}]}))
                .unwrap_err(),
            RecordError::WrongType { field: "shipments[0].events[0].location.address".into(), expected: "object" }
        );
        assert_eq!(
            Dhl.normalize(&json!({"shipments": [{"events": []}]})).unwrap_err(),
            RecordError::MissingField("shipments[0].id".into())
        );
    }

    #[test]
    fn timestamp_forms() {
        let at = |timestamp: &str| {
            let body =
                json!({"shipments": [{"id": "1", "events": [{"timestamp": timestamp, "statusCode": "transit"}]}]});
            let event = Dhl.normalize(&body).unwrap().remove(0);
            (crate::event::format_utc(&event.occurred_at), event.time_assumed_utc)
        };
        assert_eq!(at("2025-02-03T09:15:00Z"), ("2025-02-03T09:15:00.000Z".into(), false));
        assert_eq!(at("2025-02-03T10:15:00+01:00"), ("2025-02-03T09:15:00.000Z".into(), false));
        assert_eq!(at("2025-02-03T17:15:00.250+0800"), ("2025-02-03T09:15:00.250Z".into(), false));
        assert_eq!(at("2025-02-03T10:15:00"), ("2025-02-03T10:15:00.000Z".into(), true));
        assert_eq!(at("2025-02-03"), ("2025-02-03T00:00:00.000Z".into(), true));
    }
}
