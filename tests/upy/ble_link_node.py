# A sealing module (tests/upy/sealing_util.Module: real sealing, outbox and ack openers over a
# fake secure element) whose link layer (firmware/link.py) runs over the BLE radio on the
# aioble shim, for tests/test_ble_hub.py:
#   micropython ble_link_node.py '{"port": P, "records": N, "deadline_s": S}'
# Prints, as JSON lines: "keys" (the epoch's ack key and IV: what the server derives from the
# epoch record; printed for the test's stand-in server only), "objects" (every object of the
# log: what the server must end up storing, byte for byte), then "end" with the link's, the
# radio's and the ack openers' counters once the outbox has nothing left unacknowledged (or
# at the deadline).
import asyncio
import binascii
import json
import sys
import time

from drivers.radio.ble import BleRadio
from drivers.unix import aioble_sim
from firmware.link import Cum2Acks, Link
from outbox_util import rmtree, tmpdir
from sealing_util import FakeSE, Module


def out(**kw):
    print(json.dumps(kw))


def hx(b):
    return binascii.hexlify(b).decode()


async def main(cfg):
    d = tmpdir("ble-link")
    try:
        m = Module(d, FakeSE())
        ep = await m.boot()
        for i in range(cfg["records"]):
            await m.record(i)
        key, iv = m.ack_material
        out(ev="keys", epoch=ep.number, key=hx(key), iv=hx(iv))
        out(ev="objects", list=[[k, e, s, hx(b)] for k, e, s, b in m.entries()])
        aioble_sim.attach("127.0.0.1", cfg["port"])
        radio = BleRadio(aioble_sim, aioble_sim.UUID, "SRN-0042", secure=True)
        link = Link(m.outbox, [radio], Cum2Acks(m.acks), window=8, rto_ms=1000)
        tasks = [asyncio.create_task(radio.run()), asyncio.create_task(link.run())]
        deadline = time.ticks_add(time.ticks_ms(), int(cfg.get("deadline_s", 60) * 1000))
        while time.ticks_diff(deadline, time.ticks_ms()) > 0:
            if next(m.outbox.pending(), None) is None:
                break
            await asyncio.sleep_ms(50)
        left = sum(1 for _ in m.outbox.pending())
        for t in tasks:
            t.cancel()
        await asyncio.sleep_ms(10)
        rej = dict(m.acks.counts)
        for a in m.acks.by_epoch.values():
            for k in a.counts:
                rej[k] = rej.get(k, 0) + a.counts[k]
        out(ev="end", left=left, link=link.stats, radio=radio.report(), rejected=rej,
            rejected_total=m.acks.rejected())
    finally:
        rmtree(d)


asyncio.run(main(json.loads(sys.argv[1])))
