"""Screenshots of the application (triage list, a patient page; English and French) from a
server home's database, in headless Chromium (Debian's /usr/bin/chromium via Playwright).

A clinician account `screenshots` is made (or re-enabled) with a fresh random password for
the run, a patient `Bench patient <device>` is assigned the module (if nobody is) and put in
its care team; at the end the account is disabled again: no standing credential is left.
"""

import pathlib
import secrets
import time

import sqlalchemy as sa

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
USER = "screenshots"


class ScreenshotError(Exception):
    pass


def _prepare(engine, device):
    from . import db, security
    from .views import add_to_care_team, assign_device

    pw = secrets.token_urlsafe(24)
    with engine.begin() as conn:
        u = conn.execute(sa.select(db.users).where(db.users.c.username == USER)).first()
        if u is None:
            uid = conn.execute(db.users.insert().values(
                username=USER, full_name="Bench screenshots", role="clinician",
                password_hash=security.hash_password(pw), language="en", active=True,
                created_at=time.time())).inserted_primary_key[0]
        else:
            uid = u.id
            conn.execute(db.users.update().where(db.users.c.id == uid).values(
                password_hash=security.hash_password(pw), active=True, locked_until=None,
                failed_logins=0, language="en"))
        a = db.device_assignments
        row = conn.execute(sa.select(a.c.patient_id).where(
            a.c.device == device, a.c.valid_to.is_(None))).first()
        if row is None:
            mrn = "BENCH-%s" % device
            p = conn.execute(sa.select(db.patients.c.id).where(db.patients.c.mrn == mrn)).first()
            pid = p.id if p else conn.execute(db.patients.insert().values(
                mrn=mrn, display_name="Bench patient %s" % device,
                created_at=time.time())).inserted_primary_key[0]
            assign_device(conn, pid, device, 0.0)
        else:
            pid = row.patient_id
        c = db.care_team
        if conn.execute(sa.select(c.c.id).where(c.c.patient_id == pid, c.c.user_id == uid,
                                                c.c.valid_to.is_(None))).first() is None:
            add_to_care_team(conn, pid, uid, 0.0)
        conn.execute(db.audit.insert().values(
            at=time.time(), username="(screenshots)", action="screenshots.account",
            target=USER, detail="enabled for a screenshot run", ip="local", outcome="ok"))
    return uid, pid, pw


def take(home, out, device=None):
    from playwright.sync_api import sync_playwright

    from . import db
    from .server import AppServer

    if not pathlib.Path(CHROMIUM).exists():
        raise ScreenshotError("no %s (tools/dev setup installs chromium)" % CHROMIUM)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    srv = AppServer(home, 0).start()
    engine = srv.app.engine
    try:
        if device is None:
            with engine.begin() as conn:
                device = conn.execute(sa.text(
                    "SELECT device FROM objects WHERE kind='record' ORDER BY received_at DESC "
                    "LIMIT 1")).scalar()
            if device is None:
                raise ScreenshotError("no record in %s's database" % home)
        uid, pid, pw = _prepare(engine, device)
        paths = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(srv.url + "login")
                page.fill("#username", USER)
                page.fill("#password", pw)
                page.click("button#login")
                page.wait_for_url("**/triage")
                for lang in ("en", "fr"):
                    with engine.begin() as conn:
                        conn.execute(db.users.update().where(db.users.c.id == uid)
                                     .values(language=lang))
                    page.goto(srv.url + "triage")
                    paths.append(out / ("triage-%s.png" % lang))
                    page.screenshot(path=str(paths[-1]), full_page=True)
                    page.goto(srv.url + "patients/%d" % pid)
                    page.wait_for_selector("body[data-chart-ready='1']", state="attached",
                                           timeout=10_000)
                    paths.append(out / ("patient-%s.png" % lang))
                    page.screenshot(path=str(paths[-1]), full_page=True)
            finally:
                browser.close()
        return paths
    finally:
        with engine.begin() as conn:
            conn.execute(db.users.update().where(db.users.c.username == USER)
                         .values(active=False))
            conn.execute(db.sessions.update().where(db.sessions.c.revoked_at.is_(None))
                         .where(db.sessions.c.user_id.in_(sa.select(db.users.c.id).where(
                             db.users.c.username == USER))).values(revoked_at=time.time()))
        srv.stop()
