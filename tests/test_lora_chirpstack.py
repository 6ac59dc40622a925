"""The medical server's LoRaWAN ingest (serene.server.chirpstack) against the real private
Mosquitto (its server listener, the network server's account and ACL) and the real Ingest:
ChirpStack v4 `event/up` JSON in, objects stored once, sealed acks out as `command/down` JSON
only when the module asks (link frame flag) or enough is pending, coalesced, within the daily
budget; refusals counted in the ledger; the budget survives a restart.
"""

import base64
import json
import queue
import time

import cbor2
import paho.mqtt.client as mqtt
import pytest

from serene import broker as B
from serene import linkframe as lf
from serene.server.chirpstack import ChirpstackIntake, ack_epoch, load_dev_euis
from serene.server.ingest import Ingest
from serene.server.store import Store, db_path
from serene.verifier import from_home
from serene.verifier import protocol as vp
from test_server import DEV, EPOCH, FakeModule
from test_server_e2e import provision_fake

EUI = "0004a30b001c0a01"
APP = "serene-app"


@pytest.fixture
def chain(tmp_path):
    home = tmp_path / "home"
    provision_fake(home, [DEV])
    reg = json.loads((home / "registry.json").read_text())
    reg["devices"][DEV]["dev_eui"] = EUI
    (home / "registry.json").write_text(json.dumps(reg))
    brk = B.Broker(home, [DEV]).start()
    yield home, brk
    brk.stop()


class NetServer:
    """The network server's side: publishes event/up, reads command/down (its own account)."""

    def __init__(self, brk):
        creds = brk.netserver_credentials()
        self.down = queue.Queue()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="serene-netserver")
        self.c.username_pw_set(creds["username"], creds["password"])
        self.c.on_message = lambda c, u, m: self.down.put((m.topic, json.loads(m.payload)))
        self.c.connect("127.0.0.1", brk.server_port)
        self.c.loop_start()
        self.c.subscribe("application/+/device/+/command/down", qos=1)
        self.fcnt = 0
        time.sleep(0.3)

    def up(self, data, eui=EUI, port=10):
        ev = {"deduplicationId": "x", "time": "2026-01-01T00:00:00Z",
              "deviceInfo": {"applicationId": APP, "devEui": eui, "deviceName": DEV},
              "devAddr": "26000001", "adr": True, "dr": 5, "fCnt": self.fcnt, "fPort": port,
              "confirmed": False, "data": base64.b64encode(data).decode(), "rxInfo": [],
              "txInfo": {}}
        self.fcnt += 1
        info = self.c.publish("application/%s/device/%s/event/up" % (APP, eui),
                              json.dumps(ev), qos=1)
        info.wait_for_publish(5)

    def downlinks(self, wait=1.0):
        out = []
        deadline = time.monotonic() + wait
        while True:
            try:
                out.append(self.down.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return out

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def frame(epoch, entries, ask=False):
    return lf.build(lf.Frame(epoch, tuple(lf.Entry(k, s, d, len(d)) for k, s, d in entries),
                             flags=lf.ACK_REQUESTED if ask else 0))


def intake(home, brk, **kw):
    creds = brk.server_credentials()
    return ChirpstackIntake(
        lambda: Ingest(from_home(home), Store(db_path(home)), worker_id=1),
        brk.server_port, creds["username"], creds["password"], load_dev_euis(home),
        budget_path=home / "server" / "lorawan-downlinks.json", **kw).start()


def open_ack(mod, ack):
    _piv, plain = vp.open_sealed(ack, mod.keys.ack_key, mod.keys.ack_iv, DEV.encode(), EPOCH)
    return cbor2.loads(plain)


def test_acks_only_when_asked_coalesced_and_within_budget(chain):
    home, brk = chain
    mod = FakeModule(home, DEV)
    ns = NetServer(brk)
    cs = intake(home, brk, downlinks_per_day=3, ack_after=1000)
    try:
        ns.up(frame(EPOCH, [(0, 0, mod.new_epoch(by_value=True))]))
        for s in range(1, 4):  # three frames, nobody asks: no downlink
            ns.up(frame(EPOCH, [(1, s, mod.record(s))]))
        assert cs.wait_idle(10)
        assert ns.downlinks(1.0) == []
        ns.up(frame(EPOCH, [(1, 4, mod.record(4))], ask=True))  # asks: one downlink
        assert cs.wait_idle(10)
        got = ns.downlinks(2.0)
        assert len(got) == 1, got
        topic, body = got[0]
        assert topic == "application/%s/device/%s/command/down" % (APP, EUI)
        assert body["devEui"] == EUI and body["fPort"] == 10 and body["confirmed"] is False
        ack = base64.b64decode(body["data"])
        assert ack_epoch(ack) == EPOCH
        assert open_ack(mod, ack)[:2] == [EPOCH, 4]  # the latest cumulative ack: 0..4
        # the acks of frames 0-3 were replaced, never sent (fewer than 3 replacements when
        # the Partial IV rule deferred one to the next tick: then it never existed)
        assert cs.stats["coalesced"] >= 1
        # Two more asks spend the budget (3 a day); the fourth is refused and kept pending.
        for s in range(5, 8):
            ns.up(frame(EPOCH, [(1, s, mod.record(s))], ask=True))
            assert cs.wait_idle(10)
            time.sleep(0.05)
        got = ns.downlinks(2.0)
        assert len(got) == 2, got
        assert cs.used(DEV) == 3 and cs.stats["over_budget"] >= 1
    finally:
        cs.stop()
    # A restart keeps the day's budget: still nothing to send.
    cs = intake(home, brk, downlinks_per_day=3, ack_after=1000)
    try:
        ns.up(frame(EPOCH, [(1, 8, mod.record(8))], ask=True))
        assert cs.wait_idle(10)
        assert ns.downlinks(1.5) == [] and cs.used(DEV) == 3
    finally:
        cs.stop()
        ns.close()
    st = Store(db_path(home))
    try:
        assert st.seqs(DEV, EPOCH) == list(range(9))  # each object stored once
        led = st.device_ledger(DEV)
        assert led["duplicates"] == 0 and led["missing"] == 0
    finally:
        st.close()


def test_enough_pending_and_refusals_counted(chain):
    home, brk = chain
    mod = FakeModule(home, DEV)
    ns = NetServer(brk)
    cs = intake(home, brk, ack_after=4)
    try:
        ns.up(frame(EPOCH, [(0, 0, mod.new_epoch(by_value=True))]))
        ns.up(frame(EPOCH, [(1, 1, mod.record(1)), (1, 2, mod.record(2))]))
        assert cs.wait_idle(10)
        assert ns.downlinks(1.0) == []
        ns.up(frame(EPOCH, [(1, 3, mod.record(3))]))  # 4 entries since the last ack
        assert cs.wait_idle(10)
        got = ns.downlinks(2.0)
        assert len(got) == 1
        assert open_ack(mod, base64.b64decode(got[0][1]["data"]))[:2] == [EPOCH, 3]
        # Untrusted events: an unknown devEui, another FPort, no data, not JSON.
        ns.up(frame(EPOCH, [(1, 9, b"x")]), eui="0004a30b001c0aff")
        ns.up(frame(EPOCH, [(1, 4, mod.record(4))]), port=11)
        ns.up(b"", port=10)
        ns.c.publish("application/%s/device/%s/event/up" % (APP, EUI), b"{not json",
                     qos=1).wait_for_publish(5)
        time.sleep(0.3)
        assert cs.wait_idle(10)
        assert cs.refused == {"lorawan unknown devEui": 1, "lorawan fport": 2,
                              "lorawan bad event": 1}, cs.refused
    finally:
        cs.stop()
        ns.close()
    st = Store(db_path(home))
    try:
        led = st.device_ledger(DEV)
        assert led["rejects"].get("lorawan fport") == 2
        assert led["rejects"].get("lorawan bad event") == 1
        assert st.device_ledger("?")["rejects"].get("lorawan unknown devEui") == 1
        assert st.seqs(DEV, EPOCH) == [0, 1, 2, 3]
    finally:
        st.close()


def test_serene_server_lorawan_starts_the_intake(tmp_path):
    from test_server_e2e import serene

    home = tmp_path / "home"
    provision_fake(home, [DEV])
    res = serene("server", "--home", str(home), "--lorawan", "--duration", "2")
    assert "LoRaWAN intake (ChirpStack integration) as serene-chirpstack-8" in res.stdout, \
        res.stdout + res.stderr
    assert "LoRaWAN: 0 uplinks processed, 0 downlinks" in res.stdout
