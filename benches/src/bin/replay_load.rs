//! Replay at scale: writes a multi-carrier kcat -J archive of at least N events
//! (EasyPost and DHL webhooks with growing histories, 30% redeliveries, reordered
//! neighbours and provider replays with new ids), then measures:
//!
//! 1. the floor, in this process: the same archive read line by line, each
//!    line's envelope and body parsed as JSON, nothing else, on one thread (a
//!    bare pass-through: Waymark does all of this and more per record);
//! 2. `waymark replay --input ARCHIVE --state-dir DIR --output /dev/null`, the
//!    command a backfill runs, with the default configuration and a fresh state
//!    directory, timed from spawn to exit, its peak RSS read from /proc.
//!
//! It prints events/s of each and their ratio (an event is one history entry).
//!
//! cargo run --release --manifest-path benches/Cargo.toml --bin replay-load -- \
//!     --waymark $CARGO_TARGET_DIR/release/waymark [--events 1000000] [--archive FILE] [--threads N]

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use waymark::synth::{generate, SynthCarrier, TrafficSpec};
use waymark::Envelope;

/// Peak RSS of a running process, in KiB (VmHWM), from /proc.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Write the archive in chunks of shipments, so the generator never holds it all.
/// Returns (records, events).
fn write_archive(path: &PathBuf, target_events: u64) -> (u64, u64) {
    let file = std::fs::File::create(path).expect("create the archive file");
    let mut out = BufWriter::new(file);
    let (mut records, mut events, mut chunk) = (0u64, 0u64, 0u64);
    while events < target_events {
        for carrier in [SynthCarrier::EasyPost, SynthCarrier::Dhl] {
            let traffic = generate(&TrafficSpec {
                seed: 1000 + chunk,
                carrier,
                shipments: 2000,
                topic: format!("tracking.raw.{}", carrier.name()),
                redelivery: 0.3,
                ..TrafficSpec::default()
            });
            for envelope in &traffic.envelopes {
                events += history_len(envelope);
                records += 1;
                writeln!(out, "{}", envelope.to_kcat_json()).expect("write the archive");
            }
            chunk += 1;
        }
    }
    out.flush().expect("flush the archive");
    // On disk before anything is timed, so the kernel's write-back of the fresh
    // archive does not overlap the measured runs.
    out.get_ref().sync_all().expect("sync the archive");
    (records, events)
}

/// History entries in one synthetic body (an event is one history entry).
fn history_len(envelope: &Envelope) -> u64 {
    let body: serde_json::Value = serde_json::from_slice(&envelope.payload).unwrap_or_default();
    let easypost = body.pointer("/result/tracking_details").and_then(|d| d.as_array()).map(Vec::len);
    let dhl = body
        .get("shipments")
        .and_then(|s| s.as_array())
        .map(|shipments| shipments.iter().map(|s| s.get("events").and_then(|e| e.as_array()).map_or(0, Vec::len)).sum());
    easypost.or(dhl).unwrap_or(0) as u64
}

fn main() {
    let mut waymark = None;
    let mut target_events: u64 = 1_000_000;
    let mut archive = None;
    let mut threads = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--waymark" => waymark = Some(value()),
            "--events" => target_events = value().parse().expect("--events: a number"),
            "--archive" => archive = Some(PathBuf::from(value())),
            "--threads" => threads = Some(value()),
            other => panic!("unknown argument {other}; see the comment at the top of replay_load.rs"),
        }
    }
    let waymark = waymark.expect("--waymark PATH: the waymark binary to measure (cargo build --release --bin waymark)");
    let tmp = tempfile::tempdir().expect("temp dir");
    let archive = archive.unwrap_or_else(|| tmp.path().join("archive.ndjson"));

    let started = Instant::now();
    let (records, events) = write_archive(&archive, target_events);
    let bytes = std::fs::metadata(&archive).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "archive: {records} records, {events} events, {:.0} MB, written in {:.1}s ({})",
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        archive.display()
    );

    // The floor: read and parse, nothing else.
    let started = Instant::now();
    let mut parsed = 0u64;
    for line in std::io::BufReader::new(std::fs::File::open(&archive).expect("open the archive")).lines() {
        let line = line.expect("read the archive");
        let envelope = Envelope::from_kcat_json(&line).expect("a line this harness wrote");
        let body: serde_json::Value = serde_json::from_slice(&envelope.payload).expect("a body this harness wrote");
        parsed += u64::from(!body.is_null());
    }
    let floor_secs = started.elapsed().as_secs_f64();
    assert_eq!(parsed, records);
    let floor = events as f64 / floor_secs;
    eprintln!("floor (read + parse, one thread): {floor_secs:.2}s, {floor:.0} events/s");

    // Waymark: the backfill command, a fresh state directory.
    let state_dir = tmp.path().join("state");
    let report = tmp.path().join("report.json");
    let mut command = Command::new(&waymark);
    command
        .args(["replay", "--input"])
        .arg(&archive)
        .arg("--state-dir")
        .arg(&state_dir)
        .args(["--output", "/dev/null", "--report"])
        .arg(&report)
        .env("WAYMARK_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("replay.log")).expect("create the replay's log"));
    if let Some(threads) = &threads {
        command.env("WAYMARK_WORKER__NORMALIZE_THREADS", threads);
    }
    let started = Instant::now();
    let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot run {waymark}: {e}"));
    let mut peak_kb = 0;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for waymark") {
            break status;
        }
        peak_kb = peak_kb.max(peak_rss_kb(child.id()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
    };
    let secs = started.elapsed().as_secs_f64();
    if !status.success() {
        let log = std::fs::read_to_string(tmp.path().join("replay.log")).unwrap_or_default();
        panic!("waymark replay failed ({status}); its log:\n{log}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("the replay's report")).expect("the report is JSON");
    let summary = &report["summary"];
    assert_eq!(summary["records"].as_u64(), Some(records), "every record replayed");
    assert_eq!(summary["events"].as_u64(), Some(events), "every event counted");
    assert_eq!(summary["invalid"].as_u64(), Some(0), "no record of this harness is invalid");
    let rate = events as f64 / secs;
    eprintln!(
        "waymark replay (state dir, {} milestones): {secs:.2}s, {rate:.0} events/s, {:.0} records/s, peak RSS {} MiB",
        summary["new_milestones"],
        records as f64 / secs,
        peak_kb / 1024
    );
    println!("replay: {rate:.0} events/s, floor {floor:.0} events/s, ratio {:.2}", rate / floor);
}
