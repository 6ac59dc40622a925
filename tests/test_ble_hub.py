"""`serene hub` (serene.hub.relay) against the real Mosquitto and the BLE medium, with the
module's BLE radio on the MicroPython unix port (tests/upy/ble_node.py)."""

import asyncio
import json
import subprocess
import threading
import time

import pytest

from serene import broker as B
from serene import upy as upy_mod
from serene.ble.medium import Medium
from serene.hub.backends import SimBackend
from serene.hub.relay import Hub

from test_ble_radio import check_frame, node_events, start_node


@pytest.fixture
def brk(tmp_path):
    with B.Broker(tmp_path, ["SRN-0001", "SRN-0002"], hubs={"hub-1": ["SRN-0001"]}) as b:
        yield b


class HubThread:
    def __init__(self, hub):
        self.hub = hub
        self.loop = asyncio.new_event_loop()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        self.task = self.loop.create_task(self.hub.run())
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass

    def stop(self):
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.t.join(10)


def server_probe(brk):
    s = brk.server_credentials()
    p = B.Probe(brk.server_port, s["username"], s["password"])
    assert p.subscribe("serene/+/up") == 1
    return p


def test_hub_relays_up_and_down_through_mosquitto_with_range_outages(brk, upy, procs):
    srv = server_probe(brk)
    creds = brk.hub_credentials("hub-1")
    scen = {"modules": {"SRN-0001": {"out_of_range": [[2.0, 3.0], [4.5, 5.5]]}},
            "supervision_timeout_ms": 300, "t0": "first_connection"}
    with Medium(scen) as m:
        hub = Hub(SimBackend(m.port), {"port": brk.port, "username": creds["username"],
                                       "password": creds["password"]}, ["SRN-0001"])
        ht = HubThread(hub)
        try:
            p = start_node(upy, procs, m.port, frames=60, downs=1, deadline_s=40)
            seen = {}
            end = time.time() + 40
            while len(seen) < 60 and time.time() < end:
                got = srv.get(timeout=1)
                if got is None:
                    continue
                topic, payload = got
                assert topic == "serene/SRN-0001/up"
                i = check_frame(payload)
                seen[i] = seen.get(i, 0) + 1
            # The downlink, published by the server, written to the module by the hub.
            srv.publish("serene/SRN-0001/down", b"\x07sealed-ack")
            evs = node_events(p, timeout=60)
            ms = m.snapshot()
        finally:
            ht.stop()
            srv.close()
    assert sorted(seen) == list(range(60))
    downs = [bytes.fromhex(e["data"]) for e in evs if e["ev"] == "down"]
    assert downs == [b"\x07sealed-ack"]
    assert ms["supervision_timeouts"] == 2 and ms["connects"] >= 3
    assert hub.stats["published"] >= 60 and hub.stats["connections"] >= 3


def test_hub_account_reaches_only_its_modules_topics(brk):
    creds = brk.hub_credentials("hub-1")
    srv = server_probe(brk)
    hub = B.Probe(brk.port, creds["username"], creds["password"])
    try:
        # Not served: the uplink of SRN-0002 and the hub's own topic. Served: SRN-0001.
        hub.publish("serene/SRN-0002/up", b"forged")
        hub.publish("serene/hub-1/up", b"own")
        hub.publish("serene/SRN-0001/up", b"barrier")
        got = srv.get(timeout=5)
        assert got == ("serene/SRN-0001/up", b"barrier")
        assert srv.get(timeout=0.5) is None
        # It reads the downlinks of its modules only (Mosquitto grants a SUBSCRIBE and
        # checks the read ACL at delivery: the barrier proves the other was withheld).
        hub.subscribe("serene/SRN-0002/down")
        hub.subscribe("serene/SRN-0001/down")
        srv.publish("serene/SRN-0002/down", b"other")
        srv.publish("serene/SRN-0001/down", b"barrier")
        assert hub.get(timeout=5) == ("serene/SRN-0001/down", b"barrier")
        assert hub.get(timeout=0.5) is None
    finally:
        hub.close()
        srv.close()
    # A hub account is not a device account: the server does not subscribe its topics.
    assert "hub-1" not in B.device_ids(brk.home)


class StandInServer:
    """The medical server's part that matters here, over the real broker: reassembles the
    link frames (serene.linkframe), accepts an object only if it is byte for byte the
    module's own (standing in for the ingest's seal verification, which needs the record
    keys), stores each once, and answers every frame with a real sealed ack (COSE_Encrypt0
    under the epoch's ack key: serene.verifier.protocol.seal, the server's own code)."""

    def __init__(self, brk, dev, objects, epoch, key, iv):
        from serene import linkframe as lf
        from serene.verifier import protocol as P

        self.lf, self.P = lf, P
        self.dev = dev
        self.want = {(e, s): bytes.fromhex(h) for _k, e, s, h in objects}
        self.epoch, self.key, self.iv = epoch, key, iv
        self.r = lf.Reassembler()
        self.stored = {}
        self.copies = 0
        self.refused = 0  # objects or frames that were not the module's: altered by the hub
        self.acks = 0
        self.piv = 0
        self.probe = server_probe(brk)

    def step(self, timeout=0.5):
        got = self.probe.get(timeout=timeout)
        if got is None:
            return
        _topic, frame = got
        try:
            fr = self.lf.parse(frame)
        except self.lf.LinkFrameError:
            self.refused += 1
            return
        for e in fr.entries:
            key = (fr.epoch, e.seq)
            if key in self.r.done:
                self.copies += 1  # a retransmission or a duplicate: stored once already
                continue
            try:
                data = self.r.feed(fr.epoch, e)
            except self.lf.LinkFrameError:
                self.r.partial.pop(key, None)  # a forged fragment: start this object again
                self.refused += 1
                continue
            if data is None:
                continue
            if self.want.get(key) != data:
                self.r.done.discard(key)  # not the module's: a genuine copy may still come
                self.refused += 1
                continue
            self.stored[key] = data
        seqs = [s for (e, s) in self.stored if e == self.epoch]
        if 0 not in seqs:
            return  # no ack before the epoch record (docs/link-format.md)
        cum, bitmap = self.P.ack_from_seqs(seqs)
        self.piv += 1
        ack = self.P.seal(self.P.ack_plaintext(self.epoch, cum, bitmap), self.piv, self.key,
                          self.iv, self.dev.encode(), self.epoch)
        self.probe.publish("serene/%s/down" % self.dev, ack)
        self.acks += 1


def test_hostile_hub_no_loss_no_forgery_with_link_and_sealed_acks(tmp_path, upy, procs):
    """The firmware's Link + outbox + sealed acks over BLE through a hub that drops,
    reorders, duplicates, delays and alters frames both ways: every object stored, exactly the
    module's bytes, and every altered ack refused by the module's ack opener."""
    dev = "SRN-0042"
    hostile = {"drop": 0.15, "dup": 0.15, "reorder": 0.15, "alter": 0.15, "delay_ms": 40}
    with B.Broker(tmp_path, [dev], hubs={"hub-1": [dev]}) as brk, Medium() as m:
        creds = brk.hub_credentials("hub-1")
        hub = Hub(SimBackend(m.port), {"port": brk.port, "username": creds["username"],
                                       "password": creds["password"]}, [dev],
                  hostile=hostile, seed=7)
        p = upy.popen(["tests/upy/ble_link_node.py",
                       json.dumps({"port": m.port, "records": 80, "deadline_s": 90})],
                      extra_paths=[upy_mod.REPO / "tests" / "upy"], stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        lines = []
        for line in p.stdout:  # "keys" and "objects" come before the radio starts
            lines.append(line)
            if line.startswith('{"') and '"objects"' in line:
                break
        info = {}
        for line in lines:
            if not line.startswith("{"):
                continue  # the firmware's own log lines
            try:
                ev = json.loads(line)
            except ValueError:
                raise AssertionError("node said: %s" % "".join(lines)) from None
            info[ev["ev"]] = ev
        k = info["keys"]
        srv = StandInServer(brk, dev, info["objects"]["list"], k["epoch"],
                            bytes.fromhex(k["key"]), bytes.fromhex(k["iv"]))
        ht = HubThread(hub)
        try:
            end = time.time() + 100
            while p.poll() is None and time.time() < end:
                srv.step()
            rest = p.communicate(timeout=30)[0]
        finally:
            ht.stop()
            srv.probe.close()
    evs = [json.loads(x) for x in rest.splitlines() if x.startswith("{")]
    assert evs and evs[-1]["ev"] == "end", rest
    fin = evs[-1]
    want = srv.want
    print("hostile hub:", dict(hub.stats), "server: stored %d refused %d copies %d acks %d"
          % (len(srv.stored), srv.refused, srv.copies, srv.acks), "module:", fin["link"],
          fin["rejected"])
    assert fin["left"] == 0, fin  # every object acknowledged by a genuine ack
    assert srv.stored == want  # every object stored, byte for byte, none other
    hs = hub.stats
    # The hub did misbehave in every way, both directions.
    for what in ("hostile_dropped", "hostile_duplicated", "hostile_reordered",
                 "hostile_altered"):
        assert hs[what] > 0, hs
    assert srv.refused > 0  # altered uplinks reached the server and were refused
    # Altered acks reached the module and its ack opener refused them; none was accepted
    # that the server had not sealed (the outbox would hold a hole or the server a gap).
    assert fin["rejected"]["forged"] + fin["rejected"].get("bad header", 0) \
        + fin["rejected"].get("truncated", 0) > 0, fin
    assert fin["link"]["acks"] <= srv.acks
    assert fin["link"]["retransmissions"] > 0


def test_hub_buffers_bounded_while_its_internet_is_down():
    class FakeInfo:
        rc = 0

    class FakeMqtt:
        def __init__(self):
            self.sent = []

        def publish(self, topic, payload, qos):
            self.sent.append((topic, payload, qos))
            return FakeInfo()

    async def go():
        hub = Hub(None, {}, ["SRN-0001"], buffer_max=5)
        hub._loop = asyncio.get_running_loop()
        hub._mq = FakeMqtt()
        for i in range(8):  # the broker unreachable: _mq_up is clear
            await hub._uplink("SRN-0001", bytes([i]))
        assert hub._mq.sent == []
        assert [d for _, d in hub.buffer] == [bytes([i]) for i in range(3, 8)]
        assert hub.stats["buffer_dropped"] == 3 and hub.stats["buffered"] == 5
        hub._mq_up.set()  # back: everything buffered goes, in order, QoS 1
        hub._flush()
        assert hub._mq.sent == [("serene/SRN-0001/up", bytes([i]), 1) for i in range(3, 8)]
        assert not hub.buffer and hub.stats["published"] == 5 and hub.stats["buffered"] == 0

    asyncio.run(go())


def test_serene_hub_command(brk, upy, procs, tmp_path):
    import os
    import signal
    import sys

    creds = brk.hub_credentials("hub-1")
    pw = tmp_path / "hub.pw"
    pw.write_text(creds["password"] + "\n")
    os.chmod(pw, 0o600)
    srv = server_probe(brk)
    with Medium() as m:
        hub = subprocess.Popen(
            [sys.executable, "-m", "serene", "hub", "--medium", str(m.port), "--broker-port",
             str(brk.port), "--user", "hub-1", "--password-file", str(pw), "SRN-0001"],
            cwd=upy_mod.REPO / "tools", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        procs.append(hub)
        try:
            p = start_node(upy, procs, m.port, frames=5)
            got = [srv.get(timeout=15) for _ in range(5)]
            node_events(p)
        finally:
            hub.send_signal(signal.SIGINT)
            out = hub.communicate(timeout=15)[0]
            srv.close()
    assert [check_frame(g[1]) for g in got if g] == [0, 1, 2, 3, 4], out
    assert "serene hub: " in out and "'published': 5" in out, out


def test_hub_connects_only_to_the_modules_it_serves(brk, upy, procs):
    srv = server_probe(brk)
    creds = brk.hub_credentials("hub-1")
    with Medium() as m:
        hub = Hub(SimBackend(m.port), {"port": brk.port, "username": creds["username"],
                                       "password": creds["password"]}, ["SRN-0001"])
        ht = HubThread(hub)
        try:
            other = start_node(upy, procs, m.port, id="SRN-0002", frames=1, deadline_s=5)
            mine = start_node(upy, procs, m.port, frames=3)
            got = [srv.get(timeout=15) for _ in range(3)]
            ev_mine = node_events(mine)
            ev_other = node_events(other)
            ms = m.snapshot()
        finally:
            ht.stop()
            srv.close()
    assert [g[0] for g in got] == ["serene/SRN-0001/up"] * 3
    assert ev_mine[-1]["sent"] == 3
    assert ev_other[-1]["stats"]["connections"] == 0 and ev_other[-1]["sent"] == 0
    assert ms["connects"] == 1
