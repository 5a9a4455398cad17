//! The scenario corpus (replay/scenarios/): realistic streams, each with its
//! expected timeline. Every `<name>.ndjson` is replayed and its upserts compared
//! with `<name>.expected.ndjson` byte for byte; `WAYMARK_BLESS=1` rewrites the
//! expected files (review the diff). Independently of the blessed files, each
//! timeline must have one upsert per milestone id and no shipment status moving
//! backwards. Adding a scenario is adding its two files (scripts/gen-scenarios.py
//! writes the shipped ones).

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use crate::common::{repo, waymark_bin};

/// The scenario archives (not their expected timelines), in name order.
pub fn scenario_archives() -> Vec<std::path::PathBuf> {
    let mut archives: Vec<_> = std::fs::read_dir(repo().join("replay/scenarios"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".ndjson") && !p.to_string_lossy().ends_with(".expected.ndjson"))
        .collect();
    archives.sort();
    archives
}

#[test]
fn every_scenario_replays_to_its_expected_timeline() {
    let dir = repo().join("replay/scenarios");
    let archives = scenario_archives();
    assert!(archives.len() >= 5, "the corpus has {} scenarios", archives.len());
    let bless = std::env::var("WAYMARK_BLESS").as_deref() == Ok("1");
    for archive in archives {
        let name = archive.file_name().unwrap().to_string_lossy().trim_end_matches(".ndjson").to_string();
        let mut replay = Command::new(waymark_bin());
        replay.args(["replay", "--input"]).arg(&archive);
        // A scenario that needs settings (a control topic) has them beside it.
        let config = dir.join(format!("{name}.toml"));
        if config.exists() {
            replay.arg("--config").arg(&config);
        }
        let out = replay.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        let timeline = String::from_utf8(out.stdout).unwrap();
        let upserts: Vec<serde_json::Value> = timeline.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        // One upsert per milestone and revision (a correction shares its
        // milestone's id), and at most one retraction of each.
        let ids: BTreeSet<(&str, u64, &str)> =
            upserts.iter().map(|u| (u["milestone_id"].as_str().unwrap(), u["revision"].as_u64().unwrap_or(0), u["kind"].as_str().unwrap())).collect();
        assert_eq!(ids.len(), upserts.len(), "{name}: a milestone was emitted twice");
        let rank = |s: &str| waymark::Status::parse(s).unwrap().rank();
        let mut reached: HashMap<String, u8> = HashMap::new();
        for u in &upserts {
            // Per generation: a reused number's new parcel starts afresh.
            let shipment = format!("{}:{}:{}#{}", u["tenant_id"], u["carrier"], u["tracking_number"], u["generation"].as_u64().unwrap_or(0));
            let r = rank(u["shipment_status"].as_str().unwrap());
            let previous = reached.insert(shipment.clone(), r).unwrap_or(0);
            // Only an operator's retraction may move a status back.
            assert!(r >= previous || u["kind"] == "retract_milestone", "{name}: {shipment} moved back at {u}");
        }
        let expected_path = dir.join(format!("{name}.expected.ndjson"));
        if bless {
            std::fs::write(&expected_path, &timeline).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{name}: no expected timeline ({e}); bless it with WAYMARK_BLESS=1 and review it"));
        assert!(timeline == expected, "{name}: the timeline differs from {}", expected_path.display());
        let summary = stderr.lines().filter(|l| l.contains("milestones emitted") || l.contains("duplicates")).collect::<Vec<_>>().join("; ");
        println!("checked scenario {name}: {} milestones, {} shipments; {summary}", upserts.len(), reached.len());
    }
}

/// `corrected-description`: each shipment's first scan corrected once. The
/// correction is one revision of the same milestone (same id, revision 1, the
/// corrected text), re-sending it is a duplicate, and a late copy of the
/// uncorrected history does not undo it.
#[test]
fn a_correction_is_one_revision_that_a_late_copy_does_not_undo() {
    let archive = repo().join("replay/scenarios/corrected-description.ndjson");
    let out = Command::new(waymark_bin()).args(["replay", "--input"]).arg(&archive).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let upserts: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let firsts: HashMap<&str, &serde_json::Value> = upserts.iter().filter(|u| u.get("revision").is_none()).map(|u| (u["milestone_id"].as_str().unwrap(), u)).collect();
    let revisions: Vec<&serde_json::Value> = upserts.iter().filter(|u| u.get("revision").is_some()).collect();
    assert_eq!(revisions.len(), 20, "one correction per shipment");
    for revision in revisions {
        assert_eq!(revision["revision"], 1, "{revision}");
        let id = revision["milestone_id"].as_str().unwrap();
        let first = firsts.get(id).expect("a revision of a milestone emitted before");
        assert_eq!(revision["occurred_at"], first["occurred_at"]);
        assert!(revision["description"].as_str().unwrap().ends_with("(corrected by the carrier)"), "{revision}");
        assert!(!first["description"].as_str().unwrap().contains("corrected"));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("revisions emitted:      20"), "{stderr}");
}

/// `reused-tracking-number`: each number reused 90 days after its delivery.
/// The new parcel is generation 1 (its own milestone ids, its status from the
/// start again), the old parcel's history replayed later is all duplicates and
/// begins nothing, and a label re-printed 10 days after delivery (within the
/// gap) stays with the delivered parcel.
#[test]
fn a_reused_number_is_a_new_generation_and_an_old_replay_is_not() {
    let archive = repo().join("replay/scenarios/reused-tracking-number.ndjson");
    let out = Command::new(waymark_bin()).args(["replay", "--input"]).arg(&archive).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let upserts: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut per_shipment: HashMap<String, Vec<&serde_json::Value>> = HashMap::new();
    for u in &upserts {
        per_shipment.entry(u["tracking_number"].as_str().unwrap().to_string()).or_default().push(u);
    }
    assert_eq!(per_shipment.len(), 12);
    for (tracking, upserts) in per_shipment {
        let generations: BTreeSet<u64> = upserts.iter().map(|u| u["generation"].as_u64().unwrap_or(0)).collect();
        assert_eq!(generations, BTreeSet::from([0, 1]), "{tracking}: two parcels, no third");
        let second: Vec<&&serde_json::Value> = upserts.iter().filter(|u| u["generation"] == 1).collect();
        assert_eq!(second[0]["status"], "label_created", "{tracking}: the new parcel begins with its label");
        assert_eq!(second[0]["shipment_status"], "label_created", "{tracking}: its status starts afresh");
        assert_eq!(second.last().unwrap()["shipment_status"], "delivered");
        // Generation 1's ids are not generation 0's.
        let first_ids: BTreeSet<&str> = upserts.iter().filter(|u| u.get("generation").is_none()).map(|u| u["milestone_id"].as_str().unwrap()).collect();
        assert!(second.iter().all(|u| !first_ids.contains(u["milestone_id"].as_str().unwrap())));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("duplicates (hash):"), "{stderr}");
}

/// `false-delivery-retracted`: a mis-scanned delivery, a later in-transit scan
/// (the status stays delivered), then, for two shipments of three, the
/// operator's retraction: the status goes back to out_for_delivery, the
/// furthest the remaining scans reached (the latest of them in transit), the
/// same correction sent twice retracts once, and the real delivery
/// the next day is a new milestone that moves the status to delivered again.
/// The third shipment, never corrected, keeps its false delivered.
#[test]
fn a_retraction_restores_the_status_and_the_real_delivery_follows() {
    let dir = repo().join("replay/scenarios");
    let out = Command::new(waymark_bin())
        .args(["replay", "--input"])
        .arg(dir.join("false-delivery-retracted.ndjson"))
        .arg("--config")
        .arg(dir.join("false-delivery-retracted.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let upserts: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut shipments: Vec<&str> = upserts.iter().map(|u| u["tracking_number"].as_str().unwrap()).collect();
    shipments.dedup();
    assert_eq!(shipments.len(), 9);
    for (i, tracking) in shipments.iter().enumerate() {
        let timeline: Vec<&serde_json::Value> = upserts.iter().filter(|u| u["tracking_number"] == *tracking).collect();
        let false_delivery = timeline.iter().find(|u| u["description"].as_str().is_some_and(|d| d.contains("wrong address"))).expect("the false delivered");
        let retractions: Vec<&&serde_json::Value> = timeline.iter().filter(|u| u["kind"] == "retract_milestone").collect();
        let last = timeline.last().unwrap();
        assert_eq!(last["status"], "delivered", "{tracking}: the real delivery comes last");
        assert_eq!(last["shipment_status"], "delivered");
        if i % 3 == 2 {
            assert!(retractions.is_empty(), "{tracking} was never corrected");
            continue;
        }
        assert_eq!(retractions.len(), 1, "{tracking}: one retraction, however often the correction was sent");
        let retraction = retractions[0];
        assert_eq!(retraction["milestone_id"], false_delivery["milestone_id"]);
        assert_eq!(retraction["shipment_status"], "out_for_delivery", "{tracking}: back where the remaining scans leave it");
        assert_eq!(retraction["latest_status"], "in_transit", "{tracking}: the latest remaining scan");
        assert_eq!(retraction["retraction"]["requested_by"], "ops@acme");
        let after: Vec<&&serde_json::Value> = timeline.iter().skip_while(|u| u["kind"] != "retract_milestone").skip(1).collect();
        assert_eq!(after.len(), 1, "{tracking}: only the real delivery follows (the false scan in its history stays retracted)");
    }
}
