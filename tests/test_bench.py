"""The main job, `serene bench` on its defaults but shorter: the whole chain end to end."""

import json
import subprocess
import sys


def test_bench_delivers_every_record_verified_and_complete(tmp_path):
    out = tmp_path / "summary.json"
    res = subprocess.run(
        [sys.executable, "-m", "serene", "bench", "--duration", "12", "--status-every", "1",
         "--checkpoint-every", "4", "--workdir", str(tmp_path / "work"), "--json-summary",
         str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "bench summary" in res.stdout and "open gaps 0" in res.stdout
    s = json.loads(out.read_text())
    assert s["firmware_errors"] == []
    assert s["records_produced"] >= 8
    assert s["records_stored"] == s["records_produced"]  # 100 %, each once
    assert s["records_produced_not_stored"] == []
    assert s["gaps"] == 0 and s["sequence_gaps"] == 0 and s["rejects"] == 0
    assert s["complete"] is True
    assert s["checkpoints"]["verified"] >= 2 and s["checkpoints"]["mismatch"] == 0
    assert s["signed_objects"]["epoch"] == 1
    # Status records checked against the simulated pump (one a second once the epoch exists:
    # a loaded machine boots the firmware later, so fewer than the 12 s would give).
    assert s["volume_checked"] >= 5 and s["volume_mismatches"] == 0
    assert s["bytes_sent"] > 0 and s["heap_working_bytes"] > 0
