# LoRa benchmark: the whole firmware (from .mpy, unix port) over LoRaWAN 1.0.4 class A through
# the RF medium, two Semtech UDP gateways, the stand-in network server (ChirpStack v4 MQTT
# integration), Mosquitto and the medical server's LoRaWAN intake (serene.bench Chain(lora=)).
#
#   .venv/bin/python tests/bench/bench_lora.py [--minutes 5] [--loss 0.1] [--part main,adr]
#                                              [--json FILE]
#
# main  --minutes of feed at DR5 with --loss of the uplink frames lost (at both gateways),
#       then the drain. Every record stored once, 0 gaps; time on air against the ideal (the
#       time on air of the fewest full frames that carry the same object bytes at DR5, / 0.9
#       for the loss); downlinks per 16 records; bytes on air per record with every layer
#       counted (LoRaWAN 13 B + link framing + COSE), per status record at DR5 and, by the
#       same frames cut at 51 bytes, at DR0.
# adr   joins at DR0 on a good link: the network server's ADR moves the module up to DR5
#       mid-backlog (its ADR over the last 2 uplinks); then both gateways fade by 31 dB (SNR ~ -7
#       dB at the nearest): ADR moves it back down; the fade ends: up again. Nothing lost, nothing
#       twice.
# The firmware's working heap (mem_live_max - mem_code) with LoRa is reported too.
import argparse
import json
import math
import pathlib
import sqlite3
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))
from serene import upy  # noqa: E402
from serene.bench import DEVICE, Chain, FirmwareProcess  # noqa: E402
from serene.lora.airtime import time_on_air_ms  # noqa: E402
from serene.pumpsim import PumpSimulator  # noqa: E402

LORAWAN = 13  # MHDR 1 + FHDR 7 + FPort 1 + MIC 4
MTU = {0: 51, 5: 222}


def uv(n):
    return 1 if n < 0x80 else 1 + uv(n >> 7)


def objects(db_path, epoch):
    db = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True)
    try:
        return db.execute("SELECT seq, kind, length(sealed), fields FROM objects WHERE device=? "
                          "AND epoch=? ORDER BY seq", (DEVICE, epoch)).fetchall()
    finally:
        db.close()


def ideal(objs, epoch, dr):
    """Fewest frames carrying the objects' entries at DR dr (entries packed back to back,
    fragments where they must), their time on air, bytes on air."""
    mtu, sf = MTU[dr], 12 - dr
    entry_bytes = sum(1 + uv(s) + uv(n) + n for s, _, n, _ in objs)
    room = mtu - 1 - uv(epoch)
    frames = math.ceil(entry_bytes / room)
    last = entry_bytes - (frames - 1) * room
    toa = (frames - 1) * time_on_air_ms(mtu + LORAWAN, sf) + \
        time_on_air_ms(last + 1 + uv(epoch) + LORAWAN, sf)
    return frames, toa, entry_bytes + frames * (1 + uv(epoch) + LORAWAN)


def run_chain(work, minutes, dr, loss, fade=(), status_every=10, drain_s=1800,
              adr_history=None):
    """fade: [(at_s, dB)]: both gateways' fade from then on. adr_history: uplinks the
    network server's ADR looks at (5 by default; ChirpStack uses 20)."""
    work.mkdir(parents=True, exist_ok=True)
    mpy = work / "mpy"
    upy.compile_tree(mpy)
    sim = PumpSimulator(scenario="normal-feed", speed=1.0)
    sim.start()
    try:
        with Chain(work, checkpoint_every=16, fresh=True,
                   lora={"dr": dr, "loss": loss, "downlinks_per_day": 100000}) as chain:
            cfg = {"board": "unix", "pump_device": sim.device_path, "poll_period_ms": 1000,
                   "status_every_s": status_every, "health_period_s": 60,
                   "data_dir": str(work / "flash"), "run_for_s": int(minutes * 60),
                   "drain_s": drain_s}
            cfg.update(chain.module_config())
            if adr_history:
                chain.ns.adr_history = adr_history
            fade = list(fade)
            path = work / "module-cfg.json"
            path.write_text(json.dumps(cfg))
            t0 = time.monotonic()
            fw = FirmwareProcess(mpy, path, heap="384K")
            while fw.proc.poll() is None:
                time.sleep(1)
                if fade and time.monotonic() - t0 >= fade[0][0]:
                    at, db = fade.pop(0)
                    for gw in chain.medium.gateways:
                        gw.fade_db = db
                    print("bench_lora: gateways faded by %g dB at %.0f s" % (db, at),
                          flush=True)
            fw.wait(60)
            summ = fw.summary()
            chain.lora_intake.wait_idle(10)
            epoch = fw.epochs()[-1]
            sealed = [s for e, s, _ in fw.sealed() if e == epoch]
            objs = objects(chain.db_path, epoch)
            fig = chain.lora_figures(_Fw(summ), time.monotonic() - t0)
            led = chain.ledger()
            drs = [12 - u["sf"] for u in chain.medium.uplinks]
    finally:
        sim.stop()
    return summ, epoch, sealed, objs, fig, led, drs


class _Fw:
    def __init__(self, summ):
        self.firmware = summ


def main_part(args, work):
    summ, epoch, sealed, objs, fig, led, drs = run_chain(work / "main", args.minutes, 5,
                                                         args.loss)
    stored = [s for s, _, _, _ in objs]
    records = [o for o in objs if o[1] == "record"]
    status = [o for o in records if o[3] and json.loads(o[3]).get("kind") == "status"]
    frames5, toa5, bytes5 = ideal(objs, epoch, 5)
    frames0, toa0, bytes0 = ideal(objs, epoch, 0)
    join_toa = time_on_air_ms(23, 7)
    toa = fig["time_on_air_ms"]
    out = {
        "records_sealed": len(sealed), "objects_stored": len(stored),
        "every_object_once": sorted(stored) == sorted(set(sealed)) and len(stored) == len(
            set(stored)),
        "gaps": led.get("missing"), "complete": led.get("complete"),
        "lora": fig,
        "time_on_air_ms": toa, "time_on_air_ms_without_join": toa - join_toa,
        "ideal_frames_dr5": frames5, "ideal_time_on_air_ms_dr5": toa5,
        "ideal_over_loss_ms": round(toa5 / (1 - args.loss), 1),
        "toa_over_ideal": round((toa - join_toa) / (toa5 / (1 - args.loss)), 3),
        "downlinks_per_16_records": round(16 * fig["downlinks_sent_by_server"] /
                                          max(1, len(records)), 3),
        "downlinks_per_100_records": round(100 * fig["downlinks_sent_by_server"] /
                                           max(1, len(records)), 2),
        "status_sealed_bytes_mean": round(sum(o[2] for o in status) / max(1, len(status)), 1),
        "ideal_bytes_on_air_dr5": bytes5, "ideal_bytes_on_air_dr0": bytes0,
        "toa_per_record_ms_dr5": round((toa - join_toa) / max(1, len(records)), 1),
        "ideal_toa_per_object_ms_dr0": round(toa0 / len(objs), 1),
        "heap_working_bytes": summ.get("mem_live_max", 0) - summ.get("mem_code", 0),
        "drs_on_air": sorted(set(drs)),
    }
    # Per status record with every layer: its sealed bytes + its link entry header + its share
    # of the frame header and LoRaWAN overhead (a full frame's objects share them).
    for dr in (0, 5):
        mtu = MTU[dr]
        s = int(round(out["status_sealed_bytes_mean"]))
        entry = 1 + 2 + 1 + s  # kind, seq (2 bytes once above 127), len, sealed bytes
        per_frame = (mtu - 2) // entry
        if per_frame:
            out["bytes_on_air_per_status_dr%d" % dr] = round(entry + (2 + LORAWAN) / per_frame,
                                                             1)
            out["toa_per_status_ms_dr%d" % dr] = round(
                time_on_air_ms(per_frame * entry + 2 + LORAWAN, 12 - dr) / per_frame, 1)
        else:  # larger than a frame (DR0-2: 51 bytes): fragments of (kf, seq, total, offset,
            # len) = 6 header bytes each, each in a frame of its own
            room = mtu - 2 - 6
            n = math.ceil(s / room)
            out["bytes_on_air_per_status_dr%d" % dr] = s + n * (2 + 6 + LORAWAN)
            out["toa_per_status_ms_dr%d" % dr] = (n - 1) * time_on_air_ms(mtu + LORAWAN,
                                                                          12 - dr) + \
                time_on_air_ms(s - (n - 1) * room + 2 + 6 + LORAWAN, 12 - dr)
        out["frames_per_status_dr%d" % dr] = 1 / per_frame if per_frame else n
    return out


def adr_part(args, work):
    # A good link (SNR ~ +24 dB): up from DR0; at 150 s both gateways fade by 31 dB (SNR ~ -7
    # dB at the nearest: heard at DR5, but a negative ADR margin): down; at 330 s the fade
    # ends: up again, and the backlog drains.
    summ, epoch, sealed, objs, fig, led, drs = run_chain(
        work / "adr", args.adr_minutes, 0, 0.0, fade=[(150, 31.0), (330, 0.0)],
        status_every=30, adr_history=2)
    stored = [s for s, _, _, _ in objs]
    changes = [(i, a, b) for i, (a, b) in enumerate(zip(drs, drs[1:])) if a != b]
    return {"drs_on_air_in_order": drs, "dr_changes_on_air": changes,
            "went_up_to_dr5": 5 in drs and drs[0] == 0,
            "came_back_down": any(b < a for _, a, b in changes),
            "every_object_once": sorted(stored) == sorted(set(sealed)),
            "gaps": led.get("missing"), "complete": led.get("complete"), "lora": fig,
            "heap_working_bytes": summ.get("mem_live_max", 0) - summ.get("mem_code", 0)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--adr-minutes", type=float, default=4.0)
    p.add_argument("--loss", type=float, default=0.1)
    p.add_argument("--part", default="main,adr")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench-lora-"))
    out = {}
    for part in args.part.split(","):
        out[part] = {"main": main_part, "adr": adr_part}[part](args, work)
        print(json.dumps({part: out[part]}, indent=1), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
