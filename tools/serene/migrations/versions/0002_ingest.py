"""the ingest's tables (schema 2: objects, received ranges, epochs, ack PIVs per worker,
checkpoints, rejects, counters, device state, worker leases), on SQLite and PostgreSQL

A database the ingest made before its schema joined this tree (SQLite, `meta` schema 2) is
adopted as it is: existing tables are kept; schema 1 is refused.

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

Big = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _pk(*cols):
    return sa.PrimaryKeyConstraint(*cols)


TABLES = {
    "meta": lambda: (
        sa.Column("key", sa.Text, nullable=False), sa.Column("value", sa.Text, nullable=False),
        _pk("key")),
    "objects": lambda: (
        sa.Column("device", sa.Text, nullable=False), sa.Column("epoch", Big, nullable=False),
        sa.Column("seq", Big, nullable=False), sa.Column("kind", sa.Text, nullable=False),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
        sa.Column("plaintext", sa.LargeBinary), sa.Column("fields", sa.Text),
        sa.Column("decode_error", sa.Text),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("duplicates", sa.Integer, nullable=False, server_default="0"),
        _pk("device", "epoch", "seq")),
    "received": lambda: (
        sa.Column("device", sa.Text, nullable=False), sa.Column("epoch", Big, nullable=False),
        sa.Column("first_seq", Big, nullable=False), sa.Column("last_seq", Big, nullable=False),
        _pk("device", "epoch", "first_seq")),
    "epochs": lambda: (
        sa.Column("device", sa.Text, nullable=False), sa.Column("epoch", Big, nullable=False),
        sa.Column("record", sa.LargeBinary, nullable=False),
        sa.Column("payload_hash", sa.LargeBinary), sa.Column("prev_epoch", Big),
        sa.Column("prev_end_seq", Big), sa.Column("prev_end_hash", sa.LargeBinary),
        sa.Column("first_seen", sa.Float, nullable=False),
        _pk("device", "epoch")),
    "ack_pivs": lambda: (
        sa.Column("device", sa.Text, nullable=False), sa.Column("epoch", Big, nullable=False),
        sa.Column("worker", sa.Integer, nullable=False),
        sa.Column("last_piv", Big, nullable=False),
        _pk("device", "epoch", "worker")),
    "checkpoints": lambda: (
        sa.Column("device", sa.Text, nullable=False), sa.Column("epoch", Big, nullable=False),
        sa.Column("seq", Big, nullable=False), sa.Column("first_seq", Big, nullable=False),
        sa.Column("count", Big, nullable=False),
        sa.Column("chain", sa.LargeBinary, nullable=False),
        sa.Column("prev", sa.LargeBinary), sa.Column("payload_hash", sa.LargeBinary),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("link", sa.Text, nullable=False, server_default="pending"),
        sa.Column("detail", sa.Text), sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("checked_at", sa.Float),
        _pk("device", "epoch", "seq")),
    "rejects": lambda: (
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("at", sa.Float, nullable=False), sa.Column("device", sa.Text, nullable=False),
        sa.Column("epoch", Big), sa.Column("seq", Big), sa.Column("kind", sa.Text),
        sa.Column("reason", sa.Text, nullable=False), sa.Column("detail", sa.Text),
        sa.Column("size", sa.Integer), sa.Column("head", sa.Text),
        _pk("id")),
    "counters": lambda: (
        sa.Column("device", sa.Text, nullable=False), sa.Column("name", sa.Text, nullable=False),
        sa.Column("value", Big, nullable=False),
        _pk("device", "name")),
    "device_state": lambda: (
        sa.Column("device", sa.Text, nullable=False), sa.Column("acks_failing", sa.Text),
        _pk("device")),
    "workers": lambda: (
        sa.Column("worker_id", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat", sa.Float, nullable=False),
        _pk("worker_id")),
}
INDEXES = [("received_last", "received", ["device", "epoch", "last_seq"]),
           ("checkpoints_first", "checkpoints", ["device", "epoch", "first_seq"]),
           ("rejects_device", "rejects", ["device", "id"])]


def upgrade():
    bind = op.get_bind()
    insp = sa.inspect(bind)
    if insp.has_table("meta"):
        row = bind.execute(sa.text("SELECT value FROM meta WHERE key = 'schema'")).first()
        if row is not None and row[0] != "2":
            raise RuntimeError(
                "database schema %s, this server reads schema 2 (received ranges, ack nonces "
                "per worker, checkpoint links): move the old database aside and start a fresh "
                "one" % row[0])
    for name, cols in TABLES.items():
        if not insp.has_table(name):
            kw = {"sqlite_autoincrement": True} if name == "rejects" else {}
            op.create_table(name, *cols(), **kw)
    for ix, table, cols in INDEXES:
        if ix not in {i["name"] for i in insp.get_indexes(table)}:
            op.create_index(ix, table, cols)
    if bind.execute(sa.text("SELECT value FROM meta WHERE key = 'schema'")).first() is None:
        bind.execute(sa.text("INSERT INTO meta (key, value) VALUES ('schema', '2')"))


def downgrade():
    for ix, table, _ in INDEXES:
        op.drop_index(ix, table_name=table)
    for name in reversed(list(TABLES)):
        op.drop_table(name)
