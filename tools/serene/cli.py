"""serene: the bench and the host tools of the serene module.

    serene bench       run the whole bench end to end (the main job)
    serene pumpsim     run the pump simulator on a pty or a serial port
    serene deploy      compile the firmware with mpy-cross and copy it to a board with mpremote
    serene provision   create CA, server identity and each module's identity in its STSAFE
    serene stsafe-emu  run the STSAFE-A110 emulator behind the I2C bridge
    serene server      run the medical server's ingest (private Mosquitto, SQLite, acks)
    serene report      print the completeness ledger per device (table or --json)
    serene webapp      serve the clinicians' and operators' web application
    serene users       accounts of the web application (`users add` makes the first admin)
    serene screenshots screenshots of the web application (triage list, patient page; en, fr)
    serene hub         BLE home hub: relay modules' GATT service to the broker and back
    serene fleet       N simulated modules with their own identities over MQTT (load, acks)

Each command is one row of COMMANDS: its module provides `add_arguments(parser)` and
`run(args)`. Errors meant for the user are raised as CliError and printed as `serene: message`.
"""

import argparse
import importlib
import sys


class CliError(Exception):
    """An error for the person at the terminal: printed as `serene: message`, exit status 1."""


#: name -> (module under serene, one-line help)
COMMANDS = {
    "bench": ("bench", "run the whole bench end to end (the main job)"),
    "pumpsim": ("pumpsim.cli", "run the pump simulator on a pty or a serial port"),
    "deploy": ("deploy", "compile the firmware and copy it to a board with mpremote"),
    "provision": ("stsafe.provision", "create CA, server identity and each module's identity"),
    "stsafe-emu": ("stsafe.emu_cli", "run the STSAFE-A110 emulator behind the I2C bridge"),
    "server": ("server.cli", "run the medical server's ingest (broker, verification, ledger)"),
    "report": ("server.report", "print the completeness ledger per device (table or --json)"),
    "webapp": ("webapp.cmd_webapp", "serve the clinicians' and operators' web application"),
    "users": ("webapp.cmd_users", "accounts of the web application (users add, users list)"),
    "screenshots": ("webapp.cmd_screenshots", "screenshots of the web application (en, fr)"),
    "hub": ("hub.cli", "BLE home hub: relay modules' GATT service to the broker and back"),
    "fleet": ("fleet.cli", "N simulated modules with their own identities over MQTT (load)"),
}


def build_parser(command=None):
    """The parser; only `command`'s module is imported (a broken command breaks only itself)."""
    parser = argparse.ArgumentParser(prog="serene", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            mod = importlib.import_module("serene." + module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return args._run(args) or 0
    except CliError as e:
        sys.stdout.flush()
        print("serene: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
