"""serene bench: the whole bench, end to end, on its embedded defaults (the main job).

    serene bench [--duration S] [--scenario NAME] [--speed X] [--json-summary FILE] ...

The whole chain, every piece real or a faithful stand-in, all on this machine:

    pump simulator (pty) -> firmware on the MicroPython unix port, compiled by mpy-cross
    -> STSAFE-A110 emulator behind the I2C bridge (the module's keys and certificate, made by
    `serene provision` under --workdir/home) -> outbox on flash (a directory) -> LTE-M radio
    (umqtt.simple) -> Mosquitto (private, per-device accounts and ACLs) -> medical server
    (verify, store once in SQLite, sealed acks) -> completeness ledger.

It shows live progress once a second (records produced, stored, acknowledged, open gaps), runs
the feed for --duration seconds, lets the module deliver what it holds (--drain), prints the
completeness report and checks every status record the server stored against what the
simulated pump really did. --json-summary FILE writes the figures. --pump-only runs just the
pump simulator and the firmware, printing the records (no secure element, no delivery).

--radio lora [--dr N] [--lora-loss P]: the module speaks LoRaWAN 1.0.4 class A (drivers/lorawan,
drivers/radio/lora.py over the UDP modem shim) -> the RF medium (serene.lora.medium: time on
air, a fraction P of the uplink frames lost at both gateways) -> two Semtech UDP gateways ->
the stand-in network server (serene.netserver: join server with the provisioned keys, ADR,
ChirpStack v4 MQTT integration) -> Mosquitto -> the medical server's LoRaWAN intake
(serene.server.chirpstack: acks as downlinks within the daily budget). The summary adds time
on air, duty-cycle use per sub-band, downlinks used, FCnt and DR changes.
"""

import collections
import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

from . import REPO, records, upy
from .cli import CliError

#: How far back (s) a status record's reading may lie before the line that reports it: one poll
#: exchange (1 s reply time-out + one retry, specs/pump-protocol.md) plus scheduling slack.
READING_WINDOW_S = 3.0
#: How often the bench samples the simulator's true state (s), and how late a sample may see
#: a value (the sampling thread competes for the interpreter with the line reader).
SAMPLE_PERIOD_S = 0.01
SAMPLE_LAG_S = 0.5
DEVICE = "SRN-0001"


def add_arguments(p):
    p.add_argument("--duration", type=float, default=30.0, help="seconds of feed (0 = Ctrl-C)")
    p.add_argument("--drain", type=float, default=30.0,
                   help="then at most this long for the module to deliver what it stored")
    p.add_argument("--scenario", default="normal-feed", help="pump simulator scenario")
    p.add_argument("--speed", type=float, default=1.0, help="simulated seconds per second")
    p.add_argument("--poll-ms", type=int, default=1000, help="firmware poll period")
    p.add_argument("--status-every", type=int, default=5, help="status record at least every s")
    p.add_argument("--checkpoint-every", type=int, default=16, help="checkpoint every N records")
    # The unix port is 64-bit and loads the .mpy bytecode into the heap: ~200 KB of code
    # (mem_code) besides the ~50 KB the firmware works in; the board runs it frozen in flash.
    p.add_argument("--heap", default="384K", help="MicroPython heap size (-X heapsize)")
    p.add_argument("--workdir", default=str(REPO / "build" / "bench"))
    p.add_argument("--fresh", action="store_true", help="forget the module's flash and server DB")
    p.add_argument("--pump-only", action="store_true", help="pump simulator + firmware only")
    p.add_argument("--json-summary", metavar="FILE", help="write the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no live lines")
    p.add_argument("--db", metavar="URL", default=None,
                   help="the server's database (postgresql://...; default $SERENE_DB, else the "
                        "workdir's SQLite file; --fresh empties only the SQLite one)")
    p.add_argument("--radio", choices=("ltem", "lora"), default="ltem")
    p.add_argument("--dr", type=int, default=5, help="LoRa: EU868 data rate of the join (0-5)")
    p.add_argument("--lora-loss", type=float, default=0.1,
                   help="LoRa: fraction of uplink frames lost (at both gateways)")
    p.add_argument("--downlinks-per-day", type=int, default=100,
                   help="LoRa: the medical server's downlink budget per device per 24 h")


class TruthSampler:
    """Samples the simulator's true state; answers 'did the pump ever report this volume?'."""

    def __init__(self, sim):
        self.sim = sim
        self.samples = collections.deque(maxlen=200_000)  # (monotonic time, volume)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

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
        """True if the simulator held `volume` within READING_WINDOW_S before `at`: sampled
        exactly, or strictly between two consecutive samples of a rising volume (at high
        simulator speed a value can live shorter than the sampling period). A reading newer
        than the last sample waits up to SAMPLE_LAG_S for the sampler to see it."""
        while True:
            if self._seen(volume, at):
                return True
            if time.monotonic() > at + SAMPLE_LAG_S:
                return False
            time.sleep(SAMPLE_PERIOD_S)

    def _seen(self, volume, at):
        held = None
        prev = None
        for t, v in list(self.samples):
            if t > at + SAMPLE_LAG_S:
                break
            if t >= at - READING_WINDOW_S:
                if v == volume or (prev is not None and prev < volume < v):
                    return True
            prev = held = v
        return held == volume  # the value held when the window opened, unchanged since


class FirmwareLog:
    """Reads the firmware's stdout: records produced, link conditions, errors, SUMMARY."""

    def __init__(self, truth, quiet):
        self.truth = truth
        self.quiet = quiet
        self.produced = collections.Counter()  # records, by kind
        self.objects = collections.Counter()  # epoch records and checkpoints
        self.link = collections.Counter()
        self.module = collections.Counter()
        self.alarm_records = 0
        self.volume_checked = 0
        self.volume_mismatch = []
        self.last_status = None
        self.status_times = {}  # seq -> when the firmware reported it (sealed mode)
        self.seqs = []
        self.record_seqs = []
        self.firmware = None
        self.errors = []
        self.epoch = None

    def line(self, line):
        now = time.monotonic()
        if line.startswith("I rec: "):  # pump-only mode: the plaintext record is printed
            fields = dict(kv.split("=", 1) for kv in line[7:].split())
            self.record(records.decode(bytes.fromhex(fields["cbor"])), now, show=True)
        elif line.startswith("D seal: "):  # sealed mode: what was sealed, not its content
            fields = dict(kv.split("=", 1) for kv in line[8:].split())
            seq, kind = int(fields["seq"]), fields["kind"]
            self.seqs.append(seq)  # every object of the epoch: gaps are counted over them all
            if kind in ("epoch", "checkpoint"):
                self.objects[kind] += 1
            else:
                self.produced[kind] += 1
                self.record_seqs.append(seq)
            if kind == "status":
                self.status_times[seq] = now
        elif line.startswith("SUMMARY "):
            self.firmware = json.loads(line[8:])
        elif line.startswith("I seal: epoch "):
            self.epoch = int(line.split()[3])
            self.say("firmware: " + line)
        elif line.startswith(("I ", "D ")):
            if line.startswith(("I app:", "I delivery:")):
                self.say("firmware: " + line)
        elif line.startswith("W "):
            self.say("firmware: " + line)
        else:
            # Errors, tracebacks and anything unexpected: always shown, kept for the summary.
            self.errors.append(line)
            print("firmware: " + line, flush=True)

    def say(self, text):
        if not self.quiet:
            print(text, flush=True)

    def record(self, rec, now, show):
        """A decoded record (pump-only: from the log; sealed: as the server stored it)."""
        if show:
            self.seqs.append(rec["seq"])
            self.produced[rec["kind"]] += 1
        if rec["kind"] == "link":
            self.link[rec.get("condition")] += 1
        if rec["kind"] == "module":
            self.module[rec.get("event")] += 1
        if rec.get("alarms"):
            self.alarm_records += 1
        check = ""
        if rec["kind"] == "status" and "volume" in rec and now is not None:
            self.volume_checked += 1
            self.last_status = rec
            if self.truth.volume_seen(rec["volume"], now):
                check = "  [= simulator]"
            else:
                self.volume_mismatch.append(rec["volume"])
                check = "  [MISMATCH: the simulator never had this volume]"
        if show:
            self.say("#%-5d %s%s" % (rec["seq"], records.describe(rec), check))


def run(args):
    try:
        from .pumpsim import PumpSimulator
    except ImportError as e:
        raise CliError("pump simulator unavailable: %s" % e) from None
    from .broker import private_dir, write_private

    if args.db:  # the server, report and screenshots of this run read it
        os.environ["SERENE_DB"] = args.db
    work = pathlib.Path(args.workdir).resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    # The workdir holds secrets (module.json: the module's MQTT password; the provisioning
    # home: keys): 0700, and every file with a secret in it 0600.
    private_dir(work)
    mpy = work / "mpy"
    if mpy.exists():
        shutil.rmtree(mpy)
    try:
        upy.compile_tree(mpy)
    except upy.UpyError as e:
        raise CliError(str(e)) from None

    with contextlib.ExitStack() as stack:
        sim = PumpSimulator(scenario=args.scenario, speed=args.speed)
        sim.start()
        stack.callback(sim.stop)
        truth = TruthSampler(sim).start()
        stack.callback(truth.stop)
        cfg = {
            "board": "unix",
            "pump_device": sim.device_path,
            "poll_period_ms": args.poll_ms,
            "status_every_s": args.status_every,
            "health_period_s": 10,
            "data_dir": str(work / "flash"),
            "run_for_s": int(args.duration) if args.duration > 0 else 0,
            "drain_s": int(args.drain),
        }
        lora = None
        if args.radio == "lora":
            lora = {"dr": args.dr, "loss": args.lora_loss,
                    "downlinks_per_day": args.downlinks_per_day}
        chain = None if args.pump_only else stack.enter_context(
            Chain(work, args.checkpoint_every, args.fresh, lora=lora))
        if chain:
            cfg.update(chain.module_config())
        cfg_path = work / "module.json"
        write_private(cfg_path, json.dumps(cfg, indent=1))
        print("bench: pump simulator '%s' at %gx on %s; firmware from .mpy, heap %s%s"
              % (args.scenario, args.speed, sim.device_path, args.heap,
                 "" if chain else "; pump only"), flush=True)
        if chain:
            print("bench: STSAFE emulator on I2C bridge :%d, Mosquitto :%d, server database %s"
                  % (chain.bridge.port, chain.broker.port, chain.db_where), flush=True)
        if chain and lora:
            print("bench: LoRa DR%d, RF medium :%d, 2 gateways, %.0f %% uplink loss, network "
                  "server :%d, LoRaWAN intake %s" % (args.dr, chain.medium.port,
                                                     100 * args.lora_loss, chain.ns.addr[1],
                                                     chain.lora_intake.client_id), flush=True)
        t_start = time.monotonic()
        fw = FirmwareLog(truth, args.quiet)
        proc = upy.popen([str(mpy / "main.py"), str(cfg_path)], heap=args.heap, code_dir=mpy,
                         cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         bufsize=1)
        progress = Progress(fw, chain, args.quiet).start() if chain else None
        try:
            for line in proc.stdout:
                fw.line(line.rstrip("\n"))
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            for line in proc.stdout:
                fw.line(line.rstrip("\n"))
        finally:
            rc = proc.wait(timeout=60)
            if progress:
                progress.stop()
        sim_final = sim.snapshot()
        ledger = chain.finish(fw) if chain else None
        lora_figures = chain.lora_figures(fw, time.monotonic() - t_start) \
            if chain and lora else None
    summary = make_summary(fw, rc, sim_final, ledger)
    if lora_figures:
        summary["lora"] = lora_figures
    print_summary(summary)
    if args.json_summary:
        pathlib.Path(args.json_summary).write_text(json.dumps(summary, indent=2) + "\n")
    if not args.pump_only:
        _screenshots(work)
    if rc not in (0, -signal.SIGINT):
        raise CliError("firmware exited with status %s" % rc)
    return 0


def _screenshots(work):
    """The clinicians' application on this run's data: triage list and patient page, English
    and French (serene screenshots), in work/screenshots; printed, never fatal."""
    try:
        from .webapp.screenshots import take

        for path in take(work / "home", work / "screenshots", DEVICE):
            print("bench: screenshot %s" % path, flush=True)
    except Exception as e:  # noqa: BLE001 - a missing browser must not fail the bench
        print("bench: no screenshots: %s" % e, flush=True)


class FirmwareProcess:
    """The firmware (main.py of an mpy build) in the background, for tests and benchmarks.
    Its output is read by a thread into `lines` as (wall time, line): they survive a kill."""

    def __init__(self, mpy_dir, cfg_path, heap="512K"):
        self.lines = []
        self.proc = upy.popen([str(mpy_dir / "main.py"), str(cfg_path)], heap=heap,
                              code_dir=mpy_dir, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def text(self):
        return [ln for _, ln in self.lines]

    def wait(self, timeout):
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    def stop(self, sig=signal.SIGINT):
        """SIGINT: the firmware prints its SUMMARY and exits. SIGKILL: a power cut."""
        self.proc.send_signal(sig)
        return self.wait(60)

    def wait_for(self, pred, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.1)
        return False

    def epochs(self):
        return [int(ln.split()[3]) for ln in self.text() if ln.startswith("I seal: epoch ")]

    def sealed(self):
        """[(epoch, seq, when)] of every object the firmware reported durable in its outbox,
        in order (a repeated identity would show twice)."""
        out, epoch = [], None
        for t, ln in self.lines:
            if ln.startswith("I seal: epoch "):
                epoch = int(ln.split()[3])
            elif ln.startswith("D seal: ") and epoch is not None:
                out.append((epoch, int(dict(kv.split("=", 1) for kv in ln[8:].split())["seq"]),
                            t))
        return out

    def summary(self):
        for ln in self.text():
            if ln.startswith("SUMMARY "):
                return json.loads(ln[8:])
        raise CliError("the firmware printed no SUMMARY")


class Chain:
    """Provisioning, the STSAFE emulator on the I2C bridge, Mosquitto and the server."""

    def __init__(self, work, checkpoint_every=16, fresh=False, se_time_scale=1.0, server=True,
                 extra_devices=(), lora=None):
        """extra_devices: more provisioned devices with broker accounts (a hostile one in
        the flood tests); the firmware runs as DEVICE. lora: {"dr", "loss",
        "downlinks_per_day"}: the module on LoRa (medium, gateways, network server, the
        LoRaWAN intake) instead of LTE-M."""
        self.lora = lora
        self.lora_intake = self.ns = self.medium = None
        self.home = pathlib.Path(work) / "home"
        self.devices = [DEVICE] + [d for d in extra_devices if d != DEVICE]
        self.checkpoint_every = checkpoint_every
        self.fresh = fresh
        self.se_time_scale = se_time_scale
        self.with_server = server
        self.service = None

    def __enter__(self):
        from . import broker as B
        from .i2c_bridge import I2CBridgeServer
        from .server.store import Store, db_path, db_url
        from .stsafe.emulator import StsafeEmulator
        from .stsafe.provision import provision

        from .broker import private_dir

        self._stack = contextlib.ExitStack()
        try:
            private_dir(self.home.parent)
            provision(self.home, self.devices)
            dev = self.home / "devices" / DEVICE
            self.module_json = dev / "module.json"
            self.emu = StsafeEmulator.load(dev / "stsafe.json", time_scale=self.se_time_scale)
            self.bridge = I2CBridgeServer({0x20: self.emu}).start()
            self._stack.callback(self.bridge.close)
            self.broker = B.Broker(self.home, self.devices).start()
            self._stack.callback(self.broker.stop)
            self.db_path = db_path(self.home)
            self.db_url = db_url(self.home)  # $SERENE_DB (--db), else the SQLite file
            self.db_where = Store.describe(self.db_url)
            if self.fresh and self.db_path.exists():
                self.db_path.unlink()
            if self.with_server:
                self.start_server()
            self._stack.callback(self.stop_server)
            if self.lora:
                self._start_lora()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def start_server(self):
        from .server.ingest import Ingest
        from .server.service import IngestService
        from .server.store import Store
        from .verifier import from_home

        creds = self.broker.server_credentials()
        self.service = IngestService(lambda: Ingest(from_home(self.home), Store(self.db_url)),
                                     self.broker.server_port, creds["username"],
                                     creds["password"])
        self.service.start()

    def _start_lora(self):
        import random

        from .lora.medium import Gateway, Medium
        from .netserver.server import NetworkServer
        from .server.chirpstack import ChirpstackIntake, load_dev_euis
        from .server.ingest import Ingest
        from .server.store import Store
        from .stsafe.provision import netserver_keys_path
        from .verifier import from_home

        creds = self.broker.server_credentials()
        budget = self.home / "server" / "lorawan-downlinks.json"
        if self.fresh and budget.exists():
            budget.unlink()
        self.lora_intake = ChirpstackIntake(
            lambda: Ingest(from_home(self.home), Store(self.db_url), worker_id=1),
            self.broker.server_port, creds["username"], creds["password"],
            load_dev_euis(self.home), worker_id=1,
            downlinks_per_day=self.lora["downlinks_per_day"], budget_path=budget).start()
        self._stack.callback(self.lora_intake.stop)
        nc = self.broker.netserver_credentials()
        self.ns = NetworkServer(netserver_keys_path(self.home), mqtt_port=self.broker.server_port,
                                username=nc["username"], password=nc["password"]).start()
        self._stack.callback(self.ns.stop)
        loss = self.lora["loss"]

        def drop(index, gw, seed=4242):
            # Frame loss: the same frame lost at both gateways (a fade at the module).
            # (a string seed is hashed: consecutive integer seeds are not independent draws)
            return random.Random("%d-%d" % (seed, index)).random() < loss

        gws = [Gateway("aa555a0000000001", distance_m=300),
               Gateway("aa555a0000000002", distance_m=900)]
        self.medium = Medium(gws, self.ns.addr, drop=drop).start()
        self._stack.callback(self.medium.stop)

    def lora_figures(self, fw, elapsed_s):
        """Time on air, duty-cycle use per sub-band, downlinks, FCnt, DR changes."""
        fwh = fw.firmware or {}
        bands = fwh.get("lora_band_airtime_ms") or {}
        up = [u for u in self.medium.uplinks]
        return {
            "dr_start": self.lora["dr"],
            "dr_end": fwh.get("lora_dr"),
            "dr_changes": fwh.get("radio_dr_changes"),
            "fcnt_up": fwh.get("lora_fcnt_up"),
            "time_on_air_ms": fwh.get("lora_airtime_ms"),
            "uplinks_on_air": len(up),
            "uplinks_lost": sum(1 for u in up if not u["heard_by"]),
            "band_airtime_ms": bands,
            "band_duty_pct": {b: round(100.0 * ms / (elapsed_s * 1000), 3)
                              for b, ms in bands.items()},
            "elapsed_s": round(elapsed_s, 1),
            "downlinks_sent_by_server": self.lora_intake.stats["downlinks"],
            "downlinks_budget_per_day": self.lora["downlinks_per_day"],
            "downlinks_used_24h": self.lora_intake.used(DEVICE),
            "ack_requests": self.lora_intake.stats["ack_requests"],
            "acks_over_budget": self.lora_intake.stats["over_budget"],
            "downlinks_on_air": self.medium.stats["downlinks"],
            "link_ack_requests": fwh.get("link_ack_requests"),
            "link_mtu_changes": fwh.get("link_mtu_changes"),
            "netserver": {k: v for k, v in self.ns.stats.items() if v},
            "intake_refused": dict(self.lora_intake.refused),
        }

    def stop_server(self):
        if self.service is not None:
            self.service.stop()
            self.service = None

    def module_config(self):
        creds = self.broker.credentials(DEVICE)
        lora = {}
        if self.lora:
            lora = {"radio": "lora", "lora_dr": self.lora["dr"],
                    "lora_medium_port": self.medium.port}
        return lora | {
            "identity": str(self.module_json),
            "se_bridge_port": self.bridge.port,
            "mqtt_host": "127.0.0.1",
            "mqtt_port": self.broker.port,
            "mqtt_user": creds["username"],
            "mqtt_password": creds["password"],
            "checkpoint_every_n": self.checkpoint_every,
            "log_level": 10,  # the seal lines (seq and kind, never content) feed the live view
        }

    def ledger(self):
        from .server.store import Store

        store = Store(self.db_url, readonly=True)
        try:
            return store.ledger([DEVICE]).get(DEVICE, {})
        finally:
            store.close()

    def finish(self, fw):
        """After the firmware stopped: let the server finish, then check what it stored."""
        self.service.wait_idle(10)
        if self.lora_intake is not None:
            self.lora_intake.wait_idle(10)
        from .server.store import Store

        db = Store(self.db_url, readonly=True)
        try:
            rows = [tuple(r) for r in db.execute(
                "SELECT epoch, seq, fields FROM objects WHERE device=? AND fields IS NOT NULL",
                (DEVICE,))]
        finally:
            db.close()
        for epoch, seq, fields in sorted(rows):
            if epoch != fw.epoch:
                continue  # an earlier run's epoch: not produced by this firmware run
            rec = json.loads(fields)
            fw.record(rec, fw.status_times.get(seq), show=False)
        return self.ledger()


class Progress:
    """One live line a second: produced (firmware), stored / duplicates / gaps (server)."""

    def __init__(self, fw, chain, quiet):
        self.fw, self.chain, self.quiet = fw, chain, quiet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        if not self.quiet:
            self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self):
        last, quiet_s = None, 0
        while not self._stop.wait(1.0):
            try:
                led = self.chain.ledger()
            except Exception as e:  # noqa: BLE001 - the server may be mid-write
                led = {"error": str(e)}
            cur = _epoch_entry(led, self.fw.epoch)
            svc = self.chain.service
            line = ("bench: produced %d  stored %d  acks sent %d  open gaps %d  rejects %d"
                    % (sum(self.fw.produced.values()), cur.get("objects", 0),
                       (svc.acks_sent if svc else 0) + (self.chain.lora_intake.stats[
                           "downlinks"] if self.chain.lora_intake else 0),
                       cur.get("missing", 0),
                       led.get("rejected", 0)))
            quiet_s += 1
            if line != last or quiet_s >= 10:  # on change, else every 10 s
                print(line, flush=True)
                last, quiet_s = line, 0


def _epoch_entry(ledger, epoch):
    for e in (ledger or {}).get("epochs", []):
        if e.get("epoch") == epoch:
            return e
    return {}


def make_summary(fw, rc, sim_final, ledger):
    fwh = fw.firmware or {}
    out = {
        "firmware_exit": rc,
        "records_produced": sum(fw.produced.values()),
        "records_by_kind": dict(fw.produced),
        "signed_objects": dict(fw.objects),
        "pump_link_conditions": dict(fw.link),
        "module_events": dict(fw.module),
        "sequence_gaps": _gaps(fw.seqs),
        "alarm_records": fw.alarm_records,
        "volume_checked": fw.volume_checked,
        "volume_mismatches": len(fw.volume_mismatch),
        "last_status_volume_ml": (fw.last_status or {}).get("volume", 0) / 1000,
        "simulator_volume_ml": sim_final["volume"] / 1000,
        "heap_code_bytes": fwh.get("mem_code"),
        "heap_live_max_bytes": fwh.get("mem_live_max"),
        "heap_working_bytes": (fwh["mem_live_max"] - fwh["mem_code"]) if fwh else None,
        "heap_high_bytes": fwh.get("mem_high"),
        "firmware_health": fwh,
        "firmware_errors": fw.errors[:20],
    }
    if ledger is not None:
        cur = _epoch_entry(ledger, fw.epoch)
        stored = set()
        for first, last in cur.get("received", []):
            stored |= set(range(first, last + 1))
        out.update({
            "epoch": fw.epoch,
            "objects_stored": cur.get("objects", 0),
            "objects_by_kind": cur.get("by_kind", {}),
            "records_stored": len(set(fw.record_seqs) & stored),
            "records_produced_not_stored": sorted(set(fw.seqs) - stored),
            "duplicates_received": cur.get("duplicates", 0),
            "gaps": cur.get("missing", 0),
            "complete": ledger.get("complete", False),
            "rejects": ledger.get("rejected", 0),
            "checkpoints": cur.get("checkpoints", {}),
            "bytes_sent": fwh.get("link_bytes"),
            "frames_sent": fwh.get("link_frames"),
            "retransmissions": fwh.get("link_retransmissions"),
            "ledger": ledger,
        })
    return out


def _gaps(seqs):
    if not seqs:
        return 0
    return (max(seqs) - min(seqs) + 1) - len(set(seqs))


def print_summary(s):
    print("\nbench summary")
    print("  records produced     %d  %s" % (s["records_produced"], s["records_by_kind"]))
    if "objects_stored" in s:
        print("  server               %d of %d records stored, %d objects in all for epoch %s "
              "%s; %d gaps, %d duplicates received, %d rejects, checkpoints %s"
              % (s["records_stored"], s["records_produced"], s["objects_stored"], s["epoch"],
                 s["objects_by_kind"], s["gaps"], s["duplicates_received"], s["rejects"],
                 s["checkpoints"]))
        print("  link                 %s frames, %s bytes, %s retransmissions"
              % (s["frames_sent"], s["bytes_sent"], s["retransmissions"]))
    lo = s.get("lora")
    if lo:
        print("  lora                 DR%s -> DR%s (%s changes), FCnt %s, %s ms on air in %s "
              "uplinks (%s lost on air), duty cycle %% of the run by sub-band %s"
              % (lo["dr_start"], lo["dr_end"], lo["dr_changes"], lo["fcnt_up"],
                 lo["time_on_air_ms"], lo["uplinks_on_air"], lo["uplinks_lost"],
                 lo["band_duty_pct"]))
        print("  lora downlinks       %s acks sent for %s asks (%s over budget), %s of %s a "
              "day used, %s downlinks on air (join-accept and MAC included)"
              % (lo["downlinks_sent_by_server"], lo["ack_requests"], lo["acks_over_budget"],
                 lo["downlinks_used_24h"], lo["downlinks_budget_per_day"],
                 lo["downlinks_on_air"]))
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
