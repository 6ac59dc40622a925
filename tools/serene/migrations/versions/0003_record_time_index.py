"""the patient page's index on a record's module time, on SQLite and PostgreSQL

The expression is serene.webapp.db.record_time()'s (the planner uses the index only for the
same expression). 0001 made it on SQLite alone, when the ingest's table already existed.

Revision ID: 0003
Revises: 0002
"""
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

EXPR = {
    "sqlite": "json_extract(fields, '$.time')",
    "postgresql": "(CAST((CAST(fields AS json) ->> 'time') AS DOUBLE PRECISION))",
}


def upgrade():
    bind = op.get_bind()
    op.execute("DROP INDEX IF EXISTS app_objects_record_time")
    op.execute("CREATE INDEX app_objects_record_time ON objects (device, %s) "
               "WHERE kind = 'record'" % EXPR[bind.dialect.name])


def downgrade():
    op.execute("DROP INDEX IF EXISTS app_objects_record_time")
