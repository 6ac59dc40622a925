# Server acknowledgements, opened and checked on the module.
# MIT licence, (c) serene-module authors. Wire format: docs/wire-format.md.
#
# An ack is sealed by the server exactly as the module seals records (firmware/seal.py), in
# the other direction: under the server->module ack key and IV of the epoch it acknowledges
# (issue 8 protocol note, section E), the server's own Partial IV (strictly increasing per
# epoch), kid = the epoch number (always present in acks). Plaintext: CBOR [epoch, cum, bitmap]:
#   epoch   the epoch whose objects are acknowledged: the kid's epoch, else "bad payload"
#   cum     every object of that epoch with seq <= cum arrived
#   bitmap  bit i set: object cum + 2 + i arrived as well (cum + 1 is missing by definition)
#
# The module drops objects from the outbox only on an ack that opened here. Forged,
# truncated, replayed (Partial IV not above the last accepted one) and other-epoch acks are
# rejected with AckError(reason) and counted in `counts`; they change nothing.
# EpochAcks holds one Acks per epoch that still has objects in the outbox and opens each ack
# with the one its kid names (firmware/delivery.py keeps it; firmware/ackkeys.py restores the
# previous epochs' keys at boot).
from micropython import const

from firmware.cbor import CborError, decode
from firmware.seal import KID_LEN, SealError, parse_header

MAX_ACK_PLAINTEXT = const(48)
REASONS = ("truncated", "bad header", "other epoch", "forged", "replay", "bad payload")
MAX_BITMAP_BITS = const(64)  # a CBOR uint: objects cum + 2 .. cum + 65


class AckError(ValueError):
    """`reason` is one of REASONS."""

    def __init__(self, reason, detail=None):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


class Acks:
    """Opens the acks of one epoch. `counts[reason]` counts rejections; `accepted` counts
    acks that opened; `last_piv` is the server Partial IV of the last accepted ack."""

    def __init__(self, opener):
        self._opener = opener
        self.epoch = opener.epoch
        self._buf = bytearray(MAX_ACK_PLAINTEXT)
        self.counts = {}
        for r in REASONS:
            self.counts[r] = 0
        self.accepted = 0
        self.last_piv = -1

    def _reject(self, reason, detail=None):
        self.counts[reason] += 1
        raise AckError(reason, detail)

    def open(self, frame):
        """Check one sealed ack; return (epoch, cum, bitmap) or raise AckError."""
        if len(frame) > MAX_ACK_PLAINTEXT + 32:
            self._reject("bad header", "too long")
        try:
            piv, n = self._opener.open(frame, self._buf)
        except SealError as e:
            r = e.reason
            if r == "truncated":
                self._reject("truncated")
            if r == "other epoch":
                self._reject("other epoch")
            if r == "forged":
                self._reject("forged")
            self._reject("bad header", r)
        if piv <= self.last_piv:
            self._reject("replay", piv)
        try:
            body = decode(memoryview(self._buf)[:n])
        except CborError as e:
            self._reject("bad payload", e.reason)
        if not isinstance(body, list) or len(body) != 3:
            self._reject("bad payload", "not [epoch, cum, bitmap]")
        epoch, cum, bitmap = body
        for v in body:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                self._reject("bad payload", "not unsigned integers")
        if bitmap >> MAX_BITMAP_BITS:
            self._reject("bad payload", "bitmap wider than 64 bits")
        if epoch != self.epoch:
            self._reject("bad payload", "acked epoch is not the kid's")
        self.last_piv = piv
        self.accepted += 1
        return epoch, cum, bitmap


def acked(cum, bitmap, seq):
    """True if the ack (cum, bitmap) covers object seq."""
    if seq <= cum:
        return True
    i = seq - cum - 2
    return i >= 0 and (bitmap >> i) & 1 == 1


class EpochAcks:
    """Opens each ack with the Acks of the epoch its kid names. `counts[reason]` counts the
    acks no epoch's opener was tried on (no kid, unknown epoch, malformed header); each Acks
    counts its own. rejected() is the total, retired epochs included."""

    def __init__(self):
        self.by_epoch = {}
        self.counts = {}
        for r in REASONS:
            self.counts[r] = 0
        self._retired = 0  # rejections counted by openers since dropped

    def add(self, acks):
        self.by_epoch[acks.epoch] = acks

    def drop(self, epoch):
        a = self.by_epoch.pop(epoch, None)
        if a is not None:
            self._retired += sum(a.counts.values())

    def epochs(self):
        return list(self.by_epoch)

    def rejected(self):
        n = self._retired + sum(self.counts.values())
        for a in self.by_epoch.values():
            n += sum(a.counts.values())
        return n

    def _reject(self, reason, detail=None):
        self.counts[reason] += 1
        raise AckError(reason, detail)

    def open(self, frame):
        """(epoch, cum, bitmap) of a genuine fresh ack, else AckError (counted)."""
        if len(frame) > MAX_ACK_PLAINTEXT + 32:
            self._reject("bad header", "too long")
        try:
            _, kid, _ = parse_header(frame)
        except SealError as e:
            self._reject("truncated" if e.reason == "truncated" else "bad header", e.reason)
        if kid is None or len(kid) != KID_LEN:
            self._reject("bad header", "no kid")
        number = (kid[0] << 24) | (kid[1] << 16) | (kid[2] << 8) | kid[3]
        a = self.by_epoch.get(number)
        if a is None:
            self._reject("other epoch", number)
        return a.open(frame)
