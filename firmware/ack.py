# Server acknowledgements, opened and checked on the module.
# MIT licence, (c) serene-module authors. Wire format: docs/wire-format.md.
#
# An ack is sealed by the server exactly as the module seals records (firmware/seal.py), in
# the other direction: under the current epoch's server->module ack key and IV, the server's
# own Partial IV (its ack counter for that epoch, strictly increasing), kid = the epoch
# number (always present in acks). Plaintext: CBOR [epoch, cum, bitmap]:
#   epoch   the epoch whose objects are acknowledged (the current one or an older one whose
#           objects are still in the outbox: old epochs' keys are gone after a reboot, so
#           their acks come under the current epoch's key)
#   cum     every object of that epoch with seq <= cum arrived
#   bitmap  bit i set: object cum + 2 + i arrived as well (cum + 1 is missing by definition)
#
# The module drops objects from the outbox only on an ack that opened here. Forged,
# truncated, replayed (Partial IV not above the last accepted one) and other-epoch acks are
# rejected with AckError(reason) and counted in `counts`; they change nothing.
from micropython import const

from firmware.cbor import CborError, decode
from firmware.seal import SealError

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
        self.last_piv = piv
        self.accepted += 1
        return epoch, cum, bitmap


def acked(cum, bitmap, seq):
    """True if the ack (cum, bitmap) covers object seq."""
    if seq <= cum:
        return True
    i = seq - cum - 2
    return i >= 0 and (bitmap >> i) & 1 == 1
