//! Why Waymark decided what it did: for a record, each of its events' decision
//! and the state entry that decided it; for a shipment, where it lives, where
//! its status stands and the milestones it is known by.
//!
//! The answer comes from the state only (read-only, so beside a running worker)
//! and is computed by the functions that decide ([`crate::pipeline::Pipeline::
//! canonical_events`], [`crate::dedupe::find`]), so it cannot drift from what the
//! worker does. Every composite-key and content-hash entry records its first
//! sighting ([`crate::dedupe::Sighting`]): the raw record it came from, when,
//! and until when it decides; a composite-key entry also keeps what the
//! ordering made of its event (a prevented regression is not visible in the
//! shipment's state afterwards).

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::dedupe::{self, Match, Sighting};
use crate::envelope::Envelope;
use crate::error::StoreError;
use crate::event::{rfc3339_millis, SourceRef, TrackingEvent};
use crate::order::ShipmentState;
use crate::pipeline::Pipeline;
use crate::routing::{home_partition, Placement};
use crate::state::{Keyspace, Scope, Staged, StateStore};

pub use crate::output::Decision;

/// The decision in one sentence, for the human output.
fn sentence(decision: Decision) -> &'static str {
        match decision {
            Decision::New => "new: this record was its first sighting, and its milestone was emitted",
            Decision::RegressionPrevented => "new, milestone emitted, but the shipment's status did not move back (it was already further along)",
            Decision::DuplicateHash => "duplicate: the same content was seen before (nothing emitted)",
            Decision::DuplicateKey => "duplicate: the same scan (status, code, place, time within the skew) was seen before (nothing emitted)",
            Decision::DuplicateKeyDifferentContent => "duplicate: the same scan was seen before, its time within the skew tolerance (nothing emitted)",
            Decision::Revision => "revision: a correction of a scan already emitted (its text or place), emitted again under the same milestone id",
            Decision::NotSeen => "not in this state: not processed here yet, or its entries expired (processed now, it would be new)",
        }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A partition of the stage that owns state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Home {
    pub topic: String,
    pub partition: i32,
}

/// The state entry that decided, and where it was first seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Matched {
    /// `content_hash` or `composite_key`.
    pub entry: &'static str,
    /// `None` for an entry written before Waymark recorded sightings.
    pub sighting: Option<Sighting>,
}

/// One event of the explained record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventReport {
    pub tracking_number: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shipment_ref: Option<String>,
    pub status: String,
    pub carrier_status_code: String,
    #[serde(with = "rfc3339_millis")]
    pub occurred_at: DateTime<Utc>,
    /// The milestone the event is (or would be) emitted as.
    pub milestone_id: String,
    /// Which use of the tracking number (0: the first known).
    #[serde(skip_serializing_if = "is_zero")]
    pub generation: u32,
    pub home: Home,
    pub decision: Decision,
    pub explanation: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<Matched>,
}

/// A record that never got as far as its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterReport {
    pub error_kind: String,
    pub reason: String,
}

/// Why a record's events came out as they did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordReport {
    pub kind: &'static str,
    pub source: SourceRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub carrier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterReport>,
    pub events: Vec<EventReport>,
}

/// Explain `envelope` against `store` at `now` (the injected clock: an entry
/// decides while `now` is before its expiry).
pub fn record<S: StateStore + ?Sized>(pipeline: &Pipeline, store: &S, envelope: &Envelope, now: DateTime<Utc>) -> Result<RecordReport, StoreError> {
    let mut report = RecordReport { kind: "record", source: envelope.source(), carrier: None, tenant_id: None, dead_letter: None, events: Vec::new() };
    let events = match pipeline.canonical_events(envelope, now) {
        Ok((context, events)) => {
            report.carrier = Some(context.carrier);
            report.tenant_id = Some(context.tenant_id);
            events
        }
        Err(rejected) => {
            report.carrier = rejected.carrier;
            report.tenant_id = rejected.tenant_id;
            report.dead_letter = Some(DeadLetterReport { error_kind: rejected.error.kind().to_string(), reason: rejected.error.to_string() });
            return Ok(report);
        }
    };
    let reader = Staged::new(store);
    for event in events {
        let (home, scope) = home_of(&pipeline.placement, envelope, &event);
        let policy = pipeline.dedupe.policy(&event.carrier);
        let (decision, matched) = match dedupe::find(&reader, scope, policy, &event, now)? {
            Match::None => (Decision::NotSeen, None),
            Match::Hash { value } => {
                let sighting = dedupe::sighting(Keyspace::Hashes, &[], &value);
                if sighting.as_ref().is_some_and(|s| s.source == event.source) {
                    // This record put the entry there: it was new. Its key entry
                    // says what the ordering made of it.
                    let key_entry = match dedupe::find_key(&reader, scope, policy, &event, now, &dedupe::content_hash(&event))? {
                        Match::Key { key, value, .. } => dedupe::sighting(Keyspace::Keys, &key, &value),
                        _ => None,
                    };
                    let prevented = key_entry.as_ref().and_then(|s| s.milestone.as_ref()).is_some_and(|m| m.outcome.regression_prevented);
                    let decision = match &key_entry {
                        // The scan was first seen elsewhere: this record corrected it.
                        Some(first) if first.source != event.source => Decision::Revision,
                        _ if prevented => Decision::RegressionPrevented,
                        _ => Decision::New,
                    };
                    (decision, Some(Matched { entry: "composite_key", sighting: key_entry.or(sighting) }))
                } else {
                    (Decision::DuplicateHash, Some(Matched { entry: "content_hash", sighting }))
                }
            }
            Match::Key { key, value, collision } => {
                let sighting = dedupe::sighting(Keyspace::Keys, &key, &value);
                let decision = match dedupe::key_verdict(&reader, scope, &event, &key, &value, collision, now)? {
                    dedupe::Verdict::Revision { .. } => Decision::Revision,
                    _ if collision => Decision::DuplicateKeyDifferentContent,
                    _ => Decision::DuplicateKey,
                };
                (decision, Some(Matched { entry: "composite_key", sighting }))
            }
        };
        // The generation of the tracking number the scan belongs to, as its
        // composite-key entry recorded it (part of the milestone's id after the first).
        let generation = match dedupe::find_key(&reader, scope, policy, &event, now, &dedupe::content_hash(&event))? {
            Match::Key { key, value, .. } => dedupe::sighting(Keyspace::Keys, &key, &value).and_then(|s| s.milestone).map_or(0, |m| m.outcome.generation),
            _ => 0,
        };
        report.events.push(EventReport {
            generation,
            tracking_number: event.tracking_number.clone(),
            shipment_ref: event.shipment_ref.clone(),
            status: event.status.as_str().to_string(),
            carrier_status_code: event.carrier_status_code.clone(),
            occurred_at: event.occurred_at,
            milestone_id: crate::output::milestone_id_in(&event, generation),
            home,
            decision,
            explanation: explanation(decision, matched.as_ref()),
            matched,
        });
    }
    Ok(report)
}

/// The home (and state scope) an event is applied in.
fn home_of(placement: &Placement, envelope: &Envelope, event: &TrackingEvent) -> (Home, Scope) {
    let home = match placement {
        Placement::Home { topic, partitions } => {
            Home { topic: topic.clone(), partition: home_partition(*partitions, &event.tenant_id, &event.carrier, &event.tracking_number) }
        }
        Placement::Input => Home { topic: envelope.topic.clone(), partition: envelope.partition },
    };
    let scope = placement.scope_of(envelope, event);
    (home, scope)
}

fn explanation(decision: Decision, matched: Option<&Matched>) -> String {
    let mut text = sentence(decision).to_string();
    match matched.map(|m| &m.sighting) {
        Some(Some(seen)) => {
            let first = match decision {
                Decision::New | Decision::RegressionPrevented => "first seen",
                Decision::Revision => "corrects the scan first seen",
                _ => "matches the entry first seen",
            };
            text.push_str(&format!(
                "; {first} in {}:{}:{} at {}, deciding until {}",
                seen.source.topic,
                seen.source.partition,
                seen.source.offset,
                seen.first_seen.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                seen.expires_at.format("%Y-%m-%dT%H:%M:%S%.3fZ")
            ));
            if let Some(facts) = &seen.milestone {
                if !facts.outcome.shipment_status.is_empty() {
                    text.push_str(&format!(" (the shipment's status after it: {})", facts.outcome.shipment_status));
                }
            }
        }
        Some(None) => text.push_str("; the matching entry was written before Waymark recorded first sightings"),
        None => {}
    }
    text
}

/// Where a shipment stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShipmentReport {
    pub kind: &'static str,
    pub tenant_id: String,
    pub carrier: String,
    pub tracking_number: String,
    pub home: Home,
    /// `None`: the state holds nothing live for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<ShipmentView>,
    /// Its live composite-key entries, oldest scan first: the milestones it is known by.
    pub milestones: Vec<MilestoneView>,
    /// Entries of older Waymarks carry no shipment, so they cannot be listed here.
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShipmentView {
    /// The current use of the tracking number (0: the first known).
    pub generation: u32,
    pub shipment_status: String,
    pub latest_status: String,
    #[serde(with = "rfc3339_millis")]
    pub latest_occurred_at: DateTime<Utc>,
    #[serde(with = "rfc3339_millis")]
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MilestoneView {
    pub status: String,
    pub carrier_status_code: String,
    #[serde(with = "rfc3339_millis")]
    pub occurred_at: DateTime<Utc>,
    pub sighting: Sighting,
}

/// Most composite-key entries listed for one shipment.
pub const MAX_MILESTONES: usize = 1000;

/// Explain the shipment `(tenant, carrier, tracking)`: its home, its state and
/// its live milestones. Reads the home partition's composite-key entries once
/// (streamed, not held).
pub fn shipment<S: StateStore + ?Sized>(pipeline: &Pipeline, store: &S, tenant: &str, carrier: &str, tracking: &str, now: DateTime<Utc>) -> Result<ShipmentReport, StoreError> {
    let (topic, partitions) = match &pipeline.placement {
        Placement::Home { topic, partitions } => (topic.clone(), *partitions),
        Placement::Input => {
            return Err(StoreError::Open(
                "with routing.mode = \"input\" a shipment lives in the input partition its records arrive on; explain one of its records (--record) instead".into(),
            ))
        }
    };
    let partition = home_partition(partitions, tenant, carrier, tracking);
    let scope = Scope::of(&topic, partition);
    let filter = dedupe::shipment_filter(tenant, carrier, tracking);
    let now_ms = now.timestamp_millis();
    let mut milestones = Vec::new();
    let mut shipment_ref: Option<Option<String>> = None;
    let end = (u64::from_be_bytes(scope.0).wrapping_add(1)).to_be_bytes();
    store.visit(Keyspace::Keys, &scope.0, &end, &mut |key, value| {
        if let Some(seen) = dedupe::sighting(Keyspace::Keys, key, value) {
            let live = dedupe::expires_at_ms(Keyspace::Keys, value).is_ok_and(|expires| now_ms < expires);
            if let Some(facts) = seen.milestone.as_ref().filter(|facts| live && facts.shipment == filter) {
                shipment_ref.get_or_insert_with(|| facts.shipment_ref.clone());
                milestones.push(MilestoneView {
                    status: facts.status.clone(),
                    carrier_status_code: facts.carrier_status_code.clone(),
                    occurred_at: facts.occurred_at,
                    sighting: seen.clone(),
                });
            }
        }
        milestones.len() < MAX_MILESTONES
    })?;
    milestones.sort_by_key(|m| (m.occurred_at, m.sighting.first_seen));
    let key = crate::order::shipment_key(scope, tenant, carrier, tracking, shipment_ref.flatten().as_deref());
    let state = match store.get(Keyspace::Shipments, &key)? {
        Some(bytes) => {
            let state = ShipmentState::decode(&bytes)?;
            (state.expires_at_ms > now_ms).then(|| ShipmentView {
                generation: state.generation,
                shipment_status: state.shipment_status.as_str().into(),
                latest_status: state.latest_status.as_str().into(),
                latest_occurred_at: state.latest_occurred_at,
                expires_at: DateTime::from_timestamp_millis(state.expires_at_ms).unwrap_or(DateTime::<Utc>::MAX_UTC),
            })
        }
        None => None,
    };
    let note = (state.is_some() && milestones.is_empty())
        .then(|| "the shipment has state but no milestone entry with a recorded shipment: its entries were written before Waymark recorded first sightings".to_string());
    Ok(ShipmentReport {
        kind: "shipment",
        tenant_id: tenant.into(),
        carrier: carrier.into(),
        tracking_number: tracking.into(),
        home: Home { topic, partition },
        state,
        milestones,
        note,
    })
}

/// `record` for people: one paragraph per event.
pub fn render_record(report: &RecordReport) -> String {
    let what = if report.source.partition < 0 {
        format!("body (as a record of {})", report.source.topic)
    } else {
        format!("record {}:{}:{}", report.source.topic, report.source.partition, report.source.offset)
    };
    let mut out = format!(
        "{what} ({}, tenant {})\n",
        report.carrier.as_deref().unwrap_or("carrier unknown"),
        report.tenant_id.as_deref().unwrap_or("unknown")
    );
    if let Some(dead) = &report.dead_letter {
        out.push_str(&format!("  dead letter ({}): {}\n", dead.error_kind, dead.reason));
        return out;
    }
    if report.events.is_empty() {
        out.push_str("  no events: the body carries no history entry\n");
    }
    for (i, event) in report.events.iter().enumerate() {
        out.push_str(&format!(
            "  {}. {} {} \"{}\" at {}  [{} partition {}]\n     milestone {}\n     {}\n",
            i + 1,
            event.tracking_number,
            event.status,
            event.carrier_status_code,
            event.occurred_at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            event.home.topic,
            event.home.partition,
            event.milestone_id,
            event.explanation
        ));
    }
    out
}

/// `shipment` for people.
pub fn render_shipment(report: &ShipmentReport) -> String {
    let mut out = format!(
        "shipment {}:{}:{}  [home: {} partition {}]\n",
        report.tenant_id, report.carrier, report.tracking_number, report.home.topic, report.home.partition
    );
    match &report.state {
        Some(state) => out.push_str(&format!(
            "  {}status {} (latest scan: {} at {}); remembered until {}\n",
            if state.generation > 0 { format!("generation {} (the tracking number was reused), ", state.generation) } else { String::new() },
            state.shipment_status,
            state.latest_status,
            state.latest_occurred_at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            state.expires_at.format("%Y-%m-%dT%H:%M:%S%.3fZ")
        )),
        None => out.push_str("  no live state for this shipment\n"),
    }
    for m in &report.milestones {
        let seen = &m.sighting;
        let facts = seen.milestone.as_ref();
        let mut flag = facts.is_some_and(|f| f.outcome.regression_prevented).then_some(" (status did not move back)").unwrap_or("").to_string();
        if let Some(generation) = facts.map(|f| f.outcome.generation).filter(|g| *g > 0) {
            flag.push_str(&format!(" [generation {generation}]"));
        }
        if let Some(revision) = facts.map(|f| f.revision).filter(|r| *r > 0) {
            flag.push_str(&format!(" [revised {revision} time(s)]"));
        }
        if facts.is_some_and(|f| f.retracted) {
            flag.push_str(" [retracted by a correction]");
        }
        let id = facts.and_then(|f| f.milestone_id).map(|id| format!("\n      milestone {}", blake3::Hash::from_bytes(id).to_hex())).unwrap_or_default();
        out.push_str(&format!(
            "  {} {} \"{}\"{flag}: first seen in {}:{}:{} at {}{id}\n",
            m.occurred_at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            m.status,
            m.carrier_status_code,
            seen.source.topic,
            seen.source.partition,
            seen.source.offset,
            seen.first_seen.format("%Y-%m-%dT%H:%M:%S%.3fZ")
        ));
    }
    if let Some(note) = &report.note {
        out.push_str(&format!("  note: {note}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::process;
    use crate::state::MemoryStore;
    use chrono::TimeZone;

    fn sample() -> Vec<Envelope> {
        let text = include_str!("../replay/sample.ndjson");
        text.lines().filter(|l| !l.trim().is_empty()).map(|l| Envelope::from_kcat_json(l).unwrap()).collect()
    }

    /// Every record of the sample explained after the whole sample went through
    /// the pipeline: each decision is the one the pipeline made at the time.
    #[test]
    fn explanations_agree_with_what_the_pipeline_decided() {
        let pipeline = Pipeline::default();
        let store = MemoryStore::default();
        let now = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let records = sample();
        let mut decided = Vec::new();
        for envelope in &records {
            let (prepared, _) = pipeline.prepare_batch(std::slice::from_ref(envelope), now).pop().unwrap();
            let mut staged = Staged::new(&store);
            decided.push(pipeline.apply(envelope, prepared, now, &mut staged).unwrap());
            store.write(staged.take_batch()).unwrap();
        }
        let mut seen_kinds = std::collections::BTreeSet::new();
        for (envelope, result) in records.iter().zip(&decided) {
            let report = record(&pipeline, &store, envelope, now).unwrap();
            if let Some(dead) = &result.dead_letter {
                assert_eq!(report.dead_letter.as_ref().map(|d| d.error_kind.as_str()), Some(dead.error_kind.as_str()));
                seen_kinds.insert("dead_letter");
                continue;
            }
            assert_eq!(report.events.len(), result.events.len(), "{report:?}");
            // The pipeline applies a history oldest first; the report keeps the body's order.
            for explained in &report.events {
                let outcome = result
                    .events
                    .iter()
                    .find(|o| o.status.as_str() == explained.status && o.occurred_at == explained.occurred_at)
                    .expect("the same event among the pipeline's outcomes");
                let expected = match outcome.verdict {
                    dedupe::Verdict::Revision { .. } => Decision::Revision,
                    dedupe::Verdict::New if outcome.applied.regression_prevented => Decision::RegressionPrevented,
                    dedupe::Verdict::New => Decision::New,
                    dedupe::Verdict::DuplicateHash => Decision::DuplicateHash,
                    dedupe::Verdict::DuplicateKey { collision: false } => Decision::DuplicateKey,
                    dedupe::Verdict::DuplicateKey { collision: true } => Decision::DuplicateKeyDifferentContent,
                };
                assert_eq!(explained.decision, expected, "{explained:?}");
                seen_kinds.insert(format!("{expected:?}").leak());
                let sighting = explained.matched.as_ref().and_then(|m| m.sighting.as_ref()).expect("a sighting");
                if expected == Decision::New || expected == Decision::RegressionPrevented {
                    assert_eq!(sighting.source, envelope.source(), "a new event's first sighting is its own record");
                } else {
                    assert_ne!(sighting.source, envelope.source(), "a duplicate matches an earlier record: {explained:?}");
                    assert!(sighting.source.offset < envelope.source().offset, "{explained:?}");
                }
            }
        }
        for kind in ["dead_letter", "New", "RegressionPrevented", "DuplicateHash", "DuplicateKeyDifferentContent"] {
            assert!(seen_kinds.contains(kind), "the sample should show a {kind} decision: {seen_kinds:?}");
        }
        // A record the state has not seen.
        let fresh = MemoryStore::default();
        let report = record(&pipeline, &fresh, &records[0], now).unwrap();
        assert!(report.events.iter().all(|e| e.decision == Decision::NotSeen));
        // After the TTL, entries no longer decide.
        let later = now + chrono::Duration::days(400);
        let report = record(&pipeline, &store, &records[0], later).unwrap();
        assert!(report.events.iter().all(|e| e.decision == Decision::NotSeen));
    }

    /// A shipment's report lists the milestones its events were emitted as.
    #[test]
    fn a_shipment_lists_its_milestones_and_state() {
        let pipeline = Pipeline::default();
        let store = MemoryStore::default();
        let now = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let records = sample();
        let output = process(&pipeline, &store, &records, now, false, None).unwrap();
        store.write(output.state).unwrap();
        let first = output.upserts.first().expect("the sample emits milestones");
        let (tenant, carrier, tracking) = (first.tenant_id.clone(), first.carrier.clone(), first.tracking_number.clone());
        let report = shipment(&pipeline, &store, &tenant, &carrier, &tracking, now).unwrap();
        let emitted: Vec<_> = output.upserts.iter().filter(|u| u.tenant_id == tenant && u.tracking_number == tracking).collect();
        assert_eq!(report.milestones.len(), emitted.len(), "{report:?}");
        let last = emitted.last().unwrap();
        assert_eq!(report.state.as_ref().map(|s| s.shipment_status.as_str()), Some(last.shipment_status.as_str()));
        let rendered = render_shipment(&report);
        assert!(rendered.contains(&format!("shipment {tenant}:{carrier}:{tracking}")), "{rendered}");
        let nobody = shipment(&pipeline, &store, &tenant, &carrier, "NO-SUCH-PARCEL", now).unwrap();
        assert!(nobody.state.is_none() && nobody.milestones.is_empty());
    }
}
