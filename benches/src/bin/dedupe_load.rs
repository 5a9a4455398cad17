//! Loader for the dedupe store at scale: preloads N live events through the real
//! insert-if-absent path, compacts, then measures a mixed workload (half new
//! events, half duplicates of random live ones) on one thread.
//!
//! cargo run --release --manifest-path benches/Cargo.toml --features store --bin dedupe-load -- 10000000 [ops] [dir]
//!
//! The store uses the worker's default options; BLOCK_CACHE_MB, MEMTABLE_MB and
//! SYNC_WRITES=0|1 override them for experiments.
//!
//! Prints: preload rate, checks/s, p50/p99/max latency of one check (+ write for
//! new events, batched by 500 like the worker), RSS (current and peak), SST bytes
//! per live event and per stored key after compaction.

use std::time::{Duration, Instant};

/// The `waymark` binary's allocator (see src/main.rs), so the figures are the
/// worker's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use chrono::Utc;
use waymark::dedupe::{check_and_stage, DedupePolicy, Verdict};
use waymark::state::{Keyspace, Scope, StateStore, Staged};
use waymark::store::{system_clock, RocksStore, StoreOptions};
use waymark::synth::Rng;
use waymark_benches::{event, preload};

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let ops: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = args.get(3).map(std::path::PathBuf::from).unwrap_or_else(|| tmp.path().to_path_buf());
    // The worker's defaults, unless overridden for an experiment.
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
    let defaults = StoreOptions::default();
    let options = StoreOptions {
        block_cache_bytes: env("BLOCK_CACHE_MB").map_or(defaults.block_cache_bytes, |mb| mb << 20),
        memtable_bytes: env("MEMTABLE_MB").map_or(defaults.memtable_bytes, |mb| mb << 20),
        sync_writes: env("SYNC_WRITES").map_or(defaults.sync_writes, |v| v != 0),
    };
    eprintln!("store {} (block cache {} MiB, memtable {} MiB, sync_writes {})", dir.display(), options.block_cache_bytes >> 20, options.memtable_bytes >> 20, options.sync_writes);
    let store = RocksStore::open(&dir, &options, system_clock()).expect("open store");
    // The compaction filter expires entries by the wall clock: check against it too.
    let now = Utc::now();
    let scope = Scope::of("tracking.raw.bench", 0);
    let policy = DedupePolicy::default();

    let started = Instant::now();
    preload(&store, scope, policy, now, n, true);
    let preload_secs = started.elapsed().as_secs_f64();
    eprintln!("preloaded {n} events in {preload_secs:.1} s; compacting");
    store.flush().expect("flush");
    store.compact().expect("compact");
    let sst: u64 = Keyspace::ALL.iter().map(|k| store.disk_bytes(*k).unwrap_or(0)).sum();
    let keys: u64 = [Keyspace::Keys, Keyspace::Hashes].iter().map(|k| store.estimated_keys(*k).unwrap_or(0)).sum();

    let mut rng = Rng::new(42);
    let mut latencies: Vec<Duration> = Vec::with_capacity(ops as usize);
    let mut next_new = n;
    let mut staged = Staged::new(&store);
    let mut pending = 0;
    let measure = Instant::now();
    for _ in 0..ops {
        let fresh = rng.chance(0.5);
        let e = if fresh {
            next_new += 1;
            event(next_new)
        } else {
            event(rng.below(n))
        };
        let t = Instant::now();
        let verdict = check_and_stage(&mut staged, scope, policy, &e, now).expect("check");
        pending += 1;
        if pending == 500 {
            store.write(staged.take_batch()).expect("write");
            pending = 0;
        }
        latencies.push(t.elapsed());
        assert_eq!(verdict == Verdict::New, fresh, "wrong verdict");
    }
    store.write(staged.take_batch()).expect("write");
    let secs = measure.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!("live events:            {n}");
    println!("preload:                {:.0} events/s", n as f64 / preload_secs);
    println!("mixed checks:           {ops} in {secs:.2} s = {:.0} checks/s (one thread)", ops as f64 / secs);
    println!("latency p50 / p99 / max: {:?} / {:?} / {:?}", pct(0.50), pct(0.99), latencies[latencies.len() - 1]);
    println!("RSS now / peak:         {} MiB / {} MiB", status_kb("VmRSS:") / 1024, status_kb("VmHWM:") / 1024);
    println!("SST bytes after compaction: {sst} = {:.1} bytes per live event, {:.1} per stored key ({keys} keys)", sst as f64 / n as f64, sst as f64 / keys.max(1) as f64);
}
