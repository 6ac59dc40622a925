"""The clinicians' and operators' web application (issue 11).

    create_app(home, db_url=None, **config) -> a Flask app on the ingest's database
    serene webapp --home DIR [--port P] [--host H --trusted-proxy A --public-host N]
    serene users add --home DIR --role admin --username U [--password-file F]

Flask 3 (server-rendered Jinja2, autoescaping on), Flask-Login sessions with a server-side
session row (security.py), Flask-WTF CSRF on every POST, argon2 password hashes, pyotp TOTP for
administrators, Flask-Babel (English, French: translations/), SQLAlchemy Core + Alembic
(db.py, migrations/). Chart.js is fetched by tools/dev from the npm registry into
static/vendor/ (git-ignored) and served from /static: nothing at run time comes from elsewhere.
"""

import os
import pathlib
import secrets

from flask import Flask, abort, g, redirect, request, session, url_for
from flask_babel import Babel
from flask_login import current_user
from flask_wtf.csrf import CSRFError, CSRFProtect

from . import db, security

HERE = pathlib.Path(__file__).parent
VENDOR_CHART = HERE / "static" / "vendor" / "chart.umd.min.js"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")

csrf = CSRFProtect()


def secret_key(home):
    """A random key per server home (0600), made once: sessions survive a restart."""
    path = pathlib.Path(home) / "server" / "webapp.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def ensure_database(home, db_url=None):
    """The database (the ingest's tables and ours: one Alembic tree) is at the newest
    revision. -> engine"""
    engine = db.make_engine(db_url or db.default_url(home))
    db.migrate(engine)
    return engine


def create_app(home, db_url=None, **config):
    app = Flask(__name__, static_folder="static", template_folder="templates")
    home = pathlib.Path(home)
    app.config.update(
        HOME=str(home),
        SECRET_KEY=secret_key(home),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=False,
        SESSION_COOKIE_NAME="serene_session",
        PERMANENT_SESSION_LIFETIME=12 * 3600,
        SESSION_IDLE_S=30 * 60,
        SESSION_ABSOLUTE_S=12 * 3600,
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session
        WTF_CSRF_SSL_STRICT=True,
        BABEL_DEFAULT_LOCALE="en",
        BABEL_DEFAULT_TIMEZONE="Europe/Paris",
        BABEL_TRANSLATION_DIRECTORIES=str(HERE / "translations"),
        ALLOWED_HOSTS=None,  # set by the server: the addresses it serves
        REQUIRE_HTTPS=False,  # set by the server behind a TLS-terminating proxy
        AGE_WARNING_S=15 * 60,
        AGE_URGENT_S=30 * 60,
        LIVE_POLL_MS=5000,
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    app.config.update(config)
    app.config["DB_URL"] = db_url or db.default_url(home)
    app.engine = ensure_database(home, app.config["DB_URL"])
    with app.engine.begin() as conn:
        for key, name in (("age_warning_s", "AGE_WARNING_S"), ("age_urgent_s", "AGE_URGENT_S")):
            app.config[name] = int(db.get_setting(conn, key, app.config[name]))

    security.login_manager.init_app(app)
    csrf.init_app(app)
    Babel(app, locale_selector=_locale)

    @app.before_request
    def _guard():
        allowed = app.config["ALLOWED_HOSTS"]
        if allowed is not None:
            host = request.environ.get("HTTP_HOST", "")
            if not host or "," in host:  # none, or two (joined by the server)
                abort(400)
            if host.lower() not in allowed:
                abort(421)
        if app.config["REQUIRE_HTTPS"] and request.scheme != "https":
            abort(403)  # behind the proxy: only what reached it over TLS (webapp/server.py)
        view = app.view_functions.get(request.endpoint)
        if request.endpoint == "static" or getattr(view, "_public", False):
            return None
        if not current_user.is_authenticated:
            if request.path.endswith(".json"):
                abort(401)
            return redirect(url_for("main.login", next=request.path,
                                    expired=1 if g.get("session_expired") else None))
        if current_user.needs_second_factor and request.endpoint not in (
                "main.totp", "main.logout"):
            return redirect(url_for("main.totp"))
        if view is None or not hasattr(view, "_roles"):
            abort(403)  # deny by default: a view must say who may use it
        return None

    @app.after_request
    def _headers(resp):
        h = resp.headers
        h["Content-Security-Policy"] = CSP
        h["X-Content-Type-Options"] = "nosniff"
        h["X-Frame-Options"] = "DENY"
        # Same-origin only: Flask-WTF refuses a POST over HTTPS without a same-origin
        # Referer (WTF_CSRF_SSL_STRICT), and nothing leaks to other sites.
        h["Referrer-Policy"] = "same-origin"
        h["Cross-Origin-Opener-Policy"] = "same-origin"
        if request.endpoint != "static":
            # health data and account pages stay out of every cache
            h["Cache-Control"] = "no-store"
            h["Pragma"] = "no-cache"
        if app.config["SESSION_COOKIE_SECURE"]:
            h["Strict-Transport-Security"] = "max-age=31536000"
        return resp

    @app.errorhandler(CSRFError)
    def _csrf(e):
        security.audit("csrf.refused", target=request.path, detail=e.description,
                       outcome="denied")
        return _error_page(400, e.description)

    for code in (400, 401, 403, 404, 405, 421, 429):
        app.register_error_handler(code, lambda e, code=code: _error_page(code, None))

    from . import views

    app.register_blueprint(views.bp)
    views.install_filters(app)
    return app


def _locale():
    if current_user and current_user.is_authenticated:
        return current_user.language
    if session.get("lang") in db.LANGUAGES:
        return session["lang"]
    return request.accept_languages.best_match(db.LANGUAGES) or "en"


def _error_page(code, detail):
    from flask import render_template

    return render_template("error.html", code=code, detail=detail), code
