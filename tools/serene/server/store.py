"""The medical server's storage: one SQLite file, every object stored once, and the ledger.

Tables (schema version 2; an older database is refused with a clear message):
    objects      (device, epoch, seq) -> kind ("epoch", "checkpoint" from the signed payload,
                 "record" for every sealed object: its record kind is in `fields`), the
                 CANONICAL sealed bytes (contract A: no kid), the opened plaintext, the decoded
                 record fields (JSON, serene.records.decode), a decode error if an authentic
                 object is not a record this server can read, first and last arrival,
                 duplicate count. Primary key = identity: an object is stored once.
    received     (device, epoch, first_seq) -> last_seq: the stored sequence numbers as
                 RANGES (kept merged as objects arrive): state grows with the number of
                 ranges, never with sequence values.
    epochs       (device, epoch) -> the epoch record, the SHA-256 of its payload, and the v2
                 record's prev (prev_epoch, end_seq, end_hash: where the previous epoch ended).
    ack_pivs     (device, epoch, worker) -> the last ack Partial IV that worker sealed under
                 the epoch's ack key (contract E), persisted in the transaction of the ack.
    checkpoints  (device, epoch, seq) -> range, chain, prev, payload hash, state: pending
                 (not all covered objects are here yet) | verified (the stored bytes hash to
                 the signed chain) | mismatch; link: ok (prev names the stored previous
                 signed object) | pending (it is not here yet) | broken.
    rejects      a bounded sample of refused inputs (size, first bytes): the newest
                 REJECTS_KEPT per device. Rejects are counted in memory and written once per
                 commit (one row per (device, reason) touched), never a row and a commit each.
    counters     (device, name) -> value: frames, objects, duplicates, acks, reject:<reason>...
    device_state (device) -> acks_failing (JSON evidence, or NULL)
    workers      (worker_id) -> owner, heartbeat: the lease of a running ingest's worker id

The ledger (ledger()) is computed from these tables on demand, by range arithmetic: per device
and epoch, the received ranges, the gaps, what a verified checkpoint proves was never sealed,
whether the epoch is closed, duplicates, rejects by reason, the last checkpoint verified.
"""

import collections
import json
import pathlib
import sqlite3
import time

SCHEMA_VERSION = 2
REJECTS_KEPT = 1000
RECENT_REJECTS = 20
#: per device and commit, at most this many sample rows are written (the counts are exact)
SAMPLES_PER_COMMIT = 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    device TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, sealed BLOB NOT NULL, plaintext BLOB, fields TEXT, decode_error TEXT,
    received_at REAL NOT NULL, last_seen REAL NOT NULL, duplicates INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device, epoch, seq));
CREATE TABLE IF NOT EXISTS received (
    device TEXT NOT NULL, epoch INTEGER NOT NULL, first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL, PRIMARY KEY (device, epoch, first_seq));
CREATE INDEX IF NOT EXISTS received_last ON received (device, epoch, last_seq);
CREATE TABLE IF NOT EXISTS epochs (
    device TEXT NOT NULL, epoch INTEGER NOT NULL, record BLOB NOT NULL,
    payload_hash BLOB, prev_epoch INTEGER, prev_end_seq INTEGER, prev_end_hash BLOB,
    first_seen REAL NOT NULL, PRIMARY KEY (device, epoch));
CREATE TABLE IF NOT EXISTS ack_pivs (
    device TEXT NOT NULL, epoch INTEGER NOT NULL, worker INTEGER NOT NULL,
    last_piv INTEGER NOT NULL, PRIMARY KEY (device, epoch, worker));
CREATE TABLE IF NOT EXISTS checkpoints (
    device TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL, count INTEGER NOT NULL, chain BLOB NOT NULL,
    prev BLOB, payload_hash BLOB, state TEXT NOT NULL, link TEXT NOT NULL DEFAULT 'pending',
    detail TEXT, received_at REAL NOT NULL, checked_at REAL,
    PRIMARY KEY (device, epoch, seq));
CREATE INDEX IF NOT EXISTS checkpoints_first ON checkpoints (device, epoch, first_seq);
CREATE TABLE IF NOT EXISTS rejects (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, device TEXT NOT NULL,
    epoch INTEGER, seq INTEGER, kind TEXT, reason TEXT NOT NULL, detail TEXT,
    size INTEGER, head TEXT);
CREATE INDEX IF NOT EXISTS rejects_device ON rejects (device, id);
CREATE TABLE IF NOT EXISTS counters (
    device TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (device, name));
CREATE TABLE IF NOT EXISTS device_state (
    device TEXT PRIMARY KEY, acks_failing TEXT);
CREATE TABLE IF NOT EXISTS workers (
    worker_id INTEGER PRIMARY KEY, owner TEXT NOT NULL, started_at REAL NOT NULL,
    heartbeat REAL NOT NULL);
"""


class StoreError(Exception):
    """The database cannot be used (missing, of another schema, corrupt)."""


def db_path(home):
    return pathlib.Path(home) / "server" / "ingest.sqlite3"


# --- ranges: [[first, last], ...] inclusive, sorted, disjoint, adjacent ones merged ---------


def ranges(seqs):
    """Sorted ints -> [[first, last], ...] of consecutive runs."""
    out = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def merge(rs):
    """Any [[a, b], ...] -> sorted, disjoint, adjacent ones merged."""
    out = []
    for a, b in sorted(rs):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def subtract(rs, minus):
    """rs - minus (both merged): O(len(rs) + len(minus))."""
    out = []
    j = 0
    for a, b in rs:
        while j < len(minus) and minus[j][1] < a:
            j += 1
        k = j
        while a <= b:
            if k < len(minus) and minus[k][0] <= b:
                ma, mb = minus[k]
                if ma > a:
                    out.append([a, ma - 1])
                a = max(a, mb + 1)
                k += 1
            else:
                out.append([a, b])
                break
    return out


def total(rs):
    return sum(b - a + 1 for a, b in rs)


def intersect(rs, other):
    return subtract(rs, subtract(rs, other))


class Store:
    """One connection, used by one thread (the ingest worker, or a report)."""

    def __init__(self, path, readonly=False):
        self.path = pathlib.Path(path)
        self._rejects = {}  # (device, reason) -> count, flushed at commit
        self._samples = collections.defaultdict(lambda: collections.deque(
            maxlen=SAMPLES_PER_COMMIT))
        if readonly:
            if not self.path.exists():
                raise StoreError("no database at %s (has the server run?)" % self.path)
            self.db = sqlite3.connect("file:%s?mode=ro" % self.path, uri=True)
            self._check_schema()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed object survives a power cut
            self.db.execute("PRAGMA busy_timeout=10000")  # several ingest workers share it
            self._check_schema(fresh_ok=True)
            self.db.executescript(_SCHEMA)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)",
                            (str(SCHEMA_VERSION),))
            self.db.commit()
            self._check_schema()

    def _check_schema(self, fresh_ok=False):
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.OperationalError:
            row = None
            if fresh_ok:
                return
        if row is None and fresh_ok:
            return
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise StoreError(
                "%s: database schema %s, this server reads schema %d (received ranges, ack "
                "nonces per worker, checkpoint links): move the old database aside and start "
                "a fresh one" % (self.path, row and row[0], SCHEMA_VERSION))

    def close(self):
        self.db.close()

    def commit(self):
        self._flush_rejects()
        self.db.commit()

    def rollback(self):
        self._rejects.clear()
        self._samples.clear()
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
        self._add_received(device, epoch, seq)

    def _add_received(self, device, epoch, seq):
        db = self.db
        left = db.execute("SELECT first_seq FROM received WHERE device=? AND epoch=? AND "
                          "last_seq=?", (device, epoch, seq - 1)).fetchone()
        right = db.execute("SELECT last_seq FROM received WHERE device=? AND epoch=? AND "
                           "first_seq=?", (device, epoch, seq + 1)).fetchone()
        if left and right:
            db.execute("DELETE FROM received WHERE device=? AND epoch=? AND first_seq=?",
                       (device, epoch, seq + 1))
            db.execute("UPDATE received SET last_seq=? WHERE device=? AND epoch=? AND "
                       "first_seq=?", (right[0], device, epoch, left[0]))
        elif left:
            db.execute("UPDATE received SET last_seq=? WHERE device=? AND epoch=? AND "
                       "first_seq=?", (seq, device, epoch, left[0]))
        elif right:
            db.execute("UPDATE received SET first_seq=? WHERE device=? AND epoch=? AND "
                       "first_seq=?", (seq, device, epoch, seq + 1))
        else:
            db.execute("INSERT INTO received VALUES (?, ?, ?, ?)", (device, epoch, seq, seq))

    def add_duplicate(self, device, epoch, seq, now=None):
        self.db.execute("UPDATE objects SET duplicates = duplicates + 1, last_seen = ? "
                        "WHERE device=? AND epoch=? AND seq=?",
                        (time.time() if now is None else now, device, epoch, seq))

    def add_epoch(self, device, epoch, record, now=None, payload_hash=None, prev=None):
        pe, end_seq, end_hash = prev if prev is not None else (None, None, None)
        self.db.execute(
            "INSERT OR IGNORE INTO epochs (device, epoch, record, payload_hash, prev_epoch, "
            "prev_end_seq, prev_end_hash, first_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (device, epoch, bytes(record), payload_hash, pe, end_seq, end_hash,
             time.time() if now is None else now))

    def epochs(self):
        """[(device, epoch, record bytes, 0)] for restoring the verifier (the last element
        is kept for compatibility: ack Partial IVs are in ack_pivs)."""
        return [(d, e, bytes(r), 0) for d, e, r in self.db.execute(
            "SELECT device, epoch, record FROM epochs ORDER BY device, epoch")]

    def epoch_record(self, device, epoch):
        row = self.db.execute("SELECT record FROM epochs WHERE device=? AND epoch=?",
                              (device, epoch)).fetchone()
        return None if row is None else bytes(row[0])

    def epoch_info(self, device, epoch):
        """{payload_hash, prev} of a stored epoch record, or None."""
        row = self.db.execute("SELECT payload_hash, prev_epoch, prev_end_seq, prev_end_hash "
                              "FROM epochs WHERE device=? AND epoch=?",
                              (device, epoch)).fetchone()
        if row is None:
            return None
        h, pe, es, eh = row
        return {"payload_hash": None if h is None else bytes(h),
                "prev": None if pe is None else (pe, es, bytes(eh))}

    def named_end(self, device, epoch):
        """(end_seq, end_hash, by_epoch) if a stored epoch record names where `epoch` ended."""
        row = self.db.execute("SELECT prev_end_seq, prev_end_hash, epoch FROM epochs WHERE "
                              "device=? AND prev_epoch=? ORDER BY epoch LIMIT 1",
                              (device, epoch)).fetchone()
        return None if row is None else (row[0], bytes(row[1]), row[2])

    # ack nonces (contract E)

    def last_ack_piv(self, device, epoch, worker):
        row = self.db.execute("SELECT last_piv FROM ack_pivs WHERE device=? AND epoch=? AND "
                              "worker=?", (device, epoch, worker)).fetchone()
        return -1 if row is None else row[0]

    def set_ack_piv(self, device, epoch, worker, piv):
        self.db.execute(
            "INSERT INTO ack_pivs VALUES (?, ?, ?, ?) ON CONFLICT (device, epoch, worker) "
            "DO UPDATE SET last_piv = excluded.last_piv", (device, epoch, worker, piv))

    # worker leases

    def take_worker(self, worker_id, owner, now, lease_s, dead=None):
        """Take the lease of worker_id for `owner` (committed at once); False if another
        owner holds it with a heartbeat younger than lease_s (unless it is `dead`)."""
        db = self.db
        try:
            cur = db.execute("UPDATE workers SET owner=?, started_at=?, heartbeat=? WHERE "
                             "worker_id=? AND (owner=? OR heartbeat < ? OR owner=?)",
                             (owner, now, now, worker_id, owner, now - lease_s, dead))
            if cur.rowcount == 0:
                try:
                    db.execute("INSERT INTO workers VALUES (?, ?, ?, ?)",
                               (worker_id, owner, now, now))
                except sqlite3.IntegrityError:
                    db.rollback()
                    return False
            db.commit()
            return True
        except Exception:
            db.rollback()
            raise

    def worker_lease(self, worker_id):
        row = self.db.execute("SELECT owner, heartbeat FROM workers WHERE worker_id=?",
                              (worker_id,)).fetchone()
        return None if row is None else tuple(row)

    def heartbeat(self, worker_id, owner, now):
        """Renew the lease (in the current transaction); False if it is no longer ours."""
        cur = self.db.execute("UPDATE workers SET heartbeat=? WHERE worker_id=? AND owner=?",
                              (now, worker_id, owner))
        return cur.rowcount == 1

    def release_worker(self, worker_id, owner):
        self.db.execute("DELETE FROM workers WHERE worker_id=? AND owner=?", (worker_id, owner))
        self.db.commit()

    # device state

    def set_acks_failing(self, device, evidence):
        self.db.execute("INSERT INTO device_state VALUES (?, ?) ON CONFLICT (device) DO "
                        "UPDATE SET acks_failing = excluded.acks_failing",
                        (device, None if evidence is None else json.dumps(evidence,
                                                                          sort_keys=True)))

    def acks_failing(self, device):
        row = self.db.execute("SELECT acks_failing FROM device_state WHERE device=?",
                              (device,)).fetchone()
        return None if row is None or row[0] is None else json.loads(row[0])

    # ranges and checkpoints

    def received_ranges(self, device, epoch):
        return [[a, b] for a, b in self.db.execute(
            "SELECT first_seq, last_seq FROM received WHERE device=? AND epoch=? "
            "ORDER BY first_seq", (device, epoch))]

    def seqs(self, device, epoch):
        """Every stored seq of an epoch (small epochs, tests; the ledger uses ranges)."""
        return [s for (s,) in self.db.execute(
            "SELECT seq FROM objects WHERE device=? AND epoch=? ORDER BY seq", (device, epoch))]

    def sealed_in_range(self, device, epoch, first, end):
        """{seq: sealed} of the sealed objects with first <= seq < end."""
        return {s: bytes(b) for s, b in self.db.execute(
            "SELECT seq, sealed FROM objects WHERE device=? AND epoch=? AND seq>=? AND seq<? "
            "AND kind = 'record'", (device, epoch, first, end))}

    def count_sealed_in_range(self, device, epoch, first, end):
        return self.db.execute(
            "SELECT COUNT(*) FROM objects WHERE device=? AND epoch=? AND seq>=? AND seq<? "
            "AND kind = 'record'", (device, epoch, first, end)).fetchone()[0]

    def add_checkpoint(self, device, epoch, seq, first_seq, count, chain, now=None, prev=None,
                       payload_hash=None, link="pending", detail=None):
        self.db.execute(
            "INSERT OR IGNORE INTO checkpoints (device, epoch, seq, first_seq, count, chain, "
            "prev, payload_hash, state, link, detail, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
            (device, epoch, seq, first_seq, count, bytes(chain), prev, payload_hash, link,
             detail, time.time() if now is None else now))

    def checkpoint(self, device, epoch, seq):
        """A stored checkpoint's row as a dict, or None."""
        row = self.db.execute(
            "SELECT seq, first_seq, count, prev, payload_hash, state, link FROM checkpoints "
            "WHERE device=? AND epoch=? AND seq=?", (device, epoch, seq)).fetchone()
        return None if row is None else _cp(row)

    def checkpoint_starting_at(self, device, epoch, first_seq):
        row = self.db.execute(
            "SELECT seq, first_seq, count, prev, payload_hash, state, link FROM checkpoints "
            "WHERE device=? AND epoch=? AND first_seq=? ORDER BY seq LIMIT 1",
            (device, epoch, first_seq)).fetchone()
        return None if row is None else _cp(row)

    def overlapping_checkpoints(self, device, epoch, first_seq, seq):
        """Other checkpoints whose [first_seq, seq] meets this one's."""
        return [_cp(r) for r in self.db.execute(
            "SELECT seq, first_seq, count, prev, payload_hash, state, link FROM checkpoints "
            "WHERE device=? AND epoch=? AND first_seq<=? AND seq>=? AND seq<>?",
            (device, epoch, seq, first_seq, seq))]

    def set_checkpoint_link(self, device, epoch, seq, link, detail=None):
        self.db.execute("UPDATE checkpoints SET link=?, detail=COALESCE(?, detail) WHERE "
                        "device=? AND epoch=? AND seq=?", (link, detail, device, epoch, seq))

    def pending_checkpoints(self, device, epoch, covering=None):
        """(seq, first_seq, count) of the pending checkpoints (those whose range holds
        `covering`, if given)."""
        q = ("SELECT seq, first_seq, count FROM checkpoints WHERE device=? AND epoch=? "
             "AND state='pending'")
        args = [device, epoch]
        if covering is not None:
            q += " AND first_seq<=? AND seq>?"
            args += [covering, covering]
        return [tuple(r) for r in self.db.execute(q + " ORDER BY seq", args)]

    def verified_ranges(self, device, epoch):
        """[(first_seq, end)] of the epoch's verified checkpoints: every seq in
        first_seq <= s < end is stored or proven never sealed."""
        return [tuple(r) for r in self.db.execute(
            "SELECT first_seq, seq FROM checkpoints WHERE device=? AND epoch=? "
            "AND state='verified' ORDER BY first_seq", (device, epoch))]

    def set_checkpoint_state(self, device, epoch, seq, state, detail=None, now=None):
        self.db.execute("UPDATE checkpoints SET state=?, detail=?, checked_at=? "
                        "WHERE device=? AND epoch=? AND seq=?",
                        (state, detail, time.time() if now is None else now, device, epoch,
                         seq))

    # rejects: counted in memory, written once per commit

    def add_reject(self, device, reason, detail="", epoch=None, seq=None, kind=None,
                   payload=None, now=None, size=None):
        """Count a refused input; keep it (its size and first 32 bytes in hex, never more) in
        a bounded sample. Nothing is written until commit()."""
        key = (device, reason)
        self._rejects[key] = self._rejects.get(key, 0) + 1
        if size is None and payload is not None:
            size = len(payload)
        self._samples[device].append((
            time.time() if now is None else now, device, epoch, seq, kind, reason,
            (detail or "")[:500], size, None if payload is None else bytes(payload[:32]).hex()))

    def _flush_rejects(self):
        if not self._rejects:
            return
        for (dev, reason), n in self._rejects.items():
            self.count(dev, "reject:" + reason, n)
        self._rejects.clear()
        for dev, rows in self._samples.items():
            self.db.executemany(
                "INSERT INTO rejects (at, device, epoch, seq, kind, reason, detail, size, head) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", list(rows))
            self.db.execute(
                "DELETE FROM rejects WHERE device=? AND id <= (SELECT id FROM rejects "
                "WHERE device=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (dev, dev, REJECTS_KEPT))
        self._samples.clear()

    # --- reads ----------------------------------------------------------------------------

    def records(self, device, epoch=None):
        """Decoded records and events of a device, by epoch number then seq."""
        q = ("SELECT epoch, seq, kind, fields, decode_error, received_at FROM objects "
             "WHERE device=? AND kind = 'record'")
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

    def _epoch_ledger(self, dev, ep, newest):
        db = self.db
        received = self.received_ranges(dev, ep)
        n, dups, first_seen, last_seen, top = db.execute(
            "SELECT COUNT(*), SUM(duplicates), MIN(received_at), MAX(last_seen), MAX(seq) "
            "FROM objects WHERE device=? AND epoch=?", (dev, ep)).fetchone()
        cps = [dict(zip(("seq", "first_seq", "count", "state", "link", "detail", "checked_at",
                         "payload_hash"), r))
               for r in db.execute("SELECT seq, first_seq, count, state, link, detail, "
                                   "checked_at, payload_hash FROM checkpoints WHERE device=? "
                                   "AND epoch=? ORDER BY seq", (dev, ep))]
        # A verified checkpoint proves its range holds exactly the objects stored: the
        # other sequence numbers in it were consumed without a sealed object.
        covered = merge([[c["first_seq"], c["seq"]] for c in cps if c["state"] == "verified"])
        skipped = subtract(covered, received)
        # Where the epoch ended, if the next epoch's record says so (contract D).
        end = self.named_end(dev, ep)
        tail = "open"
        if end is not None:
            end_seq, end_hash, by = end
            closing = next((c for c in cps if c["seq"] == end_seq), None)
            if closing is None:
                tail = "closing checkpoint missing"
            elif closing["payload_hash"] is not None and bytes(closing["payload_hash"]) != \
                    end_hash:
                tail = "closing checkpoint mismatch"
            elif closing["state"] != "verified":
                tail = "closing checkpoint pending"
            else:
                tail = "closed"
            top = max(top, end_seq)
        expected = [[0, top]]
        missing_rs = subtract(subtract(expected, received), covered)
        beyond = [] if end is None else subtract(received, [[0, end[0]]])
        kinds = dict(db.execute("SELECT kind, COUNT(*) FROM objects WHERE device=? AND "
                                "epoch=? GROUP BY kind", (dev, ep)))
        undecodable = db.execute("SELECT COUNT(*) FROM objects WHERE device=? AND epoch=? "
                                 "AND decode_error IS NOT NULL", (dev, ep)).fetchone()[0]
        return {
            "epoch": ep,
            "objects": n,
            "by_kind": kinds,
            "highest_seq": top,
            "received": received,
            "gaps": missing_rs,
            "missing": total(missing_rs),
            "never_sealed": skipped,
            "duplicates": dups or 0,
            "undecodable": undecodable,
            "checkpoints": {s: sum(1 for c in cps if c["state"] == s)
                            for s in ("verified", "pending", "mismatch")},
            "checkpoint_links_broken": sum(1 for c in cps if c["link"] == "broken"),
            # closed: the next epoch's record names this epoch's closing checkpoint and it is
            # here and verified; open: no later epoch record names where it ended (yet).
            "tail": tail,
            "closed": tail == "closed",
            "end_seq": None if end is None else end[0],
            "beyond_end": beyond,
            "newest": newest,
            "first_received_at": first_seen,
            "last_received_at": last_seen,
        }

    def device_ledger(self, dev, registered=True):
        db = self.db
        counters = dict(db.execute("SELECT name, value FROM counters WHERE device=?", (dev,)))
        eps = [e for (e,) in db.execute("SELECT DISTINCT epoch FROM objects WHERE device=? "
                                        "ORDER BY epoch DESC", (dev,)).fetchall()]
        epochs = [self._epoch_ledger(dev, ep, i == 0) for i, ep in enumerate(eps)]
        total_gaps = sum(e["missing"] for e in epochs)
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
        broken = sum(e["checkpoint_links_broken"] for e in epochs)
        # Every epoch but the newest must be closed (its end proven by the next record).
        unclosed = [e["epoch"] for e in epochs if not e["newest"] and not e["closed"]]
        failing = self.acks_failing(dev)
        return {
            "device": dev,
            "registered": registered,
            "objects": sum(e["objects"] for e in epochs),
            "missing": total_gaps,
            "duplicates": sum(e["duplicates"] for e in epochs),
            "epochs": epochs,
            "last_checkpoint": None if last_cp is None else dict(zip(
                ("epoch", "seq", "first_seq", "count", "verified_at"), last_cp)),
            "checkpoint_mismatches": mismatches,
            "checkpoint_links_broken": broken,
            "epochs_not_closed": unclosed,
            "acks_failing": failing,
            "rejects": rejects,
            "rejected": sum(rejects.values()),
            "recent_rejects": recent,
            "counters": {k: v for k, v in counters.items() if not k.startswith("reject:")},
            # Complete = every sequence number up to the highest seen (or the end an epoch
            # record names) is here or proven never sealed, no stored object contradicts a
            # signed checkpoint, the checkpoints link up, every older epoch is closed, and
            # the module is not failing to take our acks.
            "complete": bool(epochs) and total_gaps == 0 and mismatches == 0 and broken == 0
            and not unclosed and failing is None,
        }


def _cp(row):
    seq, first, count, prev, h, state, link = row
    return {"seq": seq, "first_seq": first, "count": count,
            "prev": None if prev is None else bytes(prev),
            "payload_hash": None if h is None else bytes(h), "state": state, "link": link}
