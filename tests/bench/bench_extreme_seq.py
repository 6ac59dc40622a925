# The cost of one authentic object at an extreme sequence number (issue 8 item 5): state is
# kept as ranges, so ingesting, ledgering, reporting and auditing one object at seq 2**32-2
# costs what one at seq 10 costs.
#
#   .venv/bin/python tests/bench/bench_extreme_seq.py
#
# For each seq, in a fresh database: the epoch record is stored first (not measured); then,
# under tracemalloc, one authentic status record at that seq (Ingest.handle: verify, store,
# ack), the ledger (Store.device_ledger), the report table, a checkpoint covering 1..seq
# (proving the rest never sealed) and the at-rest audit. Time is wall time of each step,
# memory the tracemalloc peak above what was allocated before the step (after a warm-up).
import json
import pathlib
import shutil
import sys
import tempfile
import time
import tracemalloc

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

from serene.server import audit, report  # noqa: E402
from serene.server.ingest import Ingest  # noqa: E402
from serene.server.store import Store, db_path  # noqa: E402
from serene.stsafe.provision import provision  # noqa: E402
from serene.verifier import from_home  # noqa: E402
from test_server import DEV, EPOCH, K_CHECKPOINT, K_EPOCH, K_RECORD, FakeModule  # noqa: E402


def measure(template, seq):
    home = pathlib.Path(tempfile.mkdtemp(dir=template.parent)) / "home"
    shutil.copytree(template, home)
    ing = Ingest(from_home(home), Store(db_path(home)))
    m = FakeModule(home, DEV)
    up = "serene/%s/up" % DEV
    ing.handle(up, m.frame((K_EPOCH, 0, m.new_epoch())))
    rec = m.record(seq)
    cp = m.checkpoint(seq + 1, 1, {seq: rec})
    steps = [
        ("ingest", lambda: ing.handle(up, m.frame((K_RECORD, seq, rec)))),
        ("ledger", lambda: ing.store.device_ledger(DEV)),
        ("report", lambda: report.table({DEV: ing.store.device_ledger(DEV)})),
        ("checkpoint", lambda: ing.handle(up, m.frame((K_CHECKPOINT, seq + 1, cp)))),
        ("audit", lambda: audit.audit(home)),
    ]
    out = {}
    tracemalloc.start()
    for name, fn in steps:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        res = fn()
        out[name] = (time.perf_counter() - t0, tracemalloc.get_traced_memory()[1] - before)
        if name == "audit":
            assert res["ok"], res
    tracemalloc.stop()
    led = ing.store.device_ledger(DEV)
    assert led["complete"] and led["epochs"][0]["never_sealed"] == (
        [[1, seq - 1]] if seq > 1 else [])
    ing.close()
    return out


def main():
    with tempfile.TemporaryDirectory() as tmp:
        template = pathlib.Path(tmp) / "template"
        provision(template, [DEV])
        reg = json.loads((template / "registry.json").read_text())
        reg["devices"][DEV]["first_epoch"] = EPOCH
        (template / "registry.json").write_text(json.dumps(reg))
        measure(template, 5)  # warm-up: imports and first-use caches are not the seq's cost
        rows = {seq: measure(template, seq) for seq in (10, 2**32 - 2)}
    print("%-11s %26s %26s" % ("step", "seq 10", "seq 2**32-2"))
    for name in rows[10]:
        a, b = rows[10][name], rows[2**32 - 2][name]
        print("%-11s %12.2f ms %9.1f KiB %12.2f ms %9.1f KiB"
              % (name, a[0] * 1e3, a[1] / 1024, b[0] * 1e3, b[1] / 1024))


if __name__ == "__main__":
    main()
