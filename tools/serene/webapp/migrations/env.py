"""Alembic environment of the clinicians' application (run by db.migrate, or alembic)."""

from alembic import context

from serene.webapp.db import metadata

VERSION_TABLE = "app_alembic_version"


def run():
    conn = context.config.attributes.get("connection")
    if conn is None:
        import sqlalchemy as sa

        eng = sa.create_engine(context.config.get_main_option("sqlalchemy.url"))
        with eng.begin() as conn:
            _run(conn)
    else:
        _run(conn)


def _run(conn):
    context.configure(connection=conn, target_metadata=metadata,
                      version_table=VERSION_TABLE,
                      include_name=lambda name, type_, parent: type_ != "table"
                      or name.startswith("app_"))
    with context.begin_transaction():
        context.run_migrations()


run()
