"""The pump driver (MicroPython, compiled by mpy-cross, 64 KB heap) against the pump simulator
(CPython) on a pty: the whole link as on the bench, judged by the simulator's true state.

The driver runs in tests/upy/pump_probe.py, which takes one command a line on stdin and answers
one JSON line; the simulator is in this process, so each test can compare what the driver
reports with sim.snapshot() and sim.stats (what really crossed the line).
"""

import json
import queue
import subprocess
import threading

import pytest

from serene.pumpsim import PumpSimulator, load_scenario

PROBE = "tests/upy/pump_probe.py"
THERAPY_COMMANDS = {"RV", "PR", "PO", "PB", "SI", "MO", "FC"}


class Probe:
    """The driver in a micropython process, one command at a time."""

    def __init__(self, upy, procs, device, config=None, heap="64K"):
        args = [PROBE, device] + ([json.dumps(config)] if config else [])
        self.p = upy.popen(
            args,
            heap=heap,
            mpy=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        procs.append(self.p)
        self.lines = queue.Queue()
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        assert self._read(10) == {"ready": True}

    def _pump_stdout(self):
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read(self, timeout):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("probe silent for %s s" % timeout) from None
        if line is None:
            raise AssertionError("probe exited %s" % self.p.poll())
        try:
            return json.loads(line)
        except ValueError:
            rest = []
            while not self.lines.empty():
                rest.append(self.lines.get() or "")
            raise AssertionError("probe said: " + line + "".join(rest)) from None

    def cmd(self, line, timeout=30):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self._read(timeout)

    def quit(self):
        self.p.stdin.write("quit\n")
        self.p.stdin.flush()
        self.p.wait(10)


@pytest.fixture
def bench(upy, procs):
    """Start a simulator and a probe on its pty: bench(scenario, speed=..., config=...)."""
    sims = []

    def start(scenario="normal-feed", speed=1.0, seed=0, config=None):
        sim = PumpSimulator(scenario, speed=speed, seed=seed).start()
        sims.append(sim)
        return sim, Probe(upy, procs, sim.device_path, config)

    yield start
    for sim in sims:
        sim.stop()


def assert_clean_link(sim, probe):
    """What every test ends with: the reader alive, no therapy command ever on the line, the
    1 s after DC respected, every ENQ answered with DC4 within 100 ms."""
    st = probe.cmd("state")
    assert st["reader_alive"], st
    stats = sim.snapshot()["stats"]
    assert not THERAPY_COMMANDS & set(stats["commands"]), stats["commands"]
    assert stats["early_commands"] == 0, stats
    assert all(ms < 100 for ms in stats["dc4_latency_ms"]), stats["dc4_latency_ms"]
    assert stats["enq_unanswered"] == 0, stats
    return st


def test_connect_identify_poll_matches_the_model(bench):
    sim, probe = bench("normal-feed", speed=1.0)
    ident = probe.cmd("connect")
    assert ident == {"ident": ["APPLIX", "AX00012345", "2.4.1"]}
    assert sim.snapshot()["subscribed"] == "auez"
    for _ in range(3):
        before = sim.snapshot()
        got = probe.cmd("poll")
        after = sim.snapshot()
        assert "status" in got, got
        s = got["status"]
        # The volume the driver read lies between the model's true volume just before and
        # just after the poll, to the protocol's resolution (0.001 ml, integer on the wire).
        assert before["volume"] <= s["volume"] <= after["volume"], (before, s, after)
        for key in ("rate", "dose", "state", "alarms", "error", "mode", "power", "battery"):
            assert before[key] == s[key] == after[key], key
        assert after["remaining"] <= s["remaining"] <= before["remaining"]
        assert s["flush_rate"] == 0 and s["flush_volume"] == 0
    # the event log entry written by a change is readable with LH
    sim.act({"do": "pause"})
    assert probe.cmd("wait_event pump 2000")["event"]["values"] == {"u": 1}
    entry = probe.cmd("log 1")["log"]
    assert entry["u"] == 1 and entry["q"] == 1, entry
    assert probe.cmd("log 2") == {"log": {}}
    st = assert_clean_link(sim, probe)
    assert not any(st["counters"].values()), st["counters"]
    probe.quit()


def test_volume_grows_at_the_programmed_rate_at_speed(bench):
    # speed 60: a simulated minute a second. 125 ml/h = 34.72 ul/s: 2083 ul a simulated minute.
    sim, probe = bench("normal-feed", speed=60.0)
    probe.cmd("connect")
    a = probe.cmd("poll")["status"]
    a_time = sim.snapshot()["sim_time_s"]
    res = probe.cmd("polls 1 1000")  # one poll after a real second
    b = probe.cmd("poll")["status"]
    b_time = sim.snapshot()["sim_time_s"]
    assert "status" in res["polls"][0]
    dt = b_time - a_time
    expect = 1250 * 100 * dt // 3600
    assert abs((b["volume"] - a["volume"]) - expect) <= 2 * 35, (a, b, dt)
    probe.quit()


def test_alarm_event_arrives_without_a_poll(bench):
    sim, probe = bench("normal-feed")
    probe.cmd("connect")
    probe.cmd("events")
    sim.act({"do": "alarm", "bits": 1})  # downstream occlusion -> alarm hold
    got = probe.cmd("wait_event pump 1000")
    assert got["event"] is not None, got
    assert got["event"]["values"] == {"a": 1, "u": 6}
    assert got["ms"] < 300, got  # no poll was sent: it came on its own, at once
    stats = sim.snapshot()["stats"]
    assert stats["commands"].get("LE", 0) == 0
    assert stats["events_confirmed"] == 1  # ACKed, then confirmed with 1E
    assert_clean_link(sim, probe)
    probe.quit()


def test_occlusion_scenario_file(bench):
    # occlusion-alarm: occlusion at 120 s, cleared at 300 s, restart at 310 s. At speed 80 the
    # occlusion comes 1.5 s after start, once connect() (DC, 1 s, DE) has subscribed.
    sim, probe = bench("occlusion-alarm", speed=80.0)
    probe.cmd("connect")
    got = probe.cmd("wait_event pump 6000 3")
    pumps = [e["values"] for e in got["found"]]
    assert pumps == [{"a": 1, "u": 6}, {"a": 0, "u": 1}, {"u": 2}], pumps
    assert probe.cmd("poll")["status"]["state"] == 2
    assert_clean_link(sim, probe)
    probe.quit()


def test_scenarios_load():
    for name in ("normal-feed", "occlusion-alarm", "unplugged", "noisy-line", "power-cycle"):
        assert load_scenario(name)["initial"]["rate"] == 1250
