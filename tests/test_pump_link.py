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
import time

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
    stats = sim.snapshot()["stats"]
    assert stats["request_before_ack"] == 0  # every reply ACKed before the next request
    assert stats["acks_received"] == stats["replies_sent"] + stats["events_sent"]
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
    # keep-alive: after 3 s of silence the pump sends ENQ; the driver answers DC4 in < 100 ms
    time.sleep(3.3)
    stats = sim.snapshot()["stats"]
    assert stats["enq_sent"] >= 1 and len(stats["dc4_latency_ms"]) == stats["enq_sent"], stats
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


# --- bad input: each fault its own test -------------------------------------------------------
NO_FAULTS = {"faults": {"set": {k: 0 for k in ("noise", "bad_checksum", "control_in_frame",
                                                "too_long", "drop_ack", "drop_reply", "nak6")}}}


def feed_scenario(faults=None, actions=()):
    scen = load_scenario("normal-feed")
    scen["faults"] = dict(faults or {})
    scen["actions"] = list(actions)
    return scen


def connect(probe, tries=4):
    """connect() as the application does it: again after a PumpError (a noisy line can fail
    one attempt; the error is named, nothing is lost)."""
    for _ in range(tries):
        got = probe.cmd("connect")
        if "ident" in got:
            return got
        assert got["class"] in ("PumpError", "PumpTimeout", "PumpDisconnected"), got
    raise AssertionError("no connect in %d tries: %s" % (tries, got))


def finish(sim, probe, events, alarms=True):
    """Faults off, then: one clean poll equals the model; every condition the driver counted
    was reported as an EV_LINK event (no overflow); the alarm set and cleared during the
    faults arrived once each, in order; the reader is alive; the line stayed read-only."""
    sim.act({"do": "faults", **NO_FAULTS["faults"]})
    for _ in range(3):  # a frame damaged just before the faults stopped may still fail one
        before = sim.snapshot()
        got = probe.cmd("poll")
        after = sim.snapshot()
        if "status" in got:
            break
    assert "status" in got, got
    assert before["volume"] <= got["status"]["volume"] <= after["volume"]
    assert got["status"]["alarms"] == after["alarms"]
    events += probe.cmd("events")["events"]
    st = assert_clean_link(sim, probe)
    counters = st["counters"]
    assert counters["event_overflow"] == 0, counters
    assert counters["internal"] == 0, counters
    reported = {}
    for e in events:
        if e["kind"] == "link":
            reported[e["cond"]] = reported.get(e["cond"], 0) + 1
    assert reported == {k: v for k, v in counters.items() if v}, (reported, counters)
    if alarms:
        pumps = [e["values"] for e in events if e["kind"] == "pump"]
        assert pumps == [{"a": 1, "u": 6}, {"a": 0, "u": 1}], pumps
    return counters


def faulty_session(bench, faults, seed=1, polls=6, gap=50):
    """Connect, poll through the faults, with an occlusion alarm set then cleared meanwhile."""
    sim, probe = bench(feed_scenario(faults), seed=seed)
    connect(probe)
    events = []
    results = probe.cmd("polls %d %d" % (polls, gap))["polls"]
    sim.act({"do": "alarm", "bits": 1})
    results += probe.cmd("polls %d %d" % (polls, gap))["polls"]
    sim.act({"do": "clear_alarm", "bits": 1})
    results += probe.cmd("polls %d %d" % (polls, gap))["polls"]
    events += probe.cmd("events")["events"]
    return sim, probe, events, results


def faults_logged(sim, name):
    return sum(1 for _, what in sim.log if what.startswith("fault " + name))


def test_random_bytes_on_the_line(bench):
    sim, probe, events, results = faulty_session(bench, {"noise": 0.7}, seed=3)
    counters = finish(sim, probe, events)
    assert faults_logged(sim, "noise") >= 5
    assert counters["noise"] >= 3, counters
    # A burst can hold a NAK (0x15) and an error byte: that request fails with a named error.
    ok = sum(1 for r in results if "status" in r)
    assert ok >= len(results) - 3, results
    for r in results:
        assert "status" in r or r["error"] in ("nak", "timeout"), r


def test_wrong_checksums(bench):
    sim, probe, events, results = faulty_session(bench, {"bad_checksum": 0.5}, seed=2)
    counters = finish(sim, probe, events)
    n = faults_logged(sim, "bad_checksum")
    assert n >= 5
    # every corrupted frame was NAKed '2', counted and reported once, and sent again clean
    assert counters["checksum"] == n == sim.snapshot()["stats"]["naks_received"]["2"]
    assert all("status" in r for r in results), results


def test_control_bytes_inside_frames(bench):
    sim, probe, events, results = faulty_session(bench, {"control_in_frame": 0.5}, seed=4)
    counters = finish(sim, probe, events)
    n = faults_logged(sim, "control_in_frame")
    assert n >= 5
    assert counters["control_in_frame"] == n == sim.snapshot()["stats"]["naks_received"]["8"]
    assert all("status" in r for r in results), results


def test_frames_over_80_chars(bench):
    sim, probe, events, results = faulty_session(bench, {"too_long": 0.5}, seed=5)
    counters = finish(sim, probe, events)
    n = faults_logged(sim, "too_long")
    assert n >= 5
    assert counters["too_long"] == n == sim.snapshot()["stats"]["naks_received"]["7"]
    assert all("status" in r for r in results), results


def test_missing_acks_and_a_slow_pump(bench):
    # The pump forgets to ACK half the requests (the reply still comes) and answers 300 ms late.
    sim, probe, events, results = faulty_session(
        bench, {"drop_ack": 0.5, "delay_ms": 300}, polls=3, gap=10
    )
    counters = finish(sim, probe, events)
    assert faults_logged(sim, "drop_ack") >= 3
    assert all("status" in r for r in results), results
    assert not any(counters.values()), counters


def test_pump_stops_answering_then_comes_back(bench):
    # speed 20: unplugged at 40 s (2 s real) for 160 s (8 s real); an occlusion at 100 s and
    # its clearing at 120 s happen while the line is dead: the pump sends both when it is back.
    scen = feed_scenario(
        actions=[
            {"at": 40, "do": "unplug", "for": 160},
            {"at": 100, "do": "alarm", "bits": 1},
            {"at": 120, "do": "clear_alarm", "bits": 1},
        ]
    )
    sim, probe = bench(scen, speed=20.0)
    connect(probe)
    got = probe.cmd("polls 30 300 recover", timeout=60)["polls"]
    kinds = [r.get("error", "ok") for r in got]
    # ok..., then time-outs (each poll: 1 s + one retry), then disconnected, then ok again
    first_bad = next(i for i, k in enumerate(kinds) if k != "ok")
    assert kinds[first_bad : first_bad + 2] == ["timeout", "timeout"], kinds
    assert kinds[first_bad + 2] == "disconnected", kinds
    assert kinds[-1] == "ok", kinds
    assert "timeout" not in kinds[first_bad + 3 :], kinds  # disconnected = PumpDisconnected
    events = probe.cmd("events")["events"]
    conds = [e["cond"] for e in events if e["kind"] == "link"]
    assert conds.index("disconnected") < conds.index("reconnected"), conds
    rec = [e for e in events if e.get("cond") == "reconnected"]
    assert len(rec) == 1 and rec[0]["values"] == {"cause": 7}, rec  # COND_DISCONNECTED
    assert [e for e in events if e.get("cond") == "disconnected"][0]["values"] == {"failures": 3}
    finish(sim, probe, events)
    assert sim.snapshot()["stats"]["commands"]["DC"] == 2


def test_nak_storm(bench):
    # From 2 s to 5 s the pump answers every request NAK '6' (receiver not ready).
    scen = feed_scenario(
        actions=[
            {"at": 2, "do": "faults", "set": {"nak6": 1.0}},
            {"at": 3, "do": "alarm", "bits": 1},
            {"at": 4, "do": "clear_alarm", "bits": 1},
            {"at": 5, "do": "faults", "set": {"nak6": 0.0}},
        ]
    )
    sim, probe = bench(scen)
    connect(probe)
    got = probe.cmd("polls 40 300 recover", timeout=60)["polls"]
    kinds = [r.get("error", "ok") for r in got]
    first_bad = next(i for i, k in enumerate(kinds) if k != "ok")
    # each failed poll = NAK '6', retry, NAK '6'; the third in a row makes it disconnected
    assert kinds[first_bad : first_bad + 3] == ["nak", "nak", "disconnected"], kinds
    assert kinds[-1] == "ok", kinds
    events = probe.cmd("events")["events"]
    naks = [e for e in events if e.get("cond") == "nak"]
    assert naks and all(e["values"] == {"err": ord("6")} for e in naks)
    assert len(naks) == sim.snapshot()["stats"]["naks_sent"]["6"]
    assert any(e.get("cond") == "reconnected" for e in events)
    finish(sim, probe, events)


def test_pump_power_cycle(bench):
    # Off at 3 s for 2 s: the pump comes back in standby, volume 0, no session (I;0D).
    scen = feed_scenario(actions=[{"at": 3, "do": "power_cycle", "off_s": 2}])
    sim, probe = bench(scen)
    connect(probe)
    before = probe.cmd("poll")["status"]
    assert before["volume"] >= 100000
    got = probe.cmd("polls 30 300 recover", timeout=60)["polls"]
    assert sim.snapshot()["power_cycles"] == 1
    kinds = [r.get("error", "ok") for r in got]
    assert kinds[-1] == "ok", kinds
    last = got[-1]["status"]
    assert last["volume"] == 0 and last["state"] == 0, last  # counter reset, standby
    events = probe.cmd("events")["events"]
    refused = [e for e in events if e.get("cond") == "refused"]
    assert refused and refused[0]["values"]["code"] == 0x0D, events
    rec = [e for e in events if e.get("cond") == "reconnected"]
    assert len(rec) == 1 and rec[0]["values"] == {"cause": 9}, rec  # COND_REFUSED (I;0D)
    assert sim.snapshot()["subscribed"] == "auez"  # events subscribed again after the reboot
    # the alarms after the reboot still arrive spontaneously
    sim.act({"do": "alarm", "bits": 1})
    sim.act({"do": "clear_alarm", "bits": 1})
    probe.cmd("wait_event pump 2000 2")
    finish(sim, probe, events)


def test_noisy_line_scenario_file(bench):
    # Every fault at once (scenarios/noisy-line.json); speed 20: the occlusion at 60 s comes
    # 3 s after start, its clearing at 90 s 1.5 s later.
    sim, probe = bench("noisy-line", speed=20.0, seed=11)
    connect(probe)
    results = probe.cmd("polls 30 100", timeout=60)["polls"]
    assert sim.snapshot()["sim_time_s"] > 95
    events = probe.cmd("events")["events"]
    counters = finish(sim, probe, events)
    assert sum(1 for r in results if "status" in r) >= len(results) - 6, results
    seen = {k for k, v in counters.items() if v}
    assert {"noise", "checksum", "control_in_frame"} <= seen, counters
