"""serene stsafe-emu: serve one emulated STSAFE-A110 on the I2C bridge until Ctrl-C.

    serene stsafe-emu --state devices/SRN-0001/stsafe.json [--port N] [--time-scale 1.0]

Prints `port N` on stdout once the bridge listens (the firmware's SocketI2C connects there).
The chip's state is saved to its file after every change, and once more at exit.
"""

import os

from ..cli import CliError
from ..i2c_bridge import I2CBridgeServer
from .emulator import EmulatorError, StsafeEmulator


def add_arguments(parser):
    parser.add_argument("--state", required=True, help="the chip's JSON state file")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any)")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="scale of the chip's processing times (1.0 = the datasheet waits, 0 = instant)",
    )
    parser.add_argument(
        "--create", action="store_true", help="create a blank chip if the file does not exist"
    )


def run(args):
    if args.time_scale < 0:
        raise CliError("--time-scale must be >= 0")
    try:
        if args.create and not os.path.exists(args.state):
            emu = StsafeEmulator.create(args.state, time_scale=args.time_scale)
        else:
            emu = StsafeEmulator.load(args.state, time_scale=args.time_scale)
    except EmulatorError as e:
        raise CliError(str(e)) from None
    addr = emu.state["i2c_address"]
    try:
        server = I2CBridgeServer({addr: emu}, port=args.port)
    except OSError as e:
        raise CliError("cannot listen on port %d: %s" % (args.port, e)) from None
    print("port %d" % server.port, flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
        emu.save()
    return 0
