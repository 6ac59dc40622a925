"""The one Alembic environment of the database: the ingest's tables and the clinicians'
application's app_* tables, one linear tree (versions/), one version table (alembic_version).
Run by serene.server.schema.migrate (the ingest, the application), or by `alembic`."""

from alembic import context

from serene.server.schema import VERSION_TABLE, metadata

try:  # the application's tables join the same metadata (autogenerate sees all of them)
    import serene.webapp.db  # noqa: F401
except ImportError:  # pragma: no cover - the server without the application's packages
    pass


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
    context.configure(connection=conn, target_metadata=metadata, version_table=VERSION_TABLE,
                      render_as_batch=conn.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


run()
