# LTE-M radio pieces that need no broker: MQTT bytes against the MQTT 3.1.1 standard (OASIS,
# 29 October 2014; section numbers below), the socket wrapper umqtt.simple runs on, the
# downlink queue, and the modem's AT bring-up against a scripted fake modem (3GPP TS 27.007
# replies as a Quectel BG95 gives them). The broker-facing behaviour is in tests/test_ltem.py.
import asyncio

from umqtt.simple import MQTTException

from drivers.radio import ltem
from drivers.radio.base import Radio, RadioError
from drivers.radio.ltem import LtemError, LtemRadio, ModemPpp, RadioDown

_ETIMEDOUT = 110
_EMSGSIZE = 90


class FakeSock:
    """A TCP socket: records writes and time-out settings; serves `rx` in `chunk`-byte reads."""

    def __init__(self, rx=b"", chunk=4096):
        self.rx = bytearray(rx)
        self.chunk = chunk
        self.writes = []
        self.timeout = "unset"
        self.closed = False

    def settimeout(self, t):
        self.timeout = t

    def setblocking(self, flag):
        self.timeout = None if flag else 0

    def write(self, data):
        self.writes.append(bytes(data))
        return len(data)

    def read(self, n):
        if not self.rx:
            if self.timeout == 0:
                return None
            raise OSError(_ETIMEDOUT)
        k = min(n, self.chunk, len(self.rx))
        out = bytes(self.rx[:k])
        self.rx = self.rx[k:]
        return out

    def readinto(self, buf):
        data = self.read(len(buf))
        if not data:
            return data
        buf[: len(data)] = data
        return len(data)

    def close(self):
        self.closed = True


def wrapped(rx=b"", chunk=4096, gather=True, max_read=256):
    raw = FakeSock(rx, chunk)
    return raw, ltem._Sock(raw, raw, 400, max_read, gather)


def client_on(sock):
    c = ltem._Client(b"dev-1", "127.0.0.1", 1883, b"dev-1", b"pw", 240)
    c.sock = sock
    return c


def mqtt_str(s):
    return bytes((len(s) >> 8, len(s) & 0xFF)) + s


def test_remaining_length_matches_the_table_of_2_2_3():
    table = [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"),
             (16384, b"\x80\x80\x01"), (2097151, b"\xff\xff\x7f"),
             (2097152, b"\x80\x80\x80\x01"), (268435455, b"\xff\xff\xff\x7f")]
    for n, want in table:
        buf = bytearray(4)
        end = ltem.encode_length(buf, 0, n)
        assert bytes(buf[:end]) == want, (n, buf)


def test_connect_packet_follows_3_1():
    pkt = bytes(ltem.connect_packet(b"dev-1", b"dev-1", b"s3cret", 240))
    # Figure 3.2: fixed header; 3.1.2: "MQTT", level 4, flags user|password|clean = 0xC2,
    # keep-alive 240 big-endian; 3.1.3: client id, user name, password, each length-prefixed.
    payload = mqtt_str(b"dev-1") + mqtt_str(b"dev-1") + mqtt_str(b"s3cret")
    var = b"\x00\x04MQTT\x04\xc2\x00\xf0"
    assert pkt == b"\x10" + bytes((len(var) + len(payload),)) + var + payload
    # No account: flags = clean session only; no user name, no password.
    assert bytes(ltem.connect_packet(b"x", keepalive_s=0)) == (
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01x")


def test_connect_checks_connack_with_if_not_assert():
    raw, sock = wrapped(b"\x20\x02\x00\x00")
    assert client_on(sock).connect() == 0
    assert raw.writes == [bytes(ltem.connect_packet(b"dev-1", b"dev-1", b"pw", 240))]
    # 3.2.2.3 return code 5: not authorized.
    raw, sock = wrapped(b"\x20\x02\x00\x05")
    try:
        client_on(sock).connect()
        raise AssertionError("refused CONNACK accepted")
    except MQTTException as e:
        assert e.args[0] == 5
    for garbage in (b"\x30\x02\x00\x00", b"\x20\x03\x00\x00"):
        raw, sock = wrapped(garbage)
        try:
            client_on(sock).connect()
            raise AssertionError("bad CONNACK accepted")
        except LtemError as e:
            assert e.reason == "bad connack"
    raw, sock = wrapped(b"\x20\x02")  # truncated: the time-out, not a hang
    try:
        client_on(sock).connect()
        raise AssertionError("truncated CONNACK accepted")
    except OSError as e:
        assert e.errno == _ETIMEDOUT


def test_qos1_publish_is_one_write_of_the_3_3_packet():
    raw, sock = wrapped(b"\x40\x02\x00\x01")  # PUBACK for packet id 1 (3.4)
    c = client_on(sock)
    c.publish(b"serene/dev-1/up", b"\x01\x02\x03", False, 1)
    topic = mqtt_str(b"serene/dev-1/up")
    body = topic + b"\x00\x01" + b"\x01\x02\x03"
    # 3.3.1: type 3, DUP 0, QoS 1 (bits 2-1 = 01), RETAIN 0 -> 0x32.
    assert raw.writes == [b"\x32" + bytes((len(body),)) + body]
    # Without gathering, umqtt.simple writes the same bytes in five pieces (Nagle's prey).
    raw, sock = wrapped(b"\x40\x02\x00\x01", gather=False)
    client_on(sock).publish(b"serene/dev-1/up", b"\x01\x02\x03", False, 1)
    assert len(raw.writes) == 5 and b"".join(raw.writes) == b"\x32" + bytes((len(body),)) + body


def test_blocking_always_has_a_timeout():
    raw, sock = wrapped()
    assert raw.timeout == 0.4
    sock.setblocking(False)
    assert raw.timeout == 0
    sock.setblocking(True)  # umqtt calls this after check_msg's first read: never "forever"
    assert raw.timeout == 0.4


def test_check_msg_with_nothing_there_returns_at_once():
    raw, sock = wrapped()
    c = client_on(sock)
    assert c.check_msg() is None
    assert raw.timeout == 0.4


def test_reads_are_capped_completed_or_failed():
    # Over max_read: consumed through the scratch buffer (never allocated), b"" returned and
    # `oversize` set, the stream still in step; over _DISCARD_MAX: EMSGSIZE.
    raw, sock = wrapped(b"\x00" * 300 + b"next", chunk=7, max_read=256)
    assert sock.read(300) == b"" and sock.oversize and sock.rx_bytes == 300
    assert sock.read(4) == b"next"
    raw, sock = wrapped(b"\x00" * 5000, max_read=256)
    try:
        sock.read(4097)  # drivers/radio/ltem.py _DISCARD_MAX + 1 (a private const)
        raise AssertionError("unbounded discard")
    except OSError as e:
        assert e.errno == _EMSGSIZE
    raw, sock = wrapped(b"abcdef", chunk=1)
    assert sock.read(4) == b"abcd" and sock.rx_bytes == 4
    raw, sock = wrapped(b"ab", chunk=1)
    try:
        sock.read(4)
        raise AssertionError("short read handed back")
    except OSError as e:
        assert e.errno == _ETIMEDOUT


def test_oversize_downlink_is_discarded_acked_and_counted_and_the_next_one_arrives():
    async def main():
        topic = mqtt_str(b"serene/dev-1/down")
        big = topic + b"\x00\x08" + bytes(300)
        small = topic + b"\x00\x09" + b"ack"
        rx = b"\x32" + bytes((len(big) & 0x7F | 0x80, len(big) >> 7)) + big
        rx += b"\x32" + bytes((len(small),)) + small
        radio = LtemRadio("dev-1", "127.0.0.1", 1, "dev-1", "pw", max_downlink=256)
        raw, sock = wrapped(rx, chunk=50)
        radio._sock = sock
        c = client_on(sock)
        c.set_callback(radio._on_message)
        c.check_msg()
        c.check_msg()
        sock.flush()
        assert b"".join(raw.writes) == b"\x40\x02\x00\x08\x40\x02\x00\x09"  # both PUBACKed
        assert await radio.recv(10) == b"ack" and await radio.recv(10) is None
        st = radio.stats
        assert st["downlinks_oversize"] == 1 and st["downlinks_dropped"] == 1
        assert st["downlinks"] == 1

    asyncio.run(main())


def test_downlink_received_through_check_msg_is_queued_unchanged():
    async def main():
        payload = b"\xd0\x00reboot\x00"  # looks like a PINGRESP and a command: it is bytes
        topic = mqtt_str(b"serene/dev-1/down")
        body = topic + b"\x00\x07" + payload
        radio = LtemRadio("dev-1", "127.0.0.1", 1, "dev-1", "pw")
        raw, sock = wrapped(b"\x32" + bytes((len(body),)) + body)
        c = client_on(sock)
        c.set_callback(radio._on_message)
        c.check_msg()
        sock.flush()  # as the radio's poll task does after each round of check_msg()
        assert raw.writes == [b"\x40\x02\x00\x07"]  # PUBACK for packet id 7 (3.4)
        assert await radio.recv(10) == payload
        assert await radio.recv(10) is None

    asyncio.run(main())


async def test_downlink_queue_drops_the_oldest_and_ignores_strays():
    radio = LtemRadio("dev-1", "127.0.0.1", 1, "dev-1", "pw", rx_slots=3, max_downlink=8)
    for i in range(5):
        radio._on_message(b"serene/dev-1/down", bytes([i]))
    radio._on_message(b"serene/dev-2/down", b"not mine")
    radio._on_message(b"serene/dev-1/down", b"123456789")  # over max_downlink
    got = []
    for _ in range(4):
        got.append(await radio.recv(10))
    assert got == [b"\x02", b"\x03", b"\x04", None]
    assert radio.stats["downlinks_dropped"] == 3
    assert radio.stats["downlinks_overflow"] == 2 and radio.stats["downlinks_oversize"] == 1
    assert radio.stats["downlinks_stray"] == 1
    assert radio.stats["downlinks"] == 5


async def test_recv_wakes_when_a_downlink_arrives():
    radio = LtemRadio("dev-1", "127.0.0.1", 1, "dev-1", "pw")

    async def later():
        await asyncio.sleep_ms(30)
        radio._on_message(b"serene/dev-1/down", b"ack")

    assert await radio.recv(0) is None  # timeout_ms = 0 polls (drivers/radio/base.py)
    asyncio.create_task(later())
    assert await radio.recv(2000) == b"ack"


async def test_send_while_down_fails_at_once_and_checks_the_mtu():
    radio = LtemRadio("dev-1", "127.0.0.1", 1, "dev-1", "pw", mtu=100)
    assert isinstance(radio, Radio) and radio.mtu == 100 and radio.budget.wait_ms() == 0
    assert not radio.is_up()
    try:
        await radio.send(b"x")
        raise AssertionError("sent while down")
    except RadioDown as e:
        # The link layer's contract (drivers/radio/base.py): a RadioError, itself an OSError.
        assert e.reason == "down" and isinstance(e, RadioError) and isinstance(e, OSError)
    try:
        await radio.send(bytes(101))
        raise AssertionError("frame over the MTU sent")
    except LtemError as e:
        assert e.reason == "frame too long" and e.detail == 101


def test_time_on_air_and_jitter():
    radio = LtemRadio("dev-1", "127.0.0.1", 1, "dev-1", "pw")
    # (100 + 70 bytes) * 8 bits at 100 kbit/s = 13.6 ms, rounded up.
    assert radio.time_on_air_ms(100) == 14
    assert radio.time_on_air_ms(0) < radio.time_on_air_ms(1024)
    seen = [LtemRadio._jitter(1000) for _ in range(200)]
    assert min(seen) >= 0 and max(seen) < 1000 and len(set(seen)) > 50
    assert LtemRadio._jitter(0) == 0


async def test_unreachable_broker_backs_off_and_loop_runs():
    # Nothing listens on port 1 of loopback: every attempt is refused at once.
    radio = LtemRadio("dev-1", "127.0.0.1", 1, "dev-1", "pw", backoff_min_ms=20,
                      backoff_max_ms=80)
    task = asyncio.create_task(radio.run())
    ticks = 0
    for _ in range(30):
        await asyncio.sleep_ms(10)
        ticks += 1
    task.cancel()
    await asyncio.sleep_ms(0)
    assert ticks == 30 and not radio.is_up()
    assert radio.stats["connect_failures"] >= 3
    assert 0 < radio.backoff_ms <= 80
    assert isinstance(radio.last_error, OSError)


# --- the modem's AT bring-up ------------------------------------------------------------


class FakeModem:
    """A modem on a UART: echoes until ATE0, answers from `replies` (command -> list of reply
    texts, one per call; the last repeats), slips in an unsolicited result code."""

    def __init__(self, replies, silent=False):
        self.replies = replies
        self.silent = silent
        self.echo = True
        self.out = b""
        self.line = b""
        self.log = []

    def write(self, data):
        self.line += bytes(data)
        while b"\r" in self.line:
            cmd, self.line = self.line.split(b"\r", 1)
            self.log.append(cmd)
            if self.silent:
                continue
            if self.echo:
                self.out += cmd + b"\r\r\n"
            if cmd == b"ATE0":
                self.echo = False
            seq = self.replies.get(cmd, [b"OK"])
            reply = seq.pop(0) if len(seq) > 1 else seq[0]
            self.out += b"\r\n+QIND: \"csq\",20,99\r\n" if cmd == b"AT+CFUN=1" else b""
            self.out += b"".join(b"\r\n" + r + b"\r\n" for r in reply.split(b"|"))
        return len(data)

    def any(self):
        return len(self.out)

    def read(self, n=None):
        out, self.out = self.out, b""
        return out


class FakePPP:
    def __init__(self, uart):
        self.uart = uart
        self.state = []

    def active(self, flag):
        self.state.append(("active", flag))

    def connect(self):
        self.state.append("connect")

    def isconnected(self):
        return "connect" in self.state

    def disconnect(self):
        self.state.append("disconnect")


def happy_modem():
    return FakeModem({
        b"AT+CPIN?": [b"+CPIN: READY|OK"],
        b"AT+CEREG?": [b"+CEREG: 0,2|OK", b"+CEREG: 0,5|OK"],  # searching, then roaming
        b"ATD*99***1#": [b"CONNECT 150000000"],
    })


async def test_modem_bring_up_follows_27_007_and_starts_ppp():
    uart = happy_modem()
    ppps = []

    def factory(u):
        ppps.append(FakePPP(u))
        return ppps[-1]

    m = ModemPpp(uart, "iot.example", factory, attach_ms=30_000)
    await m.up()
    assert m.isconnected() and ppps[0].uart is uart
    assert ppps[0].state == [("active", True), "connect"]
    cmds = [c for c in uart.log if c != b"AT+CEREG?"]
    assert cmds == [b"AT", b"ATE0", b"AT+CMEE=1", b"AT+CPIN?", b'AT+QCFG="iotopmode",0,1',
                    b'AT+QCFG="nwscanseq",02,1', b'AT+CGDCONT=1,"IP","iot.example"',
                    b"AT+CFUN=1", b"ATD*99***1#"]
    assert uart.log.count(b"AT+CEREG?") == 2
    await m.down()
    assert not m.isconnected()


async def test_modem_failures_are_named():
    async def fails(modem, reason, **kw):
        m = ModemPpp(modem, "apn", FakePPP, **kw)
        try:
            await m.up()
        except LtemError as e:
            assert e.reason == reason, (e.reason, reason)
            return e
        raise AssertionError("bring-up did not fail: " + reason)

    await fails(FakeModem({}, silent=True), "modem silent", sync_tries=2)
    await fails(FakeModem({b"AT+CPIN?": [b"+CPIN: SIM PIN|OK"]}), "sim not ready")
    e = await fails(FakeModem({b"AT+CPIN?": [b"+CPIN: READY|OK"],
                               b'AT+CGDCONT=1,"IP","apn"': [b"+CME ERROR: 50"]}), "at error")
    assert e.detail == (b'AT+CGDCONT=1,"IP","apn"', b"+CME ERROR: 50")
    await fails(FakeModem({b"AT+CPIN?": [b"+CPIN: READY|OK"],
                           b"AT+CEREG?": [b"+CEREG: 0,3|OK"]}), "not registered", attach_ms=50)
    await fails(FakeModem({b"AT+CPIN?": [b"+CPIN: READY|OK"],
                           b"AT+CEREG?": [b"+CEREG: 0,1|OK"],
                           b"ATD*99***1#": [b"NO CARRIER"]}), "dial failed")
