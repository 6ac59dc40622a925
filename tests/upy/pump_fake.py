# MicroPython test helper: an in-memory stand-in for the pump's serial stream.
#
# FakeLine has the asyncio stream methods the driver uses (readinto, write, drain). Bytes given
# to feed() are what the pump sends; everything the driver writes is kept in `tx`. With a
# `responder(payload) -> bytes`, each complete frame the driver writes is answered at once
# (the fake pump), which lets link tests run without a pty or real time.
import asyncio

STX = 0x02
ETX = 0x03


def ck(body):
    return 0xFF - (sum(body) & 0xFF)


def frame(body):
    """A frame from ADDR+PAYLOAD, checksum computed here from the spec's rule."""
    return b"\x02" + body + b"%02X\x03" % ck(body)


class FakeLine:
    def __init__(self, responder=None, chunk=64):
        self.rx = bytearray()
        self.pos = 0
        self.tx = bytearray()
        self.scan = 0
        self.frames = []  # payloads of the frames the driver wrote (address stripped)
        self.responder = responder
        self.chunk = chunk
        self.flag = asyncio.Event()
        self.reads = 0

    def feed(self, data):
        if self.pos and self.pos == len(self.rx):
            self.rx = bytearray()
            self.pos = 0
        self.rx += data
        self.flag.set()

    def pending(self):
        return len(self.rx) - self.pos

    async def readinto(self, buf):
        while self.pos >= len(self.rx):
            self.flag.clear()
            await self.flag.wait()
        n = min(len(buf), len(self.rx) - self.pos, self.chunk)
        buf[:n] = self.rx[self.pos : self.pos + n]
        self.pos += n
        self.reads += 1
        return n

    def write(self, data):
        self.tx += data
        while True:
            s = self.tx.find(b"\x02", self.scan)
            if s < 0:
                self.scan = len(self.tx)
                return
            e = self.tx.find(b"\x03", s)
            if e < 0:
                self.scan = s
                return
            self.scan = e + 1
            payload = bytes(self.tx[s + 2 : e - 2])
            self.frames.append(payload)
            if self.responder is not None:
                answer = self.responder(payload)
                if answer:
                    self.feed(answer)

    async def drain(self):
        await asyncio.sleep_ms(0)


async def settle(line, ms=20):
    """Let the reader task consume what was fed."""
    for _ in range(ms):
        await asyncio.sleep_ms(1)
        if not line.pending():
            await asyncio.sleep_ms(1)
            return
