//! Per-shipment status ordering: every event ensures its
//! milestone, but the shipment's status only moves forward along the hierarchy.
//!
//! Rules, in order:
//! - `returned_to_sender` is terminal: nothing moves a returned shipment.
//! - `cancelled` is terminal before pickup: it applies only while nothing at or past
//!   `picked_up` was seen, and then nothing else moves the shipment (a carrier
//!   scanning a voided label is reported as a regression prevented, not a revival).
//! - `unknown` never changes the status; `exception` never overrides a status with a
//!   rank (it is shown only while nothing better is known).
//! - Otherwise the higher rank wins; `delivered` is the top of the forward path,
//!   left only along the return path (`returned_to_sender`).
//! `latest_status` is the status of the latest event by `occurred_at`, ties broken
//! by rank, so delivery-attempt cycles stay visible without flipping the status.

use chrono::{DateTime, TimeZone, Utc};

use crate::error::StoreError;
use crate::event::Status;
use crate::state::{Keyspace, Scope};

/// What the store keeps per shipment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShipmentState {
    /// Furthest point reached (never moves back).
    pub shipment_status: Status,
    /// Status of the latest event by occurred_at.
    pub latest_status: Status,
    pub latest_occurred_at: DateTime<Utc>,
    /// When this record may be forgotten (refreshed by every event).
    pub expires_at_ms: i64,
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// The event would have moved the status backwards (or out of a terminal state).
    pub regression_prevented: bool,
    /// The event is older than the latest one seen for the shipment.
    pub out_of_order: bool,
}

/// The status after `incoming`, given the current one (`None` for a new shipment).
pub fn advance(current: Option<Status>, incoming: Status) -> Status {
    let Some(current) = current else {
        return incoming;
    };
    match (current, incoming) {
        (Status::ReturnedToSender | Status::Cancelled, _) => current,
        (_, Status::Unknown) => current,
        (Status::Unknown, _) => incoming,
        (Status::Exception, Status::Cancelled) => incoming,
        (_, Status::Exception) => current,
        (_, Status::Cancelled) if current.rank() < Status::PickedUp.rank() => incoming,
        (_, Status::Cancelled) => current,
        (Status::Exception, _) => incoming,
        _ if incoming.rank() > current.rank() => incoming,
        _ => current,
    }
}

impl ShipmentState {
    pub fn new(status: Status, occurred_at: DateTime<Utc>, expires_at_ms: i64) -> Self {
        ShipmentState { shipment_status: status, latest_status: status, latest_occurred_at: occurred_at, expires_at_ms }
    }

    /// Apply one new event.
    pub fn apply(&mut self, status: Status, occurred_at: DateTime<Utc>, expires_at_ms: i64) -> Applied {
        let next = advance(Some(self.shipment_status), status);
        let regression_prevented = next == self.shipment_status && moves_backwards(self.shipment_status, status);
        let out_of_order = occurred_at < self.latest_occurred_at;
        if occurred_at > self.latest_occurred_at
            || (occurred_at == self.latest_occurred_at && status.rank() > self.latest_status.rank())
        {
            self.latest_status = status;
            self.latest_occurred_at = occurred_at;
        }
        self.shipment_status = next;
        self.expires_at_ms = self.expires_at_ms.max(expires_at_ms);
        Applied { regression_prevented, out_of_order }
    }

    /// Fixed 18-byte encoding: status index, latest index, latest ms (BE), expiry (BE).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(18);
        out.push(status_index(self.shipment_status));
        out.push(status_index(self.latest_status));
        out.extend_from_slice(&self.latest_occurred_at.timestamp_millis().to_be_bytes());
        out.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ShipmentState, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt { keyspace: Keyspace::Shipments.name(), reason };
        if bytes.len() != 18 {
            return Err(corrupt(format!("expected 18 bytes, found {}", bytes.len())));
        }
        let status = |i: u8| Status::ALL.get(i as usize).copied().ok_or_else(|| corrupt(format!("status index {i}")));
        let ms = |range: std::ops::Range<usize>| {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(&bytes[range]);
            i64::from_be_bytes(buf)
        };
        let latest_ms = ms(2..10);
        Ok(ShipmentState {
            shipment_status: status(bytes[0])?,
            latest_status: status(bytes[1])?,
            latest_occurred_at: Utc
                .timestamp_millis_opt(latest_ms)
                .single()
                .ok_or_else(|| corrupt(format!("timestamp {latest_ms}")))?,
            expires_at_ms: ms(10..18),
        })
    }
}

/// Would `incoming` have moved `current` back (or out of a terminal state)?
fn moves_backwards(current: Status, incoming: Status) -> bool {
    match incoming {
        Status::Unknown | Status::Exception => false,
        _ if current == incoming => false,
        _ if matches!(current, Status::ReturnedToSender | Status::Cancelled) => true,
        Status::Cancelled => true,
        _ => incoming.rank() < current.rank(),
    }
}

fn status_index(status: Status) -> u8 {
    Status::ALL.iter().position(|s| *s == status).unwrap_or(0) as u8
}

/// Store key of a shipment's state.
pub fn shipment_key(scope: Scope, tenant: &str, carrier: &str, tracking: &str, shipment_ref: Option<&str>) -> Vec<u8> {
    let mut enc = crate::dedupe::Encoder::new(b"waymark.shipment.v1");
    enc.str(tenant);
    enc.str(carrier);
    enc.str(tracking);
    enc.opt(shipment_ref);
    let mut key = Vec::with_capacity(24);
    key.extend_from_slice(&scope.0);
    key.extend_from_slice(&enc.finish().as_bytes()[..16]);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::*;

    #[test]
    fn forward_only_with_side_branches() {
        assert_eq!(advance(None, Exception), Exception);
        assert_eq!(advance(Some(InTransit), PickedUp), InTransit);
        assert_eq!(advance(Some(InTransit), OutForDelivery), OutForDelivery);
        assert_eq!(advance(Some(Delivered), InTransit), Delivered);
        assert_eq!(advance(Some(OutForDelivery), Exception), OutForDelivery);
        assert_eq!(advance(Some(Exception), InTransit), InTransit);
        assert_eq!(advance(Some(Delivered), Unknown), Delivered);
        assert_eq!(advance(Some(Unknown), LabelCreated), LabelCreated);
        assert_eq!(advance(Some(Delivered), ReturnedToSender), ReturnedToSender);
        assert_eq!(advance(Some(ReturnedToSender), Delivered), ReturnedToSender);
        assert_eq!(advance(Some(LabelCreated), Cancelled), Cancelled);
        assert_eq!(advance(Some(InTransit), Cancelled), InTransit);
        assert_eq!(advance(Some(Cancelled), PickedUp), Cancelled);
        assert_eq!(advance(Some(DeliveryAttempted), OutForDelivery), DeliveryAttempted);
    }

    #[test]
    fn apply_tracks_latest_and_flags_regressions() {
        let t = |s: i64| Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap();
        let mut state = ShipmentState::new(InTransit, t(10), 0);
        let late_pickup = state.apply(PickedUp, t(5), 0);
        assert_eq!(late_pickup, Applied { regression_prevented: true, out_of_order: true });
        assert_eq!(state.shipment_status, InTransit);
        assert_eq!(state.latest_status, InTransit);
        let attempt = state.apply(DeliveryAttempted, t(20), 0);
        assert_eq!(attempt, Applied::default());
        let back_out = state.apply(OutForDelivery, t(30), 0);
        assert!(back_out.regression_prevented);
        assert_eq!((state.shipment_status, state.latest_status), (DeliveryAttempted, OutForDelivery));
        assert_eq!(ShipmentState::decode(&state.encode()).unwrap(), state);
        assert!(ShipmentState::decode(&[1, 2]).is_err());
    }
}
