//! Insert-if-absent on RocksDB (criterion): one new event checked and written,
//! and one duplicate checked, against a store preloaded with 1M live keys.
//! The 10M and 50M figures come from the `dedupe-load` binary.
//!
//! cargo bench --manifest-path benches/Cargo.toml --features store --bench dedupe

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use waymark::dedupe::{check_and_stage, DedupePolicy, Verdict};
use waymark::state::{Scope, StateStore, Staged};
use waymark::store::{system_clock, RocksStore, StoreOptions};
use waymark_benches::{event, preload};

fn dedupe(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open(dir.path(), &StoreOptions { sync_writes: false, ..StoreOptions::default() }, system_clock()).unwrap();
    // The compaction filter expires entries by the wall clock: check against it too.
    let now = Utc::now();
    let scope = Scope::of("tracking.raw.bench", 0);
    let policy = DedupePolicy::default();
    let preloaded = 1_000_000u64;
    preload(&store, scope, policy, now, preloaded, false);

    let mut group = c.benchmark_group("dedupe_1M_keys");
    group.throughput(Throughput::Elements(1));
    let mut next = preloaded;
    group.bench_function("new event (check + atomic write)", |b| {
        b.iter(|| {
            next += 1;
            let mut staged = Staged::new(&store);
            let verdict = check_and_stage(&mut staged, scope, policy, &event(next), now).unwrap();
            assert_eq!(verdict, Verdict::New);
            store.write(staged.take_batch()).unwrap();
        })
    });
    let mut i = 0u64;
    group.bench_function("duplicate (check only)", |b| {
        b.iter(|| {
            i = (i + 7919) % preloaded;
            let mut staged = Staged::new(&store);
            let verdict = check_and_stage(&mut staged, scope, policy, &event(i), now).unwrap();
            assert_ne!(verdict, Verdict::New);
        })
    });
    group.finish();
}

criterion_group!(benches, dedupe);
criterion_main!(benches);
