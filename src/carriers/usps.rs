//! USPS: the Tracking API v3 response (`GET apis.usps.com/tracking/v3/tracking/{n}`
//! with `expand=DETAIL`), one `TrackingDetails` object with its whole
//! `trackingEvents[]` history (reverse chronological, at most 99). One
//! [`CarrierEvent`] per tracking event.
//!
//! Sources:
//! - USPS OpenAPI "Package Tracking and Notification" 3.2.6 as vendored by karrio
//!   (`modules/connectors/usps/vendor/tracking.yaml` @ deea10f8): field meanings,
//!   `GMTOffset` example `-7:00`, `additionalProperties: true`.
//! - karrio `tests/usps/test_tracking.py::TrackingResponse`: a real v3 response
//!   (booleans as strings, zone-less `eventTimestamp`, null locations).
//! - Event codes: USPS Publication 199 Appendix G-4 is the authority but was not
//!   obtained. Codes marked (F) below were seen with their USPS text in the real
//!   response; all others come from the third-party Perl table
//!   `USPS::WebTools::Tracking::Codes` and USPS scripting-table copies (secondary),
//!   and `OA` from AfterShip's raw tags (secondary).
//! - The Subscriptions-Tracking (webhook) payload is not documented anywhere we
//!   could read; this module reads the v3 response shape only.
//!
//! Rules:
//! - Tracking number: top-level `trackingNumber`. No `shipment_ref`: USPS gives no
//!   documented, always-present shipment id (`uniqueMailPieceID` is piece-level and
//!   not in every response), and a ref that comes and goes would split a timeline.
//! - Time, per event, first that applies:
//!   1. `GMTTimestamp` (documented as GMT; `...Z`, sometimes with milliseconds): an
//!      exact instant, also when it lacks the `Z`, because the field is GMT by
//!      definition.
//!   2. `eventTimestamp` (local wall time, no zone) + `GMTOffset` (`-05:00`, or
//!      `-7:00` without zero padding, as in USPS's own spec example).
//!   3. `eventTimestamp` alone: read as UTC and flagged `time_assumed_utc` (USPS
//!      documents no zone for it).
//!   An unreadable field that the rule reaches is a dead letter naming that field;
//!   `GMTOffset` is not read when `GMTTimestamp` is present. Note the GMT value
//!   has seconds the local one lacks (`18:58:40Z` vs `13:58:00` at `-05:00`).
//! - Status: from `eventCode` (see [`map_status`]), kept verbatim in
//!   `carrier_status_code`; `reasonCode`, when present, verbatim in
//!   `carrier_status_detail`. The `eventType` text is the description. The
//!   top-level `status`/`statusCategory` describe only the latest event and are not
//!   read. An event without `eventCode` is kept as `unknown` with an empty code.
//! - Quirks: booleans arrive as strings (`"authorizedAgent": "false"`,
//!   `"emailEnabled": "true"`); none of them is read, so either encoding passes.
//!   Location parts are often all null (`TL` "In Transit to Next Facility"), and
//!   `eventCity` can hold a facility name ("QUEENS NY DISTRIBUTION CENTER").
//!   `eventCountry` is kept only when it is an ISO alpha-2 code (domestic events
//!   give null). Unknown extra fields are ignored.

use serde_json::Value;

use super::json::{country_code, join, opt_array, opt_str, req_str, root_obj};
use super::time::{parse_iso, parse_local_with_offset, Instant};
use super::Carrier;
use crate::error::RecordError;
use crate::event::{CarrierEvent, Location, Status};

pub struct Usps;

/// USPS `eventCode` (Pub 199 Appendix G-4 style) to canonical status.
///
/// (F) = seen with its USPS text in a real v3 response; every other code's meaning
/// is secondary (third-party code tables), pending the official Pub 199 table.
///
/// | canonical | codes |
/// |---|---|
/// | label_created | `GX` (F) label created, USPS awaiting item; `MA` manifest acknowledgement; `80` picked up by shipping partner; `81` arrived / `82` departed shipping partner facility; `42` USPS handoff to shipping partner |
/// | picked_up | `03` (F) USPS in possession / accept or pickup; `OA` accepted at origin facility; `PA` passive acceptance; `TM` truck manifest ("Shipment Acceptance") |
/// | in_transit | `10` (F) processed / arrived at regional origin facility; `SF` (F) departed post office; `EF` departed sort facility; `T1` (F) departed regional facility; `TL` (F) in transit to next facility; `A1` (F) arrived at regional facility; `PC` sorting/processing complete; `07` (F) arrival at unit; `06` forwarded; `08` missent; `15` mis-shipped; `19` DC eVS arrive; `41` received at opening unit |
/// | out_for_delivery | `OF` (F) |
/// | available_for_pickup | `14` arrival at pickup point; `16` available for pickup |
/// | delivered | `01` (F) delivered; `17` picked up by agent; `43` picked up |
/// | delivery_attempted | `02` attempted / notice left; `30` no access to delivery location; `51` business closed; `52` notice left; `53` receptacle blocked; `54` receptacle full / item oversized; `55` no secure location; `56` no authorized recipient |
/// | exception | `04` refused; `05` undeliverable as addressed; `71` rescheduled to next delivery day; `11` dead letter (lost/disposed has no canonical status of its own) |
/// | returned_to_sender | `09` return to sender; `21` no such number; `22` insufficient address; `23` moved, left no address; `24` forward expired; `25` addressee unknown; `26` vacant; `27` unclaimed; `28` deceased; `29` other; `31` not picked up; `44` customer recall |
/// | unknown | `DX` delivery status not updated (informational), and any other code |
///
/// `07` "Arrival at Unit" ("Arrived at Post Office") is *not* out for delivery: it
/// precedes `OF` by minutes to hours, and the carrier is not yet on the way.
/// Matching ignores case, and a one-digit code is zero-padded (`1` is `01`) because
/// a code sent as a JSON number loses its leading zero.
pub fn map_status(event_code: &str) -> Status {
    let code = event_code.trim().to_ascii_uppercase();
    let code = if code.len() == 1 && code.bytes().all(|b| b.is_ascii_digit()) { format!("0{code}") } else { code };
    match code.as_str() {
        "GX" | "MA" | "80" | "81" | "82" | "42" => Status::LabelCreated,
        "03" | "OA" | "PA" | "TM" => Status::PickedUp,
        "10" | "SF" | "EF" | "T1" | "TL" | "A1" | "PC" | "07" | "06" | "08" | "15" | "19" | "41" => Status::InTransit,
        "OF" => Status::OutForDelivery,
        "14" | "16" => Status::AvailableForPickup,
        "01" | "17" | "43" => Status::Delivered,
        "02" | "30" | "51" | "52" | "53" | "54" | "55" | "56" => Status::DeliveryAttempted,
        "04" | "05" | "71" | "11" => Status::Exception,
        "09" | "21" | "22" | "23" | "24" | "25" | "26" | "27" | "28" | "29" | "31" | "44" => Status::ReturnedToSender,
        // DX and anything not in the table.
        _ => Status::Unknown,
    }
}

impl Carrier for Usps {
    fn name(&self) -> &str {
        "usps"
    }

    fn normalize(&self, body: &Value) -> Result<Vec<CarrierEvent>, RecordError> {
        let root = root_obj(body)?;
        let tracking_number = req_str(root, "trackingNumber", "")?;
        let history = opt_array(root, "trackingEvents", "")?;
        let mut events = Vec::with_capacity(history.len());
        for (index, entry) in history.iter().enumerate() {
            let path = format!("trackingEvents[{index}]");
            if !entry.is_object() {
                return Err(RecordError::WrongType { field: path, expected: "object" });
            }
            let instant = event_instant(entry, &path)?;
            let code = opt_str(entry, "eventCode", &path)?.unwrap_or_default();
            events.push(CarrierEvent {
                tracking_number: tracking_number.clone(),
                shipment_ref: None,
                status: map_status(&code),
                carrier_status_code: code,
                carrier_status_detail: opt_str(entry, "reasonCode", &path)?,
                description: opt_str(entry, "eventType", &path)?,
                occurred_at: instant.utc,
                time_assumed_utc: instant.assumed_utc,
                location: Location {
                    city: opt_str(entry, "eventCity", &path)?,
                    region: opt_str(entry, "eventState", &path)?,
                    postal_code: opt_str(entry, "eventZIP", &path)?,
                    country: country_code(opt_str(entry, "eventCountry", &path)?),
                },
                source_event_id: None,
            });
        }
        Ok(events)
    }
}

/// The module's timestamp rule (see the module docs) for one tracking event.
fn event_instant(entry: &Value, path: &str) -> Result<Instant, RecordError> {
    if let Some(gmt) = opt_str(entry, "GMTTimestamp", path)? {
        let instant = parse_iso(&join(path, "GMTTimestamp"), &gmt)?;
        // GMT by definition: a missing `Z` is not an assumption.
        return Ok(Instant { assumed_utc: false, ..instant });
    }
    let local_field = join(path, "eventTimestamp");
    let local =
        opt_str(entry, "eventTimestamp", path)?.ok_or_else(|| RecordError::MissingField(local_field.clone()))?;
    match opt_str(entry, "GMTOffset", path)? {
        Some(offset) => parse_local_with_offset(&local_field, &local, &join(path, "GMTOffset"), &offset),
        None => parse_iso(&local_field, &local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::format_utc;
    use serde_json::json;

    /// Every code of USPS Publication 199's event-code table, one
    /// assertion each.
    #[test]
    fn every_documented_code_is_mapped() {
        use Status::*;
        let table = [
            ("GX", LabelCreated),
            ("MA", LabelCreated),
            ("80", LabelCreated),
            ("81", LabelCreated),
            ("82", LabelCreated),
            ("42", LabelCreated),
            ("03", PickedUp),
            ("OA", PickedUp),
            ("TM", PickedUp),
            ("PA", PickedUp),
            ("10", InTransit),
            ("SF", InTransit),
            ("EF", InTransit),
            ("T1", InTransit),
            ("TL", InTransit),
            ("A1", InTransit),
            ("PC", InTransit),
            ("07", InTransit),
            ("06", InTransit),
            ("08", InTransit),
            ("15", InTransit),
            ("19", InTransit),
            ("41", InTransit),
            ("OF", OutForDelivery),
            ("14", AvailableForPickup),
            ("16", AvailableForPickup),
            ("01", Delivered),
            ("17", Delivered),
            ("43", Delivered),
            ("02", DeliveryAttempted),
            ("30", DeliveryAttempted),
            ("51", DeliveryAttempted),
            ("52", DeliveryAttempted),
            ("53", DeliveryAttempted),
            ("54", DeliveryAttempted),
            ("55", DeliveryAttempted),
            ("56", DeliveryAttempted),
            ("04", Exception),
            ("05", Exception),
            ("71", Exception),
            ("11", Exception),
            ("DX", Unknown),
            ("09", ReturnedToSender),
            ("21", ReturnedToSender),
            ("22", ReturnedToSender),
            ("23", ReturnedToSender),
            ("24", ReturnedToSender),
            ("25", ReturnedToSender),
            ("26", ReturnedToSender),
            ("27", ReturnedToSender),
            ("28", ReturnedToSender),
            ("29", ReturnedToSender),
            ("31", ReturnedToSender),
            ("44", ReturnedToSender),
            // Normalization and the unknown rest.
            ("of", OutForDelivery),
            ("1", Delivered),
            (" 07 ", InTransit),
            ("99", Unknown),
            ("", Unknown),
        ];
        for (code, expected) in table {
            assert_eq!(map_status(code), expected, "eventCode `{code}`");
        }
    }

    #[test]
    fn arrival_at_unit_is_not_out_for_delivery() {
        assert_eq!(map_status("07"), Status::InTransit);
        assert_ne!(map_status("07"), Status::OutForDelivery);
    }

    fn first(event: Value) -> Result<CarrierEvent, RecordError> {
        let mut events =
            Usps.normalize(&json!({"trackingNumber": "9400100000000000000017", "trackingEvents": [event]}))?;
        Ok(events.remove(0))
    }

    fn at(event: &CarrierEvent) -> (String, bool) {
        (format_utc(&event.occurred_at), event.time_assumed_utc)
    }

    #[test]
    fn timestamp_rule() {
        let gmt = first(
            json!({"eventTimestamp": "2025-06-02T09:10:00", "GMTTimestamp": "2025-06-02T16:10:41Z", "GMTOffset": "-7:00"}),
        );
        assert_eq!(at(&gmt.unwrap()), ("2025-06-02T16:10:41.000Z".into(), false));
        // GMT without its Z is still GMT; a broken GMTOffset is not read then.
        let bare_gmt = first(json!({"GMTTimestamp": "2025-06-02T16:10:41.041", "GMTOffset": "PDT"}));
        assert_eq!(at(&bare_gmt.unwrap()), ("2025-06-02T16:10:41.041Z".into(), false));
        let unpadded =
            first(json!({"eventTimestamp": "2025-06-02T09:10:00", "GMTTimestamp": null, "GMTOffset": "-7:00"}));
        assert_eq!(at(&unpadded.unwrap()), ("2025-06-02T16:10:00.000Z".into(), false));
        let padded = first(json!({"eventTimestamp": "2025-12-02T09:10:00", "GMTOffset": "-05:00"}));
        assert_eq!(at(&padded.unwrap()), ("2025-12-02T14:10:00.000Z".into(), false));
        let bare = first(json!({"eventTimestamp": "2025-12-02T09:10:00", "GMTOffset": ""}));
        assert_eq!(at(&bare.unwrap()), ("2025-12-02T09:10:00.000Z".into(), true));
    }

    #[test]
    fn booleans_as_strings_and_numeric_codes_pass() {
        let event = first(json!({
            "eventType": "Delivered, In/At Mailbox", "eventCode": 1, "eventZIP": 60614,
            "GMTTimestamp": "2025-06-02T16:10:41Z", "authorizedAgent": "false", "emailEnabled": true
        }))
        .unwrap();
        assert_eq!(event.status, Status::Delivered);
        assert_eq!(event.carrier_status_code, "1");
        assert_eq!(event.location.postal_code.as_deref(), Some("60614"));
    }

    #[test]
    fn empty_history_yields_nothing() {
        assert_eq!(
            Usps.normalize(&json!({"trackingNumber": "9400100000000000000017", "trackingEvents": []})).unwrap(),
            vec![]
        );
        assert_eq!(
            Usps.normalize(&json!({"trackingNumber": "9400100000000000000017", "trackingEvents": null})).unwrap(),
            vec![]
        );
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let err = |body: Value| Usps.normalize(&body).unwrap_err();
        assert_eq!(err(json!({"trackingEvents": []})), RecordError::MissingField("trackingNumber".into()));
        assert_eq!(
            err(json!({"trackingNumber": {"id": 1}})),
            RecordError::WrongType { field: "trackingNumber".into(), expected: "string" }
        );
        assert_eq!(
            err(json!({"trackingNumber": "1", "trackingEvents": {}})),
            RecordError::WrongType { field: "trackingEvents".into(), expected: "array" }
        );
        assert_eq!(
            err(json!({"trackingNumber": "1", "trackingEvents": ["OF"]})),
            RecordError::WrongType { field: "trackingEvents[0]".into(), expected: "object" }
        );
        assert_eq!(
            err(json!({"trackingNumber": "1", "trackingEvents": [{"eventCode": "OF", "GMTOffset": "-05:00"}]})),
            RecordError::MissingField("trackingEvents[0].eventTimestamp".into())
        );
        assert_eq!(
            err(json!({"trackingNumber": "1", "trackingEvents": [{"GMTTimestamp": "Nov 22 2024 6:58PM"}]})),
            RecordError::InvalidTimestamp {
                field: "trackingEvents[0].GMTTimestamp".into(),
                value: "Nov 22 2024 6:58PM".into(),
                reason: "expected RFC 3339 / ISO 8601 (with or without offset)".into()
            }
        );
        assert_eq!(
            err(
                json!({"trackingNumber": "1", "trackingEvents": [{"eventTimestamp": "2024-11-22T13:58:00", "GMTOffset": "EST"}]})
            ),
            RecordError::InvalidTimestamp {
                field: "trackingEvents[0].GMTOffset".into(),
                value: "EST".into(),
                reason: "expected a UTC offset such as -05:00, -7:00, +0530 or Z".into()
            }
        );
        // Multi-byte characters in the offset (reliability review, finding 2).
        for offset in ["-1€", "+a€"] {
            assert_eq!(
                err(
                    json!({"trackingNumber": "1", "trackingEvents": [{"eventTimestamp": "2024-11-22T13:58:00", "GMTOffset": offset}]})
                ),
                RecordError::InvalidTimestamp {
                    field: "trackingEvents[0].GMTOffset".into(),
                    value: offset.into(),
                    reason: "expected a UTC offset such as -05:00, -7:00, +0530 or Z".into()
                }
            );
        }
        assert_eq!(
            err(
                json!({"trackingNumber": "1", "trackingEvents": [{"GMTTimestamp": "2024-11-22T18:58:40Z", "eventCity": ["X"]}]})
            ),
            RecordError::WrongType { field: "trackingEvents[0].eventCity".into(), expected: "string" }
        );
    }
}
