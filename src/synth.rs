//! Deterministic synthetic carrier traffic (EasyPost `tracker.updated` webhooks)
//! for tests, the simulation and the load harness: growing history snapshots,
//! retried deliveries, out-of-order arrival and provider replays with new ids,
//! all decided by a seeded PRNG so any failure reproduces from its seed.

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::{json, Value};

use crate::envelope::Envelope;

/// SplitMix64: tiny, fast, good enough to shuffle test traffic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// The webhook format of the generated stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthCarrier {
    /// EasyPost `tracker.updated` Events wrapping a Tracker.
    EasyPost,
    /// DHL Unified API responses (`shipments[].events[]`, newest first), which can
    /// carry several shipments in one body (see [`merge_dhl_pairs`]).
    Dhl,
}

impl SynthCarrier {
    pub fn name(self) -> &'static str {
        match self {
            SynthCarrier::EasyPost => "easypost",
            SynthCarrier::Dhl => "dhl",
        }
    }
}

/// Shape of the generated stream.
#[derive(Debug, Clone)]
pub struct TrafficSpec {
    pub seed: u64,
    pub carrier: SynthCarrier,
    pub shipments: usize,
    pub tenant: String,
    pub topic: String,
    pub partition: i32,
    /// Probability that a webhook is delivered again (retried).
    pub redelivery: f64,
    /// Probability that a shipment's whole history is replayed at the end with new ids.
    pub replay: f64,
    /// Probability that two neighbouring webhooks swap places (out of order).
    pub reorder: f64,
}

impl Default for TrafficSpec {
    fn default() -> Self {
        TrafficSpec {
            seed: 1,
            carrier: SynthCarrier::EasyPost,
            shipments: 100,
            tenant: "acme".into(),
            topic: "tracking.raw.easypost".into(),
            partition: 0,
            redelivery: 0.3,
            replay: 0.2,
            reorder: 0.1,
        }
    }
}

const CITIES: [(&str, &str, &str); 6] = [
    ("ORLANDO", "FL", "32809"),
    ("KENLY", "NC", "27542"),
    ("EDISON", "NJ", "08817"),
    ("MEMPHIS", "TN", "38118"),
    ("OAKLAND", "CA", "94607"),
    ("SÃO PAULO", "SP", "01310"),
];

fn detail(status: &str, code: &str, at: DateTime<Utc>, city: usize, msg: &str) -> Value {
    let (c, s, z) = CITIES[city % CITIES.len()];
    json!({"object": "TrackingDetail", "message": msg, "description": msg, "status": status,
           "status_detail": "unknown", "datetime": at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
           "source": "FedEx", "carrier_code": code,
           "tracking_location": {"object": "TrackingLocation", "city": c, "state": s, "country": "US", "zip": z}})
}

/// One shipment's full scan history.
fn history(rng: &mut Rng, start: DateTime<Utc>) -> Vec<Value> {
    let mut at = start;
    let mut step = |rng: &mut Rng| {
        at += Duration::minutes(30 + rng.below(600) as i64);
        at
    };
    let mut scans = vec![detail("pre_transit", "OC", start, 0, "Shipment information sent to FedEx")];
    scans.push(detail("in_transit", "PU", step(rng), 0, "Picked up"));
    for hop in 0..(1 + rng.below(4)) {
        scans.push(detail("in_transit", "AR", step(rng), 1 + hop as usize, "Arrived at FedEx location"));
    }
    scans.push(detail("out_for_delivery", "OD", step(rng), 4, "On FedEx vehicle for delivery"));
    if rng.chance(0.3) {
        scans.push(detail("failure", "DE", step(rng), 4, "Delivery exception (Customer not available)"));
        scans.push(detail("out_for_delivery", "OD", step(rng), 4, "On FedEx vehicle for delivery"));
    }
    scans.push(detail("delivered", "DL", step(rng), 4, "Delivered"));
    scans
}

fn webhook(carrier: SynthCarrier, event_id: &str, tracking: &str, details: &[Value]) -> String {
    match carrier {
        SynthCarrier::EasyPost => easypost_webhook(event_id, tracking, details),
        SynthCarrier::Dhl => json!({"shipments": [dhl_shipment(tracking, details)]}).to_string(),
    }
}

/// The same scans as DHL reports them (status codes per DHL's five values; the
/// EasyPost carrier code kept as the event's `status` text).
fn dhl_shipment(tracking: &str, details: &[Value]) -> Value {
    let events: Vec<Value> = details
        .iter()
        .rev()
        .map(|d| {
            let code = match d["status"].as_str().unwrap_or_default() {
                "pre_transit" => "pre-transit",
                "in_transit" | "out_for_delivery" => "transit",
                "delivered" => "delivered",
                "failure" => "failure",
                _ => "unknown",
            };
            let place = &d["tracking_location"];
            json!({"timestamp": d["datetime"], "statusCode": code, "status": d["carrier_code"], "description": d["message"],
                   "location": {"address": {"addressLocality": place["city"], "postalCode": place["zip"], "countryCode": place["country"]}}})
        })
        .collect();
    json!({"id": tracking, "service": "express", "events": events})
}

/// Merge neighbouring DHL bodies of different shipments into one body carrying
/// both (`shipments` of two), as a poller batching tracking numbers does. Offsets
/// are renumbered; everything else of the first record is kept.
pub fn merge_dhl_pairs(envelopes: &[Envelope]) -> Vec<Envelope> {
    let mut out: Vec<Envelope> = Vec::with_capacity(envelopes.len());
    let mut pending: Option<(Envelope, Value)> = None;
    let parse = |e: &Envelope| serde_json::from_slice::<Value>(&e.payload).ok().filter(|v| v["shipments"].is_array());
    for envelope in envelopes {
        let Some(body) = parse(envelope) else {
            out.extend(pending.take().map(|(e, _)| e));
            out.push(envelope.clone());
            continue;
        };
        match pending.take() {
            Some((first, mut first_body)) if first_body["shipments"][0]["id"] != body["shipments"][0]["id"] => {
                if let (Some(list), Some(more)) = (first_body["shipments"].as_array_mut(), body["shipments"].as_array()) {
                    list.extend(more.iter().cloned());
                }
                out.push(Envelope { payload: first_body.to_string().into_bytes(), ..first });
            }
            Some((first, _)) => {
                out.push(first);
                pending = Some((envelope.clone(), body));
            }
            None => pending = Some((envelope.clone(), body)),
        }
    }
    out.extend(pending.map(|(e, _)| e));
    for (offset, envelope) in out.iter_mut().enumerate() {
        envelope.offset = offset as i64;
    }
    out
}

fn easypost_webhook(event_id: &str, tracking: &str, details: &[Value]) -> String {
    json!({"object": "Event", "id": event_id, "description": "tracker.updated", "mode": "production",
           "result": {"object": "Tracker", "tracking_code": tracking, "carrier": "FedEx",
                      "tracking_details": details}})
    .to_string()
}

/// A generated stream and what it must produce.
#[derive(Debug, Clone)]
pub struct Traffic {
    pub envelopes: Vec<Envelope>,
    /// Distinct scans in the stream (= milestones a correct pipeline emits).
    pub distinct_events: usize,
}

/// Generate a stream (offsets from 0, in the order a producer would send it).
pub fn generate(spec: &TrafficSpec) -> Traffic {
    let mut rng = Rng::new(spec.seed);
    let base = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).single().unwrap_or_default();
    // Per shipment: its ordered list of webhook bodies.
    let mut queues: Vec<Vec<String>> = Vec::with_capacity(spec.shipments);
    let mut distinct = 0;
    for n in 0..spec.shipments {
        let tracking = format!("SYN{:06}{:08}", spec.seed % 1_000_000, n);
        let start = base + Duration::minutes(rng.below(60 * 24 * 14) as i64);
        let scans = history(&mut rng, start);
        distinct += scans.len();
        let mut bodies = Vec::new();
        for upto in 1..=scans.len() {
            let body = webhook(spec.carrier, &format!("evt_{n}_{upto}"), &tracking, &scans[..upto]);
            bodies.push(body.clone());
            while rng.chance(spec.redelivery) {
                bodies.push(body.clone());
            }
        }
        for i in 1..bodies.len() {
            if rng.chance(spec.reorder) {
                bodies.swap(i - 1, i);
            }
        }
        if rng.chance(spec.replay) {
            let mut replayed = scans.clone();
            replayed.reverse();
            bodies.push(webhook(spec.carrier, &format!("evt_{n}_replay"), &tracking, &replayed));
        }
        queues.push(bodies);
    }
    // Interleave shipments, each in its own order.
    let mut cursors = vec![0usize; queues.len()];
    let mut open: Vec<usize> = (0..queues.len()).collect();
    let mut envelopes = Vec::new();
    while !open.is_empty() {
        let pick = rng.below(open.len() as u64) as usize;
        let shipment = open[pick];
        let body = queues[shipment][cursors[shipment]].clone();
        cursors[shipment] += 1;
        if cursors[shipment] == queues[shipment].len() {
            open.swap_remove(pick);
        }
        envelopes.push(Envelope {
            topic: spec.topic.clone(),
            partition: spec.partition,
            offset: envelopes.len() as i64,
            timestamp_ms: None,
            headers: vec![
                ("tenant-id".into(), Some(spec.tenant.as_bytes().to_vec())),
                ("carrier".into(), Some(spec.carrier.name().as_bytes().to_vec())),
            ],
            key: None,
            payload: body.into_bytes(),
        });
    }
    Traffic { envelopes, distinct_events: distinct }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream() {
        let spec = TrafficSpec { shipments: 5, ..TrafficSpec::default() };
        let a = generate(&spec);
        let b = generate(&spec);
        assert_eq!(a.envelopes, b.envelopes);
        assert!(a.envelopes.len() > a.distinct_events / 3);
        let c = generate(&TrafficSpec { seed: 2, ..spec });
        assert_ne!(a.envelopes, c.envelopes);
    }

    #[test]
    fn dhl_traffic_normalizes_to_the_same_scans_and_pairs_merge() {
        use crate::pipeline::Pipeline;
        let spec = TrafficSpec { shipments: 6, carrier: SynthCarrier::Dhl, ..TrafficSpec::default() };
        let traffic = generate(&spec);
        let pipeline = Pipeline::default();
        let now = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let events = |envelopes: &[Envelope]| -> usize {
            envelopes.iter().map(|e| pipeline.canonical_events(e, now).expect("valid DHL body").1.len()).sum()
        };
        let merged = merge_dhl_pairs(&traffic.envelopes);
        assert!(merged.len() < traffic.envelopes.len() * 3 / 4, "{} of {}", merged.len(), traffic.envelopes.len());
        assert_eq!(events(&merged), events(&traffic.envelopes), "merging moves events, never loses them");
        let two = merged.iter().filter(|e| String::from_utf8_lossy(&e.payload).matches("\"service\"").count() == 2).count();
        assert!(two > 0);
    }
}
