# Drain benchmark (issue 13 item 3): a backlog of N records (default 10,000) delivered through
# the emulated LTE-M link (serene.linkemu), as a ratio to what that link can carry, with the raw
# loopback drain of the same backlog beside it, in one run.
#
#   .venv/bin/python tests/bench/bench_drain.py [--backlog N] [--rtt-ms 150] [--jitter-ms 20]
#       [--up-kbps 375] [--down-kbps 300] [--stall-every-s 60 --stall-s 2] [--window W]
#       [--skip-loopback] [--json FILE]
#
# The whole firmware (from .mpy, unix port) through the real chain (STSAFE emulator on the I2C
# bridge, Mosquitto on loopback, the medical server storing in SQLite).
#
# 1. Backlog, the fastest honest way: the firmware runs with its broker unreachable (mqtt_port
#    = a closed loopback port: the radio retries its connection, nothing leaves, nothing reaches
#    the broker's queues) and polls the pump as fast as it answers (poll_period_ms 1,
#    status_every_s 0: a sealed status record per poll, a checkpoint every 32) until N records
#    are durable in its outbox; then SIGINT (a clean stop). The flash directory is copied: each
#    drain starts from the same bytes.
# 2. Each drain: the server's database is emptied, the flash copy restored, the firmware boots
#    (a new epoch, announced first; the backlog epoch's ack key restored from its envelope)
#    with run_for_s 1, drain_s 900 (it stops polling after 1 s and delivers until the outbox
#    is empty), pointed at the broker directly (loopback) or at the link emulator in front of
#    it (round trip 150 +- 20 ms, 375 kbit/s up, 300 kbit/s down: Cat-M1 peaks).
#    Drain time = from the first MQTT PUBLISH that crossed the emulator (loopback: the first
#    backlog object stored) to the last backlog object stored (the server's received_at).
# 3. Figures: records/s and bytes/s; bytes that crossed the link up and down (MQTT bytes
#    counted by the emulator, which splits the stream into MQTT packets) plus a TCP/IP
#    overhead estimate (52 B a segment: IPv4 20 + TCP 20 + timestamps 12, one segment per MQTT
#    packet as the module writes them, TCP_NODELAY; pure TCP ACKs not counted); the ratio of
#    those bytes to linkemu.capacity_bytes(drain time) (what 375 kbit/s carries in that time)
#    = link utilisation; the same for the link-layer frame bytes (goodput) and for the sealed
#    objects alone. Then the limits derived from the measurements: frames a second against one
#    QoS 1 PUBACK round trip per frame (umqtt.simple's publish blocks until its PUBACK), the
#    window (objects in flight) against the ack round trip, the per-frame overhead.
# Figures, not a timed test: the machine is shared (load average printed).
import argparse
import json
import os
import pathlib
import shutil
import sqlite3
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))
from serene import broker as B  # noqa: E402
from serene import upy  # noqa: E402
from serene.bench import DEVICE, Chain, FirmwareProcess  # noqa: E402
from serene.linkemu import LinkEmulator  # noqa: E402
from serene.pumpsim import PumpSimulator  # noqa: E402

COMMAND = "python tests/bench/bench_drain.py " + " ".join(sys.argv[1:])


def load():
    return "load average %.2f %.2f %.2f on %d cores" % (os.getloadavg() + (os.cpu_count(),))


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


def count_stored(db_path, epoch):
    try:
        return len(stored(db_path, epoch))
    except sqlite3.Error:
        return 0


def build_backlog(mpy, base, work, n):
    cfg = dict(base, mqtt_port=B.free_port(), poll_period_ms=1, status_every_s=0, run_for_s=0)
    fw = firmware(mpy, cfg, work / "backlog.json")
    t0 = time.time()
    deadline = time.monotonic() + 900
    def records():
        return sum(1 for ln in fw.text() if ln.startswith("D seal: ")
                   and "kind=epoch" not in ln and "kind=checkpoint" not in ln)

    while records() < n:
        time.sleep(0.25)
        if fw.proc.poll() is not None:
            raise SystemExit("firmware died:\n" + "\n".join(fw.text()[-20:]))
        if time.monotonic() > deadline:
            raise SystemExit("backlog not built in 900 s")
    fw.stop()
    dt = time.time() - t0
    ep = fw.epochs()[0]
    sealed = fw.sealed()
    summary = fw.summary()
    seqs = sorted(s for e, s, _ in sealed if e == ep)
    return {"epoch": ep, "objects": len(seqs), "records": records(), "seqs": seqs,
            "seconds": dt, "outbox_bytes": summary.get("outbox_bytes"),
            "sealed_per_s": len(sealed) / dt, "summary": summary}


def drain(mode, chain, mpy, base, work, snapshot, backlog, emu_args):
    """One drain of the backlog from a fresh copy of the flash, into an empty database."""
    chain.stop_server()
    for p in chain.db_path.parent.glob(chain.db_path.name + "*"):
        p.unlink()
    chain.start_server()
    flash = work / ("flash-" + mode)
    if flash.exists():
        shutil.rmtree(flash)
    shutil.copytree(snapshot, flash)
    emu = None
    port = chain.broker.port
    if mode == "emulated":
        emu = LinkEmulator(chain.broker.port, **emu_args).start()
        port = emu.port
    cfg = dict(base, data_dir=str(flash), mqtt_port=port, poll_period_ms=60000, run_for_s=1,
               drain_s=900)
    try:
        fw = firmware(mpy, cfg, work / ("drain-%s.json" % mode))
        ep = backlog["epoch"]
        deadline = time.monotonic() + 1000
        last_print = 0
        while fw.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            if time.monotonic() - last_print >= 10:
                last_print = time.monotonic()
                print("  %s: %d of %d backlog objects stored" % (
                    mode, count_stored(chain.db_path, ep), backlog["objects"]), flush=True)
        rc = fw.wait(60)
        chain.service.wait_idle(30)
        emu_stats = emu.stats() if emu else None
        first_pub = emu.first_publish_s() if emu else None
        wall0 = emu.wall_t0 if emu else None
    finally:
        if emu:
            emu.stop()
    got = stored(chain.db_path, ep)
    led = chain.ledger()
    times = sorted(got.values())
    missing = set(backlog["seqs"]) - set(got)
    s = fw.summary()
    t_open = wall0 + first_pub if emu else times[0]
    seconds = times[-1] - t_open
    out = {"mode": mode, "firmware_exit": rc, "objects": len(got), "missing": len(missing),
           "drained": "I app: drain: outbox empty" in fw.text(), "seconds": seconds,
           "ledger_missing": led.get("missing"),
           "checkpoint_mismatches": led.get("checkpoint_mismatches"),
           "objects_per_s": len(got) / seconds,
           "link_frames": s["link_frames"], "link_bytes": s["link_bytes"],
           "link_objects": s["link_objects"], "retransmissions": s["link_retransmissions"],
           "acks": s["link_acks"], "radio_block_max_ms": s.get("radio_block_max_ms"),
           "radio_connects": s.get("radio_connects"), "radio_sent": s.get("radio_sent"),
           "link_bytes_per_s": s["link_bytes"] / seconds}
    if emu:
        cap = emu.capacity_bytes(seconds, t0=first_pub)
        up_mqtt = emu_stats["up_bytes"]
        up_ip = up_mqtt + emu_stats["up_tcpip_overhead_est"]
        down_ip = emu_stats["down_bytes"] + emu_stats["down_tcpip_overhead_est"]
        out.update({
            "link": emu_args,
            "capacity_bytes": cap,
            "up_mqtt_bytes": up_mqtt, "up_ip_bytes_est": up_ip,
            "down_mqtt_bytes": emu_stats["down_bytes"], "down_ip_bytes_est": down_ip,
            "up_mqtt_packets": emu_stats["up_mqtt_packets"],
            "down_mqtt_packets": emu_stats["down_mqtt_packets"],
            "up_at_capacity_s": emu_stats["up_at_capacity_s"],
            "up_ip_bytes_per_s": up_ip / seconds,
            "ratio_ip": up_ip / cap,  # link utilisation, IP level (what the radio carries)
            "ratio_mqtt": up_mqtt / cap,
            "ratio_frames": s["link_bytes"] / cap,  # goodput: link-layer frames
        })
    return out


def limits(e, backlog, window, loopback=None):
    """What bounds the emulated drain, from its measurements."""
    rtt_s = e["link"]["rtt_ms"] / 1000
    up = e["link"]["up_bps"] / 8
    frames = e["link_frames"]
    pubs = e["up_mqtt_packets"].get("PUBLISH", frames)
    frame_b = e["link_bytes"] / frames
    pub_b = (e["up_mqtt_bytes"] - 0) / max(1, pubs)
    serial_s = (pub_b + 52) / up
    per_frame_s = e["seconds"] / frames
    ceiling_one_per_rtt = (pub_b + 52) / (rtt_s + serial_s) / up  # ratio, IP level
    obj_b = e["link_bytes"] / max(1, e["link_objects"])  # link bytes an object
    ip_per_obj = (pub_b + 52) / (e["link_objects"] / frames)  # IP bytes an object
    # Pipelined frames: `window` objects in flight per ack loop (a frame's round trip + its
    # serialisation + the server's turn: at least the measured time a frame takes today).
    window_ceiling = window * ip_per_obj / per_frame_s / up
    out = {
        "window_objects": window,
        "window_bytes": window * obj_b,
        "window_ceiling_ratio": window_ceiling,
        "window_needed_for_90pct": 0.9 * up * per_frame_s / ip_per_obj,
        "link_bytes_per_object": obj_b,
        "frames_per_s": frames / e["seconds"],
        "seconds_per_frame_ms": per_frame_s * 1000,
        "frame_bytes_mean": frame_b,
        "objects_per_frame": e["link_objects"] / frames,
        "mqtt_publish_bytes_mean": pub_b,
        "serialisation_ms_per_frame": serial_s * 1000,
        "one_frame_per_rtt_ceiling_ratio": ceiling_one_per_rtt,
        # MQTT (fixed header, topic, packet id) + TCP/IP bytes of a frame's IP packet
        "frame_overhead_pct": 100 * (pub_b + 52 - frame_b) / (pub_b + 52),
        "bytes_in_flight_needed": up * rtt_s,
    }
    if loopback:
        # The firmware, broker and server on this host without any link: their own ceiling.
        out["loopback_ratio"] = (loopback["link_bytes_per_s"] * (pub_b + 52) / frame_b) / up
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backlog", type=int, default=10000)
    ap.add_argument("--rtt-ms", type=float, default=150.0)
    ap.add_argument("--jitter-ms", type=float, default=20.0)
    ap.add_argument("--up-kbps", type=float, default=375.0)
    ap.add_argument("--down-kbps", type=float, default=300.0)
    ap.add_argument("--stall-every-s", type=float, default=0.0,
                    help="emulated link: a stall this often (0 = none)")
    ap.add_argument("--stall-s", type=float, default=2.0, help="... lasting this long")
    ap.add_argument("--window", type=int, default=0, help="link_window (0 = the default)")
    ap.add_argument("--skip-loopback", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json")
    args = ap.parse_args()
    print("command: %s" % COMMAND, flush=True)
    print("machine: %s (start)" % load(), flush=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-drain-"))
    mpy = upy.compile_tree(work / "mpy")
    emu_args = {"rtt_ms": args.rtt_ms, "jitter_ms": args.jitter_ms,
                "up_bps": int(args.up_kbps * 1000), "down_bps": int(args.down_kbps * 1000),
                "stall_every_s": args.stall_every_s,
                "stall_s": args.stall_s if args.stall_every_s else 0.0}
    out = {"command": COMMAND, "load_start": os.getloadavg()}
    sim = PumpSimulator(scenario="normal-feed", speed=1.0)
    sim.start()
    try:
        with Chain(work, checkpoint_every=32, se_time_scale=0.25) as chain:
            base = {"board": "unix", "pump_device": sim.device_path, "status_every_s": 0,
                    "health_period_s": 10, "data_dir": str(work / "flash"),
                    # room for the backlog: ~60 bytes a sealed record on flash
                    "outbox_capacity": max(262144, args.backlog * 100), "log_level": 10}
            base.update(chain.module_config())
            base["log_level"] = 10  # the seal lines count the backlog
            if args.window:
                base["link_window"] = args.window
            bl = build_backlog(mpy, base, work, args.backlog)
            snapshot = work / "flash-backlog"
            shutil.copytree(work / "flash", snapshot)
            out["backlog"] = {k: v for k, v in bl.items() if k not in ("summary", "seqs")}
            print("backlog    %d objects of epoch %d durable in %.1f s (%.0f a second), "
                  "broker unreachable" % (bl["objects"], bl["epoch"], bl["seconds"],
                                          bl["sealed_per_s"]), flush=True)
            base["log_level"] = 20
            runs = []
            if not args.skip_loopback:
                runs.append(drain("loopback", chain, mpy, base, work, snapshot, bl, emu_args))
            runs.append(drain("emulated", chain, mpy, base, work, snapshot, bl, emu_args))
    finally:
        sim.stop()
    out["load_end"] = os.getloadavg()
    for r in runs:
        out[r["mode"]] = r
        print("ledger %-8s %s gaps, %s checkpoint mismatches" % (
            r["mode"], r["ledger_missing"], r["checkpoint_mismatches"]), flush=True)
        print("drain %-9s %d objects (%d missing, outbox %s) in %.2f s: %.0f objects/s, "
              "%.0f link-frame bytes/s; %d frames, %d retransmissions, %d acks, "
              "longest radio block %s ms" % (
                  r["mode"], r["objects"], r["missing"], "empty" if r["drained"] else
                  "NOT empty", r["seconds"], r["objects_per_s"], r["link_bytes_per_s"],
                  r["link_frames"], r["retransmissions"], r["acks"], r["radio_block_max_ms"]),
              flush=True)
    e = out["emulated"]
    window = args.window or 64  # firmware/config.py link_window
    lim = out["limits"] = limits(e, bl, window, out.get("loopback"))
    cap_bps = e["link"]["up_bps"]
    print("link       rtt %g +- %g ms, up %g kbit/s, down %g kbit/s, stalls %s: capacity %.0f "
          "bytes in %.1f s (%.0f B/s, stalls deducted)" % (
              args.rtt_ms, args.jitter_ms, args.up_kbps, args.down_kbps,
              "%g s every %g s" % (args.stall_s, args.stall_every_s) if args.stall_every_s
              else "none", e["capacity_bytes"], e["seconds"], cap_bps / 8), flush=True)
    print("crossed    up %d MQTT bytes (%s) + ~%d TCP/IP = ~%d; down %d MQTT bytes (%s)"
          % (e["up_mqtt_bytes"], e["up_mqtt_packets"], e["up_ip_bytes_est"] - e["up_mqtt_bytes"],
             e["up_ip_bytes_est"], e["down_mqtt_bytes"], e["down_mqtt_packets"]), flush=True)
    print("RATIO      %.1f %% of the link's capacity (IP level, %.0f of %.0f B/s), "
          "%.1f %% as MQTT bytes, %.1f %% as link frames (goodput); target >= 90 %%; "
          "uplink at capacity %.1f s of %.1f s" % (
              100 * e["ratio_ip"], e["up_ip_bytes_per_s"], cap_bps / 8, 100 * e["ratio_mqtt"],
              100 * e["ratio_frames"], e["up_at_capacity_s"], e["seconds"]), flush=True)
    if "loopback" in out:
        lb = out["loopback"]
        print("beside it  loopback %.0f objects/s, %.0f link-frame bytes/s in %.2f s = %.1fx "
              "the emulated drain (%.1f %% of the emulated link's capacity if it were the link)"
              % (lb["objects_per_s"], lb["link_bytes_per_s"], lb["seconds"],
                 lb["objects_per_s"] / e["objects_per_s"],
                 100 * lb["link_bytes_per_s"] / (cap_bps / 8)), flush=True)
    print("limits     %.2f frames/s = one frame per %.0f ms (round trip %g ms + %.1f ms "
          "serialising a %.0f-byte PUBLISH); %.1f objects a frame, %.0f frame bytes; one "
          "frame per round trip caps the drain at %.1f %% of capacity; filling the link "
          "needs ~%.0f bytes in flight (capacity x round trip)"
          % (lim["frames_per_s"], lim["seconds_per_frame_ms"], args.rtt_ms,
             lim["serialisation_ms_per_frame"], lim["mqtt_publish_bytes_mean"],
             lim["objects_per_frame"], lim["frame_bytes_mean"],
             100 * lim["one_frame_per_rtt_ceiling_ratio"], lim["bytes_in_flight_needed"]),
          flush=True)
    print("limits     the window: %d objects (%.0f bytes) in flight per ack loop of >= %.0f ms "
          "would cap a pipelined drain at %.0f %%; >= 90 %% needs ~%.0f objects in flight; "
          "MQTT + TCP/IP take %.1f %% of each frame's IP bytes" % (
              lim["window_objects"], lim["window_bytes"], lim["seconds_per_frame_ms"],
              100 * lim["window_ceiling_ratio"], lim["window_needed_for_90pct"],
              lim["frame_overhead_pct"]), flush=True)
    if "loopback_ratio" in lim:
        print("limits     this host's own ceiling (loopback drain, IP bytes): %.0f %% of the "
              "emulated link's capacity" % (100 * lim["loopback_ratio"]), flush=True)
    print("machine: %s (end)" % load(), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
