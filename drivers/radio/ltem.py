# LTE-M radio: uplink frames published over MQTT with umqtt.simple; downlinks queued as bytes.
#
# Copyright (c) the serene-module authors. MIT licence.
#
# The radio interface (drivers/radio/base.py): `mtu`, `async send(frame)`,
# `async recv(timeout_ms)`, `time_on_air_ms(n)`, `is_up()`. Frames go to
# `serene/<device_id>/up` with QoS 1: send() returns once the broker's PUBACK is in (the frame
# is at the broker; only the server's sealed ack, which the link layer waits for, says it
# arrived). The radio subscribes to `serene/<device_id>/down`; what arrives there is queued,
# as bytes, for the link layer, which hands it to the ack opener. Nothing from a downlink is
# executed or interpreted here.
#
# umqtt.simple (micropython-lib, `.lib/umqtt/simple.py` on the unix port, `mip install
# umqtt.simple` on the board) has blocking calls only. They are kept from stalling the asyncio
# loop for long by:
#   - a socket time-out on every call (io_timeout_ms): a silent or half-dead broker costs at
#     most a few time-outs per call, never a hang (STYLE.md 8: mlib #103);
#   - never blocking to wait for input: check_msg() (one non-blocking read) is polled from the
#     radio's own task, run(), every poll_ms; it reads a packet only once its first byte is in;
#   - writes gathered into one buffer and sent as one TCP segment per MQTT packet, plus
#     TCP_NODELAY: umqtt writes a PUBLISH in 4-5 pieces, and with Nagle + delayed ACK each
#     QoS 1 publish took ~44 ms here; gathered + NODELAY it is tens of µs (tests/bench/
#     bench_mqtt.py measures the three variants);
#   - the connection opened here, not by umqtt's connect() (whose socket has no time-out and
#     whose CONNACK check is an assert): _Client.connect() sends CONNECT on our socket and
#     checks CONNACK with if/raise;
#   - reconnection by run() with exponential backoff and jitter, bounded; while it is down,
#     send() raises RadioDown at once (the outbox keeps the records; STYLE.md 8: mqtt #62).
# The longest stall of the loop is measured (stats["block_max_ms"]) and tests assert a bound.
#
# Optional TLS to the broker (tls_pin = the broker certificate, DER): the pinned certificate is
# the only trust anchor, CERT_REQUIRED, host name checked; self-signed as serene.broker makes
# it, so no other certificate can be accepted. (This port's SSLSocket has no getpeercert(), so
# pinning is done through the trust store.) The handshake's reads are bounded by the same
# socket time-out; on an STM32F4 the ECDHE computation itself stalls the loop ~1 s.
#
# Boards: on the unix port the radio is a TCP connection to the broker (netif=None). On the
# stm32 port, ModemPpp below brings the LTE-M modem up (AT commands, 3GPP TS 27.007) and runs
# network.PPP over its UART; lwIP sockets then behave as on the unix port. network.PPP needs a
# firmware built with MICROPY_PY_NETWORK_PPP_LWIP=1. ModemPpp CANNOT be tested here (no modem,
# no network.PPP on the unix port): only its AT dialogue is tested, against a scripted fake
# modem (tests/upy/test_ltem.py). The AT set is for a Quectel BG95-M3 / BG96 (Cat-M1); other
# modems change the `setup` command list.
import asyncio
import os
import socket
import time
from micropython import const

from umqtt.simple import MQTTClient, MQTTException

from drivers.radio.base import Radio, RadioError

_DEBUG = const(False)

# --- timing, each from its source ---
# LTE-M round trips are 100-600 ms (3GPP TR 36.888 latency targets; field reports for Cat-M1
# with eDRX off); 2 s is ~3 round trips: one socket call never blocks the loop longer.
_IO_TIMEOUT_MS = const(2000)
# A downlink is an ack the link layer waits seconds for; a 50 ms poll (one non-blocking read)
# adds < 50 ms to its latency and costs nothing while idle.
_POLL_MS = const(50)
# At most this many packets are read per poll tick, so a downlink burst cannot hog the loop.
_PACKETS_PER_POLL = const(8)
# MQTT keep-alive (MQTT 3.1.1 §3.1.2.10): carrier NATs drop idle TCP flows after 2-5 min; a
# PINGREQ after keepalive/2 of silence keeps it; nothing received for keepalive = dead link.
_KEEPALIVE_S = const(240)
# Reconnection: 1 s doubling to 2 min, with up to 50 % random jitter so a fleet that lost the
# same cell does not come back in lock-step.
_BACKOFF_MIN_MS = const(1000)
_BACKOFF_MAX_MS = const(120_000)

# --- sizes ---
# One frame fits one TCP segment over LTE-M (MSS ~1360 after PPP/IP/TCP/TLS headers) with the
# MQTT header and topic; the link layer packs records up to this.
_MTU = const(1024)
# MQTT PUBLISH + TCP/IP headers per frame, for time_on_air_ms().
_OVERHEAD = const(70)
# Practical Cat-M1 HD-FDD uplink: 375 kbit/s peak (3GPP TS 36.306 UE category M1), ~100 kbit/s
# seen in coverage-enhancement mode: time_on_air_ms() plans with the slow case.
_UPLINK_BPS = const(100_000)
# Downlinks are sealed acks (tens of bytes). A bigger one is refused before umqtt allocates it:
# read into a small scratch buffer and discarded, counted, the connection kept (issue 8).
_MAX_DOWNLINK = const(256)
# Discarding is bounded: the broker's max_packet_size (serene.broker: ~1.1 KB, the largest
# legitimate frame) makes a longer PUBLISH impossible from a sane broker; 4 KiB is 4x that and
# ~0.3 s of Cat-M1 downlink. Longer: EMSGSIZE, the connection is dropped (as before).
_DISCARD_MAX = const(4096)
_SCRATCH = const(64)
_RX_SLOTS = const(4)  # queued downlinks; overflow drops the OLDEST (acks are cumulative)
_WBUF = const(1152)  # gathered writes: the largest packet is a PUBLISH of one MTU frame

# --- modem bring-up (ModemPpp), Quectel BG95-M3 hardware design and AT manual ---
_PWRKEY_MS = const(600)  # PWRKEY low >= 500 ms powers the modem on
_SYNC_TRIES = const(20)  # "AT" every 500 ms for 10 s: UART ready ~2.5 s after power-on
_SYNC_MS = const(500)
_CMD_MS = const(5000)  # ordinary commands answer in < 300 ms (AT manual); 5 s margin
_CFUN_MS = const(15000)  # AT+CFUN: maximum response time 15 s (AT manual)
_ATTACH_MS = const(180_000)  # Cat-M1 first attach with a full band scan: up to ~3 min
_ATTACH_POLL_MS = const(2000)
_DIAL_MS = const(30_000)  # ATD*99# to CONNECT
_PPP_MS = const(30_000)  # LCP/IPCP negotiation over a slow radio link

# --- MQTT 3.1.1 (OASIS standard, §2.2 and §3) ---
_CONNECT = const(0x10)
_CONNACK = const(0x20)
_PROTOCOL_LEVEL = const(4)
_FLAG_CLEAN = const(0x02)
_FLAG_PASSWORD = const(0x40)
_FLAG_USER = const(0x80)
_MAX_PID = const(0xFFFF)
_QOS1 = const(1)
# --- sockets (Linux <netinet/tcp.h> and lwIP use the same numbers) ---
_IPPROTO_TCP = const(6)
_TCP_NODELAY = const(1)
_EMSGSIZE = const(90)
_ETIMEDOUT = const(110)

# What a broken connection can raise out of umqtt.simple: socket errors, a refused CONNECT or
# SUBSCRIBE, and (umqtt indexes and asserts on what it reads) a truncated or garbled packet.
_LINK_ERRORS = (OSError, MQTTException, IndexError, AssertionError, ValueError)


class LtemError(RadioError):
    """The LTE-M radio could not do what was asked (a base.RadioError, so an OSError).
    `reason` is a short name ("down", "send failed", "bad connack", "at error", ...); `detail`
    the cause (an exception, a code or the modem's reply)."""

    def __init__(self, reason, detail=None):
        super().__init__("ltem", detail)
        self.reason = reason


class RadioDown(LtemError):
    """send() while the connection is down: nothing was sent, the frame stays with the caller."""


def _dprint(fmt, *args):
    if _DEBUG:
        print("D ltem:", fmt % args if args else fmt)


def encode_length(buf, at, n):
    """MQTT Remaining Length (§2.2.3) of n into buf at `at`; returns the index after it."""
    while True:
        b = n & 0x7F
        n >>= 7
        buf[at] = b | (0x80 if n else 0)
        at += 1
        if not n:
            return at


def connect_packet(client_id, user=None, password=None, keepalive_s=0, clean=True):
    """The MQTT 3.1.1 CONNECT packet (§3.1) as one bytearray (no will). Strings are bytes."""
    fields = [client_id]
    flags = _FLAG_CLEAN if clean else 0
    if user is not None:
        flags |= _FLAG_USER
        fields.append(user)
        if password is not None:
            flags |= _FLAG_PASSWORD
            fields.append(password)
    if keepalive_s > 0xFFFF:
        raise ValueError("keepalive_s > 65535")
    size = 10 + sum(2 + len(f) for f in fields)
    pkt = bytearray(5 + size)
    pkt[0] = _CONNECT
    i = encode_length(pkt, 1, size)
    pkt[i:i + 10] = b"\x00\x04MQTT" + bytes((_PROTOCOL_LEVEL, flags, keepalive_s >> 8,
                                              keepalive_s & 0xFF))
    i += 10
    for f in fields:
        n = len(f)
        if n > 0xFFFF:
            raise ValueError("MQTT string too long")
        pkt[i] = n >> 8
        pkt[i + 1] = n & 0xFF
        pkt[i + 2:i + 2 + n] = f
        i += 2 + n
    return memoryview(pkt)[:i]


class _Sock:
    """The socket umqtt.simple sees: bounded blocking, gathered writes, capped reads.

    - setblocking(True) (umqtt calls it after its first non-blocking read) restores the
      time-out instead of blocking forever;
    - write() appends to one preallocated buffer; flush() (also done before every read and at
      close) sends it as one segment;
    - read(n) never allocates n > max_read: such a read (a downlink bigger than the radio
      accepts) is consumed through a small scratch buffer and returns b"", with `oversize`
      set for the message callback (up to _DISCARD_MAX; beyond it EMSGSIZE); it returns None
      when non-blocking and nothing is there, and completes short reads up to the time-out;
    - rx_ticks / tx_ticks: when bytes last came in / went out (keep-alive and dead-link).
    """

    def __init__(self, raw, stream, timeout_ms, max_read, gather=True):
        self.raw = raw  # the TCP socket: time-outs are set on it (SSLSocket has no settimeout)
        self.stream = stream  # what is read and written: raw, or the TLS socket over it
        self.timeout_s = timeout_ms / 1000
        self.max_read = max_read
        self.wbuf = bytearray(_WBUF) if gather else None
        self.wlen = 0
        self.oversize = False  # the last read was discarded (too long): see read()
        self._scratch = None  # made at the first discard (a rare event: 64 bytes then)
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.rx_ticks = self.tx_ticks = time.ticks_ms()
        raw.settimeout(self.timeout_s)

    def setblocking(self, flag):
        if flag:
            self.raw.settimeout(self.timeout_s)
        else:
            self.flush()
            self.raw.setblocking(False)

    def write(self, data, n=None):
        if n is None:
            n = len(data)
        if self.wbuf is None:
            self._send(memoryview(data)[:n])
            return n
        if self.wlen + n > len(self.wbuf):
            self.flush()
            if n > len(self.wbuf):
                self._send(memoryview(data)[:n])
                return n
        self.wbuf[self.wlen:self.wlen + n] = memoryview(data)[:n]
        self.wlen += n
        return n

    def flush(self):
        if self.wlen:
            n, self.wlen = self.wlen, 0
            self._send(memoryview(self.wbuf)[:n])

    def _send(self, mv):
        sent = 0
        while sent < len(mv):
            n = self.stream.write(mv[sent:])
            if not n:
                raise OSError(_ETIMEDOUT)
            sent += n
        self.tx_bytes += sent
        self.tx_ticks = time.ticks_ms()

    def _discard(self, n):
        """Read and drop n bytes within the time-out per read (blocking mode: umqtt has
        switched it back after the first byte of the packet)."""
        self.raw.settimeout(self.timeout_s)
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SCRATCH))
        left = n
        while left:
            k = left if left < _SCRATCH else _SCRATCH
            got = self.stream.readinto(self._scratch[:k])
            if not got:
                raise OSError(_ETIMEDOUT)
            left -= got
        self.rx_bytes += n
        self.rx_ticks = time.ticks_ms()
        self.oversize = True
        return b""

    def read(self, n):
        if n > self.max_read:
            if n > _DISCARD_MAX:
                raise OSError(_EMSGSIZE)
            self.flush()
            return self._discard(n)
        self.flush()
        data = self.stream.read(n)
        if not data:
            return data  # None: nothing yet (non-blocking); b"": closed by the peer
        if len(data) < n:
            # A short read (time-out mid-packet, or a TLS record boundary): finish it within
            # the time-out, blocking, or fail; never hand umqtt half a field.
            self.raw.settimeout(self.timeout_s)
            parts = [data]
            got = len(data)
            while got < n:
                more = self.stream.read(n - got)
                if not more:
                    raise OSError(_ETIMEDOUT)
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.rx_bytes += n
        self.rx_ticks = time.ticks_ms()
        return data

    def close(self):
        try:
            self.flush()
        except OSError:
            pass
        self.stream.close()
        if self.raw is not self.stream:
            self.raw.close()


class _Client(MQTTClient):
    """umqtt.simple's client on a socket we opened: connect() speaks CONNECT on self.sock and
    checks CONNACK with if/raise (umqtt's own opens an unbounded socket and asserts)."""

    def connect(self, clean_session=True):
        self.sock.write(connect_packet(self.client_id, self.user, self.pswd, self.keepalive,
                                       clean_session))
        resp = self.sock.read(4)
        if resp is None or len(resp) != 4 or resp[0] != _CONNACK or resp[1] != 2:
            raise LtemError("bad connack", resp)
        if resp[3] != 0:
            # §3.2.2.3: 1 protocol, 2 identifier, 3 unavailable, 4 credentials, 5 not authorized
            raise MQTTException(resp[3])
        return resp[2] & 1


class LtemRadio(Radio):
    """The LTE-M radio. Run `run()` as a long-lived task (the app guards it); the link layer
    calls send/recv/is_up/time_on_air_ms.

    device_id: str; host, port: the broker; user, password: this device's broker account.
    tls_pin: the broker's certificate (DER bytes) to require, or None for plain TCP.
    netif: None (unix port: the host's network) or an object with `async up()` / `async down()`
    / `isconnected()` (ModemPpp on the board).
    """

    def __init__(self, device_id, host, port, user, password, *, tls_pin=None,
                 tls_hostname=None, netif=None, mtu=_MTU, io_timeout_ms=_IO_TIMEOUT_MS,
                 keepalive_s=_KEEPALIVE_S, poll_ms=_POLL_MS, backoff_min_ms=_BACKOFF_MIN_MS,
                 backoff_max_ms=_BACKOFF_MAX_MS, rx_slots=_RX_SLOTS,
                 max_downlink=_MAX_DOWNLINK, nodelay=True, gather=True):
        super().__init__("ltem", mtu)  # no duty-cycle limit on a licensed LTE-M band
        self.device_id = device_id
        self.host = host
        self.port = port
        self._up_topic = ("serene/%s/up" % device_id).encode()
        self._down_topic = ("serene/%s/down" % device_id).encode()
        self._user = user.encode() if isinstance(user, str) else user
        self._password = password.encode() if isinstance(password, str) else password
        self._tls_pin = tls_pin
        self._tls_hostname = tls_hostname
        self._tls_ctx = None
        self._netif = netif
        self._io_ms = io_timeout_ms
        self._keepalive_s = keepalive_s
        self._poll_ms = poll_ms
        self._bmin = backoff_min_ms
        self._bmax = backoff_max_ms
        self._max_dl = max_downlink
        self._nodelay = nodelay
        self._gather = gather
        self._client = None
        self._sock = None
        self._up = False
        self._rxq = [None] * rx_slots
        self._rx_head = 0
        self._rx_count = 0
        self._rx_event = asyncio.Event()
        self.backoff_ms = 0  # the wait before the next connection attempt (0 while up)
        self.last_error = None
        # Counters for the health record and the tests.
        # downlinks_dropped = downlinks_oversize (longer than max_downlink: read, discarded)
        # + downlinks_overflow (a burst beyond the queue: the oldest dropped).
        self.stats = {"connects": 0, "connect_failures": 0, "disconnects": 0, "sent": 0,
                      "send_failures": 0, "downlinks": 0, "downlinks_dropped": 0,
                      "downlinks_oversize": 0, "downlinks_overflow": 0,
                      "downlinks_stray": 0, "block_max_ms": 0}

    # --- the radio interface -----------------------------------------------------------

    def is_up(self):
        return self._up

    def time_on_air_ms(self, n):
        """Time to push n bytes up at the planned Cat-M1 rate (transmission only; the PUBACK
        adds a round trip)."""
        return ((n + _OVERHEAD) * 8000 + _UPLINK_BPS - 1) // _UPLINK_BPS

    async def send(self, frame):
        """Publish one frame (bytes or memoryview, at most mtu bytes) with QoS 1; returns when
        the broker's PUBACK is in. Raises RadioDown when not connected (nothing sent), and
        LtemError("send failed") when the connection broke during the publish (the frame may
        or may not have reached the broker: the link layer retransmits the same bytes and the
        server stores it once). Blocks the loop at most a few io_timeout_ms."""
        if len(frame) > self.mtu:
            raise LtemError("frame too long", len(frame))
        client = self._client
        if not self._up or client is None:
            raise RadioDown("down", self.last_error)
        if client.pid >= _MAX_PID:
            # umqtt increments pid without wrapping; past 65535 its PUBACK match never succeeds.
            client.pid = 0
        t0 = time.ticks_ms()
        try:
            client.publish(self._up_topic, frame, False, _QOS1)
        except _LINK_ERRORS as e:
            self.stats["send_failures"] += 1
            self._lost(e)
            raise LtemError("send failed", e)
        finally:
            self._blocked(t0)
        self.stats["sent"] += 1
        await asyncio.sleep_ms(0)  # let the rest of the loop see the time spent here
        return True

    async def recv(self, timeout_ms):
        """The next downlink payload (bytes, exactly as published), or None after timeout_ms.
        Downlinks are queued while nobody waits (at most rx_slots; the oldest is dropped)."""
        if not self._rx_count:
            self._rx_event.clear()
            try:
                await asyncio.wait_for_ms(self._rx_event.wait(), timeout_ms)
            except asyncio.TimeoutError:
                return None
        if not self._rx_count:
            return None
        i = self._rx_head
        msg = self._rxq[i]
        self._rxq[i] = None
        self._rx_head = (i + 1) % len(self._rxq)
        self._rx_count -= 1
        return msg

    # --- the connection task -------------------------------------------------------------

    async def run(self):
        """Connect, serve, reconnect with backoff and jitter, forever. Cancel it to stop (the
        connection is closed). Only link errors are handled here; anything else (MemoryError)
        reaches the caller's guard."""
        backoff = self._bmin
        try:
            while True:
                try:
                    await self._open()
                except _LINK_ERRORS as e:
                    self.stats["connect_failures"] += 1
                    self._lost(e)
                else:
                    backoff = self._bmin
                    try:
                        await self._serve()
                    except _LINK_ERRORS as e:
                        self._lost(e)
                delay = backoff // 2 + self._jitter(backoff - backoff // 2)
                self.backoff_ms = delay
                _dprint("reconnect in %d ms (%r)", delay, self.last_error)
                await asyncio.sleep_ms(delay)
                backoff = min(backoff * 2, self._bmax)
        finally:
            self._close(graceful=True)

    async def _open(self):
        if self._netif is not None and not self._netif.isconnected():
            await self._netif.up()
        t0 = time.ticks_ms()
        try:
            self._connect_socket()
            client = _Client(self.device_id.encode(), self.host, self.port, self._user,
                             self._password, self._keepalive_s)
            client.sock = self._sock
            client.set_callback(self._on_message)
            client.connect(True)
            client.subscribe(self._down_topic, _QOS1)
        except BaseException:
            self._close()
            raise
        finally:
            self._blocked(t0)
        self._client = client
        self._up = True
        self.backoff_ms = 0
        self.stats["connects"] += 1
        _dprint("connected to %s:%d", self.host, self.port)

    def _connect_socket(self):
        # A host name costs a DNS lookup that blocks for lwIP's own time-out on the board:
        # configure the broker by IP address where that matters (the bench uses 127.0.0.1).
        ai = socket.getaddrinfo(self.host, self.port)[0]
        raw = socket.socket(ai[0], socket.SOCK_STREAM)
        try:
            raw.settimeout(self._io_ms / 1000)
            raw.connect(ai[-1])
            if self._nodelay:
                try:
                    raw.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
                except OSError:
                    pass  # a stack without it: gathered writes still avoid the Nagle stall
            stream = raw
            if self._tls_pin is not None:
                stream = self._tls_context().wrap_socket(
                    raw, server_hostname=self._tls_hostname or self.host)
        except BaseException:
            raw.close()
            raise
        self._sock = _Sock(raw, stream, self._io_ms, max(self._max_dl, len(self._down_topic)),
                           self._gather)

    def _tls_context(self):
        if self._tls_ctx is None:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=self._tls_pin)
            self._tls_ctx = ctx
        return self._tls_ctx

    async def _serve(self):
        client, sock = self._client, self._sock
        ping_ms = self._keepalive_s * 500
        dead_ms = self._keepalive_s * 1000
        while True:
            for _ in range(_PACKETS_PER_POLL):
                before = sock.rx_bytes
                t0 = time.ticks_ms()
                try:
                    client.check_msg()
                finally:
                    self._blocked(t0)
                if sock.rx_bytes == before:
                    break
            sock.flush()  # PUBACKs of the downlinks just read
            now = time.ticks_ms()
            if self._keepalive_s:
                if time.ticks_diff(now, sock.rx_ticks) > dead_ms:
                    raise LtemError("keepalive expired")
                if time.ticks_diff(now, sock.tx_ticks) >= ping_ms:
                    client.ping()
                    sock.flush()
            await asyncio.sleep_ms(self._poll_ms)

    def _on_message(self, topic, msg):
        # Called by umqtt's wait_msg() for each PUBLISH received (then it PUBACKs it). The
        # payload is only queued.
        sock = self._sock
        if sock is not None and sock.oversize:
            sock.oversize = False  # the topic or the payload was too long: read, discarded
            self.stats["downlinks_oversize"] += 1
            self.stats["downlinks_dropped"] += 1
            return
        if topic != self._down_topic:
            self.stats["downlinks_stray"] += 1
            return
        if len(msg) > self._max_dl:
            self.stats["downlinks_oversize"] += 1
            self.stats["downlinks_dropped"] += 1
            return
        slots = len(self._rxq)
        if self._rx_count == slots:
            self._rxq[self._rx_head] = None
            self._rx_head = (self._rx_head + 1) % slots
            self._rx_count -= 1
            self.stats["downlinks_overflow"] += 1
            self.stats["downlinks_dropped"] += 1
        self._rxq[(self._rx_head + self._rx_count) % slots] = msg
        self._rx_count += 1
        self.stats["downlinks"] += 1
        self._rx_event.set()

    # --- helpers -------------------------------------------------------------------------

    def _blocked(self, t0):
        dt = time.ticks_diff(time.ticks_ms(), t0)
        if dt > self.stats["block_max_ms"]:
            self.stats["block_max_ms"] = dt

    def _lost(self, e):
        if self._up:
            self.stats["disconnects"] += 1
        self.last_error = e
        self._close()

    def _close(self, graceful=False):
        self._up = False
        client, sock = self._client, self._sock
        self._client = self._sock = None
        if sock is None:
            return
        if graceful and client is not None:
            try:
                client.disconnect()  # DISCONNECT, then closes the socket (ours: flushes first)
                return
            except OSError:
                pass
        try:
            sock.close()
        except OSError:
            pass

    @staticmethod
    def _jitter(span_ms):
        if span_ms <= 0:
            return 0
        r = os.urandom(2)
        return ((r[0] << 8) | r[1]) * span_ms // 0x10000


class ModemPpp:
    """An LTE-M modem on a UART: AT bring-up (3GPP TS 27.007), then network.PPP (board only).

    uart: the modem's UART, opened by the board profile (non-blocking reads: timeout=0) with
    `write`, `any`, `read`. ppp_factory: `network.PPP` (injected: never constructed here).
    setup: extra AT commands after the SIM check (default: Quectel BG95/BG96 set to Cat-M1).
    pwrkey: an optional `machine.Pin`-like object pulsed to power the modem on.
    """

    # BG95-M3/BG96 AT manual: iotopmode 0 = eMTC (Cat-M1) only; nwscanseq 02 = LTE first.
    QUECTEL_CATM = (b'AT+QCFG="iotopmode",0,1', b'AT+QCFG="nwscanseq",02,1')

    def __init__(self, uart, apn, ppp_factory, setup=QUECTEL_CATM, pwrkey=None, cid=1,
                 sync_tries=_SYNC_TRIES, attach_ms=_ATTACH_MS):
        self.uart = uart
        self.sync_tries = sync_tries
        self.attach_ms = attach_ms
        self.apn = apn.encode() if isinstance(apn, str) else apn
        self.ppp_factory = ppp_factory
        self.setup = setup
        self.pwrkey = pwrkey
        self.cid = cid
        self.ppp = None
        self.transcript = []  # (command, reply lines) of the last bring-up, for diagnostics

    def isconnected(self):
        return self.ppp is not None and self.ppp.isconnected()

    async def up(self):
        """Power, sync, SIM, Cat-M1 setup, PDP context, attach, dial, PPP. Raises LtemError
        naming the step that failed."""
        self.transcript = []
        if self.pwrkey is not None:
            self.pwrkey.value(1)
            await asyncio.sleep_ms(_PWRKEY_MS)
            self.pwrkey.value(0)
        for _ in range(self.sync_tries):
            try:
                await self.command(b"AT", timeout_ms=_SYNC_MS)
                break
            except LtemError:
                pass
        else:
            raise LtemError("modem silent")
        await self.command(b"ATE0")  # no echo: replies are only replies
        await self.command(b"AT+CMEE=1")  # numeric +CME ERROR codes
        lines = await self.command(b"AT+CPIN?")
        if b"+CPIN: READY" not in lines:
            raise LtemError("sim not ready", lines)
        for cmd in self.setup:
            await self.command(cmd)
        await self.command(b"AT+CGDCONT=" + str(self.cid).encode() + b',"IP","' + self.apn + b'"')
        await self.command(b"AT+CFUN=1", timeout_ms=_CFUN_MS)
        deadline = time.ticks_add(time.ticks_ms(), self.attach_ms)
        while True:
            lines = await self.command(b"AT+CEREG?")
            if _registered(lines):
                break
            if time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                raise LtemError("not registered", lines)
            await asyncio.sleep_ms(_ATTACH_POLL_MS)
        await self.command(b"ATD*99***" + str(self.cid).encode() + b"#", expect=b"CONNECT",
                           timeout_ms=_DIAL_MS)
        self.ppp = self.ppp_factory(self.uart)
        self.ppp.active(True)
        self.ppp.connect()
        deadline = time.ticks_add(time.ticks_ms(), _PPP_MS)
        while not self.ppp.isconnected():
            if time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                await self.down()
                raise LtemError("ppp timeout")
            await asyncio.sleep_ms(100)

    async def down(self):
        ppp, self.ppp = self.ppp, None
        if ppp is not None:
            ppp.disconnect()
            ppp.active(False)

    async def command(self, cmd, expect=b"OK", timeout_ms=_CMD_MS):
        """Send one AT command; return its reply lines (without the final `expect` line).
        Raises LtemError on ERROR / +CME ERROR or when `expect` does not come in time."""
        while self.uart.any():  # drop stale unsolicited result codes
            self.uart.read()
        self.uart.write(cmd + b"\r")
        lines = []
        buf = b""
        deadline = time.ticks_add(time.ticks_ms(), timeout_ms)
        while True:
            if self.uart.any():
                buf += self.uart.read()
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line or line == cmd:
                        continue
                    if line == expect or (expect != b"OK" and line.startswith(expect)):
                        self.transcript.append((cmd, lines))
                        return lines
                    if line == b"ERROR" or line.startswith(b"+CME ERROR"):
                        self.transcript.append((cmd, lines + [line]))
                        raise LtemError("at error", (cmd, line))
                    if line in (b"NO CARRIER", b"BUSY", b"NO ANSWER"):
                        raise LtemError("dial failed", (cmd, line))
                    lines.append(line)
            elif time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                self.transcript.append((cmd, lines))
                raise LtemError("at timeout", cmd)
            else:
                await asyncio.sleep_ms(10)


def _registered(lines):
    # +CEREG: <n>,<stat>[,...]: stat 1 = registered (home), 5 = registered (roaming)
    # (3GPP TS 27.007 §10.1.22).
    for line in lines:
        if line.startswith(b"+CEREG:"):
            parts = line[7:].split(b",")
            if len(parts) >= 2 and parts[1].strip() in (b"1", b"5"):
                return True
    return False
