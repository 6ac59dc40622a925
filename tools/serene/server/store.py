"""The medical server's storage: one SQLite file, every object stored once, and the ledger.

Tables (schema version 1):
    objects      (device, epoch, seq) -> kind, the sealed bytes exactly as received, the opened
                 plaintext, the decoded record fields (JSON, from serene.records.decode), a
                 decode error if an authentic object is not a record this server can read,
                 first and last arrival, duplicate count. Primary key = identity: an object
                 is stored once, whatever the number of copies.
    epochs       (device, epoch) -> the epoch record and next_ack_piv, the Partial IV of the
                 next ack sealed under that epoch's ack key: persisted BEFORE an ack leaves, so
                 an (ack key, nonce) pair is never used twice, across restarts too.
    checkpoints  (device, epoch, seq) -> range, chain, state: pending (not all covered objects
                 are here yet) | verified (the stored bytes hash to the signed chain) | mismatch
    rejects      every refused input with its reason (bounded: the newest REJECTS_KEPT per
                 device are kept; the counters below keep the totals forever)
    counters     (device, name) -> value: frames, objects, duplicates, acks, reject:<reason>...

The ledger (ledger()) is computed from these tables on demand: per device and epoch, the
received ranges, the gaps, what a verified checkpoint proves was never sealed, duplicates,
rejects by reason, the last checkpoint verified.
"""

import json
import pathlib
import sqlite3
import time

SCHEMA_VERSION = 1
REJECTS_KEPT = 1000
RECENT_REJECTS = 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    device TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, sealed BLOB NOT NULL, plaintext BLOB, fields TEXT, decode_error TEXT,
    received_at REAL NOT NULL, last_seen REAL NOT NULL, duplicates INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device, epoch, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS epochs (
    device TEXT NOT NULL, epoch INTEGER NOT NULL, record BLOB NOT NULL,
    next_ack_piv INTEGER NOT NULL DEFAULT 0, first_seen REAL NOT NULL,
    PRIMARY KEY (device, epoch)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    device TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL, count INTEGER NOT NULL, chain BLOB NOT NULL,
    state TEXT NOT NULL, detail TEXT, received_at REAL NOT NULL, checked_at REAL,
    PRIMARY KEY (device, epoch, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejects (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, device TEXT NOT NULL,
    epoch INTEGER, seq INTEGER, kind TEXT, reason TEXT NOT NULL, detail TEXT,
    size INTEGER, head TEXT);
CREATE INDEX IF NOT EXISTS rejects_device ON rejects (device, id);
CREATE TABLE IF NOT EXISTS counters (
    device TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (device, name)) WITHOUT ROWID;
"""


class StoreError(Exception):
    """The database cannot be used (missing, of another schema, corrupt)."""


def db_path(home):
    return pathlib.Path(home) / "server" / "ingest.sqlite3"


def ranges(seqs):
    """Sorted ints -> [[first, last], ...] of consecutive runs."""
    out = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


class Store:
    """One connection, used by one thread (the ingest worker, or a report)."""

    def __init__(self, path, readonly=False):
        self.path = pathlib.Path(path)
        if readonly:
            if not self.path.exists():
                raise StoreError("no database at %s (has the server run?)" % self.path)
            self.db = sqlite3.connect("file:%s?mode=ro" % self.path, uri=True)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed object survives a power cut
            self.db.executescript(_SCHEMA)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)",
                            (str(SCHEMA_VERSION),))
            self.db.commit()
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise StoreError("%s: schema %s, this server reads %d"
                             % (self.path, row and row[0], SCHEMA_VERSION))

    def close(self):
        self.db.close()

    def commit(self):
        self.db.commit()

    def rollback(self):
        self.db.rollback()

    # --- writes (the caller commits) ---------------------------------------------------

    def count(self, device, name, n=1):
        self.db.execute(
            "INSERT INTO counters VALUES (?, ?, ?) "
            "ON CONFLICT (device, name) DO UPDATE SET value = value + excluded.value",
            (device, name, n))

    def get_object(self, device, epoch, seq):
        """(kind, sealed bytes) or None."""
        row = self.db.execute("SELECT kind, sealed FROM objects WHERE device=? AND epoch=? "
                              "AND seq=?", (device, epoch, seq)).fetchone()
        return None if row is None else (row[0], bytes(row[1]))

    def add_object(self, device, epoch, seq, kind, sealed, plaintext=None, fields=None,
                   decode_error=None, now=None):
        now = time.time() if now is None else now
        self.db.execute(
            "INSERT INTO objects (device, epoch, seq, kind, sealed, plaintext, fields, "
            "decode_error, received_at, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (device, epoch, seq, kind, bytes(sealed), plaintext,
             None if fields is None else json.dumps(fields, sort_keys=True), decode_error,
             now, now))

    def add_duplicate(self, device, epoch, seq, now=None):
        self.db.execute("UPDATE objects SET duplicates = duplicates + 1, last_seen = ? "
                        "WHERE device=? AND epoch=? AND seq=?",
                        (time.time() if now is None else now, device, epoch, seq))

    def add_epoch(self, device, epoch, record, now=None):
        self.db.execute("INSERT OR IGNORE INTO epochs (device, epoch, record, first_seen) "
                        "VALUES (?, ?, ?, ?)",
                        (device, epoch, bytes(record), time.time() if now is None else now))

    def epochs(self):
        """[(device, epoch, record bytes, next_ack_piv)] for restoring the verifier."""
        return [(d, e, bytes(r), p) for d, e, r, p in self.db.execute(
            "SELECT device, epoch, record, next_ack_piv FROM epochs ORDER BY device, epoch")]

    def set_next_ack_piv(self, device, epoch, piv):
        self.db.execute("UPDATE epochs SET next_ack_piv = ? WHERE device=? AND epoch=?",
                        (piv, device, epoch))

    def seqs(self, device, epoch):
        return [s for (s,) in self.db.execute(
            "SELECT seq FROM objects WHERE device=? AND epoch=? ORDER BY seq", (device, epoch))]

    def sealed_in_range(self, device, epoch, first, end):
        """{seq: sealed} of the records and events with first <= seq < end."""
        return {s: bytes(b) for s, b in self.db.execute(
            "SELECT seq, sealed FROM objects WHERE device=? AND epoch=? AND seq>=? AND seq<? "
            "AND kind IN ('record', 'event')", (device, epoch, first, end))}

    def add_checkpoint(self, device, epoch, seq, first_seq, count, chain, now=None):
        self.db.execute(
            "INSERT OR IGNORE INTO checkpoints (device, epoch, seq, first_seq, count, chain, "
            "state, received_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
            (device, epoch, seq, first_seq, count, bytes(chain),
             time.time() if now is None else now))

    def pending_checkpoints(self, device, epoch):
        return [tuple(r) for r in self.db.execute(
            "SELECT seq, first_seq, count FROM checkpoints WHERE device=? AND epoch=? "
            "AND state='pending' ORDER BY seq", (device, epoch))]

    def verified_ranges(self, device, epoch):
        """[(first_seq, end)] of the epoch's verified checkpoints: every seq in
        first_seq <= s < end is stored or proven never sealed."""
        return [tuple(r) for r in self.db.execute(
            "SELECT first_seq, seq FROM checkpoints WHERE device=? AND epoch=? "
            "AND state='verified'", (device, epoch))]

    def set_checkpoint_state(self, device, epoch, seq, state, detail=None, now=None):
        self.db.execute("UPDATE checkpoints SET state=?, detail=?, checked_at=? "
                        "WHERE device=? AND epoch=? AND seq=?",
                        (state, detail, time.time() if now is None else now, device, epoch,
                         seq))

    def add_reject(self, device, reason, detail="", epoch=None, seq=None, kind=None,
                   payload=None, now=None):
        """Log a refused input (its size and first 32 bytes in hex, never more) and count it.
        Only the newest REJECTS_KEPT rows per device are kept: a flood cannot fill the disk."""
        head = None if payload is None else bytes(payload[:32]).hex()
        self.db.execute(
            "INSERT INTO rejects (at, device, epoch, seq, kind, reason, detail, size, head) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (time.time() if now is None else now, device, epoch, seq, kind, reason,
             (detail or "")[:500], None if payload is None else len(payload), head))
        self.count(device, "reject:" + reason)
        self.db.execute(
            "DELETE FROM rejects WHERE device=? AND id <= (SELECT id FROM rejects "
            "WHERE device=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (device, device, REJECTS_KEPT))

    # --- reads ----------------------------------------------------------------------------

    def records(self, device, epoch=None):
        """Decoded records and events of a device, by epoch number then seq."""
        q = ("SELECT epoch, seq, kind, fields, decode_error, received_at FROM objects "
             "WHERE device=? AND kind IN ('record', 'event')")
        args = [device]
        if epoch is not None:
            q += " AND epoch=?"
            args.append(epoch)
        out = []
        for e, s, k, f, err, at in self.db.execute(q + " ORDER BY epoch, seq", args):
            out.append({"epoch": e, "seq": s, "kind": k,
                        "fields": None if f is None else json.loads(f),
                        "decode_error": err, "received_at": at})
        return out

    def devices(self):
        rows = self.db.execute(
            "SELECT device FROM objects UNION SELECT device FROM rejects "
            "UNION SELECT device FROM counters").fetchall()
        return sorted(r[0] for r in rows)

    def ledger(self, registered=()):
        """The completeness ledger of every device seen or registered, as plain data."""
        registered = set(registered)
        out = {}
        for dev in sorted(set(self.devices()) | registered):
            out[dev] = self.device_ledger(dev, dev in registered)
        return out

    def device_ledger(self, dev, registered=True):
        db = self.db
        counters = dict(db.execute("SELECT name, value FROM counters WHERE device=?", (dev,)))
        epochs = []
        total_gaps = total_objects = total_dups = 0
        cps_all = {}
        for (ep,) in db.execute("SELECT DISTINCT epoch FROM objects WHERE device=? "
                                "ORDER BY epoch DESC", (dev,)).fetchall():
            seqs = self.seqs(dev, ep)
            have = set(seqs)
            dups, first_seen, last_seen = db.execute(
                "SELECT SUM(duplicates), MIN(received_at), MAX(last_seen) FROM objects "
                "WHERE device=? AND epoch=?", (dev, ep)).fetchone()
            cps = [dict(zip(("seq", "first_seq", "count", "state", "detail", "checked_at"), r))
                   for r in db.execute("SELECT seq, first_seq, count, state, detail, checked_at "
                                       "FROM checkpoints WHERE device=? AND epoch=? "
                                       "ORDER BY seq", (dev, ep))]
            cps_all[ep] = cps
            # A verified checkpoint proves its range holds exactly the objects stored: the
            # other sequence numbers in it were consumed without a sealed object.
            skipped = set()
            for cp in cps:
                if cp["state"] == "verified":
                    skipped |= set(range(cp["first_seq"], cp["seq"])) - have
            top = seqs[-1]
            missing = sorted(set(range(0, top + 1)) - have - skipped)
            kinds = dict(db.execute("SELECT kind, COUNT(*) FROM objects WHERE device=? AND "
                                    "epoch=? GROUP BY kind", (dev, ep)))
            undecodable = db.execute("SELECT COUNT(*) FROM objects WHERE device=? AND epoch=? "
                                     "AND decode_error IS NOT NULL", (dev, ep)).fetchone()[0]
            epochs.append({
                "epoch": ep,
                "objects": len(seqs),
                "by_kind": kinds,
                "highest_seq": top,
                "received": ranges(seqs),
                "gaps": ranges(missing),
                "missing": len(missing),
                "never_sealed": ranges(sorted(skipped)),
                "duplicates": dups or 0,
                "undecodable": undecodable,
                "checkpoints": {s: sum(1 for c in cps if c["state"] == s)
                                for s in ("verified", "pending", "mismatch")},
                "first_received_at": first_seen,
                "last_received_at": last_seen,
            })
            total_gaps += len(missing)
            total_objects += len(seqs)
            total_dups += dups or 0
        last_cp = db.execute(
            "SELECT epoch, seq, first_seq, count, checked_at FROM checkpoints "
            "WHERE device=? AND state='verified' ORDER BY checked_at DESC, seq DESC LIMIT 1",
            (dev,)).fetchone()
        rejects = {k[len("reject:"):]: v for k, v in counters.items() if k.startswith("reject:")}
        recent = [dict(zip(("at", "epoch", "seq", "kind", "reason", "detail", "size", "head"),
                           r))
                  for r in db.execute("SELECT at, epoch, seq, kind, reason, detail, size, head "
                                      "FROM rejects WHERE device=? ORDER BY id DESC LIMIT ?",
                                      (dev, RECENT_REJECTS))]
        mismatches = sum(e["checkpoints"]["mismatch"] for e in epochs)
        return {
            "device": dev,
            "registered": registered,
            "objects": total_objects,
            "missing": total_gaps,
            "duplicates": total_dups,
            "epochs": epochs,
            "last_checkpoint": None if last_cp is None else dict(zip(
                ("epoch", "seq", "first_seq", "count", "verified_at"), last_cp)),
            "checkpoint_mismatches": mismatches,
            "rejects": rejects,
            "rejected": sum(rejects.values()),
            "recent_rejects": recent,
            "counters": {k: v for k, v in counters.items() if not k.startswith("reject:")},
            # Complete = every sequence number up to the highest seen is here or proven never
            # sealed, and no stored object contradicts a signed checkpoint.
            "complete": bool(epochs) and total_gaps == 0 and mismatches == 0,
        }
