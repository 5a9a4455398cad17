//! Duplicate detection.
//!
//! An event is a duplicate, for its tenant and carrier, when within the carrier's TTL
//! - its **content hash** was seen: blake3 over a versioned, length-prefixed encoding
//!   of the normalized event without volatile fields (delivery and event ids,
//!   received_at, source offsets). Reported as `duplicate_hash`: an exact replay.
//! - or its **composite key** was seen: (tracking number, shipment ref, canonical
//!   status, raw code, location) with `occurred_at` within the carrier's clock-skew
//!   tolerance. Reported as `duplicate_key`; if the stored content hash differs this
//!   is also a key collision (same event told differently, e.g. a skewed clock or a
//!   reworded description).
//!
//! The location is part of the composite key because two scans of one status at
//! different places are two milestones, even in the same second.
//!
//! Tolerance is exact, not bucketed: keys sort by `occurred_at` after a fixed-size
//! identity digest, so the store answers "any key of this identity within
//! [t - skew, t + skew]" with one range scan; there are no bucket boundaries to miss.
//!
//! TTL: an entry lives for its carrier's TTL from when Waymark first saw the event
//! (the injected clock), not from the event's own time, so a provider replaying
//! month-old history is still caught. An entry is live while `now < expires_at`;
//! expired entries never decide an outcome, whether or not compaction has dropped
//! them yet.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::StoreError;
use crate::event::{SourceRef, TrackingEvent};
use crate::state::{Keyspace, Scope, StateStore, Staged};

/// Version tag of the content encoding; bump it (and the golden test) on any change.
pub const CONTENT_ENCODING: &[u8] = b"waymark.content.v1";

/// Dedupe window and tolerance for one carrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupePolicy {
    /// How long a seen event is remembered, from first sight.
    pub ttl: Duration,
    /// Two copies whose `occurred_at` differ by at most this are one event.
    pub skew: Duration,
}

impl DedupePolicy {
    /// The TTL in milliseconds (saturating), as the store's expiry arithmetic uses it.
    pub fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// The skew tolerance in milliseconds (saturating).
    pub fn skew_ms(&self) -> i64 {
        i64::try_from(self.skew.as_millis()).unwrap_or(i64::MAX)
    }
}

impl Default for DedupePolicy {
    fn default() -> Self {
        DedupePolicy { ttl: Duration::from_secs(30 * 24 * 3600), skew: Duration::from_secs(2) }
    }
}

/// Policies by carrier, with a default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DedupeConfig {
    pub default: DedupePolicy,
    pub per_carrier: BTreeMap<String, DedupePolicy>,
}

impl DedupeConfig {
    pub fn policy(&self, carrier: &str) -> DedupePolicy {
        self.per_carrier.get(carrier).copied().unwrap_or(self.default)
    }

    /// The longest TTL of any carrier: how far back an event can be deduped.
    pub fn longest_ttl(&self) -> Duration {
        self.per_carrier.values().map(|p| p.ttl).chain([self.default.ttl]).max().unwrap_or(self.default.ttl)
    }
}

/// What dedupe decided for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    New,
    DuplicateHash,
    /// `collision`: the stored key carries a different content hash (here,
    /// only the time differs, within the skew tolerance).
    DuplicateKey { collision: bool },
    /// The same composite key, and different descriptive content (description,
    /// status detail, the place's spelling) at the same time: the provider
    /// corrected the scan. Emitted again under the same milestone id, with
    /// `revision` (1 for the first correction); `original_ms` is the time of
    /// the scan as first seen (the milestone's time).
    Revision { revision: u32, original_ms: i64 },
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::New => "new",
            Verdict::DuplicateHash => "duplicate_hash",
            Verdict::DuplicateKey { .. } => "duplicate_key",
            Verdict::Revision { .. } => "revision",
        }
    }

    /// A verdict that emits nothing: the event was seen.
    pub fn is_duplicate(self) -> bool {
        matches!(self, Verdict::DuplicateHash | Verdict::DuplicateKey { .. })
    }
}

/// blake3 of the canonical content encoding.
pub fn content_hash(event: &TrackingEvent) -> [u8; 32] {
    let mut enc = Encoder::new(CONTENT_ENCODING);
    scan_identity_fields(&mut enc, event);
    enc.opt(event.carrier_status_detail.as_deref());
    enc.opt(event.description.as_deref());
    enc.i64(event.occurred_at.timestamp_millis());
    enc.bool(event.time_assumed_utc);
    location_fields(&mut enc, event);
    *enc.finish().as_bytes()
}

/// Digest of the composite key without its time (fixed size, so keys sort by time
/// within one identity).
pub fn identity_digest(event: &TrackingEvent) -> [u8; 16] {
    let mut enc = Encoder::new(b"waymark.key.v1");
    scan_identity_fields(&mut enc, event);
    location_fields(&mut enc, event);
    let mut out = [0u8; 16];
    out.copy_from_slice(&enc.finish().as_bytes()[..16]);
    out
}

/// Who and what a scan is about: the leading fields of both the content hash and
/// the composite key (their order is part of the pinned encodings).
fn scan_identity_fields(enc: &mut Encoder, event: &TrackingEvent) {
    enc.str(&event.tenant_id);
    enc.str(&event.carrier);
    enc.str(&event.tracking_number);
    enc.opt(event.shipment_ref.as_deref());
    enc.str(event.status.as_str());
    enc.str(&event.carrier_status_code);
}

/// Locations compare case- and space-insensitively: carriers re-render them.
/// The digest whose hex is a milestone's id ([`crate::output::milestone_id_in`]):
/// tenant, carrier, tracking number, status, code, occurred_at, the location
/// and, after the first, the generation.
pub fn milestone_digest(event: &TrackingEvent, generation: u32) -> blake3::Hash {
    let mut enc = Encoder::new(b"waymark.milestone.v1");
    enc.str(&event.tenant_id);
    enc.str(&event.carrier);
    enc.str(&event.tracking_number);
    enc.str(event.status.as_str());
    enc.str(&event.carrier_status_code);
    enc.i64(event.occurred_at.timestamp_millis());
    location_fields(&mut enc, event);
    if generation > 0 {
        enc.i64(i64::from(generation));
    }
    enc.finish()
}

pub(crate) fn location_fields(enc: &mut Encoder, event: &TrackingEvent) {
    for part in [&event.location.city, &event.location.region, &event.location.postal_code, &event.location.country] {
        enc.opt_uppercase(part.as_deref().map(str::trim));
    }
}

/// Bytes gathered before they are fed to blake3: one event's encoding fits, so
/// it is hashed in one call instead of two dozen small ones (each small update
/// copies into blake3's chunk buffer and pays its bookkeeping: that was about a
/// tenth of a replay's CPU).
const ENCODER_BUFFER: usize = 512;

/// Length-prefixed field encoder feeding blake3: canonical by construction.
/// Fields are gathered in a buffer on the stack and fed to blake3 when it is
/// full and at the end; the digest depends only on the bytes, never on how
/// they were split.
pub struct Encoder {
    hasher: blake3::Hasher,
    buffer: [u8; ENCODER_BUFFER],
    len: usize,
}

impl Encoder {
    pub fn new(domain: &[u8]) -> Self {
        let mut enc = Encoder { hasher: blake3::Hasher::new(), buffer: [0; ENCODER_BUFFER], len: 0 };
        enc.write(&(domain.len() as u64).to_le_bytes());
        enc.write(domain);
        enc
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > ENCODER_BUFFER {
            self.hasher.update(&self.buffer[..self.len]);
            self.len = 0;
            if bytes.len() > ENCODER_BUFFER {
                self.hasher.update(bytes);
                return;
            }
        }
        self.buffer[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    pub fn str(&mut self, s: &str) {
        self.write(&(s.len() as u64).to_le_bytes());
        self.write(s.as_bytes());
    }
    pub fn opt(&mut self, s: Option<&str>) {
        match s {
            None => self.write(&[0]),
            Some(s) => {
                self.write(&[1]);
                self.str(s);
            }
        }
    }
    /// [`Encoder::opt`] of `s.to_uppercase()`, without allocating for ASCII
    /// (where both uppercasings agree and the length does not change).
    pub fn opt_uppercase(&mut self, s: Option<&str>) {
        match s {
            Some(s) if s.is_ascii() && s.len() <= ENCODER_BUFFER => {
                self.write(&[1]);
                self.write(&(s.len() as u64).to_le_bytes());
                if self.len + s.len() > ENCODER_BUFFER {
                    self.hasher.update(&self.buffer[..self.len]);
                    self.len = 0;
                }
                for (to, from) in self.buffer[self.len..self.len + s.len()].iter_mut().zip(s.bytes()) {
                    *to = from.to_ascii_uppercase();
                }
                self.len += s.len();
            }
            other => self.opt(other.map(str::to_uppercase).as_deref()),
        }
    }
    pub fn i64(&mut self, v: i64) {
        self.write(&v.to_le_bytes());
    }
    pub fn bool(&mut self, v: bool) {
        self.write(&[v as u8]);
    }
    pub fn finish(mut self) -> blake3::Hash {
        self.hasher.update(&self.buffer[..self.len]);
        self.hasher.finalize()
    }
}

/// Sortable big-endian encoding of a signed millisecond timestamp.
fn sortable_ms(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn ms_of_sortable(bytes: [u8; 8]) -> i64 {
    (u64::from_be_bytes(bytes) ^ (1 << 63)) as i64
}

fn key_prefix(scope: Scope, identity: &[u8; 16]) -> Vec<u8> {
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(&scope.0);
    key.extend_from_slice(identity);
    key
}

fn composite_key(scope: Scope, identity: &[u8; 16], occurred_ms: i64) -> Vec<u8> {
    let mut key = key_prefix(scope, identity);
    key.extend_from_slice(&sortable_ms(occurred_ms));
    key
}

fn hash_key(scope: Scope, hash: &[u8; 32]) -> Vec<u8> {
    let mut key = Vec::with_capacity(40);
    key.extend_from_slice(&scope.0);
    key.extend_from_slice(hash);
    key
}

/// Value layouts: Keys = expires_at_ms (8, BE) | content hash (32) | sighting;
/// Hashes = expires_at_ms (8, BE) | sighting. Readers take the leading fields
/// only, so values without a sighting (written before sightings existed) and
/// with one read alike.
pub fn expires_at_ms(keyspace: Keyspace, value: &[u8]) -> Result<i64, StoreError> {
    keyspace.expiry(value).ok_or_else(|| StoreError::Corrupt {
        keyspace: keyspace.name(),
        reason: format!("value of {} bytes is shorter than its 8-byte expiry", value.len()),
    })
}

/// The live entry an event matches, if any: what decides its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    None,
    /// The content hash was seen: the hash entry's value.
    Hash { value: Vec<u8> },
    /// The composite key was seen within the skew: the key entry's key and value.
    Key { key: Vec<u8>, value: Vec<u8>, collision: bool },
}

/// Look `event` up, reading only: the same lookups, in the same order, that
/// decide [`check_and_stage`]'s verdict (and `waymark explain`'s answer; a
/// reader wraps its store in a [`Staged`] with nothing staged).
pub fn find<S: StateStore + ?Sized>(state: &Staged<'_, S>, scope: Scope, policy: DedupePolicy, event: &TrackingEvent, now: DateTime<Utc>) -> Result<Match, StoreError> {
    let hash = content_hash(event);
    if let Some(value) = state.get(Keyspace::Hashes, &hash_key(scope, &hash))? {
        if now.timestamp_millis() < expires_at_ms(Keyspace::Hashes, &value)? {
            return Ok(Match::Hash { value });
        }
    }
    find_key(state, scope, policy, event, now, &hash)
}

/// The live composite-key entry within the skew of `event`, if any (`hash`:
/// its content hash, to tell a collision).
pub fn find_key<S: StateStore + ?Sized>(
    state: &Staged<'_, S>,
    scope: Scope,
    policy: DedupePolicy,
    event: &TrackingEvent,
    now: DateTime<Utc>,
    hash: &[u8; 32],
) -> Result<Match, StoreError> {
    let now_ms = now.timestamp_millis();
    let identity = identity_digest(event);
    let occurred_ms = event.occurred_at.timestamp_millis();
    let skew_ms = policy.skew_ms();
    let from = composite_key(scope, &identity, occurred_ms.saturating_sub(skew_ms));
    // Exclusive upper bound one millisecond past the tolerance.
    let to = composite_key(scope, &identity, occurred_ms.saturating_add(skew_ms).saturating_add(1));
    for (key, value) in state.scan(Keyspace::Keys, &from, &to)? {
        if now_ms < expires_at_ms(Keyspace::Keys, &value)? {
            let collision = value.get(8..40) != Some(&hash[..]);
            return Ok(Match::Key { key, value, collision });
        }
    }
    Ok(Match::None)
}

/// Decide whether `event` is new, and if so stage its key and hash, each with
/// where and when it was first seen ([`Sighting`]).
pub fn check_and_stage<S: StateStore + ?Sized>(
    state: &mut Staged<'_, S>,
    scope: Scope,
    policy: DedupePolicy,
    event: &TrackingEvent,
    now: DateTime<Utc>,
) -> Result<Verdict, StoreError> {
    match find(state, scope, policy, event, now)? {
        Match::Hash { .. } => Ok(Verdict::DuplicateHash),
        Match::Key { key, value, collision } => {
            let verdict = key_verdict(state, scope, event, &key, &value, collision, now)?;
            if let Verdict::Revision { revision, .. } = verdict {
                stage_revision(state, scope, key, &value, event, revision, now);
            }
            Ok(verdict)
        }
        Match::None => {
            stage_new(state, scope, policy, event, now, &Outcome::default(), &milestone_digest(event, 0));
            Ok(Verdict::New)
        }
    }
}

/// The verdict on `event`, staging nothing.
pub fn check<S: StateStore + ?Sized>(state: &Staged<'_, S>, scope: Scope, policy: DedupePolicy, event: &TrackingEvent, now: DateTime<Utc>) -> Result<Verdict, StoreError> {
    Ok(match find(state, scope, policy, event, now)? {
        Match::Hash { .. } => Verdict::DuplicateHash,
        Match::Key { key, value, collision } => key_verdict(state, scope, event, &key, &value, collision, now)?,
        Match::None => Verdict::New,
    })
}

/// A composite-key match: a duplicate, unless the content differs by more than
/// the time from every version of the scan seen so far (a correction of its
/// text or place: a revision). A late copy of an earlier version (a provider
/// replaying old history after a correction) is a duplicate: it must not undo
/// the correction.
pub fn key_verdict<S: StateStore + ?Sized>(
    state: &Staged<'_, S>,
    scope: Scope,
    event: &TrackingEvent,
    key: &[u8],
    value: &[u8],
    collision: bool,
    now: DateTime<Utc>,
) -> Result<Verdict, StoreError> {
    let Some(original_ms) = key.get(key.len().saturating_sub(8)..).and_then(|b| b.try_into().ok()).map(ms_of_sortable) else {
        return Ok(Verdict::DuplicateKey { collision });
    };
    let at_original = content_hash_at(event, original_ms);
    if !collision || value.get(8..40) == Some(&at_original[..]) {
        // The same scan, or the same scan with its clock skewed.
        return Ok(Verdict::DuplicateKey { collision });
    }
    // An earlier version of the scan (each version's hash, at its own time, is
    // kept; the first one's time is the scan's).
    if let Some(seen) = state.get(Keyspace::Hashes, &hash_key(scope, &at_original))? {
        if now.timestamp_millis() < expires_at_ms(Keyspace::Hashes, &seen)? {
            return Ok(Verdict::DuplicateKey { collision });
        }
    }
    Ok(Verdict::Revision { revision: revision_of(value).saturating_add(1), original_ms })
}

/// The content hash `event` has at the time `occurred_ms` (its scan as first seen).
fn content_hash_at(event: &TrackingEvent, occurred_ms: i64) -> [u8; 32] {
    if event.occurred_at.timestamp_millis() == occurred_ms {
        return content_hash(event);
    }
    let mut at = event.clone();
    at.occurred_at = DateTime::from_timestamp_millis(occurred_ms).unwrap_or(event.occurred_at);
    content_hash(&at)
}

/// The revision a composite-key entry holds (0: as first seen; entries of
/// Waymarks before revisions have none).
fn revision_of(value: &[u8]) -> u32 {
    key_tail(value).and_then(|tail| tail.get(..4)).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes).unwrap_or(0)
}

/// The offset of a composite-key value's outcome flags (the byte after its
/// sighting and key facts), if the value has a sighting this version reads.
fn flags_at(value: &[u8]) -> Option<usize> {
    let mut rest = value.get(40..)?;
    if take::<1>(&mut rest)? != [SIGHTING_V1] {
        return None;
    }
    take::<20>(&mut rest)?;
    take_short(&mut rest)?;
    take::<8>(&mut rest)?;
    if take::<1>(&mut rest)? != [0] {
        take_short(&mut rest)?;
    }
    take_short(&mut rest)?;
    take_short(&mut rest)?;
    (!rest.is_empty()).then(|| value.len() - rest.len())
}

/// The bytes of a composite-key value after its outcome: revision (4) |
/// generation (4) | milestone id (32), each absent in entries written before
/// it existed.
fn key_tail(value: &[u8]) -> Option<&[u8]> {
    let mut rest = value.get(flags_at(value)? + 1..)?;
    take_short(&mut rest)?;
    Some(rest)
}

/// Outcome flag: the event was new but did not move the status.
const FLAG_REGRESSION_PREVENTED: u8 = 1;
/// Outcome flag: the event was older than the shipment's latest.
const FLAG_OUT_OF_ORDER: u8 = 2;
/// Outcome flag: the milestone was retracted by a correction.
const FLAG_RETRACTED: u8 = 4;

/// A composite-key value marked retracted (`None`: a value without the
/// outcome this version reads). The entry keeps deciding: the scan sent
/// again is still a duplicate, and stays retracted.
pub fn retracted(value: &[u8]) -> Option<Vec<u8>> {
    let at = flags_at(value)?;
    let mut out = value.to_vec();
    out[at] |= FLAG_RETRACTED;
    Some(out)
}

/// Stage a revision of the composite-key entry `key` (its `value` as stored):
/// the entry keeps its first sighting and expiry, and now holds the revised
/// content (so the same correction sent again is a duplicate) and its revision
/// number; the revised content's own hash is staged too, seen in this record.
pub fn stage_revision<S: StateStore + ?Sized>(state: &mut Staged<'_, S>, scope: Scope, key: Vec<u8>, value: &[u8], event: &TrackingEvent, revision: u32, now: DateTime<Utc>) {
    let Some(original_ms) = key.get(key.len().saturating_sub(8)..).and_then(|b| b.try_into().ok()).map(ms_of_sortable) else { return };
    let mut revised = value.to_vec();
    if revised.len() >= 40 {
        revised[8..40].copy_from_slice(&content_hash_at(event, original_ms));
    }
    let tail_at = key_tail(&revised).map(|tail| revised.len() - tail.len());
    if let Some(at) = tail_at {
        // revision (4) | generation (4) | milestone id (32): only the
        // revision changes (entries written before a field existed get 0s).
        let mut tail = revised.split_off(at);
        if tail.len() < 8 {
            tail.resize(8, 0);
        }
        tail[..4].copy_from_slice(&revision.to_be_bytes());
        revised.extend_from_slice(&tail);
    }
    let expires = value.get(..8).map(<[u8]>::to_vec).unwrap_or_default();
    let mut hash_value = expires;
    encode_sighting(&mut hash_value, now.timestamp_millis(), event);
    // The version at its own time (an exact re-send is a duplicate by content)
    // and at the scan's time (a skewed copy of it is one by key).
    let at_original = content_hash_at(event, original_ms);
    if at_original != content_hash(event) {
        state.put(Keyspace::Hashes, hash_key(scope, &at_original), hash_value.clone());
    }
    state.put(Keyspace::Hashes, hash_key(scope, &content_hash(event)), hash_value);
    state.put(Keyspace::Keys, key, revised);
}

/// What the ordering made of a new event, kept in its composite-key entry so
/// `waymark explain` can tell a prevented regression afterwards (the shipment's
/// state only holds where it stands now).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    pub regression_prevented: bool,
    pub out_of_order: bool,
    /// The shipment's status after the event (the upsert's `shipment_status`).
    pub shipment_status: String,
    /// The generation of its tracking number (part of its milestone's id after the first).
    pub generation: u32,
}

/// Stage a new event's composite key and content hash, with its sighting,
/// `outcome` and `milestone` ([`milestone_digest`] of the event in the
/// outcome's generation).
pub fn stage_new<S: StateStore + ?Sized>(
    state: &mut Staged<'_, S>,
    scope: Scope,
    policy: DedupePolicy,
    event: &TrackingEvent,
    now: DateTime<Utc>,
    outcome: &Outcome,
    milestone: &blake3::Hash,
) {
    let now_ms = now.timestamp_millis();
    let hash = content_hash(event);
    let expires = now_ms.saturating_add(policy.ttl_ms()).to_be_bytes();
    let mut seen = Vec::with_capacity(64);
    encode_sighting(&mut seen, now_ms, event);
    let mut key_value = Vec::with_capacity(40 + seen.len() + 48);
    key_value.extend_from_slice(&expires);
    key_value.extend_from_slice(&hash);
    key_value.extend_from_slice(&seen);
    encode_key_facts(&mut key_value, event);
    let mut hash_value = Vec::with_capacity(8 + seen.len());
    hash_value.extend_from_slice(&expires);
    hash_value.extend_from_slice(&seen);
    let occurred_ms = event.occurred_at.timestamp_millis();
    let mut flags = 0;
    if outcome.regression_prevented {
        flags |= FLAG_REGRESSION_PREVENTED;
    }
    if outcome.out_of_order {
        flags |= FLAG_OUT_OF_ORDER;
    }
    key_value.push(flags);
    put_short(&mut key_value, &outcome.shipment_status);
    key_value.extend_from_slice(&0u32.to_be_bytes());
    key_value.extend_from_slice(&outcome.generation.to_be_bytes());
    // The milestone's id: what a correction names it by.
    key_value.extend_from_slice(milestone.as_bytes());
    state.put(Keyspace::Keys, composite_key(scope, &identity_digest(event), occurred_ms), key_value);
    state.put(Keyspace::Hashes, hash_key(scope, &hash), hash_value);
}

/// Tag of the sighting encoding that follows a dedupe value's leading fields.
const SIGHTING_V1: u8 = 1;

/// Where and when an entry's event was first seen, and, for a composite-key
/// entry, what it is about: what `waymark explain` reports a duplicate matched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Sighting {
    /// The clock's time when the event was first seen (new).
    #[serde(with = "crate::event::rfc3339_millis")]
    pub first_seen: DateTime<Utc>,
    /// When the entry stops deciding anything (first seen plus the TTL).
    #[serde(with = "crate::event::rfc3339_millis")]
    pub expires_at: DateTime<Utc>,
    /// The raw record (topic, partition, offset; an archive's recorded ones) the
    /// event came from.
    pub source: SourceRef,
    /// Composite-key entries only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub milestone: Option<KeyFacts>,
}

/// What a composite-key entry is about.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyFacts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shipment_ref: Option<String>,
    pub status: String,
    pub carrier_status_code: String,
    #[serde(with = "crate::event::rfc3339_millis")]
    pub occurred_at: DateTime<Utc>,
    #[serde(skip)]
    pub shipment: [u8; 8],
    /// What the ordering made of it when it was new.
    pub outcome: Outcome,
    /// Corrections of the scan so far (0: as first seen).
    pub revision: u32,
    /// Its milestone's id (`None`: written before Waymark kept it).
    #[serde(serialize_with = "hex_id", skip_serializing_if = "Option::is_none")]
    pub milestone_id: Option<[u8; 32]>,
    /// Retracted by a correction.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub retracted: bool,
}

/// A milestone id as the upserts spell it (64 lower-case hex digits).
fn hex_id<S: serde::Serializer>(id: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.serialize_str(&blake3::Hash::from_bytes(*id).to_hex()),
        None => s.serialize_none(),
    }
}

/// Eight bytes naming a shipment (tenant, carrier, tracking number) in a
/// composite-key entry, so one home partition's entries can be filtered by
/// shipment without the shipment ref.
pub fn shipment_filter(tenant: &str, carrier: &str, tracking: &str) -> [u8; 8] {
    let mut enc = Encoder::new(b"waymark.sighting.shipment.v1");
    enc.str(tenant);
    enc.str(carrier);
    enc.str(tracking);
    let mut out = [0u8; 8];
    out.copy_from_slice(&enc.finish().as_bytes()[..8]);
    out
}

/// A string of at most 255 bytes (cut at a character), length first.
fn put_short(out: &mut Vec<u8>, text: &str) {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.push(end as u8);
    out.extend_from_slice(&text.as_bytes()[..end]);
}

fn take_short<'a>(bytes: &mut &'a [u8]) -> Option<&'a str> {
    let (&len, rest) = bytes.split_first()?;
    let (text, rest) = rest.split_at_checked(usize::from(len))?;
    *bytes = rest;
    std::str::from_utf8(text).ok()
}

fn take<const N: usize>(bytes: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = bytes.split_at_checked(N)?;
    *bytes = rest;
    head.try_into().ok()
}

/// tag (1) | first seen ms (8, BE) | partition (4, BE) | offset (8, BE) | topic (short string).
fn encode_sighting(out: &mut Vec<u8>, now_ms: i64, event: &TrackingEvent) {
    out.push(SIGHTING_V1);
    out.extend_from_slice(&now_ms.to_be_bytes());
    out.extend_from_slice(&event.source.partition.to_be_bytes());
    out.extend_from_slice(&event.source.offset.to_be_bytes());
    put_short(out, &event.source.topic);
}

/// shipment filter (8) | shipment ref (0: none, else 1 and a short string) |
/// status | code; [`stage_new`] then adds the outcome: flags (1) | shipment
/// status, the revision (4, BE; 0 as first seen), the generation (4, BE) and
/// the milestone id (32).
fn encode_key_facts(out: &mut Vec<u8>, event: &TrackingEvent) {
    out.extend_from_slice(&shipment_filter(&event.tenant_id, &event.carrier, &event.tracking_number));
    match &event.shipment_ref {
        Some(reference) => {
            out.push(1);
            put_short(out, reference);
        }
        None => out.push(0),
    }
    put_short(out, event.status.as_str());
    put_short(out, &event.carrier_status_code);
}

/// The sighting of a dedupe entry (`key` and `value` as stored), or `None` for
/// an entry written before sightings existed (or one this version cannot read).
pub fn sighting(keyspace: Keyspace, key: &[u8], value: &[u8]) -> Option<Sighting> {
    let expires_at = DateTime::from_timestamp_millis(keyspace.expiry(value)?)?;
    let mut rest = match keyspace {
        Keyspace::Keys => value.get(40..)?,
        Keyspace::Hashes => value.get(8..)?,
        Keyspace::Shipments | Keyspace::Offsets => return None,
    };
    if take::<1>(&mut rest)? != [SIGHTING_V1] {
        return None;
    }
    let first_seen = DateTime::from_timestamp_millis(i64::from_be_bytes(take(&mut rest)?))?;
    let partition = i32::from_be_bytes(take(&mut rest)?);
    let offset = i64::from_be_bytes(take(&mut rest)?);
    let topic = take_short(&mut rest)?.to_string();
    let milestone = match keyspace {
        Keyspace::Keys => {
            let shipment = take::<8>(&mut rest)?;
            let shipment_ref = match take::<1>(&mut rest)? {
                [0] => None,
                _ => Some(take_short(&mut rest)?.to_string()),
            };
            let status = take_short(&mut rest)?.to_string();
            let carrier_status_code = take_short(&mut rest)?.to_string();
            let [flags] = take::<1>(&mut rest)?;
            let shipment_status = take_short(&mut rest)?.to_string();
            let occurred_ms = key.get(key.len().checked_sub(8)?..).and_then(|b| b.try_into().ok()).map(ms_of_sortable)?;
            let revision = take::<4>(&mut rest).map(u32::from_be_bytes).unwrap_or(0);
            let generation = take::<4>(&mut rest).map(u32::from_be_bytes).unwrap_or(0);
            let milestone_id = take::<32>(&mut rest);
            let outcome = Outcome {
                regression_prevented: flags & FLAG_REGRESSION_PREVENTED != 0,
                out_of_order: flags & FLAG_OUT_OF_ORDER != 0,
                shipment_status,
                generation,
            };
            let occurred_at = DateTime::from_timestamp_millis(occurred_ms)?;
            let retracted = flags & FLAG_RETRACTED != 0;
            Some(KeyFacts { shipment_ref, status, carrier_status_code, occurred_at, shipment, outcome, revision, milestone_id, retracted })
        }
        _ => None,
    };
    Some(Sighting { first_seen, expires_at, source: SourceRef { topic, partition, offset }, milestone })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::{Location, SourceRef, Status};
    use crate::state::MemoryStore;
    use chrono::TimeZone;

    pub(crate) fn event(tracking: &str, status: Status, occurred_ms: i64) -> TrackingEvent {
        TrackingEvent {
            tenant_id: "acme".into(),
            carrier: "easypost".into(),
            tracking_number: tracking.into(),
            shipment_ref: None,
            status,
            carrier_status_code: "AR".into(),
            carrier_status_detail: Some("in_transit/arrived_at_facility".into()),
            description: Some("Arrived".into()),
            occurred_at: Utc.timestamp_millis_opt(occurred_ms).unwrap(),
            time_assumed_utc: false,
            location: Location { city: Some("Orlando".into()), region: Some("FL".into()), postal_code: None, country: Some("US".into()) },
            source_event_id: Some("evt_1".into()),
            received_at: Utc.timestamp_millis_opt(occurred_ms + 1000).unwrap(),
            source: SourceRef { topic: "t".into(), partition: 0, offset: 1 },
        }
    }

    const T0: i64 = 1_722_438_000_000;

    fn at(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(ms).unwrap()
    }

    fn check(store: &MemoryStore, policy: DedupePolicy, e: &TrackingEvent, now_ms: i64) -> Verdict {
        let mut staged = Staged::new(store);
        let verdict = check_and_stage(&mut staged, Scope::of("t", 0), policy, e, at(now_ms)).unwrap();
        store.write(staged.take_batch()).unwrap();
        verdict
    }

    /// A new event's entries record where and when it was first seen; a later
    /// duplicate finds them, and the entry it matched says so.
    #[test]
    fn entries_record_their_first_sighting_and_duplicates_find_it() {
        let store = MemoryStore::default();
        let scope = Scope([3; 8]);
        let policy = DedupePolicy::default();
        let mut first = event("1Z", Status::InTransit, T0);
        first.source = SourceRef { topic: "tracking.raw.easypost".into(), partition: 2, offset: 41 };
        first.shipment_ref = Some("shp_1".into());
        let mut staged = Staged::new(&store);
        assert_eq!(check_and_stage(&mut staged, scope, policy, &first, at(T0 + 5_000)).unwrap(), Verdict::New);
        store.write(staged.take_batch()).unwrap();

        // The same content again, from another record: a hash match, first seen at 41.
        let mut again = first.clone();
        again.source.offset = 99;
        let reader = Staged::new(&store);
        let Match::Hash { value } = find(&reader, scope, policy, &again, at(T0 + 60_000)).unwrap() else { panic!("expected a hash match") };
        let seen = sighting(Keyspace::Hashes, &[], &value).expect("a sighting");
        assert_eq!(seen.source, first.source);
        assert_eq!(seen.first_seen, at(T0 + 5_000));
        assert_eq!(seen.expires_at, at(T0 + 5_000 + policy.ttl_ms()));
        assert!(seen.milestone.is_none());

        // One second of skew and another description: a key match with a collision.
        let mut skewed = again.clone();
        skewed.occurred_at = at(T0 + 1_000);
        skewed.description = Some("Arrived at facility".into());
        let Match::Key { key, value, collision } = find(&reader, scope, policy, &skewed, at(T0 + 60_000)).unwrap() else { panic!("expected a key match") };
        assert!(collision);
        let seen = sighting(Keyspace::Keys, &key, &value).expect("a sighting");
        assert_eq!(seen.source, first.source);
        let facts = seen.milestone.expect("what the key is about");
        assert_eq!(facts.occurred_at, at(T0), "the matched entry's own time, not the duplicate's");
        assert_eq!((facts.status.as_str(), facts.carrier_status_code.as_str()), ("in_transit", "AR"));
        assert_eq!(facts.shipment_ref.as_deref(), Some("shp_1"));
        assert_eq!(facts.shipment, shipment_filter("acme", "easypost", "1Z"));
    }

    /// Values written before sightings existed still decide (they have no
    /// sighting to report), and a long topic name is cut, not refused.
    #[test]
    fn values_without_a_sighting_still_decide() {
        let store = MemoryStore::default();
        let scope = Scope([3; 8]);
        let policy = DedupePolicy::default();
        let e = event("1Z", Status::InTransit, T0);
        let expires = (T0 + policy.ttl_ms()).to_be_bytes().to_vec();
        let mut batch = crate::state::StateBatch::default();
        batch.put(Keyspace::Hashes, hash_key(scope, &content_hash(&e)), expires.clone());
        store.write(batch).unwrap();
        let reader = Staged::new(&store);
        let Match::Hash { value } = find(&reader, scope, policy, &e, at(T0)).unwrap() else { panic!("an old value still matches") };
        assert_eq!(sighting(Keyspace::Hashes, &[], &value), None);

        let mut long = event("2Z", Status::Delivered, T0);
        long.source.topic = "t".repeat(300);
        let mut staged = Staged::new(&store);
        assert_eq!(check_and_stage(&mut staged, scope, policy, &long, at(T0)).unwrap(), Verdict::New);
        store.write(staged.take_batch()).unwrap();
        let reader = Staged::new(&store);
        let Match::Hash { value } = find(&reader, scope, policy, &long, at(T0)).unwrap() else { panic!() };
        assert_eq!(sighting(Keyspace::Hashes, &[], &value).unwrap().source.topic.len(), 255);
    }

    #[test]
    fn golden_content_hash_is_pinned() {
        // Changing the encoding silently would make every stored hash miss after an
        // upgrade: bump CONTENT_ENCODING and this value together, on purpose.
        let hex = blake3::Hash::from(content_hash(&event("1Z", Status::InTransit, T0))).to_hex().to_string();
        assert_eq!(hex, "3b52d71f525ebf0cce3c9a4162a23fb4d6f52d504885bbf7cbd96f657abf2389");
    }

    /// Every digest kept in state or sent downstream, pinned with a location
    /// that is not plain ASCII and a long description (more than one blake3
    /// chunk): a faster encoder must produce the very same bytes.
    #[test]
    fn golden_digests_are_pinned() {
        let mut e = event("1Z", Status::InTransit, T0);
        e.location = Location { city: Some(" straße ".into()), region: Some("fl".into()), postal_code: Some("32801".into()), country: None };
        e.description = Some("Arrived at the sort facility; ".repeat(60));
        e.shipment_ref = Some("ref-9".into());
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(&content_hash(&e)), "fb04e0885cbaede070e41186d308b6838dbff7b8c9a6937119e7d606e7a477a3");
        assert_eq!(hex(&identity_digest(&e)), "4046856e2eb95ac93a59a2b067baee26");
        assert_eq!(crate::output::milestone_id(&e), "5ea874654b4db93f39ce5ecc01ac5501592d913b7d73d0448f068af00684cafc");
        let scope = Scope([7; 8]);
        assert_eq!(hex(&crate::order::shipment_key(scope, "acme", "easypost", "1Z", Some("ref-9"))), "0707070707070707349f9c099c23d2a7fb81feee97061cc9");
    }

    #[test]
    fn volatile_fields_do_not_change_the_hash() {
        let a = event("1Z", Status::InTransit, T0);
        let mut b = a.clone();
        b.source_event_id = Some("evt_other".into());
        b.received_at = at(T0 + 99_999);
        b.source = SourceRef { topic: "x".into(), partition: 3, offset: 99 };
        assert_eq!(content_hash(&a), content_hash(&b));
        b.description = Some("Arrived at facility".into());
        assert_ne!(content_hash(&a), content_hash(&b));
    }

    #[test]
    fn skew_tolerance_is_exact_at_both_edges() {
        let policy = DedupePolicy { skew: Duration::from_millis(2000), ..DedupePolicy::default() };
        let store = MemoryStore::default();
        assert_eq!(check(&store, policy, &event("1Z", Status::InTransit, T0), T0), Verdict::New);
        let within_early = event("1Z", Status::InTransit, T0 - 2000);
        assert_eq!(check(&store, policy, &within_early, T0), Verdict::DuplicateKey { collision: true });
        let within_late = event("1Z", Status::InTransit, T0 + 2000);
        assert_eq!(check(&store, policy, &within_late, T0), Verdict::DuplicateKey { collision: true });
        let beyond = event("1Z", Status::InTransit, T0 + 2001);
        assert_eq!(check(&store, policy, &beyond, T0), Verdict::New);
    }

    #[test]
    fn ttl_window_is_enforced_in_code_at_the_millisecond() {
        let ttl = Duration::from_secs(3600);
        let policy = DedupePolicy { ttl, ..DedupePolicy::default() };
        let ttl_ms = 3_600_000;
        let seen_at = T0 + 5_000;
        let e = event("1Z", Status::InTransit, T0);
        let store = MemoryStore::default();
        assert_eq!(check(&store, policy, &e, seen_at), Verdict::New);
        // Window minus 1 ms: still a duplicate. Read-only checks: nothing is re-staged.
        let mut staged = Staged::new(&store);
        let scope = Scope::of("t", 0);
        assert_eq!(check_and_stage(&mut staged, scope, policy, &e, at(seen_at + ttl_ms - 1)).unwrap(), Verdict::DuplicateHash);
        assert!(staged.is_empty());
        // At the window and after it: expired, so the event is new again.
        assert_eq!(check_and_stage(&mut Staged::new(&store), scope, policy, &e, at(seen_at + ttl_ms)).unwrap(), Verdict::New);
        assert_eq!(check_and_stage(&mut Staged::new(&store), scope, policy, &e, at(seen_at + ttl_ms + 1)).unwrap(), Verdict::New);
    }

    #[test]
    fn what_must_not_be_merged() {
        let store = MemoryStore::default();
        let policy = DedupePolicy::default();
        let base = event("1Z", Status::InTransit, T0);
        assert_eq!(check(&store, policy, &base, T0), Verdict::New);
        let mut other_tenant = base.clone();
        other_tenant.tenant_id = "globex".into();
        assert_eq!(check(&store, policy, &other_tenant, T0), Verdict::New);
        let mut other_shipment_same_event_id = base.clone();
        other_shipment_same_event_id.tracking_number = "1Y".into();
        assert_eq!(check(&store, policy, &other_shipment_same_event_id, T0), Verdict::New);
        let later_scan = event("1Z", Status::InTransit, T0 + 3_600_000);
        assert_eq!(check(&store, policy, &later_scan, T0), Verdict::New);
        let mut elsewhere_same_second = base.clone();
        elsewhere_same_second.location.city = Some("Kenly".into());
        assert_eq!(check(&store, policy, &elsewhere_same_second, T0), Verdict::New);
    }

    #[test]
    fn one_instant_in_two_offsets_is_one_event() {
        let store = MemoryStore::default();
        let a = event("1Z", Status::InTransit, T0);
        let mut b = a.clone();
        b.occurred_at = chrono::DateTime::parse_from_rfc3339("2024-07-31T11:00:00-04:00").unwrap().with_timezone(&Utc);
        assert_eq!(a.occurred_at, b.occurred_at);
        assert_eq!(check(&store, DedupePolicy::default(), &a, T0), Verdict::New);
        assert_eq!(check(&store, DedupePolicy::default(), &b, T0), Verdict::DuplicateHash);
    }

    #[test]
    fn partitions_do_not_share_state() {
        let store = MemoryStore::default();
        let e = event("1Z", Status::InTransit, T0);
        let mut staged = Staged::new(&store);
        let p = DedupePolicy::default();
        assert_eq!(check_and_stage(&mut staged, Scope::of("t", 0), p, &e, at(T0)).unwrap(), Verdict::New);
        assert_eq!(check_and_stage(&mut staged, Scope::of("t", 1), p, &e, at(T0)).unwrap(), Verdict::New);
        assert_eq!(check_and_stage(&mut staged, Scope::of("t", 0), p, &e, at(T0)).unwrap(), Verdict::DuplicateHash);
    }
}
