"""The simulated LoRa RF medium and its Semtech UDP packet-forwarder gateways.

The unix-port modem shim (drivers/unix/lora_udp.py) sends a datagram when a transmission starts
("T": frequency, SF, bandwidth, flags, preamble, its time on air, payload). The medium
recomputes the time on air itself (serene.lora.airtime; a mismatch is counted in
stats["toa_mismatch"]), keeps the frame "on air" for that long, and at its end lets each
gateway hear it or not:

- scripted loss: ``drop(index, gateway_eui) -> bool`` (index = the uplink's number from 0);
- random loss per gateway (``loss``) and a simple link budget: log-distance path loss from
  ``distance_m`` (exponent 2.7, 40 dB at 1 m), noise floor -117 dBm (125 kHz, NF 6 dB), the
  SX126x demodulation floor per SF (-7.5 dB at SF7 ... -20 dB at SF12), plus ``fade_db``;
- outages: ``outages`` = [(start_s, end_s)] on the medium clock, the gateway hears nothing;
- duplication: ``dup`` = probability that a gateway forwards a frame twice;
- collisions: two uplinks overlapping in time on one frequency and SF are both lost.

A gateway forwards what it heard as PUSH_DATA {"rxpk": [...]} (packet_forwarder PROTOCOL.TXT
v2 §3-§4, tmst = its µs counter at the end of the frame), sends PULL_DATA every
``pull_interval_s``, and takes PULL_RESP {"txpk": {...}} (§5-§6): it answers TX_ACK (error
NONE, TOO_LATE, TOO_EARLY) and, at the scheduled tmst (or at once for "imme"), the medium
delivers the downlink ("R" datagram) to every module shim, which keeps it only if it is
listening on that frequency / SF / IQ polarity at that instant.

The clock is real time by default, or scaled (``Clock(scale=10)``: ten medium seconds per real
second) for tests that only involve host-side parts.
"""

import base64
import heapq
import json
import math
import random
import selectors
import socket
import struct
import threading
import time

from . import airtime

T_HDR = struct.Struct("<BIBBHBBI")
R_HDR = struct.Struct("<BIBBHBbhI")
F_IQ, F_CRC = 1, 2
PROTOCOL_VERSION = 2
PUSH_DATA, PUSH_ACK, PULL_DATA, PULL_RESP, PULL_ACK, TX_ACK = 0, 1, 2, 3, 4, 5
DEMOD_FLOOR_DB = {7: -7.5, 8: -10.0, 9: -12.5, 10: -15.0, 11: -17.5, 12: -20.0}
NOISE_FLOOR_DBM = -117.0
TX_POWER_DBM = 14.0
# A gateway needs the txpk a little ahead of its tmst (SX1301 JIT queue: TX_START_DELAY
# 1.5 ms plus the SPI load; the reference packet forwarder refuses < ~30 ms as TOO_LATE) and
# refuses what is too far ahead (TOO_EARLY): 10 s here, above the 5-6 s of a join-accept
# (the JIT queue of lora_pkt_fwd accepts far more; 10 s still catches a broken tmst).
TX_LEAD_MIN_US = 30_000
TX_LEAD_MAX_US = 10_000_000


class Clock:
    """Medium time in µs since start: real time x scale."""

    def __init__(self, scale=1.0):
        self.scale = scale
        self.t0 = time.monotonic()

    def now_us(self):
        return int((time.monotonic() - self.t0) * self.scale * 1e6)

    def real_s(self, us):
        return us / self.scale / 1e6


class Gateway:
    def __init__(self, eui, distance_m=100.0, loss=0.0, outages=(), dup=0.0, fade_db=0.0,
                 pull_interval_s=1.0):
        self.eui = bytes.fromhex(eui) if isinstance(eui, str) else bytes(eui)
        self.distance_m = distance_m
        self.loss = loss
        self.outages = list(outages)
        self.dup = dup
        self.fade_db = fade_db
        self.pull_interval_s = pull_interval_s
        self.tmst_offset = random.Random(self.eui).randrange(1 << 32)
        self.sock = None
        self.ns = None
        self.token = 0
        self.stats = {"heard": 0, "forwarded": 0, "push_ack": 0, "pull_ack": 0, "pull_resp": 0,
                      "tx": 0, "too_late": 0, "too_early": 0, "lost_random": 0,
                      "lost_snr": 0, "lost_outage": 0, "lost_script": 0, "malformed": 0}

    def tmst(self, t_us):
        return (t_us + self.tmst_offset) & 0xFFFFFFFF

    def rssi_snr(self):
        pl = 40.0 + 27.0 * math.log10(max(self.distance_m, 1.0))
        rssi = TX_POWER_DBM - pl - self.fade_db
        return rssi, rssi - NOISE_FLOOR_DBM

    def _send(self, ident, body=b""):
        self.token = (self.token + 1) & 0xFFFF
        hdr = struct.pack(">BHB", PROTOCOL_VERSION, self.token, ident)
        if ident in (PUSH_DATA, PULL_DATA, TX_ACK):
            hdr += self.eui
        self.sock.sendto(hdr + body, self.ns)


class Medium:
    def __init__(self, gateways, ns_addr, clock=None, host="127.0.0.1", drop=None, seed=1):
        self.clock = clock or Clock()
        self.gateways = list(gateways)
        self.ns_addr = ns_addr
        self.drop = drop
        self.rng = random.Random(seed)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.addr = self.sock.getsockname()
        self.port = self.addr[1]
        self.modules = set()
        self.uplinks = []  # every uplink: dict(start, end, freq, sf, data, heard_by, lost)
        self.downlinks = []  # every downlink put on air: dict(start, freq, sf, data, gw)
        self.stats = {"uplinks": 0, "downlinks": 0, "collisions": 0, "toa_mismatch": 0,
                      "malformed": 0}
        self._events = []
        self._seq = 0
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        for gw in self.gateways:
            gw.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            gw.sock.bind((host, 0))
            gw.ns = ns_addr
            self._sel.register(gw.sock, selectors.EVENT_READ, gw)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self):
        for gw in self.gateways:
            self._at(self.clock.now_us(), self._pull, gw)
        self._thread = threading.Thread(target=self._loop, name="lora-medium", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        for gw in self.gateways:
            gw.sock.close()
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _at(self, t_us, fn, *args):
        self._seq += 1
        heapq.heappush(self._events, (t_us, self._seq, fn, args))

    def _loop(self):
        while not self._stop.is_set():
            now = self.clock.now_us()
            while self._events and self._events[0][0] <= now:
                _, _, fn, args = heapq.heappop(self._events)
                fn(*args)
            wait = 0.05
            if self._events:
                wait = max(0.0, min(wait, self.clock.real_s(self._events[0][0] - now)))
            for key, _ in self._sel.select(wait):
                try:
                    data, addr = key.fileobj.recvfrom(4096)
                except OSError:
                    continue
                if key.data is None:
                    self._from_module(data, addr)
                else:
                    self._from_ns(key.data, data)

    # --- uplinks -----------------------------------------------------------------------

    def _from_module(self, data, addr):
        self.modules.add(addr)
        if data[:1] == b"H":
            return
        if len(data) < T_HDR.size or data[0] != 0x54:
            self.stats["malformed"] += 1
            return
        _, freq, sf, cr, bw_khz, flags, pre, toa_us = T_HDR.unpack_from(data)
        payload = data[T_HDR.size:]
        mine = airtime.time_on_air_us(len(payload), sf, bw_khz * 1000, cr - 4, pre,
                                      bool(flags & F_CRC))
        if mine != toa_us:
            self.stats["toa_mismatch"] += 1
        start = self.clock.now_us()
        up = {"index": len(self.uplinks), "start": start, "end": start + mine, "freq": freq,
              "sf": sf, "bw": bw_khz, "data": payload, "heard_by": [], "lost": {},
              "collided": False, "toa_us": mine}
        for other in self.uplinks[-8:]:
            if (other["freq"] == freq and other["sf"] == sf and other["end"] > start):
                other["collided"] = up["collided"] = True
                self.stats["collisions"] += 1
        self.uplinks.append(up)
        self.stats["uplinks"] += 1
        self._at(up["end"], self._uplink_end, up)

    def _uplink_end(self, up):
        for gw in self.gateways:
            why = self._lost(gw, up)
            if why:
                up["lost"][gw.eui.hex()] = why
                gw.stats["lost_" + why if "lost_" + why in gw.stats else "lost_random"] += 1
                continue
            up["heard_by"].append(gw.eui.hex())
            gw.stats["heard"] += 1
            rssi, snr = gw.rssi_snr()
            rxpk = {"tmst": gw.tmst(up["end"]), "chan": 0, "rfch": 0,
                    "freq": round(up["freq"] / 1e6, 6), "stat": 1, "modu": "LORA",
                    "datr": "SF%dBW%d" % (up["sf"], up["bw"]), "codr": "4/5",
                    "rssi": int(rssi), "lsnr": round(snr, 1), "size": len(up["data"]),
                    "data": base64.b64encode(up["data"]).decode()}
            body = json.dumps({"rxpk": [rxpk]}).encode()
            copies = 2 if gw.dup and self.rng.random() < gw.dup else 1
            for _ in range(copies):
                gw._send(PUSH_DATA, body)
                gw.stats["forwarded"] += 1

    def _lost(self, gw, up):
        if up["collided"]:
            return "collision"
        t_s = up["end"] / 1e6
        if any(a <= t_s < b for a, b in gw.outages):
            return "outage"
        if self.drop is not None and self.drop(up["index"], gw.eui.hex()):
            return "script"
        if gw.loss and self.rng.random() < gw.loss:
            return "random"
        _, snr = gw.rssi_snr()
        if snr < DEMOD_FLOOR_DB.get(up["sf"], -20.0):
            return "snr"
        return None

    # --- the gateways' side of the Semtech protocol ------------------------------------

    def _pull(self, gw):
        gw._send(PULL_DATA)
        self._at(self.clock.now_us() + int(gw.pull_interval_s * 1e6), self._pull, gw)

    def _from_ns(self, gw, data):
        if len(data) < 4 or data[0] != PROTOCOL_VERSION:
            gw.stats["malformed"] += 1
            return
        token = data[1:3]
        ident = data[3]
        if ident == PUSH_ACK:
            gw.stats["push_ack"] += 1
        elif ident == PULL_ACK:
            gw.stats["pull_ack"] += 1
        elif ident == PULL_RESP:
            gw.stats["pull_resp"] += 1
            try:
                txpk = json.loads(data[4:])["txpk"]
                payload = base64.b64decode(txpk["data"])
            except (ValueError, KeyError, TypeError):
                gw.stats["malformed"] += 1
                return
            now = self.clock.now_us()
            error = "NONE"
            if txpk.get("imme"):
                at = now
            else:
                lead = (txpk["tmst"] - gw.tmst(now)) & 0xFFFFFFFF
                if lead >= 1 << 31 or lead < TX_LEAD_MIN_US:
                    error = "TOO_LATE"
                elif lead > TX_LEAD_MAX_US:
                    error = "TOO_EARLY"
                at = now + lead
            ack = json.dumps({"txpk_ack": {"error": error}}).encode()
            gw.sock.sendto(struct.pack(">B2sB", PROTOCOL_VERSION, token, TX_ACK) + gw.eui + ack,
                           gw.ns)
            if error != "NONE":
                gw.stats["too_late" if error == "TOO_LATE" else "too_early"] += 1
                return
            self._at(at, self._downlink, gw, txpk, payload)

    def _downlink(self, gw, txpk, payload):
        sf = int(txpk["datr"].split("BW")[0][2:])
        bw = int(txpk["datr"].split("BW")[1])
        freq = int(round(float(txpk["freq"]) * 1e6))
        flags = (F_IQ if txpk.get("ipol", True) else 0) | (0 if txpk.get("ncrc") else F_CRC)
        toa = airtime.time_on_air_us(len(payload), sf, bw * 1000, 1, 8, bool(flags & F_CRC))
        gw.stats["tx"] += 1
        self.stats["downlinks"] += 1
        self.downlinks.append({"start": self.clock.now_us(), "freq": freq, "sf": sf,
                               "data": payload, "gw": gw.eui.hex()})
        rssi, snr = gw.rssi_snr()
        dgram = R_HDR.pack(0x52, freq, sf, 5, bw, flags, int(max(-128, min(127, snr))),
                           int(rssi), toa) + payload
        for addr in self.modules:
            self.sock.sendto(dgram, addr)
