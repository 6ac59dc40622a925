# Checkpoints: a COSE_Sign1 (firmware/signed.py) by the STSAFE factory key over the hash chain
# of the sealed objects since the previous checkpoint, linked to the signed object before it,
# so that the server can prove later, at rest, that the objects it stores are exactly, and
# all of, the bytes the module sealed, tail of the epoch included.
# MIT licence, (c) serene-module authors. Contract: issue 8 protocol note, sections C and D.
#
# Chain: SHA-256 over the entries e_i = seq_i (4 bytes, big-endian) || len_i (2 bytes,
# big-endian) || sealed bytes_i, in seq order, for every sealed object (records, module
# events, the outbox-overflow event: all of them) stored since the previous checkpoint. One
# hash object per interval, no allocation per record.
# Payload v2: [2, device_id, epoch, seq, first_seq, count, chain (32), prev (32)]: `count`
# sealed objects with first_seq <= s < seq; prev = SHA-256 of the payload of the previous
# signed object of the epoch (the previous checkpoint, or the epoch record for the first one).
# Checkpoints tile the epoch: first_seq = the previous checkpoint's seq + 1 (1 after the epoch
# record). A seq in the range that is not covered was consumed without a stored sealed object
# (a record the outbox refused, reported by a records_lost event; a checkpoint that could not
# be signed or stored).
#
# Policy: due after `every_n` objects (1 = every record) or when the oldest unchecked
# object is `every_ms` old, whichever comes first; nothing to sign means nothing is due
# (closing checkpoints, with count 0 if need be, are asked for by firmware/sealing.py).
#
# A payload is not the end of the interval until commit(): MicroPython's hash is final after
# digest(), so an interval whose checkpoint could not be signed or stored is rebuilt (restart()
# then add() again, from the outbox, which keeps every object not yet covered).
import hashlib
import struct
import time

from firmware import signed
from firmware.cbor import Encoder


class CheckpointError(ValueError):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class Checkpointer:
    """Checkpointer(epoch, every_n, every_ms, prev=None, first_seq=1): `epoch` has
    .device_id and .number (and .payload, the epoch record's payload, used for `prev` when
    prev is None: the first interval of an epoch)."""

    def __init__(self, epoch, every_n, every_ms, prev=None, first_seq=1):
        if every_n < 1 or every_ms < 1:
            raise CheckpointError("every_n and every_ms must be >= 1")
        self.device_id = epoch.device_id
        self.number = epoch.number
        self.every_n = every_n
        self.every_ms = every_ms
        if prev is None:
            prev = hashlib.sha256(epoch.payload).digest()
        if len(prev) != 32:
            raise CheckpointError("prev is not 32 bytes")
        self.prev = prev
        self._entry = bytearray(6)
        self._pbuf = bytearray(112 + len(self.device_id))
        self._reset(first_seq)

    def _reset(self, first_seq):
        self._hash = hashlib.sha256()
        self.first_seq = first_seq
        self.count = 0
        self._last_seq = first_seq - 1
        self._since = time.ticks_ms()

    def restart(self):
        """Start the open interval again (same first_seq and prev): the caller adds its
        objects again (after a checkpoint that was not signed or not stored)."""
        self._reset(self.first_seq)

    def add(self, seq, sealed):
        """Account one sealed object (the exact bytes stored and sent). Objects are added in
        increasing seq order, each once."""
        if seq <= self._last_seq:
            raise CheckpointError("seq not increasing")
        if len(sealed) > 0xFFFF:
            raise CheckpointError("object too long")
        if self._hash is None:
            raise CheckpointError("interval not restarted")
        if self.count == 0:
            self._since = time.ticks_ms()
        struct.pack_into(">IH", self._entry, 0, seq, len(sealed))
        self._hash.update(self._entry)
        self._hash.update(sealed)
        self._last_seq = seq
        self.count += 1

    def due(self, now_ms=None):
        if self.count == 0:
            return False
        if self.count >= self.every_n:
            return True
        if now_ms is None:
            now_ms = time.ticks_ms()
        return time.ticks_diff(now_ms, self._since) >= self.every_ms

    def payload(self, seq):
        """The checkpoint payload for the objects added so far, as object number `seq`
        (from epoch.next_seq(); greater than every seq added). The hash is final afterwards:
        commit() the payload once its checkpoint is stored, or restart()."""
        if seq <= self._last_seq:
            raise CheckpointError("checkpoint seq must follow the objects it covers")
        if self._hash is None:
            raise CheckpointError("interval not restarted")
        chain = self._hash.digest()
        self._hash = None
        e = Encoder(self._pbuf)
        e.array(8)
        e.uint(signed.TYPE_CHECKPOINT)
        e.bytes(self.device_id)
        e.uint(self.number)
        e.uint(seq)
        e.uint(self.first_seq)
        e.uint(self.count)
        e.bytes(chain)
        e.bytes(self.prev)
        return bytes(e.view())

    def commit(self, seq, payload):
        """The checkpoint `seq` with this payload is stored: the next interval starts after
        it and links to it."""
        self.prev = hashlib.sha256(payload).digest()
        self._reset(seq + 1)

    async def checkpoint(self, se, seq):
        """Sign and return (payload, checkpoint object: tagged COSE_Sign1 bytes) for `seq`,
        not committed. The secure element's error propagates (then restart())."""
        p = self.payload(seq)
        return p, signed.encode(p, await signed.sign(se, p))
