# aioble for the unix port: the part of micropython-lib's aioble API that drivers/radio/ble.py
# uses, over TCP to the BLE medium simulator (tools/serene/ble/medium.py), so the driver is the
# same code on the unix port and on a board with the real aioble.
#
# Copyright (c) the serene-module authors. MIT licence.
#
# API (as micropython-lib aioble: server.py, peripheral.py, device.py, security.py; docs/ble.md
# lists the differences):
#   attach(host, port)           unix only: connect to the medium (the board profile calls it)
#   UUID(str)                    as bluetooth.UUID: bytes() gives the 16 bytes little-endian
#   Service(uuid), Characteristic(service, uuid, read=, write=, write_no_response=,
#       notify=, indicate=, initial=, capture=), register_services(*services)
#   BufferedCharacteristic(..., max_len=20, append=False): the value buffer's size (remote
#       writes beyond it are cut, as on a board)
#   Characteristic.read(), .write(data, send_update=False), await .written(timeout_ms=None)
#       (capture=True: (connection, data)), await .indicate(connection, data, timeout_ms=1000)
#   await advertise(interval_us, name=, services=, appearance=, manufacturer=, timeout_ms=)
#       -> DeviceConnection (None if cancelled, as aioble does)
#   DeviceConnection: mtu (None before an exchange), encrypted, authenticated, bonded,
#       key_size, is_connected(), await exchange_mtu(mtu=None, timeout_ms=1000),
#       await disconnected(timeout_ms=60000, disconnect=False), await disconnect(),
#       await pair(bond=True, le_secure=True, mitm=False, io=3, timeout_ms=20000)
#   config(mtu=, bond=, le_secure=, mitm=, io=), GattError(status), DeviceDisconnectedError
# Errors as aioble raises them: asyncio.TimeoutError on a deadline, DeviceDisconnectedError
# when the connection ends during an operation, GattError for a non-zero ATT status,
# ValueError("In progress" / "Not connected" / "Not supported").
# Wire format: tools/serene/ble/medium.py's docstring.
import asyncio
import socket
import struct
from micropython import const

_DEBUG = const(False)

_FLAG_READ = const(0x0002)
_FLAG_WRITE_NO_RESPONSE = const(0x0004)
_FLAG_WRITE = const(0x0008)
_FLAG_NOTIFY = const(0x0010)
_FLAG_INDICATE = const(0x0020)
_FLAG_WRITE_CAPTURE = const(0x10000)
# aioble keeps at most 10 captured writes (server.py _WRITE_CAPTURE_QUEUE_LIMIT); the oldest
# goes first when a new one arrives.
_CAPTURE_LIMIT = const(10)
_ADV_MAX = const(31)  # legacy advertising PDU data (Core Vol 6 Part B §2.3.1.1)
_DEFAULT_MTU = const(23)
# MicroPython's GATT server keeps each value in a buffer of MP_BLUETOOTH_DEFAULT_ATTR_LEN = 20
# bytes (extmod/modbluetooth.h) unless gatts_set_buffer() (aioble's BufferedCharacteristic)
# sizes it; a longer remote write is cut to the buffer (NimBLE: data_len = MIN(data_alloc,
# len)); a local gatts_write() grows it.
_DEFAULT_ATTR_LEN = const(20)


class GattError(Exception):
    def __init__(self, status):
        super().__init__(status)
        self._status = status


class DeviceDisconnectedError(Exception):
    pass


class SimError(OSError):
    """The medium link itself failed (not a BLE condition). `detail`: what."""

    def __init__(self, detail):
        super().__init__(detail)
        self.detail = detail


class UUID(bytearray):
    # As bluetooth.UUID offers its bytes through the buffer protocol: a bytearray (a user
    # class cannot provide __bytes__ on MicroPython).
    def __init__(self, value):
        h = value.replace("-", "")
        if len(h) != 32:
            raise ValueError("uuid")
        b = bytearray(16)
        for i in range(16):
            b[15 - i] = int(h[2 * i : 2 * i + 2], 16)
        super().__init__(b)


class _Medium:
    def __init__(self):
        self.sock = None
        self.stream = None
        self.task = None
        self.chars = {}  # value handle -> Characteristic
        self.conns = {}  # conn handle -> DeviceConnection
        self.cfg = {"mtu": _DEFAULT_MTU, "bond": False, "le_secure": False, "mitm": False,
                    "io": 3}
        self.connect_ev = None
        self.incoming = None
        self.stats = {"rx": 0, "tx": 0, "capture_dropped": 0, "malformed": 0}


_m = _Medium()


def attach(host, port):
    ai = socket.getaddrinfo(host, port)[0]
    s = socket.socket(ai[0], socket.SOCK_STREAM)
    s.connect(ai[-1])
    s.setsockopt(6, 1, 1)  # TCP_NODELAY: one message, one segment (loopback latency ~0)
    s.setblocking(False)
    _m.sock = s
    _m.stream = asyncio.StreamReader(s)


def _send(t, body=b""):
    if _m.sock is None:
        raise SimError("not attached")
    msg = struct.pack(">HB", len(body) + 1, t) + body
    # Loopback TCP to the medium: a few hundred bytes always fit the socket buffer; a short
    # write (EAGAIN) would mean the medium has stopped reading, which is fatal for the shim.
    n = _m.sock.send(msg)
    if n != len(msg):
        raise SimError("short write to the medium")
    _m.stats["tx"] += 1


def _ensure_active():
    if _m.task is None:
        if _m.stream is None:
            raise SimError("not attached")
        _m.connect_ev = asyncio.Event()
        _m.task = asyncio.create_task(_reader())


async def _reader():
    st = _m.stream
    try:
        while True:
            hdr = await st.readexactly(2)
            n = (hdr[0] << 8) | hdr[1]
            msg = await st.readexactly(n)
            _m.stats["rx"] += 1
            _event(msg[0], memoryview(msg)[1:])
    except EOFError:
        pass
    finally:
        for c in list(_m.conns.values()):
            c._gone()


def _event(t, b):
    if t == 0x43:  # C connected
        h = (b[0] << 8) | b[1]
        c = DeviceConnection(h, b[2], bytes(b[3:9]))
        _m.conns[h] = c
        _m.incoming = c
        _m.connect_ev.set()
        return
    h = (b[0] << 8) | b[1]
    c = _m.conns.get(h)
    if c is None:
        _m.stats["malformed"] += 1
        return
    if t == 0x58:  # X disconnected
        c._gone()
    elif t == 0x57:  # W write
        vh = (b[2] << 8) | b[3]
        ch = _m.chars.get(vh)
        if ch is not None:
            ch._remote_write(c, bytes(b[4:]))
    elif t == 0x4B:  # K indication done
        vh = (b[2] << 8) | b[3]
        ch = _m.chars.get(vh)
        if ch is not None and ch._ind_conn is c:
            ch._ind_status = b[4]
            ch._ind_ev.set()
    elif t == 0x55:  # U MTU exchanged
        c.mtu = (b[2] << 8) | b[3]
        c._mtu_ev.set()
    elif t == 0x45:  # E encryption update
        c.encrypted = bool(b[2])
        c.authenticated = bool(b[3])
        c.bonded = bool(b[4])
        c.key_size = b[5]
        if c.encrypted:
            c._pair_ev.set()
    else:
        _m.stats["malformed"] += 1


async def _wait(ev, conn, timeout_ms):
    # As aioble's DeviceTimeout: a deadline raises asyncio.TimeoutError, the end of the
    # connection DeviceDisconnectedError; timeout_ms None or 0 waits without one.
    if conn is not None and not conn.is_connected():
        raise DeviceDisconnectedError
    if timeout_ms:
        await asyncio.wait_for_ms(ev.wait(), timeout_ms)
    else:
        await ev.wait()
    if conn is not None and not conn.is_connected():
        raise DeviceDisconnectedError


def config(*args, **kw):
    for k in kw:
        if k not in _m.cfg:
            raise ValueError("unknown config param")
        _m.cfg[k] = kw[k]
    if args:
        return _m.cfg[args[0]]


class DeviceConnection:
    def __init__(self, handle, addr_type, addr):
        self._conn_handle = handle
        self.addr_type = addr_type
        self.addr = addr
        self.mtu = None
        self.encrypted = False
        self.authenticated = False
        self.bonded = False
        self.key_size = 0
        self._mtu_ev = asyncio.Event()
        self._pair_ev = asyncio.Event()
        self._disc_ev = asyncio.Event()

    def _gone(self):
        if self._conn_handle is None:
            return
        _m.conns.pop(self._conn_handle, None)
        self._conn_handle = None
        self._disc_ev.set()
        self._mtu_ev.set()
        self._pair_ev.set()
        for ch in _m.chars.values():
            if ch._ind_conn is self:
                ch._ind_ev.set()

    def is_connected(self):
        return self._conn_handle is not None

    async def exchange_mtu(self, mtu=None, timeout_ms=1000):
        if not self.is_connected():
            raise ValueError("Not connected")
        if mtu:
            _m.cfg["mtu"] = mtu
        self._mtu_ev.clear()
        _send(0x4D, struct.pack(">HH", self._conn_handle, _m.cfg["mtu"]))
        await _wait(self._mtu_ev, self, timeout_ms)
        return self.mtu

    async def pair(self, bond=True, le_secure=True, mitm=False, io=3, timeout_ms=20000):
        config(bond=bond, le_secure=le_secure, mitm=mitm, io=io)
        if not self.is_connected():
            raise DeviceDisconnectedError
        self._pair_ev.clear()
        _send(0x50, struct.pack(">HBBBB", self._conn_handle, 1 if bond else 0,
                                1 if le_secure else 0, 1 if mitm else 0, io))
        await _wait(self._pair_ev, self, timeout_ms)

    async def disconnected(self, timeout_ms=60000, disconnect=False):
        if not self.is_connected():
            return
        if disconnect:
            _send(0x44, struct.pack(">H", self._conn_handle))
        await _wait(self._disc_ev, None, timeout_ms)

    async def disconnect(self, timeout_ms=2000):
        await self.disconnected(timeout_ms, disconnect=True)


class Service:
    def __init__(self, uuid):
        self.uuid = uuid
        self.characteristics = []


class Characteristic:
    def __init__(self, service, uuid, read=False, write=False, write_no_response=False,
                 notify=False, indicate=False, initial=None, capture=False):
        service.characteristics.append(self)
        flags = 0
        if read:
            flags |= _FLAG_READ
        if write or write_no_response:
            flags |= (_FLAG_WRITE if write else 0) | (
                _FLAG_WRITE_NO_RESPONSE if write_no_response else 0)
            if capture:
                flags |= _FLAG_WRITE_CAPTURE
            self._write_ev = asyncio.Event()
            self._writes = []
        if notify:
            flags |= _FLAG_NOTIFY
        if indicate:
            flags |= _FLAG_INDICATE
        self._ind_conn = None
        self._ind_ev = asyncio.Event()
        self._ind_status = None
        self.uuid = uuid
        self.flags = flags
        self._value_handle = None
        self._value = initial if initial is not None else b""
        self._max_len = _DEFAULT_ATTR_LEN
        self._append = False

    def read(self):
        return self._value

    def write(self, data, send_update=False):
        self._value = bytes(data)
        if self._value_handle is not None:
            _send(0x56, struct.pack(">H", self._value_handle) + self._value)

    def _remote_write(self, conn, data):
        if not hasattr(self, "_writes"):
            _m.stats["malformed"] += 1
            return
        if self._append:
            data = self._value + data
        data = data[: self._max_len]  # the stack's value buffer
        self._value = data
        if not self.flags & _FLAG_WRITE_CAPTURE:
            self._writes = [conn]
        else:
            if len(self._writes) >= _CAPTURE_LIMIT:
                self._writes.pop(0)
                _m.stats["capture_dropped"] += 1
            self._writes.append((conn, data))
        self._write_ev.set()

    async def written(self, timeout_ms=None):
        if not hasattr(self, "_writes"):
            return None
        if not self._writes:
            self._write_ev.clear()
            await _wait(self._write_ev, None, timeout_ms)
        return self._writes.pop(0)

    async def indicate(self, connection, data=None, timeout_ms=1000):
        if not self.flags & _FLAG_INDICATE:
            raise ValueError("Not supported")
        if self._ind_conn is not None:
            raise ValueError("In progress")
        if not connection.is_connected():
            raise ValueError("Not connected")
        self._ind_conn = connection
        self._ind_status = None
        self._ind_ev.clear()
        try:
            _send(0x49, struct.pack(">HH", connection._conn_handle, self._value_handle)
                  + bytes(self._value if data is None else data))
            await _wait(self._ind_ev, connection, timeout_ms)
            if self._ind_status != 0:
                raise GattError(self._ind_status)
        finally:
            self._ind_conn = None


class BufferedCharacteristic(Characteristic):
    def __init__(self, *args, max_len=20, append=False, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_len = max_len
        self._append = append


def register_services(*services):
    _ensure_active()
    _m.chars = {}
    body = bytearray()
    h = 0
    for s in services:
        h += 1  # service declaration
        body += bytes(reversed(bytes(s.uuid)))
        for c in s.characteristics:
            c._value_handle = h + 2  # declaration, then value (Core Vol 3 Part G §3.3)
            h += 2
            if c.flags & (_FLAG_NOTIFY | _FLAG_INDICATE):
                h += 1  # the CCCD
            _m.chars[c._value_handle] = c
            body += struct.pack(">HI", c._value_handle, c.flags & 0xFFFF)
            body += bytes(reversed(bytes(c.uuid)))
    _send(0x47, bytes(body))
    for c in _m.chars.values():
        if c._value:
            c.write(c._value)


def _append(adv, resp, t, value):
    data = struct.pack("BB", len(value) + 1, t) + value
    if len(data) + len(adv) < _ADV_MAX:
        adv += data
        return resp
    if len(data) + len(resp) < _ADV_MAX:
        resp += data
        return resp
    raise ValueError("Advertising payload too long")


async def advertise(interval_us, adv_data=None, resp_data=None, connectable=True,
                    limited_disc=False, br_edr=False, name=None, services=None, appearance=0,
                    manufacturer=None, timeout_ms=None):
    _ensure_active()
    if not adv_data and not resp_data:
        # The same layout as aioble's peripheral.py: flags, services, name, appearance,
        # manufacturer data, each in the advertising data while it fits, then the response.
        adv_data = bytearray()
        resp_data = bytearray()
        resp_data = _append(adv_data, resp_data, 0x01, struct.pack(
            "B", (0x01 if limited_disc else 0x02) + (0x18 if br_edr else 0x04)))
        for u in services or ():
            b = bytes(u)
            t = {2: 0x03, 4: 0x05, 16: 0x07}.get(len(b))
            if t:
                resp_data = _append(adv_data, resp_data, t, b)
        if name:
            resp_data = _append(adv_data, resp_data, 0x09,
                                name.encode() if isinstance(name, str) else name)
        if appearance:
            resp_data = _append(adv_data, resp_data, 0x19, struct.pack("<H", appearance))
        if manufacturer:
            resp_data = _append(adv_data, resp_data, 0xFF,
                                struct.pack("<H", manufacturer[0]) + manufacturer[1])
    adv_data = bytes(adv_data or b"")
    resp_data = bytes(resp_data or b"")
    _m.incoming = None
    _m.connect_ev.clear()
    _send(0x41, struct.pack(">IBB", interval_us, 1 if connectable else 0, len(adv_data))
          + adv_data + resp_data)
    try:
        await _wait(_m.connect_ev, None, timeout_ms)
    except asyncio.CancelledError:
        _send(0x61)
        return None  # aioble stops advertising and returns None when cancelled
    except asyncio.TimeoutError:
        _send(0x61)
        raise
    c = _m.incoming
    _m.incoming = None
    return c
