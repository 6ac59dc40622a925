"""Audit at rest: prove that what the database holds is exactly what the modules sent.

    serene report --home DIR --audit [--json]
    audit(home) -> {"objects": n, "epochs": n, "checkpoints": n, "problems": [...]}

Re-does from the stored bytes alone, with the server's key and the registry, what the ingest
did on arrival: every epoch record verifies (certificate chain, signature) and re-derives its
keys; every stored record and event opens under its epoch's keys as the same (epoch, seq),
with the stored plaintext, and decodes to the stored fields; every checkpoint's signature
verifies and the stored objects of its range hash to its signed chain (a verified checkpoint
that no longer matches means the database was altered). Each discrepancy is a problem naming
device, epoch, seq and what is wrong; the audit never stops at the first.
"""

import json

from .. import records
from ..verifier import VerifyError, from_home
from .store import Store, db_path


def audit(home):
    v = from_home(home)
    store = Store(db_path(home), readonly=True)
    problems = []
    counts = {"epochs": 0, "objects": 0, "checkpoints": 0}

    def problem(dev, epoch, seq, what):
        problems.append({"device": dev, "epoch": epoch, "seq": seq, "problem": what})

    try:
        db = store.db
        for dev, ep, record, _ in store.epochs():
            counts["epochs"] += 1
            try:
                ctx = v.accept_epoch(dev, record)
                if ctx.epoch != ep:
                    problem(dev, ep, 0, "epoch record is for epoch %d" % ctx.epoch)
            except VerifyError as e:
                problem(dev, ep, 0, "epoch record does not verify: %s" % e)
        rows = db.execute("SELECT device, epoch, seq, kind, sealed, plaintext, fields, "
                          "decode_error FROM objects ORDER BY device, epoch, seq")
        for dev, ep, seq, kind, sealed, pt, fields, err in rows:
            counts["objects"] += 1
            sealed = bytes(sealed)
            try:
                opened = v.verify_object(dev, sealed, epoch=ep)
            except VerifyError as e:
                problem(dev, ep, seq, "stored %s does not verify: %s" % (kind, e))
                continue
            if (opened.epoch, opened.seq) != (ep, seq):
                problem(dev, ep, seq, "stored as %d/%d, sealed as %d/%d"
                        % (ep, seq, opened.epoch, opened.seq))
                continue
            if kind in ("record", "event"):
                if pt is None or bytes(pt) != opened.plaintext:
                    problem(dev, ep, seq, "stored plaintext differs from the sealed one")
                try:
                    want = records.decode(opened.plaintext)
                except records.RecordError:
                    want = None
                if (None if fields is None else json.loads(fields)) != (
                        None if want is None else json.loads(json.dumps(want))):
                    problem(dev, ep, seq, "stored fields differ from the sealed record")
            elif kind == "checkpoint":
                counts["checkpoints"] += 1
                state = db.execute("SELECT state FROM checkpoints WHERE device=? AND epoch=? "
                                   "AND seq=?", (dev, ep, seq)).fetchone()
                stored = store.sealed_in_range(dev, ep, opened.first_seq, seq)
                if len(stored) < opened.count and state and state[0] == "pending":
                    continue  # still waiting for records: nothing to prove yet
                try:
                    v.check_checkpoint(opened, stored)
                except VerifyError as e:
                    problem(dev, ep, seq, "checkpoint over %d-%d: %s"
                            % (opened.first_seq, seq - 1, e.detail or e))
    finally:
        store.close()
    return dict(counts, problems=problems, ok=not problems)


def text(result):
    lines = ["audit: %d epochs, %d objects, %d checkpoints re-verified from the database: %s"
             % (result["epochs"], result["objects"], result["checkpoints"],
                "OK" if result["ok"] else "%d PROBLEMS" % len(result["problems"]))]
    for p in result["problems"]:
        lines.append("  %s epoch %s seq %s: %s" % (p["device"], p["epoch"], p["seq"],
                                                   p["problem"]))
    return "\n".join(lines)
