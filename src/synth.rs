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

/// Shape of the generated stream.
#[derive(Debug, Clone)]
pub struct TrafficSpec {
    pub seed: u64,
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

fn webhook(event_id: &str, tracking: &str, details: &[Value]) -> String {
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
            let body = webhook(&format!("evt_{n}_{upto}"), &tracking, &scans[..upto]);
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
            bodies.push(webhook(&format!("evt_{n}_replay"), &tracking, &replayed));
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
                ("carrier".into(), Some(b"easypost".to_vec())),
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
}
