"""serene report: the completeness ledger, per device, as a table or as JSON.

    serene report --home DIR [--db URL] [--json] [--device ID] [--check] [--audit]

Reads DIR/server/ingest.sqlite3 (or the database --db / $SERENE_DB names) read-only (the server may be running). Every registered device
is listed, received anything or not, and every device that sent anything (an unregistered one
shows registered: false). Per device and epoch: objects received (as ranges of sequence
numbers), gaps (missing sequence numbers up to the highest received, or up to the end the
next epoch's record names), sequence numbers a verified checkpoint proves were never sealed,
duplicates, checkpoints by state, whether the epoch is closed (its closing checkpoint, named
by the next epoch's record, verified) or has an open tail; per device: rejects by reason with
the most recent ones, the last checkpoint verified, acks_failing (the module keeps resending
what was acknowledged: our acks do not reach or open there) and `complete`. Everything is
computed from ranges: the cost grows with the number of ranges, never with seq values.
The exit status is 0; with --check it is 1 when any registered device is incomplete.
--audit re-verifies everything stored, from the database alone (server/audit.py): exit 1 when
anything stored is not exactly what a module sealed.
"""

import json
import time

from ..cli import CliError


def add_arguments(p):
    from .options import add_db_argument

    p.add_argument("--home", required=True, help="provisioning home of the server")
    add_db_argument(p)
    p.add_argument("--json", action="store_true", help="print the ledger as JSON")
    p.add_argument("--device", help="only this device")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if a registered device has gaps or a checkpoint mismatch")
    p.add_argument("--audit", action="store_true",
                   help="re-verify every stored object and checkpoint from the database with "
                        "the server key (proof at rest); exit 1 on any discrepancy")


def registered_devices(home):
    import pathlib

    path = pathlib.Path(home) / "registry.json"
    if not path.exists():
        return []
    try:
        return sorted(json.loads(path.read_text()).get("devices", {}))
    except ValueError as e:
        raise CliError("%s is not JSON: %s" % (path, e)) from None


def ledger(home, device=None, db=None):
    from .store import Store, StoreError, db_url

    try:
        store = Store(db_url(home, db), readonly=True)
    except StoreError as e:
        raise CliError(str(e)) from None
    try:
        if device:
            reg = registered_devices(home)
            return {device: store.device_ledger(device, device in reg)}
        return store.ledger(registered_devices(home))
    finally:
        store.close()


def _ranges(rs, limit=6):
    if not rs:
        return "-"
    parts = ["%d" % a if a == b else "%d-%d" % (a, b) for a, b in rs[:limit]]
    if len(rs) > limit:
        parts.append("... (%d ranges)" % len(rs))
    return ",".join(parts)


def table(led):
    head = ("DEVICE", "EPOCH", "OBJECTS", "RECEIVED", "GAPS", "DUPS", "CHECKPOINTS", "TAIL",
            "REJECTS", "STATUS")
    rows = [head]
    for dev, d in led.items():
        rej = ",".join("%s:%d" % kv for kv in sorted(d["rejects"].items())) or "-"
        status = "complete" if d["complete"] else (
            "NOTHING RECEIVED" if not d["epochs"] else "INCOMPLETE")
        if d.get("acks_failing"):
            status = "ACKS FAILING"
        if d.get("checkpoint_links_broken"):
            status = "CHECKPOINT LINK BROKEN"
        if d["checkpoint_mismatches"]:
            status = "CHECKPOINT MISMATCH"
        if not d["registered"]:
            status = "UNREGISTERED"
        if not d["epochs"]:
            rows.append((dev, "-", "0", "-", "-", "0", "-", "-", rej, status))
        for i, e in enumerate(d["epochs"]):
            cps = e["checkpoints"]
            rows.append((
                dev if i == 0 else "",
                str(e["epoch"]),
                str(e["objects"]),
                _ranges(e["received"]),
                _ranges(e["gaps"]) + (" (%d)" % e["missing"] if e["missing"] else ""),
                str(e["duplicates"]),
                "%d ok/%d pending/%d bad" % (cps["verified"], cps["pending"], cps["mismatch"]),
                e.get("tail", "-"),
                rej if i == 0 else "",
                status if i == 0 else "",
            ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for dev, d in led.items():
        if d.get("acks_failing"):
            lines.append("%s: ACKS FAILING since %s: %s" % (
                dev, _when(d["acks_failing"].get("since")), d["acks_failing"].get("evidence")))
        cp = d["last_checkpoint"]
        if cp:
            lines.append("%s: last checkpoint verified: epoch %d seq %d (covers %d-%d, %d "
                         "objects) at %s" % (dev, cp["epoch"], cp["seq"], cp["first_seq"],
                                             cp["seq"] - 1, cp["count"], _when(cp["verified_at"])))
        for r in d["recent_rejects"][:5]:
            lines.append("%s: rejected %s: %s%s (%s bytes)" % (
                dev, _when(r["at"]), r["reason"], ": " + r["detail"] if r["detail"] else "",
                r["size"]))
    return "\n".join(lines)


def _when(t):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def run(args):
    from .options import use_db

    url = use_db(args)
    led = ledger(args.home, args.device, url)
    out = {"devices": led, "generated_at": time.time()}
    if args.audit:
        from . import audit
        from .options import load_verifier

        load_verifier(args.home)  # a clear error when the server identity is missing
        out["audit"] = audit.audit(args.home, url)
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(table(led))
        if args.audit:
            print(audit.text(out["audit"]))
    if args.check and any(d["registered"] and not d["complete"] for d in led.values()):
        return 1
    if args.audit and not out["audit"]["ok"]:
        return 1
    return 0
