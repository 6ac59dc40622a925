"""Bench: the pump driver's heap while polling, on the unix port with the board's .mpy build.

    .venv/bin/python tests/bench/bench_pump_heap.py [--polls N] [--heap 64K]

Runs the simulator (normal-feed) on a pty and, in a micropython process with a board-sized heap,
the driver compiled by mpy-cross: connect, then N polls (and one spontaneous alarm event).
Reports, from inside MicroPython:
  driver_code     heap taken by importing base + fkbase (.mpy bytecode and tables; on a board
                  with the driver frozen into flash most of it is not in RAM)
  driver_objects  heap taken by one FKBasePump after connect() (buffers, frames, ring, dicts)
  resident   gc.mem_alloc() after gc.collect(), before and after the polls (the driver's
             objects stay; the growth is this bench's own result lists)
  per poll   bytes allocated by one poll (gc.mem_alloc() delta, no collection in between)
  peak_live_bound  resident + the largest per-poll allocation: the most live heap a poll
             can need (what a GC can never free while it runs)
  mem_peak   micropython.mem_peak() (the unix port's malloc counter: counts every allocation
             since start and never subtracts what the GC frees, so it over-states)
and, by bisection over -X heapsize, the smallest heap in which connect + the polls succeed.
Timing (poll round trip, ENQ->DC4) comes from the same run.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from serene import upy  # noqa: E402
from serene.pumpsim import PumpSimulator  # noqa: E402

SCRIPT = r"""
import asyncio, gc, json, micropython, sys, time
from drivers.unix.serial_port import open_serial
gc.collect()
_before_import = gc.mem_alloc()
from drivers.pump import base
from drivers.pump.fkbase import FKBasePump
gc.collect()
_import_cost = gc.mem_alloc() - _before_import

async def main():
    f, stream = open_serial(sys.argv[1])
    n = int(sys.argv[2])
    gc.collect()
    before_driver = gc.mem_alloc()
    pump = FKBasePump(stream)
    task = asyncio.create_task(pump.run())
    await pump.connect()
    st = base.PumpStatus()
    await pump.poll(st)
    gc.collect()
    resident0 = gc.mem_alloc()
    per_poll = []
    rtt = []
    events = 0
    for i in range(n):
        a0 = gc.mem_alloc()
        t0 = time.ticks_us()
        await pump.poll(st)
        rtt.append(time.ticks_diff(time.ticks_us(), t0))
        a1 = gc.mem_alloc()
        if a1 >= a0:
            per_poll.append(a1 - a0)
        if i == n // 2:
            sys.stdout.write("ALARM\n")  # the host makes the pump raise an alarm now
        if pump.event_nowait() is not None:
            events += 1
        await asyncio.sleep_ms(5)
    if len(sys.argv) > 3:
        await asyncio.sleep_ms(3500)  # idle line: the pump sends ENQ, the reader answers DC4
    gc.collect()
    resident1 = gc.mem_alloc()
    while pump.event_nowait() is not None:
        events += 1
    pump.close()
    per_poll.sort()
    rtt.sort()
    print(json.dumps({
        "driver_code": _import_cost,
        "driver_objects": resident0 - before_driver,
        "resident_before": resident0,
        "resident_after": resident1,
        "per_poll_median": per_poll[len(per_poll) // 2],
        "per_poll_max": per_poll[-1],
        "peak_live_bound": resident0 + per_poll[-1],
        "mem_peak": micropython.mem_peak(),
        "heap_total": gc.mem_alloc() + gc.mem_free(),
        "rtt_us_median": rtt[len(rtt) // 2],
        "rtt_us_max": rtt[-1],
        "polls": n,
        "events": events,
        "counters_nonzero": dict((k, v) for k, v in pump.counters.items() if v),
        "volume": st.volume,
    }))

asyncio.run(main())
"""


def run_once(code_dir, script, heap, polls, idle=False):
    sim = PumpSimulator("normal-feed", speed=1.0).start()
    try:
        p = upy.popen(
            [str(script), sim.device_path, str(polls)] + (["idle"] if idle else []),
            heap=heap,
            code_dir=code_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        out = []
        for line in p.stdout:
            if line.strip() == "ALARM":
                sim.act({"do": "alarm", "bits": 1})
            out.append(line)
        p.wait(60)
        snap = sim.snapshot()
    finally:
        sim.stop()
    last = out[-1] if out else ""
    if p.returncode != 0 or not last.startswith("{"):
        return None, "".join(out)[-400:], snap
    return json.loads(last), "", snap


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--polls", type=int, default=200)
    ap.add_argument("--heap", default="64K")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        code_dir = upy.compile_tree(pathlib.Path(tmp) / "mpy")
        script = pathlib.Path(tmp) / "bench_pump.py"
        script.write_text(SCRIPT)
        res, err, snap = run_once(code_dir, script, args.heap, args.polls, idle=True)
        if res is None:
            print("run failed:\n" + err)
            return 1
        lat = snap["stats"]["dc4_latency_ms"]
        res["dc4_latency_ms_max"] = round(max(lat), 2) if lat else None
        res["volume_model_end"] = snap["volume"]
        # smallest heap (KB) in which connect + a shorter run of polls works
        lo, hi = 8, int(args.heap.rstrip("K"))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ok, _, _ = run_once(code_dir, script, "%dK" % mid, 20)
            if ok is None:
                lo = mid
            else:
                hi = mid
        res["min_heap_kb_connect_20_polls"] = hi
    print("pump driver heap (unix port, .mpy, -X heapsize=%s, %d polls)" % (args.heap, args.polls))
    for k in (
        "driver_code",
        "driver_objects",
        "resident_before",
        "resident_after",
        "per_poll_median",
        "per_poll_max",
        "peak_live_bound",
        "mem_peak",
        "min_heap_kb_connect_20_polls",
        "rtt_us_median",
        "rtt_us_max",
        "dc4_latency_ms_max",
    ):
        print("  %-30s %s" % (k, res[k]))
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
