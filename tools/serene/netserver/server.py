"""The stand-in network server: Semtech UDP towards the gateways, ChirpStack MQTT towards the
applications (format: serene/netserver/__init__.py).

- Join server: OTAA keys from the JSON file of serene.netserver.keys; the join-request MIC is
  checked and its DevNonce must be greater than the last one accepted for the device (L2 1.0.4
  §6.2.5), else it is refused and counted. JoinNonce is a per-device counter; the join-accept
  carries the EU868 CFList (867.1-867.9 MHz), RX1DROffset 0, RX2 DR0, RxDelay 1 s, and is sent
  in RX1 (5 s after the request, same channel and DR).
- Uplinks: de-duplicated across gateways (the same PHYPayload within ``dedup_ms``), the
  gateway with the best SNR answers; MIC checked with the 32-bit FCnt rebuilt from the 16 on-air
  bits; an FCnt not above the last one is a replay (refused and counted, as is a wrong MIC).
- Downlinks: one per uplink at most, in RX1 (tmst + RxDelay, uplink frequency, uplink DR) via
  PULL_RESP to the chosen gateway, decided ``downlink_delay_ms`` after the uplink event is
  published (ChirpStack's ``get_downlink_data_delay``, 100 ms by default: the time an
  application has to enqueue an answer that goes in this uplink's RX1): the head of the device's queue (command/down), MAC commands
  (LinkADRReq from ADR), an ACK for a confirmed uplink, an answer to ADRACKReq.
- ADR (LoRaMac / ChirpStack-like): over the last ``adr_history`` uplinks, margin = max SNR -
  required SNR of the DR - ``adr_margin_db``; each 3 dB of margin is one DR up (to DR5); a
  negative margin steps down. A LinkADRReq goes when the wanted DR differs.
- Counters: stats["mic"], ["replay"], ["devnonce"], ["unknown"], ["duplicates"], ... Nothing
  received is dropped without a counter.
"""

import base64
import json
import selectors
import socket
import struct
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC

from . import keys as keys_mod

PUSH_DATA, PUSH_ACK, PULL_DATA, PULL_RESP, PULL_ACK, TX_ACK = 0, 1, 2, 3, 4, 5
CFLIST = (867_100_000, 867_300_000, 867_500_000, 867_700_000, 867_900_000)
REQUIRED_SNR = {0: -20.0, 1: -17.5, 2: -15.0, 3: -12.5, 4: -10.0, 5: -7.5}
NET_ID = 0x000013
JOIN_ACCEPT_DELAY1_US = 5_000_000
RX_DELAY_S = 1


def _aes(key, data, decrypt=False):
    c = Cipher(algorithms.AES(key), modes.ECB())
    op = c.decryptor() if decrypt else c.encryptor()
    return op.update(data) + op.finalize()


def _cmac(key, data):
    c = CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


def _crypt(key, dirn, addr, fcnt, data):
    out = bytearray()
    for i in range((len(data) + 15) // 16):
        a = bytes([1, 0, 0, 0, 0, dirn]) + struct.pack("<II", addr, fcnt) + bytes([0, i + 1])
        s = _aes(key, a)
        out += bytes(x ^ y for x, y in zip(data[16 * i:16 * i + 16], s))
    return bytes(out)


def _mic(key, dirn, addr, fcnt, msg):
    b0 = bytes([0x49, 0, 0, 0, 0, dirn]) + struct.pack("<II", addr, fcnt) + bytes([0, len(msg)])
    return _cmac(key, b0 + msg)[:4]


def _now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"


class Device:
    def __init__(self, d):
        self.dev_eui = d["devEui"]
        self.join_eui = d["joinEui"]
        self.app_key = bytes.fromhex(d["appKey"])
        self.application_id = d.get("applicationId", "serene")
        self.name = d.get("deviceName", self.dev_eui)
        self.last_devnonce = -1
        self.join_nonce = 0
        self.dev_addr = None
        self.nwk = self.app = None
        self.fcnt_up = -1  # last accepted
        self.fcnt_down = 0
        self.queue = []  # [{"id", "confirmed", "fPort", "data"}]
        self.pending_ack = None  # queue item waiting for the device's ACK
        self.snrs = []
        self.dr = 0
        self.want_adr = None
        self.mac_answers = []

    def info(self):
        return {"tenantId": "00000000-0000-0000-0000-000000000000", "tenantName": "serene",
                "applicationId": self.application_id, "applicationName": self.application_id,
                "deviceProfileId": "00000000-0000-0000-0000-000000000001",
                "deviceProfileName": "EU868 1.0.4 class A", "deviceName": self.name,
                "devEui": self.dev_eui, "tags": {}}


class NetworkServer:
    def __init__(self, keys_file, mqtt_host="127.0.0.1", mqtt_port=1883, username=None,
                 password=None, client_id="serene-netserver", host="127.0.0.1", udp_port=0,
                 dedup_ms=200, adr=True, adr_history=5, adr_margin_db=10.0, clock=None,
                 downlink_delay_ms=100):
        self.devices = {d["devEui"]: Device(d) for d in keys_mod.load(keys_file)}
        self.by_addr = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, udp_port))
        self.addr = self.sock.getsockname()
        self.gateways = {}  # eui hex -> PULL_DATA source address
        self.dedup_s = dedup_ms / 1000
        self.downlink_delay_s = downlink_delay_ms / 1000
        self._answers = []  # [due (monotonic), args of _answer], in due order
        self.adr = adr
        self.adr_history = adr_history
        self.adr_margin_db = adr_margin_db
        self.clock = clock
        self.stats = {k: 0 for k in ("push_data", "pull_data", "tx_ack", "tx_errors", "rxpk",
                                     "duplicates", "joins", "uplinks", "mic", "replay",
                                     "devnonce", "unknown", "malformed", "downlinks",
                                     "link_adr_req", "mqtt_down", "mqtt_bad")}
        self.events = []  # (topic, payload dict) published, for tests and reports
        self._pending = {}  # PHYPayload -> [first_seen, [(gw, rxpk)]]
        self._tx_wait = {}  # token -> (device, queue item or None, txpk, gw)
        self._token = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._mqtt = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        if username:
            self._mqtt.username_pw_set(username, password)
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_message = self._on_message
        self._mqtt_host, self._mqtt_port = mqtt_host, mqtt_port
        self._thread = None

    # --- lifecycle ------------------------------------------------------------------

    def start(self):
        self._mqtt.connect(self._mqtt_host, self._mqtt_port, keepalive=30)
        self._mqtt.loop_start()
        self._thread = threading.Thread(target=self._loop, name="netserver", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self._mqtt.loop_stop()
        self._mqtt.disconnect()
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- MQTT -----------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason, props):
        client.subscribe("application/+/device/+/command/down", qos=1)

    def _on_message(self, client, userdata, msg):
        parts = msg.topic.split("/")
        try:
            body = json.loads(msg.payload)
            dev = self.devices[parts[3]]
            item = {"id": str(uuid.uuid4()), "confirmed": bool(body.get("confirmed")),
                    "fPort": int(body["fPort"]), "data": base64.b64decode(body.get("data", ""))}
            if body.get("devEui", parts[3]) != parts[3] or not 1 <= item["fPort"] <= 223:
                raise ValueError("devEui / fPort")
        except (ValueError, KeyError, TypeError, IndexError):
            self.stats["mqtt_bad"] += 1
            return
        with self._lock:
            dev.queue.append(item)
        self.stats["mqtt_down"] += 1

    def _publish(self, dev, event, payload):
        topic = "application/%s/device/%s/event/%s" % (dev.application_id, dev.dev_eui, event)
        self.events.append((topic, payload))
        self._mqtt.publish(topic, json.dumps(payload), qos=1)

    # --- UDP ------------------------------------------------------------------------

    def _loop(self):
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        while not self._stop.is_set():
            for _ in sel.select(0.01):
                try:
                    data, addr = self.sock.recvfrom(65535)
                except OSError:
                    continue
                self._datagram(data, addr)
            now = time.monotonic()
            due = [k for k, v in self._pending.items() if now - v[0] >= self.dedup_s]
            for k in due:
                copies = self._pending.pop(k)[1]
                with self._lock:
                    self._frame(k, copies)
            while self._answers and self._answers[0][0] <= time.monotonic():
                args = self._answers.pop(0)[1]
                with self._lock:
                    self._answer(*args)

    def _datagram(self, data, addr):
        if len(data) < 4 or data[0] != 2:
            self.stats["malformed"] += 1
            return
        token, ident = data[1:3], data[3]
        if ident == PUSH_DATA and len(data) >= 12:
            self.stats["push_data"] += 1
            self.sock.sendto(bytes([2]) + token + bytes([PUSH_ACK]), addr)
            gw = data[4:12].hex()
            try:
                rxpks = json.loads(data[12:]).get("rxpk", [])
            except ValueError:
                self.stats["malformed"] += 1
                return
            for rx in rxpks:
                self.stats["rxpk"] += 1
                try:
                    phy = base64.b64decode(rx["data"])
                except (KeyError, ValueError):
                    self.stats["malformed"] += 1
                    continue
                p = self._pending.get(phy)
                if p is None:
                    self._pending[phy] = [time.monotonic(), [(gw, rx)]]
                else:
                    self.stats["duplicates"] += 1
                    p[1].append((gw, rx))
        elif ident == PULL_DATA and len(data) >= 12:
            self.stats["pull_data"] += 1
            self.gateways[data[4:12].hex()] = addr
            self.sock.sendto(bytes([2]) + token + bytes([PULL_ACK]), addr)
        elif ident == TX_ACK:
            self.stats["tx_ack"] += 1
            try:
                err = json.loads(data[12:] or b"{}").get("txpk_ack", {}).get("error", "NONE")
            except ValueError:
                err = "NONE"
            w = self._tx_wait.pop(token, None)
            if err != "NONE":
                self.stats["tx_errors"] += 1
            if w and err == "NONE":
                dev, item, txpk, gw, fcnt = w
                self._publish(dev, "txack", {
                    "downlinkId": int.from_bytes(token, "big"), "time": _now_iso(),
                    "deviceInfo": dev.info(), "queueItemId": item["id"] if item else "",
                    "fCntDown": fcnt, "gatewayId": gw,
                    "txInfo": {"frequency": int(round(txpk["freq"] * 1e6)),
                               "modulation": {"lora": self._lora(txpk["datr"])}}})
        else:
            self.stats["malformed"] += 1

    @staticmethod
    def _lora(datr):
        sf, bw = datr[2:].split("BW")
        return {"bandwidth": int(bw) * 1000, "spreadingFactor": int(sf), "codeRate": "CR_4_5"}

    # --- frames ---------------------------------------------------------------------

    def _frame(self, phy, copies):
        gw, rx = max(copies, key=lambda c: c[1].get("lsnr", -99))
        if len(phy) < 12:
            self.stats["malformed"] += 1
            return
        mtype = phy[0] >> 5
        if mtype == 0 and len(phy) == 23:
            self._join(phy, gw, rx, copies)
        elif mtype in (2, 4):
            self._uplink(phy, gw, rx, copies)
        else:
            self.stats["malformed"] += 1

    def _join(self, phy, gw, rx, copies):
        join_eui, dev_eui = phy[1:9][::-1].hex(), phy[9:17][::-1].hex()
        nonce = struct.unpack("<H", phy[17:19])[0]
        dev = self.devices.get(dev_eui)
        if dev is None or dev.join_eui != join_eui:
            self.stats["unknown"] += 1
            return
        if _cmac(dev.app_key, phy[:19])[:4] != phy[19:23]:
            self.stats["mic"] += 1
            return
        if nonce <= dev.last_devnonce:
            self.stats["devnonce"] += 1  # §6.2.5: a DevNonce that did not increase
            return
        dev.last_devnonce = nonce
        dev.join_nonce += 1
        if dev.dev_addr is None:
            dev.dev_addr = 0x26000000 | (int(dev_eui[-6:], 16) & 0x01FFFFFF)
        tail = struct.pack("<I", dev.join_nonce)[:3] + struct.pack("<I", NET_ID)[:3]
        tail += struct.pack("<H", nonce) + bytes(7)
        dev.nwk, dev.app = _aes(dev.app_key, b"\x01" + tail), _aes(dev.app_key, b"\x02" + tail)
        dev.fcnt_up, dev.fcnt_down, dev.snrs, dev.queue[:0] = -1, 0, [], []
        dev.dr = int(rx["datr"][2:].split("BW")[0])
        dev.dr = 12 - dev.dr
        self.by_addr[dev.dev_addr] = dev
        msg = b"\x20" + struct.pack("<I", dev.join_nonce)[:3] + struct.pack("<I", NET_ID)[:3]
        msg += struct.pack("<IBB", dev.dev_addr, 0x00, RX_DELAY_S)
        msg += b"".join(struct.pack("<I", f // 100)[:3] for f in CFLIST) + b"\x00"
        body = msg[1:] + _cmac(dev.app_key, msg)[:4]
        ja = msg[:1] + _aes(dev.app_key, body, decrypt=True)
        self.stats["joins"] += 1
        self._send(dev, None, gw, rx, ja, JOIN_ACCEPT_DELAY1_US, -1)
        self._publish(dev, "join", {"deduplicationId": str(uuid.uuid4()), "time": _now_iso(),
                                    "deviceInfo": dev.info(), "devAddr": "%08x" % dev.dev_addr})

    def _uplink(self, phy, gw, rx, copies):
        addr = struct.unpack("<I", phy[1:5])[0]
        dev = self.by_addr.get(addr)
        if dev is None:
            self.stats["unknown"] += 1
            return
        fctrl = phy[5]
        folen = fctrl & 0x0F
        f16 = struct.unpack("<H", phy[6:8])[0]
        nxt = dev.fcnt_up + 1
        cand = (nxt & ~0xFFFF) | f16
        if cand < nxt:
            cand += 0x10000
        if _mic(dev.nwk, 0, addr, cand, phy[:-4]) != phy[-4:]:
            old = cand - 0x10000
            if old >= 0 and _mic(dev.nwk, 0, addr, old, phy[:-4]) == phy[-4:]:
                self.stats["replay"] += 1
            else:
                self.stats["mic"] += 1
            return
        dev.fcnt_up = cand
        self.stats["uplinks"] += 1
        pos = 8 + folen
        port, data = None, b""
        if pos < len(phy) - 4:
            port = phy[pos]
            data = _crypt(dev.nwk if port == 0 else dev.app, 0, addr, cand, phy[pos + 1:-4])
        answers = data if port == 0 else phy[8:pos]
        if answers:
            dev.mac_answers.append(bytes(answers))
        dr = 12 - int(rx["datr"][2:].split("BW")[0])
        dev.dr = dr
        dev.snrs = (dev.snrs + [max(float(c[1].get("lsnr", 0)) for c in copies)])[
            -self.adr_history:]
        if fctrl & 0x20 and dev.pending_ack:
            item, dev.pending_ack = dev.pending_ack, None
            self._publish(dev, "ack", {"deduplicationId": str(uuid.uuid4()), "time": _now_iso(),
                                       "deviceInfo": dev.info(), "queueItemId": item["id"],
                                       "acknowledged": True, "fCntDown": dev.fcnt_down - 1})
        if port is not None and port != 0:
            self._publish(dev, "up", {
                "deduplicationId": str(uuid.uuid4()), "time": _now_iso(),
                "deviceInfo": dev.info(), "devAddr": "%08x" % addr, "adr": bool(fctrl & 0x80),
                "dr": dr, "fCnt": cand, "fPort": port, "confirmed": phy[0] >> 5 == 4,
                "data": base64.b64encode(data).decode(),
                "rxInfo": [{"gatewayId": g, "uplinkId": i, "rssi": r.get("rssi"),
                            "snr": r.get("lsnr"), "channel": r.get("chan", 0),
                            "context": base64.b64encode(struct.pack(">I", r["tmst"])).decode(),
                            "crcStatus": "CRC_OK"} for i, (g, r) in enumerate(copies)],
                "txInfo": {"frequency": int(round(float(rx["freq"]) * 1e6)),
                           "modulation": {"lora": self._lora(rx["datr"])}}})
        args = (dev, gw, rx, fctrl, phy[0] >> 5 == 4)
        if self.downlink_delay_s > 0:
            self._answers.append((time.monotonic() + self.downlink_delay_s, args))
        else:
            self._answer(*args)

    def _adr_req(self, dev, fctrl):
        if not (self.adr and fctrl & 0x80) or len(dev.snrs) < self.adr_history:
            return b""
        margin = max(dev.snrs) - REQUIRED_SNR[dev.dr] - self.adr_margin_db
        steps = int(margin // 3)
        want = max(0, min(5, dev.dr + steps))
        if want == dev.dr:
            return b""
        self.stats["link_adr_req"] += 1
        dev.snrs = []
        # LinkADRReq: DR want, TXPower 0, channels 0-7 (defaults + CFList), NbTrans 1.
        return bytes([0x03, (want << 4) | 0x0, 0xFF, 0x00, 0x01])

    def _answer(self, dev, gw, rx, fctrl, confirmed):
        fopts = self._adr_req(dev, fctrl)
        item = dev.queue.pop(0) if dev.queue and dev.pending_ack is None else None
        if not (item or fopts or confirmed or fctrl & 0x40):
            return
        addr, fcnt = dev.dev_addr, dev.fcnt_down
        mtype = 5 if item and item["confirmed"] else 3
        msg = bytes([mtype << 5]) + struct.pack("<I", addr)
        msg += bytes([len(fopts) | (0x20 if confirmed else 0) | (0x10 if dev.queue else 0)])
        msg += struct.pack("<H", fcnt & 0xFFFF) + fopts
        if item:
            msg += bytes([item["fPort"]]) + _crypt(dev.app, 1, addr, fcnt, item["data"])
            if item["confirmed"]:
                dev.pending_ack = item
        msg += _mic(dev.nwk, 1, addr, fcnt, msg)
        dev.fcnt_down += 1
        self._send(dev, item, gw, rx, msg, RX_DELAY_S * 1_000_000, fcnt)

    def _send(self, dev, item, gw, rx, phy, delay_us, fcnt):
        addr = self.gateways.get(gw)
        if addr is None:
            self.stats["tx_errors"] += 1
            return
        txpk = {"imme": False, "tmst": (rx["tmst"] + delay_us) & 0xFFFFFFFF, "freq": rx["freq"],
                "rfch": 0, "powe": 14, "modu": "LORA", "datr": rx["datr"], "codr": "4/5",
                "ipol": True, "ncrc": True, "size": len(phy),
                "data": base64.b64encode(phy).decode()}
        self._token = (self._token + 1) & 0xFFFF
        token = struct.pack(">H", self._token)
        self._tx_wait[token] = (dev, item, txpk, gw, fcnt)
        self.sock.sendto(bytes([2]) + token + bytes([PULL_RESP]) +
                         json.dumps({"txpk": txpk}).encode(), addr)
        self.stats["downlinks"] += 1
