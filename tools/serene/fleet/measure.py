"""Measure one machine: `serene server` (1 worker, SQLite, its private Mosquitto) under a fleet.

    python -m serene.fleet.measure --home DIR --modules N --rate R --seconds S [--json FILE]

Provisions the fleet home if needed, starts `serene server --home DIR` as its own process,
runs `serene fleet` as another, and prints: objects/s (acknowledged = stored), ack latency
p50/p95/p99, errors, the objects in the database for the run's epoch (must equal what was
sent), and CPU time per object in the server process and in Mosquitto (utime + stime from
/proc/<pid>/stat over the fleet run, divided by the objects stored), the fleet's own CPU,
and the machine's load (others run tests on it too: /proc/loadavg and the share of the
machine's CPU that none of the three processes used).
"""

import argparse
import json
import os
import pathlib
import resource
import sqlite3
import subprocess
import sys
import time

SERENE = [sys.executable, "-m", "serene"]
TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    """utime + stime of pid in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK


def machine_busy_s():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / TCK


def children(pid):
    out = []
    for task in pathlib.Path("/proc/%d/task" % pid).iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def mosquitto_of(server_pid):
    for c in children(server_pid):
        try:
            if pathlib.Path("/proc/%d/comm" % c).read_text().strip() == "mosquitto":
                return c
        except OSError:
            pass
    raise RuntimeError("no mosquitto child of the server process %d" % server_pid)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m serene.fleet.measure")
    ap.add_argument("--home", required=True)
    ap.add_argument("--modules", type=int, required=True)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--checkpoint-every", type=int, default=32)
    ap.add_argument("--connect-rate", type=float, default=500.0)
    ap.add_argument("--fixed-rto", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    home = pathlib.Path(a.home)
    t = time.monotonic()
    subprocess.run(SERENE + ["fleet", "--home", str(home), "--modules", str(a.modules),
                             "--provision-only"], check=True)
    print("measure: fleet home ready in %.1f s" % (time.monotonic() - t), flush=True)
    t = time.monotonic()
    server = subprocess.Popen(SERENE + ["server", "--home", str(home), "--duration", "3600"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("serene server:"):
            raise RuntimeError("the server did not start: %s%s" % (line, server.stderr.read()))
        t_server = time.monotonic() - t
        mosq = mosquitto_of(server.pid)
        print("measure: server (pid %d) and mosquitto (pid %d) up in %.1f s: %s"
              % (server.pid, mosq, t_server, line.strip()), flush=True)
        time.sleep(1.0)
        out = home / "fleet" / "last-run.json"
        s0, m0, b0 = cpu_s(server.pid), cpu_s(mosq), machine_busy_s()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        w0, load0 = time.monotonic(), open("/proc/loadavg").read().split()[0]
        fleet = subprocess.run(SERENE + [
            "fleet", "--home", str(home), "--modules", str(a.modules), "--rate", str(a.rate),
            "--seconds", str(a.seconds), "--checkpoint-every", str(a.checkpoint_every),
            "--connect-rate", str(a.connect_rate), "--json", str(out)]
            + (["--fixed-rto"] if a.fixed_rto else []))
        wall = time.monotonic() - w0
        s1, m1, b1 = cpu_s(server.pid), cpu_s(mosq), machine_busy_s()
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        load1 = open("/proc/loadavg").read().split()[0]
        rss_mosq = int([x for x in open("/proc/%d/status" % mosq)
                        if x.startswith("VmRSS")][0].split()[1])
        rss_server = int([x for x in open("/proc/%d/status" % server.pid)
                          if x.startswith("VmRSS")][0].split()[1])
    finally:
        server.terminate()
        sout, serr = server.communicate(timeout=60)
    rep = json.loads(out.read_text())
    epoch = 1_000_000 + rep["run"]
    db = sqlite3.connect("file:%s?mode=ro" % (home / "server" / "ingest.sqlite3"), uri=True)
    stored = db.execute("SELECT COUNT(*) FROM objects WHERE epoch = ?", (epoch,)).fetchone()[0]
    rejects = db.execute("SELECT COUNT(*) FROM rejects").fetchone()[0]
    n = rep["objects_acked"] or 1
    fleet_cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    srv, mq = s1 - s0, m1 - m0
    other = (b1 - b0) - srv - mq - fleet_cpu
    res = {
        "modules": a.modules, "rate_per_module": a.rate, "seconds": a.seconds,
        "rto": "fixed" if a.fixed_rto else "adaptive",
        "server_start_s": round(t_server, 2),
        "objects_per_s": rep["objects_per_s"], "ack_latency_ms": rep["ack_latency_ms"],
        "ack_latency_ms_by_kind": rep["ack_latency_ms_by_kind"],
        "ack_latency_ms_retransmitted": rep["ack_latency_ms_retransmitted"],
        "objects_sent": rep["objects_sent"], "objects_acked": rep["objects_acked"],
        "stored_in_db_for_the_run": stored, "rejects_in_db": rejects, "lost": rep["lost"],
        "errors": {k: v for k, v in rep["errors"].items() if v},
        "connect_s": rep["connect_s"], "fleet_wall_s": round(wall, 1),
        "server_cpu_s": round(srv, 2), "mosquitto_cpu_s": round(mq, 2),
        "fleet_cpu_s": round(fleet_cpu, 2),
        "server_cpu_us_per_object": round(srv / n * 1e6, 1),
        "mosquitto_cpu_us_per_object": round(mq / n * 1e6, 1),
        "fleet_cpu_us_per_object": round(fleet_cpu / n * 1e6, 1),
        "other_processes_cpu_s": round(other, 1),
        "loadavg_1min": [load0, load1],
        "rss_kib": {"server": rss_server, "mosquitto": rss_mosq},
        "server_stages": [x for x in sout.splitlines() if "stages" in x],
        "fleet_rc": fleet.returncode, "server_rc": server.returncode,
    }
    print(json.dumps(res, indent=1))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    ok = fleet.returncode == 0 and stored == rep["objects_acked"] and not rep["lost"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
