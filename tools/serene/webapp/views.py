"""Every page and endpoint. Each view says who may use it (security.roles); the app's guard
refuses any view that does not (deny by default). Clinical pages check the care team too."""

import csv
import io
import json
import time

import sqlalchemy as sa
from flask import (Blueprint, Response, abort, current_app, flash, g, redirect,
                   render_template, request, session, url_for)
from flask_babel import format_datetime, format_decimal, format_timedelta, gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_user, logout_user

from . import data as D
from . import db, security
from .db import now
from .security import audit, public, roles

bp = Blueprint("main", __name__)

ALARM_WORDS = {
    "downstream_occlusion": _l("downstream occlusion"),
    "upstream_occlusion": _l("upstream occlusion or empty bag"),
    "air_in_line": _l("air in line"),
    "door_open": _l("door open or set not loaded"),
    "battery_low": _l("battery low"),
    "battery_empty": _l("battery empty"),
    "dose_complete": _l("dose complete"),
    "idle_reminder": _l("pump idle reminder"),
    "mains_lost": _l("mains power lost"),
    "technical_fault": _l("technical fault"),
    "clamp": _l("clamp closed"),
}
STATE_WORDS = {
    "running": _l("running"), "paused": _l("paused"), "alarm": _l("alarm"),
    "dose_complete": _l("dose complete"), "offline": _l("offline"), "no_data": _l("no data"),
}
PUMP_STATE_WORDS = {
    "standby": _l("standby"), "paused": _l("paused"), "running": _l("running"),
    "priming": _l("priming"), "flush": _l("flush"), "dose_complete": _l("dose complete"),
    "alarm_hold": _l("alarm hold"),
}
COMPLETENESS_WORDS = {"complete": _l("complete"), "gaps": _l("gaps"),
                      "integrity": _l("integrity failure"), "none": _l("nothing received")}
ROLE_WORDS = {"clinician": _l("clinician"), "technician": _l("technician"),
              "admin": _l("administrator")}
MODULE_EVENT_WORDS = {
    "boot": _l("module started"), "health": _l("module health report"),
    "records_lost": _l("records lost on the module (storage full)"),
    "se_error": _l("secure element error"), "pump_disconnected": _l("pump disconnected"),
    "pump_reconnected": _l("pump reconnected"), "volume_reset": _l("pump volume counter reset"),
}
#: the radio each record came by: the ingest does not record it yet; every module today
#: reports over LTE-M (MQTT), so that is what is shown, marked as assumed.
RADIO = "LTE-M"
VIEWS = {"24h": 24 * 3600, "7d": 7 * 24 * 3600}
CHART_POINTS_MAX = 2000
ALL_ROLES = db.ROLES


# --- template helpers -----------------------------------------------------------------------


def install_filters(app):
    import datetime

    def dt(t, fmt="short"):
        if t is None:
            return "–"
        try:
            d = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
            return format_datetime(d, fmt)
        except (OverflowError, ValueError, OSError):  # e.g. a certificate valid "for ever"
            return "9999-12-31" if t > 0 else "–"

    def num(x, digits=1):
        if x is None:
            return "–"
        return format_decimal(x, format="#,##0." + "0" * digits if digits else "#,##0")

    def age(s):
        if s is None:
            return "–"
        return format_timedelta(max(0, s), threshold=1.5)

    app.jinja_env.filters.update(dt=dt, num=num, age=age)
    app.jinja_env.globals.update(
        ALARM_WORDS=ALARM_WORDS, STATE_WORDS=STATE_WORDS, PUMP_STATE_WORDS=PUMP_STATE_WORDS,
        COMPLETENESS_WORDS=COMPLETENESS_WORDS, ROLE_WORDS=ROLE_WORDS, RADIO=RADIO,
        LANGUAGES=db.LANGUAGES)


def _ledger(device):
    from ..server.store import Store, StoreError

    try:
        st = Store(current_app.config["DB_URL"], readonly=True)
    except StoreError:
        return None
    try:
        return st.device_ledger(device)
    finally:
        st.close()


# --- log in, second factor, log out, language ---------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
@public
def login():
    if request.method == "GET":
        if request.args.get("lang") in db.LANGUAGES:
            session["lang"] = request.args["lang"]
        return render_template("login.html", expired=request.args.get("expired"))
    username = (request.form.get("username") or "").strip()[:64]
    password = request.form.get("password") or ""
    ip = security.client_ip()
    eng = current_app.engine
    with eng.begin() as conn:
        why = security.throttled(conn, username, ip)
        if why:
            security.record_attempt(conn, username, ip, False)
            audit("login.refused", target=username, detail=why, outcome="denied", conn=conn)
    if why:
        security.burn_time(password)
        msg = (_("Too many failed attempts from this address: try again later.") if why == "ip"
               else _("This account is locked after repeated failures: try again later or "
                      "ask an administrator."))
        return render_template("login.html", error=msg), 429
    with eng.begin() as conn:
        row = conn.execute(sa.select(db.users).where(db.users.c.username == username)).first()
    ok = row is not None and row.active and security.check_password(row.password_hash, password)
    if row is None:
        security.burn_time(password)
    with eng.begin() as conn:
        locked = security.record_attempt(conn, username, ip, ok)
        if not ok:
            audit("login.failed", target=username, detail="locked" if locked else "",
                  outcome="denied", conn=conn)
            return render_template("login.html", error=_("Wrong user name or password.")), 401
        user = security.open_session(conn, row, ip)
    session.clear()
    login_user(user)
    audit("login", user=user)
    if user.needs_second_factor:
        return redirect(url_for("main.totp"))
    return redirect(_safe_next(request.args.get("next")))


def _safe_next(nxt):
    if nxt and nxt.startswith("/") and not nxt.startswith("//") and "\\" not in nxt:
        return nxt
    return url_for("main.home")


@bp.route("/login/totp", methods=["GET", "POST"])
@roles("admin")
def totp():
    if not current_user.needs_second_factor:
        return redirect(url_for("main.home"))
    if request.method == "GET":
        return render_template("totp.html")
    code = request.form.get("code", "")
    with current_app.engine.begin() as conn:
        row = conn.execute(sa.select(db.users.c.totp_secret).where(
            db.users.c.id == current_user.id)).first()
        ok = security.totp_ok(row.totp_secret, code)
        security.record_attempt(conn, current_user.username, security.client_ip(), ok)
        if ok:
            security.mark_second_factor(conn, current_user)
        audit("login.second_factor", outcome="ok" if ok else "denied", conn=conn)
    if not ok:
        return render_template("totp.html", error=_("Wrong code.")), 401
    return redirect(url_for("main.home"))


@bp.route("/logout", methods=["POST"])
@roles(*ALL_ROLES)
def logout():
    audit("logout")
    with current_app.engine.begin() as conn:
        security.revoke_session(conn, current_user.token)
    logout_user()
    session.clear()
    return redirect(url_for("main.login"))


@bp.route("/account/language", methods=["POST"])
@roles(*ALL_ROLES)
def language():
    lang = request.form.get("language")
    if lang not in db.LANGUAGES:
        abort(400)
    with current_app.engine.begin() as conn:
        conn.execute(db.users.update().where(db.users.c.id == current_user.id)
                     .values(language=lang))
        audit("account.language", detail=lang, conn=conn)
    return redirect(_safe_next(request.form.get("next")))


@bp.route("/")
@roles(*ALL_ROLES)
def home():
    return redirect(url_for({"clinician": "main.triage", "technician": "main.devices",
                             "admin": "main.admin_users"}[current_user.role]))


# --- clinicians: triage list ----------------------------------------------------------------


def my_patients(conn):
    """The patients of the clinician's care team (now)."""
    t = now()
    c, p = db.care_team, db.patients
    return conn.execute(
        sa.select(p).join(c, c.c.patient_id == p.c.id).where(
            c.c.user_id == current_user.id, c.c.valid_from <= t,
            sa.or_(c.c.valid_to.is_(None), c.c.valid_to > t)).distinct()
        .order_by(p.c.display_name)).all()


def patient_or_403(conn, pid):
    for p in my_patients(conn):
        if p.id == pid:
            return p
    # its own transaction: the request's is rolled back by the 403
    audit("patient.denied", patient_id=pid, target=request.path, outcome="denied")
    abort(403)


def summary(conn, patient, t=None):
    """One triage row: state, latest values in clinical units, data age, alarms, badge."""
    t = now() if t is None else t
    cfg = current_app.config
    device = D.current_device(conn, patient.id, t)
    recs = D.records(conn, patient.id, t - 7 * 24 * 3600, t + 3600, limit=600,
                     newest_first=True)[::-1]
    cur = D.fold(recs)
    last_t = recs[-1]["time"] if recs else None
    age = None if last_t is None else t - last_t
    state = D.pump_state(cur, age, cfg["AGE_URGENT_S"], D.last_module_event(recs))
    onsets = D.alarm_onsets(recs)
    acks = D.acknowledged(conn, onsets)
    alarms = [dict(o, word=ALARM_WORDS[D.ALARM_BITS[o["bit"]]],
                   acked=(o["device"], o["epoch"], o["seq"], o["bit"]) in acks)
              for o in onsets if o["bit"] not in D.INFO_BITS]
    led = _ledger(device) if device else None
    badge = D.completeness(led)
    if age is None:
        freshness = "urgent"
    elif age > cfg["AGE_URGENT_S"]:
        freshness = "urgent"
    elif age > cfg["AGE_WARNING_S"]:
        freshness = "warning"
    else:
        freshness = "fresh"
    unacked = any(not a["acked"] for a in alarms)
    rank = (0 if unacked else 1 if alarms else 2 if freshness == "urgent" else
            3 if freshness == "warning" else 4)
    return {
        "patient": patient, "device": device, "state": state, "cur": cur,
        "rate": D.rate_mlh(cur.get("rate")), "volume": D.ml(cur.get("volume")),
        "dose": D.ml(cur.get("dose")), "remaining": cur.get("remaining"),
        "battery": cur.get("battery"), "power": cur.get("power"),
        "pump_state": D.PUMP_STATES.get(cur.get("state")),
        "last_time": last_t, "age": age, "freshness": freshness,
        "alarms": alarms, "unacked": unacked, "badge": badge, "ledger": led, "rank": rank,
        "radio": RADIO if recs else None,
    }


def triage_rows(conn):
    rows = [summary(conn, p) for p in my_patients(conn)]
    rows.sort(key=lambda r: (r["rank"], r["patient"].display_name))
    return rows


@bp.route("/favicon.ico")
@public
def favicon():
    return Response(status=204)


@bp.route("/triage")
@roles("clinician")
def triage():
    with current_app.engine.begin() as conn:
        rows = triage_rows(conn)
        audit("triage.view", detail="patients %s" % ",".join(
            str(r["patient"].id) for r in rows), conn=conn)
    return render_template("triage.html", rows=rows, live_url=url_for("main.triage_live"))


@bp.route("/triage.json")
@roles("clinician")
def triage_live():
    with current_app.engine.begin() as conn:
        rows = triage_rows(conn)
        _audit_refresh(conn, "triage.refresh", None, ",".join(str(r["patient"].id)
                                                             for r in rows))
    return {"html": render_template("_triage_rows.html", rows=rows),
            "updated": format_datetime(None, "medium")}


REFRESH_AUDIT_S = 60


def _audit_refresh(conn, action, pid, detail=""):
    """Live refreshes are accesses too: audited, at most once a minute per session and page
    (a page polled every 5 s would otherwise write 720 rows an hour)."""
    key = "audited:%s:%s" % (action, pid)
    last = session.get(key, 0)
    if now() - last >= REFRESH_AUDIT_S:
        audit(action, patient_id=pid, detail=detail, conn=conn)
        session[key] = now()


# --- clinicians: patient page ---------------------------------------------------------------


def chart_data(recs, t0, t1, dose_ml):
    pts, dose, bands, markers = [], [], [], []
    band = None
    prev_bits = set()
    for r in recs:
        if r.get("kind") not in ("status", "pump_event"):
            continue
        tm = r["time"] * 1000
        if "rate" in r or "volume" in r:
            pts.append([tm, D.rate_mlh(r.get("rate")), D.ml(r.get("volume")),
                        r["_epoch"], r["_seq"]])
        if "dose" in r:
            dose.append([tm, D.ml(r["dose"])])
        if "state" in r:
            st = D.PUMP_STATES.get(r["state"], "standby")
            if band is None or band[2] != st:
                if band is not None:
                    band[1] = tm
                band = [tm, None, st, str(PUMP_STATE_WORDS[st])]
                bands.append(band)
        if "alarms" in r:
            bits = set(D.alarm_bits(r["alarms"]))
            for b in sorted(bits - prev_bits):
                markers.append([tm, str(ALARM_WORDS[D.ALARM_BITS[b]]), b])
            prev_bits = bits
    if band is not None:
        band[1] = t1 * 1000
    if len(pts) > CHART_POINTS_MAX:  # 7 days of one-minute records: one point in k
        k = -(-len(pts) // CHART_POINTS_MAX)
        pts = pts[::k] + ([pts[-1]] if (len(pts) - 1) % k else [])
    return {"points": pts, "dose": dose, "bands": bands, "alarms": markers,
            "t0": t0 * 1000, "t1": t1 * 1000, "prescribed_ml": dose_ml}


def chart_labels():
    return {"rate": _("Rate (ml/h)"), "volume": _("Volume delivered (ml)"),
            "dose": _("Dose prescribed (ml)"), "alarm": _("Alarm"),
            "time": _("Time"), "states": {k: str(v) for k, v in PUMP_STATE_WORDS.items()},
            "locale": str(_locale_tag()), "tz": current_app.config["BABEL_DEFAULT_TIMEZONE"]}


def _locale_tag():
    from flask_babel import get_locale

    return str(get_locale() or "en").replace("_", "-")


def event_word(r):
    k = r.get("kind")
    if k == "module":
        ev = r.get("event")
        base = str(MODULE_EVENT_WORDS.get(ev, ev))
        if ev == "records_lost" and "detail" in r:
            base += " (%s)" % r["detail"]
        return base
    if k == "link":
        return _("pump link: %(condition)s", condition=r.get("condition", "?"))
    if k == "identity":
        return _("pump identified: %(text)s", text=r.get("text", ""))
    if k == "log":
        return _("pump log entry %(index)s: %(text)s", index=r.get("index", "?"),
                 text=r.get("text", ""))
    if k == "pump_event":
        parts = []
        if "alarms" in r:
            words = [str(ALARM_WORDS[D.ALARM_BITS[b]]) for b in D.alarm_bits(r["alarms"])]
            parts.append(_("alarms: %(list)s", list=", ".join(words) or _("none")))
        if "state" in r:
            parts.append(_("state: %(state)s", state=PUMP_STATE_WORDS.get(
                D.PUMP_STATES.get(r["state"]), r["state"])))
        if "rate" in r:
            parts.append(_("rate %(rate)s ml/h", rate=format_decimal(D.rate_mlh(r["rate"]),
                                                                     "#,##0.0")))
        return _("pump event") + (": " + "; ".join(parts) if parts else "")
    return k


def patient_context(conn, patient, view):
    t = now()
    span = VIEWS[view]
    t0, t1 = t - span, t
    recs = D.records(conn, patient.id, t0, t1 + 3600)
    s = summary(conn, patient, t)
    chart = chart_data(recs, t0, t1, s["dose"])
    events = [dict(r, word=event_word(r)) for r in recs
              if r.get("kind") not in ("status",) and not (
                  r.get("kind") == "module" and r.get("event") == "health")][::-1][:300]
    history = [dict(time=m[0] / 1000, word=m[1]) for m in chart["alarms"]][::-1]
    devices = []
    for dev in sorted({d for d, _a, _b in D._spans(conn, patient.id, t0, t1)} |
                      ({s["device"]} if s["device"] else set())):
        led = _ledger(dev)
        if led is None:
            continue
        eps = []
        for e in led["epochs"]:
            eps.append(dict(e, gap_times=D.gap_times(conn, dev, e["epoch"], e["gaps"][:50])))
        devices.append({"device": dev, "ledger": led, "epochs": eps,
                        "badge": D.completeness(led)})
    return {"patient": patient, "s": s, "view": view, "chart": chart, "labels": chart_labels(),
            "events": events, "history": history, "devices": devices, "t0": t0, "t1": t1,
            "n_records": len(recs)}


@bp.route("/patients/<int:pid>")
@roles("clinician")
def patient(pid):
    view = request.args.get("view", "24h")
    if view not in VIEWS:
        abort(404)
    with current_app.engine.begin() as conn:
        p = patient_or_403(conn, pid)
        ctx = patient_context(conn, p, view)
        audit("patient.view", patient_id=pid, detail=view, conn=conn)
    return render_template("patient.html", live_url=url_for("main.patient_live", pid=pid,
                                                            view=view), **ctx)


@bp.route("/patients/<int:pid>/live.json")
@roles("clinician")
def patient_live(pid):
    view = request.args.get("view", "24h")
    if view not in VIEWS:
        abort(404)
    with current_app.engine.begin() as conn:
        p = patient_or_403(conn, pid)
        ctx = patient_context(conn, p, view)
        _audit_refresh(conn, "patient.refresh", pid, view)
    return {"html": render_template("_patient_live.html", **ctx), "chart": ctx["chart"]}


@bp.route("/patients/<int:pid>/alarms/ack", methods=["POST"])
@roles("clinician")
def ack_alarm(pid):
    try:
        device = request.form["device"][:64]
        epoch, seq, bit = (int(request.form[k]) for k in ("epoch", "seq", "bit"))
    except (KeyError, ValueError):
        abort(400)
    with current_app.engine.begin() as conn:
        patient_or_403(conn, pid)
        # The alarm must be one of this patient's current ones (attribution by time).
        recs = D.records(conn, pid, now() - 7 * 24 * 3600, now() + 3600, limit=600,
                         newest_first=True)[::-1]
        onsets = [o for o in D.alarm_onsets(recs) if (o["device"], o["epoch"], o["seq"],
                                                      o["bit"]) == (device, epoch, seq, bit)]
        if not onsets:
            abort(404)
        exists = conn.execute(sa.select(db.alarm_acks.c.id).where(
            db.alarm_acks.c.device == device, db.alarm_acks.c.epoch == epoch,
            db.alarm_acks.c.seq == seq, db.alarm_acks.c.bit == bit)).first()
        if not exists:
            conn.execute(db.alarm_acks.insert().values(
                patient_id=pid, device=device, epoch=epoch, seq=seq, bit=bit,
                user_id=current_user.id, at=now()))
        audit("alarm.acknowledge", patient_id=pid, target="%s/%d/%d" % (device, epoch, seq),
              detail=D.ALARM_BITS.get(bit, str(bit)), conn=conn)
    flash(_("Alarm acknowledged."))
    return redirect(url_for("main.patient", pid=pid))


@bp.route("/patients/<int:pid>/fhir")
@roles("clinician")
def fhir_export(pid):
    from . import fhir

    try:
        t1 = float(request.args.get("to") or now())
        t0 = float(request.args.get("from") or t1 - 24 * 3600)
    except ValueError:
        abort(400)
    if not t0 < t1 or t1 - t0 > 31 * 24 * 3600:
        abort(400)
    with current_app.engine.begin() as conn:
        p = patient_or_403(conn, pid)
        bundle = fhir.export(conn, current_app.config["HOME"], p, t0, t1)
        audit("patient.export.fhir", patient_id=pid, detail="%d-%d, %d entries" % (
            t0, t1, len(bundle["entry"])), conn=conn)
    body = json.dumps(bundle, indent=1, sort_keys=True)
    return Response(body, mimetype="application/fhir+json", headers={
        "Content-Disposition": "attachment; filename=patient-%d-%d-%d.fhir.json"
        % (pid, t0, t1)})


# --- technicians: devices, ledger, rejects, module health ----------------------------------


def _all_devices():
    from ..server.report import registered_devices
    from ..server.store import Store, StoreError

    reg = registered_devices(current_app.config["HOME"])
    try:
        st = Store(current_app.config["DB_URL"], readonly=True)
    except StoreError:
        return reg, {}
    try:
        return sorted(set(reg) | set(st.devices())), {d: st.device_ledger(d, d in reg)
                                                      for d in set(reg) | set(st.devices())}
    finally:
        st.close()


@bp.route("/devices")
@roles("technician")
def devices():
    devs, ledgers = _all_devices()
    with current_app.engine.begin() as conn:
        assigned = {r.device for r in conn.execute(sa.select(db.device_assignments.c.device)
                                                   .where(db.device_assignments.c.valid_to
                                                          .is_(None)))}
        audit("devices.view", conn=conn)
    rows = [{"device": d, "ledger": ledgers.get(d), "badge": D.completeness(ledgers.get(d)),
             "assigned": d in assigned} for d in devs]
    return render_template("devices.html", rows=rows)


@bp.route("/devices/<device>")
@roles("technician")
def device(device):
    devs, ledgers = _all_devices()
    if device not in devs:
        abort(404)
    led = ledgers.get(device)
    with current_app.engine.begin() as conn:
        health, conditions = module_health(conn, device)
        epochs = conn.execute(sa.text(
            "SELECT epoch, first_seen, prev_epoch, prev_end_seq FROM epochs WHERE device=:d "
            "ORDER BY epoch DESC LIMIT 50"), {"d": device}).all()
        eps = [dict(e, gap_times=D.gap_times(conn, device, e["epoch"], e["gaps"][:50]))
               for e in (led["epochs"] if led else [])]
        audit("device.view", target=device, conn=conn)
    return render_template("device.html", device=device, led=led, health=health,
                           conditions=conditions, epochs=epochs, eps=eps,
                           cert=certificate(device), badge=D.completeness(led))


def module_health(conn, device):
    """The newest health counters (module records) and pump-link conditions by kind: no
    clinical values are read here."""
    tx = db.record_time(conn.dialect.name)
    health = None
    for fields, in conn.execute(sa.text(
            "SELECT fields FROM objects WHERE device=:d AND kind='record' AND fields LIKE "
            "'%%\"event\": \"health\"%%' ORDER BY %s DESC LIMIT 1" % tx), {"d": device}):
        f = json.loads(fields)
        health = {"time": f["time"], "counters": f.get("counters", {})}
    conditions = {}
    for fields, in conn.execute(sa.text(
            "SELECT fields FROM objects WHERE device=:d AND kind='record' AND fields LIKE "
            "'%%\"kind\": \"link\"%%' ORDER BY %s DESC LIMIT 500" % tx), {"d": device}):
        f = json.loads(fields)
        c = f.get("condition", "?")
        conditions[c] = conditions.get(c, 0) + 1
    return health, sorted(conditions.items())


def certificate(device):
    import hashlib
    import pathlib
    import re

    from cryptography import x509

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", device):
        return None
    path = pathlib.Path(current_app.config["HOME"]) / "devices" / device / "device.crt.pem"
    if not path.exists():
        return None
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    from cryptography.hazmat.primitives import serialization

    der = cert.public_bytes(serialization.Encoding.DER)
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "serial": "%x" % cert.serial_number,
            "not_before": cert.not_valid_before_utc.timestamp(),
            "not_after": cert.not_valid_after_utc.timestamp(),
            "sha256": hashlib.sha256(der).hexdigest()}


# --- administrators: users, patients, assignments, audit, settings -------------------------


@bp.route("/admin/users", methods=["GET", "POST"])
@roles("admin")
def admin_users():
    new_uri = None
    if request.method == "POST":
        username = (request.form.get("username") or "").strip()
        role = request.form.get("role")
        pw = request.form.get("password") or ""
        lang = request.form.get("language") or "en"
        if not username or len(username) > 64 or role not in db.ROLES or len(pw) < 12 or \
                lang not in db.LANGUAGES:
            flash(_("A user name, a role and a password of at least 12 characters are "
                    "needed."), "error")
            return redirect(url_for("main.admin_users"))
        with current_app.engine.begin() as conn:
            try:
                secret, _id = create_user(conn, username, role, pw,
                                          request.form.get("full_name", ""), lang)
            except sa.exc.IntegrityError:
                flash(_("That user name is taken."), "error")
                return redirect(url_for("main.admin_users"))
            audit("user.add", target=username, detail=role, conn=conn)
        if secret:
            new_uri = security.totp_uri(secret, username)
    with current_app.engine.begin() as conn:
        users = conn.execute(sa.select(db.users).order_by(db.users.c.username)).all()
        audit("users.view", conn=conn)
    return render_template("admin_users.html", users=users, new_uri=new_uri, now=now())


def create_user(conn, username, role, password, full_name="", language="en"):
    """-> (TOTP secret or None, id). Administrators get a TOTP secret."""
    secret = security.new_totp_secret() if role == "admin" else None
    res = conn.execute(db.users.insert().values(
        username=username, full_name=full_name[:200], role=role,
        password_hash=security.hash_password(password), language=language,
        totp_secret=secret, active=True, created_at=now()))
    return secret, res.inserted_primary_key[0]


@bp.route("/admin/users/<int:uid>/<action>", methods=["POST"])
@roles("admin")
def admin_user_action(uid, action):
    if action not in ("unlock", "disable", "enable"):
        abort(404)
    values = {"unlock": dict(locked_until=None, failed_logins=0),
              "disable": dict(active=False), "enable": dict(active=True)}[action]
    with current_app.engine.begin() as conn:
        row = conn.execute(sa.select(db.users).where(db.users.c.id == uid)).first()
        if row is None:
            abort(404)
        if uid == current_user.id and action == "disable":
            abort(400)
        conn.execute(db.users.update().where(db.users.c.id == uid).values(**values))
        if action == "disable":
            conn.execute(db.sessions.update().where(db.sessions.c.user_id == uid,
                                                    db.sessions.c.revoked_at.is_(None))
                         .values(revoked_at=now()))
        audit("user." + action, target=row.username, conn=conn)
    return redirect(url_for("main.admin_users"))


@bp.route("/admin/patients", methods=["GET", "POST"])
@roles("admin")
def admin_patients():
    if request.method == "POST":
        mrn = (request.form.get("mrn") or "").strip()[:64]
        name = (request.form.get("display_name") or "").strip()[:200]
        if not mrn or not name:
            flash(_("A record number and a name are needed."), "error")
        else:
            with current_app.engine.begin() as conn:
                try:
                    res = conn.execute(db.patients.insert().values(
                        mrn=mrn, display_name=name, created_at=now(),
                        birth_date=(request.form.get("birth_date") or None)))
                except sa.exc.IntegrityError:
                    flash(_("That record number exists already."), "error")
                    return redirect(url_for("main.admin_patients"))
                audit("patient.add", patient_id=res.inserted_primary_key[0], target=mrn,
                      conn=conn)
    with current_app.engine.begin() as conn:
        rows = conn.execute(sa.select(db.patients).order_by(db.patients.c.display_name)).all()
        audit("patients.list", conn=conn)
    return render_template("admin_patients.html", patients=rows)


@bp.route("/admin/patients/<int:pid>")
@roles("admin")
def admin_patient(pid):
    with current_app.engine.begin() as conn:
        p = conn.execute(sa.select(db.patients).where(db.patients.c.id == pid)).first()
        if p is None:
            abort(404)
        devs = D.assignments(conn, pid)
        team = conn.execute(sa.select(db.care_team, db.users.c.username).join(db.users).where(
            db.care_team.c.patient_id == pid).order_by(db.care_team.c.valid_from)).all()
        clinicians = conn.execute(sa.select(db.users).where(
            db.users.c.role == "clinician", db.users.c.active == sa.true())
            .order_by(db.users.c.username)).all()
        audit("patient.admin.view", patient_id=pid, conn=conn)
    return render_template("admin_patient.html", p=p, devs=devs, team=team,
                           clinicians=clinicians, now=now())


def assign_device(conn, pid, device, t_from, by=None):
    """Assign `device` to patient `pid` from t_from: its open assignment (to anyone) ends at
    t_from (history kept); overlapping periods are refused."""
    a = db.device_assignments
    later = conn.execute(sa.select(a.c.id).where(a.c.device == device,
                                                 a.c.valid_from >= t_from)).first()
    if later is not None:
        raise ValueError("a later assignment of this module exists")
    conn.execute(a.update().where(a.c.device == device, a.c.valid_to.is_(None))
                 .values(valid_to=t_from))
    conn.execute(a.update().where(a.c.device == device, a.c.valid_to > t_from)
                 .values(valid_to=t_from))
    conn.execute(a.insert().values(device=device, patient_id=pid, valid_from=t_from,
                                   created_by=by, created_at=now()))


def add_to_care_team(conn, pid, uid, t_from):
    conn.execute(db.care_team.insert().values(patient_id=pid, user_id=uid, valid_from=t_from))


def _form_time(name):
    import datetime

    v = (request.form.get(name) or "").strip()
    if not v:
        return now()
    try:
        d = datetime.datetime.fromisoformat(v)
    except ValueError:
        abort(400)
    if d.tzinfo is None:
        from zoneinfo import ZoneInfo

        d = d.replace(tzinfo=ZoneInfo(current_app.config["BABEL_DEFAULT_TIMEZONE"]))
    return d.timestamp()


@bp.route("/admin/patients/<int:pid>/<action>", methods=["POST"])
@roles("admin")
def admin_patient_action(pid, action):
    import re

    with current_app.engine.begin() as conn:
        if conn.execute(sa.select(db.patients.c.id).where(db.patients.c.id == pid)).first() \
                is None:
            abort(404)
        if action == "assign-device":
            device = (request.form.get("device") or "").strip()
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", device):
                abort(400)
            t = _form_time("valid_from")
            try:
                assign_device(conn, pid, device, t, current_user.id)
            except ValueError:
                flash(_("This module has a later assignment: end that one first."), "error")
                return redirect(url_for("main.admin_patient", pid=pid))
            audit("patient.device.assign", patient_id=pid, target=device, detail=str(t),
                  conn=conn)
        elif action == "end-device":
            aid = int(request.form.get("id", 0))
            t = _form_time("valid_to")
            conn.execute(db.device_assignments.update().where(
                db.device_assignments.c.id == aid, db.device_assignments.c.patient_id == pid,
                db.device_assignments.c.valid_to.is_(None)).values(valid_to=t))
            audit("patient.device.end", patient_id=pid, target=str(aid), detail=str(t),
                  conn=conn)
        elif action == "add-clinician":
            uid = int(request.form.get("user_id", 0))
            u = conn.execute(sa.select(db.users).where(db.users.c.id == uid,
                                                       db.users.c.role == "clinician")).first()
            if u is None:
                abort(400)
            add_to_care_team(conn, pid, uid, now())
            audit("patient.clinician.add", patient_id=pid, target=u.username, conn=conn)
        elif action == "end-clinician":
            cid = int(request.form.get("id", 0))
            conn.execute(db.care_team.update().where(
                db.care_team.c.id == cid, db.care_team.c.patient_id == pid,
                db.care_team.c.valid_to.is_(None)).values(valid_to=now()))
            audit("patient.clinician.end", patient_id=pid, target=str(cid), conn=conn)
        else:
            abort(404)
    return redirect(url_for("main.admin_patient", pid=pid))


AUDIT_COLUMNS = ("id", "at", "username", "role", "action", "patient_id", "target", "detail",
                 "ip", "outcome")


def _audit_query():
    q = sa.select(db.audit).order_by(db.audit.c.id.desc())
    if request.args.get("patient"):
        try:
            q = q.where(db.audit.c.patient_id == int(request.args["patient"]))
        except ValueError:
            abort(400)
    if request.args.get("user"):
        q = q.where(db.audit.c.username == request.args["user"])
    if request.args.get("action"):
        q = q.where(db.audit.c.action == request.args["action"])
    return q


@bp.route("/admin/audit")
@roles("admin")
def admin_audit():
    with current_app.engine.begin() as conn:
        rows = conn.execute(_audit_query().limit(500)).all()
        audit("audit.view", detail=request.query_string.decode()[:200], conn=conn)
    return render_template("admin_audit.html", rows=rows)


@bp.route("/admin/audit.csv")
@roles("admin")
def admin_audit_csv():
    import datetime

    with current_app.engine.begin() as conn:
        rows = conn.execute(_audit_query()).all()
        audit("audit.export", detail=request.query_string.decode()[:200], conn=conn)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(AUDIT_COLUMNS)
    for r in rows:
        vals = [getattr(r, c) for c in AUDIT_COLUMNS]
        vals[1] = datetime.datetime.fromtimestamp(r.at, datetime.timezone.utc).isoformat()
        # a cell starting with = + - @ is a formula in a spreadsheet: neutralise it
        w.writerow(["'" + v if isinstance(v, str) and v[:1] in "=+-@\t\r" else v
                    for v in vals])
    return Response(buf.getvalue(), mimetype="text/csv", headers={
        "Content-Disposition": "attachment; filename=audit.csv"})


@bp.route("/admin/settings", methods=["GET", "POST"])
@roles("admin")
def admin_settings():
    if request.method == "POST":
        try:
            warn = int(request.form["age_warning_min"]) * 60
            urgent = int(request.form["age_urgent_min"]) * 60
        except (KeyError, ValueError):
            abort(400)
        if not 0 < warn < urgent <= 24 * 3600:
            flash(_("The warning limit must be shorter than the urgent one."), "error")
        else:
            with current_app.engine.begin() as conn:
                for k, v in (("age_warning_s", warn), ("age_urgent_s", urgent)):
                    conn.execute(db.settings.delete().where(db.settings.c.key == k))
                    conn.execute(db.settings.insert().values(key=k, value=str(v)))
                audit("settings.change", detail="warning %d s, urgent %d s" % (warn, urgent),
                      conn=conn)
            current_app.config.update(AGE_WARNING_S=warn, AGE_URGENT_S=urgent)
    return render_template("admin_settings.html")


@bp.app_context_processor
def _ctx():
    return {"user": current_user, "now_ts": time.time()}


__all__ = ["bp", "g"]
