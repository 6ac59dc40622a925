"""End to end over LoRaWAN: the module (drivers/radio/lora.py + drivers/lorawan on the
MicroPython unix port, drivers/unix/lora_udp.py) -> the RF medium -> two Semtech UDP gateways
-> the stand-in network server -> MQTT events as ChirpStack v4 publishes them (join, up,
txack), and back: a downlink published on command/down reaches the module in RX1.

Plus the network server alone: a wrong MIC and a replayed FCnt are refused and counted, and a
join-request with a DevNonce that did not increase is ignored.
"""

import base64
import json
import os
import socket
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from serene import upy as upy_mod
from serene.lora.medium import Gateway, Medium
from serene.netserver import keys as keys_mod
from serene.netserver.server import NetworkServer

MOSQUITTO = "/usr/sbin/mosquitto"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def broker(tmp_path):
    if not os.path.exists(MOSQUITTO):
        pytest.fail("mosquitto is not installed: run tools/dev setup")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener %d 127.0.0.1\nallow_anonymous true\npersistence false\n" % port)
    p = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port
    p.terminate()
    p.wait(5)


class Events:
    def __init__(self, port):
        self.msgs = []
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-app")
        self.c.on_message = self._msg
        self.c.connect("127.0.0.1", port)
        self.c.subscribe("application/+/device/+/event/#", qos=1)
        self.c.loop_start()

    def _msg(self, c, u, m):
        with self.cond:
            self.msgs.append((m.topic, json.loads(m.payload)))
            self.cond.notify_all()

    def wait(self, suffix, timeout=30, n=1):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = [p for t, p in self.msgs if t.endswith(suffix)]
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no %s event: %s" % (suffix, self.msgs))
                self.cond.wait(left)

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def test_keys_file_is_private(tmp_path):
    path = tmp_path / "ns" / "lorawan-keys.json"
    d = keys_mod.generate(path, dev_eui="0004a30b001c0530")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert keys_mod.load(path)[0]["appKey"] == d["appKey"] and len(d["appKey"]) == 32


def test_join_uplink_and_rx1_downlink_end_to_end(tmp_path, broker, procs):
    kf = tmp_path / "ns" / "keys.json"
    dev = keys_mod.generate(kf, dev_eui="0004a30b001c0530", application_id="app-1")
    events = Events(broker)
    with NetworkServer(kf, mqtt_port=broker) as ns:
        gws = [Gateway("aa555a0000000001", distance_m=200),
               Gateway("aa555a0000000002", distance_m=800, loss=0.3)]
        with Medium(gws, ns.addr) as medium:
            p = upy_mod.popen(["tests/upy/lorawan_e2e_node.py", "127.0.0.1", str(medium.port),
                               dev["devEui"], dev["joinEui"], dev["appKey"],
                               str(tmp_path / "flash")],
                              extra_paths=[upy_mod.REPO / "tests" / "upy"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            join = events.wait("/event/join", timeout=40)[0]
            assert join["deviceInfo"]["devEui"] == dev["devEui"]
            up = events.wait("/event/up", timeout=30)[0]
            assert up["deviceInfo"]["applicationId"] == "app-1"
            assert base64.b64decode(up["data"]) == b"up-0" and up["fPort"] == 10
            assert up["fCnt"] == 0 and up["dr"] == 5 and up["adr"] is True
            assert up["txInfo"]["modulation"]["lora"]["spreadingFactor"] == 7
            assert up["rxInfo"] and up["rxInfo"][0]["gatewayId"] in ("aa555a0000000001",
                                                                      "aa555a0000000002")
            events.c.publish("application/app-1/device/%s/command/down" % dev["devEui"],
                             json.dumps({"devEui": dev["devEui"], "confirmed": False,
                                         "fPort": 10,
                                         "data": base64.b64encode(b"sealed-ack").decode()}),
                             qos=1)
            out, err = p.communicate(timeout=60)
            assert "DONE" in out, out + err
            assert ("DOWN " + b"sealed-ack".hex()) in out, out + err
            events.wait("/event/txack", timeout=5)
            ups = events.wait("/event/up", timeout=10, n=2)
            fcnts = [u["fCnt"] for u in ups]
            assert fcnts == sorted(set(fcnts)), fcnts  # each uplink once, in order
            assert ns.stats["mic"] == 0 and ns.stats["replay"] == 0
            assert medium.stats["toa_mismatch"] == 0, medium.stats
            assert medium.stats["downlinks"] >= 2  # the join-accept and the ack
    events.close()


def _pkt(ident, body=b"", eui=bytes.fromhex("aa555a00000000ff")):
    return bytes([2, 0, 1, ident]) + eui + body


def _push(sock, ns, phy, tmst=1_000_000):
    rxpk = {"tmst": tmst, "freq": 868.1, "datr": "SF7BW125", "codr": "4/5", "rssi": -60,
            "lsnr": 9.0, "size": len(phy), "data": base64.b64encode(phy).decode()}
    sock.sendto(_pkt(0, json.dumps({"rxpk": [rxpk]}).encode()), ns)


def test_network_server_refuses_wrong_mic_replay_and_old_devnonce(tmp_path, broker):
    from test_lora_frames import aes_enc, data_frame, join_request, session_keys

    kf = tmp_path / "ns" / "keys.json"
    dev = keys_mod.generate(kf, dev_eui="0004a30b001c0531", application_id="app-2")
    key = bytes.fromhex(dev["appKey"])
    with NetworkServer(kf, mqtt_port=broker, dedup_ms=50) as ns:
        gw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        gw.settimeout(5)
        gw.sendto(_pkt(2), ns.addr)
        assert gw.recv(100)[3] == 4  # PULL_ACK
        _push(gw, ns.addr, join_request(key, dev["joinEui"], dev["devEui"], 5))
        resp = None
        while resp is None:
            d = gw.recv(2000)
            if d[3] == 3:
                resp = json.loads(d[4:])["txpk"]
        assert resp["tmst"] == 1_000_000 + 5_000_000 and resp["ipol"] is True
        ja = base64.b64decode(resp["data"])
        plain = ja[:1] + aes_enc(key, ja[1:])
        join_nonce = int.from_bytes(plain[1:4], "little")
        addr = int.from_bytes(plain[7:11], "little")
        nwk, app = session_keys(key, join_nonce, 0x13, 5)
        time.sleep(0.2)
        _push(gw, ns.addr, join_request(key, dev["joinEui"], dev["devEui"], 5), 2_000_000)
        good = data_frame(2, nwk, app, addr, 0, 0x80, b"", 10, b"record")
        bad = bytearray(data_frame(2, nwk, app, addr, 1, 0x80, b"", 10, b"forged"))
        bad[-1] ^= 0x80
        for frame in (good, bytes(bad)):
            time.sleep(0.1)
            _push(gw, ns.addr, frame)
        time.sleep(0.2)
        _push(gw, ns.addr, good, 9_000_000)  # the same frame again later: a replay
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and ns.stats["replay"] < 1:
            time.sleep(0.05)
        assert ns.stats["devnonce"] == 1 and ns.stats["joins"] == 1
        assert ns.stats["uplinks"] == 1 and ns.stats["mic"] == 1 and ns.stats["replay"] == 1
        ups = [p for t, p in ns.events if t.endswith("/event/up")]
        assert len(ups) == 1 and base64.b64decode(ups[0]["data"]) == b"record"
