"""serene bench: the whole bench, end to end, on its embedded defaults (the main job).

It starts the pump simulator on a pty, compiles the firmware with mpy-cross as for a board, runs
it on the MicroPython unix port with a board-sized heap, and shows every record as the module
produces it, beside what the simulated pump really did. It stops after --duration seconds (or
Ctrl-C) and prints a summary; --json-summary FILE also writes it as JSON:
  records (by kind), pump link conditions (by kind), module events, volume check (records whose
  volume delivered matches the simulator's, to the protocol's 0.001 ml resolution), the
  firmware's peak heap and its health counters.
"""

import collections
import json
import pathlib
import signal
import subprocess
import sys
import threading
import time

from . import REPO, records, upy
from .cli import CliError

#: How far back (s) a status record's reading may lie before the line that prints it: one poll
#: exchange (1 s reply time-out + one retry, specs/pump-protocol.md) plus scheduling slack.
READING_WINDOW_S = 3.0
#: How often the bench samples the simulator's true state (s).
SAMPLE_PERIOD_S = 0.01


def add_arguments(p):
    p.add_argument("--duration", type=float, default=30.0, help="seconds to run (0 = Ctrl-C)")
    p.add_argument("--scenario", default="normal-feed", help="pump simulator scenario")
    p.add_argument("--speed", type=float, default=1.0, help="simulated seconds per second")
    p.add_argument("--poll-ms", type=int, default=1000, help="firmware poll period")
    p.add_argument("--status-every", type=int, default=5, help="status record at least every s")
    p.add_argument("--heap", default="256K", help="MicroPython heap size (-X heapsize)")
    p.add_argument("--workdir", default=str(REPO / "build" / "bench"))
    p.add_argument("--json-summary", metavar="FILE", help="write the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no live record lines")


class TruthSampler:
    """Samples the simulator's true state; answers 'did the pump ever report this volume?'."""

    def __init__(self, sim):
        self.sim = sim
        self.samples = collections.deque(maxlen=100_000)  # (wall time, volume)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def _run(self):
        last = None
        while not self._stop.is_set():
            v = self.sim.snapshot()["volume"]
            if v != last:
                self.samples.append((time.monotonic(), v))
                last = v
            self._stop.wait(SAMPLE_PERIOD_S)

    def stop(self):
        self._stop.set()
        self._thread.join(2)

    def volume_seen(self, volume, at):
        """True if the simulator held exactly `volume` within READING_WINDOW_S before `at`."""
        held = None
        for t, v in self.samples:
            if t > at:
                break
            if t >= at - READING_WINDOW_S and v == volume:
                return True
            held = v
        return held == volume  # the value held when the window opened, unchanged since


def run(args):
    try:
        from .pumpsim import PumpSimulator
    except ImportError as e:
        raise CliError("pump simulator unavailable: %s" % e) from None
    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    mpy = work / "mpy"
    if mpy.exists():
        import shutil

        shutil.rmtree(mpy)
    try:
        upy.compile_tree(mpy)
    except upy.UpyError as e:
        raise CliError(str(e)) from None

    sim = PumpSimulator(scenario=args.scenario, speed=args.speed)
    sim.start()
    truth = TruthSampler(sim)
    truth.start()
    cfg = {
        "board": "unix",
        "pump_device": sim.device_path,
        "poll_period_ms": args.poll_ms,
        "status_every_s": args.status_every,
        "health_period_s": 10,
        "data_dir": str(work / "flash"),
        "run_for_s": int(args.duration) if args.duration > 0 else 0,
    }
    cfg_path = work / "module.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    print("bench: pump simulator '%s' at %gx on %s; firmware from .mpy, heap %s"
          % (args.scenario, args.speed, sim.device_path, args.heap), flush=True)
    proc = upy.popen([str(mpy / "main.py"), str(cfg_path)], heap=args.heap, code_dir=mpy,
                     cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                     bufsize=1)
    stats = Stats()
    try:
        for line in proc.stdout:
            stats.line(line.rstrip("\n"), truth, quiet=args.quiet)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        for line in proc.stdout:
            stats.line(line.rstrip("\n"), truth, quiet=True)
    finally:
        rc = proc.wait(timeout=30)
        truth.stop()
        sim_final = sim.snapshot()
        sim.stop()
    summary = stats.summary(rc, sim_final)
    print_summary(summary)
    if args.json_summary:
        pathlib.Path(args.json_summary).write_text(json.dumps(summary, indent=2) + "\n")
    if rc not in (0, -signal.SIGINT):
        raise CliError("firmware exited with status %s" % rc)
    return 0


class Stats:
    def __init__(self):
        self.records = collections.Counter()
        self.link = collections.Counter()
        self.module = collections.Counter()
        self.alarm_records = 0  # status or event records that carry a non-zero alarm mask
        self.volume_checked = 0
        self.volume_mismatch = []
        self.last_status = None
        self.firmware = None
        self.errors = []
        self.seqs = []

    def line(self, line, truth, quiet):
        now = time.monotonic()
        if line.startswith("I rec: "):
            fields = dict(kv.split("=", 1) for kv in line[7:].split())
            rec = records.decode(bytes.fromhex(fields["cbor"]))
            self.seqs.append(rec["seq"])
            self.records[rec["kind"]] += 1
            if rec["kind"] == "link":
                self.link[rec.get("condition")] += 1
            if rec["kind"] == "module":
                self.module[rec.get("event")] += 1
            if rec.get("alarms"):
                self.alarm_records += 1
            check = ""
            if rec["kind"] == "status" and "volume" in rec:
                self.volume_checked += 1
                self.last_status = rec
                if truth.volume_seen(rec["volume"], now):
                    check = "  [= simulator]"
                else:
                    self.volume_mismatch.append(rec["volume"])
                    check = "  [MISMATCH: simulator never reported this]"
            if not quiet:
                print("#%-5d %s%s" % (rec["seq"], records.describe(rec), check), flush=True)
        elif line.startswith("SUMMARY "):
            self.firmware = json.loads(line[8:])
        elif line.startswith(("I ", "D ")):
            if not quiet and line.startswith("I app:"):
                print("firmware: " + line, flush=True)
        elif line.startswith("W "):
            if not quiet:
                print("firmware: " + line, flush=True)
        else:
            # Errors, tracebacks and anything unexpected: always shown, kept for the summary.
            self.errors.append(line)
            print("firmware: " + line, flush=True)

    def summary(self, rc, sim_final):
        fw = self.firmware or {}
        return {
            "firmware_exit": rc,
            "records_produced": sum(self.records.values()),
            "records_by_kind": dict(self.records),
            "pump_link_conditions": dict(self.link),
            "module_events": dict(self.module),
            "sequence_gaps": _gaps(self.seqs),
            "alarm_records": self.alarm_records,
            "volume_checked": self.volume_checked,
            "volume_mismatches": len(self.volume_mismatch),
            "last_status_volume_ml": (self.last_status or {}).get("volume", 0) / 1000,
            "simulator_volume_ml": sim_final["volume"] / 1000,
            "heap_code_bytes": fw.get("mem_code"),
            "heap_live_max_bytes": fw.get("mem_live_max"),
            "heap_working_bytes": (fw["mem_live_max"] - fw["mem_code"]) if fw else None,
            "heap_high_bytes": fw.get("mem_high"),
            "firmware_health": fw,
            "firmware_errors": self.errors[:20],
        }


def _gaps(seqs):
    if not seqs:
        return 0
    return (max(seqs) - min(seqs) + 1) - len(set(seqs))


def print_summary(s):
    print("\nbench summary")
    print("  records produced     %d  %s" % (s["records_produced"], s["records_by_kind"]))
    print("  pump link conditions %s" % (s["pump_link_conditions"] or "none"))
    print("  module events        %s" % (s["module_events"] or "none"))
    print("  volume check         %d status records, %d mismatches"
          % (s["volume_checked"], s["volume_mismatches"]))
    print("  volume delivered     module %.3f ml, simulator %.3f ml (at the end)"
          % (s["last_status_volume_ml"], s["simulator_volume_ml"]))
    print("  firmware heap        %s bytes live at most (%s of it code loaded from .mpy, "
          "%s working); %s with garbage" % (s["heap_live_max_bytes"], s["heap_code_bytes"],
                                           s["heap_working_bytes"], s["heap_high_bytes"]))
    if s["firmware_errors"]:
        print("  firmware errors      %d (first: %s)" % (len(s["firmware_errors"]),
                                                       s["firmware_errors"][0]))
    sys.stdout.flush()
