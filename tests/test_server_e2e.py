"""`serene server` and `serene report` as a person runs them, and the whole uplink path:
LTE-M radio on the unix port -> private Mosquitto -> ingest -> sealed ack -> the radio.

The module side is test_server.FakeModule (objects made in CPython from the provisioned
identity) carried by the real radio driver (tests/upy/ltem_drive.py) or by a paho client
with the device's broker account.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from serene import broker as B
from serene.stsafe.provision import provision
from test_ltem import Drive
from test_server import DEV, DEV2, EPOCH, K_EPOCH, K_RECORD, FakeModule

SERENE = [sys.executable, "-m", "serene"]

#: every test on SQLite and on PostgreSQL (tests/conftest.py: database; the subprocesses
#: inherit SERENE_DB)
pytestmark = pytest.mark.usefixtures("database")


def provision_fake(home, devices):
    """provision(), with the registry's first epoch at the FakeModule's EPOCH (contract F: the
    server accepts a first epoch only near the one provisioning wrote for the counter)."""
    provision(home, devices)
    reg = json.loads((home / "registry.json").read_text())
    for entry in reg["devices"].values():
        entry["first_epoch"] = EPOCH
    (home / "registry.json").write_text(json.dumps(reg))


def serene(*args, check=True, timeout=60):
    res = subprocess.run(SERENE + list(args), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError("serene %s exited %d\n%s%s" % (args, res.returncode, res.stdout,
                                                            res.stderr))
    return res


@pytest.fixture
def server(tmp_path, procs):
    """`serene server --home H` running on its private broker; yields (home, broker info)."""
    home = tmp_path / "home"
    provision_fake(home, [DEV, DEV2])
    p = subprocess.Popen(SERENE + ["server", "--home", str(home), "--duration", "120"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    line = p.stdout.readline()
    assert line.startswith("serene server:"), line + p.stderr.read()
    info = json.loads((home / "broker" / "broker.json").read_text())
    yield home, info, p


def device_probe(home, info, dev=DEV):
    creds = B.ensure_credentials(home, [])["devices"][dev]
    p = B.Probe(info["port"], creds["username"], creds["password"])
    assert p.subscribe("serene/%s/down" % dev) == 1
    return p


def stop(p):
    p.terminate()
    out, err = p.communicate(timeout=15)
    assert p.returncode == 0, err
    return out


def test_server_cli_acks_over_mqtt_and_report_shows_the_ledger(server):
    home, info, proc = server
    m = FakeModule(home, DEV)
    with device_probe(home, info) as dev:
        dev.publish("serene/%s/up" % DEV, m.frame((K_EPOCH, 0, m.new_epoch())))
        topic, ack = dev.get(10)
        assert topic == "serene/%s/down" % DEV and m.open_ack(ack)[1:] == (EPOCH, 0, 0)
        dev.publish("serene/%s/up" % DEV, os.urandom(40))  # garbage: rejected, no answer
        recs = {s: m.record(s) for s in (1, 2, 3, 5)}
        dev.publish("serene/%s/up" % DEV, m.frame(*[(K_RECORD, s, r) for s, r in recs.items()]))
        topic, ack = dev.get(10)
        assert m.open_ack(ack)[1:] == (EPOCH, 3, 0b1)  # 0..3, and 5 = cum + 2 + bit 0
        dev.publish("serene/%s/up" % DEV, m.frame((K_RECORD, 2, recs[2])))  # resent
        assert m.open_ack(dev.get(10)[1])[1:] == (EPOCH, 3, 0b1)
        assert dev.get(0.3) is None  # the garbage got no answer

    out = serene("report", "--home", str(home), "--json").stdout
    led = json.loads(out)["devices"]
    d = led[DEV]
    assert d["registered"] and not d["complete"]
    assert d["objects"] == 5 and d["duplicates"] == 1
    assert d["epochs"][0]["received"] == [[0, 3], [5, 5]]
    assert d["epochs"][0]["gaps"] == [[4, 4]]
    assert d["rejects"] == {"bad frame": 1}
    assert d["recent_rejects"][0]["size"] == 40
    assert led[DEV2]["registered"] and led[DEV2]["objects"] == 0 and not led[DEV2]["complete"]

    table = serene("report", "--home", str(home)).stdout
    assert "DEVICE" in table and "GAPS" in table
    row = next(line for line in table.splitlines() if line.startswith(DEV + " "))
    assert "0-3,5" in row and "INCOMPLETE" in row and "bad frame:1" in row
    assert "NOTHING RECEIVED" in next(l for l in table.splitlines() if l.startswith(DEV2))
    assert serene("report", "--home", str(home), "--check", check=False).returncode == 1

    out = stop(proc)
    assert "3 acks sent" in out and "4 uplinks processed" in out


def test_report_and_server_errors_are_named(tmp_path, database):
    # no SQLite file in the home / a PostgreSQL database that does not exist
    missing = ["--db", database.url.rsplit("/", 1)[0] + "/missing"] if database.is_pg else []
    res = serene("report", "--home", str(tmp_path), *missing, check=False)
    assert res.returncode == 1 and res.stderr.startswith("serene: no database")
    res = serene("server", "--home", str(tmp_path), "--duration", "1", check=False)
    assert res.returncode == 1 and "not provisioned" in res.stderr


def test_ltem_radio_through_the_server_and_back(upy, procs, tmp_path, server):
    """The real radio driver carries a module's frames to the ingest and its acks back."""
    home, info, proc = server
    m = FakeModule(home, DEV)
    creds = B.ensure_credentials(home, [])["devices"][DEV]
    drv = Drive(upy, procs, tmp_path, dict(
        device_id=DEV, host="127.0.0.1", port=info["port"], user=creds["username"],
        password=creds["password"], io_timeout_ms=1000, backoff_min_ms=100,
        backoff_max_ms=500, keepalive_s=30, tick_ms=20))
    assert drv.expect("STATE", 10) == "up"
    frames = [m.frame((K_EPOCH, 0, m.new_epoch())),
              m.frame(*[(K_RECORD, s, m.record(s)) for s in range(1, 21)])]
    assert len(frames[1]) <= 1024
    for i, f in enumerate(frames):
        drv.cmd("send %d %s" % (i, f.hex()))
        assert drv.expect("SENT %d" % i) == ""
        drv.cmd("recv 5000")
        ack = bytes.fromhex(drv.expect("RECV"))
        assert m.open_ack(ack)[1:] == (EPOCH, [0, 20][i], 0)
    drv.quit()
    led = json.loads(serene("report", "--home", str(home), "--json",
                            "--device", DEV).stdout)["devices"][DEV]
    assert led["complete"] and led["objects"] == 21 and led["rejected"] == 0
    stop(proc)


def test_service_resubscribes_after_a_broker_restart(tmp_path):
    from serene.server.ingest import Ingest
    from serene.server.service import IngestService
    from serene.server.store import Store, db_url
    from serene.verifier import from_home

    home = tmp_path / "home"
    provision_fake(home, [DEV])
    with B.Broker(home, [DEV]) as brk:
        srv = brk.server_credentials()
        svc = IngestService(lambda: Ingest(from_home(home), Store(db_url(home))),
                            brk.server_port, srv["username"], srv["password"]).start()
        try:
            m = FakeModule(home, DEV)
            with device_probe(home, {"port": brk.port}) as dev:
                dev.publish("serene/%s/up" % DEV, m.frame((K_EPOCH, 0, m.new_epoch())))
                assert m.open_ack(dev.get(10)[1])[1:] == (EPOCH, 0, 0)
            brk.stop()
            deadline = time.monotonic() + 5
            while svc.connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not svc.subscribed.is_set()
            brk.start()  # same port, same accounts; paho reconnects within its 1 s delay
            assert svc.subscribed.wait(15)
            with device_probe(home, {"port": brk.port}) as dev:
                dev.publish("serene/%s/up" % DEV, m.frame((K_RECORD, 1, m.record(1))))
                assert m.open_ack(dev.get(10)[1])[1:] == (EPOCH, 1, 0)
        finally:
            svc.stop()


def test_audit_proves_the_database_at_rest_and_finds_tampering(tmp_path):
    from serene.server.ingest import Ingest
    from serene.server.store import Store, db_url
    from serene.verifier import from_home

    home = tmp_path / "home"
    provision_fake(home, [DEV])
    ing = Ingest(from_home(home), Store(db_url(home)))
    m = FakeModule(home, DEV)
    ing.handle("serene/%s/up" % DEV, m.frame((K_EPOCH, 0, m.new_epoch())))
    recs = {s: m.record(s) for s in range(1, 7)}
    ing.handle("serene/%s/up" % DEV, m.frame(*[(K_RECORD, s, r) for s, r in recs.items()],
                                           (2, 7, m.checkpoint(7, 1, recs))))
    ing.store.close()
    res = serene("report", "--home", str(home), "--audit", "--json")
    a = json.loads(res.stdout)["audit"]
    assert a["ok"] and (a["epochs"], a["objects"], a["checkpoints"]) == (1, 8, 1)

    db = Store(db_url(home))
    flipped = bytearray(recs[2])
    flipped[5] ^= 0x01
    db.execute("UPDATE objects SET sealed=? WHERE seq=2", (bytes(flipped),))
    db.execute("UPDATE objects SET fields=replace(fields, '\"rate\": 1250', '\"rate\": 125') "
               "WHERE seq=3")
    db.execute("DELETE FROM objects WHERE seq=5")
    db.commit()
    db.close()
    res = serene("report", "--home", str(home), "--audit", check=False)
    assert res.returncode == 1
    assert "PROBLEMS" in res.stdout
    problems = {(p["seq"], p["problem"].split(":")[0]) for p in json.loads(serene(
        "report", "--home", str(home), "--audit", "--json", check=False).stdout)["audit"][
        "problems"]}
    assert (2, "stored record does not verify") in problems
    assert (3, "stored fields differ from the sealed record") in problems
    assert any(seq == 7 and what.startswith("checkpoint over 1-6") for seq, what in problems)
    assert len(problems) == 3


def test_web_view_serves_the_ledger_and_escapes_module_data(tmp_path, procs):
    """`serene server --http` serves the clinicians' application: accounts made with `serene
    users add`, a patient set up by the administrator over HTTP (second factor included);
    the technician's pages show the ledger `serene report` shows, the clinician's patient page
    shows the module's markup as text, and nobody logged out reads any of it."""
    import html
    import http.cookiejar
    import re
    import urllib.error
    import urllib.parse
    import urllib.request

    import cbor2
    import pyotp

    home = tmp_path / "home"
    provision_fake(home, [DEV, DEV2])
    pw = tmp_path / "pw"
    pw.write_text("a long enough password\n")
    uri = None
    for role, user in (("technician", "tech"), ("clinician", "nurse"), ("admin", "root")):
        out = serene("users", "add", "--home", str(home), "--role", role, "--username", user,
                     "--password-file", str(pw)).stdout
        assert "%s added" % user in out
        if role == "admin":
            uri = re.search(r"otpauth://\S+", out).group(0)
    p = subprocess.Popen(SERENE + ["server", "--home", str(home), "--http", "0", "--duration",
                                   "90"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    procs.append(p)
    line = p.stdout.readline()
    url = re.search(r"web view (http://127\.0\.0\.1:\d+/)", line).group(1)
    info = json.loads((home / "broker" / "broker.json").read_text())
    m = FakeModule(home, DEV)
    evil_text = "<script>alert(1)</script>"
    with device_probe(home, info) as dev:
        dev.publish("serene/%s/up" % DEV, m.frame((K_EPOCH, 0, m.new_epoch())))
        dev.get(10)
        # A log record whose text is markup: shown as text, never as HTML.
        evil = m.seal(1, cbor2.dumps({0: 5, 1: 1, -3: int(time.time()) - 60, 16: evil_text,
                                      17: 1}))
        dev.publish("serene/%s/up" % DEV, m.frame((K_RECORD, 1, evil), (K_RECORD, 3,
                                                                          m.record(3))))
        dev.get(10)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **kw):
            return None  # a 302 is an answer to look at

    class Browser:
        def __init__(self):
            self.open = urllib.request.build_opener(
                urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
                NoRedirect).open

        def get(self, path, form=None):
            data = urllib.parse.urlencode(form).encode() if form is not None else None
            try:
                with self.open(url + path.lstrip("/"), data, timeout=10) as r:
                    return r.status, r.headers, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.headers, e.read().decode()

        def post(self, path, form, token_from):
            tok = re.search(r'name="csrf_token" value="([^"]+)"',
                            self.get(token_from)[2]).group(1)
            return self.get(path, dict(form, csrf_token=tok))

        def login(self, user):
            status, headers, _ = self.post("/login", {"username": user,
                                                      "password": pw.read_text().strip()},
                                           "/login")
            assert status == 302, (user, status)
            return headers["Location"]

    # The administrator (password, then TOTP) creates the patient, assigns the module from
    # 2000 on and puts the clinician in the care team.
    admin = Browser()
    assert admin.login("root").endswith("/login/totp")
    assert admin.post("/login/totp", {"code": pyotp.parse_uri(uri).now()},
                      "/login/totp")[0] == 302
    status, _, page = admin.post("/admin/patients", {"mrn": "MRN-1",
                                                     "display_name": "Jeanne Test"},
                                 "/admin/patients")
    assert status == 200
    pid = int(re.search(r'href="/admin/patients/(\d+)"', page).group(1))
    page = admin.get("/admin/patients/%d" % pid)[2]
    nurse_id = re.search(r'<option value="(\d+)">nurse</option>', page).group(1)
    for action, form in (("assign-device", {"device": DEV, "valid_from": "2000-01-01T00:00"}),
                         ("add-clinician", {"user_id": nurse_id})):
        assert admin.post("/admin/patients/%d/%s" % (pid, action), form,
                          "/admin/patients/%d" % pid)[0] == 302, action

    report = json.loads(serene("report", "--home", str(home), "--json").stdout)["devices"]
    assert report[DEV]["epochs"][0]["gaps"] == [[2, 2]] and report[DEV2]["objects"] == 0

    # The technician: the modules list and the module's ledger say what the report says.
    tech = Browser()
    assert tech.login("tech") == "/"
    status, headers, page = tech.get("/devices")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert headers["Cache-Control"] == "no-store"
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", page, re.S):
        cells = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
                 for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
        if cells:
            rows[cells[0]] = cells
    assert set(rows) == {DEV, DEV2}
    for d, badge in ((DEV, "gaps"), (DEV2, "nothing received")):
        led = report[d]
        assert rows[d][1] == "yes"  # registered
        assert rows[d][3:7] == [str(led[k]) for k in ("objects", "missing", "duplicates",
                                                       "rejected")], (d, rows[d])
        assert rows[d][8] == badge
    assert rows[DEV][2] == "yes" and rows[DEV2][2] == "no"  # assigned to a patient
    status, _, page = tech.get("/devices/%s" % DEV)
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    led = report[DEV]
    assert "%d objects stored, %d missing, %d duplicates, %d rejected." % (
        led["objects"], led["missing"], led["duplicates"], led["rejected"]) in text
    gaps = [[int(a), int(b)] for a, b in re.findall(r"seq (\d+)–(\d+):", text)]
    assert gaps == led["epochs"][0]["gaps"] == [[2, 2]]
    assert evil_text not in page  # no clinical data (nor the log) for a technician
    assert tech.get("/patients/%d" % pid)[0] == 403

    # The clinician: the module's markup is shown as text on the patient page.
    nurse = Browser()
    assert nurse.login("nurse") == "/"
    status, _, page = nurse.get("/patients/%d" % pid)
    assert status == 200 and "Jeanne Test" in page
    assert html.escape(evil_text, quote=False) in page and "<script>alert" not in page
    assert nurse.get("/devices")[0] == 403

    # Nobody logged in: sent to the login page, or 401 for JSON; never the data.
    anon = Browser()
    for path in ("/devices", "/devices/%s" % DEV, "/patients/%d" % pid, "/triage", "/"):
        status, headers, body = anon.get(path)
        assert status == 302 and headers["Location"].startswith("/login"), path
        assert "objects stored" not in body and "Jeanne" not in body
    for path in ("/triage.json", "/patients/%d/live.json" % pid):
        assert anon.get(path)[0] == 401, path
    assert tech.get("/devices/SRN-9999")[0] == 404
    for bad in ("/devices/..%2f..%2fetc", "/nothing"):
        assert tech.get(bad)[0] == 403, bad  # no view matches: refused (deny by default)
    stop(p)


def test_firmware_delivery_path_drains_the_outbox_through_the_server(upy, tmp_path):
    """The product path: STSAFE (emulator) -> firmware epoch/seal/checkpoint -> outbox ->
    link -> LTE-M radio -> Mosquitto -> ingest -> sealed acks -> the outbox empties; the
    server holds every object once, its checkpoints verified, nothing rejected."""
    from serene.i2c_bridge import I2CBridgeServer
    from serene.server.ingest import Ingest
    from serene.server.service import IngestService
    from serene.server.store import Store, db_url
    from serene.stsafe import profile
    from serene.stsafe.emulator import StsafeEmulator
    from serene.verifier import from_home

    n_records = 60
    home = tmp_path / "home"
    provision(home, [DEV])
    emu = StsafeEmulator.load(home / "devices" / DEV / "stsafe.json", time_scale=0,
                              autosave=False)
    module = json.loads((home / "devices" / DEV / "module.json").read_text())
    z = module["zones"]
    with I2CBridgeServer({profile.I2C_ADDRESS: emu}).start() as bridge, \
            B.Broker(home, [DEV]) as brk:
        srv = brk.server_credentials()
        svc = IngestService(lambda: Ingest(from_home(home), Store(db_url(home))),
                            brk.server_port, srv["username"], srv["password"]).start()
        try:
            creds = brk.credentials(DEV)
            cfg = {"port": bridge.port, "mac_key": module["host_mac_key"],
                   "cipher_key": module["host_cipher_key"], "device_id": DEV,
                   "counter_zone": z["epoch_counter"]["zone"],
                   "server_key": [z["server_key"]["zone"], z["server_key"]["offset"]],
                   "cert_zone": z["certificate"]["zone"], "fast": True,
                   "dir": str(tmp_path / "outbox"), "records": n_records, "every_n": 16,
                   "timeout_s": 60,
                   "radio": {"device_id": DEV, "host": "127.0.0.1", "port": brk.port,
                             "user": creds["username"], "password": creds["password"],
                             "backoff_min_ms": 100, "backoff_max_ms": 500}}
            (tmp_path / "outbox").mkdir()
            path = tmp_path / "node.json"
            path.write_text(json.dumps(cfg))
            # 256 KiB: on the unix port all the code (STSAFE driver, sealing, outbox, link,
            # radio, umqtt and this script) sits in the heap too; it runs in 192 KiB here.
            res = upy.run(["tests/upy/ltem_node.py", str(path)], mpy=True, heap="256K",
                          timeout=120)
        finally:
            svc.stop()
    lines = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1])
             for ln in res.stdout.splitlines() if ln.startswith(("SEALED ", "DONE "))}
    sealed, done = lines["SEALED"], lines["DONE"]
    print("delivery:", json.dumps(done))
    assert done["left"] == 0, res.stdout
    st = Store(db_url(home), readonly=True)
    try:
        d = st.device_ledger(DEV)
        recs = st.records(DEV)
    finally:
        st.close()
    n_cps = (n_records + 15) // 16
    assert sealed["objects"] == 1 + n_records + n_cps
    assert d["complete"] and d["rejected"] == 0 and d["checkpoint_mismatches"] == 0
    (e,) = d["epochs"]
    assert e["epoch"] == sealed["epoch"] and e["received"] == [[0, n_records + n_cps]]
    assert e["checkpoints"]["verified"] == n_cps
    assert e["by_kind"] == {"epoch": 1, "record": n_records, "checkpoint": n_cps}
    # Every record decoded as the firmware encoded it.
    assert [(r["fields"]["rate"], r["fields"]["volume"]) for r in recs] == [
        (1000 + r["seq"], 250 * r["seq"]) for r in recs]
    assert done["link"]["acks"] >= 1 and done["acks"]["forged"] == 0
    assert done["radio"]["disconnects"] == 0 and done["link"]["send_errors"] == 0
