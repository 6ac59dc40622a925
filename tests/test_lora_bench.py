"""`serene bench --radio lora`, short: the whole chain over LoRaWAN at DR5 with 10 % of the
uplink frames lost (at both gateways): module (firmware on the unix port, LoRaWAN MAC, UDP
modem shim) -> RF medium -> two Semtech UDP gateways -> stand-in network server (ChirpStack v4
MQTT integration) -> Mosquitto -> the medical server's LoRaWAN intake. Every record stored
exactly once, no gap, the acks within the daily downlink budget, asked for by the module."""

import json
import subprocess
import sys


def test_lora_bench_every_record_once_no_gap_downlinks_within_budget(tmp_path):
    out = tmp_path / "summary.json"
    res = subprocess.run(
        [sys.executable, "-m", "serene", "bench", "--radio", "lora", "--dr", "5",
         "--lora-loss", "0.1", "--downlinks-per-day", "10", "--duration", "20",
         "--drain", "600", "--status-every", "5", "--checkpoint-every", "8", "--quiet",
         "--workdir", str(tmp_path / "work"), "--json-summary", str(out)],
        capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    s = json.loads(out.read_text())
    assert s["firmware_errors"] == []
    assert s["records_produced"] >= 5
    assert s["records_stored"] == s["records_produced"]  # 100 %, each stored once
    assert s["records_produced_not_stored"] == []
    assert s["gaps"] == 0 and s["sequence_gaps"] == 0 and s["rejects"] == 0
    assert s["complete"] is True
    assert s["checkpoints"]["mismatch"] == 0 and s["checkpoints"]["verified"] >= 1
    lo = s["lora"]
    assert lo["dr_start"] == 5 and lo["fcnt_up"] >= s["frames_sent"]
    assert lo["time_on_air_ms"] > 0 and lo["uplinks_on_air"] >= s["frames_sent"]
    # Downlinks: only acks the module asked for (or enough pending), within the budget.
    assert 1 <= lo["downlinks_sent_by_server"] <= lo["downlinks_used_24h"] <= 10
    assert lo["ack_requests"] >= 1 and lo["link_ack_requests"] >= lo["ack_requests"] - 1
    # No sub-band above 1 % of the run (the MAC keeps every sliding hour within it; a run
    # shorter than an hour can only be within it on average too, give or take one frame).
    assert all(v <= 1.5 for v in lo["band_duty_pct"].values()), lo["band_duty_pct"]
    assert lo["netserver"].get("mic", 0) == 0 and lo["netserver"].get("replay", 0) == 0
    assert "lora                 DR5" in res.stdout
