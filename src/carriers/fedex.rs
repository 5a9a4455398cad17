//! FedEx: the Track API v1 response (`POST /track/v1/trackingnumbers`) and the
//! Advanced Integrated Visibility tracking webhook body. Both carry the same
//! `output.completeTrackResults[].trackResults[].scanEvents[]` structure (the
//! webhook adds `outputMetaData[]`, which is delivery bookkeeping and not read), so
//! one code path reads both. One [`CarrierEvent`] per scan event.
//!
//! Sources:
//! - FedEx Track API OpenAPI as vendored by karrio
//!   (`modules/connectors/fedex/vendor/track.json` @ deea10f8): field meanings of
//!   `scanEvents[]`, `trackingNumberInfo`, `error`.
//! - developer.fedex.com "Tracking Status Codes" appendix (karrio
//!   `vendor/Tracking-Status-Codes.html`): the `eventType` code table.
//! - karrio `tests/fedex/test_tracking.py` captures `DuplicateTrackingResponse`
//!   (a reused tracking number) and `InconsistentDateTimeResponse` (a pickup scan
//!   without offset): real responses.
//! - Webhook body schema `TestWebhookOutputVO` and the webhook guides
//!   (developer.fedex.com/api/en-us/catalog/shipment-visibility-webhook/docs/...):
//!   same `completeTrackResults`, events may arrive out of order, several payloads
//!   per milestone. No verbatim webhook delivery was found.
//! - Whole-request errors as a top-level `errors[]` array (secondary: several
//!   public client libraries handle `errors[0].code`).
//!
//! Rules:
//! - Tracking number: `trackingNumberInfo.trackingNumber`, falling back to the
//!   enclosing `completeTrackResults[].trackingNumber` (the number asked for).
//! - `shipment_ref` = `trackingNumberInfo.trackingNumberUniqueId`: FedEx reuses
//!   tracking numbers and returns one trackResult per shipment for a reused number
//!   (`2460425000~776094337676~FX` vs `2460426000~776094337676~FX`), so the unique
//!   id is what tells the two timelines apart.
//! - A trackResult with an `error` (e.g. `TRACKING.TRACKINGNUMBER.NOTFOUND`) yields
//!   no events but is not a bad record: FedEx reports not-found per number inside a
//!   successful response, usually for a label not scanned yet, and the other results
//!   of the same body are still read. An `error` with neither `code` nor `message`
//!   is ignored. A body without `output` but with a top-level `errors[]` is a failed
//!   API call, dead-lettered as `unsupported` with FedEx's codes.
//! - Time: `scanEvents[].date` is ISO 8601 local time with the scan location's
//!   offset, which changes along the route (`-05:00` then `-04:00`), so every event
//!   is converted with its own offset. Some scans carry no offset at all (a Ground
//!   pickup recorded as `2024-08-15T00:00:00`, i.e. a date only): FedEx documents no
//!   zone for those, so the local time is read as UTC and `time_assumed_utc` is set.
//!   Such a pickup can sort before the label creation of the same day; that is the
//!   data, not a parsing error.
//! - Status: mapped from `eventType` (see [`map_status`]), never from
//!   `derivedStatusCode`, which under-reports (`OD` out for delivery and `HP` ready
//!   for pickup both carry derived `IT`). `eventType` is kept verbatim in
//!   `carrier_status_code`; `derivedStatusCode` and `exceptionCode` go to
//!   `carrier_status_detail` as `derived/exception` (`DE/A47`, or `IT` alone, or
//!   `/A3` when only the exception code is present).
//! - Description: `eventDescription`, with `exceptionDescription` appended in
//!   parentheses when FedEx gives one ("Delivery exception (Customer not available
//!   or business closed)"), because the reason is what a reader needs.
//! - `source_event_id`: the body's `transactionId` (volatile; scans have no id).
//! - Events keep FedEx's order (newest first); ordering is the pipeline's job.

use serde_json::Value;

use super::json::{country_code, join, opt, opt_array, opt_obj, opt_str, req_str, root_obj};
use super::time::parse_iso;
use super::Carrier;
use crate::error::{clip, RecordError};
use crate::event::{CarrierEvent, Location, Status};

pub struct FedEx;

/// FedEx scan `eventType` to canonical status.
///
/// The official table lists some codes twice; the collisions are resolved here
/// because `eventType` holds scan codes, and the second meanings come from other
/// sections of the appendix:
/// - `EA` "Enroute to Airport" (movement) and "Export Approved" (regulatory): both
///   in transit, so the collision does not matter.
/// - `CA` "Shipment Cancelled" (movement) and possession "Carrier": possession codes
///   say who holds the package and are not scan events, so a `CA` scan is a
///   cancellation. (After a pickup the ordering rules ignore a cancellation.)
/// - `RC` "CDO Cancelled" (custom delivery option) and possession "Recipient": both
///   informational, so `unknown` either way.
/// - `SP` "Split Status" (listed three times): informational, `unknown`.
///
/// Other decisions: `DE` "Delivery Exception" is the failed attempt ("Customer not
/// available or business closed"), not a terminal failure, so
/// `delivery_attempted`. `AP` "At Pickup" is the courier at the pickup address
/// before possession, like `EP`, so `label_created`. `AO`/`AE` (arriving on time /
/// early; `AE` not in the table but in real data), `AS` (address corrected, seen in
/// real data), CDO and return-label notices, `DR`/`DS` (freight vehicle notices) and
/// the possession codes are informational: `unknown`, which never moves a shipment.
/// Matching is case-insensitive because the table itself spells `Ow`.
pub fn map_status(event_type: &str) -> Status {
    match event_type.trim().to_ascii_uppercase().as_str() {
        "OC" | "OX" | "EP" | "AP" => Status::LabelCreated,
        "PU" | "PX" => Status::PickedUp,
        "IT" | "IX" | "AR" | "AF" | "DP" | "LO" | "FD" | "OF" | "SF" | "TR" | "AA" | "AC" | "AX" | "EA" | "EO"
        | "PL" | "PF" | "PM" | "OW" | "CC" | "CP" => Status::InTransit,
        "OD" | "ED" | "AD" => Status::OutForDelivery,
        "DE" => Status::DeliveryAttempted,
        "HL" | "HP" => Status::AvailableForPickup,
        "DL" => Status::Delivered,
        "SE" | "CD" | "DY" | "DD" | "PD" | "CH" => Status::Exception,
        "RS" => Status::ReturnedToSender,
        "CA" => Status::Cancelled,
        // AO, AE, AS, RR, RM, RC, RP, LP, RG, RD, SP, DR, DS, possession codes and
        // anything FedEx adds later.
        _ => Status::Unknown,
    }
}

impl Carrier for FedEx {
    fn name(&self) -> &str {
        "fedex"
    }

    fn normalize(&self, body: &Value) -> Result<Vec<CarrierEvent>, RecordError> {
        let root = root_obj(body)?;
        let Some(output) = opt_obj(root, "output", "")? else {
            return Err(api_error(root).unwrap_or_else(|| RecordError::MissingField("output".into())));
        };
        let transaction_id = opt_str(root, "transactionId", "")?;
        let results_path = "output.completeTrackResults";
        let results = match opt(output, "completeTrackResults") {
            Some(Value::Array(results)) => results,
            Some(_) => return Err(RecordError::WrongType { field: results_path.into(), expected: "array" }),
            None => return Err(RecordError::MissingField(results_path.into())),
        };
        let mut events = Vec::new();
        for (i, complete) in results.iter().enumerate() {
            let complete_path = format!("{results_path}[{i}]");
            if !complete.is_object() {
                return Err(RecordError::WrongType { field: complete_path, expected: "object" });
            }
            let requested_number = opt_str(complete, "trackingNumber", &complete_path)?;
            let track_results_path = join(&complete_path, "trackResults");
            for (j, result) in opt_array(complete, "trackResults", &complete_path)?.iter().enumerate() {
                let path = format!("{track_results_path}[{j}]");
                read_track_result(result, &path, requested_number.as_deref(), &transaction_id, &mut events)?;
            }
        }
        Ok(events)
    }
}

/// One trackResult (one shipment) into its scan events.
fn read_track_result(
    result: &Value,
    path: &str,
    requested_number: Option<&str>,
    transaction_id: &Option<String>,
    events: &mut Vec<CarrierEvent>,
) -> Result<(), RecordError> {
    if !result.is_object() {
        return Err(RecordError::WrongType { field: path.into(), expected: "object" });
    }
    if let Some(error) = opt_obj(result, "error", path)? {
        let error_path = join(path, "error");
        if opt_str(error, "code", &error_path)?.is_some() || opt_str(error, "message", &error_path)?.is_some() {
            return Ok(());
        }
    }
    let info = opt_obj(result, "trackingNumberInfo", path)?;
    let info_path = join(path, "trackingNumberInfo");
    let tracking_number = match info {
        Some(info) => opt_str(info, "trackingNumber", &info_path)?,
        None => None,
    }
    .or_else(|| requested_number.map(str::to_string))
    .ok_or_else(|| RecordError::MissingField(join(&info_path, "trackingNumber")))?;
    let shipment_ref = match info {
        Some(info) => opt_str(info, "trackingNumberUniqueId", &info_path)?,
        None => None,
    };
    let scans_path = join(path, "scanEvents");
    for (k, scan) in opt_array(result, "scanEvents", path)?.iter().enumerate() {
        let scan_path = format!("{scans_path}[{k}]");
        if !scan.is_object() {
            return Err(RecordError::WrongType { field: scan_path, expected: "object" });
        }
        let date = req_str(scan, "date", &scan_path)?;
        let instant = parse_iso(&join(&scan_path, "date"), &date)?;
        let event_type = opt_str(scan, "eventType", &scan_path)?.unwrap_or_default();
        let derived = opt_str(scan, "derivedStatusCode", &scan_path)?;
        let exception = opt_str(scan, "exceptionCode", &scan_path)?;
        let detail = match (derived, exception) {
            (Some(derived), Some(exception)) => Some(format!("{derived}/{exception}")),
            (Some(derived), None) => Some(derived),
            (None, Some(exception)) => Some(format!("/{exception}")),
            (None, None) => None,
        };
        let description = match (
            opt_str(scan, "eventDescription", &scan_path)?,
            opt_str(scan, "exceptionDescription", &scan_path)?,
        ) {
            (Some(event), Some(reason)) if !event.eq_ignore_ascii_case(&reason) => Some(format!("{event} ({reason})")),
            (Some(event), _) => Some(event),
            (None, reason) => reason,
        };
        let location = match opt_obj(scan, "scanLocation", &scan_path)? {
            Some(loc) => {
                let loc_path = join(&scan_path, "scanLocation");
                Location {
                    city: opt_str(loc, "city", &loc_path)?,
                    region: opt_str(loc, "stateOrProvinceCode", &loc_path)?,
                    postal_code: opt_str(loc, "postalCode", &loc_path)?,
                    country: country_code(opt_str(loc, "countryCode", &loc_path)?),
                }
            }
            None => Location::default(),
        };
        events.push(CarrierEvent {
            tracking_number: tracking_number.clone(),
            shipment_ref: shipment_ref.clone(),
            status: map_status(&event_type),
            carrier_status_code: event_type,
            carrier_status_detail: detail,
            description,
            occurred_at: instant.utc,
            time_assumed_utc: instant.assumed_utc,
            location,
            source_event_id: transaction_id.clone(),
        });
    }
    Ok(())
}

/// A failed API call (`{"transactionId", "errors": [{"code", "message"}]}`) put on
/// the topic instead of a tracking response: name FedEx's codes in the dead letter.
fn api_error(root: &Value) -> Option<RecordError> {
    let errors = opt(root, "errors")?.as_array().filter(|errors| !errors.is_empty())?;
    let codes: Vec<_> = errors.iter().filter_map(|e| e.get("code").and_then(Value::as_str)).map(clip).collect();
    Some(RecordError::Unsupported(format!(
        "FedEx error response without `output` (errors: {})",
        if codes.is_empty() { "no code".to_string() } else { codes.join(", ") }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every code of the FedEx "Tracking Status Codes" appendix (movement,
    /// regulatory and possession sections) plus the codes seen only in real data.
    #[test]
    fn every_documented_code_is_mapped() {
        use Status::*;
        let table = [
            // Movement
            ("AA", InTransit),
            ("AC", InTransit),
            ("AD", OutForDelivery),
            ("AF", InTransit),
            ("AO", Unknown),
            ("AP", LabelCreated),
            ("AR", InTransit),
            ("AX", InTransit),
            ("CA", Cancelled),
            ("CH", Exception),
            ("DD", Exception),
            ("DE", DeliveryAttempted),
            ("DL", Delivered),
            ("DP", InTransit),
            ("DR", Unknown),
            ("DS", Unknown),
            ("DY", Exception),
            ("EA", InTransit),
            ("ED", OutForDelivery),
            ("EO", InTransit),
            ("EP", LabelCreated),
            ("FD", InTransit),
            ("HL", AvailableForPickup),
            ("HP", AvailableForPickup),
            ("IT", InTransit),
            ("IX", InTransit),
            ("LO", InTransit),
            ("OC", LabelCreated),
            ("OD", OutForDelivery),
            ("OF", InTransit),
            ("Ow", InTransit),
            ("OX", LabelCreated),
            ("PD", Exception),
            ("PF", InTransit),
            ("PL", InTransit),
            ("PM", InTransit),
            ("PU", PickedUp),
            ("PX", PickedUp),
            ("RR", Unknown),
            ("RM", Unknown),
            ("RC", Unknown),
            ("RS", ReturnedToSender),
            ("RP", Unknown),
            ("LP", Unknown),
            ("RG", Unknown),
            ("RD", Unknown),
            ("SE", Exception),
            ("SF", InTransit),
            ("SP", Unknown),
            ("TR", InTransit),
            // Regulatory (EA and SP collide with movement codes of the same mapping)
            ("CC", InTransit),
            ("CD", Exception),
            ("CP", InTransit),
            // Possession (CA and RC collide; see map_status)
            ("SH", Unknown),
            ("CU", Unknown),
            ("BR", Unknown),
            ("TP", Unknown),
            // Seen in real responses, not in the table
            ("AE", Unknown),
            ("AS", Unknown),
            // Case and padding do not matter; unknown codes stay unknown
            ("ow", InTransit),
            (" dl ", Delivered),
            ("ZZ", Unknown),
            ("", Unknown),
        ];
        for (code, expected) in table {
            assert_eq!(map_status(code), expected, "eventType `{code}`");
        }
    }

    fn scan(date: &str, event_type: &str) -> Value {
        json!({"date": date, "eventType": event_type, "eventDescription": "x", "derivedStatusCode": "IT"})
    }

    fn body(track_results: Value) -> Value {
        json!({"transactionId": "t-1", "output": {"completeTrackResults": [
            {"trackingNumber": "794600000001", "trackResults": track_results}
        ]}})
    }

    #[test]
    fn offsets_are_per_event_and_missing_offsets_are_flagged() {
        let events = FedEx
            .normalize(&body(json!([{
                "trackingNumberInfo": {"trackingNumber": "794600000001", "trackingNumberUniqueId": "1~794600000001~FX"},
                "scanEvents": [
                    scan("2025-03-04T10:00:00-04:00", "AR"),
                    scan("2025-03-03T10:00:00-05:00", "DP"),
                    scan("2025-03-03T00:00:00", "PU")
                ]
            }])))
            .unwrap();
        let utc: Vec<_> =
            events.iter().map(|e| (crate::event::format_utc(&e.occurred_at), e.time_assumed_utc)).collect();
        assert_eq!(
            utc,
            [
                ("2025-03-04T14:00:00.000Z".to_string(), false),
                ("2025-03-03T15:00:00.000Z".to_string(), false),
                ("2025-03-03T00:00:00.000Z".to_string(), true),
            ]
        );
        assert!(events.iter().all(|e| e.shipment_ref.as_deref() == Some("1~794600000001~FX")));
        assert_eq!(events[0].source_event_id.as_deref(), Some("t-1"));
    }

    /// FedEx sends several payloads per milestone, each with the whole history: the
    /// same scans normalize identically whatever the payload, apart from the volatile
    /// `source_event_id`, so downstream dedupe sees duplicates as duplicates.
    #[test]
    fn redelivered_history_normalizes_identically() {
        let result = json!([{
            "trackingNumberInfo": {"trackingNumber": "794600000001", "trackingNumberUniqueId": "1~794600000001~FX"},
            "scanEvents": [scan("2025-03-04T10:00:00-04:00", "OD"), scan("2025-03-03T10:00:00-05:00", "PU")]
        }]);
        let mut first = body(result.clone());
        first["transactionId"] = json!("delivery-1");
        let mut second = body(result);
        second["transactionId"] = json!("delivery-2");
        second["outputMetaData"] = json!([{"attempt": 2}]);
        let strip = |events: Vec<CarrierEvent>| {
            events.into_iter().map(|e| CarrierEvent { source_event_id: None, ..e }).collect::<Vec<_>>()
        };
        let (a, b) = (FedEx.normalize(&first).unwrap(), FedEx.normalize(&second).unwrap());
        assert_eq!(a[0].source_event_id.as_deref(), Some("delivery-1"));
        assert_eq!(b[0].source_event_id.as_deref(), Some("delivery-2"));
        assert_eq!(strip(a), strip(b));
    }

    #[test]
    fn not_found_results_and_empty_histories_yield_nothing() {
        let not_found = body(json!([{
            "trackingNumberInfo": {"trackingNumber": "794600000001", "trackingNumberUniqueId": "", "carrierCode": ""},
            "error": {"code": "TRACKING.TRACKINGNUMBER.NOTFOUND", "message": "Tracking number cannot be found."}
        }]));
        assert_eq!(FedEx.normalize(&not_found).unwrap(), vec![]);
        let empty = body(json!([{"trackingNumberInfo": {"trackingNumber": "794600000001"}, "scanEvents": []}]));
        assert_eq!(FedEx.normalize(&empty).unwrap(), vec![]);
        let no_results = json!({"output": {"completeTrackResults": []}});
        assert_eq!(FedEx.normalize(&no_results).unwrap(), vec![]);
        // An empty error object is no error: the scans are read.
        let empty_error = body(json!([{"error": {}, "scanEvents": [scan("2025-03-03T10:00:00-05:00", "DL")]}]));
        let events = FedEx.normalize(&empty_error).unwrap();
        assert_eq!(events.len(), 1);
        // The tracking number falls back to the number asked for.
        assert_eq!(events[0].tracking_number, "794600000001");
        assert_eq!(events[0].shipment_ref, None);
    }

    #[test]
    fn details_and_descriptions() {
        let events = FedEx
            .normalize(&body(json!([{"scanEvents": [
                {"date": "2025-03-03T11:26:00-08:00", "eventType": "DE", "derivedStatusCode": "DE", "exceptionCode": "08",
                 "eventDescription": "Delivery exception", "exceptionDescription": "Recipient not in"},
                {"date": "2025-03-03T11:00:00-08:00", "eventType": "AF", "exceptionCode": "A3",
                 "eventDescription": "At local FedEx facility", "exceptionDescription": ""},
                {"date": "2025-03-03T10:00:00-08:00", "eventType": "AR", "derivedStatusCode": "IT", "exceptionCode": ""}
            ]}])))
            .unwrap();
        assert_eq!(events[0].carrier_status_detail.as_deref(), Some("DE/08"));
        assert_eq!(events[0].description.as_deref(), Some("Delivery exception (Recipient not in)"));
        assert_eq!(events[0].status, Status::DeliveryAttempted);
        assert_eq!(events[1].carrier_status_detail.as_deref(), Some("/A3"));
        assert_eq!(events[1].description.as_deref(), Some("At local FedEx facility"));
        assert_eq!(events[2].carrier_status_detail.as_deref(), Some("IT"));
        assert_eq!(events[2].description, None);
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let err = |body: Value| FedEx.normalize(&body).unwrap_err();
        assert_eq!(err(json!([])), RecordError::WrongType { field: "$".into(), expected: "object" });
        assert_eq!(err(json!({"transactionId": "t"})), RecordError::MissingField("output".into()));
        assert_eq!(
            err(json!({"output": {"completeTrackResults": {}}})),
            RecordError::WrongType { field: "output.completeTrackResults".into(), expected: "array" }
        );
        assert_eq!(
            err(json!({"output": {"alerts": []}})),
            RecordError::MissingField("output.completeTrackResults".into())
        );
        assert_eq!(err(json!({"errors": [{"code": "NOT.AUTHORIZED.ERROR", "message": "no"}]})).kind(), "unsupported");
        assert_eq!(
            err(json!({"output": {"completeTrackResults": [{"trackResults": [{"scanEvents": []}]}]}})),
            RecordError::MissingField(
                "output.completeTrackResults[0].trackResults[0].trackingNumberInfo.trackingNumber".into()
            )
        );
        assert_eq!(
            err(body(json!([{"scanEvents": [{"eventType": "PU"}]}]))),
            RecordError::MissingField("output.completeTrackResults[0].trackResults[0].scanEvents[0].date".into())
        );
        assert_eq!(err(body(json!([{"scanEvents": [scan("15/08/2024 10:36", "PU")]}]))).kind(), "invalid_timestamp");
        assert_eq!(
            err(body(json!([{"scanEvents": [{"date": "2025-03-03T10:00:00Z", "scanLocation": {"city": ["X"]}}]}]))),
            RecordError::WrongType {
                field: "output.completeTrackResults[0].trackResults[0].scanEvents[0].scanLocation.city".into(),
                expected: "string"
            }
        );
        assert_eq!(
            err(body(json!([{"error": "not found"}]))),
            RecordError::WrongType {
                field: "output.completeTrackResults[0].trackResults[0].error".into(),
                expected: "object"
            }
        );
    }
}
