"""Audit at rest: prove that what the database holds is exactly what the modules sent.

    serene report --home DIR --audit [--json]
    audit(home, db=None) -> {"objects": n, "epochs": n, "checkpoints": n, "problems": [...], "ok": b}

Re-does from the stored bytes alone, with the server's key and the registry, what the ingest
did on arrival, and closes the chain (contracts A, C, D):
- every epoch record verifies (certificate chain, signature) and re-derives its keys;
- every stored sealed object is canonical (no kid: "not canonical" otherwise), opens under its
  epoch's keys as the same (epoch, seq), with the stored plaintext, and decodes to the stored
  fields;
- every checkpoint's signature verifies and the stored objects of its range hash to its signed
  chain (a deleted, altered or swapped record makes it fail);
- the checkpoints of an epoch tile it and link up: the first names the epoch record, each
  next one names the one before (a deleted checkpoint is named by the next one's prev);
- an epoch record's prev names the previous epoch's closing checkpoint: it must be stored,
  with that payload hash (a deleted closing checkpoint, or deleted records at the end of an
  epoch, are detected), and nothing may be stored beyond it;
- a checkpoint the ingest recorded (checkpoints table) must still be stored as an object.
Each discrepancy is a problem naming device, epoch, seq and what is wrong; the audit never
stops at the first. Its cost grows with the number of stored objects, never with seq values.
"""

import json

from .. import records
from ..verifier import VerifyError, from_home
from ..verifier import protocol as vp
from .store import Store, db_url


def audit(home, db=None):
    v = from_home(home)
    store = Store(db_url(home, db), readonly=True)
    problems = []
    counts = {"epochs": 0, "objects": 0, "checkpoints": 0}

    def problem(dev, epoch, seq, what):
        problems.append({"device": dev, "epoch": epoch, "seq": seq, "problem": what})

    try:
        db = store  # Store.execute: portable SQL with ? placeholders
        epoch_hash = {}  # (dev, epoch) -> payload hash of its verified epoch record
        prevs = []  # (dev, epoch, (prev_epoch, end_seq, end_hash))
        for dev, ep, record, _ in store.epochs():
            counts["epochs"] += 1
            try:
                ctx = v.accept_epoch(dev, record)
            except VerifyError as e:
                problem(dev, ep, 0, "epoch record does not verify: %s" % e)
                continue
            if ctx.epoch != ep:
                problem(dev, ep, 0, "epoch record is for epoch %d" % ctx.epoch)
                continue
            epoch_hash[(dev, ep)] = ctx.payload_hash
            if ctx.prev is not None:
                prevs.append((dev, ep, ctx.prev))
        cps = {}  # (dev, epoch) -> {seq: Opened}
        last_stored = {}  # (dev, epoch) -> highest stored seq
        rows = db.execute("SELECT device, epoch, seq, kind, sealed, plaintext, fields "
                          "FROM objects ORDER BY device, epoch, seq")
        for dev, ep, seq, kind, sealed, pt, fields in rows:
            counts["objects"] += 1
            last_stored[(dev, ep)] = seq
            sealed = bytes(sealed)
            if kind == "record" and not vp.is_canonical(sealed):
                problem(dev, ep, seq, "stored record is not canonical (it has a kid): stored "
                        "objects must be what the chain hashes")
            try:
                opened = v.verify_object(dev, sealed, epoch=ep)
            except VerifyError as e:
                problem(dev, ep, seq, "stored %s does not verify: %s" % (kind, e))
                continue
            if (opened.epoch, opened.seq) != (ep, seq):
                problem(dev, ep, seq, "stored as %d/%d, sealed as %d/%d"
                        % (ep, seq, opened.epoch, opened.seq))
                continue
            if opened.kind != kind:
                problem(dev, ep, seq, "stored as a %s, the object is a %s" % (kind,
                                                                              opened.kind))
            if opened.kind == "record":
                if pt is None or bytes(pt) != opened.plaintext:
                    problem(dev, ep, seq, "stored plaintext differs from the sealed one")
                try:
                    want = records.decode(opened.plaintext)
                except records.RecordError:
                    want = None
                if (None if fields is None else json.loads(fields)) != (
                        None if want is None else json.loads(json.dumps(want))):
                    problem(dev, ep, seq, "stored fields differ from the sealed record")
            elif opened.kind == "checkpoint":
                counts["checkpoints"] += 1
                cps.setdefault((dev, ep), {})[seq] = opened
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
        # The chain of signed objects of each epoch: tiling and prev links.
        for (dev, ep), by_seq in sorted(cps.items()):
            expect_first, expect_prev, what = 1, epoch_hash.get((dev, ep)), "the epoch record"
            for seq in sorted(by_seq):
                cp = by_seq[seq]
                if cp.first_seq != expect_first:
                    problem(dev, ep, seq, "checkpoint covers from %d, the previous signed "
                            "object ends at %d: a checkpoint covering %d-%d is missing"
                            % (cp.first_seq, expect_first - 1, expect_first,
                               cp.first_seq - 2) if cp.first_seq > expect_first else
                            "checkpoint overlaps the one before (from %d, expected %d)"
                            % (cp.first_seq, expect_first))
                elif expect_prev is not None and cp.prev != expect_prev:
                    problem(dev, ep, seq, "checkpoint prev does not name %s" % what)
                expect_first, expect_prev = seq + 1, cp.payload_hash
                what = "checkpoint %d" % seq
        # Where each epoch ended, as the next epoch's record names it.
        for dev, ep, (pe, end_seq, end_hash) in prevs:
            have = cps.get((dev, pe), {})
            if not have and (dev, pe) not in epoch_hash:
                continue  # nothing of that epoch ever arrived: a gap, not an alteration
            closing = have.get(end_seq)
            if closing is None:
                problem(dev, pe, end_seq, "epoch %d's record names closing checkpoint %d of "
                        "epoch %d: it is not stored" % (ep, end_seq, pe))
                continue
            if closing.payload_hash != end_hash:
                problem(dev, pe, end_seq, "closing checkpoint differs from the one epoch %d's "
                        "record names" % ep)
            top = last_stored.get((dev, pe), -1)
            if top > end_seq:
                problem(dev, pe, top, "stored beyond the epoch's closing checkpoint (%d)"
                        % end_seq)
        # What the ingest recorded as a checkpoint must still be stored.
        for dev, ep, seq in db.execute("SELECT device, epoch, seq FROM checkpoints ORDER BY "
                                       "device, epoch, seq").fetchall():
            if seq not in cps.get((dev, ep), {}):
                problem(dev, ep, seq, "checkpoint recorded at ingest is not stored")
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
