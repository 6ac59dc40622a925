"""The one data-access layer of the server and the clinicians' application: SQLAlchemy 2 Core.

    metadata                 every table of the database: the ingest's (below) and the
                             application's app_* tables (serene.webapp.db adds them here)
    make_engine(url)         an Engine for "sqlite:///PATH" (the embedded default) or
                             "postgresql://..." (psycopg 3); SQLite: WAL, synchronous=FULL,
                             busy_timeout, foreign keys, and real BEGIN/SAVEPOINT (see below)
    resolve_url(home, url)   the database of a server home: `url` (--db), else $SERENE_DB,
                             else the SQLite file store.db_path(home)
    migrate(engine)          bring the schema to the newest revision (Alembic, one tree:
                             tools/serene/migrations, one version table: alembic_version)
    check_current(conn)      StoreError unless the database is at the newest revision

One schema for both engines: no SQLite-only SQL (upserts are the dialect's
insert().on_conflict_do_*, chosen by dialect in store.py).
"""

import os
import pathlib

import sqlalchemy as sa

MIGRATIONS = pathlib.Path(__file__).resolve().parent.parent / "migrations"
VERSION_TABLE = "alembic_version"
OLD_APP_VERSION_TABLE = "app_alembic_version"  # the application's tree before the merge

metadata = sa.MetaData()

Big = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # sqlite INTEGER is 64-bit

meta = sa.Table(
    "meta", metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

objects = sa.Table(
    "objects", metadata,
    sa.Column("device", sa.Text, primary_key=True),
    sa.Column("epoch", Big, primary_key=True, autoincrement=False),
    sa.Column("seq", Big, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("sealed", sa.LargeBinary, nullable=False),
    sa.Column("plaintext", sa.LargeBinary),
    sa.Column("fields", sa.Text),
    sa.Column("decode_error", sa.Text),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("duplicates", sa.Integer, nullable=False, server_default="0"),
)

received = sa.Table(
    "received", metadata,
    sa.Column("device", sa.Text, primary_key=True),
    sa.Column("epoch", Big, primary_key=True, autoincrement=False),
    sa.Column("first_seq", Big, primary_key=True, autoincrement=False),
    sa.Column("last_seq", Big, nullable=False),
    sa.Index("received_last", "device", "epoch", "last_seq"),
)

epochs = sa.Table(
    "epochs", metadata,
    sa.Column("device", sa.Text, primary_key=True),
    sa.Column("epoch", Big, primary_key=True, autoincrement=False),
    sa.Column("record", sa.LargeBinary, nullable=False),
    sa.Column("payload_hash", sa.LargeBinary),
    sa.Column("prev_epoch", Big),
    sa.Column("prev_end_seq", Big),
    sa.Column("prev_end_hash", sa.LargeBinary),
    sa.Column("first_seen", sa.Float, nullable=False),
)

ack_pivs = sa.Table(
    "ack_pivs", metadata,
    sa.Column("device", sa.Text, primary_key=True),
    sa.Column("epoch", Big, primary_key=True, autoincrement=False),
    sa.Column("worker", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("last_piv", Big, nullable=False),
)

checkpoints = sa.Table(
    "checkpoints", metadata,
    sa.Column("device", sa.Text, primary_key=True),
    sa.Column("epoch", Big, primary_key=True, autoincrement=False),
    sa.Column("seq", Big, primary_key=True, autoincrement=False),
    sa.Column("first_seq", Big, nullable=False),
    sa.Column("count", Big, nullable=False),
    sa.Column("chain", sa.LargeBinary, nullable=False),
    sa.Column("prev", sa.LargeBinary),
    sa.Column("payload_hash", sa.LargeBinary),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("link", sa.Text, nullable=False, server_default="pending"),
    sa.Column("detail", sa.Text),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("checked_at", sa.Float),
    sa.Index("checkpoints_first", "device", "epoch", "first_seq"),
)

rejects = sa.Table(
    "rejects", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("device", sa.Text, nullable=False),
    sa.Column("epoch", Big),
    sa.Column("seq", Big),
    sa.Column("kind", sa.Text),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("detail", sa.Text),
    sa.Column("size", sa.Integer),
    sa.Column("head", sa.Text),
    sa.Index("rejects_device", "device", "id"),
    sqlite_autoincrement=True,
)

counters = sa.Table(
    "counters", metadata,
    sa.Column("device", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", Big, nullable=False),
)

device_state = sa.Table(
    "device_state", metadata,
    sa.Column("device", sa.Text, primary_key=True),
    sa.Column("acks_failing", sa.Text),
)

workers = sa.Table(
    "workers", metadata,
    sa.Column("worker_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),
)

INGEST_TABLES = (meta, objects, received, epochs, ack_pivs, checkpoints, rejects, counters,
                 device_state, workers)


class StoreError(Exception):
    """The database cannot be used (missing, of another schema, corrupt)."""


def sqlite_url(path, readonly=False):
    if readonly:
        return "sqlite:///file:%s?mode=ro&uri=true" % pathlib.Path(path)
    return "sqlite:///%s" % pathlib.Path(path)


def resolve_url(home, url=None):
    """The database URL of a server home: --db, else $SERENE_DB, else the SQLite file."""
    url = url or os.environ.get("SERENE_DB")
    if url:
        return url
    return sqlite_url(db_path(home))


def db_path(home):
    """The embedded default: the SQLite file of a server home."""
    return pathlib.Path(home) / "server" / "ingest.sqlite3"


def is_url(target):
    return isinstance(target, str) and "://" in target


def make_engine(url, readonly=False):
    """An Engine on `url` (postgresql:// means psycopg 3)."""
    u = sa.engine.make_url(url)
    if u.get_backend_name() == "sqlite":
        path = u.database or ""
        if readonly and not path.startswith("file:"):
            url = sqlite_url(path, readonly=True)
        elif not readonly and path and not path.startswith("file:"):
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        # NullPool: a connection per Store (SQLite connects in microseconds); nothing held
        # open between uses, so a file can be moved aside once its users are closed.
        eng = sa.create_engine(url, poolclass=sa.pool.NullPool,
                               connect_args={"timeout": 10, "check_same_thread": False})

        @sa.event.listens_for(eng, "connect")
        def _pragmas(dbapi_conn, _rec):
            # pysqlite's own transaction handling is off: SQLAlchemy emits BEGIN (below),
            # so SAVEPOINTs and the batch's one transaction are real.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            if not readonly:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")  # a committed object survives a cut
            cur.execute("PRAGMA busy_timeout=10000")  # several ingest workers share it
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        if not readonly:  # a reader runs each SELECT on its own (it holds no snapshot)
            @sa.event.listens_for(eng, "begin")
            def _begin(conn):
                conn.exec_driver_sql("BEGIN")
        return eng
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    kw = {}
    if readonly:  # autocommit: a reader holds no snapshot nor an idle transaction
        kw["connect_args"] = {"options": "-c default_transaction_read_only=on"}
        kw["isolation_level"] = "AUTOCOMMIT"
    return sa.create_engine(u, pool_pre_ping=True, pool_size=2, max_overflow=8, **kw)


def _alembic_config(conn):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


_HEAD = []


def head_revision():
    if not _HEAD:
        from alembic.script import ScriptDirectory

        cfg = _alembic_config(None)
        _HEAD.append(ScriptDirectory.from_config(cfg).get_current_head())
    return _HEAD[0]


def current_revision(conn):
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def _adopt_old_app_tree(conn):
    """A database whose application tables were versioned in app_alembic_version (before the
    ingest's schema joined the tree): carry its revision over to alembic_version."""
    insp = sa.inspect(conn)
    if not insp.has_table(OLD_APP_VERSION_TABLE) or insp.has_table(VERSION_TABLE):
        return
    rev = conn.execute(sa.text("SELECT version_num FROM %s" % OLD_APP_VERSION_TABLE)).scalar()
    vt = sa.Table(VERSION_TABLE, sa.MetaData(),
                  sa.Column("version_num", sa.String(32), primary_key=True))
    vt.create(conn)
    if rev:
        conn.execute(vt.insert().values(version_num=rev))
    conn.execute(sa.text("DROP TABLE %s" % OLD_APP_VERSION_TABLE))


def migrate(engine):
    """Bring the database to the newest revision (idempotent; one transaction)."""
    from alembic import command

    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Two processes starting on a fresh database: one migrates, the other waits.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7244)"))
        _adopt_old_app_tree(conn)
        if current_revision(conn) == head_revision():
            return
        command.upgrade(_alembic_config(conn), "head")


def check_current(conn, where):
    rev = current_revision(conn)
    if rev != head_revision():
        raise StoreError(
            "%s: database schema revision %s, this server reads revision %s: run "
            "`serene server` (or `serene webapp`) once to migrate it" % (where, rev,
                                                                       head_revision()))
