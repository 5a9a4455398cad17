//! A seeded, deterministic simulation of the worker's at-least-once protocol over
//! the pipeline core: an in-memory partitioned log (the input topic), the group's
//! committed offsets, an in-memory state store that survives crashes (RocksDB with
//! its WAL), and an append-only output (the output topic). Each step polls a batch
//! from the resume point, runs `batch::process` and `batch::deliver` (the very
//! functions the worker runs), then commits the group offsets; a seeded RNG kills
//! the process at any failpoint between those side effects (and sometimes the whole
//! stream is replayed from an older committed offset). After every crash the
//! worker resumes as it does on the real broker: stored progress first, the group's
//! committed offset otherwise.
//!
//! Checked for every seed: every distinct milestone is in the output, nothing a
//! correct pipeline would not emit is there, and every repeat is identical.
//! A failure prints its seed; `WAYMARK_SIM_SEED=<n>` reruns just that one, and
//! `WAYMARK_SIM_SEEDS=<n>` runs more of them.

use std::collections::{BTreeMap, HashMap};

use chrono::{TimeZone, Utc};
use waymark::batch::{self, DeliverError, Failpoint};
use waymark::pipeline::stored_progress;
use waymark::sink::MemorySink;
use waymark::state::MemoryStore;
use waymark::synth::{generate, Rng, TrafficSpec};
use waymark::{Envelope, Pipeline};

const TOPIC: &str = "tracking.raw.sim";

struct Outcome {
    crashes: usize,
    emitted: usize,
    repeats: usize,
    distinct: usize,
}

fn simulate(seed: u64) -> Result<Outcome, String> {
    let mut rng = Rng::new(seed);
    let partitions = 1 + rng.below(3) as i32;
    let mut log: Vec<Vec<Envelope>> = Vec::new();
    for partition in 0..partitions {
        let spec = TrafficSpec {
            seed: seed.wrapping_mul(31).wrapping_add(partition as u64),
            shipments: 3 + rng.below(12) as usize,
            topic: TOPIC.into(),
            partition,
            ..TrafficSpec::default()
        };
        log.push(generate(&spec).envelopes);
    }
    let all: Vec<Envelope> = log.iter().flatten().cloned().collect();
    let now = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    let pipeline = Pipeline::default();

    // What a crash-free run emits (each partition in order; partitions independent).
    let reference = batch::process(&pipeline, &MemoryStore::default(), &all, now, true, None).map_err(|e| e.to_string())?;
    let expected: BTreeMap<String, serde_json::Value> = reference
        .upserts
        .iter()
        .map(|u| (u.milestone_id.clone(), serde_json::to_value(u).unwrap()))
        .collect();

    let store = MemoryStore::default();
    let mut output = MemorySink::default();
    let mut committed: HashMap<i32, i64> = HashMap::new();
    let mut crashes = 0;
    let crash_rate = 0.05 + (rng.below(30) as f64) / 100.0;
    'process: for _restart in 0..10_000 {
        // (Re)start: resume each partition from stored progress, else the group's offset.
        let mut position: HashMap<i32, i64> = HashMap::new();
        for partition in 0..partitions {
            let stored = stored_progress(&store, TOPIC, partition).map_err(|e| e.to_string())?;
            position.insert(partition, stored.or(committed.get(&partition).copied()).unwrap_or(0));
        }
        loop {
            // Poll: up to a random number of records, partitions interleaved at random.
            let mut batch_records = Vec::new();
            let want = 1 + rng.below(40) as usize;
            while batch_records.len() < want {
                let open: Vec<i32> =
                    (0..partitions).filter(|p| (position[p] as usize) < log[*p as usize].len()).collect();
                if open.is_empty() {
                    break;
                }
                let p = open[rng.below(open.len() as u64) as usize];
                batch_records.push(log[p as usize][position[&p] as usize].clone());
                *position.get_mut(&p).unwrap() += 1;
            }
            if batch_records.is_empty() {
                break 'process;
            }
            let processed = batch::process(&pipeline, &store, &batch_records, now, true, None).map_err(|e| e.to_string())?;
            let mut crash = |_: Failpoint| rng.chance(crash_rate);
            match batch::deliver(&store, &mut output, processed, &mut crash) {
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
                committed.insert(record.partition, record.offset + 1);
            }
        }
    }

    let mut seen: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut repeats = 0;
    for upsert in &output.upserts {
        let value = serde_json::to_value(upsert).unwrap();
        if let Some(first) = seen.insert(upsert.milestone_id.clone(), value.clone()) {
            repeats += 1;
            if first != value {
                return Err(format!("a repeated upsert differs from the first: {first} vs {value}"));
            }
        }
    }
    for (id, value) in &expected {
        match seen.get(id) {
            None => return Err(format!("milestone lost: {value}")),
            Some(got) if got != value => return Err(format!("milestone differs from a crash-free run: {got} vs {value}")),
            Some(_) => {}
        }
    }
    if let Some(extra) = seen.keys().find(|id| !expected.contains_key(*id)) {
        return Err(format!("unexpected milestone {extra}"));
    }
    Ok(Outcome { crashes, emitted: output.upserts.len(), repeats, distinct: expected.len() })
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
    let (mut crashes, mut emitted, mut repeats, mut distinct) = (0, 0, 0, 0);
    for seed in &seeds {
        match simulate(*seed) {
            Ok(o) => {
                crashes += o.crashes;
                emitted += o.emitted;
                repeats += o.repeats;
                distinct += o.distinct;
            }
            Err(reason) => panic!("simulation seed {seed} failed: {reason}\nrerun: WAYMARK_SIM_SEED={seed} cargo test --test it simulation"),
        }
    }
    println!(
        "checked {} seeds: {crashes} crashes, {emitted} upserts emitted, {distinct} distinct milestones, {repeats} identical repeats",
        seeds.len()
    );
    assert!(crashes > seeds.len(), "the simulation should crash more than once per seed on average");
}
