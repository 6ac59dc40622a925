# A module with only its BLE radio, on the unix port, for tests/test_ble_radio.py:
#   micropython ble_node.py '{"port": P, "id": "SRN-0001", "frames": N, "downs": D,
#                             "secure": true, "deadline_s": S, "pair_timeout_ms": T}'
# Sends N frames sized to the MTU of the moment (frame i: i u16 BE, then bytes (i + k) & 0xFF),
# each resent until it is confirmed (as the link layer would); prints one JSON line per event
# (up, sent, send_err, down) and the radio's and the shim's counters at the end.
import asyncio
import json
import sys
import time

from drivers.radio.ble import BleRadio
from drivers.unix import aioble_sim


def out(**kw):
    print(json.dumps(kw))


async def main(cfg):
    aioble_sim.attach("127.0.0.1", cfg["port"])
    radio = BleRadio(aioble_sim, aioble_sim.UUID, cfg["id"], pending=lambda: 7,
                     secure=cfg.get("secure", True),
                     pair_timeout_ms=cfg.get("pair_timeout_ms", 10_000))
    task = asyncio.create_task(radio.run())
    deadline = time.ticks_add(time.ticks_ms(), int(cfg.get("deadline_s", 30) * 1000))
    downs = []

    async def rx():
        while True:
            d = await radio.recv(1000)
            if d is not None:
                downs.append(d)
                out(ev="down", data=d.hex())

    rxt = asyncio.create_task(rx())
    i = 0
    was_up = False
    while time.ticks_diff(deadline, time.ticks_ms()) > 0:
        if i >= cfg["frames"] and len(downs) >= cfg.get("downs", 0):
            break
        up = radio.is_up()
        if up and not was_up:
            out(ev="up", mtu=radio.mtu)
        was_up = up
        if i >= cfg["frames"] or not up:
            await asyncio.sleep_ms(20)
            continue
        n = radio.mtu
        frame = bytearray(n)
        frame[0] = i >> 8
        frame[1] = i & 0xFF
        for k in range(2, n):
            frame[k] = (i + k) & 0xFF
        t0 = time.ticks_ms()
        try:
            await radio.send(frame)
            out(ev="sent", i=i, n=n, ms=time.ticks_diff(time.ticks_ms(), t0),
                toa=radio.time_on_air_ms(n))
            i += 1
        except OSError as e:
            out(ev="send_err", i=i, reason=getattr(e, "reason", str(e)))
            await asyncio.sleep_ms(50)
    rxt.cancel()
    task.cancel()
    await asyncio.sleep_ms(10)
    out(ev="end", sent=i, stats=radio.report(), shim=aioble_sim._m.stats)


asyncio.run(main(json.loads(sys.argv[1])))
