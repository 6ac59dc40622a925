"""Power cuts of the whole firmware: SIGKILL at random instants, 50 times, against the real
chain (STSAFE emulator, Mosquitto, server). Then one clean run drains the outbox.

At the end: every object the firmware reported stored (its seal line is printed only once the
outbox append is durable) is at the server, stored once; no epoch number was used twice, so
no (key, nonce) pair repeats; the server saw no conflicting object under one identity (what a
reused nonce would look like); the outbox on flash is consistent (no corruption found at any
boot) and drains to empty."""

import json
import random
import signal
import sqlite3
import subprocess
import threading
import time

from serene import upy
from serene.bench import DEVICE, Chain
from serene.pumpsim import PumpSimulator

KILLS = 50


class Run:
    """One firmware process; its stdout collected by a thread (lines survive the kill)."""

    def __init__(self, mpy_dir, cfg_path):
        self.lines = []
        self.proc = upy.popen([str(mpy_dir / "main.py"), str(cfg_path)], heap="512K",
                              code_dir=mpy_dir, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._t.join(10)

    def wait(self, timeout):
        rc = self.proc.wait(timeout)
        self._t.join(10)
        return rc


def sealed(lines):
    """(epoch, seq) of every object the run reported durable, and the epoch it started."""
    epoch = None
    out = []
    for line in lines:
        if line.startswith("I seal: epoch "):
            epoch = int(line.split()[3])
        elif line.startswith("D seal: ") and epoch is not None:
            seq = int(dict(kv.split("=", 1) for kv in line[8:].split())["seq"])
            out.append((epoch, seq))
    return epoch, out


def test_firmware_survives_50_sigkills_without_loss_or_duplicates(tmp_path, mpy_dir):
    rng = random.Random(20261129)
    sim = PumpSimulator(scenario="normal-feed", speed=10.0)
    sim.start()
    try:
        with Chain(tmp_path, checkpoint_every=4, se_time_scale=0.25) as chain:
            cfg = {"board": "unix", "pump_device": sim.device_path, "poll_period_ms": 100,
                   "status_every_s": 0, "health_period_s": 1, "data_dir": str(tmp_path / "flash")}
            cfg.update(chain.module_config())
            cfg_path = tmp_path / "module.json"
            cfg_path.write_text(json.dumps(cfg))
            epochs, objects, warnings = [], [], []
            for _ in range(KILLS):
                run = Run(mpy_dir, cfg_path)
                time.sleep(rng.uniform(0.3, 2.5))
                run.kill()
                ep, objs = sealed(run.lines)
                if ep is not None:
                    epochs.append(ep)
                objects += objs
                warnings += [ln for ln in run.lines if ln.startswith(("W delivery", "E "))]
            cfg.update({"run_for_s": 2, "drain_s": 60})
            cfg_path.write_text(json.dumps(cfg))
            final = Run(mpy_dir, cfg_path)
            assert final.wait(120) == 0, "\n".join(final.lines[-30:])
            ep, objs = sealed(final.lines)
            epochs.append(ep)
            objects += objs
            assert "I app: drain: outbox empty" in final.lines, "\n".join(final.lines[-30:])
            chain.service.wait_idle(10)
            ledger = chain.ledger()
            db = sqlite3.connect(str(chain.db_path))
            stored = db.execute("SELECT epoch, seq FROM objects WHERE device=?",
                                (DEVICE,)).fetchall()
            db.close()
    finally:
        sim.stop()

    assert len(epochs) >= KILLS // 2, "too few runs got as far as an epoch"
    assert len(set(epochs)) == len(epochs), "an epoch number was used twice"
    assert len(set(objects)) == len(objects), "a (epoch, seq) was sealed twice"
    stored_set = set(stored)
    assert len(stored_set) == len(stored), "an object was stored twice"
    lost = sorted(set(objects) - stored_set)
    assert lost == [], "reported stored by the module, missing at the server: %s" % lost[:20]
    assert ledger["rejects"].get("conflict", 0) == 0
    assert ledger["missing"] == 0, ledger["epochs"][:3]
    assert ledger["checkpoint_mismatches"] == 0
    assert not [w for w in warnings if "corrupt" in w], warnings[:5]
    assert len(objects) > 2 * KILLS  # the runs did real work between the kills
