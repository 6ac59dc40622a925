# Fuzz of the pump driver's receive path (drivers/pump/fkbase.py) under the unix port: 100,000+
# random and mutated frames go through the real reader task (FKBasePump.run) from an in-memory
# stream. The reader must never raise, and every valid event frame interleaved in the garbage
# must come out of next_event(), once, in order.
#
# Valid frames carry `x<seq>`; the garbage is built from frames that carry `w` instead, so a
# single mutation can never turn garbage into an expected frame (it breaks the checksum).
import asyncio

from pump_fake import frame
from xorshift import Rng

from drivers.pump import base
from drivers.pump.fkbase import FKBasePump

FRAMES = 100000  # fuzz items (frames, mutated frames, garbage runs) fed in one test
CONTROL = b"\x00\x01\x02\x03\x04\x05\x06\x10\x14\x15\x1b\x7f"


class SinkLine:
    """Stream whose reads come from feed(), in reads of 1..64 bytes (so frames straddle read
    boundaries everywhere), and whose writes are only counted."""

    def __init__(self, r):
        self.r = r
        self.rx = b""
        self.pos = 0
        self.flag = asyncio.Event()
        self.written = 0
        self.acks = 0
        self.naks = 0

    def feed(self, data):
        self.rx = data
        self.pos = 0
        self.flag.set()

    async def readinto(self, buf):
        await asyncio.sleep_ms(0)  # a real stream suspends on I/O: let the consumer run
        while self.pos >= len(self.rx):
            self.flag.clear()
            await self.flag.wait()
        n = min(1 + self.r.below(len(buf)), len(self.rx) - self.pos)
        buf[:n] = self.rx[self.pos : self.pos + n]
        self.pos += n
        return n

    def write(self, data):
        self.written += len(data)
        for b in data:
            if b == 0x06:
                self.acks += 1
            elif b == 0x15:
                self.naks += 1

    async def drain(self):
        pass


def _garbage_frame(r):
    kind = r.below(12)
    if kind == 0:
        return frame(b"1E;w%X;a%X" % (r.below(4096), r.below(64)))
    if kind == 1:
        return frame(b"1C;d%X;r%X" % (r.below(65536), r.next() & 0xFFFFF))  # unexpected reply
    if kind == 2:
        return frame(b"1I;%02X" % r.below(256))
    if kind == 3:
        return frame(b"2E;w1")  # other address
    if kind == 4:
        return frame(b"1E;w" + b"0" * (60 + r.below(60)))  # around and over the 80 limit
    if kind == 5:  # random printable payload, valid checksum: unparseable payloads
        n = r.below(20)
        return frame(b"1" + bytes(0x20 + r.below(95) for _ in range(n)).replace(b"x", b"w"))
    if kind == 6:
        return bytes(r.below(256) for _ in range(1 + r.below(40)))  # line noise
    if kind == 7:
        return bytes([CONTROL[r.below(len(CONTROL))]])  # lone control byte (ENQ, ACK, NAK...)
    if kind == 8:
        return frame(b"1E;w%X" % r.below(256))[: 1 + r.below(6)]  # truncated, no ETX
    if kind == 9:
        return b"\x15" + bytes([0x30 + r.below(10)])  # a NAK with some error byte
    return None  # mutate a frame


def _mutate(r, f):
    i = r.below(len(f))
    op = r.below(3)
    if op == 0:  # replace a byte
        b = r.below(256) if r.below(2) else CONTROL[r.below(len(CONTROL))]
        return f[:i] + bytes([0x79 if b == 0x78 else b]) + f[i + 1 :]
    if op == 1:  # drop a byte
        return f[:i] + f[i + 1 :]
    b = r.below(256)  # insert a byte (never an 'x')
    return f[:i] + bytes([0x79 if b == 0x78 else b]) + f[i:]


async def test_fuzz_receive_path_100k_frames():
    r = Rng(20240601)
    line = SinkLine(Rng(7))
    pump = FKBasePump(line)
    reader = asyncio.create_task(pump.run())
    got = []
    other_pump_events = [0]

    async def consume():
        while True:
            ev = await pump.next_event()
            if ev.kind == base.EV_PUMP:
                if "x" in ev.values:
                    got.append(ev.values["x"])
                else:
                    other_pump_events[0] += 1

    consumer = asyncio.create_task(consume())
    expected = []
    seq = 0
    items = 0
    nbytes = 0
    while items < FRAMES:
        parts = []
        size = 0
        while size < 4096 and items < FRAMES:
            if r.below(8) == 0:
                seq += 1
                expected.append(seq)
                f = frame(b"1E;x%X;a%X" % (seq, r.below(2048)))
            else:
                f = _garbage_frame(r)
                if f is None:
                    f = _mutate(r, frame(b"1E;w%X;u%X" % (r.below(65536), r.below(7))))
            parts.append(f)
            size += len(f)
            items += 1
        data = b"".join(parts)
        nbytes += len(data)
        line.feed(data)
        while line.pos < len(line.rx):
            await asyncio.sleep_ms(0)
        if reader.done():
            break
    for _ in range(20):
        await asyncio.sleep_ms(1)
    assert not reader.done(), "the reader task ended"
    assert pump.counters["internal"] == 0, pump.counters
    assert got == expected, (len(got), len(expected), [x for x in expected if x not in got][:5])
    # the garbage really hit every check of the receive path
    c = pump.counters
    for name in ("checksum", "noise", "control_in_frame", "too_long", "char_error", "address"):
        assert c[name] > 100, c
    assert c["bad_reply"] > 100 and c["nak"] > 100, c
    assert line.acks >= len(expected) and line.naks > 1000
    print("fuzz: %d items, %d bytes, %d valid frames" % (items, nbytes, len(expected)), c)
    consumer.cancel()
    pump.close()
