"""Accounts, roles and the HTTP hardening of the clinicians' application; attribution of
records to patients by time."""

import http.client
import re
import subprocess
import sys
import time

import pyotp
import pytest
import sqlalchemy as sa

from webapp_fixtures import PASSWORD, add_patient, add_user, feed, provision_home, status

from serene.webapp import create_app, db  # noqa: E402
from serene.webapp import data as D  # noqa: E402
from serene.webapp.server import AppServer  # noqa: E402

DEV = "SRN-0001"


@pytest.fixture(scope="module")
def home(tmp_path_factory, database_module):  # SQLite, then PostgreSQL
    home = provision_home(tmp_path_factory.mktemp("sec"), [DEV])
    t = time.time()
    feed(home, DEV, [status(t - 3600 + 60 * i, volume=1000 * i) for i in range(60)])
    return home


@pytest.fixture
def app(home):
    a = create_app(home)
    with a.engine.begin() as conn:
        for t in ("app_sessions", "app_login_attempts", "app_audit", "app_care_team",
                  "app_device_assignments", "app_alarm_acks", "app_patients", "app_users"):
            conn.execute(sa.text("DELETE FROM %s" % t))
    return a


def client_login(app, username, password=PASSWORD):
    c = app.test_client()
    tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post("/login", data={"username": username, "password": password, "csrf_token": tok})
    return c, r


def test_lockout_after_repeated_failures(app):
    add_user(app.engine, "nurse", "clinician")
    for _ in range(5):
        _c, r = client_login(app, "nurse", "wrong password!")
        assert r.status_code == 401
    _c, r = client_login(app, "nurse")  # the right password, but locked
    assert r.status_code == 429
    with app.engine.begin() as conn:
        conn.execute(db.users.update().values(locked_until=None))
    _c, r = client_login(app, "nurse")
    assert r.status_code == 302
    with app.engine.begin() as conn:
        acts = [a for (a,) in conn.execute(sa.select(db.audit.c.action).order_by(db.audit.c.id))]
    assert acts.count("login.failed") == 5 and "login.refused" in acts and acts[-1] == "login"


def test_admin_needs_totp(app):
    secret, _uid = add_user(app.engine, "root", "admin")
    c, r = client_login(app, "root")
    assert r.headers["Location"].endswith("/login/totp")
    assert c.get("/admin/users").headers["Location"].endswith("/login/totp")
    tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login/totp").text).group(1)
    assert c.post("/login/totp", data={"code": "000000", "csrf_token": tok}).status_code == 401
    r = c.post("/login/totp", data={"code": pyotp.TOTP(secret).now(), "csrf_token": tok})
    assert r.status_code == 302
    assert c.get("/admin/users").status_code == 200
    assert c.get("/admin/audit.csv").status_code == 200
    csv = c.get("/admin/audit.csv").text.splitlines()
    assert csv[0].startswith("id,at,username") and any("login.second_factor" in l for l in csv)


def test_roles_deny_by_default(app):
    _s, nid = add_user(app.engine, "nurse", "clinician")
    add_user(app.engine, "tech", "technician")
    pid = add_patient(app.engine, "M1", "Patient One", DEV, [nid])
    tech, _r = client_login(app, "tech")
    assert tech.get("/devices").status_code == 200
    assert DEV in tech.get("/devices/%s" % DEV).text
    for path in ("/triage", "/patients/%d" % pid, "/patients/%d/fhir" % pid, "/admin/users",
                 "/admin/audit"):
        assert tech.get(path).status_code == 403, path
    nurse, _r = client_login(app, "nurse")
    assert nurse.get("/patients/%d" % pid).status_code == 200
    for path in ("/devices", "/admin/users", "/admin/patients"):
        assert nurse.get(path).status_code == 403, path
    anon = app.test_client()
    assert anon.get("/patients/%d" % pid).headers["Location"].startswith("/login")
    assert anon.get("/triage.json").status_code == 401


def test_headers_and_cookie(app):
    add_user(app.engine, "nurse", "clinician")
    c, r = client_login(app, "nurse")
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    r = c.get("/triage")
    csp = r.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in csp and "script-src 'self'" in csp
    assert r.headers["Cache-Control"] == "no-store"
    assert "<script>" not in r.text and "style=" not in r.text


def test_host_allow_list_and_loopback(home):
    with pytest.raises(ValueError):
        AppServer(home, 0, host="0.0.0.0")  # not loopback without TLS: refused
    srv = AppServer(home, 0).start()
    try:
        for host, code in (("evil.example", 421), ("127.0.0.1:%d" % srv.port, 302)):
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
            conn.request("GET", "/", headers={"Host": host})
            assert conn.getresponse().status == code
            conn.close()
    finally:
        srv.stop()


def test_reassignment_keeps_history_and_attributes_by_time(app):
    from serene.webapp.views import assign_device

    t = time.time()
    a = add_patient(app.engine, "MA", "Before", DEV, since=0)
    b = add_patient(app.engine, "MB", "After")
    with app.engine.begin() as conn:
        assign_device(conn, b, DEV, t - 1800)
        ra = D.records(conn, a, 0, t + 60)
        rb = D.records(conn, b, 0, t + 60)
        hist = D.assignments(conn, a)
    assert len(ra) + len(rb) == 60
    assert ra and rb and max(r["time"] for r in ra) < t - 1800 <= min(r["time"] for r in rb)
    assert hist[0].valid_to == t - 1800  # ended, kept


def test_users_add_command(home, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("a long enough password\n")
    r = subprocess.run([sys.executable, "-m", "serene", "users", "add", "--home", str(home),
                        "--role", "admin", "--username", "first-admin", "--password-file",
                        str(pw)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "otpauth://totp/" in r.stdout and "first-admin" in r.stdout
