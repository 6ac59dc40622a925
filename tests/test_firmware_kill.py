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
import time

from serene.bench import DEVICE, Chain, FirmwareProcess
from serene.pumpsim import PumpSimulator

KILLS = 50


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
                run = FirmwareProcess(mpy_dir, cfg_path)
                time.sleep(rng.uniform(0.3, 2.5))
                run.stop(signal.SIGKILL)
                epochs += run.epochs()
                objects += [(e, s) for e, s, _ in run.sealed()]
                warnings += [ln for ln in run.text() if ln.startswith(("W delivery", "E "))]
            cfg.update({"run_for_s": 2, "drain_s": 60})
            cfg_path.write_text(json.dumps(cfg))
            final = FirmwareProcess(mpy_dir, cfg_path)
            assert final.wait(120) == 0, "\n".join(final.text()[-30:])
            epochs += final.epochs()
            objects += [(e, s) for e, s, _ in final.sealed()]
            assert "I app: drain: outbox empty" in final.text(), "\n".join(final.text()[-30:])
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
