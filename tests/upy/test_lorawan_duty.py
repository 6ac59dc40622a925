# Duty cycle and join back-off on a virtual clock (the MAC with a fake modem):
# - one simulated hour of uplinks as fast as the MAC lets them go, at SF12 and at SF7: no
#   sub-band is over its duty cycle (1 % for the g1 default channels and the 865-868 MHz
#   CFList channels) in ANY sliding hour, computed exactly from the transmissions, and the
#   allowance is really used (the test would see a MAC that never transmits);
# - join-requests never answered for 60 simulated hours: airtime <= 36 s in the first hour,
#   <= 36 s in hours 1-11, <= 8.7 s in each 24 h after (L2 1.0.4 §7).
from drivers.lorawan import eu868
from drivers.lorawan.device import Device
from drivers.lorawan.store import RamStore
import lorawan_fakes as F

_H = 3_600_000


def _check(cond, *what):
    if not cond:
        raise AssertionError(" ".join(str(w) for w in what))


def _responder(modem, frame):
    if frame[0] == 0:
        ja, _ = F.join_accept(frame[17] | frame[18] << 8, 1)
        return 5000, ja, modem.cfg["freq_khz"], modem.cfg["sf"]
    return None


def _max_sliding(txs):
    # txs: [(start, end)] sorted. The worst window [e - H, e] ends at some transmission's end.
    worst = 0
    j = 0
    for i in range(len(txs)):
        e = txs[i][1]
        use = 0
        while txs[j][1] <= e - _H:
            j += 1
        for k in range(j, i + 1):
            s, t = txs[k]
            use += t - (s if s > e - _H else e - _H)
        if use > worst:
            worst = use
    return worst


async def _hour(dr, payload):
    clock = F.VirtualClock()
    modem = F.FakeModem(clock, _responder)
    dev = Device(modem, RamStore(), F.DEV_EUI, F.JOIN_EUI, F.app_key, clock=clock, seed=11,
                 join_dr=dr, adr=False)
    await dev.join(max_attempts=1)
    while clock.t < _H + 600_000:
        await dev.send(10, payload)
    per_band = {}
    for t0, fk, sf, toa, frame in modem.sent:
        b = eu868.band_of(fk * 1000)
        per_band.setdefault(b, []).append((t0, t0 + toa))
    for b, txs in per_band.items():
        allowance = _H // eu868.BANDS[b][2]
        worst = _max_sliding(txs)
        _check(worst <= allowance, "band", eu868.BAND_NAMES[b], "dr", dr, worst, allowance)
        _check(worst >= allowance * 0.85, "band under-used", eu868.BAND_NAMES[b], worst)
        print("dr", dr, eu868.BAND_NAMES[b], len(txs), "frames, worst hour", worst, "ms of",
              allowance)
    _check(sorted(per_band) == [0, 5], per_band.keys())


async def test_sliding_hour_sf12():
    await _hour(0, bytes(51))


async def test_sliding_hour_sf7():
    await _hour(5, bytes(222))


async def _join_backoff(dr):
    clock = F.VirtualClock()
    modem = F.FakeModem(clock, None)
    dev = Device(modem, RamStore(), F.DEV_EUI, F.JOIN_EUI, F.app_key, clock=clock, seed=5,
                 join_dr=dr)
    while clock.t < 60 * _H:
        try:
            await dev.join(max_attempts=1)
        except Exception as e:
            if getattr(e, "reason", None) != "join failed":
                raise
    t0 = modem.sent[0][0]
    windows = [(t0, t0 + _H, 36_000), (t0 + _H, t0 + 11 * _H, 36_000)]
    d = t0 + 11 * _H
    while d < clock.t:
        windows.append((d, d + 24 * _H, 8_700))
        d += 24 * _H
    for lo, hi, allowance in windows:
        use = sum(toa for t, _, _, toa, _ in modem.sent if lo <= t < hi)
        _check(use <= allowance, "join airtime", dr, lo, use, allowance)
        if hi <= modem.sent[-1][0]:  # a complete window
            _check(use >= allowance * 0.8, "join back-off too strict", dr, lo, use)
    # And the band's duty cycle held for the join-requests too.
    txs = [(t, t + toa) for t, _, _, toa, _ in modem.sent]
    _check(_max_sliding(txs) <= 36_000, "join duty cycle")
    print("join dr", dr, len(modem.sent), "requests in 36 h")


async def test_join_backoff_sf12():
    await _join_backoff(0)


async def test_join_backoff_sf7():
    await _join_backoff(5)
