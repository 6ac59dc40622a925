# Helpers for the link tests (MicroPython): a strict uplink frame parser written from
# docs/link-format.md (independent of firmware/link.py), a fake server that reassembles and
# acknowledges, a fake ack opener (MAC + replay counter), lossy channels and radios on a
# virtual clock, and an asyncio radio for the run() loop.
import struct
import hashlib

from drivers.radio.base import Radio
from xorshift import Rng  # noqa: F401 - re-exported for the link tests

ACK_KEY = b"test-ack-key-000"


class FrameError(ValueError):
    pass


def uvarint(buf, i):
    v = 0
    shift = 0
    start = i
    while True:
        if i >= len(buf):
            raise FrameError("truncated varint")
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if i - start >= 5:
            raise FrameError("varint too long")
    if i - start > 1 and b == 0:
        raise FrameError("non-minimal varint")
    return v, i


def enc(v):
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def parse(frame):
    """(epoch, [(kind, seq, frag, total, offset, data)]) of a version-1 frame."""
    if len(frame) < 2 or frame[0] & 0xFE != 0x10:  # version 1; flag bit 0: ack requested
        raise FrameError("header")
    epoch, i = uvarint(frame, 1)
    out = []
    while i < len(frame):
        kf = frame[i]
        seq, i = uvarint(frame, i + 1)
        frag = bool(kf & 0x80)
        total = offset = 0
        if frag:
            total, i = uvarint(frame, i)
            offset, i = uvarint(frame, i)
        n, i = uvarint(frame, i)
        if n == 0 or i + n > len(frame):
            raise FrameError("len")
        if frag and (offset + n > total or (offset == 0 and n == total)):
            raise FrameError("fragment")
        if not frag:
            total = n
        out.append((kf & 0x7F, seq, frag, total, offset, bytes(frame[i : i + n])))
        i += n
    if not out:
        raise FrameError("empty")
    return epoch, out


def seal_ack(ctr, epoch, cum, bitmap, nbits, key=ACK_KEY):
    body = struct.pack("<IiIQB", epoch, cum, ctr, bitmap, nbits)
    return b"K" + body + hashlib.sha256(key + body).digest()[:8]


class FakeOpener:
    """Stands in for the sealing code's ack opener: MAC check, then a strictly increasing
    counter (a replay is refused). Raises ValueError subclasses, as the contract says."""

    def __init__(self, key=ACK_KEY):
        self.key = key
        self.last = -1
        self.opened = 0

    def open(self, payload):
        if len(payload) != 30 or payload[0] != 0x4B:
            raise FrameError("not an ack")
        body = bytes(payload[1:22])
        if hashlib.sha256(self.key + body).digest()[:8] != bytes(payload[22:30]):
            raise FrameError("forged")
        epoch, cum, ctr, bitmap, nbits = struct.unpack("<IiIQB", body)
        if ctr <= self.last:
            raise FrameError("replayed")
        self.last = ctr
        self.opened += 1
        return epoch, cum, bitmap, nbits


class FakeServer:
    """Receives uplink frames: parses, reassembles by (epoch, seq) and byte position,
    delivers each object once, and answers every frame with a sealed cumulative+bitmap ack."""

    def __init__(self, mtu=None, nbits=64):
        self.mtu = mtu
        self.nbits = nbits
        self.delivered = {}  # (epoch, seq) -> (kind, bytes), first complete copy
        self.order = []  # ids in the order they were first completed
        self.copies = {}  # (epoch, seq) -> number of complete copies seen
        self.partial = {}
        self.frames = 0
        self.ctr = 0
        self.bad = 0

    def _complete(self, epoch, kind, seq, data):
        key = (epoch, seq)
        self.copies[key] = self.copies.get(key, 0) + 1
        if key in self.delivered:
            if self.delivered[key] != (kind, data):
                raise AssertionError("copy of %r differs" % (key,))
            return
        self.delivered[key] = (kind, data)
        self.order.append(key)

    def receive(self, frame):
        if self.mtu is not None and len(frame) > self.mtu:
            raise AssertionError("frame of %d bytes > MTU %d" % (len(frame), self.mtu))
        epoch, entries = parse(frame)
        self.frames += 1
        for kind, seq, frag, total, offset, data in entries:
            if not frag:
                self._complete(epoch, kind, seq, data)
                continue
            key = (epoch, seq)
            p = self.partial.get(key)
            if p is None:
                p = self.partial[key] = [kind, bytearray(total), bytearray(total), total]
            buf, have = p[1], p[2]
            if len(buf) != total or p[0] != kind:
                raise AssertionError("fragment disagrees")
            for j in range(len(data)):
                if have[offset + j] and buf[offset + j] != data[j]:
                    raise AssertionError("fragments of %r disagree" % (key,))
                if not have[offset + j]:
                    p[3] -= 1
                buf[offset + j] = data[j]
                have[offset + j] = 1
            if p[3] == 0:
                del self.partial[key]
                self._complete(epoch, kind, seq, bytes(buf))
        return self.ack(epoch)

    def ack(self, epoch):
        cum = -1
        while (epoch, cum + 1) in self.delivered:
            cum += 1
        bitmap = 0
        for i in range(self.nbits):
            if (epoch, cum + 1 + i) in self.delivered:
                bitmap |= 1 << i
        self.ctr += 1
        return seal_ack(self.ctr, epoch, cum, bitmap, self.nbits)


class Channel:
    """One direction of a lossy, duplicating, reordering channel on a virtual clock."""

    def __init__(self, rng, loss=0.0, dup=0.0, delay_ms=20, spread_ms=0):
        self.rng = rng
        self.loss = loss
        self.dup = dup
        self.delay = delay_ms
        self.spread = spread_ms
        self.q = []  # [time, n, payload]
        self.n = 0
        self.sent = 0
        self.dropped = 0

    def put(self, payload, t, down=False):
        self.sent += 1
        if down or self.rng.random() < self.loss:
            self.dropped += 1
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            at = t + self.delay + int(self.rng.random() * self.spread)
            self.n += 1
            self.q.append([at, self.n, bytes(payload)])

    def due(self, t):
        ready = [x for x in self.q if x[0] <= t]
        if not ready:
            return []
        self.q = [x for x in self.q if x[0] > t]
        ready.sort()
        return [x[2] for x in ready]

    def next_time(self):
        return min(x[0] for x in self.q) if self.q else None


class SimRadio(Radio):
    """A radio on the virtual clock: uplinks go to `up` (a Channel), `outages` is a list of
    (start, end) ms during which it is down; time on air = base_ms + per_byte_us * n / 1000."""

    def __init__(self, name, mtu, sim, duty_cycle=0, base_ms=0, per_byte_us=0, outages=()):
        super().__init__(name, mtu, duty_cycle, clock=lambda: sim.t)
        self.sim = sim
        self.base_ms = base_ms
        self.per_byte_us = per_byte_us
        self.outages = outages
        self.tx = []  # (t, frame bytes)

    def time_on_air_ms(self, n):
        return self.base_ms + (self.per_byte_us * n + 999) // 1000

    def is_up(self):
        t = self.sim.t
        for a, b in self.outages:
            if a <= t < b:
                return False
        return True


class Sim:
    """Drives a Link's synchronous core on a virtual clock until `done()` or `limit_ms`."""

    def __init__(self, seed=1, loss=0.0, dup=0.0, spread_ms=0, down_loss=None, delay_ms=20):
        self.t = 0
        self.rng = Rng(seed)
        self.up = Channel(self.rng, loss, dup, delay_ms, spread_ms)
        self.down = Channel(self.rng, loss if down_loss is None else down_loss, dup, delay_ms,
                            spread_ms)
        self.blackhole = False  # uplinks vanish (the radio believes it is up)

    def run(self, link, server, limit_ms, done=None):
        while self.t < limit_ms:
            if done is not None and done():
                return True
            radio = link.pick_radio()
            sent = 0
            if radio is not None:
                f = link.build_frame(radio, self.t)
                if f is not None:
                    frame = bytes(f)
                    if len(frame) > radio.mtu:
                        raise AssertionError("frame %d > mtu %d" % (len(frame), radio.mtu))
                    radio.tx.append((self.t, frame))
                    self.up.put(frame, self.t, down=self.blackhole)
                    sent = max(1, radio.time_on_air_ms(len(frame)))
            for frame in self.up.due(self.t):
                ack = server.receive(frame)
                if ack is not None:  # a server that acks only when asked (LoRa)
                    self.down.put(ack, self.t)
            for ack in self.down.due(self.t):
                link.on_downlink(ack)
            if sent:
                step = sent
            else:
                step = link.wakeup_ms(radio, self.t) if radio is not None else link.poll_ms
                for c in (self.up, self.down):
                    nt = c.next_time()
                    if nt is not None and nt - self.t < step:
                        step = nt - self.t
                step = max(1, step)
            self.t += step
        return done is None or done()


class AsyncRadio(Radio):
    """A radio for the asyncio loop, in real time: uplinks go to `server` after an optional
    loss; its acks come back through a queue that recv() reads."""

    def __init__(self, name, mtu, server, rng, loss=0.0):
        super().__init__(name, mtu)
        self.server = server
        self.rng = rng
        self.loss = loss
        self.inbox = []
        self.sent = 0

    async def send(self, frame):
        import asyncio

        self.sent += 1
        await asyncio.sleep_ms(1)
        if self.rng.random() >= self.loss:
            ack = self.server.receive(frame)
            if self.rng.random() >= self.loss:
                self.inbox.append(ack)

    async def recv(self, timeout_ms):
        import asyncio

        if not self.inbox:
            await asyncio.sleep_ms(min(timeout_ms, 5))
        return self.inbox.pop(0) if self.inbox else None


class AskingServer(FakeServer):
    """A LoRaWAN-like server: it acks only a frame that asks for it (header flag bit 0)."""

    def __init__(self, mtu=None, nbits=64):
        super().__init__(mtu, nbits)
        self.asked = 0
        self.acks_sent = 0

    def receive(self, frame):
        ack = super().receive(frame)
        if frame[0] & 1:
            self.asked += 1
            self.acks_sent += 1
            return ack
        return None


class LoraSimRadio(SimRadio):
    """SimRadio that asks for acks (class A) and whose MTU the test may change (ADR)."""

    asks_acks = True

    def __init__(self, name, mtu, sim, rto_ms=3000, **kw):
        super().__init__(name, mtu, sim, **kw)
        self.rto = rto_ms

    def ack_timeout_ms(self, n):
        return self.time_on_air_ms(n) + self.rto
