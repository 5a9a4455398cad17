//! Table-driven carrier fixtures: every `fixtures/<carrier>/<name>.json` body is
//! normalized and compared with `<name>.expected.ndjson`: the canonical events as
//! NDJSON, or for bad input the single line `error: <dead-letter kind>`.
//!
//! On a mismatch the actual output is written under the test's target tmpdir and
//! the test fails with its path. `WAYMARK_BLESS=1` rewrites the expected files
//! (review the diff before committing); `WAYMARK_FIXTURES=a,b` limits the run (and
//! the blessing) to those carriers' directories.
//!
//! User-declared carriers: every `fixtures/declared/*.toml` mapping is loaded into
//! the pipeline, and its bodies live in `fixtures/<its name>/`.

use std::path::{Path, PathBuf};

use waymark::Envelope;

use crate::common::repo;

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().into()
}

/// The canonical events (or dead-letter kind) for one fixture body, as text.
pub fn render(carrier: &str, body: &[u8]) -> String {
    let envelope = Envelope {
        topic: format!("tracking.raw.{carrier}"),
        partition: 0,
        offset: 0,
        timestamp_ms: Some(now().timestamp_millis()),
        headers: vec![("tenant-id".into(), Some(b"acme".to_vec()))],
        key: None,
        payload: body.to_vec(),
    };
    let pipeline = fixture_pipeline();
    match pipeline.canonical_events(&envelope, now()) {
        Ok((_, events)) => events.iter().map(|e| serde_json::to_string(e).unwrap() + "\n").collect(),
        Err(rejected) => format!("error: {}\n", rejected.error.kind()),
    }
}

/// The pipeline fixtures run through: built-in carriers plus the user-declared
/// carriers of fixtures/declared/*.toml, if any.
fn fixture_pipeline() -> waymark::Pipeline {
    static PIPELINE: std::sync::OnceLock<waymark::Pipeline> = std::sync::OnceLock::new();
    PIPELINE
        .get_or_init(|| {
            let mut pipeline = waymark::Pipeline::default();
            let dir = repo().join("fixtures").join(DECLARED_DIR);
            if dir.is_dir() {
                let mut mappings: Vec<PathBuf> = std::fs::read_dir(&dir)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                    .collect();
                mappings.sort();
                for path in mappings {
                    let carrier = waymark::carriers::declared::DeclaredCarrier::from_file(&path)
                        .unwrap_or_else(|e| panic!("{e}"));
                    pipeline.carriers.register(std::sync::Arc::new(carrier));
                }
            }
            pipeline
        })
        .clone()
}

/// Holds carrier mappings, not bodies; a declared carrier's bodies live in
/// `fixtures/<its name>/` like any other carrier's.
const DECLARED_DIR: &str = "declared";

fn bodies(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    out.sort();
    out
}

#[test]
fn every_fixture_normalizes_to_its_expected_events() {
    let root = repo().join("fixtures");
    let bless = std::env::var("WAYMARK_BLESS").is_ok_and(|v| v == "1");
    let actual_root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixtures-actual");
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut carriers: Vec<PathBuf> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    carriers.sort();
    // `WAYMARK_FIXTURES=shippo,aftership` checks (and blesses) only those carriers.
    let only: Option<Vec<String>> = std::env::var("WAYMARK_FIXTURES")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.split(',').map(|c| c.trim().to_string()).collect());
    for dir in carriers {
        let carrier = dir.file_name().unwrap().to_string_lossy().to_string();
        if carrier == DECLARED_DIR || only.as_ref().is_some_and(|only| !only.contains(&carrier)) {
            continue;
        }
        for body_path in bodies(&dir) {
            let stem = body_path.file_stem().unwrap().to_string_lossy().to_string();
            let expected_path = dir.join(format!("{stem}.expected.ndjson"));
            let actual = render(&carrier, &std::fs::read(&body_path).unwrap());
            if bless {
                std::fs::write(&expected_path, &actual).unwrap();
            }
            let expected = std::fs::read_to_string(&expected_path)
                .unwrap_or_else(|_| panic!("{} has no {}", body_path.display(), expected_path.display()));
            checked += 1;
            if actual != expected {
                let out = actual_root.join(&carrier).join(format!("{stem}.expected.ndjson"));
                std::fs::create_dir_all(out.parent().unwrap()).unwrap();
                std::fs::write(&out, &actual).unwrap();
                failures.push(format!("{}: differs; actual in {}", body_path.display(), out.display()));
            }
        }
    }
    println!("checked {checked} fixtures");
    assert!(checked > 0, "no fixtures found under {}", root.display());
    assert!(failures.is_empty(), "fixtures differ:\n{}", failures.join("\n"));
}
