"""serene fleet: N simulated modules, each with its own identity, against a running server.

    serene fleet --home DIR --modules N --provision-only      # once: identities, accounts
    serene server --home DIR &                                # its private broker
    serene fleet --home DIR --modules N [--rate R] [--seconds S] [--checkpoint-every N]
                 [--connect-rate C] [--ack-timeout T] [--drain S] [--json FILE]

The fleet home (serene.fleet.identity) is a provisioning home of its own: the server is
started on it like on any other. A run finds the broker in DIR/broker/broker.json (written by
`serene server`) unless --broker-port names it, connects every module with its own account
(C connections a second), sends each one's epoch record (a new epoch every run), then status
records at R a second per module for S seconds with a checkpoint every N, and a closing
checkpoint; it waits (at most --drain seconds) until everything is acknowledged and prints
objects/s (acknowledged, i.e. stored), ack latency p50/p95/p99 (first send -> the ack
covering it) and every error by name. --json FILE writes the whole report, one entry per
module included. Exit status 1 if anything is left unacknowledged or an ack was wrong.
"""

import json
import pathlib
import resource
import sys

from ..cli import CliError


def add_arguments(p):
    p.add_argument("--home", required=True, help="fleet home (made by --provision-only)")
    p.add_argument("--modules", type=int, required=True, help="number of simulated modules")
    p.add_argument("--rate", type=float, default=1.0, help="status records a second per module")
    p.add_argument("--seconds", type=float, default=10.0, help="how long each module sends")
    p.add_argument("--checkpoint-every", type=int, default=32,
                   help="a checkpoint after every N records (0: only the closing one)")
    p.add_argument("--connect-rate", type=float, default=500.0,
                   help="new MQTT connections a second")
    p.add_argument("--ack-timeout", type=float, default=3.0,
                   help="retransmit what is not acknowledged after T s at the earliest "
                        "(doubling, <= 30 s; raised from the measured ack round trips)")
    p.add_argument("--fixed-rto", action="store_true",
                   help="retransmit after --ack-timeout whatever the round trips measured")
    p.add_argument("--drain", type=float, default=60.0,
                   help="at most S seconds at the end to get everything acknowledged")
    p.add_argument("--broker-port", type=int, default=0,
                   help="the broker's device port (default: DIR/broker/broker.json)")
    p.add_argument("--provision-only", action="store_true",
                   help="make or extend the fleet home, then exit")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")


def _raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            raise CliError("%d modules need %d file descriptors; the hard limit (ulimit -Hn) "
                           "is %d" % (n, want, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def run(args):
    from . import identity as I
    from . import sim

    home = pathlib.Path(args.home)
    try:
        ids = I.provision_fleet(home, args.modules)
    except I.FleetError as e:
        raise CliError(str(e)) from None
    if args.provision_only:
        return 0
    if args.rate < 0 or args.seconds < 0 or args.connect_rate <= 0 or args.ack_timeout <= 0:
        raise CliError("--rate and --seconds must be >= 0, --connect-rate and --ack-timeout > 0")
    port = args.broker_port
    if not port:
        info = home / "broker" / "broker.json"
        try:
            port = json.loads(info.read_text())["port"]
        except (FileNotFoundError, ValueError, KeyError):
            raise CliError("no broker found in %s: start `serene server --home %s` first, or "
                           "give --broker-port" % (info, home)) from None
        if not port:
            raise CliError("%s has no plain device port (a --tls server?)" % info)
    _raise_nofile(args.modules)
    keys = I.load_keys(home)
    creds = json.loads((home / "broker" / "credentials.json").read_text())["devices"]
    reg = json.loads((home / "registry.json").read_text())
    state = I.load_state(home)
    run_no = state["run"]
    # Written before the run: an interrupted run still moved the epoch on (never reused).
    state["run"] = run_no + 1
    I.save_state(home, state)
    fleet = sim.Fleet(home, port, [], creds, sim.load_server_pub(home), rate=args.rate,
                      seconds=args.seconds, checkpoint_every=args.checkpoint_every,
                      connect_rate=args.connect_rate, ack_timeout=args.ack_timeout,
                      drain_s=args.drain, adaptive=not args.fixed_rto)
    for i, dev in enumerate(ids):
        entry = reg["devices"][dev]
        prev = state["closed"].get(dev)
        if prev is not None:
            prev = [prev[0], prev[1], bytes.fromhex(prev[2])]
        fleet.mods.append(sim.SimModule(
            fleet, i, dev, keys[dev], I.device_certificate_der(home, dev, reg),
            creds[dev]["password"], entry["first_epoch"] + run_no, prev))
    print("serene fleet: run %d, %d modules, broker 127.0.0.1:%d, %.3g records/s each for "
          "%.0f s, checkpoint every %d" % (run_no, len(ids), port, args.rate, args.seconds,
                                           args.checkpoint_every), flush=True)
    report = fleet.run()
    report["run"] = run_no
    for m in fleet.mods:
        if m.finished == "closed" and not m.outbox and m.closed:
            state["closed"][m.dev] = m.closed
        else:
            state["closed"].pop(m.dev, None)
    I.save_state(home, state)
    lat = report["ack_latency_ms"]
    errs = ", ".join("%s %d" % kv for kv in sorted(report["errors"].items()) if kv[1]) or "none"
    kinds = report["ack_latency_ms_by_kind"]
    print("serene fleet: %d objects sent, %d acknowledged (stored) in %.1f s: %s objects/s; "
          "ack latency p50 %s ms, p95 %s ms, p99 %s ms (p95 of epoch records %s ms, of records "
          "%s ms); errors: %s"
          % (report["objects_sent"], report["objects_acked"], report["run_s"],
             report["objects_per_s"], lat["p50"], lat["p95"], lat["p99"], kinds["epoch"]["p95"],
             kinds["record"]["p95"], errs), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    bad = report["lost"] or report["errors"]["acks_claiming_unsent"] or \
        report["errors"]["ack_regressions"] or report["errors"]["forged_acks"] or \
        report["errors"]["connect_refused"]
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: serene fleet")
