# The async wrapper of the LoRaWAN MAC: drives a micropython-lib LoRa modem (lora.AsyncModem
# API: configure, send, recv, get_time_on_air_us) through joins, uplinks and the class A
# receive windows.
#
# Copyright (c) the serene-module authors. MIT licence.
#
# The modem is injected: on the board an AsyncSX1262 / AsyncWLE5 from micropython-lib's
# lora-sx126x / lora-stm32wl5 (built by the board profile on its SPI and pins); on the unix port
# drivers/unix/lora_udp.UdpModem, the same API over UDP to the RF medium simulator. The clock
# is injected too (RealClock by default; the tests run hours on a VirtualClock in seconds).
#
# Keys: `appkey_provider` is an async callable returning the 16-byte AppKey into RAM (on the
# board: the STSAFE-A110 unwraps it from its local envelope); it is called once per
# join-request and the key is dropped right after the join-accept is checked.
# `key_wrapper` (optional) has async wrap(bytes) -> bytes and unwrap(bytes) -> bytes (the
# STSAFE's Wrap/Unwrap Local Envelope): with it the session keys are stored wrapped and the
# session survives a reboot; without it nothing secret is ever written and a reboot rejoins.
import asyncio
import time
from micropython import const

from drivers.lorawan import FrameRefused, LorawanError, NoChannel, eu868
from drivers.lorawan.mac import Mac

_DEBUG = const(False)

# --- receive-window timing, each from its source ---
# The window opens _RX_MARGIN_MS early and stays open 2 x margin + the preamble detection time
# (LoRaMac-node's RegionCommonComputeRxWindowParameters does the same with its "system max rx
# error", 10 ms by default for a crystal-driven RTC; a unix-port process needs more for
# scheduling noise, so the board profile and the unix profile pass their own).
_RX_MARGIN_MS = const(20)
# Symbols the SX126x needs to lock on a preamble: 8 (the EU868 preamble, RP002 §2.2.2).
_RX_SYMBOLS = const(8)
# RX2 opens 1 s after RX1 (L2 1.0.4 §3.3.2: RECEIVE_DELAY2 = RECEIVE_DELAY1 + 1 s).
_RX2_AFTER_RX1_MS = const(1000)
# The modem's own send time-out is ToA + 50 ms (lora-async); ours is ToA + this, over it.
_TX_MARGIN_MS = const(500)


def _dprint(fmt, *args):
    if _DEBUG:
        print("D lorawan:", fmt % args if args else fmt)


class RealClock:
    """Monotonic ms since start, extended from ticks_ms so hours-long back-off windows do not
    wrap (ticks_ms wraps after ~12 days on ports with 30-bit small ints)."""

    def __init__(self):
        self._last = time.ticks_ms()
        self._ms = 0

    def ms(self):
        t = time.ticks_ms()
        self._ms += time.ticks_diff(t, self._last)
        self._last = t
        return self._ms

    def to_ms(self, ticks):
        """The monotonic time of a recent ticks_ms value (e.g. the modem's TX-done stamp)."""
        return self.ms() - time.ticks_diff(time.ticks_ms(), ticks)

    async def sleep_until(self, t_ms):
        d = t_ms - self.ms()
        if d > 0:
            await asyncio.sleep_ms(d)
        return d


class Device:
    def __init__(self, modem, store, dev_eui, join_eui, appkey_provider, *, key_wrapper=None,
                 join_dr=eu868.DR_MAX, adr=True, battery=None, rx_margin_ms=_RX_MARGIN_MS,
                 clock=None, seed=None, output_power=None):
        if seed is None:
            import os
            seed = int.from_bytes(os.urandom(4), "little")
        self.mac = Mac(store, dev_eui, join_eui, join_dr=join_dr, adr=adr, battery=battery,
                       seed=seed)
        self.modem = modem
        self._appkey = appkey_provider
        self._wrap = key_wrapper
        self._margin = rx_margin_ms
        self.clock = clock or RealClock()
        self._max_power = output_power
        # One configuration dict, updated in place before each transmission / window.
        self._cfg = {"freq_khz": 868100, "sf": 7, "bw": "125", "coding_rate": eu868.CODING_RATE,
                     "preamble_len": eu868.PREAMBLE, "crc_en": True, "invert_iq_tx": False,
                     "invert_iq_rx": True, "syncword": eu868.SYNC_WORD, "output_power": 14}
        self.stats = {"tx": 0, "rx_windows": 0, "rx_late": 0, "refused": 0, "rx1": 0, "rx2": 0,
                      "airtime_ms": 0, "retransmissions": 0}
        self.last_refused = None

    # --- session ------------------------------------------------------------------------

    async def start(self):
        """Resumes a stored session (only with a key_wrapper). Returns mac.joined."""
        s = self.mac.load_session()
        if s is not None and self._wrap is not None:
            rec, wrapped = s
            keys = await self._wrap.unwrap(wrapped)
            self.mac.restore_session(rec, keys)
        return self.mac.joined

    async def _save(self):
        mac = self.mac
        if mac.wrapped_keys is None and self._wrap is not None and mac.joined:
            mac.set_wrapped_keys(await self._wrap.wrap(mac.session_keys()))
        mac.save_session()

    async def join(self, max_attempts=0):
        """Join-requests until a join-accept is in (True), within the join back-off and the
        duty cycle; raises LorawanError("join failed") after max_attempts (0: no limit)."""
        mac = self.mac
        attempts = 0
        while True:
            await self.clock.sleep_until(self.clock.ms() + mac.join_wait_ms(self.clock.ms()))
            key = await self._appkey()
            try:
                tx = mac.build_join(self.clock.ms(), key)
            except NoChannel as e:  # the clock moved between the wait and now
                await self.clock.sleep_until(self.clock.ms() + e.detail)
                continue
            finally:
                key = None
            t_end = await self._transmit(tx)
            if await self._windows(tx, t_end, True):
                await self._save()
                return True
            attempts += 1
            if max_attempts and attempts >= max_attempts:
                mac._join_key = mac._join_app_key = None
                raise LorawanError("join failed", attempts)

    # --- data -----------------------------------------------------------------------------

    def uplink_wait_ms(self, n=0):
        return self.mac.uplink_wait_ms(self.clock.ms(), n)

    async def send(self, port, data, confirmed=False):
        """One uplink of data on port (waiting for the duty cycle if needed), its NbTrans
        repetitions, and its receive windows. Returns (port, payload bytes) of an application
        downlink, or None. MAC-only downlinks are handled here."""
        mac = self.mac
        if mac.answers_need_port0():
            await self._exchange(0, None, False)
        return await self._exchange(port, data, confirmed)

    async def _exchange(self, port, data, confirmed):
        mac = self.mac
        while True:
            try:
                tx = mac.build_uplink(self.clock.ms(), port, data, confirmed)
                break
            except NoChannel as e:
                await self.clock.sleep_until(self.clock.ms() + e.detail)
        result = None
        for rep in range(mac.nb_trans):
            if rep:
                while True:
                    try:
                        tx = mac.retransmit(self.clock.ms())
                        break
                    except NoChannel as e:
                        await self.clock.sleep_until(self.clock.ms() + e.detail)
                self.stats["retransmissions"] += 1
            t_end = await self._transmit(tx)
            got = await self._windows(tx, t_end, False)
            if got:
                # §4.3.1.6 (NbTrans): repetitions stop once a valid downlink came in.
                if got is not True:
                    result = got
                break
        if mac.session_dirty:
            await self._save()
        return result

    # --- radio ------------------------------------------------------------------------------

    async def _transmit(self, tx):
        cfg = self._cfg
        cfg["freq_khz"] = tx.freq // 1000
        cfg["sf"] = tx.sf
        p = tx.power_dbm - 2  # EIRP -> conducted, 2.15 dBi antenna (RP002 §2.2.8 note)
        if self._max_power is not None and p > self._max_power:
            p = self._max_power
        cfg["output_power"] = p
        self.modem.configure(cfg)
        start = self.clock.ms()
        done = await self.modem.send(tx.frame)
        self.mac.tx_done(tx, start)
        self.stats["tx"] += 1
        self.stats["airtime_ms"] += tx.toa_ms
        if isinstance(done, int) and not isinstance(done, bool):
            return self.clock.to_ms(done)
        return self.clock.ms()

    async def _windows(self, tx, t_end, join):
        """RX1 then RX2. Returns True (join-accept or a MAC-only downlink), (port, bytes), or
        None (nothing valid in either window)."""
        mac = self.mac
        cfg = self._cfg
        for w in (1, 2):
            if w == 1:
                at, freq, dr = t_end + tx.rx1_delay_ms, tx.rx1_freq, tx.rx1_dr
            else:
                at, freq, dr = (t_end + tx.rx1_delay_ms + _RX2_AFTER_RX1_MS, tx.rx2_freq,
                                tx.rx2_dr)
            sf = eu868.sf(dr)
            late = await self.clock.sleep_until(at - self._margin)
            if late < -self._margin:
                self.stats["rx_late"] += 1
            cfg["freq_khz"] = freq // 1000
            cfg["sf"] = sf
            self.modem.configure(cfg)
            tsym_ms = ((1 << sf) * 1000 + eu868.BW_HZ - 1) // eu868.BW_HZ
            self.stats["rx_windows"] += 1
            pkt = await self.modem.recv(2 * self._margin + _RX_SYMBOLS * tsym_ms)
            if not pkt:
                continue
            if hasattr(pkt, "valid_crc") and not pkt.valid_crc:
                self.stats["refused"] += 1
                continue
            try:
                if join:
                    mac.on_join_accept(pkt, len(pkt))
                    self.stats["rx%d" % w] += 1
                    return True
                port, payload = mac.on_downlink(pkt, len(pkt), getattr(pkt, "snr", 0))
            except FrameRefused as e:
                # Not ours, forged, replayed: nothing of it used; the other window may still
                # hold our frame.
                self.stats["refused"] += 1
                self.last_refused = e.reason
                continue
            self.stats["rx%d" % w] += 1
            if port is None:
                return True
            return port, bytes(payload)
        return None
