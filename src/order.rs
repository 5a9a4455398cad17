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
//!
//! **Generations.** Carriers reuse tracking numbers. A shipment that reached a
//! terminal status (`delivered`, `returned_to_sender`, `cancelled`), followed by a
//! new event with an early status (`label_created`, `picked_up`) whose own time is
//! more than the carrier's generation gap after the shipment's latest event, is a
//! new parcel: a new generation, whose status starts afresh and whose milestones
//! get their own ids. Decided by event times only, never by arrival: a provider
//! replaying the old parcel's history days later carries the old times and
//! starts nothing. A late scan of an earlier generation (its time before the
//! current generation began) is that generation's milestone and leaves the
//! current one alone.
//!
//! **Suspected false deliveries.** A `delivered` followed by a later in-transit or
//! out-for-delivery scan is often a mis-scan. The status is never changed
//! automatically (a delivered parcel stays delivered); such scans are counted and
//! logged, so an operator can find the cases.

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
    /// Which use of the tracking number this is (0: the first known).
    pub generation: u32,
    /// The time of the event that began this generation (0 for the first).
    pub generation_start_ms: i64,
    /// Where the previous generation ended (its late scans carry it as their
    /// `shipment_status`, so its timeline never moves back); the first
    /// generation's is its own status.
    pub previous_status: Status,
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// The event would have moved the status backwards (or out of a terminal state).
    pub regression_prevented: bool,
    /// The event is older than the latest one seen for the shipment.
    pub out_of_order: bool,
    /// The event began a new generation of its tracking number.
    pub new_generation: bool,
    /// An in-transit or out-for-delivery scan later than a `delivered` one.
    pub suspected_false_delivery: bool,
}

/// How long after a shipment's latest event an early-status event means a
/// reused tracking number, by default: 30 days. Longer than a parcel's own
/// legitimate early scans after a terminal one (a return picked up within the
/// usual 30-day return window, a label re-printed), shorter than the months
/// after which carriers reuse numbers.
pub const DEFAULT_GENERATION_GAP: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Is `status` where a parcel's life begins?
fn is_early(status: Status) -> bool {
    matches!(status, Status::LabelCreated | Status::PickedUp)
}

/// Does the life of a parcel end at `status`?
fn is_terminal(status: Status) -> bool {
    matches!(status, Status::Delivered | Status::ReturnedToSender | Status::Cancelled)
}

/// Where a new event with `status` at `occurred_at` belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Belongs {
    /// The current generation.
    Current,
    /// A new generation: the tracking number was reused.
    NewGeneration,
    /// An earlier generation (its time is before the current one began).
    Earlier,
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
        ShipmentState {
            shipment_status: status,
            latest_status: status,
            latest_occurred_at: occurred_at,
            expires_at_ms,
            generation: 0,
            generation_start_ms: 0,
            previous_status: status,
        }
    }

    /// The state of the next generation, begun by an event with `status` at `occurred_at`.
    pub fn next_generation(&self, status: Status, occurred_at: DateTime<Utc>, expires_at_ms: i64) -> Self {
        ShipmentState {
            generation: self.generation.saturating_add(1),
            generation_start_ms: occurred_at.timestamp_millis(),
            previous_status: self.shipment_status,
            ..ShipmentState::new(status, occurred_at, expires_at_ms)
        }
    }

    /// Where a new event belongs, by event times only (see the module's doc).
    pub fn belongs(&self, status: Status, occurred_at: DateTime<Utc>, gap: std::time::Duration) -> Belongs {
        let at = occurred_at.timestamp_millis();
        if self.generation > 0 && at < self.generation_start_ms {
            return Belongs::Earlier;
        }
        let gap_ms = i64::try_from(gap.as_millis()).unwrap_or(i64::MAX);
        if is_terminal(self.shipment_status) && is_early(status) && at > self.latest_occurred_at.timestamp_millis().saturating_add(gap_ms) {
            return Belongs::NewGeneration;
        }
        Belongs::Current
    }

    /// Apply one new event.
    pub fn apply(&mut self, status: Status, occurred_at: DateTime<Utc>, expires_at_ms: i64) -> Applied {
        let next = advance(Some(self.shipment_status), status);
        let regression_prevented = next == self.shipment_status && moves_backwards(self.shipment_status, status);
        let out_of_order = occurred_at < self.latest_occurred_at;
        let suspected_false_delivery = self.shipment_status == Status::Delivered
            && matches!(status, Status::InTransit | Status::OutForDelivery)
            && occurred_at > self.latest_occurred_at;
        if occurred_at > self.latest_occurred_at
            || (occurred_at == self.latest_occurred_at && status.rank() > self.latest_status.rank())
        {
            self.latest_status = status;
            self.latest_occurred_at = occurred_at;
        }
        self.shipment_status = next;
        if self.generation == 0 {
            // The first generation has no previous one: its field mirrors its
            // own status (what the 18-byte encoding decodes to).
            self.previous_status = next;
        }
        self.expires_at_ms = self.expires_at_ms.max(expires_at_ms);
        Applied { regression_prevented, out_of_order, new_generation: false, suspected_false_delivery }
    }

    /// 18 bytes: status index, latest index, latest ms (BE), expiry (BE); after
    /// a tracking number's reuse, 31: then the generation (4, BE), its start ms
    /// (8, BE) and the previous generation's final status index. The first
    /// generation keeps the 18 bytes every Waymark reads.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(30);
        out.push(status_index(self.shipment_status));
        out.push(status_index(self.latest_status));
        out.extend_from_slice(&self.latest_occurred_at.timestamp_millis().to_be_bytes());
        out.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        if self.generation > 0 {
            out.extend_from_slice(&self.generation.to_be_bytes());
            out.extend_from_slice(&self.generation_start_ms.to_be_bytes());
            out.push(status_index(self.previous_status));
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ShipmentState, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt { keyspace: Keyspace::Shipments.name(), reason };
        if bytes.len() != 18 && bytes.len() != 31 {
            return Err(corrupt(format!("expected 18 or 31 bytes, found {}", bytes.len())));
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
            generation: bytes.get(18..22).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes).unwrap_or(0),
            generation_start_ms: if bytes.len() == 31 { ms(22..30) } else { 0 },
            previous_status: match bytes.get(30) {
                Some(i) => status(*i)?,
                None => status(bytes[0])?,
            },
        })
    }
}

/// The status and latest event a shipment's `milestones` (status, time) give,
/// applied oldest first (ties by rank), as if the others had never arrived:
/// what a retraction sets the shipment to. `None` for no milestones.
pub fn replayed(milestones: &[(Status, DateTime<Utc>)]) -> Option<(Status, Status, DateTime<Utc>)> {
    let mut sorted = milestones.to_vec();
    sorted.sort_by_key(|(status, at)| (*at, status.rank()));
    let (&(first, first_at), rest) = sorted.split_first()?;
    let mut state = ShipmentState::new(first, first_at, 0);
    for &(status, at) in rest {
        state.apply(status, at, 0);
    }
    Some((state.shipment_status, state.latest_status, state.latest_occurred_at))
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
        assert_eq!(late_pickup, Applied { regression_prevented: true, out_of_order: true, ..Applied::default() });
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

    #[test]
    fn a_reused_number_begins_a_generation_by_event_times_only() {
        let day = |d: i64| Utc.timestamp_opt(1_700_000_000 + d * 86_400, 0).unwrap();
        let gap = DEFAULT_GENERATION_GAP;
        let mut state = ShipmentState::new(LabelCreated, day(0), 0);
        state.apply(Delivered, day(3), 0);
        // Within the gap: the same parcel (a return's pickup, a label re-printed).
        assert_eq!(state.belongs(PickedUp, day(20), gap), Belongs::Current);
        // Only early statuses begin a parcel.
        assert_eq!(state.belongs(InTransit, day(90), gap), Belongs::Current);
        // After the gap, an early status: a new parcel.
        assert_eq!(state.belongs(LabelCreated, day(93), gap), Belongs::NewGeneration);
        let next = state.next_generation(LabelCreated, day(93), 0);
        assert_eq!((next.generation, next.shipment_status), (1, LabelCreated));
        // The old parcel's history replayed: its times are old, so it is earlier.
        assert_eq!(next.belongs(PickedUp, day(1), gap), Belongs::Earlier);
        assert_eq!(next.belongs(InTransit, day(94), gap), Belongs::Current);
        // Not terminal: no split, whatever the gap.
        let open = ShipmentState::new(InTransit, day(0), 0);
        assert_eq!(open.belongs(LabelCreated, day(300), gap), Belongs::Current);
        // The encoding keeps the generation; the first one keeps 18 bytes.
        assert_eq!(state.encode().len(), 18);
        assert_eq!(ShipmentState::decode(&next.encode()).unwrap(), next);
    }

    proptest::proptest! {
        /// What a worker writes is what the next one (or a restore) reads back,
        /// after any sequence of events, in any generation.
        #[test]
        fn a_state_reads_back_as_written_after_any_events(
            first in 0..Status::ALL.len(),
            events in proptest::collection::vec((0..Status::ALL.len(), -5i64..200), 0..12),
        ) {
            let day = |d: i64| Utc.timestamp_opt(1_700_000_000 + d * 86_400, 0).unwrap();
            let mut state = ShipmentState::new(Status::ALL[first], day(0), 0);
            for (status, at) in events {
                let (status, at) = (Status::ALL[status], day(at));
                match state.belongs(status, at, DEFAULT_GENERATION_GAP) {
                    Belongs::NewGeneration => state = state.next_generation(status, at, 0),
                    Belongs::Current => { state.apply(status, at, 0); }
                    Belongs::Earlier => {}
                }
                proptest::prop_assert_eq!(ShipmentState::decode(&state.encode()).unwrap(), state);
            }
        }
    }

    #[test]
    fn a_transit_scan_after_delivered_is_a_suspected_false_delivery() {
        let t = |s: i64| Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap();
        let mut state = ShipmentState::new(OutForDelivery, t(0), 0);
        state.apply(Delivered, t(10), 0);
        let later = state.apply(InTransit, t(20), 0);
        assert!(later.suspected_false_delivery && later.regression_prevented);
        assert_eq!(state.shipment_status, Delivered, "never changed automatically");
        let earlier = state.apply(OutForDelivery, t(5), 0);
        assert!(!earlier.suspected_false_delivery, "a late scan from before the delivery is not");
    }
}
