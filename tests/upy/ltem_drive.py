# MicroPython driver for the LTE-M radio tests (tests/test_ltem.py) and nothing else.
#
#   micropython ltem_drive.py CONFIG.json
#
# Runs drivers/radio/ltem.py's LtemRadio with CONFIG (constructor keywords, plus "tls_pin_file"
# and "tick_ms"), a ticker task that proves the loop keeps running (it records the longest gap
# between its ticks), and reads commands on stdin, one a line:
#   send ID HEX      -> "SENT ID" | "FAIL ID <reason>"
#   recv TIMEOUT_MS  -> "RECV HEX" | "RECV none"
#   pid N            -> "PID N" (sets umqtt's last packet id: the wrap-around test)
#   stats            -> "STATS <json>"
#   quit             -> "STATS <json>", exit
# and prints "STATE up" / "STATE down" on every change of is_up().
import asyncio
import gc
import json
import sys
import time
from binascii import hexlify, unhexlify

from drivers.radio.ltem import LtemError, LtemRadio

ticks = 0
gap_max = 0
gap_max_down = 0  # the longest gap while the radio was down (outage)
ticks_down = 0


async def ticker(radio, period):
    global ticks, gap_max, gap_max_down, ticks_down
    last = time.ticks_ms()
    while True:
        await asyncio.sleep_ms(period)
        now = time.ticks_ms()
        gap = time.ticks_diff(now, last)
        last = now
        ticks += 1
        gap_max = max(gap_max, gap)
        if not radio.is_up():
            ticks_down += 1
            gap_max_down = max(gap_max_down, gap)


async def watch(radio):
    state = None
    while True:
        up = radio.is_up()
        if up != state:
            state = up
            print("STATE", "up" if up else "down")
        await asyncio.sleep_ms(5)


def stats(radio):
    gc.collect()
    d = dict(radio.stats)
    d["mem_alloc"] = gc.mem_alloc()  # the whole process's heap in use: radio, umqtt, asyncio
    d.update(ticks=ticks, gap_max=gap_max, gap_max_down=gap_max_down, ticks_down=ticks_down,
             backoff_ms=radio.backoff_ms)
    return "STATS " + json.dumps(d)


async def main():
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    tick_ms = cfg.pop("tick_ms", 20)
    pin = cfg.pop("tls_pin_file", None)
    if pin:
        with open(pin, "rb") as f:
            cfg["tls_pin"] = f.read()
    args = [cfg.pop(k) for k in ("device_id", "host", "port", "user", "password")]
    radio = LtemRadio(*args, **cfg)
    tasks = [asyncio.create_task(radio.run()), asyncio.create_task(ticker(radio, tick_ms)),
             asyncio.create_task(watch(radio))]
    reader = asyncio.StreamReader(sys.stdin)
    while True:
        line = await reader.readline()
        words = line.decode().split()
        if not words or words[0] == "quit":
            break
        if words[0] == "send":
            try:
                await radio.send(unhexlify(words[2]))
                print("SENT", words[1])
            except LtemError as e:
                print("FAIL", words[1], e.reason)
        elif words[0] == "recv":
            msg = await radio.recv(int(words[1]))
            print("RECV", hexlify(msg).decode() if msg is not None else "none")
        elif words[0] == "pid":  # umqtt's packet id, to test its wrap-around at 65535
            radio._client.pid = int(words[1])
            print("PID", words[1])
        elif words[0] == "stats":
            print(stats(radio))
    for t in tasks:
        t.cancel()
    await asyncio.sleep_ms(10)
    print(stats(radio))


asyncio.run(main())
