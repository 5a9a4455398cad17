#!/usr/bin/env python3
"""Generate the scenario corpus under replay/scenarios/ (deterministic: seeded).

Each scenario is an archive in `kcat -C -J` form (<name>.ndjson); its expected
timeline (<name>.expected.ndjson) is what `waymark replay` emits for it, blessed
with WAYMARK_BLESS=1 cargo test --test it scenarios and reviewed by hand; the test
also checks invariants that do not depend on the blessed file. Adding a scenario
is adding those two files (by hand, or here).

    scripts/gen-scenarios.py            # rewrite the archives
"""
import json
import os
import random
import shlex
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "replay" / "scenarios"
BASE = datetime(2026, 10, 5, 6, 0, tzinfo=timezone.utc)
CITIES = [("ORLANDO", "FL", "32809"), ("KENLY", "NC", "27542"), ("EDISON", "NJ", "08817"),
          ("MEMPHIS", "TN", "38118"), ("OAKLAND", "CA", "94607"), ("SÃO PAULO", "SP", "01310")]


def iso(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def history(rng, start):
    """One shipment's scans: (status, code, time, city, message)."""
    t = start
    scans = [("pre_transit", "OC", t, 0, "Shipment information sent to FedEx")]
    t += timedelta(minutes=30 + rng.randrange(600))
    scans.append(("in_transit", "PU", t, 0, "Picked up"))
    for hop in range(1 + rng.randrange(4)):
        t += timedelta(minutes=30 + rng.randrange(600))
        scans.append(("in_transit", "AR", t, 1 + hop, "Arrived at FedEx location"))
    t += timedelta(minutes=30 + rng.randrange(600))
    scans.append(("out_for_delivery", "OD", t, 4, "On FedEx vehicle for delivery"))
    if rng.random() < 0.3:
        t += timedelta(minutes=30 + rng.randrange(600))
        scans.append(("failure", "DE", t, 4, "Delivery exception (Customer not available)"))
        t += timedelta(minutes=30 + rng.randrange(600))
        scans.append(("out_for_delivery", "OD", t, 4, "On FedEx vehicle for delivery"))
    t += timedelta(minutes=30 + rng.randrange(600))
    scans.append(("delivered", "DL", t, 4, "Delivered"))
    return scans


def easypost(event_id, tracking, scans, shift=timedelta(0)):
    details = []
    for status, code, t, city, msg in scans:
        c, s, z = CITIES[city]
        details.append({"object": "TrackingDetail", "message": msg, "description": msg, "status": status,
                        "status_detail": "unknown", "datetime": iso(t + shift), "source": "FedEx", "carrier_code": code,
                        "tracking_location": {"object": "TrackingLocation", "city": c, "state": s, "country": "US", "zip": z}})
    return {"object": "Event", "id": event_id, "description": "tracker.updated", "mode": "production",
            "result": {"object": "Tracker", "tracking_code": tracking, "carrier": "FedEx", "tracking_details": details}}


def dhl(tracking, scans):
    codes = {"pre_transit": "pre-transit", "in_transit": "transit", "out_for_delivery": "transit",
             "delivered": "delivered", "failure": "failure"}
    events = []
    for status, code, t, city, msg in reversed(scans):
        c, _, z = CITIES[city]
        events.append({"timestamp": iso(t), "statusCode": codes[status], "status": code, "description": msg,
                       "location": {"address": {"addressLocality": c, "postalCode": z, "countryCode": "US"}}})
    return {"shipments": [{"id": tracking, "service": "express", "events": events}]}


class Archive:
    def __init__(self):
        self.lines = []

    def add(self, carrier, tenant, body, pretty=False, ts=None):
        payload = json.dumps(body, indent=2 if pretty else None, sort_keys=pretty, ensure_ascii=False)
        offset = len(self.lines)
        self.lines.append(json.dumps({
            "topic": f"tracking.raw.{carrier}", "partition": offset % 3, "offset": offset, "tstype": "create",
            "ts": ts if ts is not None else 1_790_000_000_000 + offset * 1000, "broker": 0,
            "headers": ["tenant-id", tenant], "key": None, "payload": payload}, ensure_ascii=False))

    def control(self, body):
        """A record of the control topic (a correction), at this point of the stream."""
        offset = len(self.lines)
        self.lines.append(json.dumps({
            "topic": "tracking.control", "partition": 0, "offset": offset, "tstype": "create",
            "ts": 1_790_000_000_000 + offset * 1000, "broker": 0, "headers": [], "key": None,
            "payload": json.dumps(body)}))

    def write(self, name):
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"{name}.ndjson").write_text("\n".join(self.lines) + "\n", encoding="utf-8")


def shipments(rng, n, prefix):
    return [(f"{prefix}{i:06d}", history(rng, BASE + timedelta(minutes=rng.randrange(60 * 24 * 6)))) for i in range(n)]


def snapshots(scans):
    return [scans[:k] for k in range(1, len(scans) + 1)]


def provider_replay_week():
    """A week of live webhooks, then the provider replays the whole week after an
    incident: new event ids, keys in another order, pretty-printed, newest first."""
    rng, a = random.Random(1), Archive()
    ships = shipments(rng, 40, "EZW")
    live = [(t, s, k) for t, scans in ships for k, s in enumerate(snapshots(scans))]
    rng.shuffle(live)
    live.sort(key=lambda x: x[1][-1][2])
    for tracking, snap, k in live:
        a.add("easypost", "acme", easypost(f"evt_{tracking}_{k}", tracking, snap))
    for tracking, scans in ships:
        body = easypost(f"evt_replay_{tracking}", tracking, list(reversed(scans)))
        a.add("easypost", "acme", body, pretty=True)
    a.write("provider-replay-week")


def retry_storm():
    """DHL webhooks after an outage: every delivery retried 3 to 8 times, retries
    of different shipments interleaved in bursts."""
    rng, a = random.Random(2), Archive()
    queue = []
    for tracking, scans in shipments(rng, 40, "JD01"):
        for snap in snapshots(scans):
            queue.extend([(tracking, snap)] * (3 + rng.randrange(6)))
    rng.shuffle(queue)
    queue.sort(key=lambda x: x[1][-1][2] + timedelta(minutes=rng.randrange(240)))
    for tracking, snap in queue:
        a.add("dhl", "acme", dhl(tracking, snap))
    a.write("retry-storm")


def out_of_order_batches():
    """Snapshots arrive in batches whose order is reversed (a queue drained LIFO)."""
    rng, a = random.Random(3), Archive()
    records = [(t, s, k) for t, scans in shipments(rng, 40, "EZO") for k, s in enumerate(snapshots(scans))]
    records.sort(key=lambda x: x[1][-1][2])
    for start in range(0, len(records), 25):
        for tracking, snap, k in reversed(records[start:start + 25]):
            a.add("easypost", "acme", easypost(f"evt_{tracking}_{k}", tracking, snap))
    a.write("out-of-order-batches")


def clock_skew():
    """A second delivery path whose clock is off: the same scans 1 s later (within
    the 2 s tolerance: duplicates) and, for every fifth shipment, 3 s later
    (beyond it: new milestones, on purpose)."""
    rng, a = random.Random(4), Archive()
    ships = shipments(rng, 40, "EZS")
    for tracking, scans in ships:
        a.add("easypost", "acme", easypost(f"evt_{tracking}", tracking, scans))
    for i, (tracking, scans) in enumerate(ships):
        shift = timedelta(seconds=3 if i % 5 == 0 else 1)
        a.add("easypost", "acme", easypost(f"evt_{tracking}_skewed", tracking, scans, shift=shift))
    a.write("clock-skew")


def second_tenant():
    """The same carrier payloads under two tenants: never duplicates of each other."""
    rng, a = random.Random(5), Archive()
    for tracking, scans in shipments(rng, 30, "JD02"):
        for snap in snapshots(scans):
            for tenant in ("acme", "globex"):
                a.add("dhl", tenant, dhl(tracking, snap))
    a.write("second-tenant")


def corrected_description():
    """Providers correct a scan's text after the fact: each shipment's history, then
    the same history with the first scan's message corrected (a revision of that
    milestone, same id), that correction re-sent (a duplicate), and, for every
    third shipment, the uncorrected history again with its clock 1 s off (a late
    copy of the earlier version: a duplicate, it must not undo the correction)."""
    rng, a = random.Random(6), Archive()
    ships = shipments(rng, 20, "EZR")
    for tracking, scans in ships:
        a.add("easypost", "acme", easypost(f"evt_{tracking}", tracking, scans))
    for i, (tracking, scans) in enumerate(ships):
        status, code, t, city, msg = scans[0]
        fixed = [(status, code, t, city, msg + " (corrected by the carrier)")] + scans[1:]
        a.add("easypost", "acme", easypost(f"evt_{tracking}_fix", tracking, fixed))
        a.add("easypost", "acme", easypost(f"evt_{tracking}_fix_again", tracking, fixed))
        if i % 3 == 0:
            a.add("easypost", "acme", easypost(f"evt_{tracking}_late", tracking, scans, shift=timedelta(seconds=1)))
    a.write("corrected-description")


def reused_tracking_number():
    """Carriers reuse tracking numbers. Each shipment is delivered; 90 days after its
    delivery a new parcel with the same number begins (a new generation: its own
    milestone ids, its status afresh); then the provider replays the first parcel's
    history (old times, new ids: duplicates, and no new generation). For every
    other shipment, a label re-printed 10 days after delivery (within the 30-day
    gap): the same parcel, a prevented regression."""
    rng, a = random.Random(7), Archive()
    ships = shipments(rng, 12, "EZU")
    for tracking, scans in ships:
        a.add("easypost", "acme", easypost(f"evt_{tracking}", tracking, scans))
    for i, (tracking, scans) in enumerate(ships):
        delivered = scans[-1][2]
        if i % 2 == 1:
            reprint = [("pre_transit", "OC", delivered + timedelta(days=10), 0, "Label re-printed")]
            a.add("easypost", "acme", easypost(f"evt_{tracking}_reprint", tracking, reprint))
        second = history(rng, delivered + timedelta(days=90))
        for k, snap in enumerate(snapshots(second)):
            a.add("easypost", "acme", easypost(f"evt_{tracking}_b{k}", tracking, snap))
        a.add("easypost", "acme", easypost(f"evt_{tracking}_replayed", tracking, scans))
    a.write("reused-tracking-number")


def milestone_ids(archive):
    """The upserts `waymark replay` gives for `archive` (ids do not depend on
    the stream's order or offsets). The binary: $WAYMARK, else `cargo run`."""
    command = shlex.split(os.environ.get("WAYMARK", "cargo run --quiet --"))
    with tempfile.NamedTemporaryFile("w", suffix=".ndjson", encoding="utf-8") as f:
        f.write("\n".join(archive.lines) + "\n")
        f.flush()
        out = subprocess.run(command + ["replay", "--input", f.name], check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def false_delivery_retracted():
    """USPS-style mis-scans: each shipment is scanned delivered by mistake, then
    scanned again in transit two hours later (a suspected false delivery: the
    status stays delivered). An operator retracts the false delivered for two
    shipments of three (a correction on the control topic, with the id its
    upsert gave): the retraction puts the status back where the remaining
    scans leave it; the same correction is sent twice for the first shipment
    (the second changes nothing); the real delivery the next day then applies
    normally. Replayed with false-delivery-retracted.toml (the control topic)."""
    rng, events = random.Random(8), Archive()
    ships = shipments(rng, 9, "EZF")
    plan = []
    for tracking, scans in ships:
        before = [s for s in scans if s[0] not in ("delivered", "failure")]
        last = before[-1][2]
        false = ("delivered", "DL", last + timedelta(minutes=20), 2, "Delivered (scanned at the wrong address)")
        again = ("in_transit", "AR", last + timedelta(hours=2), 3, "Arrived at FedEx location")
        real = ("delivered", "DL", last + timedelta(days=1), 4, "Delivered")
        plan.append((tracking, before, false, again, real))
    for tracking, before, false, again, real in plan:
        for k, snap in enumerate(snapshots(before)):
            events.add("easypost", "acme", easypost(f"evt_{tracking}_{k}", tracking, snap))
        events.add("easypost", "acme", easypost(f"evt_{tracking}_false", tracking, before + [false]))
        events.add("easypost", "acme", easypost(f"evt_{tracking}_again", tracking, before + [false, again]))
    ids = {u["tracking_number"]: u["milestone_id"] for u in milestone_ids(events)
           if u["status"] == "delivered" and "wrong address" in u.get("description", "")}
    a = Archive()
    for i, (tracking, before, false, again, real) in enumerate(plan):
        for k, snap in enumerate(snapshots(before)):
            a.add("easypost", "acme", easypost(f"evt_{tracking}_{k}", tracking, snap))
        a.add("easypost", "acme", easypost(f"evt_{tracking}_false", tracking, before + [false]))
        a.add("easypost", "acme", easypost(f"evt_{tracking}_again", tracking, before + [false, again]))
        if i % 3 != 2:
            correction = {"kind": "correction", "action": "retract", "tenant_id": "acme", "carrier": "easypost",
                          "tracking_number": tracking, "milestone_id": ids[tracking],
                          "reason": "scanned delivered at the wrong address; recovered in transit",
                          "requested_by": "ops@acme", "requested_at": iso(again[2] + timedelta(hours=1)).replace("Z", ".000Z")}
            a.control(correction)
            if i == 0:
                a.control(correction)
        a.add("easypost", "acme", easypost(f"evt_{tracking}_real", tracking, before + [false, again, real]))
    a.write("false-delivery-retracted")


if __name__ == "__main__":
    for scenario in (provider_replay_week, retry_storm, out_of_order_batches, clock_skew, second_tenant, corrected_description,
                     reused_tracking_number, false_delivery_retracted):
        scenario()
        print(f"wrote {scenario.__name__}")
