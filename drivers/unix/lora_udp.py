# LoRa modem for the unix port: the part of micropython-lib's lora.AsyncModem API the LoRaWAN
# MAC uses (configure, send, recv, get_time_on_air_us, standby, sleep), over UDP to the RF
# medium simulator (tools/serene/lora/medium.py), so drivers/lorawan and drivers/radio/lora.py
# are the same code on the unix port and on the board.
#
# Copyright (c) the serene-module authors. MIT licence.
#
# Datagrams (little-endian):
#   module -> medium  "H"                                       hello (the medium learns us)
#                     "T" freq_hz u32, sf u8, cr u8, bw_khz u16, flags u8, preamble u8,
#                         toa_us u32, payload                   a transmission starts now
#   medium -> module  "R" freq_hz u32, sf u8, cr u8, bw_khz u16, flags u8, snr i8, rssi i16,
#                         toa_us u32, payload                   a transmission starts now
#   flags: bit 0 IQ inverted, bit 1 CRC on.
# send() sleeps the time on air (the modem is busy) and returns the TX-done ticks_ms, as
# lora.AsyncModem.send does. recv(timeout_ms) listens: a frame whose transmission *starts*
# while listening, on our frequency, SF, bandwidth and IQ polarity, is received (it ends
# after its time on air, even past the time-out: a real receiver that locked on a preamble
# finishes the packet); anything else that arrives is counted in stats["missed"], never
# silently lost. The socket is connected to the medium: it opens no listening port of its own
# beyond the ephemeral one the medium answers to.
import asyncio
import socket
import struct
import time
from micropython import const

from drivers.lorawan.eu868 import time_on_air_us

_T_HDR = "<BIBBHBBI"
_R_HDR = "<BIBBHBbhI"
_T_LEN = const(15)
_R_LEN = const(17)
_F_IQ = const(1)
_F_CRC = const(2)
_MAX_DGRAM = const(300)  # header + the largest LoRa payload (255)
# Polling period while listening: 2 ms, well under a symbol at SF7 (1.024 ms x 8 preamble
# symbols); the medium delivers a frame at its start, so this only delays its reception.
_POLL_MS = const(2)


class RxPacket(bytearray):
    """As micropython-lib's lora.RxPacket: the payload, plus ticks_ms, snr, rssi, valid_crc."""

    def __init__(self, payload, ticks_ms=None, snr=None, rssi=None, valid_crc=True):
        super().__init__(payload)
        self.ticks_ms = ticks_ms
        self.snr = snr
        self.rssi = rssi
        self.valid_crc = valid_crc


class UdpModem:
    def __init__(self, host="127.0.0.1", port=0):
        ai = socket.getaddrinfo(host, port)[0]
        self._sock = socket.socket(ai[0], socket.SOCK_DGRAM)
        self._sock.connect(ai[-1])
        self._sock.setblocking(False)
        self._buf = bytearray(_MAX_DGRAM)
        self._cfg = {"freq_khz": 868100, "sf": 7, "bw": "125", "coding_rate": 5,
                     "preamble_len": 8, "crc_en": True, "invert_iq_tx": False,
                     "invert_iq_rx": False, "output_power": 14, "syncword": 0x34}
        self.stats = {"tx": 0, "rx": 0, "missed": 0, "malformed": 0}
        self._sock.send(b"H")

    def configure(self, cfg):
        for k in cfg:
            if k not in self._cfg:
                raise ValueError("lora_cfg " + k)
        self._cfg.update(cfg)

    def _bw_hz(self):
        return int(float(self._cfg["bw"]) * 1000)

    def get_time_on_air_us(self, n):
        c = self._cfg
        return time_on_air_us(n, c["sf"], self._bw_hz(), c["coding_rate"], c["preamble_len"],
                              c["crc_en"])

    def standby(self):
        pass

    def sleep(self):
        pass

    async def send(self, packet, tx_at_ms=None):
        c = self._cfg
        if tx_at_ms is not None:
            await asyncio.sleep_ms(max(0, time.ticks_diff(tx_at_ms, time.ticks_ms())))
        toa = self.get_time_on_air_us(len(packet))
        flags = (_F_IQ if c["invert_iq_tx"] else 0) | (_F_CRC if c["crc_en"] else 0)
        hdr = struct.pack(_T_HDR, 0x54, c["freq_khz"] * 1000, c["sf"], c["coding_rate"],
                          self._bw_hz() // 1000, flags, c["preamble_len"], toa)
        self._sock.send(hdr + bytes(packet))
        self.stats["tx"] += 1
        await asyncio.sleep_ms((toa + 999) // 1000)
        return time.ticks_ms()

    def _read(self):
        try:
            n = self._sock.readinto(self._buf)
        except OSError:
            return None  # EAGAIN: nothing there
        return n

    async def recv(self, timeout_ms=None, rx_length=0xFF, rx_packet=None):
        c = self._cfg
        while self._read():  # what arrived while we were not listening was not received
            self.stats["missed"] += 1
        deadline = time.ticks_add(time.ticks_ms(), timeout_ms if timeout_ms else 0)
        want_iq = 1 if c["invert_iq_rx"] else 0
        while True:
            n = self._read()
            if n:
                if n < _R_LEN or self._buf[0] != 0x52:
                    self.stats["malformed"] += 1
                else:
                    _, freq, sf, cr, bw, flags, snr, rssi, toa = struct.unpack_from(_R_HDR,
                                                                                    self._buf)
                    if (freq // 1000 == c["freq_khz"] and sf == c["sf"]
                            and bw == self._bw_hz() // 1000 and (flags & _F_IQ) == want_iq):
                        payload = bytes(self._buf[_R_LEN:n])
                        await asyncio.sleep_ms((toa + 999) // 1000)  # the rest of the packet
                        self.stats["rx"] += 1
                        return RxPacket(payload, time.ticks_ms(), snr, rssi, True)
                    self.stats["missed"] += 1
                continue
            if timeout_ms is not None and time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                return None
            await asyncio.sleep_ms(_POLL_MS)
