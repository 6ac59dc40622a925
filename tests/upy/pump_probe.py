# MicroPython helper for the host-side pump tests (tests/test_pump_link.py) and the bench:
# the real driver (drivers/pump/fkbase.py) on the simulator's pty, driven line by line.
#
#   micropython pump_probe.py DEVICE [CONFIG_JSON]
# stdin, one command a line; stdout, one JSON object a line:
#   connect | poll | polls N GAP_MS [recover] | log INDEX | events
#   | wait_event KIND TIMEOUT_MS [COUNT] | state | quit
# A background task drains pump.next_event() into a list that `events` returns (and clears),
# so the driver's ring never overflows because of the test.
import asyncio
import gc
import json
import micropython
import sys
import time

from drivers.pump import base
from drivers.pump.fkbase import FKBasePump
from drivers.unix.serial_port import open_serial


def _plain(v):
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _event(ev):
    if ev.kind == base.EV_PUMP:
        return {"kind": "pump", "values": ev.values, "ticks": ev.ticks}
    return {"kind": "link", "cond": base.cond_name(ev.code), "values": _plain(ev.values)}


def _status(s):
    return {
        "rate": s.rate,
        "volume": s.volume,
        "dose": s.dose,
        "remaining": s.remaining,
        "alarms": s.alarms,
        "error": s.error,
        "mode": s.mode,
        "state": s.state,
        "battery": s.battery,
        "power": s.power,
        "flush_rate": s.flush_rate,
        "flush_volume": s.flush_volume,
    }


def _error(e):
    return {"error": base.cond_name(e.kind), "class": type(e).__name__, "detail": _plain(e.detail)}


def out(obj):
    sys.stdout.write(json.dumps(obj))
    sys.stdout.write("\n")


async def main():
    f, stream = open_serial(sys.argv[1])
    config = None
    if len(sys.argv) > 2:
        config = json.loads(sys.argv[2])
        for k in ("poll_ids", "event_ids", "ident_ids", "address"):
            if k in config:
                config[k] = config[k].encode()
    pump = FKBasePump(stream, config=config)
    reader = asyncio.create_task(pump.run())
    events = []

    async def collect():
        while True:
            events.append(_event(await pump.next_event()))

    collector = asyncio.create_task(collect())
    status = base.PumpStatus()
    inp = asyncio.StreamReader(sys.stdin)
    gc.collect()
    out({"ready": True})
    while True:
        line = await inp.readline()
        if not line:
            break
        words = line.decode().split()
        if not words:
            continue
        cmd = words[0]
        try:
            if cmd == "connect":
                ident = await pump.connect()
                out({"ident": [ident.device_type, ident.serial, ident.firmware]})
            elif cmd == "poll":
                t0 = time.ticks_ms()
                await pump.poll(status)
                out({"status": _status(status), "ms": time.ticks_diff(time.ticks_ms(), t0)})
            elif cmd == "polls":
                # streamed: one big JSON string would need more heap than the driver itself
                # polls N GAP_MS [recover]: with `recover`, stop at the first success that
                # follows a failure (the link came back).
                sys.stdout.write('{"polls": [')
                failed = False
                for k in range(int(words[1])):
                    try:
                        await pump.poll(status)
                        r = {"status": _status(status)}
                    except base.PumpError as e:
                        r = _error(e)
                        failed = True
                    sys.stdout.write((", " if k else "") + json.dumps(r))
                    if failed and "status" in r and words[3:] == ["recover"]:
                        break
                    await asyncio.sleep_ms(int(words[2]))
                sys.stdout.write("]}\n")
            elif cmd == "log":
                out({"log": await pump.read_log(int(words[1]))})
            elif cmd == "events":
                sys.stdout.write('{"events": [')
                for k in range(len(events)):
                    sys.stdout.write((", " if k else "") + json.dumps(events[k]))
                sys.stdout.write("]}\n")
                events.clear()
            elif cmd == "wait_event":
                # wait_event KIND TIMEOUT_MS [COUNT]: wait until COUNT (default 1) collected
                # events are of KIND ('pump' or a link condition name); the first one and all
                # of them (not consumed) in the answer.
                deadline = time.ticks_add(time.ticks_ms(), int(words[2]))
                want = int(words[3]) if len(words) > 3 else 1
                t0 = time.ticks_ms()
                while True:
                    kind = words[1]
                    found = [e for e in events if e["kind"] == kind or e.get("cond") == kind]
                    if len(found) >= want or time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                        break
                    await asyncio.sleep_ms(2)
                out(
                    {
                        "event": found[0] if found else None,
                        "found": found,
                        "ms": time.ticks_diff(time.ticks_ms(), t0),
                    }
                )
            elif cmd == "state":
                out(
                    {
                        "counters": pump.counters,
                        "reader_alive": not reader.done(),
                        "mem_peak": micropython.mem_peak(),
                        "mem_current": micropython.mem_current(),
                    }
                )
            elif cmd == "quit":
                break
            else:
                out({"bad_command": cmd})
        except base.PumpError as e:
            out(_error(e))
    collector.cancel()
    pump.close()
    f.close()


asyncio.run(main())
