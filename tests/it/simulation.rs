//! A seeded, deterministic simulation of the worker's at-least-once protocol over
//! the pipeline core, both stages: an in-memory partitioned log (the raw input
//! topic, produced *without* keys, so one shipment's records land on any
//! partition, and the repartition topic that the first stage appends to), the
//! group's committed offsets, an in-memory state store that survives crashes
//! (RocksDB with its WAL), and an append-only output (the output topic). Each step
//! polls a batch from both topics, runs `batch::process` and `batch::deliver` (the
//! very functions the worker runs, with the hop on), then commits the group
//! offsets; a seeded RNG kills the process at any failpoint between those side
//! effects. Repartition records reach the log as soon as they are acknowledged,
//! whether or not the process survives the batch. After every crash the worker
//! resumes as it does on the real broker: at the group's committed offset, or,
//! for a stateful (repartition) partition the group has no offset for, at its
//! stored progress.
//!
//! Checked for every seed: every distinct milestone is in the output, nothing a
//! correct pipeline would not emit is there, every repeat is identical, and no
//! shipment's status moves backwards in the order its milestones were first
//! emitted. A failure prints its seed; `WAYMARK_SIM_SEED=<n>` reruns just that
//! one, and `WAYMARK_SIM_SEEDS=<n>` runs more of them.

use std::collections::{BTreeMap, HashMap};

use chrono::{TimeZone, Utc};
use waymark::batch::{self, DeliverError, Failpoint};
use waymark::pipeline::stored_progress;
use waymark::routing::Placement;
use waymark::sink::MemorySink;
use waymark::state::MemoryStore;
use waymark::synth::{generate, Rng, TrafficSpec};
use waymark::{Envelope, Pipeline, Status};

const TOPIC: &str = "tracking.raw.sim";
const REPARTITION: &str = "sim-repartition";

struct Outcome {
    crashes: usize,
    emitted: usize,
    repeats: usize,
    distinct: usize,
    routed: usize,
}

type Partition = (&'static str, i32);

fn simulate(seed: u64) -> Result<Outcome, String> {
    let mut rng = Rng::new(seed);
    let raw_partitions = 1 + rng.below(3) as i32;
    let homes = 1 + rng.below(4) as u32;
    // Several streams, each a different set of shipments, interleaved and spread
    // over the raw partitions at random (no key).
    let mut raw: Vec<Envelope> = Vec::new();
    for stream in 0..(1 + rng.below(3)) {
        let spec = TrafficSpec {
            seed: seed.wrapping_mul(31).wrapping_add(stream),
            shipments: 3 + rng.below(12) as usize,
            topic: TOPIC.into(),
            ..TrafficSpec::default()
        };
        for envelope in generate(&spec).envelopes {
            let at = rng.below(raw.len() as u64 + 1) as usize;
            raw.insert(at, envelope);
        }
    }
    let mut log: HashMap<Partition, Vec<Envelope>> = HashMap::new();
    for mut envelope in raw.iter().cloned() {
        envelope.partition = rng.below(raw_partitions as u64) as i32;
        let partition = log.entry((TOPIC, envelope.partition)).or_default();
        envelope.offset = partition.len() as i64;
        partition.push(envelope);
    }
    let now = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    let placement = Placement::Home { topic: REPARTITION.into(), partitions: homes };
    let pipeline = Pipeline { placement: placement.clone(), hop: true, ..Pipeline::default() };

    // What a crash-free single-stage run emits (milestone ids do not depend on
    // arrival order for this traffic: its duplicates are exact copies).
    let reference = Pipeline { placement, hop: false, ..Pipeline::default() };
    let reference = batch::process(&reference, &MemoryStore::default(), &raw, now, false, None).map_err(|e| e.to_string())?;
    let expected: BTreeMap<String, serde_json::Value> = reference
        .upserts
        .iter()
        .map(|u| (u.milestone_id.clone(), serde_json::to_value(u).unwrap()))
        .collect();

    let store = MemoryStore::default();
    let mut output = MemorySink::default();
    let mut committed: HashMap<Partition, i64> = HashMap::new();
    let (mut crashes, mut routed) = (0, 0);
    let crash_rate = 0.05 + (rng.below(30) as f64) / 100.0;
    'process: for _restart in 0..10_000 {
        // (Re)start: the group's offset; a stateful partition without one
        // resumes from its stored progress.
        let mut position: HashMap<Partition, i64> = HashMap::new();
        let partitions: Vec<Partition> =
            (0..raw_partitions).map(|p| (TOPIC, p)).chain((0..homes as i32).map(|p| (REPARTITION, p))).collect();
        for &(topic, partition) in &partitions {
            let stored = if pipeline.is_stateful(topic) {
                stored_progress(&store, topic, partition).map_err(|e| e.to_string())?
            } else {
                None
            };
            position.insert((topic, partition), committed.get(&(topic, partition)).copied().or(stored).unwrap_or(0));
        }
        loop {
            // Poll: up to a random number of records, partitions interleaved at random.
            let mut batch_records = Vec::new();
            let want = 1 + rng.below(40) as usize;
            while batch_records.len() < want {
                let open: Vec<Partition> = partitions
                    .iter()
                    .copied()
                    .filter(|p| (position[p] as usize) < log.get(p).map_or(0, Vec::len))
                    .collect();
                if open.is_empty() {
                    break;
                }
                let p = open[rng.below(open.len() as u64) as usize];
                batch_records.push(log[&p][position[&p] as usize].clone());
                *position.get_mut(&p).unwrap() += 1;
            }
            if batch_records.is_empty() {
                break 'process;
            }
            let processed = batch::process(&pipeline, &store, &batch_records, now, true, None).map_err(|e| e.to_string())?;
            let mut crash = |_: Failpoint| rng.chance(crash_rate);
            let delivered = batch::deliver(&store, &mut output, processed, &mut crash);
            // Acknowledged repartition records are in Kafka, whatever happens next.
            for record in output.routed.drain(..) {
                let partition = log.entry((REPARTITION, record.partition)).or_default();
                partition.push(Envelope {
                    topic: REPARTITION.into(),
                    partition: record.partition,
                    offset: partition.len() as i64,
                    timestamp_ms: None,
                    headers: vec![],
                    key: Some(record.key.into_bytes()),
                    payload: record.payload,
                });
                routed += 1;
            }
            match delivered {
                Ok(_) => {}
                Err(DeliverError::Crashed(_)) => {
                    crashes += 1;
                    continue 'process;
                }
                Err(e) => return Err(e.to_string()),
            }
            // Commit the group's offsets (may be lost by a crash just before).
            if rng.chance(crash_rate) {
                crashes += 1;
                continue 'process;
            }
            for record in &batch_records {
                let topic = if record.topic == TOPIC { TOPIC } else { REPARTITION };
                committed.insert((topic, record.partition), record.offset + 1);
            }
        }
    }

    let mut seen: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut repeats = 0;
    let mut furthest: HashMap<String, u8> = HashMap::new();
    for upsert in &output.upserts {
        let value = serde_json::to_value(upsert).unwrap();
        if let Some(first) = seen.insert(upsert.milestone_id.clone(), value.clone()) {
            repeats += 1;
            if first != value {
                return Err(format!("a repeated upsert differs from the first: {first} vs {value}"));
            }
            continue;
        }
        let rank = upsert.shipment_status.rank();
        let reached = furthest.entry(upsert.key()).or_insert(0);
        if rank < *reached && upsert.shipment_status != Status::Exception {
            return Err(format!("shipment {} moved back to {:?} after rank {reached}", upsert.key(), upsert.shipment_status));
        }
        *reached = (*reached).max(rank);
    }
    for (id, value) in &expected {
        if !seen.contains_key(id) {
            return Err(format!("milestone lost: {value}"));
        }
    }
    if let Some(extra) = seen.keys().find(|id| !expected.contains_key(*id)) {
        return Err(format!("unexpected milestone {extra}"));
    }
    Ok(Outcome { crashes, emitted: output.upserts.len(), repeats, distinct: expected.len(), routed })
}

#[test]
fn seeded_crash_simulation_loses_nothing_and_repeats_only_identical_upserts() {
    let seeds: Vec<u64> = match std::env::var("WAYMARK_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("WAYMARK_SIM_SEED is a number")],
        Err(_) => {
            let n = std::env::var("WAYMARK_SIM_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(200u64);
            (1..=n).collect()
        }
    };
    let (mut crashes, mut emitted, mut repeats, mut distinct, mut routed) = (0, 0, 0, 0, 0);
    for seed in &seeds {
        match simulate(*seed) {
            Ok(o) => {
                crashes += o.crashes;
                emitted += o.emitted;
                repeats += o.repeats;
                distinct += o.distinct;
                routed += o.routed;
            }
            Err(reason) => panic!("simulation seed {seed} failed: {reason}\nrerun: WAYMARK_SIM_SEED={seed} cargo test --test it simulation"),
        }
    }
    println!(
        "checked {} seeds: {crashes} crashes, {routed} repartition records, {emitted} upserts emitted, {distinct} distinct milestones, {repeats} identical repeats",
        seeds.len()
    );
    assert!(crashes > seeds.len(), "the simulation should crash more than once per seed on average");
}
