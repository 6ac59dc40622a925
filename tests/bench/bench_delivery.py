# Delivery benchmark: the whole firmware (from .mpy, unix port) through the real chain
# (STSAFE emulator, Mosquitto on loopback, the server).
#
#   .venv/bin/python tests/bench/bench_delivery.py [--backlog N] [--latency-s S] [--json FILE]
#
# 1. Latency and bytes: S seconds of feed, a record a second. Latency = when the server stored
#    the record - when the firmware reported it sealed (the pump reading is a poll round trip,
#    ~2.4 ms, earlier: bench_pump_heap.py). Bytes on the wire per record = the link layer's
#    frame bytes / records (MQTT adds its own header per frame: 2 + topic + 2 bytes).
# 2. Drain: the server is down while the module stores a backlog of N records (polling as
#    fast as the pump answers); then the server comes back, the module reboots (a new epoch,
#    the backlog stays in the outbox) and drains it. Rate = N / (last backlog object stored -
#    first backlog object stored), at the server. Compare with bench_mqtt.py's baseline
#    (umqtt.simple, QoS 1, TCP_NODELAY, the same sizes, no link layer).
# It also reports the firmware's heap figures (firmware/health.py gauges).
import argparse
import json
import pathlib
import sqlite3
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))
from serene import upy  # noqa: E402
from serene.bench import DEVICE, Chain, FirmwareProcess  # noqa: E402
from serene.pumpsim import PumpSimulator  # noqa: E402


def firmware(mpy, cfg, path):
    path.write_text(json.dumps(cfg))
    return FirmwareProcess(mpy, path)


def stored(db_path, epoch):
    db = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True)
    try:
        return dict(db.execute("SELECT seq, received_at FROM objects WHERE device=? AND "
                               "epoch=?", (DEVICE, epoch)).fetchall())
    finally:
        db.close()


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backlog", type=int, default=10000)
    ap.add_argument("--latency-s", type=int, default=60)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--window", type=int, default=0, help="link_window (0 = the default)")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-delivery-"))
    mpy = upy.compile_tree(work / "mpy")
    out = {}
    sim = PumpSimulator(scenario="normal-feed", speed=1.0)
    sim.start()
    try:
        with Chain(work, checkpoint_every=32) as chain:
            base = {"board": "unix", "pump_device": sim.device_path, "status_every_s": 0,
                    "health_period_s": 10, "data_dir": str(work / "flash"),
                    # room for the backlog: ~60 bytes a sealed record on flash
                    "outbox_capacity": max(262144, args.backlog * 100)}
            if args.window:
                base["link_window"] = args.window
            base.update(chain.module_config())

            # 1. latency and bytes
            if not args.skip_latency:
                fw = firmware(mpy, dict(base, poll_period_ms=1000, run_for_s=args.latency_s,
                                        drain_s=30), work / "a.json")
                fw.wait(args.latency_s + 120)
                chain.service.wait_idle(10)
                sealed, ep = fw.sealed(), fw.epochs()[0]
                got = stored(chain.db_path, ep)
                lat = [(got[s] - t) * 1000 for _, s, t in sealed if s in got]
                s = fw.summary()
                out["latency_ms"] = {"records": len(lat), "median": statistics.median(lat),
                                     "p95": pct(lat, 95), "max": max(lat)}
                out["bytes_per_record"] = s["link_bytes"] / max(1, len(sealed))
                out["frames"] = s["link_frames"]
                out["heap"] = {k: s[k] for k in ("mem_code", "mem_live_max", "mem_high")}
                out["heap"]["working"] = s["mem_live_max"] - s["mem_code"]
                print("latency  %s" % out["latency_ms"], flush=True)
                print("bytes    %.1f per record (%d frames)" % (out["bytes_per_record"],
                                                               out["frames"]), flush=True)

            # 2. drain from a backlog
            chain.stop_server()
            fw = firmware(mpy, dict(base, poll_period_ms=1, run_for_s=0), work / "b.json")
            t0 = time.time()
            while len(fw.sealed()) < args.backlog:
                time.sleep(0.5)
                if fw.proc.poll() is not None:
                    raise SystemExit("firmware died:\n" + "\n".join(fw.text()[-20:]))
            fw.stop()
            backlog_ep, n = fw.epochs()[0], len(fw.sealed())
            out["backlog"] = {"records": n, "production_s": time.time() - t0}
            print("backlog  %d records stored in the outbox in %.0f s" % (n, time.time() - t0),
                  flush=True)
            chain.start_server()
            fw = firmware(mpy, dict(base, poll_period_ms=60000, run_for_s=1, drain_s=900),
                          work / "c.json")
            fw.wait(1000)
            chain.service.wait_idle(30)
            got = stored(chain.db_path, backlog_ep)
            times = sorted(got.values())
            missing = set(range(1, max(got) + 1)) - set(got)
            dur = times[-1] - times[0]
            out["drain"] = {"objects": len(got), "seconds": dur, "per_s": len(got) / dur,
                            "missing": len(missing),
                            "drained": "I app: drain: outbox empty" in fw.text()}
            print("drain    %s" % out["drain"], flush=True)
    finally:
        sim.stop()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
