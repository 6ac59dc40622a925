"""The firmware (from .mpy, on the unix port) against the pump simulator on a pty, through
`serene bench`: records match the simulated pump, and every bad-line scenario is survived,
named and recorded. Simulated time runs faster than real time where the scenario is long."""

import json
import subprocess
import sys


def bench(tmp_path, scenario, duration, speed=1.0, poll_ms=500, status_every=1):
    out = tmp_path / "summary.json"
    res = subprocess.run(
        [sys.executable, "-m", "serene", "bench", "--scenario", scenario,
         "--duration", str(duration), "--speed", str(speed), "--poll-ms", str(poll_ms),
         "--status-every", str(status_every), "--workdir", str(tmp_path / "work"),
         "--json-summary", str(out), "--quiet", "--pump-only"],
        capture_output=True, text=True, timeout=duration + 120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads(out.read_text())
    assert summary["firmware_errors"] == [], summary["firmware_errors"]
    assert summary["sequence_gaps"] == 0
    assert summary["firmware_health"]["task_restarts"] == 0
    return summary


def test_normal_feed_records_match_the_simulator(tmp_path):
    s = bench(tmp_path, "normal-feed", duration=6)
    kinds = s["records_by_kind"]
    assert kinds["identity"] == 1 and kinds["status"] >= 4
    assert s["volume_checked"] >= 4
    assert s["volume_mismatches"] == 0
    assert s["pump_link_conditions"] == {}
    # The last record is at most one poll behind the simulator (125 ml/h = 0.035 ml/s).
    assert 0 <= s["simulator_volume_ml"] - s["last_status_volume_ml"] <= 0.1


def test_occlusion_alarm_is_recorded(tmp_path):
    s = bench(tmp_path, "occlusion-alarm", duration=8, speed=30)  # alarm at 4 s real time
    assert s["records_by_kind"].get("pump_event", 0) >= 1
    assert s["alarm_records"] >= 1
    assert s["volume_mismatches"] == 0


def test_power_cycle_is_recorded_as_reset_and_reconnection(tmp_path):
    s = bench(tmp_path, "power-cycle", duration=12, speed=10)  # off at 6 s for 1 s
    assert s["module_events"].get("volume_reset") == 1
    assert s["module_events"].get("pump_reconnected", 0) >= 1
    assert s["records_by_kind"]["identity"] >= 2


def test_noisy_line_is_survived_and_named(tmp_path):
    s = bench(tmp_path, "noisy-line", duration=10, speed=10)
    conds = s["pump_link_conditions"]
    assert sum(conds.values()) >= 5, conds
    assert {"checksum", "noise"} & set(conds), conds
    assert s["records_by_kind"]["status"] >= 3
    assert s["volume_mismatches"] == 0
    assert s["alarm_records"] >= 1  # the alarm at 1 min got through the noise


def test_unplugged_pump_is_reported_and_polling_resumes(tmp_path):
    s = bench(tmp_path, "unplugged", duration=30, speed=6)  # silent from 10 s to 20 s
    assert s["module_events"].get("pump_disconnected", 0) >= 1
    assert s["module_events"].get("pump_reconnected", 0) >= 1
    assert s["pump_link_conditions"].get("timeout", 0) >= 3
