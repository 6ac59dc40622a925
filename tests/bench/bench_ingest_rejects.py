# What a hostile frame costs the server (issue 8 item 2): server CPU per 1,024-byte frame
# of rejects, through Ingest.process() with a commit every 100 frames (as the intake batches).
#
#   .venv/bin/python tests/bench/bench_ingest_rejects.py [FRAMES]
#
#   unknown kind        64 entries (the most a frame may have) of an unknown kind, 1,024 B
#   too many entries    341 one-byte entries: one reject for the frame, parsed no further
#   bad seal            20 records whose tag does not verify (a pycose AEAD open each),
#                       without and with the default work budget
#   bad sig, unbudgeted 7 epoch records (in range) with a bad signature: cert + ES256 each
#   bad sig, budgeted   the same with the default work budget: a few verifications a
#                       second, the rest refused ("work budget") at once
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

from serene.server.ingest import Ingest  # noqa: E402
from serene.server.store import Store, db_path  # noqa: E402
from serene.stsafe.provision import provision  # noqa: E402
from serene.verifier import from_home  # noqa: E402
from test_server import DEV, EPOCH, K_EPOCH, K_RECORD, FakeModule  # noqa: E402


def home_for(tmp):
    home = pathlib.Path(tmp) / "home"
    provision(home, [DEV])
    reg = json.loads((home / "registry.json").read_text())
    reg["devices"][DEV]["first_epoch"] = EPOCH
    (home / "registry.json").write_text(json.dumps(reg))
    return home


def run(template, name, frame, n, **kw):
    import shutil

    home = pathlib.Path(tempfile.mkdtemp(dir=template.parent))
    shutil.copytree(template, home, dirs_exist_ok=True)  # a fresh database for each case
    ing = Ingest(from_home(home), Store(db_path(home)), **kw)
    m = FakeModule(home, DEV)
    ing.handle("serene/%s/up" % DEV, m.frame((K_EPOCH, 0, m.new_epoch())))
    ing.commit()
    topic = "serene/%s/up" % DEV
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        ing.process(topic, frame)
        if i % 100 == 99:
            ing.commit()
    ing.commit()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    led = ing.store.device_ledger(DEV)
    ing.close()
    rej = ", ".join("%s %d" % kv for kv in sorted(led["rejects"].items()))
    print("%-20s %5d B  %8.1f us CPU/frame  %8.1f us wall/frame   rejects: %s"
          % (name, len(frame), cpu / n * 1e6, wall / n * 1e6, rej))
    return cpu / n


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as tmp:
        home = home_for(tmp)
        m = FakeModule(home, DEV)
        m.new_epoch()
        from serene import linkframe as lf

        def frame(entries, epoch=EPOCH):
            return lf.build(lf.Frame(epoch, tuple(lf.Entry(k, s, d, len(d))
                                                  for k, s, d in entries)))

        base = frame([(99, 1000 + i, bytes(11)) for i in range(64)])
        unknown = frame([(99, 1000 + i, bytes(11)) for i in range(63)]  # exactly 1,024 B
                        + [(99, 1063, bytes(11 + 1024 - len(base)))])
        assert len(unknown) == 1024
        many = frame([(99, i % 100, b"x") for i in range(341)])[:1024]
        bad_seal = []
        for s in range(1, 21):
            r = bytearray(m.record(s))
            r[-1] ^= 1
            bad_seal.append((K_RECORD, s, bytes(r)))
        bad_seal = frame(bad_seal)
        ep = bytearray(m.new_epoch(EPOCH + 1, by_value=False))
        ep[-1] ^= 1
        bad_sig = frame([(K_EPOCH, 0, bytes(ep))] * 7, epoch=EPOCH + 1)
        print("%d frames each, one device, Ingest.process() + a commit every 100 frames"
              % n)
        run(home, "unknown kind", unknown, n)
        run(home, "too many entries", many, n)
        run(home, "bad seal, unbudgeted", bad_seal, n, budget_rate=1e12, budget_burst=1e12)
        run(home, "bad seal, budgeted", bad_seal, n)
        run(home, "bad sig, unbudgeted", bad_sig, max(50, n // 20), budget_rate=1e12,
            budget_burst=1e12)
        run(home, "bad sig, budgeted", bad_sig, n)


if __name__ == "__main__":
    main()
