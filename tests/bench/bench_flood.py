# A hostile device floods the server with its own broker account; a well-behaved module (the
# real firmware on the unix port) keeps delivering. Per flood type: the good module's ack
# latency at p95 at the broker (unloaded phase vs flood phase of the same run), the server's
# own intake latency, peak resident memory of `serene server` (VmHWM), what the ledger
# refused of the hostile device, and whether every record of the module was stored once.
#
#   .venv/bin/python tests/bench/bench_flood.py [junk|unknown|badsig ...] [--seconds S]
#       [--json FILE]
#
# junk: 40-byte garbage frames, QoS 1, as fast as a paho client publishes; unknown: 1024-byte
# frames of 64 unknown-kind entries; badsig: frames of epoch records whose signature fails.
import json
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

from serene import upy  # noqa: E402
from test_server_flood import FLOODS, run_flood_scenario  # noqa: E402


def main(argv):
    kinds = [a for a in argv if a in FLOODS] or list(FLOODS)
    seconds = float(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else 10.0
    out = argv[argv.index("--json") + 1] if "--json" in argv else None
    results = []
    with tempfile.TemporaryDirectory() as d:
        mpy = upy.compile_tree(pathlib.Path(d) / "mpy")
        for kind in kinds:
            work = pathlib.Path(d) / kind
            work.mkdir()
            fig = run_flood_scenario(work, mpy, kind, unloaded_s=seconds, loaded_s=seconds)
            lines = {ln.split(",")[0].split(" p95")[0]: ln.split("ms: ")[-1]
                     for ln in fig["server_out"].splitlines() if "ms: " in ln}
            intake = lines.get("serene server: intake latency", "")
            stages = lines.get("serene server: main intake stages", "")
            r = {"flood": kind, "flood_rate_per_s": round(fig["flood_result"]["rate"]),
                 "flood_sent": fig["flood_result"]["acked"],
                 "p95_unloaded_ms": round(fig["p95_unloaded_ms"], 2),
                 "p95_loaded_ms": round(fig["p95_loaded_ms"], 2),
                 "samples": [len(fig["unloaded"]), len(fig["loaded"])],
                 "server_intake_p95_ms": intake,
                 "server_main_stages_p95_ms": stages,
                 "server_vmhwm_mb": round(fig["hwm_kb"] / 1024, 1),
                 "good_records_sealed": fig["sealed"], "good_missing": len(fig["missing"]),
                 "good_stored_once": fig["stored_once"],
                 "good_rejects": fig["good_ledger"]["rejected"],
                 "hostile_rejects": fig["hostile_ledger"]["rejects"]}
            results.append(r)
            print(json.dumps(r), flush=True)
    print("\n%-8s %9s %10s %10s %8s %s" % ("flood", "msgs/s", "p95 idle", "p95 flood",
                                           "VmHWM", "good module"))
    for r in results:
        print("%-8s %9d %8.1f ms %8.1f ms %5.1f MB %d sealed, %d missing, once=%s" % (
            r["flood"], r["flood_rate_per_s"], r["p95_unloaded_ms"], r["p95_loaded_ms"],
            r["server_vmhwm_mb"], r["good_records_sealed"], r["good_missing"],
            r["good_stored_once"]))
    if out:
        pathlib.Path(out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
