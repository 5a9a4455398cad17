//! Normalization throughput per carrier, on a typical body from fixtures/
//! (a history of several scans). Reported as canonical events per second.
//!
//! cargo bench --manifest-path benches/Cargo.toml --bench normalize

use std::path::PathBuf;

use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use waymark::carriers::CarrierRegistry;

/// The fixture used as "typical body" for each carrier: the largest valid one.
fn typical_bodies() -> Vec<(String, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let registry = CarrierRegistry::builtin();
    let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let mut out = Vec::new();
    for carrier in registry.names() {
        let Ok(dir) = std::fs::read_dir(root.join(carrier)) else { continue };
        let mut best: Option<(usize, Vec<u8>)> = None;
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let body = std::fs::read(&path).unwrap();
            if let Ok(events) = registry.normalize(carrier, &body, now) {
                if best.as_ref().is_none_or(|(n, _)| events.len() > *n) {
                    best = Some((events.len(), body));
                }
            }
        }
        if let Some((_, body)) = best {
            out.push((carrier.to_string(), body));
        }
    }
    out
}

fn normalize(c: &mut Criterion) {
    let registry = CarrierRegistry::builtin();
    let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let mut group = c.benchmark_group("normalize");
    for (carrier, body) in typical_bodies() {
        let events = registry.normalize(&carrier, &body, now).unwrap().len() as u64;
        group.throughput(Throughput::Elements(events));
        group.bench_function(format!("{carrier} ({events} events, {} bytes)", body.len()), |b| {
            b.iter(|| registry.normalize(&carrier, std::hint::black_box(&body), now).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, normalize);
criterion_main!(benches);
