# BLE radio: the Radio interface (drivers/radio/base.py) as a GATT peripheral with one custom
# service, on micropython-lib's aioble API (docs/ble.md).
#
# Copyright (c) the serene-module authors. MIT licence.
#
# References: Bluetooth Core Specification v5.4 ("Core"): Vol 3 Part F (ATT), Vol 3 Part G
# (GATT), Vol 6 Part B (Link Layer); micropython-lib aioble (server.py, peripheral.py,
# device.py, security.py) at the snapshot named in /work/shared/STYLE.md.
#
# The service (UUIDs generated once for this product; tools/serene/ble/gatt.py has the same):
#   SERVICE   cf0c0001-70d3-4534-86e0-9bcdf6990dc9
#   UPLINK    cf0c0002-...  indicate only: one link frame per indication, at most MTU - 3
#             bytes; the hub's ATT layer confirms each one (Core Vol 3 Part F §3.4.7.2-3)
#   DOWNLINK  cf0c0003-...  write (with response): a write of 1..80 bytes is one downlink
#             payload for recv(); the link layer hands it to the ack opener and nowhere else.
#             A zero-length write is the hub saying it has enabled indications (MicroPython's
#             bluetooth module raises no event for a CCCD write, so the module cannot see the
#             subscription itself); it carries no bytes and reaches no one.
#   STATUS    cf0c0004-...  read only: version 1, id length, device id, objects pending u32,
#             ATT MTU u16 (little-endian), refreshed while connected and before advertising
# With secure=True the downlink and status need an encrypted link (the module asks for LE
# Secure Connections bonding, Just Works: it has no display or keyboard); the uplink's
# frames are sealed end to end anyway, so link security protects only against passers-by.
# No other characteristic and nothing writable besides the downlink: no REPL, no UART/NUS.
#
#   mtu               ATT_MTU - 3 of the current connection (20 before an MTU exchange;
#                     the module asks for 247, what fits one 251-byte LL PDU with Data Length
#                     Extension)
#   send(frame)       one indication; returns when the hub's ATT layer has confirmed it;
#                     raises BleError "down", "too long", "busy", "timeout" (the connection is
#                     then closed: a central that does not confirm holds ATT forever, Core Vol 3
#                     Part F §3.3.3), "disconnected", "gatt"
#   recv(timeout_ms)  the next downlink write (bounded queue: the oldest goes on overflow;
#                     writes over 80 bytes dropped; each counted in stats)
#   time_on_air_ms(n) connection events the n-byte indication and its confirmation take, times
#                     the connection interval (tools/serene/ble/gatt.indication_events has the
#                     reasoning and the spec references); air_us(n): the transmitter's on-time
#                     on the LE 1M PHY (for energy)
#   is_up()           a hub is connected and has announced its subscription
#   budget            no regulatory duty cycle: the default (never waits)
# run() is the long-lived task: registers the service, advertises ("name" = the device id in
# the complete local name, and the service UUID), serves one hub at a time.
#
# `aioble` is injected (the board profile gives micropython-lib's aioble on a board and
# drivers/unix/aioble_sim on the unix port), with `uuid`, the UUID constructor
# (bluetooth.UUID on a board, aioble_sim.UUID): no import tricks, the same code on both.
# Construct the radio inside the running event loop (the app's main coroutine): aioble starts
# its write-capture task when the first capturing characteristic is made (server.py
# _init_capture).
import asyncio
import struct
from micropython import const

from drivers.radio.base import Radio, RadioError

_DEBUG = const(False)

SERVICE_UUID = "cf0c0001-70d3-4534-86e0-9bcdf6990dc9"
UPLINK_UUID = "cf0c0002-70d3-4534-86e0-9bcdf6990dc9"
DOWNLINK_UUID = "cf0c0003-70d3-4534-86e0-9bcdf6990dc9"
STATUS_UUID = "cf0c0004-70d3-4534-86e0-9bcdf6990dc9"

_STATUS_VERSION = const(1)
_DEFAULT_ATT_MTU = const(23)  # Core Vol 3 Part F §3.2.8: LE before an exchange
_MAX_ATT_MTU = const(247)  # 251-byte LL payload (DLE) - 4-byte L2CAP header
_ATT_HDR = const(3)  # ATT opcode 1 + handle 2: payload = MTU - 3
_L2CAP_ATT_HDR = const(7)  # L2CAP header 4 + ATT opcode 1 + handle 2
# A sealed ack is at most 38 bytes and the ack opener refuses more than 80
# (docs/wire-format.md, the table of sizes): nothing longer is a downlink.
_DOWN_MAX = const(80)
_RX_SLOTS = const(4)  # queued downlinks; overflow drops the OLDEST (acks are cumulative)
# The complete local name goes in the scan response: flags (3) and the 128-bit service UUID
# (18) leave 10 bytes of the 31-byte advertising data (Core Vol 6 Part B §2.3.1.1), so the
# name gets the response's 31 - 2.
_NAME_MAX = const(29)
# Advertising interval 100 ms: a scanning hub finds the module within a few hundred ms
# (Core Vol 6 Part B §4.4.2.2 allows 20 ms..10.24 s; 100 ms is Apple's accessory guideline
# upper bound for quick discovery, at ~0.1 mA average on a typical SoC).
_ADV_INTERVAL_US = const(100_000)
# One advertising round: aioble.advertise() returns on timeout, the status is refreshed and
# advertising starts again (the deadline of the wait for a hub).
_ADV_ROUND_MS = const(10_000)
# MTU exchange: one ATT request/response, two connection events at the hub's interval (at most
# 4 s by Core Vol 6 Part B §4.5.1; hubs use 7.5-50 ms); 2 s covers a 1 s interval.
_MTU_TIMEOUT_MS = const(2_000)
# Pairing: SMP Just Works takes ~6 PDU exchanges; SMP's own timeout is 30 s (Core Vol 3 Part H
# §3.4); 10 s is ample at any usable connection interval.
_PAIR_TIMEOUT_MS = const(10_000)
# An indication's confirmation: its events (time_on_air_ms) times 4 for retransmissions at
# the LL and a hub's slower interval, at least 2 s. ATT's own 30 s transaction timeout
# (Core Vol 3 Part F §3.3.3) would stall the link layer; past this deadline the connection is
# closed and the hub must reconnect.
_IND_TIMEOUT_MIN_MS = const(2_000)
# While connected: the status is refreshed and the connection checked at this period.
_STATUS_PERIOD_MS = const(5_000)
# A write's wait: the rx task's deadline, after which it loops (nothing is lost: the queue is
# the aioble capture queue).
_RX_ROUND_MS = const(1_000)
# An ack of a frame sent now: the indication, the hub's relay to the broker, the server's
# processing and the ack's write back (hub <-> broker over the home's internet).
_ACK_MARGIN_MS = const(3_000)
_DISCONNECT_TIMEOUT_MS = const(2_000)  # aioble's default for disconnect()


class BleError(RadioError):
    """`reason`: "down", "too long", "busy", "timeout", "disconnected", "gatt";
    `detail`: (length, mtu) for "too long", the ATT status for "gatt"."""

    def __init__(self, reason, detail=None):
        super().__init__("ble", detail)
        self.reason = reason


class BleRadio(Radio):
    def __init__(self, aioble, uuid, device_id, pending=None, secure=True,
                 conn_interval_ms=30, pkts_per_event=4, ll_payload=27, mtu_max=_MAX_ATT_MTU,
                 rx_slots=_RX_SLOTS, pair_timeout_ms=_PAIR_TIMEOUT_MS):
        super().__init__("ble", 0)
        if len(device_id) > _NAME_MAX:
            raise ValueError("device id longer than the advertised name allows", device_id)
        if mtu_max < _DEFAULT_ATT_MTU or mtu_max > _MAX_ATT_MTU:
            raise ValueError("mtu_max", mtu_max)
        self._ble = aioble
        self._name = device_id
        self._pending = pending  # () -> objects pending in the outbox (the firmware's)
        self._secure = secure
        self._pair_timeout_ms = pair_timeout_ms
        self.conn_interval_ms = conn_interval_ms  # what the hub is expected to use
        self.pkts_per_event = pkts_per_event
        self.ll_payload = ll_payload
        self._mtu_max = mtu_max
        self._svc_uuid = uuid(SERVICE_UUID)
        svc = aioble.Service(self._svc_uuid)
        self._up = aioble.Characteristic(svc, uuid(UPLINK_UUID), indicate=True)
        n = len(device_id)
        # MicroPython's GATT server gives a value a 20-byte buffer and cuts longer writes to
        # it (MP_BLUETOOTH_DEFAULT_ATTR_LEN, extmod/modbluetooth.h): the downlink's buffer is
        # one byte over the largest downlink, so a longer write still shows as oversize.
        self._down = aioble.BufferedCharacteristic(svc, uuid(DOWNLINK_UUID), write=True,
                                                   capture=True, max_len=_DOWN_MAX + 1)
        self._st = aioble.BufferedCharacteristic(svc, uuid(STATUS_UUID), read=True,
                                                 max_len=2 + n + 6)
        if secure:
            # aioble's Characteristic has no keyword for these permission bits; its flags go
            # as they are to gatts_register_services (_FLAG_WRITE_ENCRYPTED 0x1000,
            # _FLAG_READ_ENCRYPTED 0x0200 in aioble/server.py).
            self._down.flags |= 0x1000
            self._st.flags |= 0x0200
        self._svc = svc
        self._status = bytearray(2 + n + 6)  # the one status buffer, rewritten in place
        self._status[0] = _STATUS_VERSION
        self._status[1] = n
        self._status[2 : 2 + n] = device_id.encode()
        self._rxq = [bytearray(_DOWN_MAX) for _ in range(rx_slots)]
        self._rxn = [0] * rx_slots
        self._rx_head = 0
        self._rx_count = 0
        self._rx_event = asyncio.Event()
        self._conn = None
        self._ready = False
        self._busy = False
        self.stats = {"connections": 0, "disconnects": 0, "sent": 0, "sent_bytes": 0,
                      "send_failures": 0, "timeouts": 0, "downlinks": 0, "downlinks_dropped": 0,
                      "downlinks_oversize": 0, "downlinks_stale": 0, "mtu": 0,
                      "mtu_failures": 0, "pairings": 0, "pair_failures": 0, "adverts": 0}

    # Radio.__init__ assigns mtu; the real one follows the connection.
    @property
    def mtu(self):
        c = self._conn
        if c is None or not c.is_connected():
            return _DEFAULT_ATT_MTU - _ATT_HDR
        return min(c.mtu or _DEFAULT_ATT_MTU, self._mtu_max) - _ATT_HDR

    @mtu.setter
    def mtu(self, _value):
        pass

    asks_acks = False  # downlinks are free: the server acks every frame

    def is_up(self):
        c = self._conn
        return c is not None and self._ready and c.is_connected()

    def _events(self, n):
        frags = (n + _L2CAP_ATT_HDR + self.ll_payload - 1) // self.ll_payload
        return (frags + self.pkts_per_event - 1) // self.pkts_per_event + 1

    def time_on_air_ms(self, n):
        return self._events(n) * self.conn_interval_ms

    def air_us(self, n):
        # LE 1M PHY, 8 us a byte: preamble 1 + access address 4 + header 2 + payload + MIC 4
        # (encrypted links) + CRC 3 per LL PDU (Core Vol 6 Part B §2.1, §2.4).
        total = n + _L2CAP_ATT_HDR
        full = total // self.ll_payload
        rest = total - full * self.ll_payload
        per = 14 if self._secure else 10
        us = full * (per + self.ll_payload) * 8
        if rest:
            us += (per + rest) * 8
        return us

    def ack_timeout_ms(self, n):
        return self.time_on_air_ms(n) + _ACK_MARGIN_MS

    def _ind_timeout_ms(self, n):
        return max(_IND_TIMEOUT_MIN_MS, 4 * self.time_on_air_ms(n))

    def _refresh_status(self):
        n = self._status[1]
        p = self._pending() if self._pending is not None else 0
        c = self._conn
        mtu = (c.mtu or _DEFAULT_ATT_MTU) if c is not None else _DEFAULT_ATT_MTU
        struct.pack_into("<IH", self._status, 2 + n, p & 0xFFFFFFFF, mtu)
        self._st.write(self._status)

    async def send(self, frame):
        c = self._conn
        if not self.is_up():
            raise BleError("down")
        n = len(frame)
        if n > self.mtu:
            raise BleError("too long", (n, self.mtu))
        if self._busy:
            raise BleError("busy")  # one indication outstanding (Core Vol 3 Part F §3.4.7.2)
        ble = self._ble
        self._busy = True
        try:
            await self._up.indicate(c, frame, self._ind_timeout_ms(n))
        except asyncio.TimeoutError:
            self.stats["timeouts"] += 1
            self.stats["send_failures"] += 1
            await self._drop(c)
            raise BleError("timeout", n)
        except ble.DeviceDisconnectedError:
            self.stats["send_failures"] += 1
            raise BleError("disconnected")
        except ble.GattError as e:
            self.stats["send_failures"] += 1
            raise BleError("gatt", e.args[0] if e.args else None)
        except ValueError as e:  # aioble: "Not connected" (or "In progress": not ours)
            self.stats["send_failures"] += 1
            raise BleError("down", e.args[0] if e.args else None)
        finally:
            self._busy = False
        self.stats["sent"] += 1
        self.stats["sent_bytes"] += n
        return True

    async def _drop(self, c):
        try:
            await c.disconnect(_DISCONNECT_TIMEOUT_MS)
        except asyncio.TimeoutError:
            pass  # the stack's supervision timeout ends it anyway

    async def recv(self, timeout_ms):
        if not self._rx_count:
            self._rx_event.clear()
            if timeout_ms <= 0:
                return None
            try:
                await asyncio.wait_for_ms(self._rx_event.wait(), timeout_ms)
            except asyncio.TimeoutError:
                return None
        if not self._rx_count:
            return None
        i = self._rx_head
        msg = bytes(memoryview(self._rxq[i])[: self._rxn[i]])
        self._rx_head = (i + 1) % len(self._rxq)
        self._rx_count -= 1
        return msg

    def _queue(self, data):
        n = len(data)
        if n > _DOWN_MAX:
            self.stats["downlinks_oversize"] += 1
            return
        self.stats["downlinks"] += 1
        slots = len(self._rxq)
        if self._rx_count == slots:
            self._rx_head = (self._rx_head + 1) % slots
            self._rx_count -= 1
            self.stats["downlinks_dropped"] += 1
        i = (self._rx_head + self._rx_count) % slots
        self._rxq[i][:n] = data
        self._rxn[i] = n
        self._rx_count += 1
        self._rx_event.set()

    async def _rx_task(self):
        while True:
            try:
                got = await self._down.written(_RX_ROUND_MS)
            except asyncio.TimeoutError:
                continue
            if not got:
                continue
            conn, data = got
            if conn is not self._conn or conn is None:
                self.stats["downlinks_stale"] += 1  # a write of an ended connection
            elif not data:
                self._ready = True  # the hub has enabled indications
            else:
                self._queue(data)

    async def run(self):
        """Register the service, advertise, serve one hub at a time. Cancel to stop."""
        ble = self._ble
        ble.register_services(self._svc)
        rx = asyncio.create_task(self._rx_task())
        try:
            while True:
                self._refresh_status()
                self.stats["adverts"] += 1
                try:
                    c = await ble.advertise(_ADV_INTERVAL_US, name=self._name,
                                            services=[self._svc_uuid], timeout_ms=_ADV_ROUND_MS)
                except asyncio.TimeoutError:
                    continue
                if c is None:  # aioble returns None when advertise() is cancelled
                    raise asyncio.CancelledError
                await self._serve(c)
        finally:
            rx.cancel()

    async def _serve(self, c):
        ble = self._ble
        self._conn = c
        self._ready = False
        self.stats["connections"] += 1
        try:
            try:
                self.stats["mtu"] = await c.exchange_mtu(self._mtu_max, _MTU_TIMEOUT_MS)
            except asyncio.TimeoutError:
                self.stats["mtu_failures"] += 1  # 23 stays: frames of 20 bytes
            if self._secure:
                try:
                    await c.pair(bond=True, le_secure=True, mitm=False,
                                 timeout_ms=self._pair_timeout_ms)
                    self.stats["pairings"] += 1
                except asyncio.TimeoutError:
                    # No encryption: the hub cannot write the downlink nor read the status;
                    # the next connection tries again.
                    self.stats["pair_failures"] += 1
                    await self._drop(c)
            while c.is_connected():
                self._refresh_status()
                try:
                    await c.disconnected(_STATUS_PERIOD_MS)
                except asyncio.TimeoutError:
                    pass
        except ble.DeviceDisconnectedError:
            pass
        finally:
            self._conn = None
            self._ready = False
            self.stats["disconnects"] += 1
            if _DEBUG:
                print("ble: hub gone", self.stats)

    def report(self):
        s = dict(self.stats)
        s["mtu_now"] = self.mtu
        return s
