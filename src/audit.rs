//! `waymark audit`: the replay test, run against production. What a range of a
//! raw topic should have produced is recomputed through the same pipeline with
//! scratch state (nothing written, no consumer group), and compared with what
//! the output topic holds for that range: milestones missing, extra or
//! repeated, and shipments whose final status differs.
//!
//! What is compared: the output records whose `source` is a raw record of the
//! range (topic, partition, offset), by `milestone_id`. Two things that depend
//! on arrival order are not divergences: which of two copies of one scan
//! within the carrier's skew tolerance became the milestone (the worker's
//! partitions may deliver them in another order than the audit's read), and
//! the `shipment_status` of each upsert on the way (compared per shipment at
//! the end, where it does not depend on order).
//!
//! So that the range's events meet what came before them, as they did in the
//! worker, the recomputation starts the longest dedupe TTL before the range
//! (or at the topic's beginning), and only the range is compared. Exact when
//! the raw topic still holds that history: an event the worker deduped against
//! records the topic no longer holds is new to the scratch state, and is
//! reported missing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::dedupe::DedupeConfig;
use crate::output::MilestoneUpsert;

/// What audit found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditReport {
    pub kind: &'static str,
    pub raw_topic: String,
    pub output_topic: String,
    /// Offsets of the raw topic audited, per partition: `[start, stop)`.
    pub raw_range: BTreeMap<i32, (i64, i64)>,
    pub expected_milestones: usize,
    pub output_milestones: usize,
    /// Expected and not on the output topic.
    pub missing: Vec<Finding>,
    /// On the output topic for the range and not expected.
    pub extra: Vec<Finding>,
    /// On the output topic more than once.
    pub repeated: Vec<Repeat>,
    /// Shipments whose final `shipment_status` differs.
    pub status_differs: Vec<StatusDiff>,
    /// Missing and extra pairs that are one scan's copies within the skew
    /// tolerance (not divergences).
    pub equivalent_copies: usize,
    /// Repeats are allowed (at-least-once output) when byte-identical.
    pub repeats_allowed: bool,
    pub diverges: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub milestone_id: String,
    /// `tenant:carrier:tracking`.
    pub shipment: String,
    pub status: String,
    pub occurred_at: String,
    /// The raw record it came from, `topic:partition:offset`.
    pub source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Repeat {
    pub milestone_id: String,
    pub shipment: String,
    pub times: usize,
    /// All copies byte-identical (then harmless: upserts are idempotent).
    pub identical: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusDiff {
    pub shipment: String,
    pub expected: String,
    pub output: String,
}

/// One record of the output topic.
#[derive(Debug, Clone)]
pub struct OutputRecord {
    pub value: Vec<u8>,
}

fn finding(upsert: &MilestoneUpsert) -> Finding {
    Finding {
        milestone_id: upsert.milestone_id.clone(),
        shipment: shipment_of(upsert),
        status: upsert.status.as_str().into(),
        occurred_at: upsert.occurred_at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        source: format!("{}:{}:{}", upsert.source.topic, upsert.source.partition, upsert.source.offset),
    }
}

/// A milestone's id, and its revision when it is one.
fn revision_key(upsert: &MilestoneUpsert) -> String {
    match upsert.revision {
        0 => upsert.milestone_id.clone(),
        n => format!("{} revision {n}", upsert.milestone_id),
    }
}

fn shipment_of(upsert: &MilestoneUpsert) -> String {
    format!("{}:{}:{}", upsert.tenant_id, upsert.carrier, upsert.tracking_number)
}

/// Same scan told twice within the skew: same shipment, status, code and
/// place, times within the carrier's tolerance.
fn same_scan(a: &MilestoneUpsert, b: &MilestoneUpsert, dedupe: &DedupeConfig) -> bool {
    let skew = dedupe.policy(&a.carrier).skew_ms();
    shipment_of(a) == shipment_of(b)
        && a.shipment_ref == b.shipment_ref
        && a.status == b.status
        && a.carrier_status_code == b.carrier_status_code
        && a.location.eq_ignore_case(&b.location)
        && (a.occurred_at.timestamp_millis() - b.occurred_at.timestamp_millis()).abs() <= skew
}

/// Each partition's first offset at or after `at` (the partition's end when
/// none is), as the broker's time index answers.
pub fn offsets_at(client: &ClientConfig, topic: &str, at: chrono::DateTime<chrono::Utc>) -> Result<BTreeMap<i32, i64>, String> {
    let consumer: BaseConsumer = client.create().map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(30);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(|e| e.to_string())?;
    let partitions: Vec<i32> =
        metadata.topics().first().filter(|t| t.error().is_none()).map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default();
    let mut query = TopicPartitionList::new();
    for p in &partitions {
        query.add_partition_offset(topic, *p, Offset::Offset(at.timestamp_millis())).map_err(|e| e.to_string())?;
    }
    let mut out = BTreeMap::new();
    for element in consumer.offsets_for_times(query, timeout).map_err(|e| e.to_string())?.elements() {
        let offset = match element.offset() {
            Offset::Offset(o) => o,
            _ => consumer.fetch_watermarks(topic, element.partition(), timeout).map_err(|e| e.to_string())?.1,
        };
        out.insert(element.partition(), offset);
    }
    Ok(out)
}

/// Compare what the range should have produced (`expected`, in order) with the
/// output topic's records (`output`, in order). Only milestones whose source is
/// in `raw_range` count, on both sides: the replay may have read earlier
/// history too, so that the range's events meet what came before them.
pub fn compare(
    raw_topic: &str,
    output_topic: &str,
    raw_range: BTreeMap<i32, (i64, i64)>,
    expected: &[MilestoneUpsert],
    output: &[OutputRecord],
    dedupe: &DedupeConfig,
    repeats_allowed: bool,
) -> AuditReport {
    let in_range = |u: &MilestoneUpsert| {
        u.source.topic == raw_topic && raw_range.get(&u.source.partition).is_some_and(|(start, stop)| (*start..*stop).contains(&u.source.offset))
    };
    // The output's upserts of the range, by milestone id, in order.
    let mut seen: BTreeMap<String, (MilestoneUpsert, Vec<Vec<u8>>)> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    // Shipments an operator corrected: their statuses follow the retractions,
    // which come from the control topic the recomputation does not read.
    let mut corrected: BTreeSet<String> = BTreeSet::new();
    for record in output {
        let Ok(upsert) = serde_json::from_slice::<MilestoneUpsert>(&record.value) else { continue };
        if upsert.retraction.is_some() {
            corrected.insert(shipment_of(&upsert));
            continue;
        }
        if !in_range(&upsert) {
            continue;
        }
        // A revision shares its milestone's id: each revision is its own upsert.
        let id = revision_key(&upsert);
        let entry = seen.entry(id.clone()).or_insert_with(|| {
            order.push(id.clone());
            (upsert, Vec::new())
        });
        entry.1.push(record.value.clone());
    }
    let expected: Vec<MilestoneUpsert> = expected.iter().filter(|u| in_range(u)).cloned().collect();
    let expected = expected.as_slice();
    let expected_ids: BTreeSet<String> = expected.iter().map(revision_key).collect();
    let mut missing: Vec<&MilestoneUpsert> = expected.iter().filter(|u| !seen.contains_key(&revision_key(u))).collect();
    let mut extra: Vec<&MilestoneUpsert> = order.iter().map(|id| &seen[id].0).filter(|u| !expected_ids.contains(&revision_key(u))).collect();
    // Pair a missing milestone with an extra copy of the same scan.
    let mut equivalent_copies = 0;
    missing.retain(|m| match extra.iter().position(|x| same_scan(m, x, dedupe)) {
        Some(i) => {
            extra.remove(i);
            equivalent_copies += 1;
            false
        }
        None => true,
    });
    let repeated: Vec<Repeat> = order
        .iter()
        .filter_map(|id| {
            let (upsert, copies) = &seen[id];
            (copies.len() > 1).then(|| Repeat {
                milestone_id: id.clone(),
                shipment: shipment_of(upsert),
                times: copies.len(),
                identical: copies.windows(2).all(|w| w[0] == w[1]),
            })
        })
        .collect();
    // Final status per shipment: the last upsert's, in each one's order.
    let last_status = |upserts: &mut dyn Iterator<Item = &MilestoneUpsert>| {
        let mut last = BTreeMap::new();
        for u in upserts {
            last.insert(shipment_of(u), u.shipment_status.as_str().to_string());
        }
        last
    };
    let expected_final = last_status(&mut expected.iter());
    let output_final = last_status(&mut order.iter().map(|id| &seen[id].0));
    let status_differs: Vec<StatusDiff> = expected_final
        .iter()
        .filter(|(shipment, _)| !corrected.contains(*shipment))
        .filter_map(|(shipment, status)| {
            let out = output_final.get(shipment)?;
            (out != status).then(|| StatusDiff { shipment: shipment.clone(), expected: status.clone(), output: out.clone() })
        })
        .collect();
    let diverges = !missing.is_empty()
        || !extra.is_empty()
        || !status_differs.is_empty()
        || repeated.iter().any(|r| !r.identical || !repeats_allowed);
    AuditReport {
        kind: "audit_report",
        raw_topic: raw_topic.into(),
        output_topic: output_topic.into(),
        raw_range,
        expected_milestones: expected.len(),
        output_milestones: seen.len(),
        missing: missing.into_iter().map(finding).collect(),
        extra: extra.into_iter().map(finding).collect(),
        repeated,
        status_differs,
        equivalent_copies,
        repeats_allowed,
        diverges,
    }
}

/// Every record of `topic` up to each partition's end when reading starts, as
/// a `read_committed` reader sees it (no consumer group, nothing committed).
/// Fails after `stall` without a record while a partition is unfinished.
pub fn read_topic(client: &ClientConfig, topic: &str, stall: Duration) -> Result<Vec<OutputRecord>, String> {
    let mut client = client.clone();
    client
        .set("group.id", format!("waymark-audit-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = client.create().map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(30);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(|e| e.to_string())?;
    let partitions: Vec<i32> =
        metadata.topics().first().filter(|t| t.error().is_none()).map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default();
    if partitions.is_empty() {
        return Err(format!("no topic `{topic}`"));
    }
    let mut assignment = TopicPartitionList::new();
    let mut end: BTreeMap<i32, i64> = BTreeMap::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout).map_err(|e| e.to_string())?;
        if low < high {
            assignment.add_partition_offset(topic, p, Offset::Offset(low)).map_err(|e| e.to_string())?;
            end.insert(p, high);
        }
    }
    let mut records = Vec::new();
    if end.is_empty() {
        return Ok(records);
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut idle = Instant::now();
    while !end.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                idle = Instant::now();
                if let Some(stop) = end.get(&m.partition()).copied() {
                    if m.offset() < stop {
                        records.push(OutputRecord { value: m.payload().unwrap_or_default().to_vec() });
                    }
                    if m.offset() + 1 >= stop {
                        end.remove(&m.partition());
                    }
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, %topic, "reading the output topic; retrying"),
            None => {
                // Transaction markers and aborted records end a range without a record.
                if let Ok(position) = consumer.position() {
                    for element in position.elements() {
                        if let Offset::Offset(next) = element.offset() {
                            if end.get(&element.partition()).is_some_and(|stop| next >= *stop) {
                                end.remove(&element.partition());
                            }
                        }
                    }
                }
                if idle.elapsed() > stall {
                    let waiting: Vec<String> = end.keys().map(|p| p.to_string()).collect();
                    return Err(format!(
                        "no record of `{topic}` for {} s while partitions {} were unfinished: the broker may be unreachable; run the audit again",
                        stall.as_secs(),
                        waiting.join(", ")
                    ));
                }
            }
        }
    }
    Ok(records)
}

/// The report for people.
pub fn render(report: &AuditReport) -> String {
    let mut out = format!(
        "audit of {} against {}: {} milestones expected, {} on the output topic for the range\n",
        report.raw_topic, report.output_topic, report.expected_milestones, report.output_milestones
    );
    let list = |out: &mut String, title: &str, findings: &[Finding]| {
        if findings.is_empty() {
            return;
        }
        out.push_str(&format!("{title}: {}\n", findings.len()));
        for f in findings.iter().take(20) {
            out.push_str(&format!("  {} {} {} at {} (from {})\n", f.milestone_id, f.shipment, f.status, f.occurred_at, f.source));
        }
        if findings.len() > 20 {
            out.push_str(&format!("  ... {} more in the JSON report\n", findings.len() - 20));
        }
    };
    list(&mut out, "missing", &report.missing);
    list(&mut out, "extra", &report.extra);
    if !report.repeated.is_empty() {
        let different = report.repeated.iter().filter(|r| !r.identical).count();
        out.push_str(&format!("repeated: {} milestones ({different} with copies that differ)\n", report.repeated.len()));
        for r in report.repeated.iter().take(20) {
            out.push_str(&format!("  {} {} x{}{}\n", r.milestone_id, r.shipment, r.times, if r.identical { "" } else { " (copies differ)" }));
        }
    }
    if !report.status_differs.is_empty() {
        out.push_str(&format!("final status differs: {}\n", report.status_differs.len()));
        for d in report.status_differs.iter().take(20) {
            out.push_str(&format!("  {}: expected {}, output {}\n", d.shipment, d.expected, d.output));
        }
    }
    if report.equivalent_copies > 0 {
        out.push_str(&format!("(not divergences: {} scans whose other copy within the skew became the milestone)\n", report.equivalent_copies));
    }
    out.push_str(if report.diverges { "DIVERGES\n" } else { "matches\n" });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::process;
    use crate::envelope::Envelope;
    use crate::pipeline::Pipeline;
    use crate::state::MemoryStore;
    use chrono::TimeZone;

    fn sample_upserts() -> Vec<MilestoneUpsert> {
        let text = include_str!("../replay/sample.ndjson");
        let envelopes: Vec<Envelope> = text.lines().filter(|l| !l.trim().is_empty()).map(|l| Envelope::from_kcat_json(l).unwrap()).collect();
        let now = chrono::Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        process(&Pipeline::default(), &MemoryStore::default(), &envelopes, now, false, None).unwrap().upserts
    }

    fn records(upserts: &[MilestoneUpsert]) -> Vec<OutputRecord> {
        upserts.iter().map(|u| OutputRecord { value: serde_json::to_vec(u).unwrap() }).collect()
    }

    fn range() -> BTreeMap<i32, (i64, i64)> {
        BTreeMap::from([(0, (0, 2000))])
    }

    #[test]
    fn an_untouched_output_matches_and_a_tampered_one_diverges() {
        let expected = sample_upserts();
        let dedupe = DedupeConfig::default();
        let same = compare("tracking.raw.easypost", "out", range(), &expected, &records(&expected), &dedupe, false);
        assert!(!same.diverges, "{}", render(&same));

        // One milestone removed, one duplicated by hand.
        let mut tampered = expected.clone();
        let removed = tampered.remove(3);
        tampered.push(tampered[0].clone());
        let report = compare("tracking.raw.easypost", "out", range(), &expected, &records(&tampered), &dedupe, false);
        assert!(report.diverges);
        assert_eq!(report.missing.iter().map(|f| f.milestone_id.as_str()).collect::<Vec<_>>(), [removed.milestone_id.as_str()]);
        assert_eq!(report.repeated.len(), 1);
        assert!(report.repeated[0].identical);
        // Identical repeats are what at-least-once output may hold.
        let mut duplicated_only = expected.clone();
        duplicated_only.push(expected[1].clone());
        let report = compare("tracking.raw.easypost", "out", range(), &expected, &records(&duplicated_only), &dedupe, true);
        assert!(!report.diverges, "{}", render(&report));

        // Output records of other sources are not the range's business.
        let mut elsewhere = expected[0].clone();
        elsewhere.source.topic = "tracking.raw.ups".into();
        elsewhere.milestone_id = "f".repeat(64);
        let mut with_other = expected.clone();
        with_other.push(elsewhere);
        assert!(!compare("tracking.raw.easypost", "out", range(), &expected, &records(&with_other), &dedupe, false).diverges);
    }

    /// Only the audited range counts, on both sides: history read before it (so
    /// its events meet what came before them) is not expected on the output.
    #[test]
    fn only_the_range_is_compared() {
        let expected = sample_upserts();
        let cut = expected[expected.len() / 2].source.offset;
        let later: Vec<MilestoneUpsert> = expected.iter().filter(|u| u.source.offset >= cut).cloned().collect();
        let range = BTreeMap::from([(0, (cut, 2000))]);
        let report = compare("tracking.raw.easypost", "out", range.clone(), &expected, &records(&later), &DedupeConfig::default(), false);
        assert!(!report.diverges, "{}", render(&report));
        assert_eq!(report.expected_milestones, later.len());
        let report = compare("tracking.raw.easypost", "out", range, &expected, &records(&later[1..]), &DedupeConfig::default(), false);
        assert_eq!(report.missing.len(), 1);
    }

    /// The other copy of one scan, within the skew, is not a divergence.
    #[test]
    fn the_other_copy_of_a_skewed_scan_is_equivalent() {
        let expected = sample_upserts();
        let mut output = expected.clone();
        output[2].occurred_at += chrono::Duration::seconds(1);
        output[2].milestone_id = "e".repeat(64);
        let report = compare("tracking.raw.easypost", "out", range(), &expected, &records(&output), &DedupeConfig::default(), false);
        assert!(!report.diverges, "{}", render(&report));
        assert_eq!(report.equivalent_copies, 1);
        output[2].occurred_at += chrono::Duration::seconds(10);
        let report = compare("tracking.raw.easypost", "out", range(), &expected, &records(&output), &DedupeConfig::default(), false);
        assert!(report.diverges, "10 s off is another scan");
    }
}
