"""Clinical reading of the ingest's records: attribution by time, pump state, values in
clinical units, alarms, data age, completeness.

Units (firmware/record.py, specs/pump-protocol.md): rate and flush_rate in 0.1 ml/h; volume,
dose and flush_volume in 0.001 ml (µl); remaining in minutes; battery in %; time in seconds
since 1970 (module clock). State u: 0 standby, 1 paused, 2 running, 3 priming, 4 flush,
5 dose complete, 6 alarm hold. Alarm bits a: below (ALARM_BITS).
"""

import json

import sqlalchemy as sa

from . import db

#: alarm bit -> key (the words shown are translated in views.ALARM_WORDS)
ALARM_BITS = {0: "downstream_occlusion", 1: "upstream_occlusion", 2: "air_in_line",
              3: "door_open", 4: "battery_low", 5: "battery_empty", 6: "dose_complete",
              7: "idle_reminder", 8: "mains_lost", 9: "technical_fault", 10: "clamp"}
#: bits that are information, not an alarm needing a clinician
INFO_BITS = {6, 7}
PUMP_STATES = {0: "standby", 1: "paused", 2: "running", 3: "priming", 4: "flush",
               5: "dose_complete", 6: "alarm_hold"}
CLINICAL_FIELDS = ("rate", "volume", "dose", "remaining", "alarms", "state", "battery",
                   "power", "error")


def rate_mlh(v):
    return None if v is None else v / 10.0


def ml(v):
    return None if v is None else v / 1000.0


def alarm_bits(mask):
    return [b for b in sorted(ALARM_BITS) if mask and mask >> b & 1]


# --- attribution ---------------------------------------------------------------------------


def assignments(conn, patient_id):
    a = db.device_assignments
    return conn.execute(sa.select(a).where(a.c.patient_id == patient_id)
                        .order_by(a.c.valid_from)).all()


def current_device(conn, patient_id, t):
    for row in reversed(assignments(conn, patient_id)):
        if row.valid_from <= t and (row.valid_to is None or t < row.valid_to):
            return row.device
    return None


def patient_of_device(conn, device, t):
    a = db.device_assignments
    row = conn.execute(sa.select(a.c.patient_id).where(
        a.c.device == device, a.c.valid_from <= t,
        sa.or_(a.c.valid_to.is_(None), a.c.valid_to > t))).first()
    return None if row is None else row[0]


def _spans(conn, patient_id, t0, t1):
    """(device, from, to) pieces of [t0, t1) during which a module was the patient's."""
    out = []
    for row in assignments(conn, patient_id):
        a = max(t0, row.valid_from)
        b = t1 if row.valid_to is None else min(t1, row.valid_to)
        if a < b:
            out.append((row.device, a, b))
    return out


def records(conn, patient_id, t0, t1, limit=None, newest_first=False):
    """The patient's records with t0 <= time < t1, by time (the attribution rule: a record
    is the patient's if its module was assigned to them at the record's time)."""
    tx = db.record_time(conn.dialect.name)
    out = []
    for device, a, b in _spans(conn, patient_id, t0, t1):
        q = ("SELECT epoch, seq, fields FROM objects WHERE device = :d AND kind = 'record' "
             "AND %s >= :a AND %s < :b ORDER BY %s %s, epoch, seq" %
             (tx, tx, tx, "DESC" if newest_first else "ASC"))
        if limit:
            q += " LIMIT %d" % int(limit)
        for epoch, seq, fields in conn.execute(sa.text(q), {"d": device, "a": a, "b": b}):
            if fields is None:
                continue
            f = json.loads(fields)
            f["_device"], f["_epoch"], f["_seq"] = device, epoch, seq
            out.append(f)
    out.sort(key=lambda f: (f["time"], f["_epoch"], f["_seq"]), reverse=newest_first)
    return out[:limit] if limit else out


def fold(recs):
    """The latest known value of each clinical field, with the time each was reported
    (status records carry every polled field; pump events only the ones that changed)."""
    cur = {}
    for r in recs:
        if r.get("kind") not in ("status", "pump_event"):
            continue
        for k in CLINICAL_FIELDS:
            if k in r:
                cur[k] = r[k]
        cur["time"] = r["time"]
    return cur


def alarm_onsets(recs):
    """For each alarm bit active in the last record that reports alarms: the record where
    its current run began (device, epoch, seq, time). recs in time order."""
    onset = {}
    for r in recs:
        if r.get("kind") not in ("status", "pump_event") or "alarms" not in r:
            continue
        bits = set(alarm_bits(r["alarms"]))
        for b in list(onset):
            if b not in bits:
                del onset[b]
        for b in bits:
            onset.setdefault(b, {"bit": b, "device": r["_device"], "epoch": r["_epoch"],
                                 "seq": r["_seq"], "time": r["time"]})
    return [onset[b] for b in sorted(onset)]


def acknowledged(conn, onsets):
    a = db.alarm_acks
    out = {}
    for o in onsets:
        row = conn.execute(sa.select(a.c.user_id, a.c.at).where(
            a.c.device == o["device"], a.c.epoch == o["epoch"], a.c.seq == o["seq"],
            a.c.bit == o["bit"])).first()
        if row is not None:
            out[(o["device"], o["epoch"], o["seq"], o["bit"])] = row
    return out


def pump_state(cur, age_s, offline_s, last_module_event=None):
    """running | paused | alarm | dose_complete | offline | no_data."""
    if not cur and last_module_event is None:
        return "no_data"
    if age_s is None or age_s > offline_s or last_module_event == "pump_disconnected":
        return "offline"
    bits = alarm_bits(cur.get("alarms", 0))
    if cur.get("state") == 6 or any(b not in INFO_BITS for b in bits):
        return "alarm"
    if cur.get("state") == 5 or 6 in bits:
        return "dose_complete"
    if cur.get("state") in (2, 3, 4):
        return "running"
    return "paused"


def last_module_event(recs):
    ev = None
    for r in recs:
        if r.get("kind") == "module" and r.get("event") in ("pump_disconnected",
                                                              "pump_reconnected"):
            ev = r["event"]
        elif r.get("kind") == "status":
            ev = None
    return ev


def completeness(ledger):
    """complete | gaps | integrity | none, from the store's device ledger."""
    if ledger is None or not ledger["epochs"]:
        return "none"
    if ledger["checkpoint_mismatches"] or ledger["checkpoint_links_broken"]:
        return "integrity"
    if ledger["complete"]:
        return "complete"
    return "gaps"


def gap_times(conn, device, epoch, gaps):
    """[(first, last, time before, time after)]: a gap's seq range and the module times of
    the stored objects on either side of it (None where there is none)."""
    tx = db.record_time(conn.dialect.name)
    out = []
    for a, b in gaps:
        before = conn.execute(sa.text(
            "SELECT %s FROM objects WHERE device=:d AND epoch=:e AND seq<:s AND kind='record' "
            "ORDER BY seq DESC LIMIT 1" % tx), {"d": device, "e": epoch, "s": a}).scalar()
        after = conn.execute(sa.text(
            "SELECT %s FROM objects WHERE device=:d AND epoch=:e AND seq>:s AND kind='record' "
            "ORDER BY seq LIMIT 1" % tx), {"d": device, "e": epoch, "s": b}).scalar()
        out.append((a, b, before, after))
    return out
