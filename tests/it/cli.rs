//! The binary's own surface: `--version`, completions, the man page, `check`,
//! the `WAYMARK_*` variables, a closed stdout.

use std::process::Command;

use crate::common::waymark_bin;

fn waymark(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(waymark_bin()).args(args).envs(envs.iter().copied()).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn version_names_the_commit_and_the_codecs() {
    let (code, out, _) = waymark(&["--version"], &[]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with(&format!("waymark {}", env!("CARGO_PKG_VERSION"))), "{out}");
    assert!(out.contains("commit ") && out.contains("zstd"), "{out}");
}

#[test]
fn completions_and_man_page_come_from_the_command_definitions() {
    let (code, bash, _) = waymark(&["completions", "bash"], &[]);
    assert_eq!(code, Some(0));
    assert!(bash.contains("waymark") && bash.contains("replay") && bash.contains("--state-dir"), "{bash}");
    let (code, man, _) = waymark(&["man"], &[]);
    assert_eq!(code, Some(0));
    assert!(man.starts_with(".ie") || man.contains(".TH waymark"), "{}", &man[..man.len().min(200)]);
}

#[test]
fn check_names_a_bad_property_or_setting_with_exit_2_and_never_its_value() {
    let (code, out, err) = waymark(&["check"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("configuration ok"), "{out}");
    let (code, _, err) = waymark(&["check"], &[("WAYMARK_KAFKA__SASL_PASWORD", "hunter2-c0ffee")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("sasl.pasword") && !err.contains("hunter2-c0ffee"), "{err}");
    let (code, _, err) = waymark(&["check"], &[("WAYMARK_WORKER__BATCH_SIZE", "lots")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("WAYMARK_WORKER__BATCH_SIZE"), "{err}");
    let (code, _, err) = waymark(&["check"], &[("WAYMARK_KAFKA__ENABLE_AUTO_COMMIT", "true")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("enable.auto.commit") && err.contains("remove it"), "{err}");
}

/// `replay --input F --since/--until` replayed the whole
/// archive (and with --state-dir committed it to state). Options that do not
/// apply to a source are refused with exit 2 and the reason.
/// Every command that creates a Kafka client checks the properties first: a
/// misspelled secret property exits 2 naming it, and its value (librdkafka's own
/// message would quote it) is never printed.
#[test]
fn commands_that_talk_to_kafka_never_echo_a_property_value() {
    let secret = ("WAYMARK_KAFKA__SASL_PASWORD", "hunter2-c0ffee");
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    // A state directory for `state drop` to lock (the lock comes before the config).
    let (code, _, err) = waymark(&["replay", "--input", "/dev/null", "--state-dir", state_dir], &[]);
    assert_eq!(code, Some(0), "{err}");
    let commands: [&[&str]; 4] = [
        &["produce", "--input", "/dev/null", "--topic", "t"],
        &["replay", "--from-topic", "t"],
        &["replay", "--input", "/dev/null", "--to-topic", "t"],
        &["state", "drop", "--state-dir", state_dir, "--topic", "waymark-repartition", "--partition", "0"],
    ];
    for args in commands {
        let (code, out, err) = waymark(args, &[secret]);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains("sasl.pasword"), "{args:?} names the property: {err}");
        assert!(!err.contains(secret.1) && !out.contains(secret.1), "{args:?} echoed the value: {err}");
    }
}

#[test]
fn replay_refuses_a_time_range_for_an_archive() {
    let archive = crate::common::repo().join("replay/sample.ndjson");
    let archive = archive.to_str().unwrap();
    for range in [["--since", "2030-01-01T00:00:00Z"], ["--until", "2030-01-02T00:00:00Z"]] {
        let (code, out, err) = waymark(&["replay", "--input", archive, range[0], range[1]], &[]);
        assert_eq!(code, Some(2), "{range:?}: {err}");
        assert!(out.is_empty(), "nothing may be replayed: {out}");
        assert!(err.contains("--from-topic"), "the error must say what the option is for: {err}");
    }
    let (code, out, err) = waymark(&["replay", "--since", "2030-01-01T00:00:00Z"], &[]);
    assert_eq!(code, Some(2), "without --input (stdin): {err}");
    assert!(out.is_empty());
}

/// One rule for the variables, in every command: the short names are the
/// settings' aliases (`check` sees what `run` would), a misspelled name exits 2
/// naming it, and the two names of one setting may not disagree.
#[test]
fn variables_follow_one_rule_and_a_misspelled_one_exits_2() {
    let (code, out, err) = waymark(&["check"], &[("WAYMARK_INPUT_TOPICS", "a,b,c"), ("WAYMARK_DELIVERY", "exactly-once")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("3 input topic(s), delivery exactly-once"), "{out}");
    // A value `run` refuses, `check` refuses too.
    let (code, _, err) = waymark(&["check"], &[("WAYMARK_DELIVERY", "exactly_once")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("exactly_once"), "{err}");
    let (code, _, err) = waymark(&["check"], &[("WAYMARK_BROKER", "10.0.0.1:9092")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("WAYMARK_BROKER:") && err.contains("not a Waymark setting"), "{err}");
    let (code, _, err) = waymark(&["check"], &[("WAYMARK_WORKER_BATCH_SIZE", "5")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("did you mean WAYMARK_WORKER__BATCH_SIZE?"), "{err}");
    let (code, _, err) = waymark(&["check"], &[("WAYMARK_BROKERS", "a:1"), ("WAYMARK_KAFKA__BROKERS", "b:2")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("WAYMARK_BROKERS") && err.contains("WAYMARK_KAFKA__BROKERS") && err.contains("different values"), "{err}");
    let (code, _, err) = waymark(&["check"], &[("WAYMARK_BROKERS", "a:1"), ("WAYMARK_KAFKA__BROKERS", "a:1")]);
    assert_eq!(code, Some(0), "the same value under both names is fine: {err}");
    // The scripts' and tests' own variables are not settings, and not errors.
    let (code, _, err) = waymark(&["check"], &[("WAYMARK_KAFKA_PORT", "19092"), ("WAYMARK_TEST_BROKERS", "127.0.0.1:19092")]);
    assert_eq!(code, Some(0), "{err}");
    // A log filter that does not parse is an error, not a silent `info`.
    let (code, _, err) = waymark(&["check"], &[("WAYMARK_LOG", "info,[")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("WAYMARK_LOG"), "{err}");
}

/// The state subcommands find the directory in the configuration file (or
/// `WAYMARK_STATE_DIR`) when `--state-dir` is not given, as `run` does.
#[test]
fn state_commands_take_the_directory_from_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (code, _, err) = waymark(&["replay", "--input", "/dev/null", "--state-dir", state.to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{err}");
    let config = dir.path().join("waymark.toml");
    std::fs::write(&config, format!("[state]\ndir = \"{}\"\n", state.display())).unwrap();
    let (code, out, err) = waymark(&["state", "stats", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("keyspace"), "{out}");
    let (code, out, err) = waymark(&["state", "stats"], &[("WAYMARK_STATE_DIR", state.to_str().unwrap())]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("keyspace"), "{out}");
    // A drop of a partition that can own no state says so instead of succeeding.
    let (code, _, err) = waymark(
        &["state", "drop", "--config", config.to_str().unwrap(), "--topic", "tracking.raw.easypost", "--partition", "0", "--local-only"],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("owns no state") && err.contains("waymark-repartition"), "{err}");
    // A failed import into a new directory leaves no directory behind.
    let garbage = dir.path().join("garbage.ndjson");
    std::fs::write(&garbage, "not an export\n").unwrap();
    let fresh = dir.path().join("fresh");
    let (code, _, err) = waymark(&["state", "import", "--state-dir", fresh.to_str().unwrap(), "--input", garbage.to_str().unwrap()], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(!fresh.exists(), "the failed import left {} behind", fresh.display());
}

/// A reader that is gone before the output is written (`waymark man | head`)
/// ends the command quietly: exit 0, nothing on stderr, no panic.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let sample = crate::common::repo().join("replay/sample.ndjson");
    let commands: [&[&str]; 3] = [&["completions", "bash"], &["man"], &["replay", "--input", sample.to_str().unwrap()]];
    for args in commands {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(waymark_bin()).args(args).stdout(writer).stderr(std::process::Stdio::piped()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked") && !err.contains("error"), "{args:?}: {err}");
    }
}

/// With JSON logs, the line that says why a command stopped is JSON too.
#[test]
fn the_fatal_line_is_json_when_logs_are() {
    let (code, _, err) = waymark(&["check"], &[("WAYMARK_LOG_FORMAT", "json"), ("WAYMARK_WORKER__BATCH_SIZE", "lots")]);
    assert_eq!(code, Some(2), "{err}");
    let last = err.lines().last().unwrap_or_default();
    let line: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}"));
    assert_eq!(line["level"], "ERROR");
    assert_eq!(line["fields"]["exit_code"], 2);
    assert!(line["fields"]["error"].as_str().unwrap_or_default().contains("WAYMARK_WORKER__BATCH_SIZE"), "{line}");
}
