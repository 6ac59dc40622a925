"""The medical server's storage: every object stored once, and the ledger.

One database, SQLite (the embedded default: DIR/server/ingest.sqlite3) or PostgreSQL (a URL:
`serene server --db postgresql://...`), through SQLAlchemy 2 Core (server/schema.py: the tables,
the engine, the one Alembic tree that creates and migrates them). One connection per Store;
the caller's batch is one transaction (commit()), each frame a SAVEPOINT in it (savepoint()).

Tables (schema 2, Alembic revisions 0002+; an older database is refused with a clear message):
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
import time

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from . import schema
from .schema import StoreError, db_path  # noqa: F401 - part of this module's API
from .schema import (ack_pivs, checkpoints, counters, device_state, epochs, objects,
                     received, rejects, workers)

SCHEMA_VERSION = 2
REJECTS_KEPT = 1000
RECENT_REJECTS = 20
#: per device and commit, at most this many sample rows are written (the counts are exact)
SAMPLES_PER_COMMIT = 20


def db_url(home, url=None):
    """The database of a server home: `url` (--db), else $SERENE_DB, else the SQLite file."""
    return schema.resolve_url(home, url)


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


B = sa.bindparam
_ENGINES = {}  # (url, readonly) -> pooled Engine (PostgreSQL: connecting costs milliseconds)


def _engine(url, readonly):
    if url.startswith("sqlite"):
        return schema.make_engine(url, readonly)
    key = (url, readonly)
    if key not in _ENGINES:
        _ENGINES[key] = schema.make_engine(url, readonly)
    return _ENGINES[key]


def dispose_engines():
    """Close the pooled PostgreSQL connections of this process (tests, before DROP DATABASE)."""
    for eng in _ENGINES.values():
        eng.dispose()
    _ENGINES.clear()


def _obj_key(t):
    return sa.and_(t.c.device == B("d"), t.c.epoch == B("e"))


class _Sql:
    """The statements of the hot paths, built once per dialect (compiled once by SQLAlchemy's
    cache): upserts are the dialect's INSERT ... ON CONFLICT."""

    def __init__(self, dialect):
        ins = pg_dialect.insert if dialect == "postgresql" else sqlite_dialect.insert
        self.insert = ins
        o, r = objects, received
        self.get_object = sa.select(o.c.kind, o.c.sealed).where(_obj_key(o), o.c.seq == B("s"))
        self.add_object = o.insert()
        self.left = sa.select(r.c.first_seq).where(_obj_key(r), r.c.last_seq == B("s"))
        self.right = sa.select(r.c.last_seq).where(_obj_key(r), r.c.first_seq == B("s"))
        self.del_range = r.delete().where(_obj_key(r), r.c.first_seq == B("f"))
        self.set_last = r.update().where(_obj_key(r), r.c.first_seq == B("f")).values(
            last_seq=B("l"))
        self.set_first = r.update().where(_obj_key(r), r.c.first_seq == B("f")).values(
            first_seq=B("nf"))
        self.add_range = r.insert()
        c = counters
        up = ins(c)
        self.count = up.on_conflict_do_update(index_elements=[c.c.device, c.c.name],
                                              set_={"value": c.c.value + up.excluded.value})
        self.dup = o.update().where(_obj_key(o), o.c.seq == B("s")).values(
            duplicates=o.c.duplicates + 1, last_seen=B("t"))
        self.add_epoch = ins(epochs).on_conflict_do_nothing(
            index_elements=[epochs.c.device, epochs.c.epoch])
        a = ack_pivs
        self.last_piv = sa.select(a.c.last_piv).where(_obj_key(a), a.c.worker == B("w"))
        up = ins(a)
        self.set_piv = up.on_conflict_do_update(
            index_elements=[a.c.device, a.c.epoch, a.c.worker],
            set_={"last_piv": up.excluded.last_piv})
        up = ins(device_state)
        self.set_failing = up.on_conflict_do_update(
            index_elements=[device_state.c.device],
            set_={"acks_failing": up.excluded.acks_failing})
        self.add_checkpoint = ins(checkpoints).on_conflict_do_nothing(
            index_elements=[checkpoints.c.device, checkpoints.c.epoch, checkpoints.c.seq])
        self.ranges = sa.select(r.c.first_seq, r.c.last_seq).where(_obj_key(r)).order_by(
            r.c.first_seq)
        cp = checkpoints
        self.pending = sa.select(cp.c.seq, cp.c.first_seq, cp.c.count).where(
            _obj_key(cp), cp.c.state == "pending").order_by(cp.c.seq)
        self.pending_covering = sa.select(cp.c.seq, cp.c.first_seq, cp.c.count).where(
            _obj_key(cp), cp.c.state == "pending", cp.c.first_seq <= B("c"),
            cp.c.seq > B("c")).order_by(cp.c.seq)
        w = workers
        self.heartbeat = w.update().where(w.c.worker_id == B("w"), w.c.owner == B("o")).values(
            heartbeat=B("t"))

    def compile(self, dialect):
        """The per-object statements compiled once for the dialect: (SQL, parameter order
        or None for named parameters). Store._x runs them on the DBAPI cursor: an execute
        through SQLAlchemy costs ~40 us, several times what SQLite spends on the statement."""
        cols = {
            "add_object": [c.name for c in objects.c],
            "add_range": [c.name for c in received.c],
            "count": ["device", "name", "value"],
            "set_piv": [c.name for c in ack_pivs.c],
        }
        out = {}
        for name in ("get_object", "add_object", "left", "right", "del_range", "set_last",
                     "set_first", "add_range", "count", "dup", "last_piv", "set_piv",
                     "pending", "pending_covering", "heartbeat", "ranges"):
            c = getattr(self, name).compile(dialect=dialect, column_keys=cols.get(name))
            fixed = {k: v for k, v in c.params.items() if v is not None}  # literals
            out[name] = (str(c), tuple(c.positiontup) if dialect.positional else None, fixed)
        self.fast = out


_WRITES = frozenset(("add_object", "del_range", "set_last", "set_first", "add_range", "count",
                     "dup", "set_piv", "heartbeat"))
_CP_COLS = (checkpoints.c.seq, checkpoints.c.first_seq, checkpoints.c.count, checkpoints.c.prev,
            checkpoints.c.payload_hash, checkpoints.c.state, checkpoints.c.link)


class _Frame:
    """A frame's SAVEPOINT (Store.savepoint): rollback() also takes back what the frame added
    to the counters and received seqs held in memory until commit(). The SAVEPOINT statements
    go to the DBAPI cursor, as the hot-path statements do: through SQLAlchemy's begin_nested()
    each was compiled anew, ~135 us a statement, two a frame (the frame cost 1.47 ms instead of
    0.85 ms). The syntax is the same on SQLite and PostgreSQL."""

    __slots__ = ("store", "cur")

    def __init__(self, store, cur):
        self.store, self.cur = store, cur
        cur.execute("SAVEPOINT serene_frame")

    def commit(self):
        self.cur.execute("RELEASE SAVEPOINT serene_frame")
        self.store._undo = None

    def rollback(self):
        st = self.store
        try:
            self.cur.execute("ROLLBACK TO SAVEPOINT serene_frame")
            self.cur.execute("RELEASE SAVEPOINT serene_frame")
        finally:
            for d, key, n in reversed(st._undo or ()):
                if n is None:
                    d[key].pop()
                else:
                    d[key] -= n
                if not d[key]:
                    del d[key]
            st._undo = None


class _Rows(list):
    """Rows of Store.execute (a list; fetchone/fetchall as a DB-API cursor has)."""

    def fetchone(self):
        return self[0] if self else None

    def fetchall(self):
        return list(self)


class Store:
    """One connection, used by one thread (the ingest worker, or a report). `target`: a
    database URL (sqlite:///PATH, postgresql://...) or the path of a SQLite file."""

    def __init__(self, target, readonly=False):
        if schema.is_url(target):
            url = target
        else:
            url = schema.sqlite_url(target)
        u = sa.engine.make_url(url)
        self.url = url
        self.path = None  # the SQLite file, if it is one
        if u.get_backend_name() == "sqlite":
            p = (u.database or "")
            self.path = pathlib.Path(p[5:] if p.startswith("file:") else p)
            self.where = str(self.path)
        else:
            self.where = u.render_as_string(hide_password=True)
        self._rejects = {}  # (device, reason) -> count, flushed at commit
        self._samples = collections.defaultdict(lambda: collections.deque(
            maxlen=SAMPLES_PER_COMMIT))
        if readonly and self.path is not None and not self.path.exists():
            raise StoreError("no database at %s (has the server run?)" % self.path)
        self.engine = _engine(url, readonly)
        self.dialect = self.engine.dialect.name
        self.sql = _Sql(self.dialect)
        self.sql.compile(self.engine.dialect)
        self.conn = None
        self._batch = False  # a savepoint() was taken since the last commit/rollback
        self._wrote = False  # the current transaction has written
        self._counts = {}  # (device, name) -> increment not yet written (commit() writes it)
        self._recv = {}  # (device, epoch) -> stored seqs not yet merged into `received`
        self._undo = None  # what the current frame added to those two (_Frame.rollback)
        try:
            if not readonly:
                schema.migrate(self.engine)
            self.conn = self.engine.connect()
            schema.check_current(self.conn, self.where)
            self.conn.commit()
        except StoreError:
            self.close()
            raise
        except (RuntimeError, sa.exc.SQLAlchemyError) as e:
            self.close()
            if readonly and isinstance(e, sa.exc.OperationalError):  # cannot connect
                raise StoreError("no database at %s (has the server run?): %s"
                                 % (self.where, str(e.orig).strip())) from e
            raise StoreError("%s: %s" % (self.where, e)) from e

    @staticmethod
    def describe(target):
        """Where a database is, for messages (a password in a URL is hidden)."""
        if not schema.is_url(target):
            return str(target)
        u = sa.engine.make_url(target)
        if u.get_backend_name() == "sqlite":
            return u.database
        return u.render_as_string(hide_password=True)

    @property
    def db(self):
        """The SQLAlchemy Connection (its transaction is the caller's batch)."""
        return self.conn

    def close(self):
        if self.conn is not None:
            self.conn.close()
        if self.url.startswith("sqlite"):
            self.engine.dispose()

    def alive(self):
        """Can this store still be used (its connection open and answering)?"""
        if self.conn is None or self.conn.closed:
            return False
        self.conn.execute(sa.text("SELECT 1"))
        return True

    def execute(self, sql, params=()):
        """Run portable SQL with ? placeholders (audits, tests): -> SQLAlchemy Result."""
        parts = sql.split("?")
        if len(parts) - 1 != len(params):
            raise ValueError("%d placeholders, %d parameters" % (len(parts) - 1, len(params)))
        text = parts[0] + "".join(":p%d%s" % (i, part) for i, part in enumerate(parts[1:]))
        res = self.conn.execute(sa.text(text), {"p%d" % i: v for i, v in enumerate(params)})
        return _Rows(res.fetchall()) if res.returns_rows else res

    def in_transaction(self):
        return self.conn.in_transaction()

    def savepoint(self):
        """A SAVEPOINT in the current transaction (begun if none): .commit() releases it,
        .rollback() undoes what was done since."""
        if not self._batch:
            if self.conn.in_transaction():
                # Reads (or due acks) since the last commit: end that transaction, so the
                # batch starts from fresh committed state (see _w).
                self.conn.commit()
                self._wrote = False
            self._batch = True
        self._undo = []
        if not self.conn.in_transaction():
            self.conn.begin()
        return _Frame(self, self.conn.connection.dbapi_connection.cursor())

    def _x(self, name, params):
        """Run a compiled hot-path statement (_Sql.compile) in the current transaction (begun
        through SQLAlchemy if none, so commit() and rollback() cover it) -> DBAPI cursor."""
        conn = self.conn
        if name in _WRITES:
            self._w()
        if not conn.in_transaction():
            conn.begin()
        sql, order, fixed = self.sql.fast[name]
        if fixed:
            params = dict(fixed, **params)
        cur = conn.connection.dbapi_connection.cursor()
        cur.execute(sql, params if order is None else [params[k] for k in order])
        return cur

    def _w(self):
        """Before a transaction's first write: outside a batch, end the reads before it, so
        the write starts from fresh committed state (SQLite refuses a write in a transaction
        whose snapshot is older than another connection's commit: "database is locked")."""
        if not self._wrote:
            if not self._batch and self.conn.in_transaction():
                self.conn.commit()
            self._wrote = True

    def commit(self):
        self._flush_rejects()  # (adds the reject:<reason> counts)
        self._flush_counts()
        self._flush_received()
        self.conn.commit()
        self._batch = self._wrote = False

    def rollback(self):
        self._rejects.clear()
        self._samples.clear()
        self._counts.clear()
        self._recv.clear()
        self._undo = None
        self._batch = self._wrote = False
        self.conn.rollback()

    # --- writes (the caller commits) ---------------------------------------------------

    def count(self, device, name, n=1):
        """Add n to a counter: kept in memory, written once per key at commit() (one upsert
        per (device, name) a batch touched, not one per frame or object)."""
        key = (device, name)
        self._counts[key] = self._counts.get(key, 0) + n
        if self._undo is not None:
            self._undo.append((self._counts, key, n))

    def get_object(self, device, epoch, seq):
        """(kind, sealed bytes) or None."""
        row = self._x("get_object", {"d": device, "e": epoch, "s": seq}).fetchone()
        return None if row is None else (row[0], bytes(row[1]))

    def add_object(self, device, epoch, seq, kind, sealed, plaintext=None, fields=None,
                   decode_error=None, now=None):
        now = time.time() if now is None else now
        self._x("add_object", {
            "device": device, "epoch": epoch, "seq": seq, "kind": kind, "sealed": bytes(sealed),
            "plaintext": None if plaintext is None else bytes(plaintext),
            "fields": None if fields is None else json.dumps(fields, sort_keys=True),
            "decode_error": decode_error, "received_at": now, "last_seen": now,
            "duplicates": 0})
        # The received ranges are merged at commit(), a run of consecutive seqs at a time.
        key = (device, epoch)
        self._recv.setdefault(key, []).append(seq)
        if self._undo is not None:
            self._undo.append((self._recv, key, None))

    def _flush_received(self):
        for (device, epoch), seqs in self._recv.items():
            for a, b in ranges(sorted(seqs)):
                self._add_received(device, epoch, a, b)
        self._recv.clear()

    def _flush_counts(self):
        for (device, name), n in self._counts.items():
            self._x("count", {"device": device, "name": name, "value": n})
        self._counts.clear()

    def _add_received(self, device, epoch, seq, last=None):
        """Merge the new run seq..last (none of it stored before) into the ranges."""
        last = seq if last is None else last
        x = self._x
        k = {"d": device, "e": epoch}
        left = x("left", dict(k, s=seq - 1)).fetchone()
        right = x("right", dict(k, s=last + 1)).fetchone()
        if left and right:
            x("del_range", dict(k, f=last + 1))
            x("set_last", dict(k, f=left[0], l=right[0]))
        elif left:
            x("set_last", dict(k, f=left[0], l=last))
        elif right:
            x("set_first", dict(k, f=last + 1, nf=seq))
        else:
            x("add_range", {"device": device, "epoch": epoch, "first_seq": seq,
                            "last_seq": last})

    def add_duplicate(self, device, epoch, seq, now=None):
        self._x("dup", {"d": device, "e": epoch, "s": seq,
                        "t": time.time() if now is None else now})

    def add_epoch(self, device, epoch, record, now=None, payload_hash=None, prev=None):
        self._w()
        pe, end_seq, end_hash = prev if prev is not None else (None, None, None)
        self.conn.execute(self.sql.add_epoch, {
            "device": device, "epoch": epoch, "record": bytes(record),
            "payload_hash": payload_hash, "prev_epoch": pe, "prev_end_seq": end_seq,
            "prev_end_hash": end_hash, "first_seen": time.time() if now is None else now})

    def epochs(self):
        """[(device, epoch, record bytes, 0)] for restoring the verifier (the last element
        is kept for compatibility: ack Partial IVs are in ack_pivs)."""
        t = epochs
        return [(d, e, bytes(r), 0) for d, e, r in self.conn.execute(
            sa.select(t.c.device, t.c.epoch, t.c.record).order_by(t.c.device, t.c.epoch))]

    def epoch_record(self, device, epoch):
        t = epochs
        row = self.conn.execute(sa.select(t.c.record).where(
            t.c.device == device, t.c.epoch == epoch)).first()
        return None if row is None else bytes(row[0])

    def epoch_info(self, device, epoch):
        """{payload_hash, prev} of a stored epoch record, or None."""
        t = epochs
        row = self.conn.execute(sa.select(
            t.c.payload_hash, t.c.prev_epoch, t.c.prev_end_seq, t.c.prev_end_hash).where(
            t.c.device == device, t.c.epoch == epoch)).first()
        if row is None:
            return None
        h, pe, es, eh = row
        return {"payload_hash": None if h is None else bytes(h),
                "prev": None if pe is None else (pe, es, bytes(eh))}

    def named_end(self, device, epoch):
        """(end_seq, end_hash, by_epoch) if a stored epoch record names where `epoch` ended."""
        t = epochs
        row = self.conn.execute(sa.select(t.c.prev_end_seq, t.c.prev_end_hash, t.c.epoch).where(
            t.c.device == device, t.c.prev_epoch == epoch).order_by(t.c.epoch).limit(1)).first()
        return None if row is None else (row[0], bytes(row[1]), row[2])

    # ack nonces (contract E)

    def last_ack_piv(self, device, epoch, worker):
        row = self._x("last_piv", {"d": device, "e": epoch, "w": worker}).fetchone()
        return -1 if row is None else row[0]

    def set_ack_piv(self, device, epoch, worker, piv):
        self._x("set_piv", {"device": device, "epoch": epoch, "worker": worker,
                            "last_piv": piv})

    # worker leases

    def take_worker(self, worker_id, owner, now, lease_s, dead=None):
        """Take the lease of worker_id for `owner` (committed at once); False if another
        owner holds it with a heartbeat younger than lease_s (unless it is `dead`)."""
        conn, w = self.conn, workers
        try:
            if conn.in_transaction():
                conn.commit()
            self._batch = self._wrote = False
            free = sa.or_(w.c.owner == owner, w.c.heartbeat < now - lease_s)
            if dead is not None:
                free = sa.or_(free, w.c.owner == dead)
            cur = conn.execute(w.update().where(w.c.worker_id == worker_id, free).values(
                owner=owner, started_at=now, heartbeat=now))
            if cur.rowcount == 0:
                got = conn.execute(self.sql.insert(w).values(
                    worker_id=worker_id, owner=owner, started_at=now,
                    heartbeat=now).on_conflict_do_nothing(index_elements=[w.c.worker_id])
                    .returning(w.c.worker_id)).first()
                if got is None:  # another owner holds it
                    conn.rollback()
                    return False
            conn.commit()
            return True
        except Exception:
            conn.rollback()
            raise

    def worker_lease(self, worker_id):
        w = workers
        row = self.conn.execute(sa.select(w.c.owner, w.c.heartbeat).where(
            w.c.worker_id == worker_id)).first()
        return None if row is None else tuple(row)

    def heartbeat(self, worker_id, owner, now):
        """Renew the lease (in the current transaction); False if it is no longer ours."""
        return self._x("heartbeat", {"w": worker_id, "o": owner, "t": now}).rowcount == 1

    def release_worker(self, worker_id, owner):
        self._w()
        w = workers
        self.conn.execute(w.delete().where(w.c.worker_id == worker_id, w.c.owner == owner))
        self.conn.commit()

    # device state

    def set_acks_failing(self, device, evidence):
        self._w()
        self.conn.execute(self.sql.set_failing, {
            "device": device,
            "acks_failing": None if evidence is None else json.dumps(evidence, sort_keys=True)})

    def acks_failing(self, device):
        t = device_state
        row = self.conn.execute(sa.select(t.c.acks_failing).where(t.c.device == device)).first()
        return None if row is None or row[0] is None else json.loads(row[0])

    # ranges and checkpoints

    def received_ranges(self, device, epoch):
        rs = [[a, b] for a, b in self._x("ranges", {"d": device, "e": epoch}).fetchall()]
        pending = self._recv.get((device, epoch))
        return merge(rs + ranges(sorted(pending))) if pending else rs

    def seqs(self, device, epoch):
        """Every stored seq of an epoch (small epochs, tests; the ledger uses ranges)."""
        o = objects
        return [s for (s,) in self.conn.execute(sa.select(o.c.seq).where(
            o.c.device == device, o.c.epoch == epoch).order_by(o.c.seq))]

    def _in_range(self, cols, device, epoch, first, end):
        o = objects
        return sa.select(*cols).where(o.c.device == device, o.c.epoch == epoch,
                                      o.c.seq >= first, o.c.seq < end, o.c.kind == "record")

    def sealed_in_range(self, device, epoch, first, end):
        """{seq: sealed} of the sealed objects with first <= seq < end."""
        o = objects
        return {s: bytes(b) for s, b in self.conn.execute(
            self._in_range((o.c.seq, o.c.sealed), device, epoch, first, end))}

    def count_sealed_in_range(self, device, epoch, first, end):
        return self.conn.execute(self._in_range(
            (sa.func.count(),), device, epoch, first, end)).scalar()

    def add_checkpoint(self, device, epoch, seq, first_seq, count, chain, now=None, prev=None,
                       payload_hash=None, link="pending", detail=None):
        self._w()
        self.conn.execute(self.sql.add_checkpoint, {
            "device": device, "epoch": epoch, "seq": seq, "first_seq": first_seq,
            "count": count, "chain": bytes(chain), "prev": prev, "payload_hash": payload_hash,
            "state": "pending", "link": link, "detail": detail,
            "received_at": time.time() if now is None else now})

    def _cp_where(self, device, epoch):
        return sa.select(*_CP_COLS).where(checkpoints.c.device == device,
                                          checkpoints.c.epoch == epoch)

    def checkpoint(self, device, epoch, seq):
        """A stored checkpoint's row as a dict, or None."""
        row = self.conn.execute(self._cp_where(device, epoch).where(
            checkpoints.c.seq == seq)).first()
        return None if row is None else _cp(row)

    def checkpoint_starting_at(self, device, epoch, first_seq):
        c = checkpoints
        row = self.conn.execute(self._cp_where(device, epoch).where(
            c.c.first_seq == first_seq).order_by(c.c.seq).limit(1)).first()
        return None if row is None else _cp(row)

    def overlapping_checkpoints(self, device, epoch, first_seq, seq):
        """Other checkpoints whose [first_seq, seq] meets this one's."""
        c = checkpoints
        return [_cp(r) for r in self.conn.execute(self._cp_where(device, epoch).where(
            c.c.first_seq <= seq, c.c.seq >= first_seq, c.c.seq != seq))]

    def set_checkpoint_link(self, device, epoch, seq, link, detail=None):
        self._w()
        c = checkpoints
        self.conn.execute(c.update().where(c.c.device == device, c.c.epoch == epoch,
                                           c.c.seq == seq).values(
            link=link, detail=sa.func.coalesce(sa.cast(detail, sa.Text), c.c.detail)))

    def pending_checkpoints(self, device, epoch, covering=None):
        """(seq, first_seq, count) of the pending checkpoints (those whose range holds
        `covering`, if given)."""
        if covering is None:
            cur = self._x("pending", {"d": device, "e": epoch})
        else:
            cur = self._x("pending_covering", {"d": device, "e": epoch, "c": covering})
        return [tuple(r) for r in cur.fetchall()]

    def verified_ranges(self, device, epoch):
        """[(first_seq, end)] of the epoch's verified checkpoints: every seq in
        first_seq <= s < end is stored or proven never sealed."""
        c = checkpoints
        return [tuple(r) for r in self.conn.execute(sa.select(c.c.first_seq, c.c.seq).where(
            c.c.device == device, c.c.epoch == epoch, c.c.state == "verified").order_by(
            c.c.first_seq))]

    def set_checkpoint_state(self, device, epoch, seq, state, detail=None, now=None):
        self._w()
        c = checkpoints
        self.conn.execute(c.update().where(c.c.device == device, c.c.epoch == epoch,
                                           c.c.seq == seq).values(
            state=state, detail=detail, checked_at=time.time() if now is None else now))

    # rejects: counted in memory, written once per commit

    def add_reject(self, device, reason, detail="", epoch=None, seq=None, kind=None,
                   payload=None, now=None, size=None):
        """Count a refused input; keep it (its size and first 32 bytes in hex, never more) in
        a bounded sample. Nothing is written until commit()."""
        key = (device, reason)
        self._rejects[key] = self._rejects.get(key, 0) + 1
        if size is None and payload is not None:
            size = len(payload)
        self._samples[device].append({
            "at": time.time() if now is None else now, "device": device, "epoch": epoch,
            "seq": seq, "kind": kind, "reason": reason, "detail": (detail or "")[:500],
            "size": size, "head": None if payload is None else bytes(payload[:32]).hex()})

    def _flush_rejects(self):
        if not self._rejects:
            return
        self._w()
        for (dev, reason), n in self._rejects.items():
            self.count(dev, "reject:" + reason, n)
        self._rejects.clear()
        r = rejects
        for dev, rows in self._samples.items():
            self.conn.execute(r.insert(), list(rows))
            oldest_kept = sa.select(r.c.id).where(r.c.device == dev).order_by(
                r.c.id.desc()).limit(1).offset(REJECTS_KEPT).scalar_subquery()
            self.conn.execute(r.delete().where(r.c.device == dev, r.c.id <= oldest_kept))
        self._samples.clear()

    # --- reads ----------------------------------------------------------------------------

    def records(self, device, epoch=None):
        """Decoded records and events of a device, by epoch number then seq."""
        o = objects
        q = sa.select(o.c.epoch, o.c.seq, o.c.kind, o.c.fields, o.c.decode_error,
                      o.c.received_at).where(o.c.device == device, o.c.kind == "record")
        if epoch is not None:
            q = q.where(o.c.epoch == epoch)
        out = []
        for e, s, k, f, err, at in self.conn.execute(q.order_by(o.c.epoch, o.c.seq)):
            out.append({"epoch": e, "seq": s, "kind": k,
                        "fields": None if f is None else json.loads(f),
                        "decode_error": err, "received_at": at})
        return out

    def devices(self):
        rows = self.conn.execute(sa.union(sa.select(objects.c.device),
                                          sa.select(rejects.c.device),
                                          sa.select(counters.c.device))).fetchall()
        return sorted(r[0] for r in rows)

    def ledger(self, registered=()):
        """The completeness ledger of every device seen or registered, as plain data."""
        registered = set(registered)
        out = {}
        for dev in sorted(set(self.devices()) | registered):
            out[dev] = self.device_ledger(dev, dev in registered)
        return out

    def _epoch_ledger(self, dev, ep, newest):
        x, o, c = self.conn.execute, objects, checkpoints
        mine = (o.c.device == dev, o.c.epoch == ep)
        received = self.received_ranges(dev, ep)
        n, dups, first_seen, last_seen, top = x(sa.select(
            sa.func.count(), sa.func.sum(o.c.duplicates), sa.func.min(o.c.received_at),
            sa.func.max(o.c.last_seen), sa.func.max(o.c.seq)).where(*mine)).first()
        cps = [dict(zip(("seq", "first_seq", "count", "state", "link", "detail", "checked_at",
                         "payload_hash"), r))
               for r in x(sa.select(c.c.seq, c.c.first_seq, c.c.count, c.c.state, c.c.link,
                                    c.c.detail, c.c.checked_at, c.c.payload_hash).where(
                   c.c.device == dev, c.c.epoch == ep).order_by(c.c.seq))]
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
        kinds = {k: v for k, v in x(sa.select(o.c.kind, sa.func.count()).where(*mine).group_by(
            o.c.kind))}
        undecodable = x(sa.select(sa.func.count()).where(
            *mine, o.c.decode_error.is_not(None))).scalar()
        return {
            "epoch": ep,
            "objects": n,
            "by_kind": kinds,
            "highest_seq": top,
            "received": received,
            "gaps": missing_rs,
            "missing": total(missing_rs),
            "never_sealed": skipped,
            "duplicates": int(dups or 0),
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
        x, o, c, r = self.conn.execute, objects, checkpoints, rejects
        counters_ = {k: v for k, v in x(sa.select(counters.c.name, counters.c.value).where(
            counters.c.device == dev))}
        for (d, name), n in self._counts.items():  # this batch's, not written yet
            if d == dev:
                counters_[name] = counters_.get(name, 0) + n
        eps = [e for (e,) in x(sa.select(o.c.epoch).distinct().where(
            o.c.device == dev).order_by(o.c.epoch.desc())).fetchall()]
        epochs_ = [self._epoch_ledger(dev, ep, i == 0) for i, ep in enumerate(eps)]
        total_gaps = sum(e["missing"] for e in epochs_)
        last_cp = x(sa.select(c.c.epoch, c.c.seq, c.c.first_seq, c.c.count, c.c.checked_at).where(
            c.c.device == dev, c.c.state == "verified").order_by(
            c.c.checked_at.desc(), c.c.seq.desc()).limit(1)).first()
        rejects_ = {k[len("reject:"):]: v for k, v in counters_.items()
                    if k.startswith("reject:")}
        recent = [dict(zip(("at", "epoch", "seq", "kind", "reason", "detail", "size", "head"),
                           row))
                  for row in x(sa.select(r.c.at, r.c.epoch, r.c.seq, r.c.kind, r.c.reason,
                                         r.c.detail, r.c.size, r.c.head).where(
                      r.c.device == dev).order_by(r.c.id.desc()).limit(RECENT_REJECTS))]
        mismatches = sum(e["checkpoints"]["mismatch"] for e in epochs_)
        broken = sum(e["checkpoint_links_broken"] for e in epochs_)
        # Every epoch but the newest must be closed (its end proven by the next record).
        unclosed = [e["epoch"] for e in epochs_ if not e["newest"] and not e["closed"]]
        failing = self.acks_failing(dev)
        return {
            "device": dev,
            "registered": registered,
            "objects": sum(e["objects"] for e in epochs_),
            "missing": total_gaps,
            "duplicates": sum(e["duplicates"] for e in epochs_),
            "epochs": epochs_,
            "last_checkpoint": None if last_cp is None else dict(zip(
                ("epoch", "seq", "first_seq", "count", "verified_at"), last_cp)),
            "checkpoint_mismatches": mismatches,
            "checkpoint_links_broken": broken,
            "epochs_not_closed": unclosed,
            "acks_failing": failing,
            "rejects": rejects_,
            "rejected": sum(rejects_.values()),
            "recent_rejects": recent,
            "counters": {k: v for k, v in counters_.items() if not k.startswith("reject:")},
            # Complete = every sequence number up to the highest seen (or the end an epoch
            # record names) is here or proven never sealed, no stored object contradicts a
            # signed checkpoint, the checkpoints link up, every older epoch is closed, and
            # the module is not failing to take our acks.
            "complete": bool(epochs_) and total_gaps == 0 and mismatches == 0 and broken == 0
            and not unclosed and failing is None,
        }


def _cp(row):
    seq, first, count, prev, h, state, link = row
    return {"seq": seq, "first_seq": first, "count": count,
            "prev": None if prev is None else bytes(prev),
            "payload_hash": None if h is None else bytes(h), "state": state, "link": link}
