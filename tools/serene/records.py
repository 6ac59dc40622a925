"""Host-side reading of the module's records (the format is documented in firmware/record.py).

`decode(cbor_bytes)` returns a dict with named fields, checked strictly: a record that is not
a map of known integer labels with the right types raises RecordError naming what is wrong.
The bench and the server use this; it shares no code with the firmware (they meet on the wire).
"""

import cbor2

KINDS = {1: "status", 2: "pump_event", 3: "link", 4: "identity", 5: "log", 6: "module"}
LABELS = {
    0: "kind", 1: "seq", -3: "time", 2: "rate", 3: "volume", 4: "dose", 5: "remaining",
    6: "alarms", 7: "state", 8: "battery", 9: "power", 10: "error", 11: "mode",
    12: "flush_rate", 13: "flush_volume", 14: "code", 15: "detail", 16: "text", 17: "index",
    18: "counters",
}
MODULE_EVENTS = {1: "boot", 2: "health", 3: "records_lost", 4: "se_error",
                 5: "pump_disconnected", 6: "pump_reconnected", 7: "volume_reset"}
HEALTH_COUNTERS = {
    1: "polls", 2: "poll_failures", 3: "pump_events", 4: "link_conditions", 5: "reconnects",
    6: "task_restarts", 7: "records", 8: "records_lost", 9: "se_errors", 10: "mem_code",
    11: "mem_live_max", 12: "mem_high", 13: "acks_rejected",
}
# Pump link condition codes, as the pump driver numbers them (drivers/pump/base.py COND_*).
LINK_CONDITIONS = {
    1: "checksum", 2: "noise", 3: "control_in_frame", 4: "too_long", 5: "nak", 6: "timeout",
    7: "disconnected", 8: "reconnected", 9: "refused", 10: "bad_reply", 11: "event_overflow",
    12: "char_error", 13: "address", 14: "forbidden", 15: "internal",
}


class RecordError(ValueError):
    pass


def decode(data):
    try:
        raw = cbor2.loads(bytes(data))
    except (cbor2.CBORDecodeError, ValueError) as e:
        raise RecordError("not CBOR: %s" % e) from None
    if not isinstance(raw, dict):
        raise RecordError("not a map")
    out = {}
    for label, value in raw.items():
        name = LABELS.get(label) if isinstance(label, int) else None
        if name is None:
            raise RecordError("unknown label %r" % (label,))
        if name == "text":
            ok = isinstance(value, str)
        elif name == "counters":
            ok = isinstance(value, dict) and all(
                isinstance(k, int) and isinstance(v, int) and v >= 0 for k, v in value.items()
            )
            if ok:
                value = {HEALTH_COUNTERS.get(k, str(k)): v for k, v in value.items()}
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not ok:
            raise RecordError("bad value for %s: %r" % (name, value))
        out[name] = value
    for need in ("kind", "seq", "time"):
        if need not in out:
            raise RecordError("missing %s" % need)
    if out["kind"] not in KINDS:
        raise RecordError("unknown kind %d" % out["kind"])
    out["kind"] = KINDS[out["kind"]]
    if out["kind"] == "module" and "code" in out:
        out["event"] = MODULE_EVENTS.get(out["code"], str(out["code"]))
    if out["kind"] == "link" and "code" in out:
        out["condition"] = LINK_CONDITIONS.get(out["code"], str(out["code"]))
    return out


def describe(rec):
    """One human line for a decoded record (the bench's live view)."""
    k = rec["kind"]
    if k == "status":
        parts = []
        if "volume" in rec:
            parts.append("volume %.3f ml" % (rec["volume"] / 1000))
        if "rate" in rec:
            parts.append("rate %.1f ml/h" % (rec["rate"] / 10))
        for f in ("state", "alarms", "battery", "power", "remaining", "dose"):
            if f in rec:
                parts.append("%s %s" % (f, rec[f]))
        return "status  " + ", ".join(parts)
    if k == "pump_event":
        return "EVENT   " + ", ".join(
            "%s %s" % (f, rec[f]) for f in LABELS.values() if f in rec
            and f not in ("kind", "seq", "time"))
    if k == "link":
        return "link    condition %s%s" % (
            rec.get("condition", "?"),
            " (%s)" % rec["detail"] if "detail" in rec else "")
    if k == "identity":
        return "pump    " + rec.get("text", "")
    if k == "module":
        if rec.get("event") == "health":
            return "health  " + ", ".join("%s=%s" % kv for kv in rec["counters"].items())
        return "module  " + rec.get("event", "?") + (
            " (%s)" % rec["detail"] if "detail" in rec else "")
    return k
