"""What the server's commands share: the --db option and loading the verifier of a home
(apart from cli.py, so that report.py and the web application need not import the server's
command, which imports them)."""

from ..cli import CliError


def add_db_argument(p):
    p.add_argument("--db", metavar="URL", default=None,
                   help="the database: postgresql://USER@HOST:PORT/NAME, or sqlite:///FILE "
                        "(default: $SERENE_DB, else DIR/server/ingest.sqlite3)")


def use_db(args):
    """The database URL of this command (--db, $SERENE_DB, the home's SQLite file); --db is
    also exported as $SERENE_DB, so everything this process opens uses the same one."""
    import os

    from .store import db_url

    if getattr(args, "db", None):
        os.environ["SERENE_DB"] = args.db
    return db_url(args.home, getattr(args, "db", None))


def load_verifier(home):
    from ..verifier import from_home

    try:
        return from_home(home)
    except FileNotFoundError as e:
        raise CliError("%s is not provisioned (%s): run serene provision --home %s"
                       % (home, e.filename, home)) from None
    except (ValueError, KeyError) as e:
        raise CliError("%s: cannot load the server identity or registry: %s" % (home, e)) \
            from None
