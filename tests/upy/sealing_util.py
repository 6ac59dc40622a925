# Helpers for the sealing-side tests (MicroPython): a fake secure element with the driver's
# API (drivers/stsafe), an identity, and a SealingSink + Delivery-like wiring over a data
# directory, so that a "power cut" is simply dropping every object and building them again
# over the same files (the firmware keeps nothing else).
import hashlib

from firmware import health as H
from firmware import record
from firmware.ack import Acks, EpochAcks
from firmware.ackkeys import AckKeyStore
from firmware.outbox import Outbox
from firmware.seal import Opener
from firmware.sealing import SealingSink

SERVER_PUB = b"\x04" + bytes(range(1, 65))
DEV = "SRN-0042"
_WRAP_MASK = 0x5A  # the fake chip's "wrap": XOR, and 8 bytes of integrity tag


class FakeSE:
    """The STSAFE driver API the sealing side uses. Signatures are SHA-256(digest) twice (not
    ECDSA: the host-side checks here are about the chain, not the signature); wrap/unwrap a
    reversible transformation with an integrity tag, so that the plain key is never stored."""

    def __init__(self, counter=1_000_000):
        self.counter = counter
        self.fail_sign = 0  # the next n Generate Signature fail (OSError: the bus)
        self.signed = 0
        self.wraps = 0

    async def init(self):
        return {}

    async def read(self, zone, offset, length):
        return SERVER_PUB[:length]

    async def read_certificate(self, zone=0):
        return b"\x30\x03fake certificate"

    async def decrement(self, zone, amount=1):
        self.counter -= amount
        return self.counter

    async def generate_key(self, slot):
        return b"\x04" + hashlib.sha256(b"eph%d" % self.counter).digest() + bytes(32)

    async def establish_key(self, slot, pub):
        return bytearray(hashlib.sha256(b"Z%d" % self.counter).digest())

    async def generate_signature(self, slot, digest):
        if self.fail_sign:
            self.fail_sign -= 1
            raise OSError(5)
        self.signed += 1
        d = hashlib.sha256(digest).digest()
        return d + hashlib.sha256(d).digest()

    async def wrap(self, slot, data):
        self.wraps += 1
        tag = hashlib.sha256(b"wrap" + bytes(data)).digest()[:8]
        return tag + bytes(b ^ _WRAP_MASK for b in data)

    async def unwrap(self, slot, env):
        data = bytes(b ^ _WRAP_MASK for b in env[8:])
        if hashlib.sha256(b"wrap" + data).digest()[:8] != bytes(env[:8]):
            raise OSError(22)  # the chip's integrity status, as the driver raises it
        return data


class Ident:
    device_id = DEV
    server_key_zone = 2
    server_key_offset = 0
    server_key_length = 65
    cert_zone = 0
    epoch_counter_zone = 5
    envelope_key_slot = 0


class Module:
    """The sealing side of one boot: outbox, sink, ack openers (as firmware/delivery.py wires
    them, without the radio)."""

    def __init__(self, data_dir, se, capacity=64 * 1024, every_n=4, every_ms=600_000,
                 segment=1024):
        self.se = se
        self.data_dir = data_dir
        self.outbox = Outbox(data_dir + "/outbox", capacity, segment_bytes=segment,
                             reserve_bytes=256, max_data=768)
        self.report = self.outbox.recover(reclaim=False)
        self.health = H.Health()
        self.sink = SealingSink(se, Ident(), self.outbox, self.health, data_dir, every_n,
                                every_ms)
        self.acks = EpochAcks()
        self.keys = AckKeyStore(se, 0, data_dir + "/keys")
        self.sink.on_epoch = self._on_epoch
        self.enc = record.RecordEncoder()

    async def _on_epoch(self, ep):
        key, iv = ep.take_ack_material()
        self.ack_material = (key, iv)
        await self.keys.save(ep.number, key, iv)
        self.acks.add(ep.acks)

    async def boot(self):
        for number in self.keys.epochs():
            key, iv = await self.keys.load(number)
            self.acks.add(Acks(Opener(key, iv, DEV.encode(), number)))
        return await self.sink.start()

    async def record(self, volume=0):
        sink = self.sink
        seq = sink.next_seq()
        cbor = self.enc.coded(seq, 1_700_000_000 + seq, record.KIND_MODULE,
                              record.MOD_VOLUME_RESET, volume)
        await sink.put(record.KIND_MODULE, seq, cbor)
        return seq

    def entries(self):
        """[(kind, epoch, seq, bytes)] of every entry in the log, acked or not."""
        out = []
        pos = 0
        while True:
            e = self.outbox.scan(pos)
            if e is None:
                return out
            out.append((e.kind, e.epoch, e.seq, bytes(e.data)))
            pos = e.next


def chain(objs):
    """The checkpoint chain over [(seq, sealed bytes)], written here from the contract text
    (seq 4 bytes BE, len 2 bytes BE, bytes), not with firmware/checkpoint.py."""
    h = hashlib.sha256()
    for seq, b in objs:
        h.update(bytes([(seq >> 24) & 255, (seq >> 16) & 255, (seq >> 8) & 255, seq & 255,
                        len(b) >> 8, len(b) & 255]))
        h.update(b)
    return h.digest()
