"""The application's data layer: SQLAlchemy 2 Core, on the ingest's database.

The application's own tables (prefix app_) are on the server's metadata (serene.server.schema:
one data-access layer, one engine factory) and are created and changed by the one Alembic tree
of the database (tools/serene/migrations, version table alembic_version), with the ingest's.
The ingest's tables (objects, checkpoints, epochs, rejects, counters) are read with SQL that
runs on SQLite and PostgreSQL; the one dialect difference (reading the record's time out of
the JSON fields) is in record_time().
"""

import time

import sqlalchemy as sa

from ..server import schema
from ..server.schema import metadata

ROLES = ("clinician", "technician", "admin")
LANGUAGES = ("en", "fr")

users = sa.Table(
    "app_users", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    sa.Column("full_name", sa.String(200), nullable=False, server_default=""),
    sa.Column("password_hash", sa.String(200), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("language", sa.String(8), nullable=False, server_default="en"),
    sa.Column("totp_secret", sa.String(64)),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("failed_logins", sa.Integer, nullable=False, server_default="0"),
    sa.Column("locked_until", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
)

sessions = sa.Table(
    "app_sessions", metadata,
    # SHA-256 of the random token kept in the signed session cookie: a copy of the database
    # does not give anyone a session.
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("app_users.id"), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("ip", sa.String(64)),
    sa.Column("second_factor", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("revoked_at", sa.Float),
)

login_attempts = sa.Table(
    "app_login_attempts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("username", sa.String(64), nullable=False),
    sa.Column("ip", sa.String(64), nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Index("app_login_attempts_ip", "ip", "at"),
    sa.Index("app_login_attempts_user", "username", "at"),
)

audit = sa.Table(
    "app_audit", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("user_id", sa.Integer),
    sa.Column("username", sa.String(64), nullable=False, server_default=""),
    sa.Column("role", sa.String(16), nullable=False, server_default=""),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("patient_id", sa.Integer),
    sa.Column("target", sa.String(200), nullable=False, server_default=""),
    sa.Column("detail", sa.Text, nullable=False, server_default=""),
    sa.Column("ip", sa.String(64), nullable=False, server_default=""),
    sa.Column("outcome", sa.String(16), nullable=False, server_default="ok"),
    sa.Index("app_audit_at", "at"),
    sa.Index("app_audit_patient", "patient_id", "at"),
)

patients = sa.Table(
    "app_patients", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("mrn", sa.String(64), nullable=False, unique=True),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("birth_date", sa.String(10)),
    sa.Column("created_at", sa.Float, nullable=False),
)

care_team = sa.Table(
    "app_care_team", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("patient_id", sa.Integer, sa.ForeignKey("app_patients.id"), nullable=False),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("app_users.id"), nullable=False),
    sa.Column("valid_from", sa.Float, nullable=False),
    sa.Column("valid_to", sa.Float),
    sa.Index("app_care_team_user", "user_id", "patient_id"),
)

device_assignments = sa.Table(
    "app_device_assignments", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("patient_id", sa.Integer, sa.ForeignKey("app_patients.id"), nullable=False),
    # [valid_from, valid_to): a record belongs to the patient the module was assigned to at
    # the record's time; valid_to NULL = still assigned. Ending one keeps it (history).
    sa.Column("valid_from", sa.Float, nullable=False),
    sa.Column("valid_to", sa.Float),
    sa.Column("created_by", sa.Integer),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("app_device_assignments_device", "device", "valid_from"),
    sa.Index("app_device_assignments_patient", "patient_id", "valid_from"),
)

alarm_acks = sa.Table(
    "app_alarm_acks", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("patient_id", sa.Integer, nullable=False),
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("bit", sa.Integer, nullable=False),
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.UniqueConstraint("device", "epoch", "seq", "bit", name="app_alarm_acks_onset"),
)

settings = sa.Table(
    "app_settings", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


def default_url(home):
    """The database of a server home (--db, else $SERENE_DB, else the SQLite file)."""
    return schema.resolve_url(home)


def make_engine(url):
    return schema.make_engine(url)


def record_time(dialect_name):
    """SQL for a stored record's module time (fields->time), the expression the
    app_objects_record_time index is built on (migration 0003) so the planner uses it."""
    if dialect_name == "sqlite":
        return "json_extract(fields, '$.time')"
    return "(CAST((CAST(fields AS json) ->> 'time') AS DOUBLE PRECISION))"


def migrate(engine):
    """Bring the database (the ingest's tables and ours) to the newest migration."""
    schema.migrate(engine)


def get_setting(conn, key, default):
    row = conn.execute(sa.select(settings.c.value).where(settings.c.key == key)).first()
    return default if row is None else row[0]


def now():
    return time.time()
