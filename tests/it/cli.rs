//! The binary's own surface: `--version`, completions, the man page, `check`.

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
