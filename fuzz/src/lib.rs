//! Shared driver of the fuzz targets: one target per carrier parser on raw bytes,
//! the archive-line envelope through the whole core, `correction` (a control-topic
//! record applied to real state), and `mutate_fields`, which edits the fields of
//! real fixture bodies.

use std::sync::{Arc, OnceLock};

use chrono::{TimeZone, Utc};
use serde_json::{Number, Value};
use waymark::carriers::declared::DeclaredCarrier;
use waymark::carriers::CarrierRegistry;
use waymark::state::{MemoryStore, Staged};
use waymark::DeadLetter;

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap_or_default()
}

/// Normalize `data` as a body of `carrier`; errors are fine, panics are bugs.
pub fn normalize(carrier: &str, data: &[u8]) {
    check(&CarrierRegistry::builtin(), carrier, data);
}

/// Parse `data` as an archive line and run it through the pipeline.
pub fn envelope_line(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else { return };
    let Ok(envelope) = waymark::Envelope::from_kcat_json(line) else { return };
    let store = MemoryStore::default();
    let mut staged = Staged::new(&store);
    let _ = waymark::Pipeline::default().process(&envelope, now(), &mut staged);
}

/// The control topic the `correction` target's pipeline reads.
const CONTROL_TOPIC: &str = "tracking.control";

/// The state the scenario `false-delivery-retracted` leaves without its
/// corrections: shipments with false deliveries a correction can name.
fn scenario_state() -> &'static MemoryStore {
    static STATE: OnceLock<MemoryStore> = OnceLock::new();
    STATE.get_or_init(|| {
        let store = MemoryStore::default();
        let pipeline = waymark::Pipeline::default();
        let archive = include_str!("../../replay/scenarios/false-delivery-retracted.ndjson");
        for line in archive.lines() {
            let Ok(envelope) = waymark::Envelope::from_kcat_json(line) else { continue };
            if envelope.topic == CONTROL_TOPIC {
                continue;
            }
            let mut staged = Staged::new(&store);
            if pipeline.process(&envelope, now(), &mut staged).is_ok() {
                let _ = waymark::state::StateStore::write(&store, staged.take_batch());
            }
        }
        store
    })
}

/// Any bytes as a control-topic record: parsed as a correction and applied to
/// the scenario's state (staged, never written, so every input meets the same
/// state). Never a panic; a rejected record's dead letter stays producible.
pub fn correction(data: &[u8]) {
    let pipeline = waymark::Pipeline { control_topic: Some(CONTROL_TOPIC.into()), ..waymark::Pipeline::default() };
    let envelope = waymark::Envelope {
        topic: CONTROL_TOPIC.into(),
        partition: 0,
        offset: 0,
        timestamp_ms: None,
        headers: vec![],
        key: None,
        payload: data.to_vec(),
    };
    let mut staged = Staged::new(scenario_state());
    if let Ok(result) = pipeline.process(&envelope, now(), &mut staged) {
        if let Some(dead) = result.dead_letter {
            let size = serde_json::to_vec(&dead).map(|v| v.len()).unwrap_or(usize::MAX);
            assert!(size < 1_000_000, "a {size}-byte dead letter could never be produced");
        }
        for upsert in &result.upserts {
            assert_eq!(upsert.kind, "retract_milestone", "a correction emits only retractions");
        }
    }
}

/// The properties every target checks on one body: accepted events have a
/// tracking number, and a rejected body's dead letter stays producible.
fn check(registry: &CarrierRegistry, carrier: &str, body: &[u8]) {
    match registry.normalize(carrier, body, now()) {
        Ok(events) => {
            for event in events {
                assert!(!event.tracking_number.is_empty(), "accepted an event without a tracking number");
            }
        }
        Err(error) => {
            let envelope = waymark::Envelope {
                topic: format!("tracking.raw.{carrier}"),
                partition: 0,
                offset: 0,
                timestamp_ms: None,
                headers: vec![],
                key: None,
                payload: body.to_vec(),
            };
            let dead = DeadLetter::new(&envelope, &error, Some(carrier.into()), None, now());
            let size = serde_json::to_vec(&dead).map(|v| v.len()).unwrap_or(usize::MAX);
            // librdkafka's default message.max.bytes.
            assert!(size < 1_000_000, "a {size}-byte dead letter could never be produced");
        }
    }
}

/// Every `fixtures/<carrier>/*.json` body, built in by build.rs.
static FIXTURE_BODIES: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/fixture_bodies.rs"));
/// Every `fixtures/declared/*.toml` mapping, built in by build.rs.
static DECLARED_MAPPINGS: &[&str] = include!(concat!(env!("OUT_DIR"), "/declared_mappings.rs"));

/// The built-in carriers plus the declared ones of the fixtures (their bodies are
/// fixtures too).
fn registry() -> &'static CarrierRegistry {
    static REGISTRY: OnceLock<CarrierRegistry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut registry = CarrierRegistry::builtin();
        for mapping in DECLARED_MAPPINGS {
            if let Ok(carrier) = DeclaredCarrier::from_toml(mapping) {
                registry.register(Arc::new(carrier));
            }
        }
        registry
    })
}

/// The fixture bodies that are JSON, parsed once, with their carrier.
fn fixtures() -> &'static [(&'static str, Value)] {
    static PARSED: OnceLock<Vec<(&'static str, Value)>> = OnceLock::new();
    PARSED.get_or_init(|| {
        FIXTURE_BODIES
            .iter()
            .filter_map(|(carrier, body)| Some((*carrier, serde_json::from_slice(body).ok()?)))
            .collect()
    })
}

/// Strings carriers get wrong: offsets and times in every form (valid, invalid,
/// multi-byte), codes, escapes and control characters.
const STRINGS: &[&str] = &[
    "", " ", "-1€", "+a€", "+€1", "-0€", "+1€:00", "€", "é", "𑈀", "−05:00", "－05:00", "٠٥:٠٠", "-05:00", "-7:00",
    "+0530", "+05", "+5", "Z", "z", "+14:00", "-12:00", "+18:00", "+25:00", "-05:60", "-05:00:00", "EST", "MDT",
    "2024-11-22T13:58:00", "2024-11-22T13:58:00Z", "2024-11-22T13:58:00-06:00", "2024-11-22T13:58:00.123456789+05:30",
    "2024-11-22T13:58:00.041", "2024-11-22 13:58", "2024-11-22", "2024-02-30T00:00:00", "2024-11-22T24:00:00",
    "2024-11-22T23:59:60Z", "9999-12-31T23:59:59", "9999-12-31T23:59:59-14:00", "0000-01-01T00:00:00+14:00",
    "1970-01-01T00:00:00Z", "1989-12-31T23:59:59Z", "+262143-12-31T23:59:59Z", "20250311", "074700", "7", "0",
    "246000", "1074700", "２０２５０３１１", "20250311 074700", "1700000000", "1700000000000", "1e308", "-1e308",
    "18446744073709551616", "-9223372036854775808", "NaN", "inf", "\u{0}", "\u{1}", "\u{7f}", "\u{feff}", "\u{200b}",
    "\"", "\\", "\n", "T", "null", "true", "I", "D", "X", "M", "MV", "OF", "01", "1", "021", "OT", "DE", "DL", "PU",
    "delivered", "InTransit", "InTransit_001", "Exception_010", "TRANSIT", "DELIVERED", "pre_transit", "tracker.updated",
    "tracker.created", "track_updated", "tracking_update", "Event", "Tracker", "US", "USA", "DE", "de", "D E",
];

/// Numbers at the edges of every numeric type on the way.
fn number(choice: u8) -> Value {
    match choice % 12 {
        0 => Value::from(0),
        1 => Value::from(-1),
        2 => Value::from(21),
        3 => Value::from(i64::MIN),
        4 => Value::from(i64::MAX),
        5 => Value::from(u64::MAX),
        6 => Number::from_f64(1e308).map_or(Value::Null, Value::Number),
        7 => Number::from_f64(-0.5).map_or(Value::Null, Value::Number),
        8 => Number::from_f64(9.0e15).map_or(Value::Null, Value::Number),
        9 => Value::from(1_700_000_000),
        10 => Value::from(1_700_000_000_000u64),
        _ => Value::from(20_250_311),
    }
}

/// The fuzz input read as a stream of choices.
struct Choices<'a>(&'a [u8]);

impl Choices<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    /// An index below `len` (two bytes, so documents of many nodes are covered).
    fn index(&mut self, len: usize) -> Option<usize> {
        let (low, high) = (self.byte()?, self.byte()?);
        (len > 0).then(|| usize::from(u16::from_le_bytes([low, high])) % len)
    }

    /// Up to 31 raw input bytes as text (invalid UTF-8 becomes U+FFFD).
    fn text(&mut self) -> Option<String> {
        let len = usize::from(self.byte()? % 32).min(self.0.len());
        let (text, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(String::from_utf8_lossy(text).into_owned())
    }

    fn string(&mut self) -> Option<String> {
        let choice = self.byte()?;
        if choice < 200 {
            Some(STRINGS[usize::from(choice) % STRINGS.len()].to_string())
        } else {
            self.text()
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// How many nodes `value` has, itself included.
fn node_count(value: &Value) -> usize {
    1 + match value {
        Value::Object(map) => map.values().map(node_count).sum(),
        Value::Array(items) => items.iter().map(node_count).sum(),
        _ => 0,
    }
}

/// The path to the `n`th node of `value` in pre-order (root first, then each
/// child's subtree in order). Walking once per edit costs no allocation but the
/// one path, where listing every node's path each edit cost a third of the
/// target's time.
fn nth_path(value: &Value, n: usize) -> Option<Vec<Step>> {
    fn walk(value: &Value, remaining: &mut usize, path: &mut Vec<Step>) -> bool {
        if *remaining == 0 {
            return true;
        }
        *remaining -= 1;
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    path.push(Step::Key(key.clone()));
                    if walk(child, remaining, path) {
                        return true;
                    }
                    path.pop();
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    path.push(Step::Index(i));
                    if walk(child, remaining, path) {
                        return true;
                    }
                    path.pop();
                }
            }
            _ => {}
        }
        false
    }
    let mut remaining = n;
    let mut path = Vec::new();
    walk(value, &mut remaining, &mut path).then_some(path)
}

fn node_mut<'v>(mut value: &'v mut Value, path: &[Step]) -> Option<&'v mut Value> {
    for step in path {
        value = match (step, value) {
            (Step::Key(key), Value::Object(map)) => map.get_mut(key)?,
            (Step::Index(i), Value::Array(items)) => items.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Apply one edit, chosen by the input, at `path`. `None` when the input ran out.
fn mutate(root: &mut Value, path: &[Step], nodes: usize, choices: &mut Choices<'_>) -> Option<()> {
    let op = choices.byte()?;
    if op % 10 == 5 || op % 10 == 8 {
        // Edits of the parent: remove this node, or repeat it (more events).
        // The root has no parent: nothing to do, but keep reading the input.
        let Some((last, parent_path)) = path.split_last() else { return Some(()) };
        let Some(parent) = node_mut(root, parent_path) else { return Some(()) };
        match (last, parent) {
            (Step::Key(key), Value::Object(map)) if op % 10 == 5 => {
                map.remove(key);
            }
            (Step::Index(i), Value::Array(items)) if *i < items.len() => {
                if op % 10 == 5 {
                    items.remove(*i);
                } else if items.len() < 64 {
                    let copy = items[*i].clone();
                    items.insert(*i, copy);
                }
            }
            _ => {}
        }
        return Some(());
    }
    let donor = match op % 10 {
        9 => {
            let other = nth_path(root, choices.index(nodes)?)?;
            node_mut(root, &other).map(|v| v.clone())
        }
        _ => None,
    };
    let node = node_mut(root, path)?;
    *node = match op % 10 {
        0 | 1 => Value::String(choices.string()?),
        // A string with something appended: `2024-11-22T13:58:00` + `-1€`.
        2 => match node {
            Value::String(s) => Value::String(format!("{s}{}", choices.string()?)),
            _ => Value::String(choices.string()?),
        },
        // Type flips, as carriers really do: numbers as text and text as numbers.
        3 => match node {
            Value::Number(n) => Value::String(n.to_string()),
            Value::String(s) => s.trim().parse::<i64>().map(Value::from).unwrap_or_else(|_| number(op / 10)),
            _ => number(op / 10),
        },
        4 => number(choices.byte()?),
        // A long string, up to 64 KiB: reasons and dead letters must stay bounded.
        6 => {
            let unit = choices.string()?;
            let target = (usize::from(choices.byte()?) + 1) * 256;
            Value::String(if unit.is_empty() { "x".repeat(target) } else { unit.repeat(target / unit.len() + 1) })
        }
        7 => match choices.byte()? % 5 {
            0 => Value::Null,
            1 => Value::Bool(true),
            2 => Value::Bool(false),
            3 => Value::Object(serde_json::Map::new()),
            _ => Value::Array(vec![]),
        },
        _ => donor.unwrap_or(Value::Null),
    };
    Some(())
}

/// A fixture body, chosen and then edited field by field by the input, through
/// its carrier's normalizer in the registry: never a panic, whatever the edits.
pub fn mutate_fields(data: &[u8]) {
    let fixtures = fixtures();
    let mut choices = Choices(data);
    let Some(index) = choices.index(fixtures.len()) else { return };
    let (carrier, body) = &fixtures[index];
    let mut body = body.clone();
    for _ in 0..24 {
        let nodes = node_count(&body);
        let Some(target) = choices.index(nodes).and_then(|n| nth_path(&body, n)) else { break };
        if mutate(&mut body, &target, nodes, &mut choices).is_none() {
            break;
        }
    }
    let Ok(bytes) = serde_json::to_vec(&body) else { return };
    check(registry(), carrier, &bytes);
}

/// A public key for the ShipEngine scheme (no private half exists anywhere: no
/// input can carry a valid signature for it).
const FUZZ_JWKS: &str = r#"{"keys": [{"kty": "RSA", "kid": "fuzz", "n": "71YYQ-J9lhCxU9uEDgTm-tLXJcbt_6wFVEOr4pd013HYoJbR_UchDSveY4mVGX_QMC2wbhDTgbA97KqZrLB_EFq3WASLh3oSmjRUqn5rbdEvJOFoAocplEVEhyYskVzKZSa4dYlANNn1Hg1FJXUL62S3UEqcVHcMGWTo5qGOgHtV2TjZpNwgzUcgmLTntyGXDsQrKo0yVL2KiU4jIEBjdsDqCCM6MOZTcDdwjO8quTHtqtJj-rtoglloQsL0nVGAi2KzCRW3eDF07-qlldMXMjHu23fegd_C4b3ih0LOUAnoqYsYhRvxBpRq9OxJxZ__Rr4DwTxCWd31YnuvE6hymw", "e": "AQAB"}]}"#;

/// Any bytes as a webhook request to every authentication scheme: the first
/// line is the value of every signature, credential and timestamp header (and
/// the query), the rest the body. Never a panic; no signature scheme accepts
/// (the secrets are not in any input); the header parsers and the JWKS parser
/// see the text too.
pub fn signatures(data: &[u8]) {
    use waymark::ingest::auth::*;
    use std::time::Duration;
    let text = String::from_utf8_lossy(data);
    let (head, body) = text.split_once('\n').unwrap_or((&text, ""));
    let _ = parse_shippo_signature(head);
    let _ = parse_timestamp(head);
    let _ = decode_hex(head);
    let _ = decode_base64(head);
    let _ = waymark::ingest::jwks::parse(&text);
    static SCHEMES: std::sync::OnceLock<Vec<Scheme>> = std::sync::OnceLock::new();
    let schemes = SCHEMES.get_or_init(|| {
        let secret = || vec![b"fuzzing-secret-that-no-input-holds".to_vec()];
        let tolerance = Duration::from_secs(300);
        vec![
            Scheme::EasyPost { secrets: secret(), basic: vec![], tolerance },
            Scheme::AfterShip { secrets: secret() },
            Scheme::Shippo { secrets: secret(), tokens: vec![], tolerance },
            Scheme::FedEx { secrets: secret() },
            // Credentials are compared through their digests: no input finds them.
            Scheme::Ups { credentials: secret() },
            Scheme::Dhl { header: "x-signature".into(), keys: secret() },
            Scheme::Usps { secrets: secret() },
            Scheme::ShipEngine { keys: waymark::ingest::jwks::parse(FUZZ_JWKS).expect("the fuzz JWKS"), tolerance },
            Scheme::Hmac {
                spec: GenericHmac {
                    header: "x-signature".into(),
                    algorithm: HmacAlgorithm::Sha512,
                    encoding: Encoding::Base64,
                    prefix: "v1=".into(),
                    timestamp_header: Some("x-timestamp".into()),
                    separator: ":".into(),
                },
                secrets: secret(),
                tolerance,
            },
        ]
    });
    let names = [
        "x-hmac-signature", "x-hmac-signature-v2", "x-timestamp", "x-path", "aftership-hmac-sha256", "as-signature-hmac-sha256",
        "am-webhook-signature", "shippo-auth-signature", "fdx-signature", "x-hmac", "x-shipengine-rsa-sha256-signature",
        "x-shipengine-rsa-sha256-key-id", "x-shipengine-timestamp", "x-signature", "authorization",
    ];
    let pairs: Vec<(&str, &str)> = names.iter().map(|n| (*n, head)).collect();
    let headers = HeaderList(&pairs);
    // Two paths: the one the request came to, and `head` itself (x-path matches it).
    for path in ["/webhooks/fuzz", head] {
        let request = Presented { method: "POST", path, query: Some(head), headers: &headers, body: body.as_bytes() };
        for scheme in schemes {
            let verdict = scheme.verify(&request, 1_765_000_000);
            assert!(verdict.is_err(), "{} accepted a request it cannot have been signed for", scheme.name());
        }
    }
}
