# Firmware heap benchmark: the firmware from .mpy files on the unix port, polling the pump
# simulator, for --seconds (default 60).
#
#   .venv/bin/python tests/bench/bench_firmware_heap.py [--seconds S] [--full] [--json FILE]
#
# Pump-only mode by default (pump link, records, no secure element or delivery); --full runs
# the whole chain (STSAFE emulator, outbox, LTE-M radio to Mosquitto, the server).
# Reports the firmware's own gauges (firmware/health.py): mem_code = heap held right after the
# imports (the .mpy code: in flash when frozen on a board), mem_live_max = the largest live heap
# after a collection, working = their difference, mem_high = the largest heap seen before a
# collection (live + garbage). Then searches the smallest -X heapsize (KiB) with which a run of
# --probe-s seconds completes with no MemoryError and no task restart.
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))
from serene import upy  # noqa: E402
from serene.bench import Chain  # noqa: E402
from serene.pumpsim import PumpSimulator  # noqa: E402


def run(mpy, cfg, work, heap_k, seconds):
    cfg = dict(cfg, run_for_s=seconds, drain_s=10)
    path = work / "cfg.json"
    path.write_text(json.dumps(cfg))
    res = upy.run([str(mpy / "main.py"), str(path)], heap="%dK" % heap_k, code_dir=mpy,
                  timeout=seconds + 120, cwd=work)
    summary = None
    for line in res.stdout.splitlines():
        if line.startswith("SUMMARY "):
            summary = json.loads(line[8:])
    ok = (res.returncode == 0 and summary is not None and summary["task_restarts"] == 0
          and "MemoryError" not in res.stdout + res.stderr and summary["polls"] >= seconds // 2)
    return ok, summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--probe-s", type=int, default=12)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-heap-"))
    mpy = upy.compile_tree(work / "mpy")
    sim = PumpSimulator(scenario="normal-feed", speed=1.0)
    sim.start()
    out = {"mode": "full chain" if args.full else "pump only"}
    try:
        cfg = {"board": "unix", "pump_device": sim.device_path, "poll_period_ms": 1000,
               "status_every_s": 5, "health_period_s": 10, "data_dir": str(work / "flash")}
        chain = Chain(work, checkpoint_every=16, se_time_scale=1.0) if args.full else None
        if chain:
            chain.__enter__()
            cfg.update(chain.module_config())
            cfg["log_level"] = 20
        try:
            ok, s = run(mpy, cfg, work, 1024, args.seconds)
            if not ok:
                raise SystemExit("the reference run failed: %s" % s)
            out.update({k: s[k] for k in ("mem_code", "mem_live_max", "mem_high", "polls")})
            out["working"] = s["mem_live_max"] - s["mem_code"]
            print("%s, %d s, %d polls: code %d B, live max %d B (working %d B), high %d B"
                  % (out["mode"], args.seconds, s["polls"], s["mem_code"], s["mem_live_max"],
                     out["working"], s["mem_high"]), flush=True)
            lo, hi = s["mem_code"] // 1024, 1024  # lo fails for sure, hi works
            while hi - lo > 4:
                mid = (lo + hi) // 2
                ok, _ = run(mpy, cfg, work, mid, args.probe_s)
                print("  -X heapsize=%dK: %s" % (mid, "runs" if ok else "fails"), flush=True)
                if ok:
                    hi = mid
                else:
                    lo = mid
            out["min_heap_k"] = hi
            print("smallest heap that runs: %d KiB (within 4 KiB)" % hi, flush=True)
        finally:
            if chain:
                chain.__exit__(None, None, None)
    finally:
        sim.stop()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
