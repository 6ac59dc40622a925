# The LoRaWAN MAC on the unix port with a fake modem and a virtual clock: OTAA join (RX1 and
# RX2, CFList), uplink / downlink, FCntDown replay and wrong MIC refused, MAC commands and their
# answers in FOpts, ADR back-off, session restore across a "reboot", RFC 4493 CMAC vectors.
import asyncio
import struct
from binascii import unhexlify

from drivers.lorawan import FrameRefused, LorawanError, eu868
from drivers.lorawan.crypto import Key
from drivers.lorawan.device import Device
from drivers.lorawan.mac import Mac
from drivers.lorawan.store import RamStore
import lorawan_fakes as F


def _check(cond, *what):
    if not cond:
        raise AssertionError(" ".join(str(w) for w in what))


def test_cmac_rfc4493_vectors():
    # RFC 4493 §4, AES-128 key 2b7e1516..., messages of 0, 16, 40 and 64 bytes.
    k = Key(unhexlify("2b7e151628aed2a6abf7158809cf4f3c"))
    m = unhexlify("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
                  "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710")
    for n, tag in ((0, "bb1d6929e95937287fa37d129b756746"),
                   (16, "070a16b46b4d4144f79bdd9dd04a287c"),
                   (40, "dfa66747de9ae63030ca32611497c827"),
                   (64, "51f0bebf7e3b9d92fc49741779363cfe")):
        got = bytes(k.cmac(m, 0, n))
        _check(got == unhexlify(tag), "cmac", n, got)


class _Net:
    """A responder that answers join-requests in RX1 (or RX2) and data uplinks with queued
    downlinks, as a network server would."""

    def __init__(self, window=1, dl=0, cflist=F.CFLIST):
        self.window = window
        self.dl = dl
        self.cflist = cflist
        self.keys = None
        self.fcnt_down = 0
        self.queue = []
        self.join_nonce = 0
        self.answer_join = True
        self.rx_delay = 1000

    def __call__(self, modem, frame):
        c = modem.cfg
        if frame[0] == 0x00:
            if not self.answer_join:
                return None
            dev_nonce = frame[17] | frame[18] << 8
            self.join_nonce += 1
            ja, self.keys = F.join_accept(dev_nonce, self.join_nonce, dl=self.dl,
                                          cflist=self.cflist)
            if self.window == 1:
                return 5000, ja, c["freq_khz"], c["sf"]
            return 6000, ja, 869525, 12
        if self.queue:
            kw = self.queue.pop(0)
            fc = kw.pop("fcnt", self.fcnt_down)
            self.fcnt_down = fc + 1
            dl = F.downlink(self.keys[0], self.keys[1], fc, **kw)
            return self.rx_delay, dl, c["freq_khz"], c["sf"]
        return None


def _device(net, store=None, clock=None, wrapper=None, **kw):
    clock = clock or F.VirtualClock()
    modem = F.FakeModem(clock, net)
    dev = Device(modem, store or RamStore(), F.DEV_EUI, F.JOIN_EUI, F.app_key,
                 key_wrapper=wrapper, clock=clock, seed=7, **kw)
    return dev, modem, clock


async def test_join_rx1_with_cflist():
    net = _Net()
    dev, modem, clock = _device(net)
    await dev.join(max_attempts=1)
    mac = dev.mac
    _check(mac.joined and mac.dev_addr == F.DEV_ADDR, "joined")
    _check(mac.freqs[3:8] == list(F.CFLIST), "cflist", mac.freqs)
    _check(mac.chmask == 0xFF, "mask", mac.chmask)
    _check(dev.stats["rx1"] == 1, dev.stats)
    t0, fk, sf, toa, frame = modem.sent[0]
    _check(len(frame) == 23 and frame[0] == 0, "join request", frame)
    _check(fk * 1000 in eu868.DEFAULT_CHANNELS, "join channel", fk)
    # RX1 opened 5 s after the end of the join-request, minus the margin.
    w = modem.windows[0]
    _check(w[0] == t0 + toa + 5000 - 20, "rx1 time", w, t0, toa)


async def test_join_rx2_and_retry_uses_new_devnonce():
    net = _Net(window=2)
    net.answer_join = False
    store = RamStore()
    dev, modem, clock = _device(net, store)
    try:
        await dev.join(max_attempts=2)
        raise AssertionError("joined without an answer")
    except LorawanError as e:
        _check(e.reason == "join failed", e)
    net.answer_join = True
    await dev.join(max_attempts=1)
    _check(dev.stats["rx2"] == 1, dev.stats)
    nonces = [f[17] | f[18] << 8 for _, _, _, _, f in modem.sent]
    _check(nonces == [0, 1, 2], nonces)
    _check(struct.unpack("<H", store.load("nonce"))[0] == 3, "nonce record")
    # RX2: 869.525 MHz, SF12, 6 s after the end
    w = modem.windows[-1]
    _check(w[1] == 869525 and w[2] == 12, w)


async def test_uplink_downlink_replay_and_mic():
    net = _Net()
    dev, modem, clock = _device(net)
    await dev.join(max_attempts=1)
    net.queue.append({"port": 10, "payload": b"ack-1"})
    got = await dev.send(10, b"hello")
    _check(got == (10, b"ack-1"), got)
    # Replay the same downlink bytes after the next uplink: refused as a replay.
    replay = F.downlink(net.keys[0], net.keys[1], 0, port=10, payload=b"ack-1")
    n0 = dev.mac.stats["replay"]
    def replayer(modem, frame):
        return 1000, replay, modem.cfg["freq_khz"], modem.cfg["sf"]
    modem.responder = replayer
    got = await dev.send(10, b"again")
    _check(got is None and dev.mac.stats["replay"] == n0 + 1, got, dev.mac.stats)
    # Wrong MIC: one bit flipped in the MIC.
    bad = bytearray(F.downlink(net.keys[0], net.keys[1], 5, port=10, payload=b"x"))
    bad[-1] ^= 1
    def forger(modem, frame):
        return 1000, bytes(bad), modem.cfg["freq_khz"], modem.cfg["sf"]
    modem.responder = forger
    got = await dev.send(10, b"third")
    _check(got is None and dev.mac.stats["mic"] == 1, got, dev.mac.stats)
    _check(dev.mac.fcnt_down == 1, dev.mac.fcnt_down)


async def test_fcnt_down_32bit_reconstruction():
    net = _Net()
    dev, modem, clock = _device(net)
    await dev.join(max_attempts=1)
    modem.responder = net
    for fc in (0xFFFE, 0x10003):  # across the 16-bit rollover
        net.queue.append({"port": 10, "payload": b"d", "fcnt": fc})
        got = await dev.send(10, b"u")
        _check(got == (10, b"d"), fc, got)
    _check(dev.mac.fcnt_down == 0x10004, hex(dev.mac.fcnt_down))


async def test_mac_commands_answers_in_fopts():
    net = _Net()
    dev, modem, clock = _device(net)
    await dev.join(max_attempts=1)
    # LinkADRReq: DR3, TXPower 2, channels 0-7, NbTrans 1; DevStatusReq; RXTimingSetupReq 2 s;
    # RXParamSetupReq RX1DROffset 1, RX2 DR3, 869.525 MHz; DutyCycleReq 0; NewChannelReq
    # ch 8 868.8 MHz DR0-5.
    fopts = (b"\x03\x32\xff\x00\x01" + b"\x06" + b"\x08\x02")
    port0 = (b"\x05\x13" + struct.pack("<I", 8695250)[:3] + b"\x04\x00"
             + b"\x07\x08" + struct.pack("<I", 8688000)[:3] + b"\x50")
    net.queue.append({"fopts": fopts})
    await dev.send(10, b"one")
    mac = dev.mac
    _check(mac.dr == 3 and mac.tx_power == 2 and mac.chmask == 0xFF, mac.dr, mac.tx_power)
    _check(mac.rx_delay_ms == 2000, mac.rx_delay_ms)
    net.rx_delay = 2000
    net.queue.append({"port": 0, "payload": port0})
    await dev.send(10, b"two")
    frame = modem.sent[-1][4]
    folen = frame[5] & 0x0F
    fo = bytes(frame[8:8 + folen])
    # answers of the first downlink: LinkADRAns 7, DevStatusAns (255, snr 5), RXTimingSetupAns
    _check(fo == b"\x08\x03\x07\x06\xff\x05", "fopts 1", fo)
    _check(mac.rx1_dro == 1 and mac.rx2_dr == 3 and mac.freqs[8] == 868_800_000, "applied")
    await dev.send(10, b"three")
    frame = modem.sent[-1][4]
    fo = bytes(frame[8:8 + (frame[5] & 0x0F)])
    # RXTimingSetupAns is sticky but a downlink came after it: gone; RXParamSetupAns sticky
    # (no downlink since), DutyCycleAns and NewChannelAns one-shot.
    _check(fo == b"\x05\x07\x04\x07\x03", "fopts 2", fo)
    await dev.send(10, b"four")
    frame = modem.sent[-1][4]
    fo = bytes(frame[8:8 + (frame[5] & 0x0F)])
    _check(fo == b"\x05\x07", "sticky RXParamSetupAns until a downlink", fo)


async def test_link_adr_nack_changes_nothing():
    net = _Net()
    dev, modem, clock = _device(net)
    await dev.join(max_attempts=1)
    # ChMask enables channel 12 (undefined): channel mask NACK; DR and power not applied.
    net.queue.append({"fopts": b"\x03\x21\x01\x10\x01"})
    await dev.send(10, b"x")
    _check(dev.mac.dr == 5 and dev.mac.tx_power == 0, dev.mac.dr)
    await dev.send(10, b"y")
    fo = modem.sent[-1][4][8:8 + (modem.sent[-1][4][5] & 0x0F)]
    _check(bytes(fo) == b"\x03\x06", bytes(fo))


async def test_adr_backoff():
    net = _Net()
    dev, modem, clock = _device(net)
    await dev.join(max_attempts=1)
    mac = dev.mac
    mac.tx_power = 3
    seen = []
    for i in range(64 + 32 * 3 + 1):
        await dev.send(10, b"z")
        fctrl = modem.sent[-1][4][5]
        seen.append((mac.adr_ack_cnt, bool(fctrl & 0x40), mac.tx_power, mac.dr))
    _check(not seen[63][1] and seen[64][1], "ADRACKReq from ADR_ACK_LIMIT", seen[62:66])
    _check(seen[94][2] == 3 and seen[95][2] == 0, "power to max at LIMIT + DELAY", seen[94:96])
    _check(seen[126][3] == 5 and seen[127][3] == 4, "DR down one more DELAY later")
    _check(seen[159][3] == 3, "and again", seen[159])


async def test_session_survives_reboot_with_wrapper():
    net = _Net()
    store = RamStore()
    dev, modem, clock = _device(net, store, wrapper=F.TestWrapper())
    await dev.join(max_attempts=1)
    for _ in range(5):
        await dev.send(10, b"p")
    rec = store.load("session")
    _check(F.APP_KEY not in rec and net.keys[0] not in rec and net.keys[1] not in rec,
           "no key in clear in the session record")
    dev2, modem2, _ = _device(net, store, clock=clock, wrapper=F.TestWrapper())
    _check(await dev2.start(), "restored")
    await dev2.send(10, b"q")
    f = modem2.sent[-1][4]
    fc = f[6] | f[7] << 8
    _check(fc == 32, "resumes at the reservation limit", fc)
    # Without a wrapper nothing is persisted of the session: a reboot rejoins.
    store3 = RamStore()
    dev3, _, _ = _device(net, store3)
    await dev3.join(max_attempts=1)
    _check(store3.load("session") is None, "no session record without a wrapper")


def test_too_long_and_not_joined():
    mac = Mac(RamStore(), F.DEV_EUI, F.JOIN_EUI)
    try:
        mac.build_uplink(0, 10, b"x")
        raise AssertionError("sent while not joined")
    except LorawanError as e:
        _check(e.reason == "not joined", e)
    mac.joined = True
    mac._nwk = mac._app = Key(bytes(16))
    for dr, n in ((0, 51), (3, 115), (5, 222)):
        mac.dr = dr
        _check(mac.max_payload() == n, dr, mac.max_payload())
        mac.build_uplink(dr * 10_000_000, 10, bytes(n))
        try:
            mac.build_uplink(dr * 10_000_000 + 5_000_000, 10, bytes(n + 1))
            raise AssertionError("too long accepted")
        except LorawanError as e:
            _check(e.reason == "too long", e)
