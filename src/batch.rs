//! One batch through the pipeline: the shape shared by the Kafka worker and replay.
//!
//! `process` stages every state change of the batch in an overlay; the caller sends
//! the outputs, waits for the acknowledgement, and only then writes the returned
//! [`StateBatch`] (dedupe keys, shipment states and, for Kafka, input progress) in
//! one atomic write. A crash before that write re-processes the batch from the
//! stored progress, producing the identical upserts again.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::envelope::Envelope;
use crate::error::StoreError;
use crate::sink::{Outputs, Sink, SinkError};
use crate::output::{DeadLetter, DecisionRecord, MilestoneUpsert};
use crate::pipeline::{stage_progress, Pipeline, Prepared, RecordResult};
use crate::routing::RoutedRecord;
use crate::state::{StateBatch, StateStore, Staged};
use crate::telemetry::Telemetry;

/// Outputs and staged state of one batch.
#[derive(Debug, Default)]
pub struct BatchOutput {
    pub upserts: Vec<MilestoneUpsert>,
    pub dead_letters: Vec<DeadLetter>,
    /// Stage one of the worker: canonical events on their way to their home partition.
    pub routed: Vec<RoutedRecord>,
    /// Non-new decisions (with [`Pipeline::record_decisions`]).
    pub decisions: Vec<DecisionRecord>,
    /// Apply only after the outputs are acknowledged.
    pub state: StateBatch,
    pub summary: Summary,
}

impl BatchOutput {
    /// The records to send, by destination.
    pub fn outputs(&self) -> Outputs<'_> {
        Outputs { upserts: &self.upserts, dead_letters: &self.dead_letters, routed: &self.routed, decisions: &self.decisions }
    }
}

/// Counts of one carrier or tenant in a [`Summary`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub records: u64,
    pub events: u64,
    pub new_milestones: u64,
    pub duplicates: u64,
    pub invalid: u64,
}

/// Counts for the replay summary, its JSON report (`replay --report`) and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub records: u64,
    pub events: u64,
    pub new_milestones: u64,
    pub duplicate_hash: u64,
    pub duplicate_key: u64,
    pub key_collisions: u64,
    /// Corrections of milestones already emitted (same milestone id, new text).
    pub revisions: u64,
    /// Milestones retracted by corrections (control-topic records).
    pub retractions: u64,
    pub invalid: u64,
    pub regressions_prevented: u64,
    pub out_of_order: u64,
    /// Dead letters by error kind.
    pub invalid_by_kind: std::collections::BTreeMap<String, u64>,
    /// Per carrier (records whose carrier could not be told: `unknown`).
    pub by_carrier: std::collections::BTreeMap<String, Counts>,
    /// Per tenant (records whose tenant could not be told: `unknown`).
    pub by_tenant: std::collections::BTreeMap<String, Counts>,
    /// New milestones per canonical status.
    pub milestones_by_status: std::collections::BTreeMap<String, u64>,
    /// The earliest and latest `occurred_at` of the events read.
    #[serde(with = "optional_time")]
    pub first_event_at: Option<DateTime<Utc>>,
    #[serde(with = "optional_time")]
    pub last_event_at: Option<DateTime<Utc>>,
}

mod optional_time {
    use chrono::{DateTime, Utc};
    pub fn serialize<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&crate::event::format_utc(t)),
            None => s.serialize_none(),
        }
    }
}

/// The entry of `name`, allocating its key only the first time (this runs for
/// every record and every new event).
fn counter<'a, V: Default>(map: &'a mut std::collections::BTreeMap<String, V>, name: &str) -> &'a mut V {
    if !map.contains_key(name) {
        map.insert(name.to_string(), V::default());
    }
    map.get_mut(name).expect("inserted above")
}

impl Counts {
    fn merge(&mut self, other: &Counts) {
        self.records += other.records;
        self.events += other.events;
        self.new_milestones += other.new_milestones;
        self.duplicates += other.duplicates;
        self.invalid += other.invalid;
    }
}

impl Summary {
    pub fn add_result(&mut self, result: &RecordResult) {
        use crate::dedupe::Verdict;
        let mut counts = Counts::default();
        if !result.from_repartition {
            self.records += 1;
            counts.records = 1;
        }
        self.retractions += u64::from(result.retractions);
        if let Some(dead) = &result.dead_letter {
            self.invalid += 1;
            counts.invalid = 1;
            *self.invalid_by_kind.entry(dead.error_kind.clone()).or_default() += 1;
        }
        for event in &result.events {
            self.events += 1;
            counts.events += 1;
            self.first_event_at = Some(self.first_event_at.map_or(event.occurred_at, |t| t.min(event.occurred_at)));
            self.last_event_at = Some(self.last_event_at.map_or(event.occurred_at, |t| t.max(event.occurred_at)));
            match event.verdict {
                Verdict::New => {
                    self.new_milestones += 1;
                    counts.new_milestones += 1;
                    *counter(&mut self.milestones_by_status, event.status.as_str()) += 1;
                    self.regressions_prevented += event.applied.regression_prevented as u64;
                    self.out_of_order += event.applied.out_of_order as u64;
                }
                Verdict::DuplicateHash => {
                    self.duplicate_hash += 1;
                    counts.duplicates += 1;
                }
                Verdict::DuplicateKey { collision } => {
                    self.duplicate_key += 1;
                    counts.duplicates += 1;
                    self.key_collisions += collision as u64;
                }
                Verdict::Revision { .. } => self.revisions += 1,
            }
        }
        counter(&mut self.by_carrier, result.carrier.as_deref().unwrap_or("unknown")).merge(&counts);
        counter(&mut self.by_tenant, result.tenant_id.as_deref().unwrap_or("unknown")).merge(&counts);
    }

    pub fn merge(&mut self, other: &Summary) {
        self.records += other.records;
        self.events += other.events;
        self.new_milestones += other.new_milestones;
        self.duplicate_hash += other.duplicate_hash;
        self.duplicate_key += other.duplicate_key;
        self.key_collisions += other.key_collisions;
        self.revisions += other.revisions;
        self.retractions += other.retractions;
        self.invalid += other.invalid;
        self.regressions_prevented += other.regressions_prevented;
        self.out_of_order += other.out_of_order;
        for (kind, n) in &other.invalid_by_kind {
            *self.invalid_by_kind.entry(kind.clone()).or_default() += n;
        }
        for (carrier, counts) in &other.by_carrier {
            self.by_carrier.entry(carrier.clone()).or_default().merge(counts);
        }
        for (tenant, counts) in &other.by_tenant {
            self.by_tenant.entry(tenant.clone()).or_default().merge(counts);
        }
        for (status, n) in &other.milestones_by_status {
            *self.milestones_by_status.entry(status.clone()).or_default() += n;
        }
        self.first_event_at = [self.first_event_at, other.first_event_at].into_iter().flatten().min();
        self.last_event_at = [self.last_event_at, other.last_event_at].into_iter().flatten().max();
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "records read:           {}", self.records)?;
        writeln!(f, "events normalized:      {}", self.events)?;
        writeln!(f, "milestones emitted:     {}", self.new_milestones)?;
        writeln!(f, "duplicates (hash):      {}", self.duplicate_hash)?;
        writeln!(f, "duplicates (key):       {}  ({} with different content)", self.duplicate_key, self.key_collisions)?;
        if self.revisions > 0 {
            writeln!(f, "revisions emitted:      {}  (corrected text of milestones already emitted)", self.revisions)?;
        }
        if self.retractions > 0 {
            writeln!(f, "milestones retracted:   {}  (by corrections)", self.retractions)?;
        }
        writeln!(f, "status regressions prevented: {}", self.regressions_prevented)?;
        write!(f, "invalid (dead letters): {}", self.invalid)?;
        for (kind, n) in &self.invalid_by_kind {
            write!(f, "\n  {kind}: {n}")?;
        }
        Ok(())
    }
}

/// Run `envelopes` through the pipeline against `store` at `now`. With
/// `track_progress`, each record of a partition that owns state also stages
/// "offset + 1" as its partition's progress.
pub fn process<S: StateStore + ?Sized>(
    pipeline: &Pipeline,
    store: &S,
    envelopes: &[Envelope],
    now: DateTime<Utc>,
    track_progress: bool,
    telemetry: Option<&Telemetry>,
) -> Result<BatchOutput, StoreError> {
    // Read and normalize on every thread the pipeline has, then dedupe and order
    // on this one, in input order.
    let prepared = pipeline.prepare_batch(envelopes, now);
    process_prepared(pipeline, store, envelopes, prepared, now, track_progress, telemetry)
}

/// The stateful half of [`process`]: `prepared` is what
/// [`Pipeline::prepare_batch`] made of `envelopes` at the same `now` (possibly on
/// another thread, while the previous batch was being applied).
pub fn process_prepared<S: StateStore + ?Sized>(
    pipeline: &Pipeline,
    store: &S,
    envelopes: &[Envelope],
    prepared: Vec<(Prepared, Duration)>,
    now: DateTime<Utc>,
    track_progress: bool,
    telemetry: Option<&Telemetry>,
) -> Result<BatchOutput, StoreError> {
    let mut staged = Staged::new(store);
    let mut output = BatchOutput::default();
    for (envelope, (prepared, preparing)) in envelopes.iter().zip(prepared) {
        let started = Instant::now();
        let result = pipeline.apply(envelope, prepared, now, &mut staged)?;
        account(pipeline, &mut output, &mut staged, envelope, result, preparing + started.elapsed(), track_progress, telemetry);
    }
    output.state = staged.take_batch();
    Ok(output)
}

/// [`process`] for one reorder window: the records' new events are applied and
/// emitted in status-hierarchy order (see `Pipeline::process_in_hierarchy_order`),
/// and the whole window commits as one unit, so no offset passes an event it held.
pub fn process_window<S: StateStore + ?Sized>(
    pipeline: &Pipeline,
    store: &S,
    envelopes: &[Envelope],
    now: DateTime<Utc>,
    track_progress: bool,
    telemetry: Option<&Telemetry>,
) -> Result<BatchOutput, StoreError> {
    let mut staged = Staged::new(store);
    let started = Instant::now();
    let (results, upserts) = pipeline.process_in_hierarchy_order(envelopes, now, &mut staged)?;
    let per_record = started.elapsed() / (envelopes.len().max(1) as u32);
    // The window's upserts in emission order; the per-record results carry none.
    let mut output = BatchOutput { upserts, ..BatchOutput::default() };
    for (envelope, result) in envelopes.iter().zip(results) {
        account(pipeline, &mut output, &mut staged, envelope, result, per_record, track_progress, telemetry);
    }
    output.state = staged.take_batch();
    Ok(output)
}

/// One processed record into the batch: telemetry, progress, summary, its
/// upserts and dead letter.
#[allow(clippy::too_many_arguments)]
fn account<S: StateStore + ?Sized>(
    pipeline: &Pipeline,
    output: &mut BatchOutput,
    staged: &mut Staged<'_, S>,
    envelope: &Envelope,
    result: RecordResult,
    elapsed: std::time::Duration,
    track_progress: bool,
    telemetry: Option<&Telemetry>,
) {
    if let Some(telemetry) = telemetry {
        telemetry.record(&result, elapsed);
    }
    if track_progress && pipeline.is_stateful(&envelope.topic) {
        stage_progress(staged, &envelope.topic, envelope.partition, envelope.offset + 1);
    }
    output.summary.add_result(&result);
    output.upserts.extend(result.upserts);
    output.dead_letters.extend(result.dead_letter);
    output.routed.extend(result.routed);
    output.decisions.extend(result.decisions);
}

pub use crate::failpoint::Failpoint;

/// How `deliver` stopped early.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The injected crash hook said the process died at this point.
    #[error("crashed at {0:?}")]
    Crashed(Failpoint),
}

/// The commit order of one batch, shared by the worker, replay and the simulation:
/// outputs first (the sink returns only when all are acknowledged), then the
/// batch's state and progress in one atomic write. State therefore never claims an
/// event whose output was not acknowledged; a crash before the write re-processes
/// the batch from the stored progress against unchanged state, producing the
/// identical records again. `crash` is the failpoint hook (production: never).
pub fn deliver<S: StateStore + ?Sized>(
    store: &S,
    sink: &mut dyn Sink,
    output: BatchOutput,
    crash: &mut dyn FnMut(Failpoint) -> bool,
) -> Result<Summary, DeliverError> {
    if crash(Failpoint::BeforeOutput) {
        return Err(DeliverError::Crashed(Failpoint::BeforeOutput));
    }
    sink.send(output.outputs())?;
    if crash(Failpoint::AfterOutput) {
        return Err(DeliverError::Crashed(Failpoint::AfterOutput));
    }
    let mut state = output.state;
    sink.send_state(&mut state)?;
    if crash(Failpoint::AfterChangelog) {
        return Err(DeliverError::Crashed(Failpoint::AfterChangelog));
    }
    store.write(state)?;
    if crash(Failpoint::AfterState) {
        return Err(DeliverError::Crashed(Failpoint::AfterState));
    }
    Ok(output.summary)
}

/// The production failpoint hook: never crash.
pub fn no_crash(_: Failpoint) -> bool {
    false
}
