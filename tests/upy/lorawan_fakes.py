# Fakes for the LoRaWAN MAC tests on the unix port: a virtual clock, a modem that records what
# it sends and plays back scripted downlinks, a minimal in-process network (join-accept and
# downlink builder), a test AppKey provider and a test key wrapper.
#
# The network side here uses drivers/lorawan/crypto.py itself: these fakes exercise the MAC's
# behaviour (state, persistence, timing). Byte-level agreement with the specification is
# checked on the host against an independent reference (tests/test_lora_frames.py).
import asyncio
import struct
import cryptolib

from drivers.lorawan import eu868
from drivers.lorawan.crypto import Key, derive_session_keys

APP_KEY = bytes(range(0x10, 0x20))
DEV_EUI = bytes.fromhex("70b3d57ed0000001")
JOIN_EUI = bytes.fromhex("70b3d57ed00000ff")
NET_ID = 0x000013
DEV_ADDR = 0x260B1234
CFLIST = (867_100_000, 867_300_000, 867_500_000, 867_700_000, 867_900_000)


class VirtualClock:
    def __init__(self, t=0):
        self.t = t

    def ms(self):
        return self.t

    def to_ms(self, ticks):
        return ticks

    async def sleep_until(self, t_ms):
        d = t_ms - self.t
        if d > 0:
            self.t = t_ms
        await asyncio.sleep_ms(0)
        return d


async def app_key():
    """Test AppKey provider (on the board: the STSAFE unwraps the key into RAM)."""
    return APP_KEY


class TestWrapper:
    """Test key wrapper: AES-128-ECB under a fixed RAM key. Test only: on the board this is the
    STSAFE-A110's local envelope (the wrapping key never leaves the chip)."""

    KEK = bytes(range(0xA0, 0xB0))

    async def wrap(self, data):
        out = bytearray(data)
        cryptolib.aes(self.KEK, 1).encrypt(out, out)
        return b"W1" + bytes(out)

    async def unwrap(self, env):
        if env[:2] != b"W1":
            raise ValueError("envelope")
        out = bytearray(env[2:])
        cryptolib.aes(self.KEK, 1).decrypt(out, out)
        return bytes(out)


def join_accept(dev_nonce, join_nonce=1, dev_addr=DEV_ADDR, dl=0, rx_delay=1, cflist=CFLIST,
                app_key=APP_KEY):
    b = bytearray(b"\x20")
    b += struct.pack("<I", join_nonce)[:3] + struct.pack("<I", NET_ID)[:3]
    b += struct.pack("<IBB", dev_addr, dl, rx_delay)
    if cflist:
        for f in cflist:
            b += struct.pack("<I", f // 100)[:3]
        b += b"\x00"
    mic = Key(app_key).cmac(b)[:4]
    b += mic
    body = bytearray(b[1:])
    cryptolib.aes(app_key, 1).decrypt(body, body)  # the server "decrypts" (§6.2.6)
    return bytes(b[:1]) + bytes(body), derive_session_keys(app_key, join_nonce, NET_ID,
                                                           dev_nonce)


def downlink(nwk, app, fcnt, port=None, payload=b"", fopts=b"", confirmed=False, ack=False,
             dev_addr=DEV_ADDR, fpending=False):
    b = bytearray([(5 if confirmed else 3) << 5])
    b += struct.pack("<I", dev_addr)
    b.append(len(fopts) | (0x20 if ack else 0) | (0x10 if fpending else 0))
    b += struct.pack("<H", fcnt & 0xFFFF) + fopts
    if port is not None:
        b.append(port)
        start = len(b)
        b += payload
        Key(nwk if port == 0 else app).crypt(1, dev_addr, fcnt, b, start, len(payload))
    mic = Key(nwk).frame_mic(1, dev_addr, fcnt, b, len(b))
    return bytes(b + struct.pack("<I", mic))


class RxPacket(bytearray):
    def __init__(self, data, snr=5):
        super().__init__(data)
        self.snr = snr
        self.rssi = -80
        self.valid_crc = True


class FakeModem:
    """Records transmissions (t_start, freq, sf, toa_ms, bytes); `responder(modem, frame)`
    may return (delay_ms after TX end, frame) for one downlink, played in the window that opens
    around that time with the right frequency and SF (or None)."""

    def __init__(self, clock, responder=None):
        self.clock = clock
        self.responder = responder
        self.cfg = {}
        self.sent = []
        self.pending = None  # (t_arrival, freq_khz, sf, frame)
        self.windows = []

    def configure(self, cfg):
        self.cfg.update(cfg)

    def get_time_on_air_us(self, n):
        return eu868.time_on_air_us(n, self.cfg["sf"])

    async def send(self, frame, tx_at_ms=None):
        c = self.cfg
        toa = eu868.time_on_air_ms(len(frame), 12 - c["sf"] if c["sf"] >= 7 else 5)
        t0 = self.clock.t
        self.sent.append((t0, c["freq_khz"], c["sf"], toa, bytes(frame)))
        self.clock.t += toa
        if self.responder:
            r = self.responder(self, bytes(frame))
            if r:
                delay, dl, freq_khz, sf = r
                self.pending = (self.clock.t + delay, freq_khz, sf, dl)
        return self.clock.t

    async def recv(self, timeout_ms=None, rx_length=0xFF, rx_packet=None):
        c = self.cfg
        t0 = self.clock.t
        self.windows.append((t0, c["freq_khz"], c["sf"], timeout_ms))
        p = self.pending
        if p and t0 <= p[0] <= t0 + timeout_ms and p[1] == c["freq_khz"] and p[2] == c["sf"]:
            self.pending = None
            self.clock.t = p[0] + eu868.time_on_air_ms(len(p[3]), 12 - p[2], uplink=False)
            return RxPacket(p[3])
        self.clock.t = t0 + timeout_ms
        if p and p[0] < self.clock.t:
            self.pending = None  # missed: it was not in this window
        return None
