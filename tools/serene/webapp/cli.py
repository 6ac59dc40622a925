"""serene users / serene webapp / serene screenshots.

    serene users add --home DIR [--db URL] --role admin|clinician|technician --username U
                     [--password-file F] [--full-name N] [--language en|fr]
    serene users list --home DIR
    serene webapp --home DIR [--port P] [--host H --trusted-proxy A --public-host N]
    serene screenshots --home DIR --out DIR

`users add` creates an account in the application's tables of DIR's database (the first
administrator is made this way); for an administrator it prints the TOTP provisioning URI
(otpauth://...) to enter in an authenticator application: administrators log in with it.
Without --password-file the password is read from the terminal (twice).
"""

import getpass
import pathlib
import sys

from ..cli import CliError
from ..server.options import add_db_argument, use_db


def add_users_arguments(p):
    sub = p.add_subparsers(dest="users_command", required=True)
    a = sub.add_parser("add", help="create an account")
    a.add_argument("--home", required=True)
    a.add_argument("--role", required=True, choices=("admin", "clinician", "technician"))
    a.add_argument("--username", required=True)
    a.add_argument("--password-file", help="read the password from this file (first line)")
    a.add_argument("--full-name", default="")
    a.add_argument("--language", default="en", choices=("en", "fr"))
    ls = sub.add_parser("list", help="list the accounts")
    ls.add_argument("--home", required=True)
    for q in (a, ls):
        add_db_argument(q)


def run_users(args):
    import sqlalchemy as sa

    from . import db, ensure_database
    from .views import create_user

    engine = ensure_database(args.home, use_db(args))
    if args.users_command == "list":
        with engine.begin() as conn:
            for u in conn.execute(sa.select(db.users).order_by(db.users.c.username)):
                print("%-20s %-10s %-3s %s" % (u.username, u.role, u.language,
                                               "active" if u.active else "disabled"))
        return 0
    if args.password_file:
        pw = pathlib.Path(args.password_file).read_text().splitlines()[0]
    else:
        if not sys.stdin.isatty():
            raise CliError("no terminal: give --password-file")
        pw = getpass.getpass("password for %s: " % args.username)
        if getpass.getpass("again: ") != pw:
            raise CliError("the two passwords differ")
    if len(pw) < 12:
        raise CliError("a password needs 12 characters or more")
    if not args.username or len(args.username) > 64:
        raise CliError("--username: 1 to 64 characters")
    with engine.begin() as conn:
        try:
            secret, uid = create_user(conn, args.username, args.role, pw, args.full_name,
                                      args.language)
        except sa.exc.IntegrityError:
            raise CliError("user %s exists already" % args.username) from None
        conn.execute(db.audit.insert().values(
            at=db.now(), username="(command line)", action="user.add", target=args.username,
            detail=args.role, ip="local", outcome="ok"))
    print("serene users: %s added (%s)" % (args.username, args.role))
    if secret:
        from .security import totp_uri

        print("serene users: second factor (TOTP), enter it in an authenticator:\n  %s"
              % totp_uri(secret, args.username))
    return 0


def add_webapp_arguments(p):
    p.add_argument("--home", required=True, help="the server's provisioning home")
    p.add_argument("--port", type=int, default=8080, help="TCP port (0: a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (anything but loopback needs --trusted-proxy)")
    p.add_argument("--trusted-proxy", metavar="ADDRESS",
                   help="the TLS-terminating reverse proxy in front (README): X-Forwarded-Proto"
                        "/-For trusted from this address only, plain requests refused, "
                        "cookies Secure")
    p.add_argument("--public-host", action="append", default=[], metavar="NAME",
                   help="with --trusted-proxy: a Host the proxy serves (repeatable)")
    p.add_argument("--duration", type=float, default=0, help="stop after S seconds (0: Ctrl-C)")
    add_db_argument(p)


def run_webapp(args):
    import threading
    import time

    from .server import AppServer

    if args.public_host and not args.trusted_proxy:
        raise CliError("--public-host goes with --trusted-proxy")
    try:
        srv = AppServer(args.home, args.port, args.host, trusted_proxy=args.trusted_proxy,
                        public_hosts=args.public_host, db_url=use_db(args)).start()
    except (ValueError, OSError) as e:
        raise CliError(str(e)) from None
    print("serene webapp: %s%s" % (srv.url, " (through the proxy; listening on %s:%d)"
                                   % (args.host, srv.port) if args.trusted_proxy else ""),
          flush=True)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            stop.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0


def add_screenshots_arguments(p):
    p.add_argument("--home", required=True, help="the server's provisioning home")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("--device", help="module shown (default: the first with data)")
    add_db_argument(p)


def run_screenshots(args):
    from .screenshots import ScreenshotError, take

    use_db(args)  # --db: exported as $SERENE_DB, which the application reads
    try:
        paths = take(args.home, args.out, args.device)
    except ScreenshotError as e:
        raise CliError(str(e)) from None
    for p in paths:
        print("serene screenshots: %s" % p)
    return 0
