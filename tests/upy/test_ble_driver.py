# drivers/radio/ble.py against a fake aioble (the API the driver uses, nothing behind it): the
# GATT table it declares, the downlink path (handshake, bounded queue, oversize, stale
# connections), the error mapping of send(), time on air. End to end over the simulator:
# tests/test_ble_radio.py.
import asyncio

from drivers.radio.ble import BleError, BleRadio


class DeviceDisconnectedError(Exception):
    pass


class GattError(Exception):
    pass


class Service:
    def __init__(self, uuid):
        self.uuid = uuid
        self.characteristics = []


class Characteristic:
    def __init__(self, service, uuid, read=False, write=False, write_no_response=False,
                 notify=False, indicate=False, initial=None, capture=False):
        service.characteristics.append(self)
        self.uuid = uuid
        self.flags = ((2 if read else 0) | (8 if write else 0) | (4 if write_no_response else 0)
                      | (0x10 if notify else 0) | (0x20 if indicate else 0))
        self.capture = capture
        self.value = None
        self.writes = []
        self.indicate_raises = None
        self.indicated = []

    def write(self, data, send_update=False):
        self.value = bytes(data)

    async def written(self, timeout_ms=None):
        if not self.writes:
            await asyncio.sleep_ms(timeout_ms)
            raise asyncio.TimeoutError
        return self.writes.pop(0)

    async def indicate(self, connection, data=None, timeout_ms=1000):
        self.indicated.append((bytes(data), timeout_ms))
        if self.indicate_raises is not None:
            raise self.indicate_raises


class BufferedCharacteristic(Characteristic):
    def __init__(self, *args, max_len=20, append=False, **kw):
        super().__init__(*args, **kw)
        self.max_len = max_len


class Conn:
    def __init__(self, mtu=247):
        self.mtu = mtu
        self.connected = True
        self.disconnects = 0

    def is_connected(self):
        return self.connected

    async def disconnect(self, timeout_ms=2000):
        self.disconnects += 1
        self.connected = False


class FakeAioble:
    Service = Service
    Characteristic = Characteristic
    BufferedCharacteristic = BufferedCharacteristic
    DeviceDisconnectedError = DeviceDisconnectedError
    GattError = GattError


def uuid(s):
    return s


def radio(**kw):
    return BleRadio(FakeAioble, uuid, "SRN-0001", pending=lambda: 3, **kw)


def test_gatt_table_three_characteristics_one_writable():
    r = radio()
    chars = r._svc.characteristics
    assert r._svc.uuid == "cf0c0001-70d3-4534-86e0-9bcdf6990dc9"
    got = [(c.uuid[:8], c.flags) for c in chars]
    assert got == [("cf0c0002", 0x20), ("cf0c0003", 0x08 | 0x1000), ("cf0c0004", 0x02 | 0x200)]
    assert [c.uuid[:8] for c in chars if c.flags & 0x0C] == ["cf0c0003"]
    assert chars[1].capture
    # The stack's value buffers: the downlink one byte over the largest downlink (80), so a
    # longer write, cut to the buffer, still shows as oversize; the status its record.
    assert (chars[1].max_len, chars[2].max_len) == (81, 2 + 8 + 6)
    r = radio(secure=False)
    assert [c.flags for c in r._svc.characteristics] == [0x20, 0x08, 0x02]


def test_status_record_bytes():
    r = radio()
    r._refresh_status()
    assert r._st.value == b"\x01\x08SRN-0001\x03\x00\x00\x00\x17\x00"
    r._conn = Conn(185)
    r._refresh_status()
    assert r._st.value == b"\x01\x08SRN-0001\x03\x00\x00\x00\xb9\x00"


def test_name_too_long_refused():
    try:
        BleRadio(FakeAioble, uuid, "X" * 30)
    except ValueError:
        return
    raise AssertionError("a 30-character name was accepted")


async def test_downlinks_handshake_queue_oversize_stale():
    r = radio()
    c = Conn()
    other = Conn()
    r._conn = c
    assert not r.is_up()
    r._down.writes = [(c, b""), (c, b"a"), (other, b"x"), (c, bytes(81)), (c, bytes(80)),
                      (c, b"1"), (c, b"2"), (c, b"3")]
    t = asyncio.create_task(r._rx_task())
    await asyncio.sleep_ms(20)
    t.cancel()
    assert r.is_up()  # the zero-length write: the hub has enabled indications
    s = r.stats
    assert (s["downlinks"], s["downlinks_oversize"], s["downlinks_stale"],
            s["downlinks_dropped"]) == (5, 1, 1, 1)
    got = []
    for _ in range(5):
        got.append(await r.recv(0))
    assert got == [bytes(80), b"1", b"2", b"3", None]  # the oldest ("a") went first
    assert await r.recv(10) is None


async def test_send_maps_errors_and_times_out_by_closing():
    r = radio()
    c = Conn()
    r._conn = c
    try:
        await r.send(b"x")
    except BleError as e:
        assert e.reason == "down"  # connected, but the hub has not announced itself
    else:
        raise AssertionError("sent before the handshake")
    r._ready = True
    assert r.mtu == 244
    assert await r.send(bytes(244))
    assert r._up.indicated[-1] == (bytes(244), 2000)
    for exc, reason in ((GattError(5), "gatt"), (DeviceDisconnectedError(), "disconnected"),
                        (ValueError("Not connected"), "down"),
                        (asyncio.TimeoutError(), "timeout")):
        r._up.indicate_raises = exc
        try:
            await r.send(b"abc")
        except BleError as e:
            assert e.reason == reason, (e.reason, reason)
            if reason == "gatt":
                assert e.detail == 5
        else:
            raise AssertionError("no error for %r" % exc)
    assert c.disconnects == 1  # only the timeout closes the connection
    assert r.stats["sent"] == 1 and r.stats["send_failures"] == 4 and r.stats["timeouts"] == 1
    r._up.indicate_raises = None
    c.connected = True
    try:
        await r.send(bytes(245))
    except BleError as e:
        assert e.reason == "too long" and e.detail == (245, 244)
    else:
        raise AssertionError("245 bytes sent at MTU 247")


def test_mtu_follows_the_connection():
    r = radio()
    assert r.mtu == 20
    r._conn = Conn(None)  # connected, no exchange yet
    assert r.mtu == 20
    r._conn = Conn(100)
    assert r.mtu == 97
    r = radio(mtu_max=185)
    r._conn = Conn(247)
    assert r.mtu == 182


def test_time_on_air_and_air_time():
    r = radio()  # 30 ms interval, 4 packets an event, 27-byte LL payload
    # 244 + 7 = 251 bytes: 10 fragments, 3 events, + 1 for the confirmation.
    assert r.time_on_air_ms(244) == 120
    assert r.time_on_air_ms(20) == 60  # 27 bytes: one fragment, one event, + 1
    assert r.time_on_air_ms(21) == 60  # 28 bytes: two fragments, still one event
    assert r.air_us(20) == (1 + 4 + 2 + 27 + 4 + 3) * 8
    assert r.air_us(244) == 9 * 41 * 8 + (14 + 8) * 8
    assert r.budget.wait_ms() == 0 and r.asks_acks is False
    r = BleRadio(FakeAioble, uuid, "SRN-0001", ll_payload=251, conn_interval_ms=15)
    assert r.time_on_air_ms(244) == 30
