//! UPS: the Track API response (`GET /api/track/v1/details/{inquiryNumber}`, as a
//! poller puts it on the topic) and the Track Alert webhook (push, one scan per
//! message). The two are told apart by shape: a `trackResponse` root is the Track
//! API, a flat body with `trackingNumber` is a Track Alert message.
//!
//! Sources:
//! - Track Alert: `UPSTrackAlert.yaml` in github.com/UPS-API/api-documentation
//!   (v1 at commit aee93d67c53c, 2025-09; "v2" at HEAD e6f36df4da29), the
//!   `TrackingEventRequest` schema and its seven example messages.
//! - Track API: `Tracking.yaml` in the same repository (`Activity`, `Status`,
//!   `Shipment`), and the "Tracking Success" example of UPS's own Postman collection
//!   (vendored in karrio, `modules/connectors/ups/vendors/`).
//! - Code tables: the UPS developer-portal appendix (developer.ups.com/api/reference/
//!   tracking/appendix, copies in karrio `modules/connectors/ups/vendors/Tracking-*.html`):
//!   activity types, manifest codes, updates codes, ULD (movement scan) codes,
//!   status/description codes, package exception codes.
//!
//! Rules:
//! - One event per `trackResponse.shipment[].package[].activity[]` entry, or one per
//!   Track Alert message (Track Alert keeps no history). A package without
//!   activities, or a "Tracking Information Not Found" shipment that only carries
//!   `warnings`, yields no events. An error body (`response.errors[]`) is rejected as
//!   unsupported.
//! - Tracking number: `package[].trackingNumber` / `trackingNumber`, trimmed (UPS's
//!   own example 1 has a leading space). No `shipment_ref`: the Track API's
//!   `inquiryNumber` echoes whatever was queried (the lead package of a multi-piece
//!   shipment, or a shipper reference number), not a stable carrier shipment id, and
//!   Track Alert has nothing comparable; setting it would split one package's timeline
//!   between query styles and between the two formats.
//! - Time: the GMT pair wins when both halves are present (`gmtActivityDate` +
//!   `gmtActivityTime`, Track API `gmtDate` + `gmtTime`): exact UTC. Otherwise the
//!   Track API's local `date` + `time` with `gmtOffset` (`-05:00`, also `-5:00`,
//!   `-0500`; read by the shared [`super::time::parse_offset`]) is converted
//!   exactly. Otherwise the local pair (`localActivityDate` +
//!   `localActivityTime`, or `date` + `time`) is read as UTC and flagged
//!   `time_assumed_utc`: UPS documents no zone for it. Dates are `YYYYMMDD`, times
//!   `HHMMSS` with leading zeros sometimes dropped (the schema's own example `gmtTime`
//!   is `74700`, 07:47:00), so times of one to six digits are left-padded. A GMT pair
//!   that is present but unreadable is an error, never a silent fallback. Local and GMT
//!   pairs are not cross-checked: UPS's example 1 has local = GMT + 5 h for a US scan.
//! - Absent values: v1 messages send `""`, v2 messages omit the key; both read as
//!   absent. Numbers are accepted where strings are documented (`descriptionCode: 21`).
//! - Codes: `carrier_status_code` is the 2-character `code`, verbatim (empty when
//!   absent). `carrier_status_detail` is `type/descriptionCode` (Track API:
//!   `type/statusCode`), each part verbatim, so zero-padded `"021"` stays `"021"`:
//!   `I/021`, `D` when there is no description code, `/021` when there is no type.
//!
//! Status mapping ([`map_status`]), first match wins:
//! 1. The 3-digit status/description code (`descriptionCode`, Track API `statusCode`)
//!    when it is specific (UPS's own, most granular table, compared numerically so
//!    `"021"` and `21` agree). The generic ones ("On the Way" 5, 10, 25, 39, 47, 87,
//!    158, 159, 164, 165; "Status Not Available" 0; "Package Information Unavailable"
//!    148, 163) and codes outside the table fall through.
//! 2. The 2-character `code`, read in the table of its activity `type`: UPS reuses the
//!    same two letters with unrelated meanings per table (`DP` is "Departure scan" for
//!    type I and "manifest processed" for type M; `VP` "Void Pickup" vs "Manifest
//!    cancelled and shipment voided"; `OR`, `OT`, `UP` are also package-exception
//!    reasons). Type I uses the ULD movement-scan table, M/MV the manifest table, U the
//!    updates table; D recognises the out-for-delivery scans too, because UPS's FAQ
//!    says type D covers "loaded on delivery vehicle, out for delivery, delivered".
//!    Type X codes are exception reasons and are never read as scans.
//! 3. The activity `type`: M label created, MV cancelled, I in transit, D delivered,
//!    X exception, U unknown (informational), P picked up (legacy XML Tracking
//!    "Pickup"), freight-only DO/DD/W in transit, NA and anything else unknown.
//!
//! Notable decisions: requests and confirmations of delivery changes (UPS My Choice
//! 18, 20, 27, 41, 54, 56, 95-117, 120-122), investigations, claims and delivery-date
//! updates are informational (`unknown`: kept, never move the status). A return
//! that is only requested (33, 119) is an `exception`; once confirmed or under way
//! (35, 36, 118) or done (34, 67, 81) it is `returned_to_sender`. Lost, seized and
//! destroyed (68, 147, 149) are `exception` (no canonical "lost"). "On the Way to UPS"
//! / "Order Processed" (44, 45, 79, 80) are `label_created`: UPS does not have the
//! package yet. ULD `OC` is described both as "label created, UPS has not received
//! the package" and as a trailer-load origin scan; it is read conservatively as
//! `label_created`. `OD` (loaded on delivery vehicle) is `out_for_delivery` like 72,
//! although UPS warns delivery may be on a later day.
//!
//! Known gaps: Mail Innovations event codes reuse `F4`, `MP`, `MV`, `DP`, `OF`, `DS`
//! with other meanings and the payload does not say which code set applies, so Mail
//! Innovations scans are mapped by their description code and type only. DIALS
//! delivery-detail codes and freight activity codes are not mapped (no documented
//! field carries them in these payloads). UPS's OpenAPI example pairs type X, code
//! `SR`, "released by the customs agency" with description code 003 "Shipment Ready
//! for UPS"; rule 1 reads that as `label_created`.

use chrono::{NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use serde_json::Value;

use super::json::{country_code, join, opt, opt_array, opt_obj, opt_str, req_obj, req_str, root_obj};
use super::time::{parse_offset, Instant};
use super::Carrier;
use crate::error::{clip, RecordError};
use crate::event::{CarrierEvent, Location, Status};

pub struct Ups;

/// Canonical status of one UPS activity from its activity `type`, its 2-character
/// `code` and its 3-digit status/description code (module doc, "Status mapping").
pub fn map_status(activity_type: &str, code: &str, description_code: &str) -> Status {
    let activity_type = activity_type.trim().to_ascii_uppercase();
    let code = code.trim().to_ascii_uppercase();
    description_code_status(description_code)
        .or_else(|| scan_code_status(&activity_type, &code))
        .unwrap_or_else(|| type_status(&activity_type))
}

/// UPS status/description codes (appendix "Status/Description codes"). `None` for
/// the generic codes and for codes outside the table: the scan code and type decide.
fn description_code_status(raw: &str) -> Option<Status> {
    use Status::*;
    let raw = raw.trim();
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code: u32 = raw.parse().ok()?;
    let status = match code {
        // Generic: "Status Not Available", "On the Way", "Package Information Unavailable".
        0 | 5 | 10 | 25 | 39 | 47 | 87 | 148 | 158 | 159 | 163 | 164 | 165 => return None,
        // UPS has the label or order but not the package.
        3 | 44 | 45 | 77 | 79 | 80 | 157 | 166 => LabelCreated,
        7 => Cancelled,
        // Picked up, handed over, dropped off.
        38 | 160 | 167 | 168 | 169 => PickedUp,
        12 | 14 | 16 | 57 | 70 | 71 | 73 | 74 | 75 | 84 | 92 | 134 | 137 | 138 => InTransit,
        6 | 21 | 37 | 72 | 78 | 89 | 91 | 146 | 162 => OutForDelivery,
        22 | 23 | 24 | 60 | 61 | 62 | 66 | 145 => DeliveryAttempted,
        17 | 40 | 144 | 161 => AvailableForPickup,
        11 | 26 | 143 => Delivered,
        // Delays, holds, customs and address problems, damage, refusals, failed
        // pickups, requested returns, and lost / seized / destroyed packages.
        13 | 19 | 29 | 30 | 32 | 33 | 46 | 48 | 49 | 50 | 51 | 52 | 53 | 58 | 59 | 64 | 65 | 68 | 69 | 76 | 83 | 85
        | 86 | 90 | 93 | 119 | 123 | 124 | 125 | 126 | 129 | 130 | 131 | 132 | 135 | 139 | 141 | 147 | 149 => Exception,
        34 | 35 | 36 | 67 | 81 | 118 => ReturnedToSender,
        // Informational: change requests and confirmations, investigations, claims,
        // updated dates, photos, test scans.
        18 | 20 | 27 | 28 | 41 | 42 | 43 | 54 | 55 | 56 | 63 | 82 | 88 | 94 | 95 | 96 | 97 | 98 | 99 | 100 | 101
        | 102 | 103 | 104 | 105 | 106 | 107 | 108 | 109 | 110 | 111 | 112 | 113 | 114 | 115 | 116 | 117 | 120 | 121
        | 122 | 127 | 128 | 133 | 136 | 140 | 142 | 153 | 154 | 155 | 156 => Unknown,
        _ => return None,
    };
    Some(status)
}

/// The 2-character code, in the table its activity type selects.
fn scan_code_status(activity_type: &str, code: &str) -> Option<Status> {
    use Status::*;
    let status = match (activity_type, code) {
        // Manifest codes.
        ("M", "MP" | "DP" | "RD") => LabelCreated,
        ("M" | "MV", "VP") => Cancelled,
        // Updates codes (Track Alert only): a new date, time or delivery photo.
        ("U", "PX" | "UP" | "UT") => Unknown,
        // ULD movement scans; type D is included for the out-for-delivery ones only.
        ("I" | "D", "OD" | "OF" | "OT" | "YF" | "YI") => OutForDelivery,
        ("I", "OC" | "PL" | "SP") => LabelCreated,
        ("I", "OR" | "PC" | "PT" | "PU" | "XD") => PickedUp,
        (
            "I",
            "AG" | "AR" | "AT" | "DL" | "DP" | "DS" | "EP" | "HU" | "IP" | "LC" | "LM" | "UL" | "WH" | "XA" | "XR"
            | "YH" | "YM" | "YN" | "YP",
        ) => InTransit,
        // Corrections of earlier scans, estimate updates, a voided pickup request.
        ("I", "CA" | "CD" | "CL" | "UA" | "UD" | "VP") => Unknown,
        // Delivered codes seen in UPS's own examples (Track Alert 7, Postman).
        ("D", "FS" | "F4") => Delivered,
        _ => return None,
    };
    Some(status)
}

/// The activity type alone (appendix "Activity types" and the Track Alert schema).
fn type_status(activity_type: &str) -> Status {
    match activity_type {
        "M" => Status::LabelCreated,
        "MV" => Status::Cancelled,
        "P" => Status::PickedUp,
        "I" | "DO" | "DD" | "W" => Status::InTransit,
        "D" => Status::Delivered,
        "X" => Status::Exception,
        // "U" (updates), "NA" (not available) and anything UPS adds later.
        _ => Status::Unknown,
    }
}

impl Carrier for Ups {
    fn name(&self) -> &str {
        "ups"
    }

    fn normalize(&self, body: &Value) -> Result<Vec<CarrierEvent>, RecordError> {
        let root = root_obj(body)?;
        if opt(root, "trackResponse").is_some() {
            return track_response(root);
        }
        if let Some(response) = opt(root, "response") {
            return Err(error_response(response));
        }
        if ["trackingNumber", "activityStatus", "gmtActivityDate", "localActivityDate"]
            .iter()
            .any(|key| opt(root, key).is_some())
        {
            return track_alert(root);
        }
        Err(RecordError::Unsupported(
            "UPS body is neither a Track API response (`trackResponse`) nor a Track Alert message \
             (`trackingNumber`, `activityStatus`)"
                .into(),
        ))
    }
}

/// A Track API error body: `{"response":{"errors":[{"code":"TV1002","message":...}]}}`.
fn error_response(response: &Value) -> RecordError {
    let errors: Vec<String> = response
        .get("errors")
        .and_then(Value::as_array)
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    let text = |key: &str| clip(e.get(key).and_then(Value::as_str).unwrap_or("").trim()).into_owned();
                    format!("{} {}", text("code"), text("message")).trim().to_string()
                })
                .collect()
        })
        .unwrap_or_default();
    RecordError::Unsupported(format!(
        "UPS Track API error response, not tracking data: {}",
        if errors.is_empty() { "no error details".to_string() } else { errors.join("; ") }
    ))
}

fn track_response(root: &Value) -> Result<Vec<CarrierEvent>, RecordError> {
    let response = req_obj(root, "trackResponse", "")?;
    let shipments = req_array(response, "shipment", "trackResponse")?;
    let mut events = Vec::new();
    for (s, shipment) in shipments.iter().enumerate() {
        let shipment_path = format!("trackResponse.shipment[{s}]");
        require_object(shipment, &shipment_path)?;
        for (p, package) in opt_array(shipment, "package", &shipment_path)?.iter().enumerate() {
            let package_path = format!("{shipment_path}.package[{p}]");
            require_object(package, &package_path)?;
            let tracking_number = req_str(package, "trackingNumber", &package_path)?;
            for (a, activity) in opt_array(package, "activity", &package_path)?.iter().enumerate() {
                let path = format!("{package_path}.activity[{a}]");
                require_object(activity, &path)?;
                let status = req_obj(activity, "status", &path)?;
                let status_path = join(&path, "status");
                let codes = Codes {
                    activity_type: opt_str(status, "type", &status_path)?,
                    code: opt_str(status, "code", &status_path)?,
                    description_code: opt_str(status, "statusCode", &status_path)?,
                };
                let instant = activity_instant(
                    activity,
                    &path,
                    Pair { date: "gmtDate", time: "gmtTime" },
                    Pair { date: "date", time: "time" },
                    Some("gmtOffset"),
                )?;
                let location = match opt_obj(activity, "location", &path)? {
                    Some(location) => {
                        let location_path = join(&path, "location");
                        match opt_obj(location, "address", &location_path)? {
                            Some(address) => {
                                let address_path = join(&location_path, "address");
                                let country = match opt_str(address, "countryCode", &address_path)? {
                                    Some(code) => Some(code),
                                    None => opt_str(address, "country", &address_path)?,
                                };
                                Location {
                                    city: opt_str(address, "city", &address_path)?,
                                    region: opt_str(address, "stateProvince", &address_path)?,
                                    postal_code: opt_str(address, "postalCode", &address_path)?,
                                    country: country_code(country),
                                }
                            }
                            None => Location::default(),
                        }
                    }
                    None => Location::default(),
                };
                let description = opt_str(status, "description", &status_path)?;
                events.push(event(tracking_number.clone(), codes, description, instant, location));
            }
        }
    }
    Ok(events)
}

fn track_alert(root: &Value) -> Result<Vec<CarrierEvent>, RecordError> {
    let tracking_number = req_str(root, "trackingNumber", "")?;
    let status = req_obj(root, "activityStatus", "")?;
    let codes = Codes {
        activity_type: opt_str(status, "type", "activityStatus")?,
        code: opt_str(status, "code", "activityStatus")?,
        description_code: opt_str(status, "descriptionCode", "activityStatus")?,
    };
    let instant = activity_instant(
        root,
        "",
        Pair { date: "gmtActivityDate", time: "gmtActivityTime" },
        Pair { date: "localActivityDate", time: "localActivityTime" },
        None,
    )?;
    let location = match opt_obj(root, "activityLocation", "")? {
        Some(loc) => Location {
            city: opt_str(loc, "city", "activityLocation")?,
            region: opt_str(loc, "stateProvince", "activityLocation")?,
            postal_code: opt_str(loc, "postalCode", "activityLocation")?,
            country: country_code(opt_str(loc, "country", "activityLocation")?),
        },
        None => Location::default(),
    };
    let description = opt_str(status, "description", "activityStatus")?;
    Ok(vec![event(tracking_number, codes, description, instant, location)])
}

/// The three raw status fields of one activity, verbatim.
struct Codes {
    activity_type: Option<String>,
    code: Option<String>,
    description_code: Option<String>,
}

fn event(
    tracking_number: String,
    codes: Codes,
    description: Option<String>,
    instant: Instant,
    location: Location,
) -> CarrierEvent {
    let Codes { activity_type, code, description_code } = codes;
    let status = map_status(
        activity_type.as_deref().unwrap_or(""),
        code.as_deref().unwrap_or(""),
        description_code.as_deref().unwrap_or(""),
    );
    let detail = match (activity_type, description_code) {
        (Some(t), Some(d)) => Some(format!("{t}/{d}")),
        (Some(t), None) => Some(t),
        (None, Some(d)) => Some(format!("/{d}")),
        (None, None) => None,
    };
    CarrierEvent {
        tracking_number,
        shipment_ref: None,
        status,
        carrier_status_code: code.unwrap_or_default(),
        carrier_status_detail: detail,
        description,
        occurred_at: instant.utc,
        time_assumed_utc: instant.assumed_utc,
        location,
        // UPS gives no event id in either format.
        source_event_id: None,
    }
}

/// Field names of one date + time pair.
#[derive(Clone, Copy)]
struct Pair {
    date: &'static str,
    time: &'static str,
}

/// The instant of one activity by the module's timestamp rule: the GMT pair, else the
/// local pair with its offset, else the local pair read as UTC and flagged.
fn activity_instant(
    obj: &Value,
    path: &str,
    gmt: Pair,
    local: Pair,
    offset_key: Option<&str>,
) -> Result<Instant, RecordError> {
    if let (Some(date), Some(time)) = (opt_str(obj, gmt.date, path)?, opt_str(obj, gmt.time, path)?) {
        let naive = date_time(&join(path, gmt.date), &date, &join(path, gmt.time), &time)?;
        return Ok(Instant { utc: Utc.from_utc_datetime(&naive), assumed_utc: false });
    }
    let date = opt_str(obj, local.date, path)?.ok_or_else(|| RecordError::MissingField(join(path, local.date)))?;
    let time = opt_str(obj, local.time, path)?.ok_or_else(|| RecordError::MissingField(join(path, local.time)))?;
    let naive = date_time(&join(path, local.date), &date, &join(path, local.time), &time)?;
    if let Some(key) = offset_key {
        if let Some(raw) = opt_str(obj, key, path)? {
            let field = join(path, key);
            let offset = parse_offset(&field, &raw)?;
            let local_time =
                offset.from_local_datetime(&naive).single().ok_or_else(|| RecordError::InvalidTimestamp {
                    field: field.clone(),
                    value: raw.clone(),
                    reason: "the local time does not exist at this offset".into(),
                })?;
            return Ok(Instant { utc: local_time.with_timezone(&Utc), assumed_utc: false });
        }
    }
    Ok(Instant { utc: Utc.from_utc_datetime(&naive), assumed_utc: true })
}

/// `YYYYMMDD` + `HHMMSS` (leading zeros of the time optional) as a naive date-time.
fn date_time(date_field: &str, date: &str, time_field: &str, time: &str) -> Result<NaiveDateTime, RecordError> {
    let bad = |field: &str, value: &str, reason: &str| RecordError::InvalidTimestamp {
        field: field.into(),
        value: value.into(),
        reason: reason.into(),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    // Slicing below is on ASCII digits only, so every index is a char boundary.
    let day = (date.len() == 8 && digits(date))
        .then(|| {
            let (y, m, d) = (date[..4].parse().ok()?, date[4..6].parse().ok()?, date[6..].parse().ok()?);
            NaiveDate::from_ymd_opt(y, m, d)
        })
        .flatten()
        .ok_or_else(|| bad(date_field, date, "expected a calendar date as YYYYMMDD"))?;
    let padded = format!("{time:0>6}");
    let clock = (time.len() <= 6 && digits(time))
        .then(|| {
            let (h, m, s) = (padded[..2].parse().ok()?, padded[2..4].parse().ok()?, padded[4..].parse().ok()?);
            NaiveTime::from_hms_opt(h, m, s)
        })
        .flatten()
        .ok_or_else(|| bad(time_field, time, "expected a 24-hour time as HHMMSS"))?;
    Ok(day.and_time(clock))
}

/// Required array field.
fn req_array<'a>(parent: &'a Value, key: &str, path: &str) -> Result<&'a [Value], RecordError> {
    match opt(parent, key) {
        None => Err(RecordError::MissingField(join(path, key))),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(RecordError::WrongType { field: join(path, key), expected: "array" }),
    }
}

fn require_object(value: &Value, path: &str) -> Result<(), RecordError> {
    if value.is_object() {
        Ok(())
    } else {
        Err(RecordError::WrongType { field: path.into(), expected: "object" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every code of UPS's status/description code table (appendix), with its text.
    #[test]
    fn every_status_description_code_is_mapped() {
        use Status::*;
        // The generic codes fall through to the scan code and type: asserted here with
        // type I and no scan code, i.e. in transit.
        let table: [(u32, &str, Status); 160] = [
            (0, "Status Not Available", InTransit),
            (3, "Shipment Ready for UPS", LabelCreated),
            (5, "On the Way", InTransit),
            (6, "Out for Delivery", OutForDelivery),
            (7, "Shipment Information Voided", Cancelled),
            (10, "On the Way", InTransit),
            (11, "Delivered", Delivered),
            (12, "Clearance in Progress", InTransit),
            (13, "Exception", Exception),
            (14, "Clearance Completed", InTransit),
            (16, "In Warehouse", InTransit),
            (17, "Held for Customer Pickup", AvailableForPickup),
            (18, "Delivery Change Requested: Hold for Pickup", Unknown),
            (19, "Held for Future Delivery", Exception),
            (20, "Held for Future Delivery Requested", Unknown),
            (21, "Out for Delivery", OutForDelivery),
            (22, "First Attempt Made", DeliveryAttempted),
            (23, "Second Delivery Attempted", DeliveryAttempted),
            (24, "Final Attempt Made", DeliveryAttempted),
            (25, "On the Way", InTransit),
            (26, "Delivered by Local Post Office", Delivered),
            (27, "Delivery Address Change Requested", Unknown),
            (28, "Delivery Address Changed", Unknown),
            (29, "Exception: Action Required", Exception),
            (30, "Local Post Office Exception", Exception),
            (32, "Adverse Weather May Cause Delay", Exception),
            (33, "Return to Sender Requested", Exception),
            (34, "Returned to Sender", ReturnedToSender),
            (35, "Returning to Sender", ReturnedToSender),
            (36, "Returning to Sender: In Transit", ReturnedToSender),
            (37, "Out for Delivery", OutForDelivery),
            (38, "Picked Up by UPS", PickedUp),
            (39, "On the Way", InTransit),
            (40, "Ready for Customer Pickup", AvailableForPickup),
            (41, "Service Upgrade Requested", Unknown),
            (42, "Service Upgraded", Unknown),
            (43, "Voided Pickup", Unknown),
            (44, "On the Way to UPS", LabelCreated),
            (45, "On the Way to UPS", LabelCreated),
            (46, "Delay", Exception),
            (47, "On the Way", InTransit),
            (48, "Delay", Exception),
            (49, "Delay: Action Required", Exception),
            (50, "Address Information Required", Exception),
            (51, "Delay: Emergency Situation or Severe Weather", Exception),
            (52, "Delay: Severe Weather", Exception),
            (53, "Delay: Severe Weather", Exception),
            (54, "Delivery Change Requested", Unknown),
            (55, "Rescheduled Delivery", Unknown),
            (56, "Service Upgrade Requested", Unknown),
            (57, "On the Way to a Local UPS Access Point", InTransit),
            (58, "Clearance Information Required", Exception),
            (59, "Damage Reported", Exception),
            (60, "Delivery Attempted", DeliveryAttempted),
            (61, "Delivery Attempted: Adult Signature Required", DeliveryAttempted),
            (62, "Delivery Attempted: Funds Required", DeliveryAttempted),
            (63, "Delivery Change Completed", Unknown),
            (64, "Delivery Refused", Exception),
            (65, "Pickup Attempted", Exception),
            (66, "Post Office Delivery Attempted", DeliveryAttempted),
            (67, "Returned to Sender by Post Office", ReturnedToSender),
            (68, "Sent to Lost and Found", Exception),
            (69, "Unable to Deliver", Exception),
            (70, "Package not at UPS Access Point yet", InTransit),
            (71, "Preparing for Delivery", InTransit),
            (72, "Loaded on Delivery Vehicle", OutForDelivery),
            (73, "In Transit to UPS Delivery Partner", InTransit),
            (74, "UPS Delivery Partner has Shipment", InTransit),
            (75, "Scheduled for Delivery", InTransit),
            (76, "UPS Delivery Partner Exception", Exception),
            (77, "Scheduled for Pickup Today", LabelCreated),
            (78, "Your Driver is Arriving Soon!", OutForDelivery),
            (79, "Order Processed: In Transit to UPS", LabelCreated),
            (80, "Order Processed: Ready for UPS", LabelCreated),
            (81, "Returned - Damage Reported", ReturnedToSender),
            (82, "Delivery Instructions Received", Unknown),
            (83, "Held", Exception),
            (84, "Cleared", InTransit),
            (85, "Held for COD Payment", Exception),
            (86, "Delay", Exception),
            (87, "On the Way", InTransit),
            (88, "Test", Unknown),
            (89, "Out for Delivery", OutForDelivery),
            (90, "Delay", Exception),
            (91, "Out for Delivery", OutForDelivery),
            (92, "Customs Clearance in Progress", InTransit),
            (93, "Premier Recovery In Progress", Exception),
            (94, "Premier Recovery Completed", Unknown),
            (95, "Additional Attempt Requested", Unknown),
            (96, "Address Change Confirmed", Unknown),
            (97, "Address Change Requested", Unknown),
            (98, "Deliver to Original Address Requested", Unknown),
            (99, "Deliver to Original Address Confirmed", Unknown),
            (100, "Hold at UPS Access Point Confirmed", Unknown),
            (101, "Hold at UPS Access Point Requested", Unknown),
            (102, "Hold for Courier Requested", Unknown),
            (103, "Hold for Courier Confirmed", Unknown),
            (104, "Hold for Instructions Confirmed", Unknown),
            (105, "Hold for Instructions Requested", Unknown),
            (106, "Hold for Pickup Confirmed", Unknown),
            (107, "Hold for Pickup Requested", Unknown),
            (108, "Hold for Pickup Today Confirmed", Unknown),
            (109, "Hold for Pickup Today Requested", Unknown),
            (110, "Refrigeration Confirmed", Unknown),
            (111, "Refrigeration Requested", Unknown),
            (112, "Re-Ice Confirmed", Unknown),
            (113, "Re-Ice Requested", Unknown),
            (114, "Request Canceled", Unknown),
            (115, "Reschedule Delivery Confirmed", Unknown),
            (116, "Reschedule Delivery Requested", Unknown),
            (117, "Return by Saturday Confirmed", Unknown),
            (118, "Return to Sender Confirmed", ReturnedToSender),
            (119, "Return to Sender Requested", Exception),
            (120, "Saturday Delivery Confirmed", Unknown),
            (121, "Saturday Delivery Requested", Unknown),
            (122, "Upgrade Confirmed", Unknown),
            (123, "Pending Release From Non-UPS Broker", Exception),
            (124, "Clearance Information Needed", Exception),
            (125, "Clearance Information Needed", Exception),
            (126, "Pending Government Agency Release", Exception),
            (127, "Investigation Closed", Unknown),
            (128, "Investigation Canceled", Unknown),
            (129, "Investigation Opened", Exception),
            (130, "Claim in Progress", Exception),
            (131, "Final Pickup Attempted", Exception),
            (132, "Airport Security Delay", Exception),
            (133, "Return Label Left With Customer", Unknown),
            (134, "Cleared Import Customs", InTransit),
            (135, "Second Pickup Attempted", Exception),
            (136, "Delivery Rescheduled for Saturday", Unknown),
            (137, "Transferred to UPS Delivery Partner", InTransit),
            (138, "Awaiting Scheduled Departure", InTransit),
            (139, "Security Access Required", Exception),
            (140, "Claim Paid", Unknown),
            (141, "Incomplete Documentation Received", Exception),
            (142, "Claim Voided", Unknown),
            (143, "Delivered to Agent", Delivered),
            (144, "Delivered to Post Office for Pickup", AvailableForPickup),
            (145, "Delivery Attempted", DeliveryAttempted),
            (146, "Out for Delivery", OutForDelivery),
            (147, "Seized by Law Enforcement", Exception),
            (148, "Package Information Unavailable", InTransit),
            (149, "Prohibited Contents, Package Destroyed", Exception),
            (153, "Updated Delivery Time", Unknown),
            (154, "Updated Delivery Date", Unknown),
            (155, "Delivery Photo", Unknown),
            (156, "Commercial Inside Release", Unknown),
            (157, "Shipment Ready for UPS", LabelCreated),
            (158, "On the Way", InTransit),
            (159, "On the Way", InTransit),
            (160, "We Have Your Package", PickedUp),
            (161, "Delivered to UPS Access Point", AvailableForPickup),
            (162, "Out for Delivery", OutForDelivery),
            (163, "Package Information Unavailable", InTransit),
            (164, "On the Way", InTransit),
            (165, "On the Way", InTransit),
            (166, "Shipment Ready for Roadie", LabelCreated),
            (167, "Dropped off at UPS Store by Customer", PickedUp),
            (168, "Dropped off at Retail Location by Customer", PickedUp),
            (169, "Dropped off at a UPS Access Point by Customer", PickedUp),
        ];
        for (code, text, expected) in table {
            // UPS sends these zero-padded to three digits; both forms must agree.
            let padded = format!("{code:03}");
            assert_eq!(map_status("I", "", &padded), expected, "{padded} {text}");
            assert_eq!(map_status("I", "", &code.to_string()), expected, "{code} {text}");
        }
    }

    #[test]
    fn every_activity_type_is_mapped() {
        use Status::*;
        let table = [
            ("D", Delivered),
            ("I", InTransit),
            ("M", LabelCreated),
            ("MV", Cancelled),
            ("X", Exception),
            ("DO", InTransit),
            ("DD", InTransit),
            ("W", InTransit),
            ("NA", Unknown),
            ("U", Unknown),
            ("P", PickedUp),
            ("", Unknown),
            ("ZZ", Unknown),
        ];
        for (activity_type, expected) in table {
            assert_eq!(map_status(activity_type, "", ""), expected, "type {activity_type}");
        }
    }

    #[test]
    fn every_manifest_updates_and_movement_scan_code_is_mapped() {
        use Status::*;
        let table = [
            // Manifest codes (type M).
            ("M", "DP", LabelCreated),
            ("M", "MP", LabelCreated),
            ("M", "RD", LabelCreated),
            ("M", "VP", Cancelled),
            ("MV", "VP", Cancelled),
            // Updates codes (type U).
            ("U", "PX", Unknown),
            ("U", "UP", Unknown),
            ("U", "UT", Unknown),
            // ULD movement scans (type I).
            ("I", "AG", InTransit),
            ("I", "AR", InTransit),
            ("I", "AT", InTransit),
            ("I", "CA", Unknown),
            ("I", "CD", Unknown),
            ("I", "CL", Unknown),
            ("I", "DL", InTransit),
            ("I", "DP", InTransit),
            ("I", "DS", InTransit),
            ("I", "EP", InTransit),
            ("I", "HU", InTransit),
            ("I", "IP", InTransit),
            ("I", "LC", InTransit),
            ("I", "LM", InTransit),
            ("I", "OC", LabelCreated),
            ("I", "OD", OutForDelivery),
            ("I", "OF", OutForDelivery),
            ("I", "OR", PickedUp),
            ("I", "OT", OutForDelivery),
            ("I", "PC", PickedUp),
            ("I", "PL", LabelCreated),
            ("I", "PU", PickedUp),
            ("I", "PT", PickedUp),
            ("I", "SP", LabelCreated),
            ("I", "UA", Unknown),
            ("I", "UD", Unknown),
            ("I", "UL", InTransit),
            ("I", "VP", Unknown),
            ("I", "WH", InTransit),
            ("I", "XA", InTransit),
            ("I", "XD", PickedUp),
            ("I", "XR", InTransit),
            ("I", "YF", OutForDelivery),
            ("I", "YH", InTransit),
            ("I", "YI", OutForDelivery),
            ("I", "YM", InTransit),
            ("I", "YN", InTransit),
            ("I", "YP", InTransit),
            // Type D covers out-for-delivery scans too (Track Alert FAQ).
            ("D", "OT", OutForDelivery),
            ("D", "OD", OutForDelivery),
            // Delivered codes of UPS's examples.
            ("D", "FS", Delivered),
            ("D", "F4", Delivered),
        ];
        for (activity_type, code, expected) in table {
            assert_eq!(map_status(activity_type, code, ""), expected, "{activity_type}/{code}");
        }
    }

    /// The combinations in UPS's official examples (Track Alert 1-7, Postman, OpenAPI).
    #[test]
    fn official_example_combinations() {
        use Status::*;
        let table = [
            ("M", "MP", "003", LabelCreated),
            ("I", "OR", "005", PickedUp),
            ("I", "DP", "005", InTransit),
            ("I", "YP", "071", InTransit),
            ("I", "OT", "021", OutForDelivery),
            ("D", "FS", "", Delivered),
            ("D", "FS", "011", Delivered),
            ("D", "F4", "011", Delivered),
            // Contradictory OpenAPI placeholder: the description code wins (module doc).
            ("X", "SR", "003", LabelCreated),
        ];
        for (activity_type, code, description_code, expected) in table {
            assert_eq!(
                map_status(activity_type, code, description_code),
                expected,
                "{activity_type}/{code}/{description_code}"
            );
        }
    }

    /// The same two letters mean different things per table: the type decides.
    #[test]
    fn colliding_codes_are_read_in_their_types_table() {
        use Status::*;
        assert_eq!(map_status("M", "DP", ""), LabelCreated, "manifest processed");
        assert_eq!(map_status("I", "DP", ""), InTransit, "departure scan");
        assert_eq!(map_status("M", "VP", ""), Cancelled, "manifest cancelled, shipment voided");
        assert_eq!(map_status("I", "VP", ""), Unknown, "void pickup request");
        assert_eq!(map_status("M", "OC", ""), LabelCreated);
        // Exception reasons that reuse scan, manifest and updates codes stay exceptions.
        for code in ["DP", "OR", "OT", "OD", "UP", "UT", "VP", "RD", "F4", "XD", "YF", "YI", "IP", "SP", "UA"] {
            assert_eq!(map_status("X", code, ""), Exception, "X/{code}");
        }
        // A specific description code beats a type: a type X attempt is an attempt.
        assert_eq!(map_status("X", "48", "022"), DeliveryAttempted);
        assert_eq!(map_status("x", "dp", ""), Exception, "case-insensitive");
        assert_eq!(map_status("i", "dp", ""), InTransit, "case-insensitive");
    }

    /// Every code of UPS's package exception table (appendix, 687 codes): with
    /// activity type X each one is an exception, whatever scan code it collides with.
    #[test]
    fn every_package_exception_code_is_an_exception() {
        const CODES: &str = "\
            1 11 13 14 15 16 17 18 19 1A 1B 1C 1D 1E 1F 1G 1H 1K 1L 1M 1O 1P 1Q 1T 1U 1V 1W 1X 2 22 23 24 25 26 27 \
            29 2A 2B 2E 2G 2H 2N 2O 2R 2S 2T 2U 2V 2X 2Y 2Z 3 30 31 33 34 37 39 3A 3B 3C 3D 3J 3L 3N 3P 3Q 3R 3S 3T \
            3U 3V 3W 3Z 4 40 43 45 46 47 48 49 4B 4C 4F 4H 4I 4J 4K 4L 4M 4N 4P 4Q 4R 4S 4T 4Y 4Z 5 51 52 54 55 56 \
            59 5A 5B 5D 5G 5R 5S 5T 5U 5V 5W 5Z 6 60 63 64 65 66 67 68 6B 6C 6D 6E 6G 6H 6I 6J 6K 6L 6P 6R 6T 6W 6X \
            6Z 7 71 72 73 76 77 78 79 7C 7D 7E 7F 7G 7H 7I 7L 7M 7N 7P 7Q 7R 7S 7T 7U 7V 7W 7X 7Y 7Z 8 84 87 89 8A \
            8C 8D 8E 8F 8G 8H 8I 8K 8L 8M 8R 8Y 8Z 90 91 92 93 95 99 9C 9D 9F 9I 9J 9K 9L 9M 9N 9O 9P 9Q 9R 9S 9T 9U \
            9V 9X 9Y 9Z A1 A2 A3 A4 A5 A6 A7 A8 A9 AA AB AC AD AE AF AG AH AJ AK AL AM AN AO AP AQ AS AT AV AW AX AY \
            AZ B1 B3 B4 B5 B6 B8 B9 BA BB BD BE BF BG BH BJ BK BP BQ BR BT BV BW BX BZ C3 C4 C5 C6 C7 C8 C9 CA CC CD \
            CE CF CG CH CJ CK CL CM CN CP CQ CS CT CV CW CX CY CZ D0 D1 D2 D4 D5 D7 D9 DA DB DC DD DE DF DG DJ DL DN \
            DP DQ DR DS DT DU DW DY E0 E1 E2 E3 E4 E7 E8 E9 ED EH EN EO ER ES EU EV EW EX EY F0 F3 F4 F5 F7 F8 FA FE \
            FF FG FM FN FT FW G1 G3 G4 G5 G6 G7 G8 G9 GB GC GD GF GH GI GN GO GQ GR GV GZ H1 H2 H3 H4 H5 H6 H7 H8 H9 \
            HA HD HE HF HG HH HJ HK HL HM HN HO HQ HR HW I1 I2 I3 I5 I8 I9 IB IJ IP IQ IR IY J0 J8 J9 JA JB JC JH JI \
            JJ K1 K2 K5 K6 K7 K8 KI KM KN KO KP KQ KR KS KT KX KY KZ L0 L1 L2 L3 L5 L8 LE LF LH LI LN LO LQ LU LV LX \
            LY LZ MF MI MT NI NP NW O0 O1 O2 O3 O4 O5 O6 O7 O8 O9 OA OB OD OH OI OJ OL OM OQ OR OS OT P4 P6 P7 PG PH \
            PI PP PZ Q0 Q1 R1 R3 R4 R5 R6 R7 R8 RA RB RC RD RE RF RG RH RI RJ RK RL RM RO RP RR RS RU RV RW RX RY RZ \
            S0 S1 S2 S3 S4 S5 S6 S7 S8 S9 SF SI SJ SL SN SO SP SS SU SV SX SY T3 T4 T5 T6 T7 T8 T9 TA TB TC TE TF TG \
            TH TI TJ TK TL TN TO TR TS TT TU TV TX U0 U3 UA UD UE UF UG UI UK UL UN UO UP UR US UT UW UX UZ V9 VA VB \
            VD VE VF VG VH VI VJ VK VL VM VN VP VQ VR VU VV VW VX VZ W8 X0 X2 X3 X4 X5 X6 X7 X8 X9 XA XB XC XD XE XG \
            XJ XK XL XN XO XS XU XV XW XY XZ Y1 Y2 Y3 Y4 Y5 Y7 Y9 YA YD YE YF YG YI YJ YK YL YM YR YS YT YU YV YW YX \
            Z1 Z3 Z5 Z7 Z8 ZA ZB ZC ZD ZK ZL ZM ZN ZO ZP ZS ZU ZV ZW ZX ZY ZZ";
        let codes: Vec<&str> = CODES.split_whitespace().collect();
        assert_eq!(codes.len(), 687);
        for code in codes {
            assert_eq!(map_status("X", code, ""), Status::Exception, "X/{code}");
        }
    }

    #[test]
    fn description_codes_are_compared_numerically_and_kept_verbatim() {
        let alert = |description_code: Value| {
            json!({
                "trackingNumber": "1Z5R89390357567127",
                "gmtActivityDate": "20250311", "gmtActivityTime": "141500",
                "activityStatus": {
                    "type": "I", "code": "OT", "description": "Out for Delivery", "descriptionCode": description_code
                }
            })
        };
        let padded = Ups.normalize(&alert(json!("021"))).unwrap();
        assert_eq!(padded[0].status, Status::OutForDelivery);
        assert_eq!(padded[0].carrier_status_detail.as_deref(), Some("I/021"));
        let number = Ups.normalize(&alert(json!(21))).unwrap();
        assert_eq!(number[0].status, Status::OutForDelivery);
        assert_eq!(number[0].carrier_status_detail.as_deref(), Some("I/21"));
        // Not a number at all: kept, and the scan code decides.
        let odd = Ups.normalize(&alert(json!("02A"))).unwrap();
        assert_eq!(odd[0].status, Status::OutForDelivery);
        assert_eq!(odd[0].carrier_status_detail.as_deref(), Some("I/02A"));
    }

    #[test]
    fn timestamps_follow_the_module_rule() {
        let ms = |date: &str, time: &str| date_time("d", date, "t", time).map(|n| n.and_utc().timestamp());
        assert_eq!(ms("20250311", "074700"), ms("20250311", "74700"));
        assert_eq!(ms("20250311", "0"), ms("20250311", "000000"));
        assert_eq!(ms("20250311", "7").unwrap(), ms("20250311", "000007").unwrap());
        for (date, time) in [
            ("2025031", "074700"),
            ("20251311", "074700"),
            ("20250311", "246000"),
            ("20250311", "7:47"),
            ("20250311", "1074700"),
            ("２０２５０３１１", "074700"),
        ] {
            assert_eq!(ms(date, time).unwrap_err().kind(), "invalid_timestamp", "{date} {time}");
        }
        let offset = |raw: &str| parse_offset("o", raw).map(|o| o.local_minus_utc());
        assert_eq!(offset("-05:00"), Ok(-5 * 3600));
        assert_eq!(offset("-5:00"), Ok(-5 * 3600));
        assert_eq!(offset("-0500"), Ok(-5 * 3600));
        assert_eq!(offset("+05:30"), Ok(5 * 3600 + 1800));
        assert_eq!(offset("+09"), Ok(9 * 3600));
        assert_eq!(offset("Z"), Ok(0));
        for raw in ["EST", "05:00", "-5:0", "+25:00", "-", "", "-05:00:00", "−05:00", "-1€", "+a€"] {
            assert_eq!(offset(raw).unwrap_err().kind(), "invalid_timestamp", "{raw}");
        }
    }

    #[test]
    fn gmt_pair_wins_then_offset_then_flagged_local() {
        let activity = |extra: Value| {
            let mut activity = json!({
                "date": "20250310", "time": "213000",
                "status": {"type": "I", "code": "AR", "description": "Arrived at Facility", "statusCode": "005"}
            });
            if let (Some(target), Some(extra)) = (activity.as_object_mut(), extra.as_object()) {
                target.extend(extra.clone());
            }
            json!({"trackResponse": {"shipment": [{"inquiryNumber": "1Z5R89390357567127",
                "package": [{"trackingNumber": "1Z5R89390357567127", "activity": [activity]}]}]}})
        };
        let one = |extra: Value| Ups.normalize(&activity(extra)).unwrap().remove(0);
        let gmt = one(json!({"gmtDate": "20250311", "gmtTime": "43000", "gmtOffset": "-07:00"}));
        assert_eq!((gmt.occurred_at.to_rfc3339(), gmt.time_assumed_utc), ("2025-03-11T04:30:00+00:00".into(), false));
        let offset = one(json!({"gmtOffset": "-7:00"}));
        assert_eq!(
            (offset.occurred_at.to_rfc3339(), offset.time_assumed_utc),
            ("2025-03-11T04:30:00+00:00".into(), false)
        );
        let half_gmt = one(json!({"gmtDate": "20250311", "gmtTime": ""}));
        assert_eq!(
            (half_gmt.occurred_at.to_rfc3339(), half_gmt.time_assumed_utc),
            ("2025-03-10T21:30:00+00:00".into(), true)
        );
        let bad_gmt = Ups.normalize(&activity(json!({"gmtDate": "2025-03-11", "gmtTime": "043000"}))).unwrap_err();
        assert_eq!(
            bad_gmt,
            RecordError::InvalidTimestamp {
                field: "trackResponse.shipment[0].package[0].activity[0].gmtDate".into(),
                value: "2025-03-11".into(),
                reason: "expected a calendar date as YYYYMMDD".into(),
            }
        );
    }

    /// The same scan from Track Alert and from the Track API must normalize to the
    /// same identity (tracking number, status, code, instant, place), so dedupe can
    /// recognise a back-filled history as the replay it is.
    #[test]
    fn track_alert_and_track_api_agree_on_one_scan() {
        let alert = json!({
            "trackingNumber": " 1Z5R89390357567127",
            "localActivityDate": "20250311", "localActivityTime": "081902",
            "gmtActivityDate": "20250311", "gmtActivityTime": "121902",
            "activityLocation": {"city": "Columbus", "stateProvince": "OH", "postalCode": "", "country": "US"},
            "activityStatus": {"type": "I", "code": "OT", "description": "Out for Delivery", "descriptionCode": "021"}
        });
        let api = json!({"trackResponse": {"shipment": [{"inquiryNumber": "1Z5R89390357567127", "package": [{
            "trackingNumber": "1Z5R89390357567127",
            "activity": [{
                "date": "20250311", "time": "081902", "gmtDate": "20250311", "gmtTime": "121902", "gmtOffset": "-04:00",
                "location": {
                    "address": {"city": "Columbus", "stateProvince": "OH", "countryCode": "US", "country": "US"}
                },
                "status": {"type": "I", "code": "OT", "description": "Out For Delivery Today", "statusCode": "021"}
            }]
        }]}]}});
        let (a, b) = (Ups.normalize(&alert).unwrap().remove(0), Ups.normalize(&api).unwrap().remove(0));
        assert_eq!(a.tracking_number, "1Z5R89390357567127");
        assert_eq!(
            (&a.tracking_number, a.status, &a.carrier_status_code, a.occurred_at, &a.location, &a.shipment_ref),
            (&b.tracking_number, b.status, &b.carrier_status_code, b.occurred_at, &b.location, &b.shipment_ref)
        );
    }

    #[test]
    fn shapes_empty_histories_and_precise_errors() {
        let not_found = json!({"trackResponse": {"shipment": [{"inquiryNumber": "1Z5R89390357567127",
            "warnings": [{"code": "TW0001", "message": "Tracking Information Not Found"}]}]}});
        assert_eq!(Ups.normalize(&not_found).unwrap(), vec![]);
        let error = json!({"response": {"errors": [{"code": "TV1002", "message": "Invalid inquiry number"}]}});
        let err = Ups.normalize(&error).unwrap_err();
        assert_eq!(err.kind(), "unsupported");
        assert!(err.to_string().contains("TV1002 Invalid inquiry number"), "{err}");
        assert_eq!(Ups.normalize(&json!({"shipments": []})).unwrap_err().kind(), "unsupported");
        assert_eq!(
            Ups.normalize(&json!("1Z")).unwrap_err(),
            RecordError::WrongType { field: "$".into(), expected: "object" }
        );
        assert_eq!(
            Ups.normalize(&json!({"trackResponse": {}})).unwrap_err(),
            RecordError::MissingField("trackResponse.shipment".into())
        );
        assert_eq!(
            Ups.normalize(&json!({"trackResponse": {"shipment": [{"package": [
                {"trackingNumber": "1Z", "activity": [{"date": "20250311", "time": "1200"}]}
            ]}]}}))
            .unwrap_err(),
            RecordError::MissingField("trackResponse.shipment[0].package[0].activity[0].status".into())
        );
        assert_eq!(
            Ups.normalize(&json!({"trackResponse": {"shipment": [{"package": [{"activity": []}]}]}})).unwrap_err(),
            RecordError::MissingField("trackResponse.shipment[0].package[0].trackingNumber".into())
        );
        assert_eq!(
            Ups.normalize(&json!({"trackResponse": {"shipment": [{"package": [7]}]}})).unwrap_err(),
            RecordError::WrongType { field: "trackResponse.shipment[0].package[0]".into(), expected: "object" }
        );
        let no_time = json!({"trackingNumber": "1Z5R89390357567127",
            "localActivityDate": "20250311", "localActivityTime": "",
            "gmtActivityDate": "", "gmtActivityTime": "", "activityStatus": {"type": "I"}});
        assert_eq!(Ups.normalize(&no_time).unwrap_err(), RecordError::MissingField("localActivityTime".into()));
        let bad_location = json!({"trackingNumber": "1Z5R89390357567127",
            "gmtActivityDate": "20250311", "gmtActivityTime": "1",
            "activityLocation": {"city": ["Columbus"]}, "activityStatus": {"type": "I"}});
        assert_eq!(
            Ups.normalize(&bad_location).unwrap_err(),
            RecordError::WrongType { field: "activityLocation.city".into(), expected: "string" }
        );
    }
}
