"""`serene bench --db postgresql://...`: the whole chain end to end, unchanged, on a private
PostgreSQL (tests/conftest.py: pg_cluster); every record stored once, the ledger complete, the
clinicians' application (the bench's screenshots) served from the same database."""

import json
import subprocess
import sys

from serene.server.store import Store


def test_bench_on_postgresql_stores_every_record_once(tmp_path, pg_cluster):
    url = pg_cluster.url(pg_cluster.create())
    out = tmp_path / "summary.json"
    res = subprocess.run(
        [sys.executable, "-m", "serene", "bench", "--db", url, "--duration", "8",
         "--status-every", "1", "--checkpoint-every", "4", "--workdir", str(tmp_path / "work"),
         "--json-summary", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "server database postgresql://serene@127.0.0.1" in res.stdout
    s = json.loads(out.read_text())
    assert s["firmware_errors"] == []
    assert s["records_produced"] >= 5
    assert s["records_stored"] == s["records_produced"]  # 100 %, each once
    assert s["records_produced_not_stored"] == []
    assert s["gaps"] == 0 and s["sequence_gaps"] == 0 and s["rejects"] == 0
    assert s["complete"] is True and s["checkpoints"]["mismatch"] == 0
    # In the database itself: one row per (device, epoch, seq), no duplicate stored.
    st = Store(url, readonly=True)
    try:
        rows = [tuple(r) for r in st.execute("SELECT device, epoch, seq FROM objects")]
        records = st.execute("SELECT COUNT(*) FROM objects WHERE kind = 'record'")[0][0]
        app_tables = st.execute("SELECT COUNT(*) FROM app_users")[0][0]
    finally:
        st.close()
    assert len(rows) == len(set(rows)) and records >= s["records_produced"]
    assert app_tables >= 1  # the screenshots' account: the application ran on it
    assert "bench: screenshot" in res.stdout, res.stdout  # pages served from PostgreSQL
