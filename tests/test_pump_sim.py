"""The pump simulator on its own: the model against the spec's arithmetic, and its link side
driven byte by byte from this test through the pty (frames built here from the spec's rule)."""

import json
import os
import pathlib
import select
import subprocess
import sys
import time
import tty

import pytest

from serene import REPO
from serene.pumpsim import PumpSimulator, ScenarioError, load_scenario
from serene.pumpsim import model as m

ACK, NAK, ENQ, DC4 = b"\x06", b"\x15", b"\x05", b"\x14"


def frame(body: bytes) -> bytes:
    return b"\x02" + body + b"%02X\x03" % (0xFF - (sum(body) & 0xFF))


# --- model --------------------------------------------------------------------------------------
def test_volume_grows_by_rate_over_3600_each_second_exactly():
    pm = m.PumpModel({"rate": 1250, "state": m.RUNNING, "dose": 10**9})
    for s in range(1, 3601):
        pm.tick()
        assert pm.volume == 1250 * 100 * s // 3600  # 0.001 ml, floor of the exact value
    assert pm.volume == 125000  # 125 ml in an hour at 125 ml/h


def test_no_delivery_unless_running_and_occlusion_stops_it():
    pm = m.PumpModel({"rate": 1250, "state": m.PAUSED})
    pm.tick()
    assert pm.volume == 0
    pm.start()
    pm.tick()
    assert pm.volume == 34
    pm.set_alarm(1 << 0)  # downstream occlusion
    assert pm.state == m.ALARM_HOLD
    v = pm.volume
    pm.tick()
    assert pm.volume == v
    assert list(pm.changes)[-1] == {"a": 1, "u": 6}


def test_dose_complete_sets_state_5_and_alarm_bit_6():
    pm = m.PumpModel({"rate": 36000, "volume": 0, "dose": 5000, "state": m.RUNNING})
    for _ in range(10):  # 3600 ml/h = 1 ml/s: 5 ml in 5 s
        pm.tick()
    assert pm.volume == 5000
    assert pm.state == m.DOSE_COMPLETE and pm.alarms & (1 << 6)
    assert pm.log_entry(1)["u"] == m.DOSE_COMPLETE


def test_remaining_time_matches_the_spec_example():
    # spec: d4E2 (125.0 ml/h), r186A0 (100 ml), vF4240 (1000 ml) -> t1B0 (432 min)
    pm = m.PumpModel({"rate": 0x4E2, "volume": 0x186A0, "dose": 0xF4240, "state": m.RUNNING})
    assert pm.remaining_min() == 0x1B0


def test_battery_lasts_24_h_at_125_ml_h():
    pm = m.PumpModel(
        {"rate": 1250, "state": m.RUNNING, "dose": 10**9, "power": 0, "battery": 100}
    )
    for _ in range(24 * 3600 - 60):
        pm.tick()
    assert pm.battery > 0 and not pm.alarms & (1 << 5)
    assert pm.alarms & (1 << 4)  # battery low came first
    for _ in range(120):
        pm.tick()
    assert pm.battery == 0 and pm.alarms & (1 << 5) and pm.state == m.ALARM_HOLD


def test_event_log_keeps_64_newest_entries():
    pm = m.PumpModel({"rate": 1250, "state": m.RUNNING})
    for i in range(70):
        pm.pause() if i % 2 == 0 else pm.start()
    assert pm.log_entry(1)["q"] == 70 and pm.log_entry(64)["q"] == 7
    assert pm.log_entry(65) == {}


def test_scenario_validation():
    with pytest.raises(ScenarioError, match="unknown scenario"):
        load_scenario("no-such-scenario")
    with pytest.raises(ScenarioError, match="unknown faults"):
        load_scenario({"faults": {"lightning": 1}})
    with pytest.raises(ScenarioError, match="'do' must be"):
        load_scenario({"actions": [{"at": 1, "do": "explode"}]})
    with pytest.raises(ScenarioError, match="numeric 'at'"):
        load_scenario({"actions": [{"do": "start"}]})


# --- link, from the host's side -------------------------------------------------------------
class Host:
    """This test as the host, on the simulator's pty."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        self.buf = b""

    def send(self, data):
        os.write(self.fd, data)

    def read_until(self, n=None, end=None, timeout=2.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if n is not None and len(self.buf) >= n:
                break
            if end is not None and end in self.buf:
                break
            r, _, _ = select.select([self.fd], [], [], 0.02)
            if r:
                self.buf += os.read(self.fd, 4096)
        if end is not None:
            i = self.buf.find(end)
            n = len(self.buf) if i < 0 else i + len(end)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def request(self, payload, address=b"1"):
        self.send(frame(address + payload))
        got = self.read_until(end=b"\x03")
        self.send(ACK)
        return got

    def close(self):
        os.close(self.fd)


@pytest.fixture
def host_sim():
    made = []

    def start(scenario="normal-feed", **kw):
        sim = PumpSimulator(scenario, **kw).start()
        host = Host(sim.device_path)
        made.append((sim, host))
        return sim, host

    yield start
    for sim, host in made:
        host.close()
        sim.stop()


def test_bad_host_frames_get_the_right_nak(host_sim):
    sim, host = host_sim()
    good = frame(b"1DC")
    cases = [
        (good[:-3] + b"00\x03", b"2"),  # checksum
        (frame(b"0DC"), b"4"),  # another address (spec example `0DC` -> 48)
        (frame(b"1LE;" + b"d" * 78), b"7"),  # 81 payload chars
        (good[:3] + b"\x10" + good[3:], b"8"),  # control byte inside
        (good[:3] + b"\xc3" + good[3:], b"1"),  # not 7-bit ASCII
        (b"\x02\x03", b"2"),  # no room for a checksum
    ]
    host.send(frame(b"1LE;" + b"d" * 77))  # 80 payload chars: fine (no session yet)
    assert host.read_until(end=b"\x03") == ACK + frame(b"1I;0D")
    host.send(ACK)
    for data, err in cases:
        host.send(data)
        assert host.read_until(2) == NAK + err, (data, err)
    assert sim.snapshot()["stats"]["naks_sent"] == {"2": 2, "4": 1, "7": 1, "8": 1, "1": 1}
    assert sim.snapshot()["stats"]["commands"] == {"LE": 1}  # only the 80-char one


def test_session_rules_and_replies(host_sim):
    sim, host = host_sim()
    assert host.request(b"LE;d") == ACK + frame(b"1I;0D")  # no session yet
    assert host.request(b"DC") == ACK + b"\x02" + b"1C" + b"8B" + b"\x03"  # spec bytes
    assert host.request(b"LE;d") == ACK + frame(b"1I;03")  # within 1 s of DC
    assert sim.snapshot()["stats"]["early_commands"] == 1
    time.sleep(1.0)
    assert host.request(b"LF;b") == ACK + b"\x02" + b"1C;bAPPLIX" + b"20" + b"\x03"
    snap = sim.snapshot()
    got = host.request(b"LE;durvta")
    fields = dict((f[:1].decode(), int(f[1:], 16)) for f in got[3:-3].split(b";")[1:])
    assert fields["d"] == 1250 and fields["u"] == 2 and fields["v"] == 1000000
    assert snap["volume"] <= fields["r"] <= sim.snapshot()["volume"]
    assert host.request(b"LE;q") == ACK + frame(b"1I;0B")  # unknown id
    assert host.request(b"LH;41") == ACK + frame(b"1I;1A")  # out of range (65)
    assert host.request(b"LH;00") == ACK + frame(b"1I;1A")
    assert host.request(b"LH;01") == ACK + frame(b"1C")  # empty log
    assert host.request(b"XX") == ACK + frame(b"1I;01")


def test_event_sent_acked_confirmed_and_resent_when_not_confirmed(host_sim):
    sim, host = host_sim()
    host.request(b"DC")
    time.sleep(1.0)
    assert host.request(b"DE;au") == ACK + frame(b"1C")
    sim.act({"do": "alarm", "bits": 1})
    assert host.read_until(end=b"\x03") == b"\x02" + b"1E;a1;u6" + b"D6" + b"\x03"  # spec bytes
    host.send(ACK)  # ACK but no confirmation: the pump sends it again after 1 s
    t0 = time.monotonic()
    again = host.read_until(end=b"\x03", timeout=3)
    assert again == frame(b"1E;a1;u6") and time.monotonic() - t0 > 0.9
    host.send(ACK + frame(b"1E"))
    assert host.read_until(1) == ACK
    time.sleep(1.3)
    assert host.read_until(1, timeout=0.2) == b""  # confirmed: not sent again
    st = sim.snapshot()["stats"]
    assert st["events_confirmed"] == 1 and st["event_resends"] == 1


def test_enq_after_3_s_of_silence_and_dc4_latency(host_sim):
    sim, host = host_sim()
    t0 = time.monotonic()
    assert host.read_until(1, timeout=4) == ENQ
    assert 2.9 < time.monotonic() - t0 < 3.5
    host.send(DC4)
    time.sleep(0.1)
    lat = sim.snapshot()["stats"]["dc4_latency_ms"]
    assert len(lat) == 1 and lat[0] < 100


def test_speed_runs_simulated_time(host_sim):
    sim, host = host_sim(speed=120)
    time.sleep(0.5)
    t = sim.snapshot()["sim_time_s"]
    assert 50 <= t <= 70, t


def test_cli_prints_the_device_path_and_stops_after_duration(tmp_path):
    serene = str(pathlib.Path(sys.executable).parent / "serene")  # the console script
    cmd = [serene, "pumpsim", "--scenario", "occlusion-alarm"]
    res = subprocess.run(
        cmd + ["--speed", "200", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("/dev/pts/")
    assert any("alarm {'bits': 1}" in line for line in lines), lines
    final = json.loads(lines[-1])
    assert final["state"] == m.ALARM_HOLD and 150 <= final["sim_time_s"] <= 260
    bad = subprocess.run(
        cmd[:-1] + ["nope"], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert bad.returncode == 1 and "serene: unknown scenario 'nope'" in bad.stderr
