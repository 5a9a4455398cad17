//! EasyPost: the `tracker.updated` / `tracker.created` webhook Event wrapping a
//! Tracker with its whole `tracking_details` history, or a bare Tracker object as a
//! poller of `GET /v2/trackers/:id` would put it on the topic.
//!
//! Sources: EasyPost/examples `official/fixtures/event-body.json` (verbatim webhook
//! body used by every official client library), the Trackers API reference
//! (docs.easypost.com/docs/trackers: status enum, time-zone rule) and a production
//! `tracker.updated` body for FedEx 397280491672.
//!
//! Rules:
//! - Tracking number: `result.tracking_code`, trimmed. No `shipment_ref`: the `trk_`
//!   id is EasyPost's, not the carrier's, and a re-created tracker must not split a
//!   shipment's timeline.
//! - Time: `tracking_details[].datetime` is ISO 8601. EasyPost documents that it
//!   assigns the local zone when it knows the location and "defaults to UTC"
//!   otherwise, so a datetime without an offset is read as UTC and flagged.
//! - Status: EasyPost's own normalized `status` (+ `status_detail`), with the raw
//!   carrier code kept in `carrier_status_code` (empty for carriers EasyPost gives
//!   none) and EasyPost's `status`/`status_detail` in `carrier_status_detail`.
//!   `failure` is not terminal at EasyPost: a failure carrying the carrier's `DE`
//!   (FedEx "Delivery exception: customer not available") is a delivery attempt;
//!   every other failure is an exception.
//! - The Event envelope's `id` (`evt_...`) changes on manual re-sends, so it is kept
//!   only as `source_event_id` (volatile).

use serde_json::Value;

use super::json::{country_code, opt_array, opt_obj, opt_str, req_obj, req_str, root_obj};
use super::time::parse_iso;
use super::Carrier;
use crate::error::{clip, RecordError};
use crate::event::{CarrierEvent, Location, Status};

pub struct EasyPost;

/// EasyPost `status` (and, where it matters, the carrier code) to canonical status.
pub fn map_status(status: &str, carrier_code: &str) -> Status {
    match status {
        "pre_transit" => Status::LabelCreated,
        "in_transit" if carrier_code.eq_ignore_ascii_case("PU") => Status::PickedUp,
        "in_transit" => Status::InTransit,
        "out_for_delivery" => Status::OutForDelivery,
        "available_for_pickup" => Status::AvailableForPickup,
        "delivered" => Status::Delivered,
        "failure" if carrier_code.eq_ignore_ascii_case("DE") => Status::DeliveryAttempted,
        "failure" => Status::Exception,
        "return_to_sender" => Status::ReturnedToSender,
        "cancelled" => Status::Cancelled,
        // "unknown", "error" and anything EasyPost adds later.
        _ => Status::Unknown,
    }
}

impl Carrier for EasyPost {
    fn name(&self) -> &str {
        "easypost"
    }

    fn normalize(&self, body: &Value) -> Result<Vec<CarrierEvent>, RecordError> {
        let root = root_obj(body)?;
        let (tracker, tracker_path, event_id) = match opt_str(root, "object", "")?.as_deref() {
            Some("Event") => {
                let kind = opt_str(root, "description", "")?.unwrap_or_default();
                if !kind.starts_with("tracker.") {
                    return Err(RecordError::Unsupported(format!(
                        "EasyPost event `{}` is not a tracker event (subscribe this topic to tracker.* only)",
                        clip(&kind)
                    )));
                }
                (req_obj(root, "result", "")?, "result", opt_str(root, "id", "")?)
            }
            Some("Tracker") => (root, "", None),
            Some(other) => {
                return Err(RecordError::Unsupported(format!(
                    "EasyPost object `{}` is neither an Event nor a Tracker",
                    clip(other)
                )))
            }
            None => return Err(RecordError::MissingField("object".into())),
        };
        let tracking_number = req_str(tracker, "tracking_code", tracker_path)?;
        let details_path = super::json::join(tracker_path, "tracking_details");
        let details = opt_array(tracker, "tracking_details", tracker_path)?;
        let mut events = Vec::with_capacity(details.len());
        for (index, detail) in details.iter().enumerate() {
            let path = format!("{details_path}[{index}]");
            if !detail.is_object() {
                return Err(RecordError::WrongType { field: path, expected: "object" });
            }
            let easypost_status = opt_str(detail, "status", &path)?.unwrap_or_else(|| "unknown".into());
            let status_detail = opt_str(detail, "status_detail", &path)?;
            let carrier_code = opt_str(detail, "carrier_code", &path)?.unwrap_or_default();
            let datetime = req_str(detail, "datetime", &path)?;
            let instant = parse_iso(&format!("{path}.datetime"), &datetime)?;
            let location = match opt_obj(detail, "tracking_location", &path)? {
                Some(loc) => {
                    let loc_path = format!("{path}.tracking_location");
                    Location {
                        city: opt_str(loc, "city", &loc_path)?,
                        region: opt_str(loc, "state", &loc_path)?,
                        postal_code: opt_str(loc, "zip", &loc_path)?,
                        country: country_code(opt_str(loc, "country", &loc_path)?),
                    }
                }
                None => Location::default(),
            };
            let description = match opt_str(detail, "message", &path)? {
                Some(message) => Some(message),
                None => opt_str(detail, "description", &path)?,
            };
            events.push(CarrierEvent {
                tracking_number: tracking_number.clone(),
                shipment_ref: None,
                status: map_status(&easypost_status, &carrier_code),
                carrier_status_code: carrier_code,
                carrier_status_detail: Some(match status_detail {
                    Some(detail) => format!("{easypost_status}/{detail}"),
                    None => easypost_status,
                }),
                description,
                occurred_at: instant.utc,
                time_assumed_utc: instant.assumed_utc,
                location,
                source_event_id: event_id.clone(),
            });
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_documented_status_is_mapped() {
        let table = [
            ("unknown", "", Status::Unknown),
            ("pre_transit", "OC", Status::LabelCreated),
            ("in_transit", "PU", Status::PickedUp),
            ("in_transit", "AR", Status::InTransit),
            ("out_for_delivery", "OD", Status::OutForDelivery),
            ("delivered", "DL", Status::Delivered),
            ("available_for_pickup", "", Status::AvailableForPickup),
            ("return_to_sender", "", Status::ReturnedToSender),
            ("failure", "DE", Status::DeliveryAttempted),
            ("failure", "SE", Status::Exception),
            ("cancelled", "", Status::Cancelled),
            ("error", "", Status::Unknown),
        ];
        for (status, code, expected) in table {
            assert_eq!(map_status(status, code), expected, "{status}/{code}");
        }
    }

    #[test]
    fn bare_tracker_with_empty_history_yields_nothing() {
        let body = json!({"object": "Tracker", "tracking_code": "EZ4000000004", "tracking_details": []});
        assert_eq!(EasyPost.normalize(&body).unwrap(), vec![]);
    }

    #[test]
    fn non_tracker_events_and_bad_shapes_are_rejected() {
        let batch = json!({"object": "Event", "description": "batch.updated", "result": {}});
        assert_eq!(EasyPost.normalize(&batch).unwrap_err().kind(), "unsupported");
        let no_code = json!({"object": "Tracker", "tracking_details": []});
        assert_eq!(EasyPost.normalize(&no_code).unwrap_err(), RecordError::MissingField("tracking_code".into()));
        let bad_details = json!({"object": "Tracker", "tracking_code": "1", "tracking_details": {}});
        assert_eq!(EasyPost.normalize(&bad_details).unwrap_err().kind(), "wrong_type");
        let no_time = json!({"object": "Tracker", "tracking_code": "1", "tracking_details": [{"status": "delivered"}]});
        assert_eq!(
            EasyPost.normalize(&no_time).unwrap_err(),
            RecordError::MissingField("tracking_details[0].datetime".into())
        );
        assert_eq!(EasyPost.normalize(&json!([1])).unwrap_err().kind(), "wrong_type");
    }
}
