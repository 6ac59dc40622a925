"""`serene hub`: relay modules' BLE uplinks to the broker and downlinks back (docs/ble.md).

    serene hub --medium PORT --broker-port P --user hub-1 --password-file F SRN-0001 ...
    serene hub --bleak ...          a real adapter (optional extra `bleak`; untested here)

The hub's account is its own (serene.broker: Broker(..., hubs={"hub-1": [...]})); its
password is read from a file, never from the command line.
"""

import asyncio
import pathlib

from ..cli import CliError
from .backends import BleakBackend, SimBackend
from .relay import Hub


def add_arguments(p):
    p.add_argument("modules", nargs="+", help="device ids of the modules this hub serves")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--medium", type=int, metavar="PORT", help="the BLE medium simulator's port")
    g.add_argument("--bleak", action="store_true", help="a real adapter through bleak")
    p.add_argument("--broker-host", default="127.0.0.1")
    p.add_argument("--broker-port", type=int, required=True)
    p.add_argument("--user", required=True, help="the hub's broker account")
    p.add_argument("--password-file", required=True, type=pathlib.Path)
    p.add_argument("--buffer", type=int, default=10000, help="uplinks kept while offline")


def run(args):
    try:
        password = args.password_file.read_text().strip()
    except OSError as e:
        raise CliError("cannot read %s: %s" % (args.password_file, e.strerror)) from None
    if args.bleak:
        try:
            import bleak  # noqa: F401
        except ImportError:
            raise CliError("--bleak needs the optional package bleak (pip install bleak)") \
                from None
        backend = BleakBackend()
    else:
        backend = SimBackend(args.medium)
    hub = Hub(backend, {"host": args.broker_host, "port": args.broker_port,
                        "username": args.user, "password": password}, args.modules,
              buffer_max=args.buffer)
    try:
        asyncio.run(hub.run())
    finally:
        print("serene hub: %s" % dict(hub.stats))
