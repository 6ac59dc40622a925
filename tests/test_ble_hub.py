"""`serene hub` (serene.hub.relay) against the real Mosquitto and the BLE medium, with the
module's BLE radio on the MicroPython unix port (tests/upy/ble_node.py)."""

import asyncio
import json
import subprocess
import threading
import time

import pytest

from serene import broker as B
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
            "supervision_timeout_ms": 300}
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
