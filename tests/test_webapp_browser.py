"""The clinicians' application in headless Chromium (Playwright driving /usr/bin/chromium):
the data is put through the real ingest (records sealed as a module seals them), the app
serves it on a free loopback port, a browser logs in and reads it."""

import json
import re
import shutil
import time

import pytest
import sqlalchemy as sa

from webapp_fixtures import (add_patient, add_user, feed, launch_chromium, login,
                             provision_home, status)

import playwright  # noqa: E402,F401 - installed by tools/dev (pyproject.toml)

if not shutil.which("chromium") and not __import__("os").path.exists("/usr/bin/chromium"):
    # A missing browser is a set-up failure, never a skipped test (tools/dev installs it).
    pytest.fail("no /usr/bin/chromium: run tools/dev setup (it installs Debian's chromium)",
                pytrace=False)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from serene.webapp import db  # noqa: E402
from serene.webapp.server import AppServer  # noqa: E402

DEVS = ["SRN-0001", "SRN-0002", "SRN-0003"]
XSS = "<script>window.__xss=1</script>"


@pytest.fixture(scope="module")
def world(tmp_path_factory, database_module):  # SQLite, then PostgreSQL
    home = provision_home(tmp_path_factory.mktemp("webapp"), DEVS)
    t = time.time()
    start = t - 2 * 3600
    # Occlusion patient: two hours of running feed, the last ten minutes in downstream
    # occlusion (alarm bit 0, state 6 alarm hold).
    occl = [status(start + 60 * i, rate=1250, volume=int(1250 / 36 * 60 * i),
                   alarms=1 if i >= 110 else 0, state=6 if i >= 110 else 2)
            for i in range(120)]
    stored = feed(home, DEVS[0], occl)
    normal = [status(start + 60 * i, rate=800, volume=int(800 / 36 * 60 * i)) for i in range(120)]
    feed(home, DEVS[1], normal)
    # A record field holding markup: the pump's log text (kind 5).
    xss = [status(start + 60 * i, rate=600, volume=1000 * i) for i in range(10)]
    xss.append({0: 5, -3: int(t - 60), 16: XSS, 17: 1})
    feed(home, DEVS[2], xss)
    srv = AppServer(home, 0).start()
    eng = srv.app.engine
    _s, n1 = add_user(eng, "nurse1", "clinician")
    _s, n2 = add_user(eng, "nurse2", "clinician")
    pa = add_patient(eng, "MRN-A", "Occlusion Patient", DEVS[0], [n1])
    pb = add_patient(eng, "MRN-B", "Bernard Normal", DEVS[1], [n1, n2])
    pc = add_patient(eng, "MRN-C", "Claire Markup", DEVS[2], [n1])
    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield {"home": home, "srv": srv, "base": srv.url, "eng": eng, "browser": browser,
               "pa": pa, "pb": pb, "pc": pc, "stored": stored, "n1": n1, "n2": n2}
        browser.close()
    srv.stop()


@pytest.fixture
def page(world):
    ctx = world["browser"].new_context(locale="en-GB")
    pg = ctx.new_page()
    pg.set_default_timeout(10_000)
    errors = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.errors = errors
    yield pg
    ctx.close()


def test_clinician_triage_chart_ack_french_logout(world, page):
    base = world["base"]
    login(page, base, "nurse1")
    expect(page).to_have_url(base + "triage")
    rows = page.locator("#triage tbody tr")
    expect(rows).to_have_count(3)
    first = rows.nth(0)
    expect(first.locator(".patient-link")).to_have_text("Occlusion Patient")
    expect(first).to_contain_text("downstream occlusion")
    expect(first.locator(".state")).to_have_text("alarm")
    expect(first).to_contain_text("125.0 ml/h")
    first.locator(".patient-link").click()
    expect(page).to_have_url(base + "patients/%d" % world["pa"])
    page.wait_for_selector("body[data-chart-ready='1']", state="attached")
    assert page.errors == [], page.errors  # no CSP violation, no script error
    # What the chart holds, read from Chart.js itself, against what the database stores.
    drawn = page.evaluate("""() => window.sereneFeed.chart.data.datasets.map(
        d => d.data.map(p => [p.x, p.y]))""")
    with world["eng"].begin() as conn:
        rows_db = conn.execute(sa.text(
            "SELECT fields FROM objects WHERE device='SRN-0001' AND kind='record'")).all()
    recs = sorted((json.loads(f) for (f,) in rows_db), key=lambda f: f["time"])
    assert len(recs) == 120
    assert drawn[0] == [[r["time"] * 1000, r["rate"] / 10] for r in recs]
    assert drawn[1] == [[r["time"] * 1000, r["volume"] / 1000] for r in recs]
    assert drawn[2][0] == [recs[0]["time"] * 1000, 1000]  # dose 1,000,000 µl = 1,000 ml
    alarm_marks = page.evaluate("() => window.sereneFeed.chart.$serene.alarms")
    assert [m[1] for m in alarm_marks] == ["downstream occlusion"]
    assert alarm_marks[0][0] == recs[110]["time"] * 1000
    # Acknowledge the alarm: the row says so, and the audit has it.
    alarm = page.locator("#alarms .alarm-row.unacked")
    expect(alarm.locator(".alarm-word")).to_have_text("downstream occlusion")
    alarm.locator("button.ack").click()
    expect(page.locator("#alarms .alarm-row.acked")).to_contain_text("acknowledged")
    with world["eng"].begin() as conn:
        acts = conn.execute(sa.select(db.audit.c.action, db.audit.c.username,
                                      db.audit.c.patient_id, db.audit.c.ip)
                            .where(db.audit.c.action == "alarm.acknowledge")).all()
        views = conn.execute(sa.select(sa.func.count()).select_from(db.audit).where(
            db.audit.c.action == "patient.view", db.audit.c.patient_id == world["pa"])).scalar()
    assert [(a.username, a.patient_id, a.ip) for a in acts] == [
        ("nurse1", world["pa"], "127.0.0.1")]
    assert views >= 1
    # French, chosen for this user.
    page.select_option("#language", "fr")
    expect(page.locator("#alarms h2")).to_have_text("Alarmes actives")
    expect(page.locator("#alarms")).to_contain_text("occlusion en aval")
    page.goto(base + "triage")
    expect(page.locator("#triage tbody tr").nth(0)).to_contain_text("125,0 ml/h")
    page.click("#logout")
    expect(page).to_have_url(base + "login")
    assert page.goto(base + "patients/%d" % world["pa"]).url.startswith(base + "login")


def test_second_clinician_refused_and_list_without_that_patient(world, page):
    base = world["base"]
    login(page, base, "nurse2")
    expect(page).to_have_url(base + "triage")
    names = page.locator("#triage .patient-link").all_inner_texts()
    assert names == ["Bernard Normal"]
    resp = page.goto(base + "patients/%d" % world["pa"])
    assert resp.status == 403
    assert "Occlusion" not in page.content()
    resp = page.goto(base + "patients/%d/live.json" % world["pa"])
    assert resp.status == 403
    with world["eng"].begin() as conn:
        denied = conn.execute(sa.select(db.audit.c.username).where(
            db.audit.c.action == "patient.denied", db.audit.c.patient_id == world["pa"])).all()
    assert ("nurse2",) in denied


def test_record_markup_is_text(world, page):
    base = world["base"]
    login(page, base, "nurse1")
    page.goto(base + "patients/%d" % world["pc"])
    cell = page.locator("#events .event-text").filter(has_text="window.__xss")
    expect(cell).to_have_count(1)
    assert XSS in cell.inner_text()
    assert page.evaluate("() => window.__xss") is None
    assert page.locator("#events script").count() == 0


def test_post_without_csrf_is_refused(world, page):
    base = world["base"]
    login(page, base, "nurse1")
    expect(page).to_have_url(base + "triage")
    form = {"device": "SRN-0001", "epoch": "999999", "seq": "1", "bit": "0"}
    r = page.request.post(base + "patients/%d/alarms/ack" % world["pa"], form=form)
    assert r.status == 400
    r = page.request.post(base + "account/language", form={"language": "fr"})
    assert r.status == 400
    with world["eng"].begin() as conn:
        lang = conn.execute(sa.select(db.users.c.language).where(
            db.users.c.username == "nurse1")).scalar()
        refused = conn.execute(sa.select(sa.func.count()).select_from(db.audit).where(
            db.audit.c.action == "csrf.refused")).scalar()
    assert refused >= 2


def test_expired_session_goes_back_to_login(world, page):
    base = world["base"]
    login(page, base, "nurse1")
    expect(page).to_have_url(base + "triage")
    # 31 minutes without a request (idle limit 30 min): the server-side row says expired.
    with world["eng"].begin() as conn:
        conn.execute(db.sessions.update().where(db.sessions.c.revoked_at.is_(None))
                     .values(last_seen=db.sessions.c.last_seen - 31 * 60))
    page.goto(base + "patients/%d" % world["pa"])
    assert page.url.startswith(base + "login")
    expect(page.locator("#expired")).to_be_visible()
    assert page.goto(base + "triage").url.startswith(base + "login")


def test_live_refresh_updates_without_reload(world, page):
    base = world["base"]
    login(page, base, "nurse1")
    page.goto(base + "patients/%d" % world["pb"])
    page.wait_for_selector("body[data-chart-ready='1']", state="attached")
    n0 = page.evaluate("() => window.sereneFeed.chart.data.datasets[0].data.length")
    # A new record arrives through the ingest; the page shows it without a reload.
    t = time.time()
    feed(world["home"], "SRN-0002", [status(t - 5, rate=950, volume=123_456)],
         epoch=1_000_000)
    page.evaluate("() => { window.__same_page = true; }")
    expect(page.locator("#now-rate")).to_have_text(re.compile(r"95[.,]0 ml/h"), timeout=15_000)
    assert page.evaluate("() => window.__same_page") is True
    assert page.evaluate("() => window.sereneFeed.chart.data.datasets[0].data.length") == n0 + 1
