//! A shipment's home: where its dedupe keys, content hashes and status live.
//!
//! Producers of raw topics rarely key records by shipment: webhook receivers
//! produce with no key (round-robin or sticky partitions), with the provider's
//! delivery id (new on every replay) or with the tenant, and one body can carry
//! several shipments. State scoped by the *input* partition would then see one
//! shipment's events on several partitions (and instances) and dedupe none of
//! them against each other. So every canonical event has one **home**:
//!
//! ```text
//! home = u64_le(blake3("waymark.home.v1" | len | tenant | len | carrier | len | tracking)[..8]) mod P
//! ```
//!
//! where `P` is the partition count of the processing stage, fixed when a group
//! is first deployed (`[routing] partitions`). The worker normalizes a raw record,
//! produces its canonical events to partition `home` of the internal repartition
//! topic (keyed by shipment, Kafka Streams' model), and runs dedupe, order and
//! emit when it consumes that partition; state is scoped by it
//! ([`Scope::of`]`(repartition topic, home)`), so a rebalance moves whole homes
//! and their state. Replay computes the same home, so an archive meets the
//! worker's state whatever partition fields it carries.
//!
//! [`Placement::Input`] is the opt-out for inputs that are already keyed by
//! shipment: the input partition is the home and there is no extra hop.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::correction::Correction;
use crate::envelope::Envelope;
use crate::error::RecordError;
use crate::event::{SourceRef, TrackingEvent};
use crate::state::Scope;

/// Where shipment state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Every shipment's home is partition [`home_partition`] of `topic` (the
    /// repartition topic), whatever partition its raw record arrived on.
    Home { topic: String, partitions: u32 },
    /// Inputs are keyed by shipment: the input partition is the home. Only right
    /// when every record of a shipment arrives on one partition of one topic.
    Input,
}

impl Default for Placement {
    /// What replay and the tests use without a configuration: the default
    /// deployment's home layout.
    fn default() -> Self {
        Placement::Home { topic: repartition_topic(DEFAULT_GROUP), partitions: DEFAULT_PARTITIONS }
    }
}

/// The default consumer group (its name prefixes the internal topics).
pub const DEFAULT_GROUP: &str = "waymark";

/// Default partition count of the processing stage: enough homes to spread a
/// group over 16 instances, few enough that an idle partition costs nothing.
pub const DEFAULT_PARTITIONS: u32 = 16;

/// The repartition topic of a consumer group.
pub fn repartition_topic(group_id: &str) -> String {
    format!("{group_id}-repartition")
}

/// The home partition of a shipment among `partitions`.
pub fn home_partition(partitions: u32, tenant_id: &str, carrier: &str, tracking_number: &str) -> i32 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"waymark.home.v1");
    for part in [tenant_id, carrier, tracking_number] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest.as_bytes()[..8]);
    // P is at most i32::MAX (validated), so the remainder fits.
    (u64::from_le_bytes(head) % u64::from(partitions.max(1))) as i32
}

impl Placement {
    /// The state scope of an event that arrived in `envelope` and is applied
    /// without a hop (replay, or [`Placement::Input`]).
    pub fn scope_of(&self, envelope: &Envelope, event: &TrackingEvent) -> Scope {
        match self {
            Placement::Home { topic, partitions } => {
                Scope::of(topic, home_partition(*partitions, &event.tenant_id, &event.carrier, &event.tracking_number))
            }
            Placement::Input => Scope::of(&envelope.topic, envelope.partition),
        }
    }

    /// Is `topic` the repartition topic (records carry canonical events)?
    pub fn is_repartition_topic(&self, topic: &str) -> bool {
        matches!(self, Placement::Home { topic: home, .. } if home == topic)
    }

    /// What the state layout records about this placement, so a deployment that
    /// changes it later is refused instead of silently splitting state.
    pub fn layout(&self) -> String {
        match self {
            Placement::Home { topic, partitions } => format!("home topic={topic} partitions={partitions}"),
            Placement::Input => "input-partition".to_string(),
        }
    }
}

/// Version of the repartition record encoding (a record's `v`).
pub const ENCODING_VERSION: u32 = 1;

/// One repartition record: a raw record's canonical events of one shipment, in
/// the order they apply (schemas/repartition-record.schema.json).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedEvents {
    pub v: u32,
    pub events: Vec<TrackingEvent>,
    /// A correction on its way to its shipment's home (then `events` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correction: Option<Correction>,
    /// The control-topic record the correction came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceRef>,
}

/// A record on its way to the repartition topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedRecord {
    pub topic: String,
    pub partition: i32,
    /// `tenant:carrier:tracking_number`, like the upserts' key ([`crate::output::shipment_key`]).
    pub key: String,
    pub payload: Vec<u8>,
}

/// Largest repartition record payload: far below librdkafka's default
/// `message.max.bytes` (1,000,000), so a record is never too large to produce. A
/// shipment whose events from one raw record encode larger is split into several
/// records, in order, on the same partition.
pub const MAX_ROUTED_BYTES: usize = 256 * 1024;

/// Group a raw record's events by home and encode one record per shipment
/// (events keep their relative order, so a history still applies oldest first).
pub fn route(topic: &str, partitions: u32, events: Vec<TrackingEvent>) -> Result<Vec<RoutedRecord>, RecordError> {
    let mut order: Vec<(String, i32)> = Vec::new();
    let mut groups: HashMap<(String, i32), Vec<TrackingEvent>> = HashMap::new();
    for event in events {
        let key = crate::output::shipment_key(&event.tenant_id, &event.carrier, &event.tracking_number);
        let partition = home_partition(partitions, &event.tenant_id, &event.carrier, &event.tracking_number);
        let group = groups.entry((key.clone(), partition)).or_insert_with(|| {
            order.push((key, partition));
            Vec::new()
        });
        group.push(event);
    }
    let mut records = Vec::with_capacity(order.len());
    for (key, partition) in order {
        let events = groups.remove(&(key.clone(), partition)).unwrap_or_default();
        for payload in encode_within(events, MAX_ROUTED_BYTES)? {
            records.push(RoutedRecord { topic: topic.to_string(), partition, key: key.clone(), payload });
        }
    }
    Ok(records)
}

/// Encode events as one payload, or as several consecutive ones when one would
/// exceed `limit` bytes (a single event is bounded by the canonical field limits).
fn encode_within(events: Vec<TrackingEvent>, limit: usize) -> Result<Vec<Vec<u8>>, RecordError> {
    let encode = |events: Vec<TrackingEvent>| {
        serde_json::to_vec(&RoutedEvents { v: ENCODING_VERSION, events, correction: None, source: None })
            .map_err(|e| RecordError::Internal(format!("encoding a repartition record: {e}")))
    };
    let count = events.len();
    let whole = encode(events.clone())?;
    if whole.len() <= limit || count <= 1 {
        return Ok(vec![whole]);
    }
    let mut rest = events;
    let tail = rest.split_off(count / 2);
    let mut out = encode_within(rest, limit)?;
    out.extend(encode_within(tail, limit)?);
    Ok(out)
}

/// A correction's record to its shipment's home partition of `topic`.
pub fn route_correction(topic: &str, partitions: u32, correction: Correction, source: SourceRef) -> Result<RoutedRecord, RecordError> {
    let key = crate::output::shipment_key(&correction.tenant_id, &correction.carrier, &correction.tracking_number);
    let partition = home_partition(partitions, &correction.tenant_id, &correction.carrier, &correction.tracking_number);
    let payload = serde_json::to_vec(&RoutedEvents { v: ENCODING_VERSION, events: Vec::new(), correction: Some(correction), source: Some(source) })
        .map_err(|e| RecordError::Internal(format!("encoding a repartition record: {e}")))?;
    Ok(RoutedRecord { topic: topic.to_string(), partition, key, payload })
}

/// Decode a repartition record: its events, or a correction.
pub fn decode(payload: &[u8]) -> Result<RoutedEvents, RecordError> {
    let routed: RoutedEvents = serde_json::from_slice(payload)
        .map_err(|e| RecordError::Internal(format!("unreadable repartition record: {e}")))?;
    if routed.v != ENCODING_VERSION {
        return Err(RecordError::Internal(format!(
            "repartition record encoding v{} (this Waymark reads v{ENCODING_VERSION}): run one Waymark version per group",
            routed.v
        )));
    }
    Ok(routed)
}

/// Counts shipments seen on more than one input partition while the opt-out
/// ([`Placement::Input`]) is on: a wrong setting shows on /metrics instead of
/// silently doubling milestones. Bounded: forgets everything past `capacity`.
/// An entry is a 16-byte digest and a small (topic index, partition) pair:
/// about 40 bytes with the table's overhead, 40 MB at a million shipments;
/// topic names are kept once each.
#[derive(Debug)]
pub struct KeyingCheck {
    seen: HashMap<[u8; 16], (u32, i32)>,
    topics: Vec<String>,
    capacity: usize,
}

impl KeyingCheck {
    pub fn new(capacity: usize) -> Self {
        KeyingCheck { seen: HashMap::new(), topics: Vec::new(), capacity }
    }

    /// Note that `event` arrived on (`topic`, `partition`); true when the same
    /// shipment was last seen on another partition.
    pub fn conflicts(&mut self, topic: &str, partition: i32, event: &TrackingEvent) -> bool {
        let mut hasher = blake3::Hasher::new();
        for part in [&event.tenant_id, &event.carrier, &event.tracking_number] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        if self.seen.len() >= self.capacity && !self.seen.contains_key(&digest) {
            self.seen.clear();
        }
        let topic = match self.topics.iter().position(|t| t == topic) {
            Some(index) => index as u32,
            None => {
                self.topics.push(topic.to_string());
                (self.topics.len() - 1) as u32
            }
        };
        match self.seen.insert(digest, (topic, partition)) {
            Some(last) => last != (topic, partition),
            None => false,
        }
    }

    /// Bytes the entries take at least (keys and values, not the table's slack).
    pub fn entry_bytes(&self) -> usize {
        self.seen.len() * std::mem::size_of::<([u8; 16], (u32, i32))>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Status;

    fn event(tenant: &str, tracking: &str) -> TrackingEvent {
        let mut e = crate::dedupe::tests::event(tracking, Status::InTransit, 1_722_438_000_000);
        e.tenant_id = tenant.into();
        e
    }

    #[test]
    fn home_is_stable_and_spreads() {
        // Pinned: a change of the home function silently splits every deployment's state.
        assert_eq!(home_partition(16, "acme", "ups", "1Z999AA10123456784"), home_partition(16, "acme", "ups", "1Z999AA10123456784"));
        let mut used = std::collections::BTreeSet::new();
        for n in 0..400 {
            let home = home_partition(16, "acme", "ups", &format!("1Z{n:08}"));
            assert!((0..16).contains(&home));
            used.insert(home);
        }
        assert_eq!(used.len(), 16, "400 shipments reach every one of 16 homes");
        // Length prefixes: moving a character between fields changes the input.
        assert_ne!(
            (0..64).map(|p| home_partition(1 << 20, "ab", "c", &p.to_string())).collect::<Vec<_>>(),
            (0..64).map(|p| home_partition(1 << 20, "a", "bc", &p.to_string())).collect::<Vec<_>>()
        );
    }

    #[test]
    fn home_partition_golden() {
        // The function is part of the on-disk and on-topic layout: pin it.
        let homes: Vec<i32> = ["A", "B", "C", "D"].iter().map(|t| home_partition(1000, "acme", "easypost", t)).collect();
        assert_eq!(homes, [464, 97, 815, 766]);
    }

    #[test]
    fn a_record_with_two_shipments_becomes_two_routed_records_in_order() {
        let events = vec![event("acme", "S1"), event("acme", "S2"), event("acme", "S1")];
        let records = route("g-repartition", 8, events.clone()).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].key, "acme:easypost:S1");
        assert_eq!(records[0].partition, home_partition(8, "acme", "easypost", "S1"));
        let first = decode(&records[0].payload).unwrap().events;
        assert_eq!(first, vec![events[0].clone(), events[2].clone()]);
        assert_eq!(decode(&records[1].payload).unwrap().events, vec![events[1].clone()]);
    }

    #[test]
    fn a_long_history_is_split_into_records_that_fit_in_order() {
        let mut events = Vec::new();
        for n in 0..400 {
            let mut e = event("acme", "S1");
            e.description = Some(format!("{n:04} {}", "x".repeat(2000)));
            events.push(e);
        }
        let records = route("g-repartition", 8, events.clone()).unwrap();
        assert!(records.len() > 1);
        assert!(records.iter().all(|r| r.payload.len() <= MAX_ROUTED_BYTES && r.partition == records[0].partition));
        let decoded: Vec<TrackingEvent> = records.iter().flat_map(|r| decode(&r.payload).unwrap().events).collect();
        assert_eq!(decoded, events, "split, the events keep their order");
    }

    #[test]
    fn unknown_encodings_are_refused_with_the_reason() {
        let err = decode(br#"{"v":2,"events":[]}"#).unwrap_err();
        assert!(err.to_string().contains("v2"), "{err}");
        assert!(decode(b"not json").is_err());
    }

    #[test]
    fn scopes_follow_the_home_not_the_input_partition() {
        let placement = Placement::Home { topic: "g-repartition".into(), partitions: 8 };
        let e = event("acme", "S1");
        let mut envelope = Envelope {
            topic: "tracking.raw.easypost".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            headers: vec![],
            key: None,
            payload: vec![],
        };
        let on_zero = placement.scope_of(&envelope, &e);
        envelope.partition = 3;
        assert_eq!(placement.scope_of(&envelope, &e), on_zero);
        assert_eq!(on_zero, Scope::of("g-repartition", home_partition(8, "acme", "easypost", "S1")));
        assert_ne!(Placement::Input.scope_of(&envelope, &e), Placement::Input.scope_of(&Envelope { partition: 0, ..envelope.clone() }, &e));
    }

    #[test]
    fn the_keying_check_sees_a_shipment_on_two_partitions() {
        let mut check = KeyingCheck::new(100);
        let e = event("acme", "S1");
        assert!(!check.conflicts("t", 0, &e));
        assert!(!check.conflicts("t", 0, &e));
        assert!(check.conflicts("t", 1, &e));
        assert!(!check.conflicts("t", 1, &event("acme", "S2")));
    }

    /// Review finding: each entry kept its topic as a heap `String` (about
    /// 100 MB at the million-entry capacity). Entries are now fixed-size.
    #[test]
    fn keying_check_entries_are_small_and_fixed_size() {
        let mut check = KeyingCheck::new(1_000);
        for i in 0..1_000 {
            check.conflicts("tracking.raw.with-a-long-topic-name", i % 4, &event("acme", &format!("1Z{i:08}")));
        }
        assert_eq!(check.entry_bytes(), 1_000 * 24, "16-byte digest + topic index + partition");
        assert_eq!(check.topics.len(), 1, "a topic name is kept once");
        assert!(!check.conflicts("tracking.raw.with-a-long-topic-name", 7 % 4, &event("acme", "1Z00000007")));
        assert!(check.conflicts("other", 3, &event("acme", "1Z00000007")));
    }
}
