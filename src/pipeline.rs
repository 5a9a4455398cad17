//! The one pipeline core, shared by the Kafka worker and replay:
//! envelope -> normalize -> dedupe -> order -> emit.
//!
//! Pure apart from the state it reads and stages: the clock is a parameter, the
//! store is behind [`StateStore`], and the outputs are returned, not sent. The
//! caller sends them, waits for the acknowledgement, and only then commits the
//! staged state (see `kafka` and `replay`): state never claims an event whose
//! output was not acknowledged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use crate::carriers::CarrierRegistry;
use crate::correction::{self, Correction, Retraction};
use crate::dedupe::{self, DedupeConfig, Match, Verdict};
use crate::envelope::{Envelope, EnvelopeRules, RecordContext};
use crate::error::{RecordError, StoreError};
use crate::event::{SourceRef, Status, TrackingEvent};
use crate::order::{shipment_key, Applied, Belongs, ShipmentState};
use crate::output::{DeadLetter, Decision, DecisionRecord, MatchedSighting, MilestoneUpsert};
use crate::routing::{self, KeyingCheck, Placement, RoutedEvents, RoutedRecord};
use crate::state::{Keyspace, Scope, StateStore, Staged};

/// Longest identifier (tracking number, shipment ref, status code) a record may
/// carry: longer ones are dead-lettered as not tracking data.
pub const MAX_IDENTITY_BYTES: usize = 256;

/// Longest free text (description, status detail, location parts, event id) an
/// event keeps: longer text is cut at a character boundary and marked with `…`,
/// so one event, and so one upsert, always fits in a Kafka record.
pub const MAX_TEXT_BYTES: usize = 2048;

/// `text`, cut to at most [`MAX_TEXT_BYTES`] (deterministic: the same input
/// always gives the same text, so hashes and milestone ids stay stable).
fn bounded_text(text: String) -> String {
    if text.len() <= MAX_TEXT_BYTES {
        return text;
    }
    let mut end = MAX_TEXT_BYTES - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Everything the core needs to decide, fixed at start-up.
#[derive(Debug, Clone, Default)]
pub struct Pipeline {
    pub rules: EnvelopeRules,
    pub carriers: CarrierRegistry,
    pub dedupe: DedupeConfig,
    /// Where shipment state lives (see [`crate::routing`]).
    pub placement: Placement,
    /// The worker's two stages: a raw record is normalized and its events routed
    /// to their home partition of the repartition topic (its result carries the
    /// routed records, no events); a record *of* that topic is deduped, ordered
    /// and emitted. Off (replay), a raw record is applied at once in its home's
    /// scope: the same scopes, without the hop.
    pub hop: bool,
    /// With [`Placement::Input`]: notes which input partition each shipment
    /// arrives on, so a producer that does not key by shipment is visible.
    pub keying_check: Option<Arc<Mutex<KeyingCheck>>>,
    /// Threads that prepare (read, normalize, route) a batch's records; dedupe
    /// and ordering stay on one thread, in input order. 0 and 1: the calling
    /// thread only (see [`crate::parallel`]).
    pub threads: usize,
    /// How long after a shipment's latest event an early-status event begins a
    /// new generation (a reused tracking number): per carrier, else the default
    /// ([`crate::order::DEFAULT_GENERATION_GAP`]).
    pub generation_gaps: std::collections::BTreeMap<String, std::time::Duration>,
    pub default_generation_gap: Option<std::time::Duration>,
    /// Record every decision that is not a plain new milestone (duplicates,
    /// revisions, prevented regressions) as a [`DecisionRecord`]: on when a
    /// decisions topic is configured.
    pub record_decisions: bool,
    /// The topic whose records are corrections ([`crate::correction`]), not
    /// carrier webhooks (`kafka.control_topic`).
    pub control_topic: Option<String>,
}

/// What happened to one canonical event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventOutcome {
    pub verdict: Verdict,
    pub status: Status,
    /// When the event happened (reports: the time span an archive covers).
    pub occurred_at: DateTime<Utc>,
    /// Ordering effects; default for duplicates (they touch nothing).
    pub applied: Applied,
}

/// One event applied: its outcome, its upsert (new milestones and revisions)
/// and, with [`Pipeline::record_decisions`], its non-new decision.
struct AppliedEvent {
    outcome: EventOutcome,
    upsert: Option<MilestoneUpsert>,
    decision: Option<DecisionRecord>,
}

fn matched_sighting(entry: &str, sighting: dedupe::Sighting) -> MatchedSighting {
    MatchedSighting { entry: entry.to_string(), first_seen: sighting.first_seen, expires_at: sighting.expires_at, source: sighting.source }
}

/// The milestone id of the scan a composite-key entry holds, when `event` is
/// that scan (its content at the entry's time is the entry's content: an exact
/// copy, or one whose clock is skewed): the id at the entry's time and
/// generation. `None` when the content differs (the id of the first copy
/// cannot be told from this one).
fn repeated_milestone(event: &TrackingEvent, key: &[u8], value: &[u8]) -> Option<String> {
    let facts = dedupe::sighting(Keyspace::Keys, key, value)?.milestone?;
    let mut at = event.clone();
    at.occurred_at = facts.occurred_at;
    (value.get(8..40) == Some(&dedupe::content_hash(&at)[..])).then(|| crate::output::milestone_id_in(&at, facts.outcome.generation))
}

/// What happened to one record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordResult {
    /// Resolved carrier, when the envelope named one.
    pub carrier: Option<String>,
    pub tenant_id: Option<String>,
    pub events: Vec<EventOutcome>,
    /// One upsert per new milestone, in hierarchy-consistent order.
    pub upserts: Vec<MilestoneUpsert>,
    /// With [`Pipeline::record_decisions`]: the events' non-new decisions.
    pub decisions: Vec<DecisionRecord>,
    pub dead_letter: Option<DeadLetter>,
    /// Stage one of the worker: the record's events, on their way home.
    pub routed: Vec<RoutedRecord>,
    /// The record came from the repartition topic (stage two): its raw record
    /// was counted when it was routed.
    pub from_repartition: bool,
    /// Events of shipments last seen on another input partition
    /// ([`Placement::Input`] only): the input is not keyed by shipment.
    pub keying_conflicts: u32,
    /// Milestones this record (a correction) retracted.
    pub retractions: u32,
}

impl RecordResult {
    /// A record that yields no events: its dead letter, with what was known of it.
    fn rejected(envelope: &Envelope, rejected: Rejected, now: DateTime<Utc>) -> RecordResult {
        RecordResult {
            dead_letter: Some(DeadLetter::new(envelope, &rejected.error, rejected.carrier.clone(), rejected.tenant_id.clone(), now)),
            carrier: rejected.carrier,
            tenant_id: rejected.tenant_id,
            ..RecordResult::default()
        }
    }

    /// A record resolved to its carrier and tenant, before its events are applied.
    fn resolved(carrier: &str, tenant_id: &str) -> RecordResult {
        RecordResult { carrier: Some(carrier.to_string()), tenant_id: Some(tenant_id.to_string()), ..RecordResult::default() }
    }
}

/// Why a record yields no events, with what was known of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub error: RecordError,
    pub carrier: Option<String>,
    pub tenant_id: Option<String>,
}

/// A record read and normalized, before any state is touched.
pub enum Prepared {
    /// Nothing to apply: a dead letter, or events routed to their home.
    Done(RecordResult),
    /// Events to apply, each with the scope of its home, in the order they apply.
    Apply(RecordResult, Vec<(Scope, TrackingEvent)>),
    /// A correction to apply in the scope of its shipment's home, with the
    /// control-topic record it came from.
    Correct(RecordResult, Scope, Box<Correction>, SourceRef),
}

impl Pipeline {
    /// Envelope to canonical events (resolve, normalize), without touching state.
    pub fn canonical_events(
        &self,
        envelope: &Envelope,
        now: DateTime<Utc>,
    ) -> Result<(RecordContext, Vec<TrackingEvent>), Rejected> {
        let context = self.rules.resolve(envelope, now).map_err(|error| Rejected {
            error,
            carrier: self.rules.carrier_for_topic(&envelope.topic),
            tenant_id: None,
        })?;
        let carrier_events = self.carriers.normalize(&context.carrier, &envelope.payload, now).map_err(|error| Rejected {
            error,
            carrier: Some(context.carrier.clone()),
            tenant_id: Some(context.tenant_id.clone()),
        })?;
        let source = envelope.source();
        let mut events = Vec::with_capacity(carrier_events.len());
        for e in carrier_events {
            for (field, value) in [("tracking_number", Some(&e.tracking_number)), ("shipment_ref", e.shipment_ref.as_ref()), ("carrier_status_code", Some(&e.carrier_status_code))] {
                if value.is_some_and(|v| v.len() > MAX_IDENTITY_BYTES) {
                    return Err(Rejected {
                        error: RecordError::Unsupported(format!("`{field}` is {} bytes long; identifiers of more than {MAX_IDENTITY_BYTES} bytes are not tracking data", value.map_or(0, String::len))),
                        carrier: Some(context.carrier.clone()),
                        tenant_id: Some(context.tenant_id.clone()),
                    });
                }
            }
            events.push(TrackingEvent {
                tenant_id: context.tenant_id.clone(),
                carrier: context.carrier.clone(),
                tracking_number: e.tracking_number,
                shipment_ref: e.shipment_ref,
                status: e.status,
                carrier_status_code: e.carrier_status_code,
                carrier_status_detail: e.carrier_status_detail.map(bounded_text),
                description: e.description.map(bounded_text),
                occurred_at: e.occurred_at,
                time_assumed_utc: e.time_assumed_utc,
                location: crate::event::Location {
                    city: e.location.city.map(bounded_text),
                    region: e.location.region.map(bounded_text),
                    postal_code: e.location.postal_code.map(bounded_text),
                    country: e.location.country.map(bounded_text),
                },
                source_event_id: e.source_event_id.map(bounded_text),
                received_at: context.received_at,
                source: source.clone(),
            });
        }
        Ok((context, events))
    }

    /// Does this record's partition own state (dedupe keys, shipments, stored
    /// progress)? Raw partitions do not when their events hop to a home.
    pub fn is_stateful(&self, topic: &str) -> bool {
        !self.hop || self.placement.is_repartition_topic(topic)
    }

    /// Read one record: a repartition record's events (stage two), or a raw
    /// record normalized and then routed (stage one) or scoped by its home.
    fn prepare(&self, envelope: &Envelope, now: DateTime<Utc>) -> Prepared {
        if self.placement.is_repartition_topic(&envelope.topic) {
            return match routing::decode(&envelope.payload) {
                Err(error) => Prepared::Done(RecordResult::rejected(envelope, Rejected { error, carrier: None, tenant_id: None }, now)),
                Ok(RoutedEvents { correction: Some(correction), source, .. }) => {
                    let mut result = RecordResult::resolved(&correction.carrier, &correction.tenant_id);
                    result.from_repartition = true;
                    let source = source.unwrap_or_else(|| envelope.source());
                    Prepared::Correct(result, Scope::of(&envelope.topic, envelope.partition), Box::new(correction), source)
                }
                Ok(RoutedEvents { events, .. }) => {
                    let mut result = match events.first() {
                        Some(first) => RecordResult::resolved(&first.carrier, &first.tenant_id),
                        None => RecordResult::default(),
                    };
                    result.from_repartition = true;
                    let scope = Scope::of(&envelope.topic, envelope.partition);
                    Prepared::Apply(result, events.into_iter().map(|event| (scope, event)).collect())
                }
            };
        }
        if self.control_topic.as_deref() == Some(envelope.topic.as_str()) {
            return self.prepare_correction(envelope, now);
        }
        let (context, mut events) = match self.canonical_events(envelope, now) {
            Ok(ok) => ok,
            Err(rejected) => return Prepared::Done(RecordResult::rejected(envelope, rejected, now)),
        };
        // A history applies oldest first, ties by rank, whatever order the carrier listed it in.
        events.sort_by_key(|e| (e.occurred_at, e.status.rank()));
        let mut result = RecordResult::resolved(&context.carrier, &context.tenant_id);
        match &self.placement {
            Placement::Home { topic, partitions } if self.hop => {
                match routing::route(topic, *partitions, events) {
                    Ok(routed) => result.routed = routed,
                    Err(error) => {
                        let rejected = Rejected { error, carrier: result.carrier.clone(), tenant_id: result.tenant_id.clone() };
                        return Prepared::Done(RecordResult::rejected(envelope, rejected, now));
                    }
                }
                Prepared::Done(result)
            }
            placement => {
                let scoped = events.into_iter().map(|event| (placement.scope_of(envelope, &event), event)).collect();
                Prepared::Apply(result, scoped)
            }
        }
    }

    /// A control-topic record: a correction, routed to its shipment's home
    /// (the worker's first stage) or scoped by it (replay).
    fn prepare_correction(&self, envelope: &Envelope, now: DateTime<Utc>) -> Prepared {
        let correction = match correction::parse(&envelope.payload) {
            Ok(correction) => correction,
            Err(error) => return Prepared::Done(RecordResult::rejected(envelope, Rejected { error, carrier: None, tenant_id: None }, now)),
        };
        let mut result = RecordResult::resolved(&correction.carrier, &correction.tenant_id);
        let rejected = |error: RecordError, result: RecordResult| {
            Prepared::Done(RecordResult::rejected(envelope, Rejected { error, carrier: result.carrier, tenant_id: result.tenant_id }, now))
        };
        match &self.placement {
            Placement::Home { topic, partitions } if self.hop => match routing::route_correction(topic, *partitions, correction, envelope.source()) {
                Ok(routed) => {
                    result.routed.push(routed);
                    Prepared::Done(result)
                }
                Err(error) => rejected(error, result),
            },
            Placement::Home { topic, partitions } => {
                let home = routing::home_partition(*partitions, &correction.tenant_id, &correction.carrier, &correction.tracking_number);
                Prepared::Correct(result, Scope::of(topic, home), Box::new(correction), envelope.source())
            }
            Placement::Input => rejected(RecordError::Correction("corrections need routing.mode = \"home\" (with \"input\" a shipment's state lives where its records arrive, which a correction cannot know)".into()), result),
        }
    }

    /// Prepare every record of a batch, on up to [`Pipeline::threads`] threads,
    /// each with the time it took; results in input order.
    pub fn prepare_batch(&self, envelopes: &[Envelope], now: DateTime<Utc>) -> Vec<(Prepared, std::time::Duration)> {
        crate::parallel::map_ordered(envelopes, self.threads, |envelope| {
            let started = std::time::Instant::now();
            let prepared = self.prepare(envelope, now);
            (prepared, started.elapsed())
        })
    }

    /// With [`Placement::Input`], note where each event's shipment arrived. Runs
    /// on the applying thread, in input order, so the verdict does not depend
    /// on how preparation was spread over threads.
    fn check_keying(&self, envelope: &Envelope, result: &mut RecordResult, events: &[(Scope, TrackingEvent)]) {
        if let Some(check) = &self.keying_check {
            let mut check = check.lock().unwrap_or_else(|p| p.into_inner());
            result.keying_conflicts =
                events.iter().filter(|(_, e)| check.conflicts(&envelope.topic, envelope.partition, e)).count() as u32;
        }
    }

    /// Process one record against `state` at instant `now`.
    pub fn process<S: StateStore + ?Sized>(
        &self,
        envelope: &Envelope,
        now: DateTime<Utc>,
        state: &mut Staged<'_, S>,
    ) -> Result<RecordResult, StoreError> {
        self.apply(envelope, self.prepare(envelope, now), now, state)
    }

    /// The stateful half of [`Pipeline::process`]: dedupe, order and emit a
    /// prepared record's events against `state` at `now`.
    pub fn apply<S: StateStore + ?Sized>(
        &self,
        envelope: &Envelope,
        prepared: Prepared,
        now: DateTime<Utc>,
        state: &mut Staged<'_, S>,
    ) -> Result<RecordResult, StoreError> {
        let (mut result, events) = match prepared {
            Prepared::Done(result) => return Ok(result),
            Prepared::Apply(result, events) => (result, events),
            Prepared::Correct(result, scope, correction, source) => return self.apply_correction(envelope, result, scope, &correction, source, now, state),
        };
        self.check_keying(envelope, &mut result, &events);
        for (scope, event) in events {
            let applied = self.apply_event(scope, event, now, state)?;
            result.events.push(applied.outcome);
            result.upserts.extend(applied.upsert);
            result.decisions.extend(applied.decision);
        }
        Ok(result)
    }

    /// Process records as one unit whose new events are applied in status-hierarchy
    /// order (the bounded reorder window): each shipment's events are sorted by
    /// rank, stably, between the unranked ones (which keep their arrival place,
    /// see below), so within each shipment a lower status is emitted before a
    /// higher one whatever order they arrived in, and the window ends each
    /// shipment in the state arrival order would. Returns one result per record
    /// (events and dead letters; their `upserts` stay empty) and the upserts in
    /// emission order. Every distinct event still becomes exactly one milestone,
    /// represented by the copy that arrived first.
    pub fn process_in_hierarchy_order<S: StateStore + ?Sized>(
        &self,
        envelopes: &[Envelope],
        now: DateTime<Utc>,
        state: &mut Staged<'_, S>,
    ) -> Result<(Vec<RecordResult>, Vec<MilestoneUpsert>), StoreError> {
        let mut results = Vec::with_capacity(envelopes.len());
        let mut pending: Vec<(usize, Scope, TrackingEvent)> = Vec::new();
        // Corrections apply after the window's events: an operator's
        // retraction meets the scan it names even when both are held together.
        let mut corrections = Vec::new();
        for (index, (envelope, (prepared, _))) in envelopes.iter().zip(self.prepare_batch(envelopes, now)).enumerate() {
            match prepared {
                Prepared::Done(result) => results.push(result),
                Prepared::Apply(mut result, events) => {
                    self.check_keying(envelope, &mut result, &events);
                    pending.extend(events.into_iter().map(|(scope, event)| (index, scope, event)));
                    results.push(result);
                }
                Prepared::Correct(result, scope, correction, source) => {
                    corrections.push((index, scope, correction, source));
                    results.push(result);
                }
            }
        }
        // Within each shipment, an event without a rank (cancelled, exception,
        // unknown) stays where it arrived and splits the shipment's events into
        // segments; only each segment's ranked events are sorted. A segment's
        // ranked statuses end in the same state in any order (the higher wins),
        // and an unranked status applies to exactly what preceded it on arrival,
        // so the window ends every shipment in the state arrival order gives: a
        // `cancelled` behind a `picked_up` stays a prevented regression instead
        // of being applied first and freezing the shipment.
        //
        // Equal ranks keep their arrival order (the sort is stable and does not
        // look at occurred_at): copies of one event then meet in the order they
        // arrived, so the same copy represents it as without the window.
        let mut segment_of: HashMap<Vec<u8>, u32> = HashMap::new();
        let mut ordered: Vec<((u32, bool, u8), usize, Scope, TrackingEvent)> = pending
            .into_iter()
            .map(|(index, scope, event)| {
                let shipment = shipment_key(scope, &event.tenant_id, &event.carrier, &event.tracking_number, event.shipment_ref.as_deref());
                let segment = segment_of.entry(shipment).or_default();
                let rank = event.status.rank();
                let key = (*segment, rank == 0, rank);
                if rank == 0 {
                    *segment += 1;
                }
                (key, index, scope, event)
            })
            .collect();
        ordered.sort_by_key(|(key, ..)| *key);
        let mut upserts = Vec::new();
        for (_, index, scope, event) in ordered {
            let applied = self.apply_event(scope, event, now, state)?;
            results[index].events.push(applied.outcome);
            results[index].decisions.extend(applied.decision);
            upserts.extend(applied.upsert);
        }
        for (index, scope, correction, source) in corrections {
            let result = std::mem::take(&mut results[index]);
            let mut applied = self.apply_correction(&envelopes[index], result, scope, &correction, source, now, state)?;
            upserts.append(&mut applied.upserts);
            results[index] = applied;
        }
        Ok((results, upserts))
    }

    /// Dedupe, order and emit one canonical event in the state of its home `scope`.
    fn apply_event<S: StateStore + ?Sized>(
        &self,
        scope: Scope,
        event: TrackingEvent,
        now: DateTime<Utc>,
        state: &mut Staged<'_, S>,
    ) -> Result<AppliedEvent, StoreError> {
        let policy = self.dedupe.policy(&event.carrier);
        let found = dedupe::find(state, scope, policy, &event, now)?;
        if !self.record_decisions {
            let (outcome, upsert) = self.decide_event(scope, event, policy, found, now, state)?;
            return Ok(AppliedEvent { outcome, upsert, decision: None });
        }
        // What the decision matched, read before deciding stages anything.
        let mut draft = DecisionRecord::draft(&event, now);
        draft.matched = match &found {
            Match::None => None,
            Match::Hash { value } => dedupe::sighting(Keyspace::Hashes, &[], value).map(|s| matched_sighting("content_hash", s)),
            Match::Key { key, value, .. } => dedupe::sighting(Keyspace::Keys, key, value).map(|s| matched_sighting("composite_key", s)),
        };
        // The milestone a duplicate repeats: the composite-key entry's, when
        // the content is the same (its time and generation are the entry's).
        let repeated = match &found {
            Match::Hash { .. } => match dedupe::find_key(state, scope, policy, &event, now, &dedupe::content_hash(&event))? {
                Match::Key { key, value, .. } => repeated_milestone(&event, &key, &value),
                _ => None,
            },
            Match::Key { key, value, .. } => repeated_milestone(&event, key, value),
            Match::None => None,
        };
        let (outcome, upsert) = self.decide_event(scope, event, policy, found, now, state)?;
        draft.decision = match outcome.verdict {
            Verdict::New if outcome.applied.regression_prevented => Decision::RegressionPrevented,
            Verdict::New => Decision::New,
            Verdict::DuplicateHash => Decision::DuplicateHash,
            Verdict::DuplicateKey { collision: false } => Decision::DuplicateKey,
            Verdict::DuplicateKey { collision: true } => Decision::DuplicateKeyDifferentContent,
            Verdict::Revision { .. } => Decision::Revision,
        };
        draft.suspected_false_delivery = outcome.applied.suspected_false_delivery;
        match &upsert {
            Some(upsert) => {
                draft.milestone_id = Some(upsert.milestone_id.clone());
                draft.shipment_status = Some(upsert.shipment_status);
                draft.revision = upsert.revision;
            }
            None => draft.milestone_id = repeated,
        }
        let decision = (draft.decision != Decision::New).then_some(draft);
        Ok(AppliedEvent { outcome, upsert, decision })
    }

    /// Dedupe (`found`: what [`dedupe::find`] found for `event` under its
    /// carrier's `policy`), order and emit one canonical event.
    #[allow(clippy::too_many_arguments)]
    fn decide_event<S: StateStore + ?Sized>(
        &self,
        scope: Scope,
        event: TrackingEvent,
        policy: dedupe::DedupePolicy,
        found: Match,
        now: DateTime<Utc>,
        state: &mut Staged<'_, S>,
    ) -> Result<(EventOutcome, Option<MilestoneUpsert>), StoreError> {
        let (verdict, matched) = match found {
            Match::None => (Verdict::New, None),
            Match::Hash { .. } => (Verdict::DuplicateHash, None),
            Match::Key { key, value, collision } => (dedupe::key_verdict(state, scope, &event, &key, &value, collision, now)?, Some((key, value))),
        };
        let mut outcome = EventOutcome { verdict, status: event.status, occurred_at: event.occurred_at, applied: Applied::default() };
        if let (Verdict::Revision { revision, original_ms }, Some((key, value))) = (verdict, matched) {
            // A correction of a scan already emitted: the same milestone (its
            // first time, its generation), the corrected text; the shipment's
            // status is not touched (the scan's status did not change).
            let (key_of_revision, value_of_revision) = (key.clone(), value.clone());
            dedupe::stage_revision(state, scope, key, &value, &event, revision, now);
            let shipment_key = shipment_key(scope, &event.tenant_id, &event.carrier, &event.tracking_number, event.shipment_ref.as_deref());
            let (shipment_status, latest_status) = match state.get(Keyspace::Shipments, &shipment_key)? {
                Some(bytes) => {
                    let shipment = ShipmentState::decode(&bytes)?;
                    (shipment.shipment_status, shipment.latest_status)
                }
                None => (event.status, event.status),
            };
            let generation = dedupe::sighting(Keyspace::Keys, &key_of_revision, &value_of_revision).and_then(|s| s.milestone).map_or(0, |m| m.outcome.generation);
            let mut corrected = event;
            corrected.occurred_at = DateTime::from_timestamp_millis(original_ms).unwrap_or(corrected.occurred_at);
            let mut upsert = MilestoneUpsert::new_in_generation(corrected, shipment_status, latest_status, generation);
            upsert.revision = revision;
            return Ok((outcome, Some(upsert)));
        }
        if verdict != Verdict::New {
            return Ok((outcome, None));
        }
        let expires_at_ms = now.timestamp_millis().saturating_add(policy.ttl_ms());
        let key = shipment_key(scope, &event.tenant_id, &event.carrier, &event.tracking_number, event.shipment_ref.as_deref());
        let gap = self.generation_gap(&event.carrier);
        let (shipment_status, latest_status, generation) = match state.get(Keyspace::Shipments, &key)? {
            Some(bytes) => {
                let mut shipment = ShipmentState::decode(&bytes)?;
                if shipment.expires_at_ms <= now.timestamp_millis() {
                    // Forgotten shipment (TTL passed): start its timeline afresh.
                    shipment = ShipmentState::new(event.status, event.occurred_at, expires_at_ms);
                } else {
                    match shipment.belongs(event.status, event.occurred_at, gap) {
                        Belongs::Current => {
                            outcome.applied = shipment.apply(event.status, event.occurred_at, expires_at_ms);
                            if outcome.applied.suspected_false_delivery {
                                tracing::warn!(
                                    tenant = %event.tenant_id,
                                    carrier = %event.carrier,
                                    tracking_number = %event.tracking_number,
                                    status = event.status.as_str(),
                                    "suspected false delivery: a scan later than the shipment's delivery; the status stays delivered (waymark explain --shipment shows its scans)"
                                );
                            }
                        }
                        Belongs::NewGeneration => {
                            shipment = shipment.next_generation(event.status, event.occurred_at, expires_at_ms);
                            outcome.applied.new_generation = true;
                        }
                        Belongs::Earlier => {
                            // A late scan of the previous use of the number: its
                            // milestone, in that generation, at the status that
                            // generation ended with; the current one is not touched.
                            let generation = shipment.generation - 1;
                            let ended = shipment.previous_status;
                            outcome.applied.regression_prevented = true;
                            let decided = dedupe::Outcome { shipment_status: ended.as_str().to_string(), generation, regression_prevented: true, ..dedupe::Outcome::default() };
                            let milestone = dedupe::milestone_digest(&event, generation);
                            dedupe::stage_new(state, scope, policy, &event, now, &decided, &milestone);
                            return Ok((outcome, Some(MilestoneUpsert::of_milestone(event, &milestone, ended, ended, generation))));
                        }
                    }
                }
                state.put(Keyspace::Shipments, key, shipment.encode());
                (shipment.shipment_status, shipment.latest_status, shipment.generation)
            }
            None => {
                let shipment = ShipmentState::new(event.status, event.occurred_at, expires_at_ms);
                state.put(Keyspace::Shipments, key, shipment.encode());
                (shipment.shipment_status, shipment.latest_status, 0)
            }
        };
        let decided = dedupe::Outcome {
            regression_prevented: outcome.applied.regression_prevented,
            out_of_order: outcome.applied.out_of_order,
            shipment_status: shipment_status.as_str().to_string(),
            generation,
        };
        let milestone = dedupe::milestone_digest(&event, generation);
        dedupe::stage_new(state, scope, policy, &event, now, &decided, &milestone);
        Ok((outcome, Some(MilestoneUpsert::of_milestone(event, &milestone, shipment_status, latest_status, generation))))
    }

    /// Apply a correction in the state of its shipment's home `scope`: find
    /// the milestone it names among the shipment's live composite-key entries,
    /// mark it retracted, recompute the shipment's status from the milestones
    /// that remain in its generation ([`crate::order::replayed`]: oldest
    /// first), and emit the `retract_milestone` upsert. A milestone already
    /// retracted (the correction delivered again) changes nothing; one the
    /// state does not hold makes the record a dead letter that says why.
    /// Scans the home partition's composite-key entries once, streamed: a
    /// correction is an operator's action, not per-event work.
    #[allow(clippy::too_many_arguments)]
    fn apply_correction<S: StateStore + ?Sized>(
        &self,
        envelope: &Envelope,
        mut result: RecordResult,
        scope: Scope,
        correction: &Correction,
        source: SourceRef,
        now: DateTime<Utc>,
        state: &mut Staged<'_, S>,
    ) -> Result<RecordResult, StoreError> {
        let reject = |result: RecordResult, reason: String| {
            let rejected = Rejected { error: RecordError::Correction(reason), carrier: result.carrier.clone(), tenant_id: result.tenant_id.clone() };
            Ok(RecordResult { from_repartition: result.from_repartition, ..RecordResult::rejected(envelope, rejected, now) })
        };
        let Some(wanted) = correction.milestone_bytes() else {
            return reject(result, format!("`{}` is not a milestone id", correction.milestone_id));
        };
        let filter = dedupe::shipment_filter(&correction.tenant_id, &correction.carrier, &correction.tracking_number);
        let now_ms = now.timestamp_millis();
        // The shipment's live milestones: (key, value, facts).
        let mut milestones = Vec::new();
        let end = u64::from_be_bytes(scope.0).wrapping_add(1).to_be_bytes();
        state.visit(Keyspace::Keys, &scope.0, &end, &mut |key, value| {
            let live = dedupe::expires_at_ms(Keyspace::Keys, value).is_ok_and(|expires| now_ms < expires);
            if let Some(facts) = dedupe::sighting(Keyspace::Keys, key, value).and_then(|s| s.milestone).filter(|f| live && f.shipment == filter) {
                milestones.push((key.to_vec(), value.to_vec(), facts));
            }
            true
        })?;
        let Some(target) = milestones.iter().position(|(.., facts)| facts.milestone_id == Some(wanted)) else {
            return reject(
                result,
                format!(
                    "shipment {}:{}:{} has no live milestone {} in this state (never seen, expired, or recorded by a Waymark that did not keep milestone ids; `waymark explain --shipment` lists its milestones)",
                    correction.tenant_id, correction.carrier, correction.tracking_number, correction.milestone_id
                ),
            );
        };
        let (key, value, facts) = milestones.swap_remove(target);
        if facts.retracted {
            tracing::info!(milestone_id = %correction.milestone_id, "the milestone is retracted already; the correction changes nothing");
            return Ok(result);
        }
        let (Some(retracted), Some(status)) = (dedupe::retracted(&value), Status::parse(&facts.status)) else {
            return reject(result, format!("the state entry of milestone {} cannot be read by this Waymark", correction.milestone_id));
        };
        state.put(Keyspace::Keys, key, retracted);
        let generation = facts.outcome.generation;
        let remaining: Vec<(Status, DateTime<Utc>)> = milestones
            .iter()
            .filter(|(.., f)| !f.retracted && f.outcome.generation == generation)
            .filter_map(|(.., f)| Some((Status::parse(&f.status)?, f.occurred_at)))
            .collect();
        let shipment_key = shipment_key(scope, &correction.tenant_id, &correction.carrier, &correction.tracking_number, facts.shipment_ref.as_deref());
        let (shipment_status, latest_status) = match state.get(Keyspace::Shipments, &shipment_key)? {
            Some(bytes) => {
                let mut shipment = ShipmentState::decode(&bytes)?;
                if shipment.generation == generation {
                    let (now_status, latest, latest_at) = crate::order::replayed(&remaining).unwrap_or((Status::Unknown, Status::Unknown, shipment.latest_occurred_at));
                    shipment.shipment_status = now_status;
                    shipment.latest_status = latest;
                    shipment.latest_occurred_at = latest_at;
                    if generation == 0 {
                        shipment.previous_status = now_status;
                    }
                    state.put(Keyspace::Shipments, shipment_key, shipment.encode());
                    (shipment.shipment_status, shipment.latest_status)
                } else {
                    // A milestone of an earlier generation: that parcel's
                    // timeline changes, the current one does not.
                    let (then, latest, _) = crate::order::replayed(&remaining).unwrap_or((Status::Unknown, Status::Unknown, facts.occurred_at));
                    (then, latest)
                }
            }
            None => (Status::Unknown, Status::Unknown),
        };
        tracing::info!(
            tenant = %correction.tenant_id,
            carrier = %correction.carrier,
            tracking_number = %correction.tracking_number,
            milestone_id = %correction.milestone_id,
            status = status.as_str(),
            shipment_status = shipment_status.as_str(),
            requested_by = %correction.requested_by,
            reason = %correction.reason,
            "milestone retracted by a correction; the shipment's status is what its remaining milestones give"
        );
        result.retractions += 1;
        result.upserts.push(MilestoneUpsert {
            kind: "retract_milestone".into(),
            milestone_id: correction.milestone_id.clone(),
            tenant_id: correction.tenant_id.clone(),
            carrier: correction.carrier.clone(),
            tracking_number: correction.tracking_number.clone(),
            shipment_ref: facts.shipment_ref,
            status,
            carrier_status_code: facts.carrier_status_code,
            carrier_status_detail: None,
            description: None,
            occurred_at: facts.occurred_at,
            time_assumed_utc: false,
            location: crate::event::Location::default(),
            shipment_status,
            latest_status,
            source,
            revision: 0,
            generation,
            retraction: Some(Retraction::from(correction)),
        });
        Ok(result)
    }

    /// How long after a shipment's latest event an early-status event means a
    /// reused tracking number, for `carrier`.
    pub fn generation_gap(&self, carrier: &str) -> std::time::Duration {
        self.generation_gaps.get(carrier).copied().or(self.default_generation_gap).unwrap_or(crate::order::DEFAULT_GENERATION_GAP)
    }
}

/// Offsets keyspace key of an input partition: scope | partition (BE) | topic.
pub fn progress_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut key = Scope::of(topic, partition).0.to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key.extend_from_slice(topic.as_bytes());
    key
}

/// Stage "everything before `next_offset` of this partition is done".
pub fn stage_progress<S: StateStore + ?Sized>(state: &mut Staged<'_, S>, topic: &str, partition: i32, next_offset: i64) {
    state.put(Keyspace::Offsets, progress_key(topic, partition), next_offset.to_be_bytes().to_vec());
}

/// The next offset to process for a partition, if the store knows it.
pub fn stored_progress<S: StateStore + ?Sized>(store: &S, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
    stored_offset(store, &progress_key(topic, partition))
}

/// An offset (8 bytes, big-endian) stored under `key` in the offsets keyspace.
pub fn stored_offset<S: StateStore + ?Sized>(store: &S, key: &[u8]) -> Result<Option<i64>, StoreError> {
    match store.get(Keyspace::Offsets, key)? {
        None => Ok(None),
        Some(bytes) => {
            let raw: [u8; 8] = bytes.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                keyspace: Keyspace::Offsets.name(),
                reason: format!("offset value of {} bytes", bytes.len()),
            })?;
            Ok(Some(i64::from_be_bytes(raw)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider re-sends a scan with corrected text: the same milestone id,
    /// emitted again as revision 1 (no new milestone, the status untouched); the
    /// same correction again is a duplicate; a second correction is revision 2;
    /// a copy whose clock is skewed within the tolerance stays a duplicate.
    #[test]
    fn a_corrected_scan_is_a_revision_of_the_same_milestone() {
        use crate::state::MemoryStore;
        let pipeline = Pipeline::default();
        let store = MemoryStore::default();
        let now = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 11, 1, 0, 0, 0).unwrap();
        let sample = include_str!("../replay/sample.ndjson");
        let first = Envelope::from_kcat_json(sample.lines().next().unwrap()).unwrap();
        let run = |envelope: &Envelope| {
            let output = crate::batch::process(&pipeline, &store, std::slice::from_ref(envelope), now, false, None).unwrap();
            store.write(output.state.clone()).unwrap();
            output
        };
        let original = run(&first);
        assert!(!original.upserts.is_empty());
        let body = String::from_utf8(first.payload.clone()).unwrap();
        let message = original.upserts[0].description.clone().expect("the sample's scan has a description");
        let mut corrected = first.clone();
        corrected.offset += 1;
        corrected.payload = body.replace(&message, "Shipment information sent to carrier (corrected)").into_bytes();
        let revised = run(&corrected);
        assert_eq!(revised.summary.revisions, 1, "{:?}", revised.summary);
        assert_eq!(revised.summary.new_milestones, 0);
        assert_eq!(revised.upserts.len(), 1);
        let upsert = &revised.upserts[0];
        assert_eq!(upsert.milestone_id, original.upserts[0].milestone_id, "a revision keeps the milestone id");
        assert_eq!(upsert.occurred_at, original.upserts[0].occurred_at);
        assert_eq!(upsert.revision, 1);
        assert_eq!(upsert.description.as_deref(), Some("Shipment information sent to carrier (corrected)"));
        assert_eq!(upsert.shipment_status, original.upserts[0].shipment_status, "the status does not move");
        let json = serde_json::to_value(upsert).unwrap();
        assert_eq!(json["revision"], 1);
        assert!(serde_json::to_value(&original.upserts[0]).unwrap().get("revision").is_none(), "a first emission carries no revision field");

        // The same correction again: a duplicate, nothing emitted.
        let mut again = corrected.clone();
        again.offset += 1;
        assert!(run(&again).upserts.is_empty());
        // A second correction: revision 2.
        let mut second = first.clone();
        second.offset += 10;
        second.payload = body.replace(&message, "Shipment information sent to carrier (corrected twice)").into_bytes();
        let revised = run(&second);
        assert_eq!(revised.upserts.iter().map(|u| u.revision).collect::<Vec<_>>(), [2]);
    }

    use crate::state::MemoryStore;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 8, 3, 0, 0, 0).unwrap()
    }

    fn envelope(offset: i64, body: &str) -> Envelope {
        Envelope {
            topic: "tracking.raw.easypost".into(),
            partition: 0,
            offset,
            timestamp_ms: None,
            headers: vec![("tenant-id".into(), Some(b"acme".to_vec()))],
            key: None,
            payload: body.as_bytes().to_vec(),
        }
    }

    fn tracker(details: &[(&str, &str, &str)]) -> String {
        let details: Vec<serde_json::Value> = details
            .iter()
            .map(|(status, code, at)| serde_json::json!({"status": status, "carrier_code": code, "datetime": at, "message": code}))
            .collect();
        serde_json::json!({"object": "Event", "id": "evt_x", "description": "tracker.updated",
            "result": {"object": "Tracker", "tracking_code": "EZ1", "tracking_details": details}})
        .to_string()
    }

    fn run(pipeline: &Pipeline, store: &MemoryStore, env: &Envelope) -> RecordResult {
        let mut staged = Staged::new(store);
        let result = pipeline.process(env, now(), &mut staged).unwrap();
        store.write(staged.take_batch()).unwrap();
        result
    }

    #[test]
    fn history_redelivery_emits_only_new_milestones_and_status_never_regresses() {
        let pipeline = Pipeline::default();
        let store = MemoryStore::default();
        let first = tracker(&[("pre_transit", "OC", "2024-07-31T15:00:00Z"), ("in_transit", "PU", "2024-07-31T19:27:00Z")]);
        let r1 = run(&pipeline, &store, &envelope(0, &first));
        assert_eq!(r1.upserts.len(), 2);
        assert_eq!(r1.upserts[1].shipment_status, Status::PickedUp);
        // Exact redelivery: nothing new.
        let r2 = run(&pipeline, &store, &envelope(1, &first));
        assert!(r2.upserts.is_empty());
        assert!(r2.events.iter().all(|e| e.verdict == Verdict::DuplicateHash));
        // Delivered, then a late in_transit scan: milestone ensured, status kept.
        let delivered = tracker(&[("delivered", "DL", "2024-08-02T10:00:00Z")]);
        assert_eq!(run(&pipeline, &store, &envelope(2, &delivered)).upserts[0].shipment_status, Status::Delivered);
        let late = tracker(&[("in_transit", "AR", "2024-08-01T10:00:00Z")]);
        let r4 = run(&pipeline, &store, &envelope(3, &late));
        assert_eq!(r4.upserts.len(), 1);
        assert_eq!(r4.upserts[0].shipment_status, Status::Delivered);
        assert_eq!(r4.upserts[0].latest_status, Status::Delivered);
        assert!(r4.events[0].applied.regression_prevented && r4.events[0].applied.out_of_order);
    }

    /// With decisions on, each event that is not a plain new milestone is
    /// recorded with what it matched; off (the default), none are.
    #[test]
    fn decisions_name_what_each_non_new_event_matched() {
        let pipeline = Pipeline { record_decisions: true, ..Pipeline::default() };
        let store = MemoryStore::default();
        let first = tracker(&[("pre_transit", "OC", "2024-07-31T15:00:00Z"), ("in_transit", "PU", "2024-07-31T19:27:00Z")]);
        let r1 = run(&pipeline, &store, &envelope(0, &first));
        assert_eq!(r1.upserts.len(), 2);
        assert!(r1.decisions.is_empty(), "new milestones are not decisions: {:?}", r1.decisions);

        // An exact redelivery: two content duplicates of offset 0's milestones.
        let r2 = run(&pipeline, &store, &envelope(1, &first));
        assert_eq!(r2.decisions.len(), 2);
        for (decision, upsert) in r2.decisions.iter().zip(&r1.upserts) {
            assert_eq!(decision.decision, Decision::DuplicateHash);
            assert_eq!(decision.source.offset, 1, "the source is this record");
            let matched = decision.matched.as_ref().expect("the entry's first sighting");
            assert_eq!((matched.entry.as_str(), matched.source.offset, matched.first_seen), ("content_hash", 0, now()));
            assert!(matched.expires_at > now());
            assert_eq!(decision.milestone_id.as_ref(), Some(&upsert.milestone_id), "the milestone it repeats");
        }

        // The pickup again with its clock 1 s off (inside the 2 s skew tolerance):
        // the same scan, the same milestone.
        let skewed = tracker(&[("in_transit", "PU", "2024-07-31T19:27:01Z")]);
        let r3 = run(&pipeline, &store, &envelope(2, &skewed));
        assert!(r3.upserts.is_empty());
        let decision = &r3.decisions[0];
        assert_eq!(decision.decision, Decision::DuplicateKeyDifferentContent);
        assert_eq!(decision.matched.as_ref().map(|m| (m.entry.as_str(), m.source.offset)), Some(("composite_key", 0)));
        assert_eq!(decision.milestone_id.as_ref(), Some(&r1.upserts[1].milestone_id));

        // Delivered, then a scan from before it: emitted, the status kept.
        run(&pipeline, &store, &envelope(3, &tracker(&[("delivered", "DL", "2024-08-02T10:00:00Z")])));
        let late = run(&pipeline, &store, &envelope(4, &tracker(&[("out_for_delivery", "OD", "2024-08-02T08:00:00Z")])));
        let decision = &late.decisions[0];
        assert_eq!(decision.decision, Decision::RegressionPrevented);
        assert_eq!(decision.shipment_status, Some(Status::Delivered));
        assert_eq!(decision.milestone_id.as_ref(), Some(&late.upserts[0].milestone_id));
        assert!(decision.matched.is_none() && !decision.suspected_false_delivery);
        // ...and one from after it: a suspected false delivery.
        let after = run(&pipeline, &store, &envelope(5, &tracker(&[("in_transit", "AR", "2024-08-02T12:00:00Z")])));
        assert!(after.decisions[0].suspected_false_delivery);
        let json = serde_json::to_value(&after.decisions[0]).unwrap();
        assert_eq!((json["kind"].as_str(), json["decision"].as_str()), (Some("decision"), Some("regression_prevented")));

        // Off: the same stream records nothing.
        let quiet = Pipeline::default();
        let store = MemoryStore::default();
        run(&quiet, &store, &envelope(0, &first));
        assert!(run(&quiet, &store, &envelope(1, &first)).decisions.is_empty());
    }

    fn correction(offset: i64, milestone_id: &str) -> Envelope {
        let at = Utc.with_ymd_and_hms(2024, 8, 3, 0, 0, 0).unwrap();
        let correction = Correction::retract("acme", "easypost", "EZ1", milestone_id, "mis-scanned as delivered", "ops@acme", at);
        Envelope { topic: "tracking.control".into(), payload: serde_json::to_vec(&correction).unwrap(), ..envelope(offset, "") }
    }

    fn with_control() -> Pipeline {
        Pipeline { control_topic: Some("tracking.control".into()), ..Pipeline::default() }
    }

    /// A false `delivered` retracted: the retraction names the milestone and
    /// carries the status the remaining milestones give; the state follows
    /// (the next scan moves the status on from there); the same correction
    /// again changes nothing, the retracted scan sent again stays a duplicate,
    /// and a correction naming no milestone of the shipment is a dead letter.
    #[test]
    fn a_retraction_restores_the_status_the_remaining_milestones_give() {
        let pipeline = with_control();
        let store = MemoryStore::default();
        let history = tracker(&[("pre_transit", "OC", "2024-07-31T15:00:00Z"), ("in_transit", "PU", "2024-07-31T19:27:00Z")]);
        run(&pipeline, &store, &envelope(0, &history));
        let delivered = tracker(&[("delivered", "DL", "2024-08-01T10:00:00Z")]);
        let false_delivery = run(&pipeline, &store, &envelope(1, &delivered)).upserts.remove(0);
        assert_eq!(false_delivery.shipment_status, Status::Delivered);
        let scan = run(&pipeline, &store, &envelope(2, &tracker(&[("in_transit", "AR", "2024-08-01T18:00:00Z")])));
        assert!(scan.events[0].applied.suspected_false_delivery);
        assert_eq!(scan.upserts[0].shipment_status, Status::Delivered, "never changed automatically");

        let retracted = run(&pipeline, &store, &correction(3, &false_delivery.milestone_id));
        assert!(retracted.dead_letter.is_none(), "{:?}", retracted.dead_letter);
        assert_eq!(retracted.retractions, 1);
        let upsert = &retracted.upserts[0];
        assert_eq!((upsert.kind.as_str(), upsert.milestone_id.as_str()), ("retract_milestone", false_delivery.milestone_id.as_str()));
        assert_eq!((upsert.status, upsert.occurred_at), (Status::Delivered, false_delivery.occurred_at));
        assert_eq!((upsert.shipment_status, upsert.latest_status), (Status::InTransit, Status::InTransit));
        let audit = upsert.retraction.as_ref().expect("who, when, why");
        assert_eq!((audit.requested_by.as_str(), audit.reason.as_str()), ("ops@acme", "mis-scanned as delivered"));
        assert_eq!(upsert.source.topic, "tracking.control");

        // The state follows: the next scan moves on from in_transit.
        let next = run(&pipeline, &store, &envelope(4, &tracker(&[("out_for_delivery", "OD", "2024-08-02T08:00:00Z")])));
        assert_eq!(next.upserts[0].shipment_status, Status::OutForDelivery);
        // Delivered again, applied exactly once: nothing; the false scan re-sent: a duplicate.
        let again = run(&pipeline, &store, &correction(5, &false_delivery.milestone_id));
        assert!(again.upserts.is_empty() && again.dead_letter.is_none() && again.retractions == 0);
        let resent = run(&pipeline, &store, &envelope(6, &delivered));
        assert!(resent.upserts.is_empty(), "a retracted scan sent again stays retracted");
        // A milestone the shipment never had.
        let unknown = run(&pipeline, &store, &correction(7, &"0".repeat(64)));
        assert_eq!(unknown.dead_letter.as_ref().map(|d| d.error_kind.as_str()), Some("invalid_correction"));
        assert!(unknown.upserts.is_empty());
        // Without a control topic the same record is an ordinary (bad) carrier record.
        let plain = run(&Pipeline::default(), &MemoryStore::default(), &correction(8, &false_delivery.milestone_id));
        assert!(plain.upserts.is_empty() && plain.retractions == 0);
    }

    /// The worker's first stage routes a correction to its shipment's home;
    /// the second applies it there, like replay does in place.
    #[test]
    fn a_correction_hops_to_its_shipments_home() {
        let Placement::Home { topic, partitions } = Placement::default() else { unreachable!() };
        let first_stage = Pipeline { hop: true, ..with_control() };
        let routed = run(&first_stage, &MemoryStore::default(), &correction(0, &"ab".repeat(32))).routed;
        assert_eq!(routed.len(), 1);
        assert_eq!((routed[0].topic.as_str(), routed[0].partition), (topic.as_str(), routing::home_partition(partitions, "acme", "easypost", "EZ1")));
        assert_eq!(routed[0].key, "acme:easypost:EZ1");
        let decoded = routing::decode(&routed[0].payload).unwrap();
        assert_eq!(decoded.correction.map(|c| c.milestone_id), Some("ab".repeat(32)));
    }

    proptest::proptest! {
        /// Retracting any one milestone leaves the shipment where the
        /// remaining scans alone, oldest first, would have put it.
        #[test]
        fn a_retraction_equals_never_having_seen_the_scan(
            scans in proptest::collection::vec((0usize..5, 0i64..5000), 1..8),
            pick in 0usize..8,
        ) {
            const KINDS: [(&str, &str); 5] = [("pre_transit", "OC"), ("in_transit", "PU"), ("in_transit", "AR"), ("out_for_delivery", "OD"), ("delivered", "DL")];
            let mut scans = scans;
            scans.sort_by_key(|(_, minute)| *minute);
            scans.dedup_by_key(|(_, minute)| *minute);
            let at = |minute: i64| (Utc.with_ymd_and_hms(2024, 7, 30, 0, 0, 0).unwrap() + chrono::Duration::minutes(minute)).to_rfc3339();
            let body = |(kind, minute): (usize, i64)| tracker(&[(KINDS[kind].0, KINDS[kind].1, &at(minute))]);
            // Arrival order: reversed, so that statuses are held back as they would be.
            let pipeline = with_control();
            let store = MemoryStore::default();
            let mut emitted = Vec::new();
            for (offset, scan) in scans.iter().rev().enumerate() {
                emitted.extend(run(&pipeline, &store, &envelope(offset as i64, &body(*scan))).upserts.into_iter().map(|u| (u, *scan)));
            }
            let (victim, victim_scan) = emitted[pick % emitted.len()].clone();
            let retracted = run(&pipeline, &store, &correction(100, &victim.milestone_id));
            proptest::prop_assert_eq!(retracted.upserts.len(), 1);
            // The same scans without the victim, oldest first, in a fresh state.
            let fresh = MemoryStore::default();
            let mut last = None;
            for (offset, scan) in scans.iter().filter(|s| **s != victim_scan).enumerate() {
                last = run(&pipeline, &fresh, &envelope(offset as i64, &body(*scan))).upserts.pop().or(last);
            }
            let expected = last.map_or((Status::Unknown, Status::Unknown), |u| (u.shipment_status, u.latest_status));
            proptest::prop_assert_eq!((retracted.upserts[0].shipment_status, retracted.upserts[0].latest_status), expected);
        }
    }

    /// Every shipment state the store holds, to compare two runs.
    fn shipments(store: &MemoryStore) -> Vec<(Vec<u8>, Vec<u8>)> {
        Staged::new(store).scan(Keyspace::Shipments, &[], &[0xff; 64]).unwrap()
    }

    #[test]
    fn a_reorder_window_ends_each_shipment_where_arrival_order_does() {
        // Arrival: an arrival scan before its pickup, then a late voided-label
        // `cancelled` (a prevented regression); then delivered, an exception,
        // and a late out_for_delivery.
        let arrivals = [
            tracker(&[("in_transit", "AR", "2024-08-01T12:00:00Z")]),
            tracker(&[("in_transit", "PU", "2024-08-01T10:00:00Z")]),
            tracker(&[("cancelled", "CA", "2024-08-01T13:00:00Z")]),
            tracker(&[("delivered", "DL", "2024-08-02T10:00:00Z")]),
            tracker(&[("failure", "SE", "2024-08-02T11:00:00Z")]),
            tracker(&[("out_for_delivery", "OD", "2024-08-02T08:00:00Z")]),
        ];
        let envelopes: Vec<Envelope> = arrivals.iter().enumerate().map(|(i, body)| envelope(i as i64, body)).collect();
        let pipeline = Pipeline::default();
        let in_arrival_order = MemoryStore::default();
        for e in &envelopes {
            run(&pipeline, &in_arrival_order, e);
        }
        let in_one_window = MemoryStore::default();
        let mut staged = Staged::new(&in_one_window);
        let (_, upserts) = pipeline.process_in_hierarchy_order(&envelopes, now(), &mut staged).unwrap();
        in_one_window.write(staged.take_batch()).unwrap();
        assert_eq!(shipments(&in_one_window), shipments(&in_arrival_order));
        let statuses: Vec<Status> = upserts.iter().map(|u| u.shipment_status).collect();
        assert!(!statuses.contains(&Status::Cancelled), "the late cancel froze the shipment: {statuses:?}");
        assert_eq!(statuses.last(), Some(&Status::Delivered));
        // The unranked events keep their arrival place; the ranked ones between
        // them are sorted: PU, AR | CA | DL | SE | OD.
        let emitted: Vec<&str> = upserts.iter().map(|u| u.carrier_status_code.as_str()).collect();
        assert_eq!(emitted, ["PU", "AR", "CA", "DL", "SE", "OD"]);
    }

    #[test]
    fn results_do_not_depend_on_the_number_of_preparing_threads() {
        let bodies: Vec<Envelope> = (0..200)
            .map(|i| {
                let status = ["pre_transit", "in_transit", "out_for_delivery", "delivered"][i % 4];
                let body = tracker(&[(status, "X", &format!("2024-08-01T{:02}:00:00Z", i % 24))]).replace("EZ1", &format!("EZ{}", i % 7));
                envelope(i as i64, if i % 50 == 3 { "{not json" } else { &body })
            })
            .collect();
        let outputs: Vec<_> = [1, 2, 5]
            .into_iter()
            .map(|threads| {
                let pipeline = Pipeline { threads, ..Pipeline::default() };
                let store = MemoryStore::default();
                let output = crate::batch::process(&pipeline, &store, &bodies, now(), false, None).unwrap();
                (serde_json::to_string(&output.upserts).unwrap(), serde_json::to_string(&output.dead_letters).unwrap(), shipments(&store).len())
            })
            .collect();
        assert!(!outputs[0].0.is_empty() && outputs[0].1.len() > 2);
        assert_eq!(outputs[0], outputs[1]);
        assert_eq!(outputs[0], outputs[2]);
    }

    #[test]
    fn a_replay_with_new_ids_reordered_keys_and_other_whitespace_is_a_duplicate() {
        let pipeline = Pipeline::default();
        let store = MemoryStore::default();
        let first = tracker(&[("in_transit", "AR", "2024-07-31T22:35:00Z")]);
        assert_eq!(run(&pipeline, &store, &envelope(0, &first)).upserts.len(), 1);
        // Same scan: pretty-printed, keys in another order, a new event id, and the
        // instant written with an offset instead of Z.
        let replayed = r#"{
            "result": {"tracking_details": [{"message": "AR", "datetime": "2024-07-31T18:35:00-04:00",
                                             "carrier_code": "AR", "status": "in_transit"}],
                       "tracking_code": "EZ1", "object": "Tracker"},
            "description": "tracker.updated",   "id": "evt_replayed_after_incident",
            "object": "Event"
        }"#;
        let result = run(&pipeline, &store, &envelope(1, replayed));
        assert!(result.upserts.is_empty());
        assert_eq!(result.events[0].verdict, Verdict::DuplicateHash);
    }

    #[test]
    fn bad_records_become_dead_letters_with_reasons() {
        let pipeline = Pipeline::default();
        let store = MemoryStore::default();
        let r = run(&pipeline, &store, &envelope(0, "{not json"));
        let dl = r.dead_letter.unwrap();
        assert_eq!(dl.error_kind, "invalid_json");
        assert_eq!(dl.envelope.payload.as_deref(), Some("{not json"));
        assert!(store.is_empty());
    }

    #[test]
    fn oversized_text_is_bounded_and_oversized_identifiers_are_dead_letters() {
        let pipeline = Pipeline::default();
        let long = "é".repeat(5000);
        let body = serde_json::json!({"object": "Event", "id": "evt_x", "description": "tracker.updated",
            "result": {"object": "Tracker", "tracking_code": "EZ1", "tracking_details": [
                {"status": "in_transit", "carrier_code": "AR", "datetime": "2024-07-31T19:27:00Z", "message": long}]}})
        .to_string();
        let (_, events) = pipeline.canonical_events(&envelope(0, &body), now()).unwrap();
        let description = events[0].description.as_deref().unwrap();
        assert!(description.len() <= MAX_TEXT_BYTES && description.ends_with('…'), "{}", description.len());
        let body = tracker(&[("in_transit", "AR", "2024-07-31T19:27:00Z")]).replace("EZ1", &"9".repeat(300));
        let rejected = pipeline.canonical_events(&envelope(1, &body), now()).unwrap_err();
        assert_eq!(rejected.error.kind(), "unsupported");
        assert!(rejected.error.to_string().contains("tracking_number"), "{}", rejected.error);
    }

    #[test]
    fn progress_round_trips() {
        let store = MemoryStore::default();
        let mut staged = Staged::new(&store);
        stage_progress(&mut staged, "t", 2, 42);
        store.write(staged.take_batch()).unwrap();
        assert_eq!(stored_progress(&store, "t", 2).unwrap(), Some(42));
        assert_eq!(stored_progress(&store, "t", 1).unwrap(), None);
    }
}
