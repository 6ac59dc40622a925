# Medical server ingest benchmark: objects/s verified and stored, and whether it keeps up.
#
#   .venv/bin/python tests/bench/bench_mqtt_ingest.py [N] [--json FILE]
#
# N sealed status records (40 B of CBOR, ~50 B sealed) of one provisioned device, 20 a frame
# (a ~1 KiB LTE-M frame), made by tests/test_server.py's FakeModule:
#   direct   Ingest.handle() in-process: parse, verify (pycose AES-CCM), store in SQLite with
#            synchronous=FULL (one fsync per frame), seal the ack; reported per quarter too, to
#            show the cost per object does not grow with the epoch
#   mqtt     a device account publishes the frames (QoS 1) to the private Mosquitto, the
#            IngestService stores them and publishes acks; timed until the last ack is back
import json
import pathlib
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

from serene import broker as B  # noqa: E402
from serene.server.ingest import Ingest  # noqa: E402
from serene.server.service import IngestService  # noqa: E402
from serene.server.store import Store, db_path  # noqa: E402
from serene.stsafe.provision import provision  # noqa: E402
from serene.verifier import from_home  # noqa: E402
from test_server import DEV, EPOCH, K_EPOCH, K_RECORD, FakeModule  # noqa: E402

PER_FRAME = 20
WINDOW = 32  # frames in flight (~32 KiB)


def provision_fake(home):
    """A home for FakeModule: the registry's first epoch is its EPOCH (the server accepts a
    first epoch only near the one provisioning wrote: docs/wire-format.md, epoch acceptance)."""
    provision(home, [DEV])
    reg = json.loads((home / "registry.json").read_text())
    reg["devices"][DEV]["first_epoch"] = EPOCH
    (home / "registry.json").write_text(json.dumps(reg))


def frames_for(m, n):
    out = [m.frame((K_EPOCH, 0, m.new_epoch()))]
    for f in range(n // PER_FRAME):
        out.append(m.frame(*[(K_RECORD, s, m.record(s))
                             for s in range(1 + f * PER_FRAME, 1 + (f + 1) * PER_FRAME)]))
    return out


def bench_direct(n):
    with tempfile.TemporaryDirectory() as d:
        home = pathlib.Path(d)
        provision_fake(home)
        ing = Ingest(from_home(home), Store(db_path(home)))
        frames = frames_for(FakeModule(home, DEV), n)
        ing.handle("serene/%s/up" % DEV, frames[0])
        quarters, t0 = [], time.perf_counter()
        q = max(1, (len(frames) - 1) // 4)
        last = t0
        for i, fr in enumerate(frames[1:], 1):
            ing.handle("serene/%s/up" % DEV, fr)  # its ack may wait for the next 10 ms tick
            if i % q == 0:
                now = time.perf_counter()
                quarters.append(q * PER_FRAME / (now - last))
                last = now
        dt = time.perf_counter() - t0
        led = ing.store.device_ledger(DEV)
        ing.store.close()
    assert led["complete"] and led["objects"] == n // PER_FRAME * PER_FRAME + 1
    return {"objects": n, "seconds": dt, "objects_per_s": n / dt,
            "quarters_objects_per_s": [round(x) for x in quarters]}


def bench_mqtt(n):
    with tempfile.TemporaryDirectory() as d:
        home = pathlib.Path(d)
        provision_fake(home)
        m = FakeModule(home, DEV)
        frames = frames_for(m, n)
        with B.Broker(home, [DEV]) as brk:
            srv = brk.server_credentials()
            svc = IngestService(lambda: Ingest(from_home(home), Store(db_path(home))),
                                brk.server_port, srv["username"], srv["password"]).start()
            creds = brk.credentials(DEV)
            acks = []
            done = threading.Event()
            dev = B.Probe(brk.port, creds["username"], creds["password"])
            dev.subscribe("serene/%s/down" % DEV)

            last = n // PER_FRAME * PER_FRAME
            cums = []

            def on_ack(client, userdata, msg):
                # Acks are cumulative and may be coalesced (one per 10 ms tick): done when one
                # covers the last record.
                acks.append(msg.payload)
                cums.append(m.open_ack(msg.payload)[2])
                if cums[-1] >= last:
                    done.set()

            dev.client.on_message = on_ack
            t0 = time.perf_counter()
            # At most WINDOW frames beyond the last ack, as a module keeps its link window: a
            # device that pushes more than its intake quota (64 KiB) at once is refused.
            for i, fr in enumerate(frames):
                while i - 1 - max(cums, default=-1) // PER_FRAME > WINDOW:
                    if done.wait(0.0005) or time.perf_counter() - t0 > 60 + n / 500:
                        break
                dev.client.publish("serene/%s/up" % DEV, fr, qos=1)
            ok = done.wait(60 + n / 500)
            dt = time.perf_counter() - t0
            dev.close()
            svc.stop()
            st = Store(db_path(home))
            led = st.device_ledger(DEV)
            st.close()
            ledger = {k: led[k] for k in ("objects", "missing", "rejects", "complete")}
    if not ok:
        raise SystemExit("no ack covered the last record (%d acks came back, cum up to %s, "
                         "ledger %s)" % (len(acks), max(cums, default=None), ledger))
    return {"objects": n + 1, "frames": len(frames), "seconds": dt,
            "objects_per_s": (n + 1) / dt, "acks": len(acks), "dropped": svc.dropped}


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 10000
    res = {"direct": bench_direct(n), "mqtt": bench_mqtt(n)}
    d, m = res["direct"], res["mqtt"]
    print("ingest direct: %d objects in %.2f s = %.0f objects/s (by quarter: %s)"
          % (d["objects"], d["seconds"], d["objects_per_s"], d["quarters_objects_per_s"]))
    print("ingest mqtt:   %d objects in %d frames, last ack after %.2f s = %.0f objects/s, "
          "%d dropped" % (m["objects"], m["frames"], m["seconds"], m["objects_per_s"],
                          m["dropped"]))
    if "--json" in sys.argv:
        pathlib.Path(sys.argv[sys.argv.index("--json") + 1]).write_text(
            json.dumps(res, indent=2) + "\n")


main()
