"""The ingest: one uplink payload in; objects verified, stored once, ledgered; sealed acks out.

    ing = Ingest(verifier, store, clock=time.time, worker_id=0, max_epoch_step=1000)
    acks = ing.process(topic, payload)   # -> [(down topic, ack bytes)]; never raises; the
                                         #    frame's writes are NOT committed yet
    ing.refuse(device, reason, size)     # count an intake refusal (queue full, QoS 0, quota)
    ing.commit()                         # the batch is durable: only NOW publish its acks
    ing.due_acks(now=None)               # acks deferred by the Partial IV rule whose tick has
                                         #    come: call every ~10 ms, commit, then publish
    ing.work_budget_ok(device)           # False while the device has spent its work budget
    ing.rollback()                       # discard the batch (publish none of its acks)
    ing.handle(topic, payload)           # process + commit (tests)
    ing.close()                          # releases the worker id lease, closes the store

Every module is untrusted input. process() names every refusal in the ledger (counted per
device and reason, a bounded sample kept, written once per commit) and goes on: a payload that
is not a link frame ("bad frame"), longer than 1024 bytes ("frame too long") or of more than
64 entries ("too many entries", parsed no further), an entry of an unknown kind, a fragment
that contradicts earlier ones, an object whose seal or signature does not verify (the
verifier's reasons: forged, unknown epoch, epoch out of range, bad certificate, wrong device,
...), an object whose authenticated identity is not the one the frame claims ("identity
mismatch"), a device with no registered certificate ("unregistered device"), a device over
its work budget ("work budget": not acknowledged, so a genuine module retransmits).

Canonical form (contract A): a sealed object with the kid has it checked against the frame's
epoch ("other epoch") and stripped BEFORE the duplicate and conflict checks and storage. The
same canonical bytes again are a duplicate: counted, nothing else changes. A different
authentic object under a known identity is refused ("conflict": a nonce reused by the module)
and the first one is kept. The stored kind comes from the authenticated object (contract B);
a frame kind that disagrees is counted ("kind hint mismatch") and changes nothing.

Checkpoints (contract C): each one's chain is checked once every object it covers is here;
its `prev` is checked against the previous signed object of the epoch (the previous
checkpoint, or the epoch record) as soon as both are here: link ok / pending / broken.

Acks (contract E): (cum, bitmap) over what is accounted for in the acked epoch (stored, or
proven never sealed by a verified checkpoint), kept as ranges (AckState), sealed under the
ACKED epoch's ack key with Partial IV (tick << 4) | worker_id, tick = 10 ms since
2025-01-01T00:00:00Z. A PIV is used only if above the last one that (device, epoch, worker)
used, persisted in the same transaction as the ack; otherwise the ack waits for the next tick
(due_acks). So a restored backup or a second worker never reuses a (key, nonce) pair.
Worker ids are leased in the database (workers table): a second running ingest with the same
id is refused at start (WorkerIdInUse); a lease whose heartbeat is older than LEASE_S may be
taken over, and the old holder's next commit() then raises WorkerIdInUse (its acks unsent).

A device whose acks keep failing (the same objects retransmitted again and again long after
an ack covering them was sent) is marked acks_failing in the ledger, with its evidence, and is
never "complete" while it is.

The device is named by the topic `serene/<id>/up`, which the broker's ACL lets only <id>'s
account publish to; the seals bind the same id (AAD, signed payloads).
"""

import bisect
import collections
import logging
import os
import re
import socket
import time
import traceback
import uuid
import weakref

from .. import linkframe, records
from ..linkframe import LinkFrameError
from ..verifier import VerifyError
from ..verifier import protocol as vp

log = logging.getLogger("serene.server")

#: Link frame kinds (docs/link-format.md): hints for reassembly only (contract B).
KINDS = {0: "epoch", 1: "record", 2: "checkpoint", 3: "event"}
HINTED = {0: "epoch", 1: "record", 2: "checkpoint", 3: "record"}
#: Largest legitimate uplink frame (LTE-M MTU; contract G) and its most entries.
MAX_FRAME = 1024
MAX_ENTRIES = 64
TOPIC_RE = re.compile(r"^serene/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/up$")

#: Ack Partial IV (contract E): ticks of 10 ms since 2025-01-01T00:00:00Z, 4 worker bits.
TICK_EPOCH = 1735689600
TICKS_PER_S = 100
WORKER_BITS = 4
MAX_PIV = (1 << 40) - 1
#: A worker id lease not renewed for this long may be taken by another process.
LEASE_S = 30.0
HEARTBEAT_S = 5.0

#: Work budget per device (token bucket of work units). A genuine module draining a backlog
#: at 1,500 records/s with a checkpoint every 32 spends ~2,400 units/s; failures cost a
#: penalty a genuine module never pays, so a device sending bad signatures gets a few
#: verifications a second.
COST_OPEN = 1  # one AEAD open
COST_SIGN = 20  # one ES256 verification (epoch record: + certificate check)
COST_ECDH = 20  # one ECDH + HKDF (a new epoch)
PENALTY_SIGN = 1000  # a signature or certificate that does not verify
PENALTY_OPEN = 50  # a seal that does not open
BUDGET_RATE = 5000.0  # units a second
BUDGET_BURST = 20000.0

#: acks_failing: a duplicate of an object an ack covered more than STALE_S earlier is
#: "stale"; the same object stale ACKS_FAILING_COPIES times marks the device; it clears
#: once new objects keep arriving with no stale duplicate for CLEAR_S.
STALE_S = 5.0
ACKS_FAILING_COPIES = 3
CLEAR_S = 60.0
ACK_HISTORY = 64
STALE_TRACKED = 256


_LIVE = weakref.WeakValueDictionary()  # lease owner -> Ingest, in this process


def _owner_alive(owner):
    """Can the holder of a lease still seal acks? A process of this host that is gone, or
    an Ingest of this process that was closed or collected, cannot: its lease may be taken
    at once (a crashed server restarts without waiting LEASE_S). Anything else (another
    host, a live pid) is alive until its lease expires."""
    try:
        host, pid, _ = owner.split(":", 2)
        pid = int(pid)
    except ValueError:
        return True
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        ing = _LIVE.get(owner)
        if ing is None:
            return False
        try:
            return ing.store.alive()
        except Exception:  # noqa: BLE001 - a closed connection
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkerIdInUse(RuntimeError):
    """Another running ingest holds this worker id (contract E: worker ids are unique among
    running ingest processes, or two of them could seal the same (key, nonce))."""


def tick_of(t):
    # (+1 µs: a clock read at exactly k * 10 ms is in tick k despite binary rounding)
    return int((t - TICK_EPOCH) * TICKS_PER_S + 1e-4)


class AckState:
    """What an ack says about one (device, epoch), kept up to date as objects arrive, as
    sorted disjoint ranges of accounted seqs (stored, or proven never sealed): memory and
    time grow with the number of ranges, never with sequence values. `cum` = the highest seq
    with every seq 0..cum accounted for (-1: not even the epoch record). Gives the same
    (cum, bitmap) as verifier.protocol.ack_from_seqs."""

    __slots__ = ("starts", "ends")

    def __init__(self):
        self.starts = []  # range i = [starts[i], ends[i]], inclusive
        self.ends = []

    @property
    def cum(self):
        return self.ends[0] if self.starts and self.starts[0] == 0 else -1

    def add(self, seqs):
        for s in seqs:
            self.add_range(s, s)

    def add_range(self, a, b):
        """Account for a <= s <= b."""
        if b < a:
            return
        starts, ends = self.starts, self.ends
        i = bisect.bisect_left(ends, a - 1)  # first range that ends at or after a - 1
        j = i
        while j < len(starts) and starts[j] <= b + 1:
            a = min(a, starts[j])
            b = max(b, ends[j])
            j += 1
        starts[i:j] = [a]
        ends[i:j] = [b]

    def __contains__(self, s):
        i = bisect.bisect_right(self.starts, s) - 1
        return i >= 0 and self.ends[i] >= s

    def ack(self, width=64):
        """(cum, bitmap): bit i = seq cum + 2 + i accounted for (docs/wire-format.md §6)."""
        cum = self.cum
        lo, hi = cum + 2, cum + 2 + width - 1
        bitmap = 0
        i = bisect.bisect_right(self.ends, lo - 1)
        while i < len(self.starts) and self.starts[i] <= hi:
            a, b = max(self.starts[i], lo), min(self.ends[i], hi)
            if a <= b:
                bitmap |= ((1 << (b - a + 1)) - 1) << (a - lo)
            i += 1
        return cum, bitmap

    def __len__(self):
        return len(self.starts)


def device_from_topic(topic):
    m = TOPIC_RE.match(topic) if isinstance(topic, str) else None
    return m.group(1) if m else None


def down_topic(device):
    return "serene/%s/down" % device


class Ingest:
    """See the module docstring."""

    def __init__(self, verifier, store, clock=time.time, worker_id=0, max_epoch_step=1000,
                 max_frame=MAX_FRAME, max_entries=MAX_ENTRIES, budget_rate=BUDGET_RATE,
                 budget_burst=BUDGET_BURST, lease_s=LEASE_S):
        if not 0 <= worker_id < 1 << WORKER_BITS:
            raise ValueError("worker_id must be 0..15 (contract E)")
        self.v = verifier
        self.v.max_epoch_step = max_epoch_step
        self.store = store
        self.clock = clock
        self.worker_id = worker_id
        self.max_epoch_step = max_epoch_step
        self.max_frame = max_frame
        self.max_entries = max_entries
        self.budget_rate = budget_rate
        self.budget_burst = budget_burst
        self.lease_s = lease_s
        self.reassembly = {}  # device -> linkframe.Reassembler (fragments survive no restart)
        self._acks = {}  # (device, epoch) -> AckState, loaded from the database when first used
        self._pivs = {}  # (device, epoch) -> last PIV this worker used (mirror of ack_pivs)
        self._deferred = {}  # (device, epoch) -> tick at which its ack may be sealed
        self._budget = {}  # device -> [tokens, at]
        self._ack_hist = {}  # (device, epoch) -> deque of (time, cum) of the acks sent
        self._stale = {}  # device -> OrderedDict (epoch, seq) -> stale copies
        self._failing = {}  # device -> evidence dict (mirror of device_state)
        self._last_stale = {}  # device -> time of the last stale duplicate
        self._acks_rejected_seen = {}  # device -> acks_rejected of its last health record
        self.owner = "%s:%d:%s" % (socket.gethostname(), os.getpid(), uuid.uuid4().hex[:12])
        now = self.clock()
        taken = store.take_worker(worker_id, self.owner, now, lease_s)
        holder = None if taken else store.worker_lease(worker_id)
        if not taken and holder is not None and not _owner_alive(holder[0]):
            taken = store.take_worker(worker_id, self.owner, now, lease_s, dead=holder[0])
        if not taken:
            raise WorkerIdInUse(
                "worker id %d is held by another running ingest (%s, heartbeat %.0f s ago): "
                "give each ingest process its own worker id (0..15)"
                % (worker_id, holder[0] if holder else "?",
                   now - holder[1] if holder else 0))
        _LIVE[self.owner] = self
        self._beat = now
        self.restore()

    def restore(self):
        """Re-derive the keys of every stored epoch (its record verified again)."""
        for dev, ep, record, _ in self.store.epochs():
            try:
                self.v.accept_epoch(dev, record)
            except VerifyError as e:
                log.warning("stored epoch %s/%d no longer verifies: %s", dev, ep, e)

    # --- entry points -----------------------------------------------------------------------

    def handle(self, topic, payload):
        """process() then commit(): the acks to publish (tests, simple callers)."""
        acks = self.process(topic, payload)
        self.commit()
        return acks

    def process(self, topic, payload):
        """Process one uplink WITHOUT committing; return the acks to publish once commit()
        has returned. Never raises: an unexpected error is logged, that frame's writes are
        rolled back (a savepoint) and it is recorded as an "internal error" reject."""
        payload = bytes(payload)
        dev = device_from_topic(topic)
        try:
            frame = self.store.savepoint()  # in the batch's transaction (begun if none)
        except Exception as e:  # noqa: BLE001 - e.g. the database is locked
            log.error("cannot start a transaction: %s", e)
            self.store.add_reject(dev or "?", "internal error", repr(e)[:300],
                                  payload=payload, now=self.clock())
            return []
        try:
            acks = self._handle(topic, dev, payload)
            frame.commit()  # RELEASE SAVEPOINT
            return acks
        except Exception as e:  # noqa: BLE001 - the server must outlive any input
            log.error("internal error on %r: %s\n%s", topic, e, traceback.format_exc())
            # In-memory state may be ahead of what is rolled back: reload it when next used.
            self._acks.clear()
            self._pivs.clear()
            try:
                frame.rollback()  # ROLLBACK TO SAVEPOINT
            except Exception:  # noqa: BLE001 - the database itself failed: logged above
                log.exception("cannot roll the frame back")
            self.store.add_reject(dev or "?", "internal error", repr(e)[:300],
                                  payload=payload, now=self.clock())
            return []

    def commit(self):
        """Make everything process() and refuse() did durable (ack PIVs included): the acks
        they returned may be published once this returns. Raises WorkerIdInUse (after a
        rollback: publish nothing) if another process has taken this worker id's lease."""
        now = self.clock()
        if now - self._beat >= HEARTBEAT_S or self.store.in_transaction():
            if not self.store.heartbeat(self.worker_id, self.owner, now):
                self.store.rollback()
                self._acks.clear()
                self._pivs.clear()
                raise WorkerIdInUse("the lease of worker id %d was taken over: stop this "
                                    "ingest" % self.worker_id)
            self._beat = now
        try:
            self.store.commit()
        except Exception:
            # Not durable: forget what the batch did in memory too, or a later ack could
            # cover objects that were never stored. The caller publishes nothing of it.
            self.rollback()
            raise

    def rollback(self):
        """Discard the batch (nothing process() returned may be published)."""
        try:
            self.store.rollback()
        finally:
            self._acks.clear()
            self._pivs.clear()
            self._deferred.clear()

    def refuse(self, device, reason, size):
        """Count an uplink the intake refused before process() (queue full, QoS 0, over
        quota...): in the ledger as a reject, committed with the next commit()."""
        self.store.add_reject(device or "?", reason, "", size=size, now=self.clock())

    def due_acks(self, now=None):
        """Acks deferred by the Partial IV rule whose tick has come (not committed: commit(),
        then publish). Also renews the worker lease when due."""
        now = self.clock() if now is None else now
        out = []
        if self._deferred:
            t = tick_of(now)
            for key, due in list(self._deferred.items()):
                if due <= t:
                    del self._deferred[key]
                    ack = self._ack(key[0], key[1], now)
                    if ack is not None:
                        out.append((down_topic(key[0]), ack))
        if not out and now - self._beat >= HEARTBEAT_S:
            self.commit()
        return out

    def work_budget_ok(self, device):
        """False while the device has spent its work budget (process() then refuses it)."""
        return self._tokens(device, self.clock()) > 0

    def close(self):
        try:
            self.store.release_worker(self.worker_id, self.owner)
        finally:
            self.store.close()

    # --- budget -----------------------------------------------------------------------------

    def _tokens(self, dev, now):
        b = self._budget.get(dev)
        if b is None:
            b = self._budget[dev] = [self.budget_burst, now]
        if now > b[1]:
            b[0] = min(self.budget_burst, b[0] + (now - b[1]) * self.budget_rate)
            b[1] = now
        return b[0]

    def _spend(self, dev, units):
        self._budget[dev][0] -= units

    # --- frames -----------------------------------------------------------------------------

    def _reject(self, dev, reason, detail="", epoch=None, seq=None, kind=None, payload=None):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("reject %s %s/%s/%s: %s %s", dev, KINDS.get(kind, kind), epoch, seq,
                      reason, detail)
        self.store.add_reject(dev, reason, detail, epoch, seq, KINDS.get(kind, kind), payload,
                              now=self.clock())

    def _handle(self, topic, dev, payload):
        st = self.store
        if dev is None:
            self._reject("?", "bad topic", repr(topic)[:100], payload=payload)
            return []
        st.count(dev, "frames")
        if dev not in self.v.certs and not self.v.accept_unregistered:
            self._reject(dev, "unregistered device", payload=payload)
            return []
        if len(payload) > self.max_frame:
            self._reject(dev, "frame too long", "%d bytes" % len(payload), payload=payload)
            return []
        now = self.clock()
        if self._tokens(dev, now) <= 0:
            self._reject(dev, "work budget", payload=payload)
            return []
        try:
            frame = linkframe.parse(payload, max_entries=self.max_entries)
        except LinkFrameError as e:
            reason = "too many entries" if e.field == "entries" else "bad frame"
            self._reject(dev, reason, str(e), payload=payload)
            return []
        authentic = False
        for i, e in enumerate(frame.entries):
            if e.kind not in KINDS:
                self._reject(dev, "unknown kind", "kind %d" % e.kind, frame.epoch, e.seq,
                             e.kind, e.data)
                continue
            if self._tokens(dev, now) <= 0:
                # Not acknowledged: a genuine module retransmits it.
                self._reject(dev, "work budget", "%d entries not processed"
                             % (len(frame.entries) - i), frame.epoch, e.seq, e.kind, e.data)
                break
            obj = self._reassemble(dev, frame.epoch, e)
            if obj is not None and self._object(dev, frame.epoch, e.seq, e.kind, obj, now):
                authentic = True
        if not authentic:
            return []
        ack = self._ack(dev, frame.epoch, now)
        return [] if ack is None else [(down_topic(dev), ack)]

    # --- objects ---------------------------------------------------------------------------

    def _reassemble(self, dev, epoch, e):
        if not e.fragment:
            return e.data
        r = self.reassembly.setdefault(dev, linkframe.Reassembler())
        key = (epoch, e.seq)
        if key not in r.partial and len(r.partial) >= r.max_partial:
            r.partial.pop(next(iter(r.partial)))  # evict the oldest: never wedge reassembly
            self.store.count(dev, "fragments_evicted")
        try:
            obj = r.feed(epoch, e)
        except LinkFrameError as err:
            # Drop what was gathered: a genuine retransmission then starts clean.
            r.partial.pop(key, None)
            self._reject(dev, "bad fragment", str(err), epoch, e.seq, e.kind, e.data)
            return None
        # Forget completion, so a later copy is reassembled again and counted as a duplicate.
        r.done.discard(key)
        return obj

    def _object(self, dev, epoch, seq, hint, obj, now):
        """Verify and store one object; True if it is authentic (new or duplicate)."""
        st = self.store
        sealed = bool(obj) and obj[0] < 0x20
        if sealed:
            try:
                obj = vp.canonical(obj, epoch)  # contract A: before anything else
            except VerifyError as ve:
                self._spend(dev, COST_OPEN)
                self._reject(dev, ve.reason, ve.detail, epoch, seq, hint, obj)
                return False
        existing = st.get_object(dev, epoch, seq)
        if existing is not None and existing[1] == obj:
            self._duplicate(dev, epoch, seq, now)
            return True
        if (dev, epoch) not in self.v.epochs and (sealed or seq != 0):
            self._load_epoch(dev, epoch)
        try:
            opened = self.v.verify_object(dev, obj, epoch=epoch)
        except VerifyError as ve:
            self._spend(dev, self._failure_cost(obj, ve.reason))
            self._reject(dev, ve.reason, ve.detail, epoch, seq, hint, obj)
            return False
        self._spend(dev, COST_OPEN if sealed else COST_SIGN + (
            COST_ECDH if opened.kind == "epoch" and existing is None else 0))
        if opened.epoch != epoch or opened.seq != seq:
            self._reject(dev, "identity mismatch", "frame says %d/%d, sealed %d/%d"
                         % (epoch, seq, opened.epoch, opened.seq), epoch, seq, hint, obj)
            return False
        if opened.kind != HINTED[hint]:
            st.count(dev, "kind hint mismatch")  # contract B: the hint changes nothing
        if existing is not None:
            if opened.kind == "epoch":
                # The same epoch record with its certificate by value instead of by reference
                # (the verifier checked the signed part is identical).
                self._duplicate(dev, epoch, seq, now)
                return True
            self._reject(dev, "conflict", "another authentic object is stored as %d/%d"
                         % (epoch, seq), epoch, seq, hint, obj)
            return False
        st.count(dev, "objects")
        if opened.kind == "epoch":
            ctx = self.v.epoch(dev, epoch)
            st.add_object(dev, epoch, 0, "epoch", obj, now=now)
            st.add_epoch(dev, epoch, obj, now, payload_hash=ctx.payload_hash, prev=ctx.prev)
            first = st.checkpoint_starting_at(dev, epoch, 1)
            if first is not None:
                self._check_link(dev, epoch, first)
        elif opened.kind == "checkpoint":
            st.add_object(dev, epoch, seq, "checkpoint", obj, now=now)
            st.add_checkpoint(dev, epoch, seq, opened.first_seq, opened.count, opened.chain,
                              now=now, prev=opened.prev, payload_hash=opened.payload_hash)
            self._checkpoint_links(dev, epoch, seq, opened)
            self._check_pending(dev, epoch, now, only=seq)
        else:
            fields, err = None, None
            try:
                fields = records.decode(opened.plaintext)
            except records.RecordError as re_:
                # Authentic, so stored and acknowledged (or the module would resend it
                # forever); flagged for a person to look at.
                err = str(re_)
                st.count(dev, "undecodable")
            st.add_object(dev, epoch, seq, "record", obj, opened.plaintext, fields, err,
                          now=now)
            if fields is not None and fields.get("event") == "records_lost":
                st.count(dev, "records_lost_events")
            if fields is not None and fields.get("event") == "health":
                self._health(dev, epoch, seq, fields, now)
        self._accounted(dev, epoch, seq, seq)
        if opened.kind != "checkpoint":
            self._check_pending(dev, epoch, now, covering=seq)
        self._progress(dev, now)
        return True

    def _load_epoch(self, dev, epoch):
        """An epoch another worker (sharing the database) verified: take its keys."""
        record = self.store.epoch_record(dev, epoch)
        if record is None:
            return
        try:
            self.v.accept_epoch(dev, record)
        except VerifyError as e:
            log.warning("stored epoch %s/%d no longer verifies: %s", dev, epoch, e)
        self._spend(dev, COST_SIGN + COST_ECDH)

    @staticmethod
    def _failure_cost(obj, reason):
        if reason in ("bad signature", "bad certificate"):
            return COST_SIGN + PENALTY_SIGN
        if reason == "forged":
            return COST_OPEN + PENALTY_OPEN
        return 0  # refused before any cryptography

    # --- checkpoints -----------------------------------------------------------------------

    def _expected_prev(self, dev, epoch, first_seq):
        """The payload hash the checkpoint starting at first_seq must name, or None if the
        previous signed object is not here yet."""
        if first_seq == 1:
            info = self.store.epoch_info(dev, epoch)
            return None if info is None else info["payload_hash"]
        prev = self.store.checkpoint(dev, epoch, first_seq - 1)
        return None if prev is None else prev["payload_hash"]

    def _check_link(self, dev, epoch, cp):
        want = self._expected_prev(dev, epoch, cp["first_seq"])
        if want is None:
            return
        if cp["prev"] == want:
            self.store.set_checkpoint_link(dev, epoch, cp["seq"], "ok")
        else:
            self._broken(dev, epoch, cp["seq"], "prev does not name the %s stored before it"
                         % ("epoch record" if cp["first_seq"] == 1 else
                            "checkpoint %d" % (cp["first_seq"] - 1)))

    def _broken(self, dev, epoch, seq, detail):
        self.store.set_checkpoint_link(dev, epoch, seq, "broken", detail)
        self._reject(dev, "checkpoint link broken", detail, epoch, seq, 2)
        log.error("CHECKPOINT LINK BROKEN %s epoch %d seq %d: %s", dev, epoch, seq, detail)

    def _checkpoint_links(self, dev, epoch, seq, opened):
        st = self.store
        others = st.overlapping_checkpoints(dev, epoch, opened.first_seq, seq)
        if others:
            self._broken(dev, epoch, seq, "overlaps checkpoint %d: checkpoints must tile the "
                         "epoch" % others[0]["seq"])
            return
        self._check_link(dev, epoch, st.checkpoint(dev, epoch, seq))
        nxt = st.checkpoint_starting_at(dev, epoch, seq + 1)
        if nxt is not None and nxt["link"] == "pending":
            self._check_link(dev, epoch, nxt)

    def _check_pending(self, dev, epoch, now, covering=None, only=None):
        """Check the pending checkpoints whose covered objects are all here (those covering
        `covering`, or the checkpoint `only`)."""
        st = self.store
        for cp_seq, first, count in st.pending_checkpoints(dev, epoch, covering):
            if only is not None and cp_seq != only:
                continue
            if st.count_sealed_in_range(dev, epoch, first, cp_seq) < count:
                continue
            stored = st.sealed_in_range(dev, epoch, first, cp_seq)
            cp = self.v.verify_checkpoint(dev, st.get_object(dev, epoch, cp_seq)[1])
            self._spend(dev, COST_SIGN)
            try:
                self.v.check_checkpoint(cp, stored)
            except VerifyError as ve:
                st.set_checkpoint_state(dev, epoch, cp_seq, "mismatch", ve.detail, now)
                self._reject(dev, "checkpoint mismatch", ve.detail, epoch, cp_seq, 2)
                log.error("CHECKPOINT MISMATCH %s epoch %d seq %d: %s", dev, epoch, cp_seq, ve)
            else:
                st.set_checkpoint_state(dev, epoch, cp_seq, "verified", None, now)
                self._accounted(dev, epoch, first, cp_seq)

    # --- acks ----------------------------------------------------------------------------

    def _ack_state(self, dev, epoch):
        state = self._acks.get((dev, epoch))
        if state is None:
            state = self._acks[(dev, epoch)] = AckState()
            for a, b in self.store.received_ranges(dev, epoch):
                state.add_range(a, b)
            for first, end in self.store.verified_ranges(dev, epoch):
                state.add_range(first, end)  # stored, or proven never sealed
        return state

    def _accounted(self, dev, epoch, a, b):
        if (dev, epoch) in self._acks:
            self._acks[(dev, epoch)].add_range(a, b)

    def _last_piv(self, dev, epoch):
        last = self._pivs.get((dev, epoch))
        if last is None:
            last = self._pivs[(dev, epoch)] = self.store.last_ack_piv(dev, epoch,
                                                                      self.worker_id)
        return last

    def _ack(self, dev, epoch, now):
        """The ack of (dev, epoch) now, sealed under that epoch's key; None if there is
        nothing to ack or its PIV must wait for the next tick (then due_acks gives it)."""
        st = self.store
        cum, bitmap = self._ack_state(dev, epoch).ack()
        if cum < 0:
            return None  # no epoch record yet: the module sends it before anything else
        tick = tick_of(now)
        piv = (tick << WORKER_BITS) | self.worker_id
        last = self._last_piv(dev, epoch)
        if piv <= last or tick < 0:
            # Never above the wall clock, never reused: wait for the next free tick.
            due = (last >> WORKER_BITS) + 1
            self._deferred[(dev, epoch)] = max(due, self._deferred.get((dev, epoch), 0))
            return None
        if piv > MAX_PIV:
            log.error("ack partial IV space exhausted (clock after 2046?)")
            return None
        self._deferred.pop((dev, epoch), None)
        if (dev, epoch) not in self.v.epochs:
            self._load_epoch(dev, epoch)
            if (dev, epoch) not in self.v.epochs:
                return None
        ack = self.v.seal_ack(dev, epoch, cum, bitmap, epoch=epoch, piv=piv)
        st.set_ack_piv(dev, epoch, self.worker_id, piv)
        self._pivs[(dev, epoch)] = piv
        st.count(dev, "acks")
        hist = self._ack_hist.get((dev, epoch))
        if hist is None:
            hist = self._ack_hist[(dev, epoch)] = collections.deque(maxlen=ACK_HISTORY)
        if not hist or hist[-1][1] < cum:
            hist.append((now, cum))
        return ack

    # --- acks failing ----------------------------------------------------------------------

    def _duplicate(self, dev, epoch, seq, now):
        st = self.store
        st.add_duplicate(dev, epoch, seq, now)
        st.count(dev, "duplicates")
        acked_at = None
        for t, cum in self._ack_hist.get((dev, epoch), ()):
            if cum >= seq:
                acked_at = t
                break
        if acked_at is None or now - acked_at <= STALE_S:
            return
        # The module sent it again long after an ack covering it: that ack did not work.
        st.count(dev, "stale_duplicates")
        self._last_stale[dev] = now
        stale = self._stale.setdefault(dev, collections.OrderedDict())
        n = stale.pop((epoch, seq), 0) + 1
        stale[(epoch, seq)] = n
        if len(stale) > STALE_TRACKED:
            stale.popitem(last=False)
        if n >= ACKS_FAILING_COPIES:
            ev = self._failing_evidence(dev)
            first = ev is None
            ev = dict(ev or {"since": now}, last_at=now, epoch=epoch, seq=seq, copies=n,
                      acked_at=acked_at,
                      evidence="object %d/%d received %d more times, the last %.0f s after "
                               "an ack covering it" % (epoch, seq, n, now - acked_at))
            self._failing[dev] = ev
            st.set_acks_failing(dev, ev)
            if first:
                log.error("ACKS FAILING %s: %s", dev, ev["evidence"])

    def _failing_evidence(self, dev):
        if dev not in self._failing:
            self._failing[dev] = self.store.acks_failing(dev)
        return self._failing[dev]

    def _health(self, dev, epoch, seq, fields, now):
        """A module health record that reports rejected acks is evidence too."""
        n = (fields.get("counters") or {}).get("acks_rejected")
        # The counter is cumulative since the module's boot: only a rise is news (a module
        # that once refused a forged downlink must not stay "failing" for ever).
        seen = self._acks_rejected_seen.get(dev, 0)
        if not isinstance(n, int):
            return
        self._acks_rejected_seen[dev] = n
        if n <= seen:
            return
        ev = dict(self._failing_evidence(dev) or {"since": now}, last_at=now,
                  acks_rejected=n, epoch=epoch, seq=seq,
                  evidence="the module's health record %d/%d reports %d rejected acks"
                           % (epoch, seq, n))
        self._failing[dev] = ev
        self.store.set_acks_failing(dev, ev)
        self._last_stale[dev] = now

    def _progress(self, dev, now):
        """A new object stored: clears acks_failing once none went stale for CLEAR_S."""
        ev = self._failing_evidence(dev)
        if ev is None:
            return
        last = self._last_stale.get(dev, ev.get("last_at", now))
        if now - last > CLEAR_S:
            self._failing[dev] = None
            self.store.set_acks_failing(dev, None)
            self._stale.pop(dev, None)
            log.warning("acks of %s work again", dev)
