"""Accounts, sessions, throttling, second factor, roles (deny by default), audit.

Sessions: Flask-Login on Flask's signed session cookie. The cookie holds only a random token;
the server keeps a row per session (app_sessions: its SHA-256, the user, created, last seen)
so a session expires after IDLE_S without a request or ABSOLUTE_S after login, and logging out
(or an administrator disabling the account) revokes it on the server: a copied cookie is then
worthless. No remember-me cookie.
"""

import functools
import hashlib
import secrets

import argon2
import pyotp
import sqlalchemy as sa
from flask import abort, current_app, g, request
from flask_login import LoginManager, UserMixin, current_user

from . import db
from .db import now

_ph = argon2.PasswordHasher()
login_manager = LoginManager()
login_manager.login_view = "main.login"
login_manager.session_protection = None  # the server-side session row is the protection
login_manager.login_message = None

#: failed logins of one account before it is locked, and for how long (s)
LOCK_AFTER = 5
LOCK_S = 15 * 60
#: failed logins from one address within THROTTLE_WINDOW_S before it is refused for a while
IP_LIMIT = 20
THROTTLE_WINDOW_S = 15 * 60


def hash_password(pw):
    return _ph.hash(pw)


def check_password(stored, pw):
    try:
        return _ph.verify(stored, pw)
    except (argon2.exceptions.VerifyMismatchError, argon2.exceptions.InvalidHashError,
            argon2.exceptions.VerificationError):
        return False


_DUMMY = None


def burn_time(pw):
    """Spend a verification's time for an unknown user (no user enumeration by timing)."""
    global _DUMMY
    if _DUMMY is None:
        _DUMMY = _ph.hash("not a password")
    check_password(_DUMMY, pw)


def new_totp_secret():
    return pyotp.random_base32()


def totp_uri(secret, username, issuer="serene"):
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=issuer)


def totp_ok(secret, code):
    return bool(secret) and pyotp.TOTP(secret).verify((code or "").strip(), valid_window=1)


class User(UserMixin):
    def __init__(self, row, token=None, second_factor=False):
        self.row = row
        self.id = row.id
        self.username = row.username
        self.role = row.role
        self.language = row.language
        self.full_name = row.full_name
        self.token = token
        self.second_factor = second_factor

    def get_id(self):
        return self.token

    @property
    def needs_second_factor(self):
        return self.role == "admin" and not self.second_factor


def _hash_token(token):
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(conn, user_row, ip):
    token = secrets.token_urlsafe(32)
    t = now()
    conn.execute(db.sessions.insert().values(token_hash=_hash_token(token), user_id=user_row.id,
                                             created_at=t, last_seen=t, ip=ip))
    return User(user_row, token)


def mark_second_factor(conn, user):
    conn.execute(db.sessions.update().where(db.sessions.c.token_hash == _hash_token(user.token))
                 .values(second_factor=True))
    user.second_factor = True


def revoke_session(conn, token):
    conn.execute(db.sessions.update().where(db.sessions.c.token_hash == _hash_token(token))
                 .values(revoked_at=now()))


@login_manager.user_loader
def _load(token):
    cfg = current_app.config
    t = now()
    with current_app.engine.begin() as conn:
        row = conn.execute(
            sa.select(db.sessions, db.users.c.active).join(db.users)
            .where(db.sessions.c.token_hash == _hash_token(token))).first()
        if row is None or row.revoked_at is not None or not row.active:
            return None
        if t - row.last_seen > cfg["SESSION_IDLE_S"] or \
                t - row.created_at > cfg["SESSION_ABSOLUTE_S"]:
            conn.execute(db.sessions.update().where(db.sessions.c.token_hash == row.token_hash)
                         .values(revoked_at=t))
            g.session_expired = True
            return None
        # Live polling keeps a page fresh but must not keep a session alive for ever: only
        # requests a person makes (not the JSON refreshes) count as activity.
        if not request.path.endswith(".json"):
            conn.execute(db.sessions.update().where(db.sessions.c.token_hash == row.token_hash)
                         .values(last_seen=t))
        user = conn.execute(sa.select(db.users).where(db.users.c.id == row.user_id)).first()
    return User(user, token, bool(row.second_factor))


def client_ip():
    return request.remote_addr or ""


def throttled(conn, username, ip):
    """None, or why a login attempt is refused before the password is even checked."""
    t = now()
    n_ip = conn.execute(sa.select(sa.func.count()).select_from(db.login_attempts).where(
        db.login_attempts.c.ip == ip, db.login_attempts.c.ok == sa.false(),
        db.login_attempts.c.at > t - THROTTLE_WINDOW_S)).scalar()
    if n_ip >= IP_LIMIT:
        return "ip"
    row = conn.execute(sa.select(db.users.c.locked_until).where(
        db.users.c.username == username)).first()
    if row is not None and row.locked_until and row.locked_until > t:
        return "locked"
    return None


def record_attempt(conn, username, ip, ok):
    """Count the attempt; lock the account after LOCK_AFTER failures in a row. -> locked?"""
    t = now()
    conn.execute(db.login_attempts.insert().values(at=t, username=username[:64], ip=ip, ok=ok))
    if ok:
        conn.execute(db.users.update().where(db.users.c.username == username)
                     .values(failed_logins=0, locked_until=None))
        return False
    row = conn.execute(sa.select(db.users.c.failed_logins).where(
        db.users.c.username == username)).first()
    if row is None:
        return False
    n = row.failed_logins + 1
    locked = n >= LOCK_AFTER
    conn.execute(db.users.update().where(db.users.c.username == username).values(
        failed_logins=0 if locked else n, locked_until=t + LOCK_S if locked else None))
    return locked


# --- roles: deny by default --------------------------------------------------------------


def roles(*allowed):
    """The roles that may use a view. A view without this decorator is refused to everyone
    (check_view_allowed), so forgetting it fails closed."""
    for r in allowed:
        assert r in db.ROLES, r

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            if current_user.role not in allowed:
                audit("access.denied", target=request.path, outcome="denied")
                abort(403)
            return fn(*a, **kw)
        wrapper._roles = allowed
        return wrapper
    return deco


def public(fn):
    fn._public = True
    return fn


def audit(action, patient_id=None, target="", detail="", outcome="ok", user=None, conn=None):
    """Who, what, when, from where. Written in its own transaction unless conn is given."""
    u = user if user is not None else (current_user if current_user and
                                       current_user.is_authenticated else None)
    values = dict(at=now(), user_id=getattr(u, "id", None),
                  username=getattr(u, "username", "") or "", role=getattr(u, "role", "") or "",
                  action=action, patient_id=patient_id, target=str(target)[:200],
                  detail=str(detail)[:2000], ip=client_ip(), outcome=outcome)
    if conn is not None:
        conn.execute(db.audit.insert().values(**values))
    else:
        with current_app.engine.begin() as c:
            c.execute(db.audit.insert().values(**values))
