//! The canonical tracking event (schemas/tracking-event.schema.json) and the
//! canonical status hierarchy.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Canonical shipment status. The forward path is ranked; the other statuses are
/// side branches with their own rules (see [`crate::order`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Unmapped or informational: kept in the timeline, never changes the status.
    Unknown,
    LabelCreated,
    PickedUp,
    InTransit,
    OutForDelivery,
    DeliveryAttempted,
    AvailableForPickup,
    Delivered,
    /// A problem report: never overrides a higher rank.
    Exception,
    /// Terminal of the return path.
    ReturnedToSender,
    /// Terminal before pickup.
    Cancelled,
}

impl Status {
    /// All statuses, for tables and tests.
    pub const ALL: [Status; 11] = [
        Status::Unknown,
        Status::LabelCreated,
        Status::PickedUp,
        Status::InTransit,
        Status::OutForDelivery,
        Status::DeliveryAttempted,
        Status::AvailableForPickup,
        Status::Delivered,
        Status::Exception,
        Status::ReturnedToSender,
        Status::Cancelled,
    ];

    /// Rank in the status hierarchy. `exception` and `cancelled` are
    /// off the forward path and have no rank of their own (0).
    pub fn rank(self) -> u8 {
        match self {
            Status::Unknown | Status::Exception | Status::Cancelled => 0,
            Status::LabelCreated => 10,
            Status::PickedUp => 20,
            Status::InTransit => 30,
            Status::OutForDelivery => 40,
            Status::DeliveryAttempted => 45,
            Status::AvailableForPickup => 50,
            Status::Delivered => 60,
            Status::ReturnedToSender => 70,
        }
    }

    /// The snake_case name used on the wire and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::LabelCreated => "label_created",
            Status::PickedUp => "picked_up",
            Status::InTransit => "in_transit",
            Status::OutForDelivery => "out_for_delivery",
            Status::DeliveryAttempted => "delivery_attempted",
            Status::AvailableForPickup => "available_for_pickup",
            Status::Delivered => "delivered",
            Status::Exception => "exception",
            Status::ReturnedToSender => "returned_to_sender",
            Status::Cancelled => "cancelled",
        }
    }

    /// Inverse of [`Status::as_str`].
    pub fn parse(name: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a scan happened. Every part is optional: carriers omit or null them freely.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
    /// ISO 3166-1 alpha-2, upper case.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
}

impl Location {
    pub fn is_empty(&self) -> bool {
        self.city.is_none() && self.region.is_none() && self.postal_code.is_none() && self.country.is_none()
    }

    /// The same place as dedupe compares places: each part trimmed, case ignored.
    pub fn eq_ignore_case(&self, other: &Location) -> bool {
        let same = |a: &Option<String>, b: &Option<String>| match (a, b) {
            (Some(a), Some(b)) => a.trim().to_uppercase() == b.trim().to_uppercase(),
            (None, None) => true,
            _ => false,
        };
        same(&self.city, &other.city) && same(&self.region, &other.region) && same(&self.postal_code, &other.postal_code) && same(&self.country, &other.country)
    }
}

/// Where a raw record came from. Volatile: never part of identity or content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRef {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// What a carrier module extracts from one history entry, before the envelope's
/// context (tenant, source, received_at) is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarrierEvent {
    /// Tracking number, trimmed.
    pub tracking_number: String,
    /// The carrier's own shipment id when it differs from the tracking number
    /// (reused tracking numbers are told apart by it).
    pub shipment_ref: Option<String>,
    pub status: Status,
    /// The raw code, verbatim.
    pub carrier_status_code: String,
    /// The raw sub-code, verbatim, if the carrier has one.
    pub carrier_status_detail: Option<String>,
    pub description: Option<String>,
    pub occurred_at: DateTime<Utc>,
    /// The carrier gave a local time without an offset and the carrier's documented
    /// rule (or our fallback) read it as UTC.
    pub time_assumed_utc: bool,
    pub location: Location,
    /// The carrier's event id, if any. Treated as volatile (replays change ids).
    pub source_event_id: Option<String>,
}

/// One canonical tracking event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingEvent {
    pub tenant_id: String,
    pub carrier: String,
    pub tracking_number: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shipment_ref: Option<String>,
    pub status: Status,
    pub carrier_status_code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub carrier_status_detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(with = "rfc3339_millis")]
    pub occurred_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub time_assumed_utc: bool,
    pub location: Location,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_event_id: Option<String>,
    #[serde(with = "rfc3339_millis")]
    pub received_at: DateTime<Utc>,
    pub source: SourceRef,
}

/// One canonical RFC 3339 rendering for every timestamp we write: UTC, `Z`, milliseconds.
pub fn format_utc(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub mod rfc3339_millis {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_utc(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip_and_match_serde() {
        for status in Status::ALL {
            assert_eq!(Status::parse(status.as_str()), Some(status));
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
    }

    #[test]
    fn forward_path_ranks_follow_design() {
        let forward = [
            Status::LabelCreated,
            Status::PickedUp,
            Status::InTransit,
            Status::OutForDelivery,
            Status::DeliveryAttempted,
            Status::AvailableForPickup,
            Status::Delivered,
            Status::ReturnedToSender,
        ];
        for pair in forward.windows(2) {
            assert!(pair[0].rank() < pair[1].rank(), "{:?} !< {:?}", pair[0], pair[1]);
        }
        assert_eq!(Status::Delivered.rank(), 60);
        assert_eq!(Status::Unknown.rank(), 0);
    }
}
