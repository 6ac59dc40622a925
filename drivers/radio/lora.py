# LoRa radio: the Radio interface (drivers/radio/base.py) over the LoRaWAN MAC (drivers/lorawan).
#
# Copyright (c) the serene-module authors. MIT licence.
#
# Uplink frames go as unconfirmed LoRaWAN uplinks on FPort 10 (FPORT); downlinks on that port
# are queued for recv(); downlinks on other ports are counted (stats["downlinks_other_port"])
# and dropped, never handed on. The class A rule (a downlink only in the two windows after an
# uplink) is the MAC's: recv() returns what came in the windows of earlier sends.
#   mtu               the MAC's max FRMPayload at the current DR minus the MAC answers pending
#                     for FOpts (EU868 51/51/51/115/222/222 for DR0-5): changes with ADR
#   time_on_air_ms(n) the LoRaWAN PHY payload of n bytes (n + 13: MHDR, FHDR, FPort, MIC) at
#                     the current DR (SX1261/2 datasheet §6.1.4 formula, drivers/lorawan/eu868)
#   budget            the sub-band duty cycle: wait_ms() asks the MAC when a channel is free
#   is_up()           joined
#   asks_acks         True: downlinks are scarce (class A, ~10 a day on public networks), so
#                     the link layer asks for acks in its frame header (firmware/link.py)
#   ack_timeout_ms(n) the earliest an ack of an n-byte frame can be given up on: time on air,
#                     RX1 delay, RX2 (1 s later) and its window, plus a margin for the network
#                     server's and the application's round trip
# run() is the long-lived task: resumes the stored session or joins, and rejoins when the MAC
# says so (FCnt exhausted).
#
# Modem: on the board micropython-lib's AsyncSX1262 (lora-sx126x) or AsyncWLE5
# (lora-stm32wl5); on the unix port drivers/unix/lora_udp.UdpModem; the MAC and this file are
# the same code on both.
import asyncio
from micropython import const

from drivers.lorawan import LorawanError, eu868
from drivers.radio.base import DutyBudget, Radio, RadioError

_DEBUG = const(False)

FPORT = const(10)
_LORAWAN_OVERHEAD = const(13)  # MHDR 1 + FHDR 7 (no FOpts) + FPort 1 + MIC 4
_RX_SLOTS = const(4)  # queued downlinks; overflow drops the OLDEST (acks are cumulative)
# Join retries are paced by the MAC's back-off (L2 1.0.4 §7); after a failed round of
# _JOIN_ROUND attempts run() waits _REJOIN_PAUSE_MS more (a network outage, not the radio).
_JOIN_ROUND = const(8)
_REJOIN_PAUSE_MS = const(60_000)
# RP002-1.0.4 EU863-870 defaults (and L2 1.0.4 §3.3): RECEIVE_DELAY1 1 s (RXTimingSetupReq may
# change it: mac.rx_delay_ms), RECEIVE_DELAY2 = RECEIVE_DELAY1 + 1 s; the RX2 window stays open
# at least 8 preamble symbols at the RX2 DR (DR0: SF12, 262 ms). A class A ack can come only in
# those windows; the margin covers the network server's de-duplication and its wait for the
# application's downlink (ChirpStack's get_downlink_data_delay) when it misses RX1 and RX2
# the ack rides on the next uplink, which the link layer sends as a retransmission.
_RX2_AFTER_RX1_MS = const(1000)
_ACK_MARGIN_MS = const(1000)


class LoraError(RadioError):
    """`reason`: "down" (not joined), "too long", "mac" (detail: the LorawanError)."""

    def __init__(self, reason, detail=None):
        super().__init__("lora", detail)
        self.reason = reason


class _MacBudget(DutyBudget):
    """The duty-cycle budget of the link layer, answered by the MAC's per-band accounting
    (the MAC itself charges each transmission; charge() here only adds to the report)."""

    def __init__(self, radio):
        super().__init__(0.01)  # g1: the default channels' sub-band
        self._radio = radio

    def wait_ms(self, now=None):
        r = self._radio
        if not r.is_up():
            return 0
        try:
            return r.device.uplink_wait_ms(0)
        except LorawanError:
            return 0

    def charge(self, toa_ms, now=None):
        self.airtime_ms += toa_ms


class LoraRadio(Radio):
    def __init__(self, device, port=FPORT, rx_slots=_RX_SLOTS):
        self.device = device  # a drivers.lorawan.device.Device
        super().__init__("lora", 0)
        self.budget = _MacBudget(self)
        self.port = port
        self._rxq = [None] * rx_slots
        self._rx_head = 0
        self._rx_count = 0
        self._rx_event = asyncio.Event()
        self.stats = {"sent": 0, "send_failures": 0, "downlinks": 0, "downlinks_dropped": 0,
                      "downlinks_other_port": 0, "joins": 0, "dr_changes": 0}
        self._dr = -1

    # Radio.__init__ assigns mtu; the real one follows the DR.
    @property
    def mtu(self):
        return self.device.mac.max_payload()

    @mtu.setter
    def mtu(self, _value):
        pass

    def is_up(self):
        return self.device.mac.joined

    asks_acks = True

    def ack_timeout_ms(self, n):
        mac = self.device.mac
        sf = eu868.sf(mac.rx2_dr)
        rx2_ms = 8 * ((1 << sf) * 1000 + eu868.BW_HZ - 1) // eu868.BW_HZ
        return (self.time_on_air_ms(n) + (mac.rx_delay_ms or 1000) + _RX2_AFTER_RX1_MS + rx2_ms
                + _ACK_MARGIN_MS)

    def time_on_air_ms(self, n):
        return eu868.time_on_air_ms(n + _LORAWAN_OVERHEAD, self.device.mac.dr)

    async def send(self, frame):
        if not self.is_up():
            raise LoraError("down")
        if len(frame) > self.mtu:
            raise LoraError("too long", (len(frame), self.mtu))
        try:
            got = await self.device.send(self.port, frame)
        except LorawanError as e:
            self.stats["send_failures"] += 1
            raise LoraError("mac", e)
        self.stats["sent"] += 1
        dr = self.device.mac.dr
        if dr != self._dr:
            if self._dr >= 0:
                self.stats["dr_changes"] += 1
            self._dr = dr
        if got is not None:
            port, payload = got
            if port == self.port:
                self._queue(payload)
            else:
                self.stats["downlinks_other_port"] += 1
        return True

    def _queue(self, payload):
        self.stats["downlinks"] += 1
        n = len(self._rxq)
        if self._rx_count == n:
            self._rxq[self._rx_head] = None
            self._rx_head = (self._rx_head + 1) % n
            self._rx_count -= 1
            self.stats["downlinks_dropped"] += 1
        self._rxq[(self._rx_head + self._rx_count) % n] = payload
        self._rx_count += 1
        self._rx_event.set()

    def report(self):
        """Figures for the summary line: airtime, per sub-band airtime (ms), FCnt, DR."""
        dev = self.device
        mac = dev.mac
        bands = {}
        for i in range(len(eu868.BAND_NAMES)):
            if mac.bands.airtime_ms[i]:
                bands[eu868.BAND_NAMES[i]] = mac.bands.airtime_ms[i]
        return {"lora_airtime_ms": dev.stats["airtime_ms"], "lora_band_airtime_ms": bands,
                "lora_fcnt_up": mac.fcnt_up, "lora_dr": mac.dr, "lora_tx": dev.stats["tx"],
                "lora_rx1": dev.stats["rx1"], "lora_rx2": dev.stats["rx2"],
                "lora_refused": dev.stats["refused"]}

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
        msg = self._rxq[i]
        self._rxq[i] = None
        self._rx_head = (i + 1) % len(self._rxq)
        self._rx_count -= 1
        return msg

    async def run(self):
        """Resume or join, then watch for the need to rejoin. Cancel to stop."""
        dev = self.device
        if not await dev.start():
            await self._join()
        while True:
            if dev.mac.fcnt_up > 0xFFFFFFFF or not dev.mac.joined:
                dev.mac.forget_session()
                await self._join()
            await asyncio.sleep_ms(1000)

    async def _join(self):
        while True:
            try:
                await self.device.join(max_attempts=_JOIN_ROUND)
                self.stats["joins"] += 1
                return
            except LorawanError as e:
                if e.reason != "join failed":
                    raise
                await asyncio.sleep_ms(_REJOIN_PAUSE_MS)
