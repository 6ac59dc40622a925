# Regulatory duty cycle per EU868 sub-band, and the join-request retransmission back-off.
#
# Copyright (c) the serene-module authors. MIT licence.
#
# Sub-bands (eu868.BANDS): after a transmission of ToA that starts at t, the band stays silent
# until t + ToA / dc (LoRaMac-node's per-band T_off = ToA / dc - ToA after the end; RP002-1.0.4
# §2.2 "duty cycle"). That off-time alone can still put slightly more than dc x 1 h into some
# sliding hour (the transmission that opens a window plus the one that closes it), so a ledger
# of airtime per band in one-minute buckets over the last hour is checked too: a transmission
# may start at t only if the airtime already in the hour that ends when it ends, plus its own,
# fits dc x 1 h. Buckets are counted whole (conservative): the bound holds for every sliding
# hour, not just on minute boundaries. The aggregated duty cycle of a DutyCycleReq
# (1/2^MaxDutyCycle, L2 1.0.4 §5.4) is one more off-time over all bands.
#
# Join requests (L2 1.0.4 §7 "retransmission back-off", RP002-1.0.4 §... same table): the
# aggregated airtime of join requests since the first attempt T0 may not exceed 36 s in
# [T0, T0+1 h), 36 s in [T0+1 h, T0+11 h), then 8.7 s in each 24 h after T0+11 h.
#
# Times are ms on the caller's monotonic clock (plain ints, never wrapping: device.py extends
# ticks_ms). Nothing here sleeps.
from array import array
from micropython import const

from drivers.lorawan import eu868

_HOUR_MS = const(3_600_000)
_BUCKET_MS = const(60_000)  # ledger resolution: one minute
_SLOTS = const(61)  # one hour of buckets plus the current one
# L2 1.0.4 §7: join back-off windows and their airtime allowances.
_JOIN_W0_MS = const(3_600_000)  # first hour
_JOIN_W1_MS = const(39_600_000)  # ... up to T0 + 11 h
_JOIN_DAY_MS = const(86_400_000)
_JOIN_36S = const(36_000)
_JOIN_8S7 = const(8_700)


class Bands:
    def __init__(self, bands=eu868.BANDS):
        n = len(bands)
        self.n = n
        self._inv = [b[2] for b in bands]  # 1 / duty cycle
        self._free = [0] * n  # ms after which the band's off-time is over
        self._led = array("I", bytes(4 * n * _SLOTS))  # airtime (ms) per band per minute
        self._minute = array("i", [-(1 << 30)] * _SLOTS)  # the minute each slot holds
        self.airtime_ms = array("I", bytes(4 * n))  # totals, for reports
        self.agg_exp = 0  # DutyCycleReq MaxDutyCycle: aggregated dc = 1 / 2^agg_exp
        self._agg_free = 0

    def _slot(self, minute):
        s = minute % _SLOTS
        if self._minute[s] != minute:
            for b in range(self.n):
                self._led[b * _SLOTS + s] = 0
            self._minute[s] = minute
        return s

    def hour_use(self, band, since):
        """Airtime (ms) in the ledger for band in the buckets from the one holding `since`."""
        m0 = since // _BUCKET_MS
        use = 0
        base = band * _SLOTS
        for s in range(_SLOTS):
            if self._minute[s] >= m0:
                use += self._led[base + s]
        return use

    def _oldest_from(self, band, m0):
        best = None
        base = band * _SLOTS
        for s in range(_SLOTS):
            m = self._minute[s]
            if m >= m0 and self._led[base + s] and (best is None or m < best):
                best = m
        return best

    def wait_ms(self, band, now, toa_ms):
        """ms until a transmission of toa_ms may start on band (0: now)."""
        t = now
        if self._free[band] > t:
            t = self._free[band]
        if self._agg_free > t:
            t = self._agg_free
        limit = _HOUR_MS // self._inv[band]
        if toa_ms > limit:
            raise ValueError("frame longer than the band's hourly allowance")
        for _ in range(_SLOTS + 1):
            since = t + toa_ms - _HOUR_MS
            if self.hour_use(band, since) + toa_ms <= limit:
                return t - now
            m = self._oldest_from(band, since // _BUCKET_MS)
            # Wait until that bucket leaves the window that ends with this transmission.
            t = (m + 1) * _BUCKET_MS + _HOUR_MS - toa_ms
        return t - now

    def charge(self, band, start, toa_ms):
        """A transmission of toa_ms started at `start` on band (counted in the minute it ends)."""
        self._led[band * _SLOTS + self._slot((start + toa_ms) // _BUCKET_MS)] += toa_ms
        self.airtime_ms[band] += toa_ms
        self._free[band] = start + toa_ms * self._inv[band]
        if self.agg_exp:
            self._agg_free = start + toa_ms * (1 << self.agg_exp)


class JoinBackoff:
    """Airtime allowance for join requests since the first attempt (L2 1.0.4 §7)."""

    def __init__(self):
        self.t0 = None
        self._win = -1
        self.used_ms = 0  # in the current window
        self.total_ms = 0

    def _window(self, t):
        el = t - self.t0
        if el < _JOIN_W0_MS:
            return 0, self.t0 + _JOIN_W0_MS, _JOIN_36S
        if el < _JOIN_W1_MS:
            return 1, self.t0 + _JOIN_W1_MS, _JOIN_36S
        k = (el - _JOIN_W1_MS) // _JOIN_DAY_MS
        return 2 + k, self.t0 + _JOIN_W1_MS + (k + 1) * _JOIN_DAY_MS, _JOIN_8S7

    def wait_ms(self, now, toa_ms):
        if self.t0 is None:
            return 0
        t = now
        for _ in range(3):
            w, end, allowance = self._window(t)
            used = self.used_ms if w == self._win else 0
            if used + toa_ms <= allowance:
                return t - now
            t = end
        return t - now

    def charge(self, start, toa_ms):
        if self.t0 is None:
            self.t0 = start
        w, _, _ = self._window(start)
        if w != self._win:
            self._win = w
            self.used_ms = 0
        self.used_ms += toa_ms
        self.total_ms += toa_ms

    def reset(self):
        self.__init__()
