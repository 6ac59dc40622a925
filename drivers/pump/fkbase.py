# "FK-Base ASCII" pump protocol driver: specs/pump-protocol.md (the project's profile of the
# Fresenius Vial Base/Module ASCII protocol). Marks below: (R) real, seen in public code;
# (P) the project's placeholder; every (P) item is in PARAMS, in one place, so that the real
# interface document can replace it.
#
# Layers (STYLE.md §1):
#   FKReceiver   non-blocking receive core: bytes in, frames/ACK/NAK/ENQ out, no I/O, no await.
#   FKBaseLink   the one reader task, writes, and ONE exchange (request -> ACK/NAK -> reply).
#   FKBasePump   resilience and API: retry, failure count, disconnect, session reopen, commands.
#
# Read-only by construction: encode_frame() is the only way to build a frame and it refuses any
# command outside _ALLOWED (no RV/PR/PO/PB/SI, no MO at all): the driver cannot change therapy.
#
# Memory: the receive path uses preallocated buffers (a read chunk, the frame body, the reply,
# the output of ACK/NAK/DC4); the poll request frame is built once. A poll allocates only what
# asyncio itself needs for a timed wait.
import asyncio
import time
from micropython import const

from drivers.pump.base import (
    COND_ADDRESS,
    COND_BAD_REPLY,
    COND_CHAR_ERROR,
    COND_CHECKSUM,
    COND_CONTROL_IN_FRAME,
    COND_DISCONNECTED,
    COND_FORBIDDEN,
    COND_INTERNAL,
    COND_NAK,
    COND_NOISE,
    COND_RECONNECTED,
    COND_REFUSED,
    COND_TIMEOUT,
    COND_TOO_LONG,
    Pump,
    PumpDisconnected,
    PumpError,
    PumpIdentity,
    PumpRefused,
    PumpTimeout,
)

_DEBUG = const(False)

# --- (P) items of specs/pump-protocol.md, all here (config= overrides any key) ---------------
PARAMS = {
    # (P) ADDR of the pump: one ASCII digit; b"" would be the standalone form (R).
    "address": b"1",
    # (P) ids asked by poll() (LE;...): every PumpStatus field. Reply stays under 80 chars.
    "poll_ids": b"drvtaemuyzks",
    # (P) ids subscribed to with DE at connect/reopen: alarms, state, error, power source.
    "event_ids": b"auez",
    # b (R), n and f (P): device type, serial number, firmware version, asked by LF.
    "ident_ids": b"bnf",
    # (P) LH;nn event-log entries, 1-based, hex on the wire (01..40).
    "log_first": 1,
    "log_last": 64,
    # (P) consecutive failed requests after which the pump counts as disconnected.
    "max_failures": 3,
    # (P) ENQ -> DC4 deadline. Met by answering in the same reader pass that sees the ENQ
    # (no wait in between); the simulator measures it (bench and tests).
    "enq_reply_ms": 100,
    # Driver choice (not protocol): events held before the ring's overflow policy (base.py).
    "event_slots": 16,
    # Var id -> PumpStatus attribute. d r a e m k s: (R); u v t y z: (P).
    "vars": {
        0x64: "rate",  # d  0.1 ml/h
        0x72: "volume",  # r  0.001 ml since reset
        0x76: "dose",  # v  0.001 ml (P)
        0x74: "remaining",  # t  minutes (P)
        0x61: "alarms",  # a  bitmask (bits P)
        0x65: "error",  # e  technical error code (value P)
        0x6D: "mode",  # m  1 manual / 2 remote
        0x75: "state",  # u  delivery state (P)
        0x79: "battery",  # y  % (P)
        0x7A: "power",  # z  0 battery / 1 mains (P)
        0x6B: "flush_rate",  # k  0.1 ml/h
        0x73: "flush_volume",  # s  0.001 ml
    },
    # (P) names of the bits of var a (bit n = ALARM_BITS[n]) and of the values of var u.
    "alarm_bits": (
        "downstream_occlusion",
        "upstream_occlusion_or_empty_bag",
        "air_in_line",
        "door_open_or_set_not_loaded",
        "battery_low",
        "battery_empty",
        "dose_complete",
        "idle_reminder",
        "mains_lost",
        "technical_fault",
        "clamp",
    ),
    "states": ("standby", "paused", "running", "priming", "flush", "dose_complete", "alarm_hold"),
    # (P) LH reply: C;q<seq>;g<age s>;a<alarms>;u<state>;r<volume>;e<error> (vars as E;...).
}

# --- (R) framing and link control -------------------------------------------------------------
_STX = const(0x02)
_ETX = const(0x03)
_ENQ = const(0x05)
_ACK = const(0x06)
_DC4 = const(0x14)
_NAK = const(0x15)
_SEMI = const(0x3B)  # ';'
MAX_PAYLOAD = const(80)  # spec: PAYLOAD at most 80 characters (R)
# NAK error bytes (R): spec "Physical and link layer"
NAK_CHAR = const(0x31)  # '1' character reception
NAK_CHECKSUM = const(0x32)  # '2' checksum
NAK_ADDRESS = const(0x34)  # '4' address
NAK_ACK_TIMEOUT = const(0x35)  # '5' ACK time-out
NAK_NOT_READY = const(0x36)  # '6' receiver not ready
NAK_LENGTH = const(0x37)  # '7' frame length
NAK_CONTROL = const(0x38)  # '8' control code present
_NAK_CODES = b"1245678"

# Application error codes (R) the driver acts on.
ERR_SESSION_NOT_OPEN = const(0x0D)

# Timeouts, each with its source.
_REPLY_TIMEOUT_MS = const(1000)  # spec: "Reply time-out 1 s" (R)
_RETRIES = const(1)  # spec: "one retry on NAK '6' or time-out" (R)
_DC_SETTLE_MS = const(1000)  # spec: DC, "wait 1 s before the next command" (R)
# Silence inside a frame after which its end counts as lost (so that, e.g., the ENQ the pump
# sends after 3 s of silence is not taken for a control byte inside a dead frame). A whole
# 86-byte frame at 19200 7E1 takes 45 ms on the wire, but the gap is measured between the
# reader's reads, so it also contains the reader's scheduling delay: 2 s stays clear of any
# busy moment of the application and under the pump's 3 s ENQ interval (spec, (P)).
_FRAME_GAP_MS = const(2000)
_IO_BACKOFF_MS = const(50)  # driver choice: pause after EOF/I/O error so the reader cannot spin
# Reply wait granularity: a 60-char reply takes 31 ms on the wire at 19200 7E1; 2 ms more
# latency is nothing, and the wait allocates nothing (see _exchange).
_REPLY_POLL_MS = const(2)

# Read-only allow-list: the only commands encode_frame() builds. "E" is the host's event
# confirmation (spec: "confirms with the frame <addr>E"). Nothing that changes the therapy.
_ALLOWED = (b"DC", b"LF", b"LE", b"DE", b"AE", b"LH", b"E")

_CHUNK = const(64)  # bytes per read from the stream
_OUT_SIZE = const(160)  # receiver output (ACK/NAK/DC4/confirm), flushed after each chunk
_OUT_RESERVE = const(16)  # most one input byte can add: ACK + confirm frame (6) or NAK + err

# Receiver states
_S_IDLE = const(0)
_S_BODY = const(1)
_S_SKIP = const(2)  # a bad frame was reported: discard up to its ETX (or a new STX)
_S_NAK = const(3)  # NAK seen, its error byte comes next

# _exchange() results
_R_REPLY = const(0)
_R_NAK = const(1)
_R_TIMEOUT = const(2)


def checksum(data, start=0, end=-1):
    """0xFF - (sum(data[start:end]) & 0xFF) (spec (R)); end -1 = len(data)."""
    if end < 0:
        end = len(data)
    s = 0
    for i in range(start, end):
        s += data[i]
    return 0xFF - (s & 0xFF)


def _hexdigit(c):
    if 0x30 <= c <= 0x39:
        return c - 0x30
    if 0x41 <= c <= 0x46:
        return c - 0x37
    return -1


def command_of(payload):
    """The command part of a request payload: the bytes before ';'."""
    i = payload.find(b";")
    return payload if i < 0 else payload[:i]


def encode_frame(address, payload):
    """STX ADDR PAYLOAD CK1 CK0 ETX as bytes. The one frame builder of the driver: raises
    PumpError(COND_FORBIDDEN) for any command outside the read-only allow-list, ValueError for
    a payload that is not printable ASCII or is over 80 characters."""
    payload = bytes(payload)
    if command_of(payload) not in _ALLOWED:
        raise PumpError(COND_FORBIDDEN, {"cmd": command_of(payload)})
    if len(payload) > MAX_PAYLOAD or len(address) > 1:
        raise ValueError("frame too long")
    for c in payload:
        if c < 0x20 or c > 0x7E:
            raise ValueError("payload not printable")
    body = bytes(address) + payload
    return b"\x02" + body + b"%02X\x03" % checksum(body)


def parse_vars(buf, start, end):
    """Fields ';<id><hex>' from buf[start:end] as {id letter: int}; None if malformed (an id
    outside a-z included)."""
    out = {}
    return out if _scan(buf, start, end, out, None) else None


def parse_status(buf, start, end, status, varmap):
    """Fill status from fields ';<id><hex>' of buf[start:end] (no allocation for values that
    fit a small int). Unknown ids are skipped (a newer pump may send more). False if
    malformed. status is not cleared here."""
    return _scan(buf, start, end, status, varmap)


def _scan(buf, start, end, target, varmap):
    """The one field parser. varmap None: target is a dict, every id must be a-z and lands
    under its letter; else target's attribute varmap[id] is set (unknown ids skipped)."""
    i = start
    while i < end:
        if buf[i] != _SEMI or i + 2 >= end:
            return False
        vid = buf[i + 1]
        i += 2
        v = 0
        digits = 0
        while i < end and buf[i] != _SEMI:
            d = _hexdigit(buf[i])
            if d < 0:
                return False
            v = (v << 4) | d
            digits += 1
            i += 1
        if not digits:
            return False
        if varmap is None:
            if vid < 0x61 or vid > 0x7A:
                return False
            target[chr(vid)] = v
        else:
            name = varmap.get(vid)
            if name is not None:
                setattr(target, name, v)
    return True


class FKReceiver:
    """Receive core (no I/O): feed() bytes; it calls the handler's _rx_frame(buf, start, end)
    (payload of a valid frame, aliasing self.buf: use it before returning), _rx_ack(),
    _rx_nak(err) and _report(cond, values), and leaves the bytes to send (ACK/NAK/DC4 and
    what the handler adds) in out[:out_n]. The caller sends them and sets out_n = 0."""

    def __init__(self, handler, address):
        self.h = handler
        self.addr = address[0] if address else -1
        self.alen = len(address)
        self.maxbody = self.alen + MAX_PAYLOAD + 2
        self.buf = bytearray(self.maxbody)
        self.out = bytearray(_OUT_SIZE)
        self.out_mv = memoryview(self.out)
        self.out_n = 0
        self.reset()
        self.last = time.ticks_ms()

    def reset(self):
        self.state = _S_IDLE
        self.n = 0
        self.noise = 0

    # output
    def put(self, b):
        self.out[self.out_n] = b
        self.out_n += 1

    def put_bytes(self, data):
        n = self.out_n
        for b in data:
            self.out[n] = b
            n += 1
        self.out_n = n

    def ack(self):
        self.put(_ACK)

    def nak(self, err):
        self.put(_NAK)
        self.put(err)

    def flush_noise(self):
        if self.noise:
            n = self.noise
            self.noise = 0
            self.h._report(COND_NOISE, {"n": n})

    def _bad(self, cond, err, byte):
        # A frame is bad: NAK it now, report, and skip the rest of it.
        self.nak(err)
        self.state = _S_SKIP
        if byte < 0:
            self.h._report(cond, {"err": err})
        else:
            self.h._report(cond, {"err": err, "byte": byte})

    def feed(self, data, i, end, now):
        """Process data[i:end]; return the index reached: end, or less when out is nearly
        full (send out, then call again from there)."""
        if self.state != _S_IDLE and time.ticks_diff(now, self.last) > _FRAME_GAP_MS:
            # The rest of that frame (or the NAK's error byte) was lost: it was noise.
            if self.state == _S_BODY:
                self.noise += self.n + 1
            elif self.state == _S_NAK:
                self.noise += 1
            self.state = _S_IDLE
        self.last = now
        buf = self.buf
        limit = _OUT_SIZE - _OUT_RESERVE
        while i < end:
            if self.out_n > limit:
                return i
            b = data[i]
            i += 1
            st = self.state
            if st == _S_NAK:
                self.state = _S_IDLE
                if b in _NAK_CODES:
                    self.h._rx_nak(b)
                    continue
                # Not an error byte: the NAK was noise; handle b as a fresh byte.
                self.noise += 1
                st = _S_IDLE
            if b == _STX:
                if st == _S_BODY:
                    self.noise += self.n + 1  # a stray STX cut that frame: resynchronise
                self.flush_noise()
                self.state = _S_BODY
                self.n = 0
            elif st == _S_BODY:
                if b == _ETX:
                    self.state = _S_IDLE
                    self._end_frame()
                elif b < 0x20 or b == 0x7F:
                    self._bad(COND_CONTROL_IN_FRAME, NAK_CONTROL, b)
                elif b > 0x7F:
                    self._bad(COND_CHAR_ERROR, NAK_CHAR, b)
                elif self.n == self.maxbody:
                    self._bad(COND_TOO_LONG, NAK_LENGTH, -1)
                else:
                    buf[self.n] = b
                    self.n += 1
            elif st == _S_SKIP:
                if b == _ETX:
                    self.state = _S_IDLE
            elif b == _ACK:
                self.flush_noise()
                self.h._rx_ack()
            elif b == _NAK:
                self.flush_noise()
                self.state = _S_NAK
            elif b == _ENQ:
                self.flush_noise()
                self.put(_DC4)  # keep-alive: answered in this pass (PARAMS enq_reply_ms)
            else:
                self.noise += 1
        return i

    def _end_frame(self):
        buf = self.buf
        n = self.n
        alen = self.alen
        if n < alen + 2:
            self.nak(NAK_CHECKSUM)
            self.h._report(COND_CHECKSUM, {"err": NAK_CHECKSUM})
            return
        hi = _hexdigit(buf[n - 2])
        lo = _hexdigit(buf[n - 1])
        if hi < 0 or lo < 0 or (hi << 4 | lo) != checksum(buf, 0, n - 2):
            self.nak(NAK_CHECKSUM)
            self.h._report(COND_CHECKSUM, {"err": NAK_CHECKSUM})
            return
        if alen and buf[0] != self.addr:
            self.nak(NAK_ADDRESS)
            self.h._report(COND_ADDRESS, {"err": NAK_ADDRESS, "byte": buf[0]})
            return
        self.h._rx_frame(buf, alen, n - 2)


class FKBaseLink(Pump):
    """The link: the one reader task (run()), writes, and one exchange at a time."""

    def __init__(self, stream, address=None, config=None):
        p = dict(PARAMS)
        if config:
            p.update(config)
        if address is not None:
            p["address"] = address
        self.params = p
        Pump.__init__(self, p["event_slots"])
        self._stream = stream
        self._addr = bytes(p["address"])
        self._rx = FKReceiver(self, self._addr)
        self._chunk = bytearray(_CHUNK)
        self._chunk_mv = memoryview(self._chunk)
        self._reply = bytearray(MAX_PAYLOAD)  # last reply payload; valid until the next request
        self._reply_n = -1  # -1: no reply yet for the current request
        self._nak = 0  # error byte of a NAK received for the current request
        self._waiting = False
        self._tx_lock = asyncio.Lock()  # one writer at a time on the stream, FIFO
        self._confirm = encode_frame(self._addr, b"E")
        self._not_before = time.ticks_ms()
        self._task = None
        self._closed = False

    # --- reader --------------------------------------------------------------------------
    async def run(self):
        """The one reader task: frames, ACK/NAK, ENQ -> DC4, replies and events. Returns only
        after close(); bad input never ends it."""
        self._task = asyncio.current_task()
        rx = self._rx
        mv = self._chunk_mv
        stream = self._stream
        while not self._closed:
            try:
                n = await stream.readinto(mv)
            except OSError:
                n = None
            if not n:
                # EOF or an I/O error (the pty peer went away): nothing to parse; do not spin.
                await asyncio.sleep_ms(_IO_BACKOFF_MS)
                continue
            now = time.ticks_ms()
            i = 0
            while i < n:
                try:
                    i = rx.feed(mv, i, n, now)
                except Exception as e:  # a driver bug must not kill the only reader: report it
                    if _DEBUG:
                        print("pump: reader", repr(e))
                    rx.reset()
                    i = n
                    self._report(COND_INTERNAL, {"exc": repr(e)})
                if rx.out_n:
                    k = rx.out_n
                    rx.out_n = 0
                    try:
                        await self._write(rx.out_mv[:k])
                    except OSError:
                        pass  # the line is gone; the requests will time out and say so
            rx.flush_noise()

    async def _write(self, data):
        # One writer at a time on the stream (two tasks in drain() at once break asyncio's
        # I/O queue), in FIFO order: the reader queued with an ACK gets the stream before the
        # requester's next frame, so the pump always sees its reply ACKed first. Not `async
        # with`: that allocates ~400 bytes a use, acquire()/release() half of it.
        await self._tx_lock.acquire()
        try:
            stream = self._stream
            stream.write(data)
            # asyncio's Stream.write() writes at once what the device takes and keeps only the
            # rest in out_buf; drain() (a coroutine: it allocates) is needed only then. A
            # stream without out_buf is always drained. drain() ends: a UART empties at the
            # baud rate, and a pty whose peer is gone fails with OSError.
            if getattr(stream, "out_buf", True):
                await stream.drain()
        finally:
            self._tx_lock.release()

    # --- receive handlers (called from FKReceiver.feed) ----------------------------------
    def _rx_ack(self):
        pass  # informative: a reply (or its absence) decides an exchange

    def _rx_nak(self, err):
        self._report(COND_NAK, {"err": err})
        if self._waiting and self._reply_n < 0 and not self._nak:
            self._nak = err

    def _rx_frame(self, buf, start, end):
        rx = self._rx
        c = buf[start]
        shape_ok = end - start == 1 or buf[start + 1] == _SEMI
        if c == 0x43 or c == 0x49:  # 'C' success / 'I' refused: a reply
            rx.ack()
            if not shape_ok:
                self._report(COND_BAD_REPLY, {"why": "reply"})
            elif self._waiting and self._reply_n < 0 and not self._nak:
                r = self._reply
                j = 0
                for k in range(start, end):
                    r[j] = buf[k]
                    j += 1
                self._reply_n = j
            else:
                self._report(COND_BAD_REPLY, {"why": "unexpected"})
        elif c == 0x45:  # 'E': spontaneous event
            values = parse_vars(buf, start + 1, end) if shape_ok else None
            if not values:
                rx.ack()
                rx.put_bytes(self._confirm)  # confirm it anyway, or the pump resends forever
                self._report(COND_BAD_REPLY, {"why": "event"})
            elif self._push_pump(values):
                rx.ack()
                rx.put_bytes(self._confirm)
            else:
                rx.nak(NAK_NOT_READY)  # the ring holds only pump events: the pump resends
        else:
            rx.ack()
            self._report(COND_BAD_REPLY, {"why": "unknown"})

    # --- one exchange --------------------------------------------------------------------
    async def _exchange(self, frame):
        """Send one request frame and wait for its reply: _R_REPLY (payload in
        self._reply[:self._reply_n]), _R_NAK (error byte in self._nak) or _R_TIMEOUT. The
        caller holds the request lock."""
        d = time.ticks_diff(self._not_before, time.ticks_ms())
        if d > 0:
            await asyncio.sleep_ms(d)
        self._reply_n = -1
        self._nak = 0
        self._waiting = True
        try:
            try:
                await self._write(frame)
            except OSError:
                return _R_TIMEOUT  # the line is gone: as good as no reply
            # Poll the reader's result every _REPLY_POLL_MS up to the deadline: unlike
            # asyncio.wait_for_ms (about 1 KB a call), this allocates nothing.
            deadline = time.ticks_add(time.ticks_ms(), _REPLY_TIMEOUT_MS)
            while self._reply_n < 0 and not self._nak and not self._closed:
                if time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                    return _R_TIMEOUT
                await asyncio.sleep_ms(_REPLY_POLL_MS)
        finally:
            self._waiting = False
        if self._closed:
            return _R_TIMEOUT
        if self._reply_n >= 0:
            return _R_REPLY
        return _R_NAK

    def close(self):
        """Stop the reader and fail any request in progress; the stream is the caller's."""
        self._closed = True
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        self._task = None


class FKBasePump(FKBaseLink):
    """FK-Base ASCII pump: connect(), poll(status), read_log(index), next_event().

    Resilience: one retry on NAK '6' or time-out (R); max_failures consecutive failed requests
    = disconnected (COND_DISCONNECTED, then PumpDisconnected until a reopen works); the session
    is reopened with DC (+1 s) and DE when the pump is back, or when it answers I;0D (session
    not open, e.g. after a power cycle), and COND_RECONNECTED says so."""

    def __init__(self, stream, address=None, config=None):
        """stream: an asyncio stream (read side readinto, write, drain) on the pump's UART;
        address: the pump's ADDR (default PARAMS["address"], b"1"); config: dict overriding
        PARAMS keys. Then start the reader: asyncio.create_task(pump.run())."""
        FKBaseLink.__init__(self, stream, address, config)
        p = self.params
        a = self._addr
        self._lock = asyncio.Lock()  # one request outstanding (R)
        self._f_dc = encode_frame(a, b"DC")
        self._f_ident = encode_frame(a, b"LF;" + p["ident_ids"])
        self._f_subscribe = encode_frame(a, b"DE;" + p["event_ids"])
        self._f_poll = encode_frame(a, b"LE;" + p["poll_ids"])
        self._varmap = p["vars"]
        self._max_failures = p["max_failures"]
        self._failures = 0
        self._session = False  # a DC was answered and nothing since says it closed
        self._down = False  # COND_DISCONNECTED reported, COND_RECONNECTED not yet
        self.identity = None

    async def connect(self):
        """Open the session (DC, then 1 s), subscribe to events (DE) and identify (LF).
        Returns a PumpIdentity. Raises PumpError subclasses. Calling it again (e.g. after
        PumpDisconnected) reopens the session and reports COND_RECONNECTED."""
        async with self._lock:
            await self._open(COND_DISCONNECTED if self._down else 0)
            n = await self._command(self._f_ident)
            ident = PumpIdentity()
            i = 1
            r = self._reply
            while i < n:
                j = i + 2
                while j < n and r[j] != _SEMI:
                    j += 1
                if r[i] != _SEMI or j == i + 1:
                    self._report(COND_BAD_REPLY, {"why": "LF"})
                    raise PumpError(COND_BAD_REPLY, {"cmd": b"LF"})
                val = bytes(r[i + 2 : j]).decode()
                vid = r[i + 1]
                if vid == 0x62:  # b
                    ident.device_type = val
                elif vid == 0x6E:  # n
                    ident.serial = val
                elif vid == 0x66:  # f
                    ident.firmware = val
                i = j
            self.identity = ident
            return ident

    async def poll(self, status):
        """LE;<poll ids>: clear status and fill it (-1 = not reported). Raises PumpTimeout,
        PumpRefused, PumpDisconnected or PumpError(COND_BAD_REPLY)."""
        await self._lock.acquire()  # not `async with`: it allocates ~400 bytes a use
        try:
            n = await self._command(self._f_poll)
            status.clear()
            if not parse_status(self._reply, 1, n, status, self._varmap):
                self._report(COND_BAD_REPLY, {"why": "LE"})
                raise PumpError(COND_BAD_REPLY, {"cmd": b"LE"})
        finally:
            self._lock.release()

    async def read_log(self, index):
        """LH;nn: event-log entry `index` (PARAMS log_first..log_last) as {var letter: int}
        (q seq, g age s, a, u, r, e: see PARAMS); {} for an empty slot."""
        p = self.params
        if not p["log_first"] <= index <= p["log_last"]:
            raise ValueError("log index out of range")
        frame = encode_frame(self._addr, b"LH;%02X" % index)
        async with self._lock:
            n = await self._command(frame)
            values = parse_vars(self._reply, 1, n)
            if values is None:
                self._report(COND_BAD_REPLY, {"why": "LH"})
                raise PumpError(COND_BAD_REPLY, {"cmd": b"LH"})
            return values

    # --- resilience ----------------------------------------------------------------------
    async def _command(self, frame):
        """Send frame in an open session; reopen it if needed. Returns the length of a 'C'
        reply in self._reply. Raises PumpRefused for I;xx."""
        if not self._session:
            await self._open(COND_DISCONNECTED if self._down else 0)
        n = await self._call(frame)
        if self._refusal(n) == ERR_SESSION_NOT_OPEN:
            self._report(COND_REFUSED, {"code": ERR_SESSION_NOT_OPEN, "cmd": self._cmd_of(frame)})
            self._session = False
            await self._open(COND_REFUSED)
            n = await self._call(frame)
        code = self._refusal(n)
        if code >= 0:
            self._report(COND_REFUSED, {"code": code, "cmd": self._cmd_of(frame)})
            raise PumpRefused(code, {"cmd": self._cmd_of(frame)})
        return n

    def _cmd_of(self, frame):
        # The command of a request frame built by encode_frame() (for reports and errors).
        return command_of(frame[1 + len(self._addr) : -3])

    def _refusal(self, n):
        # -1 for a 'C' reply, else the error number of I;xx (0x100 if unreadable).
        r = self._reply
        if r[0] != 0x49:
            return -1
        if n < 3:
            return 0x100
        v = 0
        for i in range(2, n):
            d = _hexdigit(r[i])
            if d < 0:
                return 0x100
            v = (v << 4) | d
        return v

    async def _open(self, cause):
        """(Re)open the session: DC, the 1 s settle, DE. cause: the COND_* that made a reopen
        necessary (reported as COND_RECONNECTED), or 0 for the first connect."""
        self._session = False
        n = await self._call(self._f_dc)
        if self._refusal(n) >= 0:
            self._report(COND_REFUSED, {"code": self._refusal(n), "cmd": b"DC"})
            raise PumpRefused(self._refusal(n), {"cmd": b"DC"})
        self._not_before = time.ticks_add(time.ticks_ms(), _DC_SETTLE_MS)
        n = await self._call(self._f_subscribe)
        code = self._refusal(n)
        if code >= 0:
            self._report(COND_REFUSED, {"code": code, "cmd": b"DE"})
            raise PumpRefused(code, {"cmd": b"DE"})
        self._session = True
        if cause or self._down:
            self._down = False
            self._report(COND_RECONNECTED, {"cause": cause})

    async def _call(self, frame):
        """One request with the protocol's retry. Returns the reply length; raises
        PumpTimeout / PumpError(COND_NAK) / PumpDisconnected and counts the failure."""
        if self._closed:
            raise PumpDisconnected({"closed": True})
        r = _R_TIMEOUT
        for _ in range(1 + _RETRIES):
            r = await self._exchange(frame)
            if r == _R_REPLY:
                self._failures = 0
                return self._reply_n
            if r == _R_TIMEOUT:
                self._report(COND_TIMEOUT, {"cmd": self._cmd_of(frame)})
            elif self._nak != NAK_NOT_READY:
                break  # NAKs other than '6' are not retried (R)
            if self._closed:
                break
        self._failures += 1
        if self._failures >= self._max_failures:
            self._session = False
            if not self._down:
                self._down = True
                self._report(COND_DISCONNECTED, {"failures": self._failures})
        if self._down or self._closed:
            raise PumpDisconnected({"failures": self._failures})
        if r == _R_TIMEOUT:
            raise PumpTimeout({"cmd": self._cmd_of(frame)})
        raise PumpError(COND_NAK, {"err": self._nak})
