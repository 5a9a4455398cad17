//! Shippo: the `track_updated` webhook (`event`, `test`, `data`: a Track with its
//! whole `tracking_history`), or a bare Track as a poller of `GET /tracks/...` would
//! put it on the topic.
//!
//! Sources: goshippo/shippo-python-sdk models generated from Shippo's OpenAPI
//! (`WebhookPayloadTrack`, `Track`, `TrackingStatus`, `TrackingStatusEnum`; field
//! names, types, the "displayed in UTC" rule for `status_date`), the tracking guide
//! on docs.goshippo.com (status definitions, "history starting with the earlier
//! event first", "tracking webhooks are not idempotent"). The substatus codes come
//! from a third-party quotation of Shippo's "Event definitions" table (secondary).
//!
//! Rules:
//! - Tracking number: `data.tracking_number`, trimmed. No `shipment_ref`: the
//!   `transaction` id is Shippo's label purchase, not the carrier's shipment, and a
//!   number tracked without a label has none (the timeline must not split on it).
//! - Events: one per `tracking_history[]` entry, plus `tracking_status` (the latest)
//!   only when no history entry already describes the same scan. Shippo normally
//!   repeats the latest scan in both places, but with a different `object_id`, so
//!   "the same scan" is compared on what identifies a scan: status, substatus code,
//!   `status_date` and location. A `tracking_status` without a `status_date` (an
//!   UNKNOWN number the carrier has not scanned yet) is no event; a history entry
//!   without one is a malformed body.
//! - Time: `status_date` is documented as UTC and sent with `Z`; a value without an
//!   offset is read as UTC and flagged, like every zone-less time.
//! - Status: Shippo's `status` with its `substatus.code` ([`map_status`]). The status
//!   is kept verbatim in `carrier_status_code`, the substatus code in
//!   `carrier_status_detail`. Shippo gives no raw carrier code.
//! - `object_id` (per status) becomes `source_event_id`: it differs between the two
//!   arrays for one scan, which is fine because the id is volatile by contract.
//! - Test webhooks (`test: true`, carrier `shippo`, numbers like `SHIPPO_TRANSIT`) are
//!   normalized like live ones: whether a tenant wants them is routing, not format.

use serde_json::Value;

use super::json::{country_code, opt_array, opt_obj, opt_str, req_obj, req_str, root_obj};
use super::time::parse_iso;
use super::Carrier;
use crate::error::{clip, RecordError};
use crate::event::{CarrierEvent, Location, Status};

pub struct Shippo;

/// Shippo `status` and `substatus.code` to canonical status.
///
/// The high-level status alone is too coarse: out for delivery, delivery attempts
/// and pickup availability are all `TRANSIT` substatuses at Shippo.
pub fn map_status(status: &str, substatus: &str) -> Status {
    let status = status.to_ascii_uppercase();
    let substatus = substatus.to_ascii_lowercase();
    match (status.as_str(), substatus.as_str()) {
        ("PRE_TRANSIT", _) => Status::LabelCreated,
        ("TRANSIT", "package_accepted") => Status::PickedUp,
        ("TRANSIT", "out_for_delivery") => Status::OutForDelivery,
        ("TRANSIT", "pickup_available") => Status::AvailableForPickup,
        ("TRANSIT", "delivery_attempted" | "notice_left") => Status::DeliveryAttempted,
        // Problems the recipient or the carrier must act on; the parcel is still
        // moving forward, so these never override a ranked status (see `order`).
        (
            "TRANSIT",
            "address_issue" | "contact_carrier" | "delayed" | "location_inaccessible" | "package_damaged"
            | "package_held" | "reschedule_delivery",
        ) => Status::Exception,
        // package_arrived, package_departed, package_processed, package_processing,
        // package_forwarded, delivery_scheduled, delivery_rescheduled, no substatus,
        // and substatuses Shippo adds later.
        ("TRANSIT", _) => Status::InTransit,
        ("DELIVERED", _) => Status::Delivered,
        // Shippo's RETURNED covers "en route back to the sender" and "returned";
        // both leave the forward path for good, which is what returned_to_sender means
        // here (EasyPost's return_to_sender is mapped the same way). package_unclaimed
        // is a RETURNED substatus: the unclaimed parcel goes back.
        ("RETURNED", _) => Status::ReturnedToSender,
        // package_undeliverable, package_lost, package_disposed: there is no canonical
        // "lost" status; a failure is a problem report that never overrides progress.
        ("FAILURE", _) => Status::Exception,
        // UNKNOWN/other and anything Shippo adds later.
        _ => Status::Unknown,
    }
}

impl Carrier for Shippo {
    fn name(&self) -> &str {
        "shippo"
    }

    fn normalize(&self, body: &Value) -> Result<Vec<CarrierEvent>, RecordError> {
        let root = root_obj(body)?;
        let (track, track_path) = match opt_str(root, "event", "")?.as_deref() {
            Some("track_updated") => (req_obj(root, "data", "")?, "data"),
            Some(other) => {
                return Err(RecordError::Unsupported(format!(
                    "Shippo event `{}` is not a tracking event (subscribe this topic to track_updated only)",
                    clip(other)
                )))
            }
            // A bare Track (GET /tracks/<carrier>/<number>) has no envelope.
            None if root.get("tracking_number").is_some() => (root, ""),
            None => return Err(RecordError::MissingField("event".into())),
        };
        let tracking_number = req_str(track, "tracking_number", track_path)?;
        let history_path = super::json::join(track_path, "tracking_history");
        let history = opt_array(track, "tracking_history", track_path)?;
        let mut events = Vec::with_capacity(history.len() + 1);
        for (index, entry) in history.iter().enumerate() {
            let path = format!("{history_path}[{index}]");
            if let Some(event) = status_event(entry, &path, &tracking_number, true)? {
                events.push(event);
            }
        }
        if let Some(latest) = opt_obj(track, "tracking_status", track_path)? {
            let path = super::json::join(track_path, "tracking_status");
            if let Some(event) = status_event(latest, &path, &tracking_number, false)? {
                if !events.iter().any(|e| same_scan(e, &event)) {
                    events.push(event);
                }
            }
        }
        Ok(events)
    }
}

/// One Shippo TrackingStatus as an event. `None` for a `tracking_status` without a
/// `status_date` (nothing scanned yet); `date_required` makes that an error instead.
fn status_event(
    entry: &Value,
    path: &str,
    tracking_number: &str,
    date_required: bool,
) -> Result<Option<CarrierEvent>, RecordError> {
    if !entry.is_object() {
        return Err(RecordError::WrongType { field: path.into(), expected: "object" });
    }
    let date = match opt_str(entry, "status_date", path)? {
        Some(date) => date,
        None if date_required => return Err(RecordError::MissingField(super::json::join(path, "status_date"))),
        None => return Ok(None),
    };
    let instant = parse_iso(&super::json::join(path, "status_date"), &date)?;
    let status = req_str(entry, "status", path)?;
    let substatus = match opt_obj(entry, "substatus", path)? {
        Some(sub) => opt_str(sub, "code", &super::json::join(path, "substatus"))?,
        None => None,
    };
    let location = match opt_obj(entry, "location", path)? {
        Some(loc) => {
            let loc_path = super::json::join(path, "location");
            Location {
                city: opt_str(loc, "city", &loc_path)?,
                region: opt_str(loc, "state", &loc_path)?,
                postal_code: opt_str(loc, "zip", &loc_path)?,
                country: country_code(opt_str(loc, "country", &loc_path)?),
            }
        }
        None => Location::default(),
    };
    Ok(Some(CarrierEvent {
        tracking_number: tracking_number.to_string(),
        shipment_ref: None,
        status: map_status(&status, substatus.as_deref().unwrap_or("")),
        carrier_status_code: status,
        carrier_status_detail: substatus,
        description: opt_str(entry, "status_details", path)?,
        occurred_at: instant.utc,
        time_assumed_utc: instant.assumed_utc,
        location,
        source_event_id: opt_str(entry, "object_id", path)?,
    }))
}

/// The latest status repeats the newest history entry under another `object_id`;
/// the description may be reworded, so it is not part of the comparison either.
fn same_scan(a: &CarrierEvent, b: &CarrierEvent) -> bool {
    a.carrier_status_code.eq_ignore_ascii_case(&b.carrier_status_code)
        && a.carrier_status_detail == b.carrier_status_detail
        && a.occurred_at == b.occurred_at
        && a.location == b.location
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_documented_status_and_substatus_is_mapped() {
        let table = [
            ("UNKNOWN", "other", Status::Unknown),
            ("UNKNOWN", "", Status::Unknown),
            ("PRE_TRANSIT", "information_received", Status::LabelCreated),
            ("PRE_TRANSIT", "", Status::LabelCreated),
            ("TRANSIT", "package_accepted", Status::PickedUp),
            ("TRANSIT", "package_arrived", Status::InTransit),
            ("TRANSIT", "package_departed", Status::InTransit),
            ("TRANSIT", "package_processed", Status::InTransit),
            ("TRANSIT", "package_processing", Status::InTransit),
            ("TRANSIT", "package_forwarded", Status::InTransit),
            ("TRANSIT", "delivery_scheduled", Status::InTransit),
            ("TRANSIT", "delivery_rescheduled", Status::InTransit),
            ("TRANSIT", "", Status::InTransit),
            ("TRANSIT", "out_for_delivery", Status::OutForDelivery),
            ("TRANSIT", "pickup_available", Status::AvailableForPickup),
            ("TRANSIT", "delivery_attempted", Status::DeliveryAttempted),
            ("TRANSIT", "notice_left", Status::DeliveryAttempted),
            ("TRANSIT", "address_issue", Status::Exception),
            ("TRANSIT", "contact_carrier", Status::Exception),
            ("TRANSIT", "delayed", Status::Exception),
            ("TRANSIT", "location_inaccessible", Status::Exception),
            ("TRANSIT", "package_damaged", Status::Exception),
            ("TRANSIT", "package_held", Status::Exception),
            ("TRANSIT", "reschedule_delivery", Status::Exception),
            ("DELIVERED", "delivered", Status::Delivered),
            ("RETURNED", "return_to_sender", Status::ReturnedToSender),
            ("RETURNED", "package_unclaimed", Status::ReturnedToSender),
            ("FAILURE", "package_undeliverable", Status::Exception),
            ("FAILURE", "package_lost", Status::Exception),
            ("FAILURE", "package_disposed", Status::Exception),
            ("FAILURE", "", Status::Exception),
            ("SOMETHING_NEW", "", Status::Unknown),
        ];
        for (status, substatus, expected) in table {
            assert_eq!(map_status(status, substatus), expected, "{status}/{substatus}");
        }
    }

    fn scan(status: &str, code: &str, date: &str, id: &str) -> Value {
        json!({
            "object_id": id, "status": status, "status_date": date, "status_details": "x",
            "substatus": {"code": code, "text": "t", "action_required": false},
            "location": {"city": "Reno", "state": "NV", "zip": "89501", "country": "US"}
        })
    }

    #[test]
    fn latest_status_is_not_emitted_twice() {
        let body = json!({"event": "track_updated", "test": false, "data": {
            "tracking_number": "92055901",
            "tracking_history": [
                scan("TRANSIT", "package_accepted", "2025-03-03T17:02:00Z", "a1"),
                scan("DELIVERED", "delivered", "2025-03-05T19:41:00Z", "a2"),
            ],
            "tracking_status": scan("DELIVERED", "delivered", "2025-03-05T19:41:00Z", "b9"),
        }});
        let events = Shippo.normalize(&body).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].source_event_id.as_deref(), Some("a2"));

        // A latest status that the history does not (yet) hold is an event of its own.
        let body = json!({"event": "track_updated", "data": {
            "tracking_number": "92055901",
            "tracking_history": [scan("TRANSIT", "package_accepted", "2025-03-03T17:02:00Z", "a1")],
            "tracking_status": scan("TRANSIT", "out_for_delivery", "2025-03-05T08:10:00Z", "b9"),
        }});
        let events = Shippo.normalize(&body).unwrap();
        assert_eq!(events.iter().map(|e| e.status).collect::<Vec<_>>(), [Status::PickedUp, Status::OutForDelivery]);
    }

    #[test]
    fn unknown_number_without_scans_yields_nothing() {
        let body = json!({"event": "track_updated", "data": {
            "tracking_number": "SHIPPO_UNKNOWN", "tracking_history": [],
            "tracking_status": {"status": "UNKNOWN", "status_date": null, "substatus": null, "location": null}
        }});
        assert_eq!(Shippo.normalize(&body).unwrap(), vec![]);
        let bare = json!({"tracking_number": "SHIPPO_UNKNOWN", "tracking_history": null, "tracking_status": null});
        assert_eq!(Shippo.normalize(&bare).unwrap(), vec![]);
    }

    #[test]
    fn other_events_and_bad_shapes_are_rejected() {
        let tx = json!({"event": "transaction_created", "data": {}});
        assert_eq!(Shippo.normalize(&tx).unwrap_err().kind(), "unsupported");
        assert_eq!(Shippo.normalize(&json!({"data": {}})).unwrap_err(), RecordError::MissingField("event".into()));
        let no_number = json!({"event": "track_updated", "data": {"tracking_history": []}});
        assert_eq!(Shippo.normalize(&no_number).unwrap_err(), RecordError::MissingField("data.tracking_number".into()));
        let no_date = json!({"event": "track_updated", "data": {"tracking_number": "1", "tracking_history": [{"status": "TRANSIT"}]}});
        assert_eq!(
            Shippo.normalize(&no_date).unwrap_err(),
            RecordError::MissingField("data.tracking_history[0].status_date".into())
        );
        let bad_sub = json!({"event": "track_updated", "data": {"tracking_number": "1", "tracking_history": [
            {"status": "TRANSIT", "status_date": "2025-03-03T17:02:00Z", "substatus": "package_accepted"}]}});
        assert_eq!(Shippo.normalize(&bad_sub).unwrap_err().kind(), "wrong_type");
    }
}
