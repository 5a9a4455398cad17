//! `waymark replay` as a user runs it: the shipped sample archive, gzip, directories,
//! stdin, and a persistent state directory.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::common::{repo, waymark_bin};

fn replay(args: &[&str], stdin: Option<&[u8]>) -> (bool, String, String) {
    let mut child = Command::new(waymark_bin())
        .arg("replay")
        .args(args)
        .current_dir(repo())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(bytes) = stdin {
        child.stdin.take().unwrap().write_all(bytes).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

fn expected() -> String {
    std::fs::read_to_string(repo().join("replay/sample.expected.ndjson")).unwrap()
}

#[test]
fn sample_archive_replays_to_its_expected_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let dlq = dir.path().join("dlq.ndjson");
    let (ok, stdout, stderr) = replay(&["--input", "replay/sample.ndjson", "--dlq", dlq.to_str().unwrap()], None);
    assert!(ok, "replay failed: {stderr}");
    assert_eq!(stdout, expected(), "replay output differs from replay/sample.expected.ndjson");
    let dead: Vec<serde_json::Value> =
        std::fs::read_to_string(&dlq).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(dead.len(), 1, "exactly one malformed record in the sample");
    assert_eq!(dead[0]["error_kind"], "invalid_json");
    assert_eq!(dead[0]["envelope"]["offset"], 1008);
    assert!(stderr.contains("records read:           12"), "{stderr}");
    assert!(stderr.contains("invalid (dead letters): 1"), "{stderr}");
}

#[test]
fn sample_timeline_has_one_upsert_per_distinct_milestone_and_never_regresses() {
    let upserts: Vec<serde_json::Value> = expected().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: std::collections::BTreeSet<_> = upserts.iter().map(|u| u["milestone_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), upserts.len(), "a milestone was emitted twice");
    // Shipment A has 8 scans, B 6, A under tenant globex 3.
    let count = |tenant: &str, tracking: &str| {
        upserts.iter().filter(|u| u["tenant_id"] == tenant && u["tracking_number"] == tracking).count()
    };
    assert_eq!(count("acme", "EZ1000000001"), 8);
    assert_eq!(count("acme", "EZ2000000002"), 6);
    assert_eq!(count("globex", "EZ1000000001"), 3);
    // Per shipment, shipment_status never moves back in output order.
    let rank = |s: &str| waymark::Status::parse(s).unwrap().rank();
    let mut last: std::collections::HashMap<(String, String), u8> = Default::default();
    for u in &upserts {
        let key = (u["tenant_id"].to_string(), u["tracking_number"].to_string());
        let r = rank(u["shipment_status"].as_str().unwrap());
        let prev = last.insert(key, r).unwrap_or(0);
        assert!(r >= prev, "shipment status moved backwards at {u}");
    }
}

#[test]
fn gzip_directories_and_stdin_replay_the_same() {
    let sample = std::fs::read(repo().join("replay/sample.ndjson")).unwrap();
    let text = String::from_utf8(sample.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let dir = tempfile::tempdir().unwrap();
    // Split in two files whose name order is the archive order; the first gzipped.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all((lines[..5].join("\n") + "\n").as_bytes()).unwrap();
    std::fs::write(dir.path().join("part-0.ndjson.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(dir.path().join("part-1.ndjson"), lines[5..].join("\n") + "\n").unwrap();
    let (ok, from_dir, stderr) = replay(&["--input", dir.path().to_str().unwrap()], None);
    assert!(ok, "{stderr}");
    assert_eq!(from_dir, expected());
    let (ok, from_stdin, stderr) = replay(&["--input", "-"], Some(&sample));
    assert!(ok, "{stderr}");
    assert_eq!(from_stdin, expected());
}

#[test]
fn state_dir_remembers_across_runs_and_dry_run_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap();
    let (ok, _, stderr) = replay(&["--input", "replay/sample.ndjson", "--state-dir", state_arg, "--dry-run"], None);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("milestones emitted:     17"), "{stderr}");
    let (ok, first, stderr) = replay(&["--input", "replay/sample.ndjson", "--state-dir", state_arg], None);
    assert!(ok, "{stderr}");
    assert_eq!(first, expected(), "the dry run must not have written state");
    // --from-start: read every line again (not resume), so the state itself dedupes.
    let (ok, second, stderr) = replay(&["--input", "replay/sample.ndjson", "--state-dir", state_arg, "--from-start"], None);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("records read:           12"), "{stderr}");
    assert_eq!(second, "", "a second replay against the same state must emit nothing");
    assert!(stderr.contains("milestones emitted:     0"), "{stderr}");
}

#[test]
fn usage_errors_exit_2_and_say_what_to_do() {
    let out = Command::new(waymark_bin()).args(["replay"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(waymark_bin()).args(["replay", "--input", "/nonexistent/archive"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read archive /nonexistent/archive"));
}

#[test]
fn state_moves_between_machines_with_export_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let export = dir.path().join("state.ndjson");
    let (ok, first, stderr) = replay(&["--input", "replay/sample.ndjson", "--state-dir", a.to_str().unwrap()], None);
    assert!(ok && !first.is_empty(), "{stderr}");
    let run = |args: &[&str]| {
        let out = Command::new(waymark_bin()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["state", "export", "--state-dir", a.to_str().unwrap(), "--output", export.to_str().unwrap()]);
    assert!(std::fs::read_to_string(&export).unwrap().lines().count() > 17);
    run(&["state", "import", "--state-dir", b.to_str().unwrap(), "--input", export.to_str().unwrap()]);
    let stats = run(&["state", "stats", "--state-dir", b.to_str().unwrap()]);
    assert!(stats.contains("shipments"), "{stats}");
    let (ok, second, stderr) = replay(&["--input", "replay/sample.ndjson", "--state-dir", b.to_str().unwrap(), "--from-start"], None);
    assert!(ok, "{stderr}");
    assert_eq!(second, "", "imported state must dedupe the same archive");
    assert!(stats.contains("layout: v2 home topic=waymark-repartition partitions=16"), "{stats}");
    // Dropping the state of every home partition makes the archive new again
    // (state lives in the shipments' homes, not in the archive's partition).
    for home in 0..16 {
        let home = home.to_string();
        run(&["state", "drop", "--local-only", "--state-dir", b.to_str().unwrap(), "--topic", "waymark-repartition", "--partition", &home]);
    }
    let (ok, third, stderr) = replay(&["--input", "replay/sample.ndjson", "--state-dir", b.to_str().unwrap(), "--from-start"], None);
    assert!(ok, "{stderr}");
    assert_eq!(third, first);
}

#[test]
fn an_archive_meets_state_in_its_shipments_homes_whatever_its_partition_fields_say() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (ok, first, stderr) = replay(&["--input", "replay/sample.ndjson", "--state-dir", state.to_str().unwrap()], None);
    assert!(ok, "{stderr}");
    assert_eq!(first, expected());
    // The same records as another producer partitioned them (and on another topic
    // of the same carrier): every one of them is already known.
    let moved: String = std::fs::read_to_string(repo().join("replay/sample.ndjson"))
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let mut record: serde_json::Value = serde_json::from_str(line).unwrap();
            record["partition"] = serde_json::json!(3 + i % 5);
            record["topic"] = serde_json::json!("tracking.raw.easypost-v2");
            if let Some(headers) = record["headers"].as_array_mut() {
                headers.extend([serde_json::json!("carrier"), serde_json::json!("easypost")]);
            }
            record.to_string() + "\n"
        })
        .collect();
    let (ok, second, stderr) = replay(&["--input", "-", "--state-dir", state.to_str().unwrap()], Some(moved.as_bytes()));
    assert!(ok, "{stderr}");
    assert_eq!(second, "", "records on other partitions must meet the state in their shipments' homes");
    assert!(stderr.contains("milestones emitted:     0"), "{stderr}");
}

#[test]
fn a_state_directory_of_another_partition_count_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (ok, _, stderr) = replay(&["--input", "replay/sample.ndjson", "--state-dir", state.to_str().unwrap()], None);
    assert!(ok, "{stderr}");
    let config = dir.path().join("waymark.toml");
    std::fs::write(&config, "[routing]\npartitions = 8\n").unwrap();
    let out = Command::new(waymark_bin())
        .args(["replay", "--config", config.to_str().unwrap(), "--input", "replay/sample.ndjson", "--state-dir", state.to_str().unwrap()])
        .current_dir(repo())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("partitions=16") && stderr.contains("partitions=8") && stderr.contains("new kafka.group_id"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing may be emitted against state of another layout");
}

#[test]
fn the_summary_is_also_a_json_report_for_real_and_dry_runs() {
    let dir = tempfile::tempdir().unwrap();
    for dry in [true, false] {
        let report = dir.path().join(format!("report-{dry}.json"));
        let state = dir.path().join(format!("state-{dry}"));
        let mut args = vec!["--input", "replay/sample.ndjson", "--report", report.to_str().unwrap(), "--state-dir", state.to_str().unwrap()];
        if dry {
            args.push("--dry-run");
        }
        let (ok, _, stderr) = replay(&args, None);
        assert!(ok, "{stderr}");
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let summary = &json["summary"];
        assert_eq!(json["dry_run"], dry);
        assert_eq!(summary["records"], 12);
        assert_eq!(summary["events"], 49);
        assert_eq!(summary["new_milestones"], 17);
        assert_eq!(summary["invalid_by_kind"]["invalid_json"], 1);
        assert_eq!(summary["by_tenant"]["acme"]["new_milestones"].as_u64().unwrap() + summary["by_tenant"]["globex"]["new_milestones"].as_u64().unwrap(), 17);
        assert_eq!(summary["by_carrier"]["easypost"]["events"], 49);
        let per_status: u64 = summary["milestones_by_status"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
        assert_eq!(per_status, 17);
        assert!(summary["first_event_at"].as_str().unwrap() < summary["last_event_at"].as_str().unwrap());
    }
}

#[test]
fn an_interrupted_replay_resumes_where_it_stopped_and_never_emits_twice() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // The scenario corpus in one archive: over 2,000 lines, three batches of 1,000.
    let names = crate::scenarios::scenario_archives();
    let archive = dir.path().join("corpus.ndjson");
    let text: String = names.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
    std::fs::write(&archive, &text).unwrap();
    let args = ["replay", "--input", archive.to_str().unwrap(), "--state-dir", state.to_str().unwrap()];
    // Uninterrupted, in a state of its own: the whole timeline.
    let whole = Command::new(waymark_bin())
        .args(["replay", "--input", archive.to_str().unwrap(), "--state-dir", dir.path().join("other").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(whole.status.success());
    let whole = String::from_utf8(whole.stdout).unwrap();
    // Killed (like kill -9) right after the second batch's state is written.
    let first = Command::new(waymark_bin()).args(args).env("WAYMARK_FAILPOINT", "after_state:2").output().unwrap();
    assert!(!first.status.success(), "the failpoint must stop the first run");
    let second = Command::new(waymark_bin()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    let first = String::from_utf8(first.stdout).unwrap();
    let second = String::from_utf8(second.stdout).unwrap();
    let lines = text.lines().count();
    assert!(lines > 2000 && lines < 3000, "the corpus spans three batches: {lines} lines");
    assert!(
        stderr.contains(&format!("records read:           {}\n", lines - 2000)),
        "the second run must read only what the first did not commit ({} lines): {stderr}",
        lines - 2000
    );
    // A milestone and its revisions share an id: each (id, revision) once.
    let ids = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| {
                let upsert = serde_json::from_str::<serde_json::Value>(l).unwrap();
                format!("{} {}", upsert["milestone_id"].as_str().unwrap(), upsert["revision"].as_u64().unwrap_or(0))
            })
            .collect()
    };
    let mut together = ids(&first);
    together.extend(ids(&second));
    let distinct: std::collections::BTreeSet<_> = together.iter().cloned().collect();
    assert_eq!(distinct.len(), together.len(), "a milestone was emitted by both runs");
    assert_eq!(distinct, ids(&whole).into_iter().collect(), "the two runs together emit the uninterrupted run's milestones");
    println!("checked: replay killed after 2,000 lines resumed at line 2,001: {} + {} milestones, none twice", ids(&first).len(), ids(&second).len());
}

#[test]
fn state_command_errors_say_what_is_actually_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(waymark_bin()).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // A file that is not an export: the file is wrong, not the store.
    let not_export = dir.path().join("not-an-export.ndjson");
    std::fs::write(&not_export, "{\"hello\": 1}\n").unwrap();
    let state = dir.path().join("state");
    let (code, err) = run(&["state", "import", "--state-dir", state.to_str().unwrap(), "--input", not_export.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is not a `waymark state export` file") && !err.contains("delete it"), "{err}");
    // A missing input file leaves no empty state directory behind.
    let typo = dir.path().join("typo-dir");
    let (code, err) = run(&["state", "import", "--state-dir", typo.to_str().unwrap(), "--input", "/nonexistent/export.ndjson"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(!typo.exists(), "a failed import must not create the state directory");
    // A directory locked by another process: the hint names that, and the read-only way.
    let (ok, _, stderr) = replay(&["--input", "replay/sample.ndjson", "--state-dir", state.to_str().unwrap()], None);
    assert!(ok, "{stderr}");
    let mut holder = Command::new(waymark_bin())
        .args(["replay", "--input", "-", "--state-dir", state.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (code, err) = run(&["state", "compact", "--state-dir", state.to_str().unwrap()]);
    drop(holder.stdin.take());
    let _ = holder.wait();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("another process holds it") && err.contains("read-only") && !err.contains("disk is not full"), "{err}");
    // A local-only drop says that the changelog brings the state back.
    let (code, err) = run(&["state", "drop", "--local-only", "--state-dir", state.to_str().unwrap(), "--topic", "waymark-repartition", "--partition", "0"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("restores this partition from waymark-repartition-changelog at the next assignment"), "{err}");
    // Without it, a broker out of reach drops nothing and says what to do.
    let (code, err) = run(&["state", "drop", "--state-dir", state.to_str().unwrap(), "--topic", "waymark-repartition", "--partition", "1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("nothing was dropped") && err.contains("--local-only"), "{err}");
}
