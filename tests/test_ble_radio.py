"""The BLE radio (drivers/radio/ble.py) on the real MicroPython unix port, through the aioble
shim (drivers/unix/aioble_sim.py) and the BLE medium (serene.ble.medium); the hub side is
this test, speaking to the medium as a hub's stack would (serene.ble.client).

The module is tests/upy/ble_node.py: it sends frames sized to the MTU, each resent until
confirmed, and prints its events and counters as JSON lines.
"""

import asyncio
import json
import subprocess

import pytest

from serene.ble import gatt
from serene.ble.client import MediumClient
from serene.ble.medium import Medium


def start_node(upy, procs, port, mpy=False, **cfg):
    cfg = dict({"port": port, "id": "SRN-0001", "frames": 3, "deadline_s": 20}, **cfg)
    p = upy.popen(["tests/upy/ble_node.py", json.dumps(cfg)], mpy=mpy, stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT, text=True)
    procs.append(p)
    return p


def node_events(p, timeout=60):
    out = p.communicate(timeout=timeout)[0]
    evs = []
    for line in out.splitlines():
        try:
            evs.append(json.loads(line))
        except ValueError:
            raise AssertionError("node said: %s" % out) from None
    assert evs and evs[-1]["ev"] == "end", out
    return evs


async def find(c, name="SRN-0001", timeout=10):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        for ad in await c.scan():
            if ad["name"] == name:
                return ad
        await asyncio.sleep(0.05)
    raise AssertionError("no advert from %s" % name)


async def attach(c, ad, confirm="auto"):
    """Connect, discover, subscribe, wait for encryption, announce: what serene.hub does."""
    conn = await c.connect(ad["addr"], confirm=confirm)
    d = await c.discover(conn)
    h = {ch["uuid"]: ch for ch in d["chars"]}
    up, down = h[str(gatt.UPLINK)]["handle"], h[str(gatt.DOWNLINK)]["handle"]
    assert await c.subscribe(conn, up) == 0
    for _ in range(200):
        st = await c.write(conn, down, b"")
        if st == 0:
            break
        assert st == gatt.ATT_INSUFFICIENT_ENCRYPTION
        await asyncio.sleep(0.05)
    assert st == 0
    return conn, d, h


async def indications(c, n, timeout=10):
    got = []
    while len(got) < n:
        ev = await asyncio.wait_for(c.events.get(), timeout)
        if ev["ev"] == "indication":
            got.append(bytes.fromhex(ev["data"]))
    return got


def check_frame(f):
    i = (f[0] << 8) | f[1]
    assert all(f[k] == (i + k) & 0xFF for k in range(2, len(f))), f
    return i


def test_advertising_gatt_table_mtu_indications_and_downlink(upy, procs):
    async def hub(m):
        c = await MediumClient.open(m.port)
        ad = await find(c)
        # Advertising names the module and carries the 128-bit service UUID.
        assert ad["services"] == [gatt.SERVICE]
        conn, d, h = await attach(c, ad)
        assert d["service"] == str(gatt.SERVICE)
        # Exactly three characteristics; only the downlink is writable (encrypted link);
        # the uplink only indicates; the status is read-only (encrypted link).
        assert sorted(h) == sorted(str(u) for u in (gatt.UPLINK, gatt.DOWNLINK, gatt.STATUS))
        assert h[str(gatt.UPLINK)]["flags"] == gatt.F_INDICATE
        assert h[str(gatt.DOWNLINK)]["flags"] == gatt.F_WRITE | gatt.F_WRITE_ENCRYPTED
        assert h[str(gatt.STATUS)]["flags"] == gatt.F_READ | gatt.F_READ_ENCRYPTED
        writable = [ch for ch in d["chars"] if ch["flags"] & gatt.F_WRITABLE]
        assert [ch["uuid"] for ch in writable] == [str(gatt.DOWNLINK)]
        for u in (gatt.UPLINK, gatt.STATUS):
            assert await c.write(conn, h[str(u)]["handle"], b"\x01") == \
                gatt.ATT_WRITE_NOT_PERMITTED
        assert await c.write(conn, 0x7F, b"\x01") == gatt.ATT_INVALID_HANDLE
        # Frames sized to the negotiated MTU (247 - 3), confirmed one at a time.
        frames = await indications(c, 3)
        assert [len(f) for f in frames] == [244] * 3
        assert [check_frame(f) for f in frames] == [0, 1, 2]
        status, data = await c.read(conn, h[str(gatt.STATUS)]["handle"])
        assert status == 0
        st = gatt.parse_status(data)
        assert st["device_id"] == "SRN-0001" and st["pending"] == 7
        # Downlinks: each write's bytes, verbatim, and nothing else; oversize dropped.
        down = h[str(gatt.DOWNLINK)]["handle"]
        assert await c.write(conn, down, bytes(245)) == gatt.ATT_INVALID_ATTRIBUTE_LENGTH
        assert await c.write(conn, down, b"\xa1\x02ack") == 0
        assert await c.write(conn, down, bytes(81)) == 0  # over the 80-byte bound
        assert await c.write(conn, down, bytes(200)) == 0  # cut to 81 by the stack: oversize
        # The last one: the module ends once it has it (its connection goes with it).
        assert await c.write(conn, down, bytes(range(80))) in (0, -1)
        await asyncio.sleep(0.3)
        s = await c.stats()
        await c.close()
        return s

    with Medium() as m:
        p = start_node(upy, procs, m.port, frames=3, downs=2)
        s = asyncio.run(hub(m))
        evs = node_events(p)
    sent = [e for e in evs if e["ev"] == "sent"]
    assert [(e["i"], e["n"]) for e in sent] == [(0, 244), (1, 244), (2, 244)]
    # 244 bytes + 7 = 251: 10 LL fragments of 27, 3 events at 4 a event, + 1 confirmation.
    assert all(e["toa"] == 4 * 30 for e in sent)
    assert all(e["ms"] >= 4 * 30 - 5 for e in sent), sent  # the medium's real latency
    downs = [bytes.fromhex(e["data"]) for e in evs if e["ev"] == "down"]
    assert downs == [b"\xa1\x02ack", bytes(range(80))]
    st = evs[-1]["stats"]
    assert st["downlinks_oversize"] == 2 and st["downlinks"] == 2
    assert st["mtu"] == 247 and st["pairings"] == 1
    assert s["indications"] == s["indications_confirmed"] == 3
    assert s["malformed"] == 0 and s["mtu_exchanges"] == 1 and s["pairings"] == 1


def test_one_indication_outstanding_and_timeout_closes(upy, procs):
    """A hub that confirms late: the next indication waits for the confirmation; a hub
    that never confirms: send() raises "timeout", the module drops the connection,
    re-advertises, and the frame is resent whole on the next connection."""

    async def hub(m):
        c = await MediumClient.open(m.port)
        ad = await find(c)
        conn, _, _ = await attach(c, ad, confirm="manual")
        (f0,) = await indications(c, 1)
        with pytest.raises(asyncio.TimeoutError):  # nothing while unconfirmed
            await indications(c, 1, timeout=0.8)
        assert await c.confirm(conn)
        (f1,) = await indications(c, 1)
        # Never confirm f1: the module gives up after its 2 s deadline and disconnects.
        ev = await asyncio.wait_for(c.events.get(), 5)
        assert ev["ev"] == "disconnected"
        ad = await find(c)
        conn, _, _ = await attach(c, ad)
        rest = await indications(c, 2)
        await asyncio.sleep(0.3)  # the last confirmation reaches the module
        await c.close()
        return [check_frame(f) for f in [f0, f1] + rest]

    with Medium() as m:
        p = start_node(upy, procs, m.port, frames=3)
        order = asyncio.run(hub(m))
        evs = node_events(p)
    assert order == [0, 1, 1, 2]  # frame 1 again, whole: the link layer's retransmission
    errs = [e for e in evs if e["ev"] == "send_err"]
    assert [(e["i"], e["reason"]) for e in errs] == [(1, "timeout")]
    st = evs[-1]["stats"]
    assert st["timeouts"] == 1 and st["connections"] == 2


def test_mtu_before_exchange_and_out_of_range_schedule(upy, procs):
    """A hub limited to ATT_MTU 23 gets 20-byte frames; the module leaving range mid-run
    ends the connection by supervision timeout, and the hub gets every frame once it is
    back (a frame in flight at the cut is resent)."""

    async def hub(m):
        c = await MediumClient.open(m.port)
        seen = {}
        while len(seen) < 30:
            try:
                ad = await find(c, timeout=15)
                conn = await c.connect(ad["addr"], mtu=23)
                d = await c.discover(conn)
                h = {ch["uuid"]: ch["handle"] for ch in d["chars"]}
                await c.subscribe(conn, h[str(gatt.UPLINK)])
                while await c.write(conn, h[str(gatt.DOWNLINK)], b"") != 0:
                    await asyncio.sleep(0.05)
            except Exception:  # noqa: BLE001  out of range while attaching: try again
                await asyncio.sleep(0.1)
                continue
            while True:
                ev = await asyncio.wait_for(c.events.get(), 10)
                if ev["ev"] == "disconnected":
                    break
                if ev["ev"] == "indication":
                    f = bytes.fromhex(ev["data"])
                    assert len(f) == 20
                    seen.setdefault(check_frame(f), 0)
                    seen[check_frame(f)] += 1
                    if len(seen) == 30:
                        break
        await asyncio.sleep(0.3)  # the last confirmation reaches the module
        s = await c.stats()
        await c.close()
        return seen, s

    scen = {"modules": {"SRN-0001": {"out_of_range": [[1.0, 2.5]]}},
            "supervision_timeout_ms": 400, "t0": "first_connection"}
    with Medium(scen) as m:
        p = start_node(upy, procs, m.port, frames=30, deadline_s=40, secure=False)
        seen, s = asyncio.run(hub(m))
        evs = node_events(p)
    assert sorted(seen) == list(range(30))
    assert s["supervision_timeouts"] == 1 and s["connects"] >= 2
    sent = [e for e in evs if e["ev"] == "sent"]
    assert {e["n"] for e in sent} == {20}
    assert [e["i"] for e in sent] == list(range(30))


def test_heap_of_the_driver_from_mpy(upy, mpy_dir):
    code = (
        "import gc\n"
        "import asyncio, socket, struct\n"
        "gc.collect(); a = gc.mem_alloc()\n"
        "from drivers.unix import aioble_sim\n"
        "import drivers.radio.base\n"
        "gc.collect(); b = gc.mem_alloc()\n"
        "from drivers.radio.ble import BleRadio\n"
        "gc.collect(); c = gc.mem_alloc()\n"
        "r = BleRadio(aioble_sim, aioble_sim.UUID, 'SRN-0001')\n"
        "gc.collect(); d = gc.mem_alloc()\n"
        "print(b - a, c - b, d - c)\n"
    )
    res = upy.run(["-c", code], mpy=True, heap="128K")
    shim_base, module, obj = res.stdout.split()
    print("BLE heap from .mpy (64-bit unix port, after gc.collect): shim + radio/base %s, "
          "drivers/radio/ble.mpy %s, radio object %s bytes" % (shim_base, module, obj))
    # The 64-bit unix port keeps .mpy bytecode in the heap (a board runs it from flash when
    # frozen); the radio object itself (its GATT objects, the status buffer, 4 x 80-byte
    # downlink slots, counters) is the working heap.
    assert int(obj) < 6_000
    assert int(module) < 10_000


@pytest.mark.parametrize("ll, ppe, ci", [(27, 4, 30), (251, 2, 15), (27, 1, 50)])
def test_driver_time_on_air_agrees_with_the_host_formula(upy, ll, ppe, ci):
    # drivers/radio/ble.py and serene.ble.gatt were written apart: each checks the other.
    code = (
        "from drivers.radio.ble import BleRadio\n"
        "class A:\n"
        "    class Service:\n"
        "        def __init__(self, u): self.characteristics = []\n"
        "    class Characteristic:\n"
        "        def __init__(self, s, u, **kw): self.flags = 0\n"
        "    BufferedCharacteristic = Characteristic\n"
        "r = BleRadio(A, str, 'SRN-0001', ll_payload=%d, pkts_per_event=%d, "
        "conn_interval_ms=%d)\n"
        "print(' '.join('%%d:%%d' %% (r.time_on_air_ms(n), r.air_us(n)) for n in range(1, 245)))\n"
        % (ll, ppe, ci))
    got = upy.run(["-c", code]).stdout.split()
    want = ["%d:%d" % (gatt.indication_events(n, ll, ppe) * ci, gatt.air_us(n, ll, True))
            for n in range(1, 245)]
    assert got == want


def test_scenario_files_are_validated(tmp_path):
    from serene.ble import medium as M

    f = tmp_path / "sc.json"
    f.write_text(json.dumps({"conn_interval_ms": 45, "modules": {
        "SRN-0001": {"out_of_range": [[60, 90], [150, 180]]}}}))
    sc = M.load_scenario(f)
    assert sc["conn_interval_ms"] == 45 and sc["pkts_per_event"] == 4
    for bad, key in (({"conn_interval_ms": 5}, "conn_interval_ms"),
                     ({"ll_payload": 300}, "ll_payload"), ({"loss": 0.1}, "loss"),
                     ({"modules": {"A": {"out_of_range": [[5, 2]]}}}, "modules.A.out_of_range"),
                     ({"modules": {"A": {"exec": "x"}}}, "modules.A"),
                     ({"pairing": "maybe"}, "pairing")):
        with pytest.raises(M.ScenarioError) as e:
            M.check_scenario(bad)
        assert e.value.key == key
    f.write_text("{not json")
    with pytest.raises(M.ScenarioError):
        M.load_scenario(f)


def test_no_encryption_no_downlink_no_status_no_uplink(upy, procs):
    """A hub whose stack refuses pairing: the downlink and the status stay closed (ATT 0x0F),
    the module never counts the hub as up, sends nothing, and drops the connection when its
    pairing times out."""

    async def hub(m):
        c = await MediumClient.open(m.port)
        ad = await find(c)
        conn = await c.connect(ad["addr"])
        d = await c.discover(conn)
        h = {ch["uuid"]: ch["handle"] for ch in d["chars"]}
        assert await c.subscribe(conn, h[str(gatt.UPLINK)]) == 0
        assert await c.write(conn, h[str(gatt.DOWNLINK)], b"") == \
            gatt.ATT_INSUFFICIENT_ENCRYPTION
        assert await c.write(conn, h[str(gatt.DOWNLINK)], b"\x01ack") == \
            gatt.ATT_INSUFFICIENT_ENCRYPTION
        assert (await c.read(conn, h[str(gatt.STATUS)]))[0] == gatt.ATT_INSUFFICIENT_ENCRYPTION
        while True:  # the module's pairing gives up: it disconnects
            ev = await asyncio.wait_for(c.events.get(), 5)
            assert ev["ev"] in ("mtu", "disconnected"), ev
            if ev["ev"] == "disconnected":
                break
        s = await c.stats()
        await c.close()
        return s

    with Medium({"pairing": "none"}) as m:
        p = start_node(upy, procs, m.port, frames=1, deadline_s=4, pair_timeout_ms=1500)
        s = asyncio.run(hub(m))
        evs = node_events(p)
    assert not [e for e in evs if e["ev"] in ("up", "sent", "down")]
    st = evs[-1]["stats"]
    assert st["pair_failures"] >= 1 and st["pairings"] == 0 and st["downlinks"] == 0
    assert s["indications"] == 0 and s["pairings_refused"] >= 1 and s["writes"] == 0
