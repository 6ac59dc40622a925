# Radio-agnostic link layer: sealed objects from the outbox to the server, over whichever radio
# is up, until the server's authenticated acks say they arrived.
#
# Uplink frame, version 1 (docs/link-format.md is the reference; tools/serene/linkframe.py the
# host-side parser):
#   hdr u8 = version << 4 | flags (version 1; flag bit 0 = ack requested, bits 1-3 zero)
#   |  epoch uvarint
#   then entries up to the end of the frame:
#     kf u8 = FRAG (0x80) | kind (0..127)  |  seq uvarint
#     [FRAG: total uvarint, offset uvarint]  |  len uvarint  |  data[len]
# uvarint: unsigned LEB128, minimal, at most 5 bytes (values < 2**32).
# The device is named by the channel (MQTT topic, LoRa DevEUI), never in the frame.
#
# Behaviour:
#   - Objects go out in outbox order (so an epoch record precedes its records, a checkpoint
#     follows the records it covers); one frame carries one epoch; an object larger than what
#     is left of a frame is fragmented (one that fits a fresh frame whole starts a new one).
#   - At most `window` objects are in flight. An object is resent, whole and byte for byte (it
#     is read again from the outbox), when its ack deadline passes: rto_ms << (tries - 1),
#     capped at rto_max_ms, minus up to a quarter of random jitter (so never above the cap).
#   - Downlink payloads go to ack_opener.open() and nowhere else: (epoch, cum, bitmap, nbits)
#     from it is applied to the outbox (mark_acked, then commit when it acknowledged something
#     new); ValueError from it (forged, replayed, malformed) is counted and the payload dropped.
#   - Before each frame the radio's duty-cycle budget is consulted and charged (time on air).
#   - The MTU is read from the radio for every frame (LoRa: it follows the DR, which ADR may
#     change between two frames); a fragmented object goes on at its offset in the new MTU.
#   - After a reboot a new Link starts from the outbox's first unacknowledged object.
#
# On a radio whose downlinks are scarce (LoRa class A: a downlink only in the two windows
# after an uplink, about 10 a day on public networks; the radio says so with
# `asks_acks = True`), the link ASKS for acks (header flag bit 0) and the server acks only
# then (or when much is pending):
#   - it asks when half the window has been sent since the last ask, in a frame that
#     completes a checkpoint (the chain is then provable up to it), at the end of a burst
#     (nothing more to send now) once its oldest object has waited ask_delay_ms, and on
#     every retransmission (an object sent without an ask goes again, asking, after
#     2 x ask_delay_ms at the latest);
#   - an ack can only come in the windows of an uplink, so the ack deadlines start at an
#     asking frame: all objects in flight are due rto after it, rto = max(rto_ms,
#     radio.ack_timeout_ms(n)) (the frame's time on air, both receive windows and a margin);
#     objects of a frame that does not ask wait for the next ask (at most rto_max_ms);
#   - with coalesce_ms > 0, a frame of new objects only that would not be full waits until
#     its oldest object has waited coalesce_ms (small records share a frame), unless an
#     urgent object (a pump alarm: urgent(pos)) is pending, which goes out first.
# Radios without `asks_acks` (LTE-M, BLE) see exactly the behaviour above: flags 0,
# deadlines per frame, no coalescing unless configured.
import time
from array import array
from micropython import const

from drivers.radio.base import DutyBudget

try:
    from random import getrandbits
except ImportError:  # a port without random: jitter from os.urandom
    from os import urandom

    def getrandbits(n):
        return int.from_bytes(urandom(4), "little") & ((1 << n) - 1)


_DEBUG = const(False)

VERSION = const(1)
_HDR = const(0x10)  # VERSION << 4, flags 0
_KIND_CHECKPOINT = const(2)  # a frame completing a checkpoint asks (asks_acks radios)
ACK_REQUESTED = const(0x01)  # header flag bit 0: the module asks for an ack now
_FRAG = const(0x80)
_KIND_MASK = const(0x7F)
_MIN_FRAG_DATA = const(8)  # do not open a fragment in a frame with less room than this
_MAX_DOWNLINK = const(256)  # an ack is < 64 bytes sealed; anything this long is not one
_MIN_MTU = const(24)  # a fresh frame must hold a fragment header (<= 12 B) and data
# Defaults sized for LTE-M/BLE round trips (~1 s); a LoRa deployment passes rto_ms larger than
# the ToA of a full frame plus the RX1/RX2 windows (1 s / 2 s after the uplink, RP002 §2.2).
_RTO_MS = const(2000)
_RTO_MAX_MS = const(60000)
_POLL_MS = const(250)  # how long the loop listens when nothing is due (new appends wait this)
_SEND_TIMEOUT_MS = const(10000)  # longest LoRa frame (SF12, 51 B) is ~2.8 s on air
# Deadline of an object sent in a frame that did not ask for an ack (asks_acks radios): the
# next asking frame (at the latest the end of the burst) arms it; this is only a bound, kept
# under half the ticks period (2**30 ms on the unix port and the STM32).
_PARK_MS = const(1 << 27)


class LinkError(Exception):
    """The link layer refused something. `reason`: short name; `detail`: data."""

    def __init__(self, reason, detail=None):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


class Cum2Acks:
    """Adapts an opener whose open() returns (epoch, cum, bitmap) with bit i meaning seq
    cum + 2 + i (firmware/ack.py Acks: cum + 1 is missing by definition) to the link's
    contract (epoch, cum, bitmap, nbits) with bit i meaning seq cum + 1 + i."""

    def __init__(self, acks, nbits=64):
        self.acks = acks
        self.nbits = nbits

    def open(self, payload):
        epoch, cum, bitmap = self.acks.open(payload)
        return epoch, cum, bitmap << 1, self.nbits + 1


def varint_len(v):
    n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


def put_varint(buf, i, v):
    while v >= 0x80:
        buf[i] = (v & 0x7F) | 0x80
        v >>= 7
        i += 1
    buf[i] = v
    return i + 1


class Link:
    """Link(outbox, radios, ack_opener, window=32, rto_ms=2000, rto_max_ms=60000,
    poll_ms=250, send_timeout_ms=10000, clock=time.ticks_ms)

    radios: one radio or a list in order of preference (the first that is_up() is used).
    The synchronous core (pick_radio, build_frame, on_downlink, wakeup_ms) does all the
    bookkeeping and is what tests drive on a virtual clock; run() is the asyncio loop around it.
    """

    def __init__(
        self,
        outbox,
        radios,
        ack_opener,
        window=32,
        rto_ms=_RTO_MS,
        rto_max_ms=_RTO_MAX_MS,
        poll_ms=_POLL_MS,
        send_timeout_ms=_SEND_TIMEOUT_MS,
        clock=time.ticks_ms,
        coalesce_ms=0,
        ask_delay_ms=0,
    ):
        if not isinstance(radios, (list, tuple)):
            radios = [radios]
        if not radios or window < 1 or rto_ms < 1 or rto_max_ms < rto_ms:
            raise LinkError("config", (len(radios), window, rto_ms, rto_max_ms))
        self.outbox = outbox
        self.radios = radios
        self.opener = ack_opener
        self.window = window
        self.rto_ms = rto_ms
        self.rto_max_ms = rto_max_ms
        self.poll_ms = poll_ms
        self.send_timeout_ms = send_timeout_ms
        self.clock = clock
        self.coalesce_ms = coalesce_ms
        self.ask_delay_ms = ask_delay_ms
        self._unasked_since = 0  # when the first object sent since the last ask went out
        self._held_since = None  # when a not-full frame of new objects was first held back
        self._hurry = False  # an urgent object is pending: no coalescing
        self._since_ask = 0  # objects sent since the last frame that asked for an ack
        self._frame = bytearray(max(256, max(r.mtu for r in radios)))
        self._fmv = memoryview(self._frame)
        # In-flight objects, one slot each (preallocated lists, no per-object allocation):
        # `window` for objects in log order, plus one kept for the announced epoch record.
        # Arrays of 4-byte words: 17 bytes a slot where lists took 48 (64-bit port); epochs
        # stay in a list (2^32 - 1 - counter is a boxed int on a 32-bit board either way).
        slots = window + 1
        self._slots = slots
        zeros = [0] * slots
        self._used = bytearray(slots)
        self._epoch = list(zeros)
        self._seq = array("I", zeros)
        self._pos = array("I", zeros)
        self._tries = array("I", zeros)
        self._due = array("I", zeros)
        # Outbox position of the current epoch's record, sent before anything else (announce).
        self._priority = -1
        self._nused = 0
        self._cont = -1  # slot whose fragments are being sent, or -1
        self._cont_off = 0
        self._next_pos = 0  # outbox position of the next object never sent since start
        self._radio = None
        self._nobudget = DutyBudget(0, clock)
        self.last_error = None  # the last radio error, for the supervisor's health record
        self.stats = {
            "frames": 0,
            "bytes": 0,
            "objects": 0,
            "retransmissions": 0,
            "fragments": 0,
            "acks": 0,
            "acks_rejected": 0,
            "downlink_dropped": 0,
            "send_errors": 0,
            "recv_errors": 0,
            "lost_in_outbox": 0,
            "failovers": 0,
            "ack_requests": 0,
            "mtu_changes": 0,
            "coalesced_waits": 0,
            "urgent": 0,
        }
        self._mtu = 0

    # ---------------------------------------------------------------- radios

    def pick_radio(self):
        """The first radio that is up, or None. Counts a failover when it changes."""
        for r in self.radios:
            if r.is_up():
                if r is not self._radio:
                    if self._radio is not None:
                        self.stats["failovers"] += 1
                    old = self._radio
                    self._radio = r
                    # A new MTU: an object half sent in fragments starts again whole.
                    self._cont = -1
                    if old is not None and getattr(old, "asks_acks", False):
                        # Objects parked waiting for an ask on the old radio go again.
                        now = self.clock()
                        for i in range(self._slots):
                            if self._used[i]:
                                self._due[i] = now
                return r
        return None

    def _budget(self, radio):
        # A radio without a regulatory limit may have no budget of its own.
        b = getattr(radio, "budget", None)
        if b is None:
            b = self._nobudget
        return b

    # ---------------------------------------------------------------- in-flight table

    def _free(self, i):
        self._used[i] = False
        self._nused -= 1
        if self._cont == i:
            self._cont = -1

    def _drop_acked(self):
        ob = self.outbox
        for i in range(self._slots):
            if self._used[i] and ob.is_acked(self._epoch[i], self._seq[i]):
                self._free(i)

    def _backoff(self, tries):
        d = self.rto_ms << min(tries - 1, 20)
        if d > self.rto_max_ms:
            d = self.rto_max_ms
        return d - getrandbits(16) % (d // 4 + 1)

    def _due_slot(self, now, epoch):
        """The in-flight object whose ack deadline has passed, lowest (epoch, seq) first; with
        `epoch` given, only one of that epoch. -1 if none."""
        best = -1
        for i in range(self._slots):
            if not self._used[i] or i == self._cont:
                continue
            if time.ticks_diff(self._due[i], now) > 0:
                continue
            ei = self._epoch[i]
            if epoch is not None and ei != epoch:
                continue
            if best < 0:
                best = i
                continue
            eb = self._epoch[best]
            if ei < eb or (ei == eb and self._seq[i] < self._seq[best]):
                best = i
        return best

    def _new_slot(self, e, now):
        for i in range(self._slots):
            if not self._used[i]:
                self._used[i] = True
                self._nused += 1
                self._epoch[i] = e.epoch
                self._seq[i] = e.seq
                self._pos[i] = e.pos
                self._tries[i] = 0
                # Due at once: should its fragments be interrupted (failover), it goes again.
                self._due[i] = now
                return i
        return -1

    def announce(self, pos):
        """Send the object at outbox position `pos` (the epoch record of a new epoch) before
        anything else. The server can open none of the new epoch's records before it has
        verified that record, which also names where the previous epoch ended (the proof's
        chain); in log order it would sit behind the whole backlog of older epochs."""
        self._priority = pos

    def urgent(self, pos):
        """The object at outbox position `pos` is urgent (a pump alarm): no coalescing delay
        while it waits, and on a radio that asks for acks (LoRa) it goes before the backlog
        (through the announce slot, when no epoch record holds it)."""
        self.stats["urgent"] += 1
        self._hurry = True
        r = self._radio or self.radios[0]
        if self._priority < 0 and getattr(r, "asks_acks", False):
            self._priority = pos

    def _in_flight(self, epoch, seq):
        for i in range(self._slots):
            if self._used[i] and self._epoch[i] == epoch and self._seq[i] == seq:
                return True
        return False

    # ---------------------------------------------------------------- uplink

    def wakeup_ms(self, radio, now):
        """Milliseconds until build_frame may have something to send on `radio` (0 = now),
        at most poll_ms (new objects may be appended meanwhile)."""
        w = self._budget(radio).wait_ms(now)
        if w > 0:
            return min(w, self.poll_ms)
        if self._cont >= 0 or self._priority >= 0:
            return 0
        best = self.poll_ms
        if self._nused < self.window and self.outbox.next_entry(self._next_pos) is not None:
            h = self._hold_ms(radio, now)
            if h <= 0:
                return 0
            best = h if h < best else best
        for i in range(self._slots):
            if self._used[i] and i != self._cont:
                d = time.ticks_diff(self._due[i], now)
                if d < best:
                    best = d if d > 0 else 0
        return best

    def build_frame(self, radio, now):
        """The next frame to send on `radio` at `now`, or None (nothing due, duty cycle).

        Marks what it carries as sent (ack deadlines start now) and charges the radio's duty
        budget: call it only when the frame will be sent. The result aliases the link's frame
        buffer (valid until the next call)."""
        budget = self._budget(radio)
        if budget.wait_ms(now) > 0:
            return None
        self._drop_acked()
        mtu = min(radio.mtu, len(self._frame))  # read for every frame: ADR changes it
        if mtu < _MIN_MTU:
            raise LinkError("mtu", mtu)
        if mtu != self._mtu:
            if self._mtu:
                self.stats["mtu_changes"] += 1
            self._mtu = mtu
        asks = getattr(radio, "asks_acks", False)
        if self._hold_ms(radio, now) > 0:
            self.stats["coalesced_waits"] += 1
            return None
        buf = self._frame
        n = 0
        epoch = None
        ob = self.outbox
        done = 0  # objects whose last byte went into this frame
        resent = False
        signed = False  # a checkpoint completed in this frame
        while True:
            # 1. the rest of a fragmented object, 2. an overdue one, 3. a new one
            i = self._cont
            off = self._cont_off
            if i < 0 and self._priority >= 0 and n == 0:
                # 0. the announced epoch record, in a frame of its own epoch
                e = ob.read(self._priority)
                self._priority = -1
                if e is None or self._in_flight(e.epoch, e.seq):
                    continue
                i = self._new_slot(e, now)  # the reserved slot if the window is full
                if i < 0:
                    continue  # the reserve is busy (two rotations unacked): it goes in order
                self.stats["objects"] += 1
                off = 0
            elif i < 0:
                off = 0
                i = self._due_slot(now, epoch)
                if i < 0 and self._nused < self.window:
                    e = ob.next_entry(self._next_pos)
                    if e is None or (epoch is not None and e.epoch != epoch):
                        break  # nothing new, or another epoch: next frame
                    if self._in_flight(e.epoch, e.seq):  # sent first, as announced
                        self._next_pos = e.next
                        continue
                    if not self._fits(e, n, mtu, 0):
                        break
                    i = self._new_slot(e, now)
                    self._next_pos = e.next
                    self.stats["objects"] += 1
                    # e (aliasing the outbox cache) stays valid: no outbox call until _put
                else:
                    if i < 0:
                        break
                    self.stats["retransmissions"] += 1
                    resent = True
                    e = ob.read(self._pos[i])
            else:
                if epoch is not None and self._epoch[i] != epoch:
                    break
                e = ob.read(self._pos[i])
            if e is None:
                # Reclaimed (acked meanwhile) or failed its CRC in the outbox: nothing to send.
                if not ob.is_acked(self._epoch[i], self._seq[i]):
                    self.stats["lost_in_outbox"] += 1
                self._free(i)
                continue
            if not self._fits(e, n, mtu, off):
                break
            if n == 0:
                buf[0] = _HDR
                n = put_varint(buf, 1, e.epoch)
                epoch = e.epoch
            n, end = self._put(e, off, n, mtu)
            if end == len(e.data):
                self._tries[i] += 1
                done += 1
                if e.kind == _KIND_CHECKPOINT:
                    signed = True
                if asks:
                    # No ack can come for it before an asking frame: that one arms it (at
                    # the latest it goes again, asking, ask_delay_ms after it was sent).
                    self._due[i] = time.ticks_add(
                        now, 2 * self.ask_delay_ms if self.ask_delay_ms else _PARK_MS)
                else:
                    self._due[i] = time.ticks_add(now, self._backoff(self._tries[i]))
                self._cont = -1
            else:
                self._cont = i
                self._cont_off = end
                if _DEBUG:
                    print("link: fragment of", e.epoch, e.seq, "up to", end)
                break
        if n == 0:
            return None
        self._held_since = None
        if asks:
            if done and not self._since_ask:
                self._unasked_since = now
            self._since_ask += done
            more = self._cont >= 0 or self._priority >= 0 or self._due_slot(now, None) >= 0 \
                or (self._nused < self.window and ob.next_entry(self._next_pos) is not None)
            if not more:
                self._hurry = False
            # The end of a burst asks once its oldest object has waited ask_delay_ms (0:
            # always): in steady state the half window and the checkpoints set the pace.
            idle = not more and self._since_ask > 0 and time.ticks_diff(
                now, self._unasked_since) >= self.ask_delay_ms
            if resent or signed or self._since_ask >= (self.window + 1) // 2 or idle:
                buf[0] |= ACK_REQUESTED
                self.stats["ack_requests"] += 1
                self._since_ask = 0
                self._arm(now, self._rto(radio, n))
        self.stats["frames"] += 1
        self.stats["bytes"] += n
        budget.charge(radio.time_on_air_ms(n), now)
        return self._fmv[:n]

    def _rto(self, radio, n):
        """The ack deadline after a frame of n bytes: the link's rto_ms, or longer if the
        radio says an ack cannot come sooner (LoRa class A: time on air + both windows)."""
        f = getattr(radio, "ack_timeout_ms", None)
        if f is None:
            return self.rto_ms
        t = f(n)
        return t if t > self.rto_ms else self.rto_ms

    def _arm(self, now, rto):
        """An asking frame: every object in flight is due rto (backed off by its tries)
        from now (the ack asked for covers them all: acks are cumulative)."""
        for i in range(self._slots):
            if self._used[i] and i != self._cont:
                d = rto << min(self._tries[i] - 1 if self._tries[i] else 0, 20)
                if d > self.rto_max_ms:
                    d = self.rto_max_ms if rto <= self.rto_max_ms else rto
                self._due[i] = time.ticks_add(now, d - getrandbits(16) % (d // 4 + 1))

    def _hold_ms(self, radio, now):
        """How long a frame of new objects should wait to be filled (coalesce_ms), 0 to
        send now: never with something else to send (fragments, the announced record,
        retransmissions), an urgent object pending, or enough to fill a frame."""
        if self.coalesce_ms <= 0 or self._hurry or self._cont >= 0 or self._priority >= 0:
            return 0
        if self._nused >= self.window or self._due_slot(now, None) >= 0:
            return 0
        ob = self.outbox
        pos = self._next_pos
        e = ob.next_entry(pos)
        if e is None:
            self._held_since = None
            return 0
        epoch = e.epoch
        room = min(radio.mtu, len(self._frame)) - 1 - varint_len(epoch)
        k = self._nused
        while e is not None:
            if e.epoch != epoch or k >= self.window:
                return 0  # the frame ends there anyway
            room -= 1 + varint_len(e.seq) + varint_len(len(e.data)) + len(e.data)
            if room <= 0:
                return 0  # a full frame is ready
            k += 1
            e = ob.next_entry(e.next)
        if self._held_since is None:
            self._held_since = now
        left = self.coalesce_ms - time.ticks_diff(now, self._held_since)
        return left if left > 0 else 0

    def _fits(self, e, n, mtu, off):
        """Whether (part of) entry e, from byte `off`, should go into a frame holding n bytes
        (n = 0: a fresh frame, which always takes at least a fragment)."""
        size = len(e.data)
        fresh = 1 + varint_len(e.epoch)
        if n == 0:
            n = fresh
        room = mtu - n
        if off == 0:
            whole = 1 + varint_len(e.seq) + varint_len(size) + size
            if whole <= room:
                return True
            if n > fresh and whole <= mtu - fresh:
                return False  # fits a fresh frame whole: do not split it
        frag = 1 + varint_len(e.seq) + 2 * varint_len(size) + varint_len(off)
        if n == fresh:
            return room - frag >= 1
        return room - frag >= min(_MIN_FRAG_DATA, size - off)

    def _put(self, e, off, n, mtu):
        """Write entry e (whole, or a fragment from `off`) at buf[n:]; returns (new n, offset
        just past the data written)."""
        buf = self._frame
        data = e.data
        size = len(data)
        kind = e.kind & _KIND_MASK
        if off == 0:
            whole = 1 + varint_len(e.seq) + varint_len(size) + size
            if whole <= mtu - n:
                buf[n] = kind
                n = put_varint(buf, n + 1, e.seq)
                n = put_varint(buf, n, size)
                buf[n : n + size] = data
                return n + size, size
        buf[n] = kind | _FRAG
        n = put_varint(buf, n + 1, e.seq)
        n = put_varint(buf, n, size)
        n = put_varint(buf, n, off)
        room = mtu - n
        k = size - off
        if k > room - 1:
            k = room - 1
        while k + varint_len(k) > room:  # the length field takes from the room it describes
            k -= 1
        n = put_varint(buf, n, k)
        buf[n : n + k] = data[off : off + k]
        self.stats["fragments"] += 1
        return n + k, off + k

    # ---------------------------------------------------------------- downlink

    def on_downlink(self, payload):
        """Give a downlink payload to the ack opener and apply the ack. Nothing else is ever
        done with a downlink. True if it acknowledged something new."""
        if not payload or len(payload) > _MAX_DOWNLINK:
            self.stats["downlink_dropped"] += 1
            return False
        try:
            epoch, cum, bitmap, nbits = self.opener.open(payload)
            new = self.outbox.mark_acked(epoch, cum, bitmap, nbits)
        except ValueError as e:  # forged, replayed or malformed (the opener's contract)
            self.stats["acks_rejected"] += 1
            if _DEBUG:
                print("link: downlink rejected", e)
            return False
        except Exception as e:  # noqa: BLE001 - untrusted input must not kill the loop
            # An opener that breaks its contract (IndexError on a short payload...) or an ack
            # the outbox refuses (OutboxError): counted, named, dropped.
            self.stats["acks_rejected"] += 1
            if isinstance(e, MemoryError):
                raise
            if _DEBUG:
                print("link: downlink error", repr(e))
            return False
        self.stats["acks"] += 1
        if new:
            self.outbox.commit()
            self._drop_acked()
        return new

    # ---------------------------------------------------------------- asyncio loop

    def in_flight(self):
        return self._nused

    async def run(self):
        """Send, listen, repeat; forever. Radio errors are counted and retried with backoff."""
        import asyncio

        while True:
            radio = self.pick_radio()
            if radio is None:
                await asyncio.sleep_ms(self.poll_ms)
                continue
            now = self.clock()
            frame = self.build_frame(radio, now)
            if frame is not None:
                try:
                    await asyncio.wait_for_ms(radio.send(bytes(frame)), self.send_timeout_ms)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - a radio is a device boundary
                    # Radio drivers raise their own errors (RadioError, RadioDown, OSError,
                    # TimeoutError): none may stop delivery. The objects keep their ack
                    # deadlines and go again after the backoff, from the outbox.
                    if isinstance(e, MemoryError):
                        raise
                    self.stats["send_errors"] += 1
                    self.last_error = e
                    if _DEBUG:
                        print("link: send failed", repr(e))
            wait = self.wakeup_ms(radio, self.clock())
            try:
                payload = await radio.recv(wait)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - as for send
                if isinstance(e, MemoryError):
                    raise
                self.stats["recv_errors"] += 1
                self.last_error = e
                if _DEBUG:
                    print("link: recv failed", repr(e))
                await asyncio.sleep_ms(max(1, min(wait, self.poll_ms)))
                continue
            if payload is not None:
                self.on_downlink(payload)
