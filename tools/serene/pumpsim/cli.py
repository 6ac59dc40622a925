"""`serene pumpsim`: run the pump simulator on a pty (default) or a serial port.

Prints the device path the firmware should open, then the scenario's actions and injected
faults as they happen, until Ctrl-C or --duration; ends with the model's state as JSON.
"""

import json
import time

from ..cli import CliError
from .sim import PumpSimulator, ScenarioError, scenario_names


def add_arguments(parser):
    parser.add_argument(
        "--scenario",
        default="normal-feed",
        help="scenario name (%s) or path to a JSON file" % ", ".join(scenario_names()),
    )
    parser.add_argument(
        "--speed", type=float, default=1.0, help="simulated seconds per real second"
    )
    parser.add_argument("--port", help="real serial device (19200 7E1) instead of a pty")
    parser.add_argument("--duration", type=float, help="stop after this many real seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault generator")
    parser.add_argument("--quiet", action="store_true", help="print only the device path")


def run(args):
    if args.speed <= 0:
        raise CliError("--speed must be > 0")
    try:
        sim = PumpSimulator(args.scenario, speed=args.speed, port=args.port, seed=args.seed)
    except ScenarioError as e:
        raise CliError(str(e)) from None
    try:
        sim.start()
    except OSError as e:
        raise CliError("cannot open %s: %s" % (args.port or "a pty", e.strerror or e)) from None
    try:
        print(sim.device_path, flush=True)
        shown = 0
        end = None if args.duration is None else time.monotonic() + args.duration
        while end is None or time.monotonic() < end:
            time.sleep(0.1)
            log = sim.log[shown:]
            shown += len(log)
            if not args.quiet:
                for t, what in log:
                    print("[%7d s] %s" % (t, what), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        snap = sim.snapshot()
        sim.stop()
    if not args.quiet:
        print(json.dumps(snap, sort_keys=True))
    return 0
