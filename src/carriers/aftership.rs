//! AfterShip: the tracking webhook (`ts`, `event`, `event_id`,
//! `is_tracking_first_tag`, `msg`: a Tracking with its whole `checkpoints` history).
//!
//! Sources: AfterShip's webhook specification (envelope fields and event codes),
//! its delivery status and sub-status enums (2025-04 and 2026-07 pages plus the
//! support article announcing Exception_016..018), the legacy v4 docs and the
//! official SDK checkpoint model (`checkpoint_time` forms; `country_iso3`/`zip`
//! renamed `country_region`/`postal_code` in newer API versions).
//!
//! Rules:
//! - Events: one per `msg.checkpoints[]` entry. `tracking_update`, `edd_revise` and
//!   `tracking_pending_time` all carry the whole Tracking; only the checkpoints are
//!   scans, so every one of these yields its checkpoints (replayed ones are dropped
//!   by dedupe) and the trigger itself is no event. Other event codes belong to
//!   other AfterShip products and are rejected as unsupported.
//! - Tracking number: `msg.tracking_number`, trimmed. No `shipment_ref`: `msg.id`
//!   is AfterShip's tracking id, not the carrier's shipment.
//! - Status: the checkpoint's `subtag` ([`map_status`]), its `tag` when the subtag is
//!   absent or newer than this table. The courier's `raw_tag` goes verbatim into
//!   `carrier_status_code` (empty when AfterShip gives none) and the subtag (or the
//!   tag) into `carrier_status_detail`, the same split as EasyPost's.
//! - Time: `checkpoint_time` is documented as "" | `YYYY-MM-DD` |
//!   `YYYY-MM-DDTHH:MM:SS` | `YYYY-MM-DDTHH:MM:SS+TIMEZONE`. The zone-less forms are
//!   the courier's local time with the zone unknown: read as UTC and flagged
//!   (`time_assumed_utc`); a date alone is midnight of that date, flagged. The empty
//!   string means the courier gave no time: that checkpoint is skipped (not dead
//!   lettered, since it is a documented value and the rest of the history is good;
//!   an instant-less scan cannot be ordered or deduplicated). `null` is treated like
//!   "". A checkpoint without the key at all is not AfterShip's format: missing_field.
//! - `event_id` (UUID of the webhook delivery) is kept only as `source_event_id`.
//! - Location: `city`, `state`, `zip`/`postal_code` and the ISO alpha-3
//!   `country_iso3`/`country_region`, converted to alpha-2. The free-text `location`
//!   is not split into parts (its layout differs per courier).

use serde_json::Value;

use super::json::{country_code, opt_array, opt_str, req_obj, req_str, root_obj};
use super::time::parse_iso;
use super::Carrier;
use crate::error::{clip, RecordError};
use crate::event::{CarrierEvent, Location, Status};

pub struct AfterShip;

/// Event codes whose `msg` is a Tracking (S1 event table).
const TRACKING_EVENTS: [&str; 3] = ["tracking_update", "edd_revise", "tracking_pending_time"];

/// Every documented subtag whose meaning is more specific than its tag's.
/// Subtags not listed here fall back to the tag ([`tag_status`]).
const SUBTAGS: [(&str, Status); 4] = [
    // "Acceptance scan": the carrier has the parcel.
    ("InTransit_002", Status::PickedUp),
    // Listed under OutForDelivery, but described as "arrived at sorting center and
    // is available for pickup": the consignee has to collect it.
    ("OutForDelivery_002", Status::AvailableForPickup),
    // "Returning to sender" / "Returned to sender" are Exception subtags at
    // AfterShip; both mean the parcel left the forward path for good. The canonical
    // model has one return status (terminal of the return path), as EasyPost's
    // return_to_sender and Shippo's RETURNED, which also cover both.
    ("Exception_010", Status::ReturnedToSender),
    ("Exception_011", Status::ReturnedToSender),
];

/// A checkpoint's tag (or the tag part of a subtag) to canonical status.
fn tag_status(tag: &str) -> Option<Status> {
    let status = match tag.to_ascii_lowercase().as_str() {
        // "Pending": not tracked yet; "Expired": AfterShip stopped tracking. Neither
        // says anything about the parcel.
        "pending" | "expired" => Status::Unknown,
        "inforeceived" => Status::LabelCreated,
        "intransit" => Status::InTransit,
        "outfordelivery" => Status::OutForDelivery,
        "availableforpickup" => Status::AvailableForPickup,
        "attemptfail" => Status::DeliveryAttempted,
        "delivered" => Status::Delivered,
        // Includes the lost/damaged/refused subtags: there is no canonical "lost",
        // and a problem report never overrides progress.
        "exception" => Status::Exception,
        _ => return None,
    };
    Some(status)
}

/// AfterShip `subtag` (with `tag` as the fallback) to canonical status. Either may
/// be empty.
pub fn map_status(subtag: &str, tag: &str) -> Status {
    let subtag = subtag.trim();
    if let Some((_, status)) = SUBTAGS.iter().find(|(known, _)| known.eq_ignore_ascii_case(subtag)) {
        return *status;
    }
    // Subtags are `<Tag>_<NNN>`: a subtag newer than this table still names its tag.
    let family = subtag.split_once('_').map_or(subtag, |(family, _)| family);
    tag_status(tag.trim()).or_else(|| tag_status(family)).unwrap_or(Status::Unknown)
}

impl Carrier for AfterShip {
    fn name(&self) -> &str {
        "aftership"
    }

    fn normalize(&self, body: &Value) -> Result<Vec<CarrierEvent>, RecordError> {
        let root = root_obj(body)?;
        let event = req_str(root, "event", "")?;
        if !TRACKING_EVENTS.contains(&event.as_str()) {
            return Err(RecordError::Unsupported(format!(
                "AfterShip event `{}` is not a tracking event (expected one of {})",
                clip(&event),
                TRACKING_EVENTS.join(", ")
            )));
        }
        let event_id = opt_str(root, "event_id", "")?;
        let tracking = req_obj(root, "msg", "")?;
        let tracking_number = req_str(tracking, "tracking_number", "msg")?;
        let checkpoints = opt_array(tracking, "checkpoints", "msg")?;
        let mut events = Vec::with_capacity(checkpoints.len());
        for (index, checkpoint) in checkpoints.iter().enumerate() {
            let path = format!("msg.checkpoints[{index}]");
            if !checkpoint.is_object() {
                return Err(RecordError::WrongType { field: path, expected: "object" });
            }
            if checkpoint.get("checkpoint_time").is_none() {
                return Err(RecordError::MissingField(format!("{path}.checkpoint_time")));
            }
            let Some(time) = opt_str(checkpoint, "checkpoint_time", &path)? else {
                continue; // "" or null: the courier gave no time (see module docs)
            };
            let instant = parse_iso(&format!("{path}.checkpoint_time"), &time)?;
            let tag = opt_str(checkpoint, "tag", &path)?;
            let subtag = opt_str(checkpoint, "subtag", &path)?;
            let status = map_status(subtag.as_deref().unwrap_or(""), tag.as_deref().unwrap_or(""));
            let postal_code = match opt_str(checkpoint, "postal_code", &path)? {
                Some(code) => Some(code),
                None => opt_str(checkpoint, "zip", &path)?,
            };
            let country = match opt_str(checkpoint, "country_region", &path)? {
                Some(code) => Some(code),
                None => opt_str(checkpoint, "country_iso3", &path)?,
            };
            let description = match opt_str(checkpoint, "message", &path)? {
                Some(message) => Some(message),
                None => opt_str(checkpoint, "subtag_message", &path)?,
            };
            events.push(CarrierEvent {
                tracking_number: tracking_number.clone(),
                shipment_ref: None,
                status,
                carrier_status_code: opt_str(checkpoint, "raw_tag", &path)?.unwrap_or_default(),
                carrier_status_detail: subtag.or(tag),
                description,
                occurred_at: instant.utc,
                time_assumed_utc: instant.assumed_utc,
                location: Location {
                    city: opt_str(checkpoint, "city", &path)?,
                    region: opt_str(checkpoint, "state", &path)?,
                    postal_code,
                    country: country.and_then(alpha2),
                },
                source_event_id: event_id.clone(),
            });
        }
        Ok(events)
    }
}

/// ISO 3166-1 alpha-3 (what AfterShip sends) to alpha-2 (the canonical form). An
/// alpha-2 code passes through; anything else is not a country code.
fn alpha2(code: String) -> Option<String> {
    let upper = code.trim().to_ascii_uppercase();
    if upper.len() == 2 {
        return country_code(Some(upper));
    }
    ISO3_TO_ISO2.binary_search_by(|(alpha3, _)| (*alpha3).cmp(upper.as_str())).ok().map(|i| ISO3_TO_ISO2[i].1.to_string())
}

/// ISO 3166-1 (Debian iso-codes), sorted by alpha-3 for binary search.
#[rustfmt::skip]
const ISO3_TO_ISO2: [(&str, &str); 249] = [
    ("ABW", "AW"), ("AFG", "AF"), ("AGO", "AO"), ("AIA", "AI"), ("ALA", "AX"), ("ALB", "AL"), ("AND", "AD"),
    ("ARE", "AE"), ("ARG", "AR"), ("ARM", "AM"), ("ASM", "AS"), ("ATA", "AQ"), ("ATF", "TF"), ("ATG", "AG"),
    ("AUS", "AU"), ("AUT", "AT"), ("AZE", "AZ"), ("BDI", "BI"), ("BEL", "BE"), ("BEN", "BJ"), ("BES", "BQ"),
    ("BFA", "BF"), ("BGD", "BD"), ("BGR", "BG"), ("BHR", "BH"), ("BHS", "BS"), ("BIH", "BA"), ("BLM", "BL"),
    ("BLR", "BY"), ("BLZ", "BZ"), ("BMU", "BM"), ("BOL", "BO"), ("BRA", "BR"), ("BRB", "BB"), ("BRN", "BN"),
    ("BTN", "BT"), ("BVT", "BV"), ("BWA", "BW"), ("CAF", "CF"), ("CAN", "CA"), ("CCK", "CC"), ("CHE", "CH"),
    ("CHL", "CL"), ("CHN", "CN"), ("CIV", "CI"), ("CMR", "CM"), ("COD", "CD"), ("COG", "CG"), ("COK", "CK"),
    ("COL", "CO"), ("COM", "KM"), ("CPV", "CV"), ("CRI", "CR"), ("CUB", "CU"), ("CUW", "CW"), ("CXR", "CX"),
    ("CYM", "KY"), ("CYP", "CY"), ("CZE", "CZ"), ("DEU", "DE"), ("DJI", "DJ"), ("DMA", "DM"), ("DNK", "DK"),
    ("DOM", "DO"), ("DZA", "DZ"), ("ECU", "EC"), ("EGY", "EG"), ("ERI", "ER"), ("ESH", "EH"), ("ESP", "ES"),
    ("EST", "EE"), ("ETH", "ET"), ("FIN", "FI"), ("FJI", "FJ"), ("FLK", "FK"), ("FRA", "FR"), ("FRO", "FO"),
    ("FSM", "FM"), ("GAB", "GA"), ("GBR", "GB"), ("GEO", "GE"), ("GGY", "GG"), ("GHA", "GH"), ("GIB", "GI"),
    ("GIN", "GN"), ("GLP", "GP"), ("GMB", "GM"), ("GNB", "GW"), ("GNQ", "GQ"), ("GRC", "GR"), ("GRD", "GD"),
    ("GRL", "GL"), ("GTM", "GT"), ("GUF", "GF"), ("GUM", "GU"), ("GUY", "GY"), ("HKG", "HK"), ("HMD", "HM"),
    ("HND", "HN"), ("HRV", "HR"), ("HTI", "HT"), ("HUN", "HU"), ("IDN", "ID"), ("IMN", "IM"), ("IND", "IN"),
    ("IOT", "IO"), ("IRL", "IE"), ("IRN", "IR"), ("IRQ", "IQ"), ("ISL", "IS"), ("ISR", "IL"), ("ITA", "IT"),
    ("JAM", "JM"), ("JEY", "JE"), ("JOR", "JO"), ("JPN", "JP"), ("KAZ", "KZ"), ("KEN", "KE"), ("KGZ", "KG"),
    ("KHM", "KH"), ("KIR", "KI"), ("KNA", "KN"), ("KOR", "KR"), ("KWT", "KW"), ("LAO", "LA"), ("LBN", "LB"),
    ("LBR", "LR"), ("LBY", "LY"), ("LCA", "LC"), ("LIE", "LI"), ("LKA", "LK"), ("LSO", "LS"), ("LTU", "LT"),
    ("LUX", "LU"), ("LVA", "LV"), ("MAC", "MO"), ("MAF", "MF"), ("MAR", "MA"), ("MCO", "MC"), ("MDA", "MD"),
    ("MDG", "MG"), ("MDV", "MV"), ("MEX", "MX"), ("MHL", "MH"), ("MKD", "MK"), ("MLI", "ML"), ("MLT", "MT"),
    ("MMR", "MM"), ("MNE", "ME"), ("MNG", "MN"), ("MNP", "MP"), ("MOZ", "MZ"), ("MRT", "MR"), ("MSR", "MS"),
    ("MTQ", "MQ"), ("MUS", "MU"), ("MWI", "MW"), ("MYS", "MY"), ("MYT", "YT"), ("NAM", "NA"), ("NCL", "NC"),
    ("NER", "NE"), ("NFK", "NF"), ("NGA", "NG"), ("NIC", "NI"), ("NIU", "NU"), ("NLD", "NL"), ("NOR", "NO"),
    ("NPL", "NP"), ("NRU", "NR"), ("NZL", "NZ"), ("OMN", "OM"), ("PAK", "PK"), ("PAN", "PA"), ("PCN", "PN"),
    ("PER", "PE"), ("PHL", "PH"), ("PLW", "PW"), ("PNG", "PG"), ("POL", "PL"), ("PRI", "PR"), ("PRK", "KP"),
    ("PRT", "PT"), ("PRY", "PY"), ("PSE", "PS"), ("PYF", "PF"), ("QAT", "QA"), ("REU", "RE"), ("ROU", "RO"),
    ("RUS", "RU"), ("RWA", "RW"), ("SAU", "SA"), ("SDN", "SD"), ("SEN", "SN"), ("SGP", "SG"), ("SGS", "GS"),
    ("SHN", "SH"), ("SJM", "SJ"), ("SLB", "SB"), ("SLE", "SL"), ("SLV", "SV"), ("SMR", "SM"), ("SOM", "SO"),
    ("SPM", "PM"), ("SRB", "RS"), ("SSD", "SS"), ("STP", "ST"), ("SUR", "SR"), ("SVK", "SK"), ("SVN", "SI"),
    ("SWE", "SE"), ("SWZ", "SZ"), ("SXM", "SX"), ("SYC", "SC"), ("SYR", "SY"), ("TCA", "TC"), ("TCD", "TD"),
    ("TGO", "TG"), ("THA", "TH"), ("TJK", "TJ"), ("TKL", "TK"), ("TKM", "TM"), ("TLS", "TL"), ("TON", "TO"),
    ("TTO", "TT"), ("TUN", "TN"), ("TUR", "TR"), ("TUV", "TV"), ("TWN", "TW"), ("TZA", "TZ"), ("UGA", "UG"),
    ("UKR", "UA"), ("UMI", "UM"), ("URY", "UY"), ("USA", "US"), ("UZB", "UZ"), ("VAT", "VA"), ("VCT", "VC"),
    ("VEN", "VE"), ("VGB", "VG"), ("VIR", "VI"), ("VNM", "VN"), ("VUT", "VU"), ("WLF", "WF"), ("WSM", "WS"),
    ("YEM", "YE"), ("ZAF", "ZA"), ("ZMB", "ZM"), ("ZWE", "ZW"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every documented subtag (2025-04 and 2026-07 enum pages, support article).
    #[test]
    fn every_documented_subtag_is_mapped() {
        use Status::*;
        let table = [
            ("Pending_001", Unknown),
            ("InfoReceived_001", LabelCreated),
            ("InTransit_001", InTransit),
            ("InTransit_002", PickedUp),
            ("InTransit_003", InTransit),
            ("InTransit_004", InTransit),
            ("InTransit_005", InTransit),
            ("InTransit_006", InTransit),
            ("InTransit_007", InTransit),
            ("InTransit_008", InTransit),
            ("InTransit_009", InTransit),
            ("OutForDelivery_001", OutForDelivery),
            ("OutForDelivery_002", AvailableForPickup),
            ("OutForDelivery_003", OutForDelivery),
            ("OutForDelivery_004", OutForDelivery),
            ("AvailableForPickup_001", AvailableForPickup),
            ("AttemptFail_001", DeliveryAttempted),
            ("AttemptFail_002", DeliveryAttempted),
            ("AttemptFail_003", DeliveryAttempted),
            ("Delivered_001", Delivered),
            ("Delivered_002", Delivered),
            ("Delivered_003", Delivered),
            ("Delivered_004", Delivered),
            ("Delivered_005", Delivered),
            ("Exception_001", Exception),
            ("Exception_002", Exception),
            ("Exception_003", Exception),
            ("Exception_004", Exception),
            ("Exception_005", Exception),
            ("Exception_006", Exception),
            ("Exception_007", Exception),
            ("Exception_008", Exception),
            ("Exception_009", Exception),
            ("Exception_010", ReturnedToSender),
            ("Exception_011", ReturnedToSender),
            ("Exception_012", Exception),
            ("Exception_013", Exception),
            ("Exception_016", Exception),
            ("Exception_017", Exception),
            ("Exception_018", Exception),
            ("Expired_001", Unknown),
        ];
        for (subtag, expected) in table {
            let tag = subtag.split('_').next().unwrap();
            assert_eq!(map_status(subtag, tag), expected, "{subtag} with its tag");
            assert_eq!(map_status(subtag, ""), expected, "{subtag} without a tag");
        }
    }

    #[test]
    fn tag_is_the_fallback_for_missing_or_newer_subtags() {
        assert_eq!(map_status("", "InTransit"), Status::InTransit);
        assert_eq!(map_status("", "AttemptFail"), Status::DeliveryAttempted);
        assert_eq!(map_status("InTransit_010", "InTransit"), Status::InTransit);
        assert_eq!(map_status("Pending_004", ""), Status::Unknown);
        assert_eq!(map_status("Exception_014", ""), Status::Exception);
        assert_eq!(map_status("", ""), Status::Unknown);
        assert_eq!(map_status("Teleported_001", "Teleported"), Status::Unknown);
        // The subtag wins over a disagreeing tag.
        assert_eq!(map_status("OutForDelivery_002", "OutForDelivery"), Status::AvailableForPickup);
    }

    #[test]
    fn iso_alpha3_countries_become_alpha2() {
        assert!(ISO3_TO_ISO2.windows(2).all(|w| w[0].0 < w[1].0), "table must stay sorted");
        assert_eq!(alpha2("USA".into()).as_deref(), Some("US"));
        assert_eq!(alpha2(" deu ".into()).as_deref(), Some("DE"));
        assert_eq!(alpha2("se".into()).as_deref(), Some("SE"));
        assert_eq!(alpha2("XKX".into()), None);
        assert_eq!(alpha2("United States".into()), None);
    }

    fn body(checkpoints: Value) -> Value {
        json!({"ts": 1_747_000_000, "event": "tracking_update", "event_id": "e-1",
               "msg": {"tracking_number": "1Z1", "slug": "ups", "checkpoints": checkpoints}})
    }

    #[test]
    fn checkpoint_time_forms() {
        let events = AfterShip
            .normalize(&body(json!([
                {"checkpoint_time": "", "tag": "InfoReceived", "subtag": "InfoReceived_001"},
                {"checkpoint_time": null, "tag": "InTransit", "subtag": "InTransit_001"},
                {"checkpoint_time": "2025-05-12", "tag": "InTransit", "subtag": "InTransit_002"},
                {"checkpoint_time": "2025-05-12T18:10:00", "tag": "InTransit", "subtag": "InTransit_003"},
                {"checkpoint_time": "2025-05-13T00:25:00+05:30", "tag": "InTransit", "subtag": "InTransit_007"},
            ])))
            .unwrap();
        let got: Vec<(String, bool)> =
            events.iter().map(|e| (crate::event::format_utc(&e.occurred_at), e.time_assumed_utc)).collect();
        assert_eq!(
            got,
            [
                ("2025-05-12T00:00:00.000Z".to_string(), true),
                ("2025-05-12T18:10:00.000Z".to_string(), true),
                ("2025-05-12T18:55:00.000Z".to_string(), false),
            ]
        );
        let missing = AfterShip.normalize(&body(json!([{"tag": "InTransit"}]))).unwrap_err();
        assert_eq!(missing, RecordError::MissingField("msg.checkpoints[0].checkpoint_time".into()));
        let unreadable = AfterShip.normalize(&body(json!([{"checkpoint_time": "12/05/2025 10:00"}]))).unwrap_err();
        assert_eq!(unreadable.kind(), "invalid_timestamp");
    }

    #[test]
    fn envelope_checks() {
        assert_eq!(AfterShip.normalize(&json!({"event": "return_update", "msg": {}})).unwrap_err().kind(), "unsupported");
        assert_eq!(AfterShip.normalize(&json!({"msg": {}})).unwrap_err(), RecordError::MissingField("event".into()));
        let no_number = json!({"event": "tracking_update", "msg": {"checkpoints": []}});
        assert_eq!(AfterShip.normalize(&no_number).unwrap_err(), RecordError::MissingField("msg.tracking_number".into()));
        let edd = json!({"event": "edd_revise", "msg": {"tracking_number": "1", "checkpoints": []}});
        assert_eq!(AfterShip.normalize(&edd).unwrap(), vec![]);
    }
}
