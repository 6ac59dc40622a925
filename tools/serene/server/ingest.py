"""The ingest: one uplink payload in; objects verified, stored once, ledgered; sealed acks out.

    ingest = Ingest(verifier, store)          # serene.verifier.Verifier, server.store.Store
    acks = ingest.handle(topic, payload)      # -> [(down topic, sealed ack bytes)], never raises

Every module is untrusted input. handle() names every refusal in the ledger (store.rejects) and
goes on: a payload that is not a link frame ("bad frame"), an entry of an unknown kind, a
fragment that contradicts earlier ones, an object whose seal or signature does not verify
(the verifier's reasons: forged, unknown epoch, bad certificate, wrong device, ...), an
object whose authenticated identity is not the one the frame claims ("identity mismatch",
"kind mismatch"), a device with no registered certificate ("unregistered device"). The same
bytes again (a retransmission, or a replay) are a duplicate: counted, nothing else changes.
A different authentic object under a known identity is refused ("conflict": it would mean a
nonce reused by the module) and the first one is kept.

The device is named by the topic `serene/<id>/up`, which the broker's ACL lets only <id>'s
account publish to; the seals bind the same id (AAD, signed payloads).

An ack goes back after each frame that carried at least one authentic object (new or
duplicate): (cum, bitmap) over the objects stored for the frame's epoch, plus the sequence
numbers a verified checkpoint proves were never sealed, sealed under the device's current
epoch. Its Partial IV is committed to the database before the ack is returned.
"""

import logging
import re
import time
import traceback

from .. import linkframe, records
from ..linkframe import LinkFrameError
from ..verifier import VerifyError

log = logging.getLogger("serene.server")

#: Link frame kinds (docs/link-format.md) and what the verifier must find in each.
KINDS = {0: "epoch", 1: "record", 2: "checkpoint", 3: "event"}
OPENED_AS = {0: "epoch", 1: "record", 2: "checkpoint", 3: "record"}
#: No radio's MTU is above this (LTE-M 1024); a longer uplink is refused before parsing.
MAX_FRAME = 4096
#: Entries in one frame (contract G).
MAX_ENTRIES = 64
TOPIC_RE = re.compile(r"^serene/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/up$")


class AckState:
    """What an ack says about one (device, epoch), kept up to date as objects arrive, so an
    ack costs the same at the millionth object as at the first. `cum` = the highest seq with
    every seq 0..cum accounted for (-1: not even the epoch record), `above` = the accounted
    seqs beyond cum + 1. Gives the same (cum, bitmap) as verifier.protocol.ack_from_seqs."""

    __slots__ = ("cum", "above")

    def __init__(self):
        self.cum = -1
        self.above = set()

    def add(self, seqs):
        cum, above = self.cum, self.above
        for s in seqs:
            if s > cum:
                above.add(s)
        while cum + 1 in above:
            cum += 1
            above.discard(cum)
        self.cum = cum

    def ack(self, width=64):
        """(cum, bitmap): bit i = seq cum + 2 + i accounted for (docs/wire-format.md §6)."""
        bitmap = 0
        for i in range(width):
            if self.cum + 2 + i in self.above:
                bitmap |= 1 << i
        return self.cum, bitmap


def device_from_topic(topic):
    m = TOPIC_RE.match(topic) if isinstance(topic, str) else None
    return m.group(1) if m else None


def down_topic(device):
    return "serene/%s/down" % device


class WorkerIdInUse(RuntimeError):
    """Another running ingest holds this worker id (contract E: worker ids are unique among
    running ingest processes, or two of them could seal the same (key, nonce))."""


class Ingest:
    """See the module docstring. API for the intake service:

        ing = Ingest(verifier, store, clock=time.time, worker_id=0, max_epoch_step=1000)
        acks = ing.process(topic, payload)   # -> [(down topic, ack bytes)]; never raises;
                                             # nothing committed yet
        ing.refuse(device, reason, size)     # an intake refusal (queue full, QoS 0, quota...)
        ing.commit()                         # the batch is durable: NOW publish its acks
        ing.due_acks(now=None)               # deferred acks whose tick has come (commit first)
        ing.work_budget_ok(device)           # False: process() refuses the device's frames
        ing.handle(topic, payload)           # process + commit (tests)
        ing.close()
    """

    def __init__(self, verifier, store, clock=time.time, worker_id=0, max_epoch_step=1000,
                 max_frame=MAX_FRAME, max_entries=MAX_ENTRIES):
        self.v = verifier
        self.store = store
        self.clock = clock
        self.worker_id = worker_id
        self.max_epoch_step = max_epoch_step
        self.max_frame = max_frame
        self.max_entries = max_entries
        self.reassembly = {}  # device -> linkframe.Reassembler (fragments survive no restart)
        self._acks = {}  # (device, epoch) -> AckState, loaded from the database when first used
        self.restore()

    def restore(self):
        """Re-derive the keys of every stored epoch and restore its ack counter."""
        for dev, ep, record, piv in self.store.epochs():
            try:
                ctx = self.v.accept_epoch(dev, record)
            except VerifyError as e:
                log.warning("stored epoch %s/%d no longer verifies: %s", dev, ep, e)
                continue
            ctx.next_ack_piv = max(ctx.next_ack_piv, piv)

    # --- entry point -----------------------------------------------------------------------

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
        db = self.store.db
        if not db.in_transaction:
            db.execute("BEGIN")
        db.execute("SAVEPOINT frame")
        try:
            acks = self._handle(topic, dev, payload)
            db.execute("RELEASE SAVEPOINT frame")
            return acks
        except Exception as e:  # noqa: BLE001 - the server must outlive any input
            log.error("internal error on %r: %s\n%s", topic, e, traceback.format_exc())
            self._acks.clear()  # they may be ahead of what was rolled back: reload
            try:
                db.execute("ROLLBACK TO SAVEPOINT frame")
                db.execute("RELEASE SAVEPOINT frame")
                self.store.add_reject(dev or "?", "internal error", repr(e)[:300],
                                      payload=payload, now=self.clock())
            except Exception:  # noqa: BLE001 - the database itself failed: logged above
                log.exception("cannot record the internal error")
            return []

    def commit(self):
        """Make everything process() and refuse() did durable. Acks may be published after."""
        self.store.commit()

    def refuse(self, device, reason, size):
        """Count an uplink the intake refused before process() (queue full, QoS 0, over
        quota...): in the ledger as a reject, committed with the next commit()."""
        self.store.add_reject(device or "?", reason, "%s bytes" % size, now=self.clock())

    def due_acks(self, now=None):
        """Acks deferred by the Partial IV rule whose tick has come (commit, then publish)."""
        return []

    def work_budget_ok(self, device):
        """False while the device has spent its work budget (process() then refuses it)."""
        return True

    def close(self):
        self.store.close()

    def _reject(self, dev, reason, detail="", epoch=None, seq=None, kind=None, payload=None):
        log.info("reject %s %s/%s/%s: %s %s", dev, KINDS.get(kind, kind), epoch, seq, reason,
                 detail)
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
        try:
            frame = linkframe.parse(payload)
        except LinkFrameError as e:
            self._reject(dev, "bad frame", str(e), payload=payload)
            return []
        authentic = False
        for e in frame.entries:
            if e.kind not in KINDS:
                self._reject(dev, "unknown kind", "kind %d" % e.kind, frame.epoch, e.seq,
                             e.kind, e.data)
                continue
            obj = self._reassemble(dev, frame.epoch, e)
            if obj is not None and self._object(dev, frame.epoch, e.seq, e.kind, obj):
                authentic = True
        if not authentic:
            return []
        ack = self._ack(dev, frame.epoch)
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

    def _object(self, dev, epoch, seq, kind, obj):
        """Verify and store one object; True if it is authentic (new or duplicate)."""
        st = self.store
        now = self.clock()
        existing = st.get_object(dev, epoch, seq)
        if existing is not None and existing[1] == obj:
            st.add_duplicate(dev, epoch, seq, now)
            st.count(dev, "duplicates")
            return True
        try:
            opened = self.v.verify_object(dev, obj, epoch=epoch)
        except VerifyError as ve:
            self._reject(dev, ve.reason, ve.detail, epoch, seq, kind, obj)
            return False
        if opened.epoch != epoch or opened.seq != seq:
            self._reject(dev, "identity mismatch", "frame says %d/%d, sealed %d/%d"
                         % (epoch, seq, opened.epoch, opened.seq), epoch, seq, kind, obj)
            return False
        if opened.kind != OPENED_AS[kind]:
            self._reject(dev, "kind mismatch", "frame says %s, object is %s"
                         % (KINDS[kind], opened.kind), epoch, seq, kind, obj)
            return False
        if existing is not None:
            if opened.kind == "epoch":
                # The same epoch record with its certificate by value instead of by reference
                # (the verifier checked the signed part is identical).
                st.add_duplicate(dev, epoch, seq, now)
                st.count(dev, "duplicates")
                return True
            self._reject(dev, "conflict", "another authentic object is stored as %d/%d"
                         % (epoch, seq), epoch, seq, kind, obj)
            return False
        st.count(dev, "objects")
        if opened.kind == "epoch":
            st.add_object(dev, epoch, 0, "epoch", obj, now=now)
            st.add_epoch(dev, epoch, obj, now)
        elif opened.kind == "checkpoint":
            st.add_object(dev, epoch, seq, "checkpoint", obj, now=now)
            st.add_checkpoint(dev, epoch, seq, opened.first_seq, opened.count, opened.chain,
                              now=now)
        else:
            fields, err = None, None
            try:
                fields = records.decode(opened.plaintext)
            except records.RecordError as re_:
                # Authentic, so stored and acknowledged (or the module would resend it
                # forever); flagged for a person to look at.
                err = str(re_)
                st.count(dev, "undecodable")
            st.add_object(dev, epoch, seq, KINDS[kind], obj, opened.plaintext, fields, err,
                          now=now)
        self._accounted(dev, epoch, (seq,))
        self._check_pending(dev, epoch)
        return True

    def _check_pending(self, dev, epoch):
        """Check every pending checkpoint of the epoch whose covered objects are all here."""
        st = self.store
        for cp_seq, first, count in st.pending_checkpoints(dev, epoch):
            stored = st.sealed_in_range(dev, epoch, first, cp_seq)
            if len(stored) < count:
                continue
            cp = self.v.verify_checkpoint(dev, st.get_object(dev, epoch, cp_seq)[1])
            try:
                self.v.check_checkpoint(cp, stored)
            except VerifyError as ve:
                st.set_checkpoint_state(dev, epoch, cp_seq, "mismatch", ve.detail, self.clock())
                self._reject(dev, "checkpoint mismatch", ve.detail, epoch, cp_seq, 2)
                log.error("CHECKPOINT MISMATCH %s epoch %d seq %d: %s", dev, epoch, cp_seq, ve)
            else:
                st.set_checkpoint_state(dev, epoch, cp_seq, "verified", None, self.clock())
                self._accounted(dev, epoch, range(first, cp_seq))

    # --- acks ----------------------------------------------------------------------------

    def _ack_state(self, dev, epoch):
        state = self._acks.get((dev, epoch))
        if state is None:
            state = self._acks[(dev, epoch)] = AckState()
            state.add(self.store.seqs(dev, epoch))
            for first, end in self.store.verified_ranges(dev, epoch):
                state.add(range(first, end))  # stored, or proven never sealed
        return state

    def _accounted(self, dev, epoch, seqs):
        if (dev, epoch) in self._acks:
            self._acks[(dev, epoch)].add(seqs)

    def _ack(self, dev, epoch):
        st = self.store
        cum, bitmap = self._ack_state(dev, epoch).ack()
        if cum < 0:
            return None  # no epoch record yet: the module sends it before anything else
        current = self.v.current_epoch(dev)
        ack = self.v.seal_ack(dev, epoch, cum, bitmap, epoch=current)
        st.set_next_ack_piv(dev, current, self.v.epoch(dev, current).next_ack_piv)
        st.count(dev, "acks")
        return ack
