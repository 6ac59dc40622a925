"""Delivery of the whole firmware (from .mpy, unix port) through the real chain: a broker
outage and a server restart lose nothing and never stop the pump polling; downlinks that are
not genuine fresh acks change nothing."""

import json
import os
import sqlite3
import time

from serene import broker as B
from serene.bench import DEVICE, Chain, FirmwareProcess
from serene.pumpsim import PumpSimulator
from serene.server.ingest import Ingest
from serene.server.store import Store
from serene.verifier import from_home


class Firmware(FirmwareProcess):
    """The firmware with one epoch (no rotation): its sequence numbers, in that epoch."""

    def epoch(self):
        epochs = self.epochs()
        return epochs[0] if epochs else None

    def seqs(self):
        return [seq for _, seq, _ in self.sealed()]


def config(tmp_path, chain, sim, **kw):
    cfg = {"board": "unix", "pump_device": sim.device_path, "poll_period_ms": 500,
           "status_every_s": 0, "health_period_s": 5, "data_dir": str(tmp_path / "flash")}
    cfg.update(chain.module_config())
    cfg.update(kw)
    path = tmp_path / "module.json"
    path.write_text(json.dumps(cfg))
    return path


def stored_seqs(chain, epoch):
    db = sqlite3.connect(str(chain.db_path))
    try:
        return {s for (s,) in db.execute("SELECT seq FROM objects WHERE device=? AND epoch=?",
                                         (DEVICE, epoch))}
    finally:
        db.close()


def test_broker_outage_of_60_s_and_a_server_restart_lose_nothing(tmp_path, mpy_dir):
    sim = PumpSimulator(scenario="normal-feed", speed=1.0)
    sim.start()
    try:
        with Chain(tmp_path, checkpoint_every=8, se_time_scale=0.25) as chain:
            fw = Firmware(mpy_dir, config(tmp_path, chain, sim, run_for_s=85, drain_s=90))
            assert fw.wait_for(lambda: len(fw.seqs()) >= 5, 30), fw.text()[-20:]
            chain.broker.stop()  # the cellular network or the broker is gone for a minute
            t_stop = time.monotonic()
            time.sleep(60)
            chain.broker.start()  # same port, same accounts
            outage_s = time.monotonic() - t_stop
            time.sleep(5)
            chain.stop_server()  # the server restarts while the module catches up
            time.sleep(2)
            chain.start_server()
            assert fw.wait(200) == 0, "\n".join(fw.text()[-30:])
            chain.service.wait_idle(15)
            epoch = fw.epoch()
            stored = stored_seqs(chain, epoch)
            ledger = chain.ledger()
    finally:
        sim.stop()
    assert outage_s >= 60
    assert "I app: drain: outbox empty" in fw.text(), fw.text()[-30:]
    sealed = fw.seqs()
    assert len(sealed) > 100  # about a record a poll, outage included
    assert set(sealed) <= stored, sorted(set(sealed) - stored)[:20]
    assert ledger["missing"] == 0 and ledger["checkpoint_mismatches"] == 0
    s = fw.summary()
    # The pump was polled throughout: one poll per 500 ms over 85 s, no failure, no gap.
    assert s["polls"] >= 150 and s["poll_failures"] == 0
    assert s["task_restarts"] == 0 and s["records_lost"] == 0
    assert s["radio_connects"] >= 2  # it reconnected after the outage
    db = sqlite3.connect(str(tmp_path / "home" / "server" / "ingest.sqlite3"))
    times = sorted(json.loads(f)["time"] for (f,) in db.execute(
        "SELECT fields FROM objects WHERE device=? AND epoch=? AND fields LIKE '%\"status\"%'",
        (DEVICE, epoch)))
    db.close()
    assert times and max(b - a for a, b in zip(times, times[1:])) <= 2  # seconds


def test_forged_replayed_truncated_and_stray_downlinks_change_nothing(tmp_path, mpy_dir):
    sim = PumpSimulator(scenario="normal-feed", speed=1.0)
    sim.start()
    try:
        with Chain(tmp_path, checkpoint_every=8, se_time_scale=0.25, server=False) as chain:
            creds = chain.broker.server_credentials()
            with B.Probe(chain.broker.server_port, creds["username"], creds["password"]) as tap:
                assert tap.subscribe("serene/%s/up" % DEVICE) == 1
                fw = Firmware(mpy_dir, config(tmp_path, chain, sim, run_for_s=14, drain_s=1))
                assert fw.wait_for(lambda: len(fw.seqs()) >= 4, 30), fw.text()[-20:]
                # A private server instance opens what the module sent and makes genuine acks
                # (never published as such, except where said).
                ingest = Ingest(from_home(chain.home), Store(tmp_path / "private.sqlite3"))
                acks = []
                deadline = time.monotonic() + 20
                while len(acks) < 2 and time.monotonic() < deadline:
                    msg = tap.get(1)
                    if msg:
                        acks += [a for _, a in ingest.handle(msg[0], msg[1])]
                assert len(acks) >= 2
                first, second = acks[0], acks[1]
                down = "serene/%s/down" % DEVICE
                bogus = [
                    os.urandom(40),  # stray bytes
                    b"",  # empty
                    first[:-3],  # truncated
                    first[:-1] + bytes([first[-1] ^ 1]),  # forged: one bit of the tag
                    bytes([first[0]]) + bytes([first[1] ^ 0x40]) + first[2:],  # forged header
                    b"import os; os.remove('outbox')",  # a "command": never executed
                ]
                # genuine and fresh: the only one that may count; then the same again (a
                # replay) and an older one (a lower server partial IV: a replay too). Spaced
                # so that the radio's bounded downlink queue (which drops and counts a burst)
                # hands every one to the link.
                for payload in bogus + [second, second, first]:
                    tap.publish(down, payload)
                    time.sleep(0.3)
                assert fw.wait(60) == 0, "\n".join(fw.text()[-30:])
    finally:
        sim.stop()
    s = fw.summary()
    assert s["radio_downlinks"] == len(bogus) + 3 and s["radio_downlinks_dropped"] == 0, s
    assert s["link_acks"] == 1, s
    assert s["link_acks_rejected"] + s["link_downlink_dropped"] == len(bogus) + 2, s
    assert s["acks_rejected"] >= 6, s  # counted by reason by the epoch's ack opener
    assert s["task_restarts"] == 0
    # Nothing beyond what the genuine ack covered left the outbox: it is not empty.
    assert "I app: drain: outbox NOT empty" in fw.text()
    assert (tmp_path / "flash" / "outbox").is_dir()


def test_epoch_rotation_while_running_delivers_every_epoch_complete(tmp_path, mpy_dir):
    sim = PumpSimulator(scenario="normal-feed", speed=1.0)
    sim.start()
    try:
        with Chain(tmp_path, checkpoint_every=4, se_time_scale=0.25) as chain:
            fw = Firmware(mpy_dir, config(tmp_path, chain, sim, epoch_rotate_s=3, run_for_s=11,
                                          drain_s=30))
            assert fw.wait(120) == 0, "\n".join(fw.text()[-30:])
            chain.service.wait_idle(15)
            ledger = chain.ledger()
    finally:
        sim.stop()
    started = fw.epochs()
    assert len(started) >= 3 and started == sorted(started)  # new keys every 3 s
    assert sum(1 for ln in fw.text() if ln.startswith("I app: epoch rotated to")) >= 2
    assert "I app: drain: outbox empty" in fw.text()
    epochs = {e["epoch"]: e for e in ledger["epochs"]}
    assert set(started) <= set(epochs)
    for number in started:
        e = epochs[number]
        assert e["missing"] == 0 and e["by_kind"].get("epoch") == 1, e
    assert ledger["complete"] and ledger["checkpoint_mismatches"] == 0
    assert fw.summary()["se_errors"] == 0


def test_reboot_with_a_backlog_larger_than_the_link_window_drains(tmp_path, mpy_dir):
    # After a reboot the server can seal acks only with the new epoch's key once it has the
    # new epoch record, which the outbox holds behind the whole backlog: the link must send
    # it first, or a full window of unacknowledged backlog blocks delivery for good.
    sim = PumpSimulator(scenario="normal-feed", speed=1.0)
    sim.start()
    try:
        with Chain(tmp_path, checkpoint_every=32, se_time_scale=0.25, server=False) as chain:
            fw = Firmware(mpy_dir, config(tmp_path, chain, sim, poll_period_ms=5))
            assert fw.wait_for(lambda: len(fw.seqs()) >= 150, 60), fw.text()[-20:]
            fw.stop()
            backlog = fw.epoch(), fw.seqs()
            chain.start_server()
            fw = Firmware(mpy_dir, config(tmp_path, chain, sim, run_for_s=1, drain_s=60))
            assert fw.wait(120) == 0, "\n".join(fw.text()[-30:])
            chain.service.wait_idle(15)
            stored_old = stored_seqs(chain, backlog[0])
    finally:
        sim.stop()
    assert len(backlog[1]) > 2 * 32  # more than two windows
    assert "I app: drain: outbox empty" in fw.text(), fw.text()[-20:]
    assert set(backlog[1]) <= stored_old


def test_secure_element_missing_at_boot_is_retried_and_nothing_crashes(tmp_path, mpy_dir):
    from serene.i2c_bridge import I2CBridgeServer

    sim = PumpSimulator(scenario="normal-feed", speed=1.0)
    sim.start()
    try:
        with Chain(tmp_path, checkpoint_every=8, se_time_scale=0.25) as chain:
            port = B.free_port()  # nothing listens there yet: an unanswering bus
            fw = Firmware(mpy_dir, config(tmp_path, chain, sim, se_bridge_port=port,
                                          run_for_s=4, drain_s=30))
            assert fw.wait_for(lambda: sum("epoch start failed" in ln for ln in fw.text()) >= 2,
                               30), fw.text()[-20:]
            assert fw.proc.poll() is None  # still running, retrying
            with I2CBridgeServer({0x20: chain.emu}, port=port):  # the chip answers now
                assert fw.wait(120) == 0, "\n".join(fw.text()[-30:])
            chain.service.wait_idle(15)
            stored = stored_seqs(chain, fw.epoch())
    finally:
        sim.stop()
    text = fw.text()
    assert any(ln.startswith("E delivery: epoch start failed: NackTimeout") for ln in text), \
        text[:10]
    assert "I app: drain: outbox empty" in text
    assert not [ln for ln in text if ln.startswith("Traceback") or "task" in ln and "died" in ln]
    assert set(fw.seqs()) <= stored and len(fw.seqs()) >= 4
    assert fw.summary()["se_errors"] >= 2
