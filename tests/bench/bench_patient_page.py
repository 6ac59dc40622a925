"""Server time of the patient page for a patient with 30 days of one-minute records.

    .venv/bin/python tests/bench/bench_patient_page.py [--days 30] [--runs 40]

43,200 status records (one a minute for 30 days) are written through the store API
(Store.add_object with decoded fields, as the ingest stores them; the sealed bytes are a
placeholder: this measures reading, not verification), a clinician and a patient are made,
and GET /patients/<id> (24 h view) and ?view=7d are timed in the Flask app (the WSGI call:
database, computation, template), p50 and p95 over --runs requests. Target: p95 <= 300 ms.
The app's migration indexes the records' module time (app_objects_record_time).
"""

import argparse
import pathlib
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from webapp_fixtures import PASSWORD, add_patient, add_user  # noqa: E402

from serene.server.store import Store, db_path  # noqa: E402
from serene.webapp import create_app  # noqa: E402

DEV = "SRN-0001"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()
    home = pathlib.Path(tempfile.mkdtemp(prefix="bench-page-"))
    n = args.days * 24 * 60
    t_end = time.time()
    t0 = t_end - n * 60
    st = Store(db_path(home))
    w0 = time.perf_counter()
    for i in range(n):
        seq = i + 1
        alarms = 1 if i % 5000 == 4999 else 0
        fields = {"kind": "status", "seq": seq, "time": int(t0 + 60 * i), "rate": 1250,
                  "volume": (i % 1440) * 34_722, "dose": 1_000_000, "remaining": 480,
                  "alarms": alarms, "state": 6 if alarms else 2, "battery": 80, "power": 1}
        st.add_object(DEV, 1, seq, "record", b"\0" * 40, fields=fields, now=t0 + 60 * i)
        if seq % 5000 == 0:
            st.commit()
    st.commit()
    st.close()
    print("bench_patient_page: %d records written in %.1f s" % (n, time.perf_counter() - w0))
    app = create_app(home)
    _s, uid = add_user(app.engine, "nurse", "clinician")
    pid = add_patient(app.engine, "MRN-1", "Bench Patient", DEV, [uid])
    c = app.test_client()
    tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    c.post("/login", data={"username": "nurse", "password": PASSWORD, "csrf_token": tok})
    for view in ("24h", "7d"):
        times = []
        for _ in range(args.runs):
            s = time.perf_counter()
            r = c.get("/patients/%d?view=%s" % (pid, view))
            times.append((time.perf_counter() - s) * 1000)
            assert r.status_code == 200, r.status_code
        times.sort()
        p95 = times[max(0, int(round(0.95 * len(times))) - 1)]
        print("bench_patient_page: view %s, %d records in the database: p50 %.0f ms, p95 %.0f "
              "ms (target <= 300 ms)" % (view, n, statistics.median(times), p95))


if __name__ == "__main__":
    main()
