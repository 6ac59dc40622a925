# Pump driver interface, independent of the pump's serial protocol.
#
# The application talks to a pump only through what this module defines: PumpStatus (filled by
# poll()), PumpIdentity (from connect()), PumpEvent (from next_event()), the PumpError family,
# the condition codes below and the Pump base class. A protocol (fkbase.py: the "FK-Base ASCII"
# profile of specs/pump-protocol.md) is one subclass of Pump; a second protocol is another
# module with another subclass, and the application does not change.
#
# Conditions. Every link condition the driver sees (a bad checksum, noise, a NAK, a time-out, a
# disconnection...) is counted in pump.counters[name] and queued as an EV_LINK PumpEvent, in
# arrival order with the pump's own spontaneous events (EV_PUMP), in one bounded ring.
# Ring policy: an EV_PUMP event is never dropped: when the ring is full the oldest EV_LINK
# event is evicted to make room; if the ring holds only EV_PUMP events, push() refuses and
# the protocol layer tells the pump "receiver not ready" so that it sends the event again.
# Every EV_LINK event dropped is counted and reported by one COND_EVENT_OVERFLOW event
# ({'dropped': n}) queued as soon as there is room: overflow is never silent.
import asyncio
import time
from micropython import const

#: PumpEvent.kind
EV_PUMP = const(1)  # a spontaneous event from the pump: values = {var letter: int}
EV_LINK = const(2)  # a link condition: code = COND_*, values = detail

#: Link conditions (PumpEvent.code of EV_LINK events, PumpError.kind, keys of counters by name)
COND_CHECKSUM = const(1)  # frame with a bad checksum (NAKed '2'); values {'err': NAK byte}
COND_NOISE = const(2)  # bytes outside a frame, or a partial frame cut by a stray STX; {'n': count}
COND_CONTROL_IN_FRAME = const(3)  # control byte inside a frame (NAKed '8'); {'err', 'byte'}
COND_TOO_LONG = const(4)  # frame over the payload limit (NAKed '7'); {'err': NAK byte}
COND_NAK = const(5)  # the pump NAKed our frame; {'err': its error byte, e.g. ord('6')}
COND_TIMEOUT = const(6)  # no reply in time; {'cmd': command bytes}
COND_DISCONNECTED = const(7)  # consecutive failures reached the limit; {'failures': n}
COND_RECONNECTED = const(8)  # session reopened; {'cause': COND_* that made it necessary}
COND_REFUSED = const(9)  # the pump refused a command (I;xx); {'code': xx, 'cmd': bytes}
COND_BAD_REPLY = const(10)  # valid frame, unparseable or unexpected payload; {'why': str}
COND_EVENT_OVERFLOW = const(11)  # EV_LINK events dropped from the full ring; {'dropped': n}
COND_CHAR_ERROR = const(12)  # byte outside 7-bit ASCII inside a frame (NAKed '1'); {'err', 'byte'}
COND_ADDRESS = const(13)  # frame for another address (NAKed '4'); {'err', 'byte'}
COND_FORBIDDEN = const(14)  # a command outside the read-only allow-list was refused locally
COND_INTERNAL = const(15)  # unexpected exception in the reader (a driver bug): counted, survived

#: COND_NAMES[code] -> name used in logs and as the key of Pump.counters
COND_NAMES = (
    "",
    "checksum",
    "noise",
    "control_in_frame",
    "too_long",
    "nak",
    "timeout",
    "disconnected",
    "reconnected",
    "refused",
    "bad_reply",
    "event_overflow",
    "char_error",
    "address",
    "forbidden",
    "internal",
)

#: Events the ring holds before the overflow policy above applies (a driver choice, not from
#: the spec: an alarm burst sets a few bits at once; 16 leaves room for a NAK storm's reports).
EVENT_SLOTS = 16


def cond_name(code):
    """The log name of a condition code ('?' for an unknown one)."""
    if 0 < code < len(COND_NAMES):
        return COND_NAMES[code]
    return "?"


class PumpStatus:
    """One status poll, preallocated by the caller and refilled by poll(). -1 = not reported.
    Units are the pump's own (spec "Var" table): no float, no conversion on the hot path."""

    def __init__(self):
        self.clear()

    def clear(self):
        self.rate = -1  # programmed rate, 0.1 ml/h (var d)
        self.volume = -1  # delivered since reset, 0.001 ml (r)
        self.dose = -1  # dose target, 0.001 ml (v)
        self.remaining = -1  # minutes (t)
        self.alarms = -1  # alarm bitmask (a)
        self.error = -1  # technical error code (e)
        self.mode = -1  # 1 manual / 2 remote (m)
        self.state = -1  # delivery state (u): 0 standby .. 6 alarm hold
        self.battery = -1  # % (y)
        self.power = -1  # 0 battery / 1 mains (z)
        self.flush_rate = -1  # 0.1 ml/h (k)
        self.flush_volume = -1  # 0.001 ml (s)

    def __repr__(self):
        return (
            "PumpStatus(rate=%d volume=%d dose=%d remaining=%d alarms=%d error=%d mode=%d "
            "state=%d battery=%d power=%d flush_rate=%d flush_volume=%d)"
            % (
                self.rate,
                self.volume,
                self.dose,
                self.remaining,
                self.alarms,
                self.error,
                self.mode,
                self.state,
                self.battery,
                self.power,
                self.flush_rate,
                self.flush_volume,
            )
        )


class PumpIdentity:
    """What the pump says it is ('' = not reported)."""

    def __init__(self, device_type="", serial="", firmware=""):
        self.device_type = device_type
        self.serial = serial
        self.firmware = firmware

    def __repr__(self):
        return "PumpIdentity(%r, %r, %r)" % (self.device_type, self.serial, self.firmware)


class PumpEvent:
    """kind: EV_PUMP (values = {var letter: int}, code 0) or EV_LINK (code = COND_*, values =
    detail dict). ticks: time.ticks_ms() when the driver received or noticed it."""

    def __init__(self, kind, code, values, ticks):
        self.kind = kind
        self.code = code
        self.values = values
        self.ticks = ticks

    def __repr__(self):
        if self.kind == EV_PUMP:
            return "PumpEvent(pump %r)" % (self.values,)
        return "PumpEvent(link %s %r)" % (cond_name(self.code), self.values)


class PumpError(Exception):
    """A pump operation failed. kind: the COND_* code saying why; detail: a small dict."""

    def __init__(self, kind, detail=None):
        super().__init__(cond_name(kind), detail)
        self.kind = kind
        self.detail = detail


class PumpTimeout(PumpError):
    """No reply in time, after the retry the protocol allows."""

    def __init__(self, detail=None):
        super().__init__(COND_TIMEOUT, detail)


class PumpRefused(PumpError):
    """The pump answered with an application error: code is the pump's error number."""

    def __init__(self, code, detail=None):
        super().__init__(COND_REFUSED, detail)
        self.code = code


class PumpDisconnected(PumpError):
    """The pump counts as disconnected (too many consecutive failures, or closed)."""

    def __init__(self, detail=None):
        super().__init__(COND_DISCONNECTED, detail)


class Pump:
    """Protocol-independent part of every pump driver: counters, the event ring, next_event().

    A protocol subclass provides run() (the one reader task), connect(), poll(status),
    read_log(index) and close(), and reports conditions with _report() and pump events with
    _push_pump()."""

    def __init__(self, event_slots=EVENT_SLOTS):
        self.counters = {}
        for name in COND_NAMES[1:]:
            self.counters[name] = 0
        self._ring = [None] * event_slots
        self._head = 0  # index of the oldest event
        self._count = 0
        self._dropped = 0  # EV_LINK events dropped and not yet reported
        self._ev_flag = asyncio.Event()

    # --- the interface a protocol implements -------------------------------------------------
    async def run(self):
        raise NotImplementedError

    async def connect(self):
        raise NotImplementedError

    async def poll(self, status):
        raise NotImplementedError

    async def read_log(self, index):
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    # --- events ------------------------------------------------------------------------------
    async def next_event(self, timeout_ms=None):
        """The next PumpEvent in arrival order; waits for one. With timeout_ms, raises
        asyncio.TimeoutError if none arrives in time."""
        while not self._count:
            self._ev_flag.clear()
            if timeout_ms is None:
                await self._ev_flag.wait()
            else:
                await asyncio.wait_for_ms(self._ev_flag.wait(), timeout_ms)
        return self._pop()

    def event_nowait(self):
        """The next PumpEvent, or None if there is none now."""
        if not self._count:
            return None
        return self._pop()

    def _pop(self):
        ring = self._ring
        ev = ring[self._head]
        ring[self._head] = None
        self._head = (self._head + 1) % len(ring)
        self._count -= 1
        if self._dropped:
            # Room again: say how many link events were lost before anything newer.
            n = self._dropped
            self._dropped = 0
            self._append(PumpEvent(EV_LINK, COND_EVENT_OVERFLOW, {"dropped": n}, time.ticks_ms()))
        return ev

    def _append(self, ev):
        ring = self._ring
        ring[(self._head + self._count) % len(ring)] = ev
        self._count += 1
        self._ev_flag.set()

    def _report(self, code, values=None):
        """Count a link condition and queue it as an EV_LINK event (or count it as dropped)."""
        self.counters[COND_NAMES[code]] += 1
        if values is None:
            values = {}
        if self._count == len(self._ring):
            if not self._dropped:
                self.counters[COND_NAMES[COND_EVENT_OVERFLOW]] += 1
            self._dropped += 1
            return
        self._append(PumpEvent(EV_LINK, code, values, time.ticks_ms()))

    def _push_pump(self, values):
        """Queue a spontaneous pump event. Returns False only if the ring holds nothing but
        pump events (the caller must then make the pump send it again: never drop it)."""
        ring = self._ring
        size = len(ring)
        if self._count == size:
            # Evict the oldest link event: shift the older ones up by one slot.
            i = 0
            while i < size and ring[(self._head + i) % size].kind != EV_LINK:
                i += 1
            if i == size:
                return False
            while i > 0:
                ring[(self._head + i) % size] = ring[(self._head + i - 1) % size]
                i -= 1
            ring[self._head] = None
            self._head = (self._head + 1) % size
            self._count -= 1
            if not self._dropped:
                self.counters[COND_NAMES[COND_EVENT_OVERFLOW]] += 1
            self._dropped += 1
        self._append(PumpEvent(EV_PUMP, 0, values, time.ticks_ms()))
        return True
