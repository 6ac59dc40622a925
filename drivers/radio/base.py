# The radio interface the link layer (firmware/link.py) talks to, and the duty-cycle budget.
#
# A concrete radio (LoRa, LTE-M, BLE, a unix-port socket to the radio simulator) subclasses
# Radio and provides:
#   mtu                   largest uplink payload in bytes, right now (LoRa: follows the data
#                         rate, EU868 51/115/222 bytes for DR0-2/DR3/DR4-5; may change between
#                         calls)
#   async send(frame)     transmit one uplink payload (bytes); returns when it has left (or is
#                         queued in the modem); raises RadioError if it could not
#   async recv(timeout_ms) -> bytes | None
#                         the next downlink payload received within timeout_ms, or None;
#                         timeout_ms = 0 polls. Downlinks are untrusted bytes: the link layer
#                         hands them only to the ack opener.
#   time_on_air_ms(n)     air time of an n-byte payload at the current settings (LoRa: SX126x
#                         datasheet / Semtech AN1200.13 formula; 0 where it does not matter)
#   is_up()               True if send() can be expected to work now (joined, attached,
#                         connected)
# and `budget`, a DutyBudget the link layer consults before each transmission and charges after
# it. A radio with no regulatory limit keeps the default (duty_cycle = 0: never waits).
import time
from micropython import const

_DEBUG = const(False)


class RadioError(OSError):
    """A radio could not do what was asked. `radio`: its name; `detail`: device data."""

    def __init__(self, radio, detail=None):
        super().__init__(radio, detail)
        self.radio = radio
        self.detail = detail


class DutyBudget:
    """Regulatory duty cycle as a per-transmission off-time.

    ETSI EN 300 220-2 limits each EU868 sub-band to a duty cycle (1 % for the g1 sub-band the
    LoRaWAN default channels use); LoRaWAN RP002-1.0.4 §2.2 enforces it, as LoRaMac-node does,
    by keeping the band silent for T_off = ToA / dc - ToA after a transmission of ToA. That is
    stricter than the 1-hour window of the norm, so it always complies.
    duty_cycle: 0 (no limit) or a fraction in (0, 1], e.g. 0.01.
    """

    def __init__(self, duty_cycle=0, clock=time.ticks_ms):
        if duty_cycle < 0 or duty_cycle > 1:
            raise ValueError("duty_cycle")
        self.duty_cycle = duty_cycle
        self._clock = clock
        self._free_at = None  # ticks_ms after which the band may transmit again
        self.airtime_ms = 0  # total charged, for reports

    def wait_ms(self, now=None):
        """Milliseconds until a transmission may start (0: now)."""
        if self._free_at is None:
            return 0
        if now is None:
            now = self._clock()
        d = time.ticks_diff(self._free_at, now)
        if d <= 0:
            self._free_at = None
            return 0
        return d

    def charge(self, toa_ms, now=None):
        """Account for a transmission of toa_ms that starts at `now`."""
        self.airtime_ms += toa_ms
        if not self.duty_cycle or self.duty_cycle >= 1:
            return
        if now is None:
            now = self._clock()
        # ToA of the transmission itself, then the off-time: ToA / dc in all.
        self._free_at = time.ticks_add(now, int(toa_ms / self.duty_cycle + 0.999))
        if _DEBUG:
            print("radio: duty", toa_ms, "ms on air, silent until", self._free_at)


class Radio:
    """Base of every radio: name, MTU, duty-cycle budget; the I/O methods are the subclass's."""

    def __init__(self, name, mtu, duty_cycle=0, clock=time.ticks_ms):
        self.name = name
        self.mtu = mtu
        self.budget = DutyBudget(duty_cycle, clock)

    async def send(self, frame):
        raise NotImplementedError

    async def recv(self, timeout_ms):
        raise NotImplementedError

    def time_on_air_ms(self, n):
        return 0

    def is_up(self):
        return True
