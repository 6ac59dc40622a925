# Checkpoints: a COSE_Sign1 (firmware/signed.py) by the STSAFE factory key over the hash chain
# of the sealed objects since the previous checkpoint, so that the server can prove later, at
# rest, that the records it stores are exactly the bytes the module sealed.
# MIT licence, (c) serene-module authors. Wire format: docs/wire-format.md.
#
# Chain: SHA-256 over the entries e_i = seq_i (4 bytes, big-endian) || len_i (2 bytes,
# big-endian) || sealed bytes_i, in the order they were sealed, for every object added since
# the previous checkpoint (SHA-256 is itself a Merkle-Damgard chain over its input; one hash
# object per interval, no allocation per record). Each checkpoint can be checked alone.
# Payload: [2, device_id, epoch, seq, first_seq, count, chain (32 bytes)]: `count` objects
# were added, with sequence numbers first_seq <= s < seq; first_seq is the sequence number
# after the previous checkpoint (1 after the epoch record). A sequence number in that range
# that is not covered was consumed without a sealed object (e.g. a record that could not be
# stored, reported by a module event).
#
# Policy: due after `every_n` objects (1 = every record) or when the oldest unchecked
# object is `every_ms` old, whichever comes first; nothing to sign means nothing is due.
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
    def __init__(self, epoch, every_n, every_ms):
        if every_n < 1 or every_ms < 1:
            raise CheckpointError("every_n and every_ms must be >= 1")
        self.epoch = epoch
        self.every_n = every_n
        self.every_ms = every_ms
        self._entry = bytearray(6)
        self._pbuf = bytearray(64 + len(epoch.device_id))
        self._reset(1)

    def _reset(self, first_seq):
        self._hash = hashlib.sha256()
        self.first_seq = first_seq
        self.count = 0
        self._last_seq = first_seq - 1
        self._since = time.ticks_ms()

    def add(self, seq, sealed):
        """Account one sealed object (the exact bytes stored and sent). Objects are added in
        increasing seq order, each once."""
        if seq <= self._last_seq:
            raise CheckpointError("seq not increasing")
        if len(sealed) > 0xFFFF:
            raise CheckpointError("object too long")
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
        (from epoch.next_seq(); greater than every seq added). Starts the next interval."""
        if seq <= self._last_seq:
            raise CheckpointError("checkpoint seq must follow the objects it covers")
        chain = self._hash.digest()
        e = Encoder(self._pbuf)
        e.array(7)
        e.uint(signed.TYPE_CHECKPOINT)
        e.bytes(self.epoch.device_id)
        e.uint(self.epoch.number)
        e.uint(seq)
        e.uint(self.first_seq)
        e.uint(self.count)
        e.bytes(chain)
        p = bytes(e.view())
        self._reset(seq + 1)
        return p

    async def checkpoint(self, se, seq):
        """Sign and return the checkpoint object (tagged COSE_Sign1 bytes) for `seq`. If
        the signature fails the interval is lost for checkpointing (the records stay
        authenticated by their seal); the error propagates."""
        p = self.payload(seq)
        return signed.encode(p, await signed.sign(se, p))
