//! `waymark produce`: a kcat -J archive back on Kafka (keys, headers, non-UTF-8
//! bodies, gzip on stdin), and dead letters re-driven as their original records.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use waymark::Envelope;

use crate::common::*;

/// Every record of a one-partition topic, raw.
fn read_raw(topic: &str, expected: usize) -> Vec<Envelope> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("raw-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let started = Instant::now();
    while out.len() < expected && started.elapsed() < Duration::from_secs(60) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
                .unwrap_or_default();
            out.push(Envelope {
                topic: topic.to_string(),
                partition: 0,
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
                headers,
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
            });
        }
    }
    out
}

fn produce_cmd(args: &[&str], stdin: &[u8]) -> (bool, String) {
    let mut child = Command::new(waymark_bin())
        .arg("produce")
        .args(["--brokers", &brokers()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn an_archive_goes_back_on_kafka_with_keys_headers_and_non_utf8_bodies() {
    let topic = unique("it.produce.roundtrip");
    create_topics(&[&topic], 1);
    let mut records = sample_envelopes();
    records.push(Envelope { key: Some(vec![0xff, 0x01]), payload: vec![0x1f, 0x8b, 0xfe, 0x00, 0x80], ..records[0].clone() });
    let an_hour_ago = chrono::Utc::now().timestamp_millis() - 3_600_000;
    for (i, record) in records.iter_mut().enumerate() {
        record.timestamp_ms = Some(an_hour_ago + i as i64);
    }
    let archive: String = records.iter().map(|e| e.to_kcat_json() + "\n").collect();
    // gzip on stdin, recognised by its content.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(archive.as_bytes()).unwrap();
    let (ok, stderr) = produce_cmd(&["--input", "-", "--topic", &topic, "--keep-timestamps"], &gz.finish().unwrap());
    assert!(ok, "{stderr}");
    assert!(stderr.contains(&format!("produced {} records", records.len())), "{stderr}");
    let back = read_raw(&topic, records.len());
    assert_eq!(back.len(), records.len());
    for (sent, got) in records.iter().zip(&back) {
        assert_eq!(got.payload, sent.payload, "bodies survive byte for byte");
        assert_eq!(got.key, sent.key);
        assert_eq!(got.headers, sent.headers);
        assert_eq!(got.timestamp_ms, sent.timestamp_ms);
    }
    println!("checked: {} records (one not UTF-8) round-tripped through a gzip archive on stdin", back.len());
}

/// Operator finding: an archive's own timestamps (weeks old) handed to a
/// topic that keeps 7 days were deleted by the broker before the worker read
/// them. By default records get the current time; `--keep-timestamps` refuses
/// a record its topic's retention would delete on arrival (exit 2).
#[test]
fn backfills_get_the_current_time_unless_asked_and_never_land_outside_retention() {
    let topic = unique("it.produce.times");
    create_topics(&[&topic], 1);
    let mut records = sample_envelopes();
    records.truncate(3);
    for record in records.iter_mut() {
        record.timestamp_ms = Some(1_700_000_000_000); // November 2023
    }
    let archive: String = records.iter().map(|e| e.to_kcat_json() + "\n").collect();
    let before = chrono::Utc::now().timestamp_millis();
    let (ok, stderr) = produce_cmd(&["--input", "-", "--topic", &topic], archive.as_bytes());
    assert!(ok, "{stderr}");
    let after = chrono::Utc::now().timestamp_millis();
    let back = read_raw(&topic, records.len());
    assert_eq!(back.len(), records.len());
    for got in &back {
        let ts = got.timestamp_ms.unwrap();
        assert!((before - 1_000..=after + 1_000).contains(&ts), "a backfill record got {ts}, not the time it was produced ({before}..{after})");
    }
    let mut child = Command::new(waymark_bin())
        .args(["produce", "--brokers", &brokers(), "--input", "-", "--topic", &topic, "--keep-timestamps"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(archive.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("retention.ms") && stderr.contains("--keep-timestamps"), "the error must say why and what to do: {stderr}");
    let probe: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let (_, end) = probe.fetch_watermarks(&topic, 0, Duration::from_secs(10)).unwrap();
    assert_eq!(end, records.len() as i64, "nothing outside the retention was produced");
    println!("checked: a 2023 archive is produced with the current time, and refused (exit 2) with --keep-timestamps on a 7-day topic");
}

#[test]
fn dead_letters_are_re_driven_as_their_original_records() {
    let topic = unique("it.produce.redrive");
    create_topics(&[&topic], 1);
    let original = Envelope { payload: b"{\"truncated\": ".to_vec(), key: Some(b"k1".to_vec()), ..sample_envelopes()[0].clone() };
    let error = waymark::error::RecordError::InvalidJson("EOF".into());
    let dead = waymark::DeadLetter::new(&original, &error, Some("easypost".into()), Some("acme".into()), chrono::Utc::now());
    // A dump of the dead-letter topic: its values are dead letters.
    let line = Envelope { payload: serde_json::to_vec(&dead).unwrap(), key: Some(dead.key().into_bytes()), headers: vec![], ..original.clone() };
    let (ok, stderr) = produce_cmd(&["--input", "-", "--dead-letters", "--topic", &topic], (line.to_kcat_json() + "\n").as_bytes());
    assert!(ok, "{stderr}");
    let back = read_raw(&topic, 1);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].payload, original.payload);
    assert_eq!(back[0].key, original.key);
    assert_eq!(back[0].headers, original.headers);
    println!("checked: a dead letter re-driven as its original record");
}
