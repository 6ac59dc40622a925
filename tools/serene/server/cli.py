"""serene server: the medical server's ingest, on a private Mosquitto or an existing broker.

    serene server --home DIR [--broker-port PORT] [--worker-id N] [--tls] [--http PORT]
                  [--duration S] [-v]

DIR is the provisioning home (serene provision): the server's key, the CA and registry.json.
Without --broker-port it starts the private Mosquitto of serene.broker for the registered
devices (accounts and ACLs under DIR/broker/, its ports written to DIR/broker/broker.json for
the modules and the bench: `port` / `tls_port` for modules, `server_port` for server
processes); with it, it connects to that loopback broker's SERVER listener (server_port) with
the server account of DIR/broker/credentials.json. --worker-id N (0-15, unique among running
ingest processes) names its client ids serene-server-N (and serene-server-N-q, the quarantine
of a device over its intake quota: server/service.py), their persistent sessions at the broker
and its ack Partial IVs. --tls: modules reach the private broker over TLS only (its plain
device listener is closed); the server's own listener stays plain on loopback. The database is
DIR/server/ingest.sqlite3 (SQLite), or --db URL (postgresql://...; default $SERENE_DB);
`serene report --home DIR [--db URL]` reads it, also while the server runs; --http serves the
clinicians' and operators' web application (serene.webapp: accounts, audit, triage, patient
pages, ledger) on 127.0.0.1:PORT, on the same database (`serene users add` makes its first account).
"""

import json
import logging
import signal
import threading
import time

from ..cli import CliError
from .options import add_db_argument, load_verifier, use_db  # noqa: F401 (used here too)


def add_arguments(p):
    p.add_argument("--home", required=True, help="provisioning home (serene provision)")
    p.add_argument("--broker-port", type=int, default=0,
                   help="use the broker already listening on this loopback port")
    p.add_argument("--worker-id", type=int, default=0,
                   help="0-15, unique among running ingest processes (client id, ack nonces)")
    p.add_argument("--tls", action="store_true",
                   help="private broker: modules connect over TLS only (no plain listener)")
    p.add_argument("--http", type=int, metavar="PORT", default=None,
                   help="serve the web application on 127.0.0.1:PORT (0: a free port)")
    p.add_argument("--lorawan", action="store_true",
                   help="also take LoRaWAN uplinks from a ChirpStack v4 MQTT integration "
                        "(server/chirpstack.py) on the same broker")
    p.add_argument("--lorawan-worker-id", type=int, default=None,
                   help="worker id of the LoRaWAN intake (default: --worker-id + 8, mod 16)")
    p.add_argument("--downlinks-per-day", type=int, default=10,
                   help="LoRaWAN: most acks sent as downlinks per device per 24 h")
    p.add_argument("--duration", type=float, default=0, help="stop after S seconds (0: Ctrl-C)")
    add_db_argument(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log every reject")


def run(args):
    import pathlib

    from .. import broker as B
    from .ingest import Ingest
    from .service import IngestService
    from .store import Store, StoreError

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname).1s %(name)s: %(message)s")
    home = pathlib.Path(args.home)
    url = use_db(args)
    if not 0 <= args.worker_id <= 15:
        raise CliError("--worker-id must be 0-15")
    verifier = load_verifier(home)
    devices = sorted(verifier.certs)
    brk = None
    try:
        if args.broker_port:
            port = args.broker_port
            creds = B.ensure_credentials(home, devices)["server"]
        else:
            brk = B.Broker(home, devices, tls=args.tls).start()
            port, creds = brk.server_port, brk.server_credentials()
            B.write_private(brk.dir / "broker.json", json.dumps(brk.info(), indent=2) + "\n")
    except B.BrokerError as e:
        raise CliError(str(e)) from None

    def make_ingest():
        return Ingest(load_verifier(home), Store(url), worker_id=args.worker_id)

    def device_list():
        # Every account that can publish an uplink, registered or not: the server subscribes
        # them one by one (a flooding one can then be quarantined) and counts what an
        # unregistered one sends.
        return sorted(set(devices) | set(B.device_ids(home)))

    try:
        svc = IngestService(make_ingest, port, creds["username"], creds["password"],
                            worker_id=args.worker_id, devices=device_list).start()
    except (RuntimeError, StoreError) as e:
        if brk:
            brk.stop()
        raise CliError(str(e)) from None
    lora = None
    if args.lorawan:
        from .chirpstack import ChirpstackIntake, load_dev_euis

        lwid = (args.worker_id + 8) % 16 if args.lorawan_worker_id is None \
            else args.lorawan_worker_id
        try:
            lora = ChirpstackIntake(
                lambda: Ingest(load_verifier(home), Store(url), worker_id=lwid),
                port, creds["username"], creds["password"], load_dev_euis(home),
                worker_id=lwid, downlinks_per_day=args.downlinks_per_day,
                budget_path=home / "server" / "lorawan-downlinks.json").start()
        except (RuntimeError, StoreError, ValueError, OSError) as e:
            svc.stop()
            if brk:
                brk.stop()
            raise CliError("LoRaWAN intake: %s" % e) from None
        print("serene server: LoRaWAN intake (ChirpStack integration) as %s, %d devEuis"
              % (lora.client_id, len(lora.dev_euis)), flush=True)
    web = None
    if args.http is not None:
        from ..webapp.server import AppServer

        try:
            web = AppServer(home, args.http).start()
        except (OSError, StoreError) as e:
            svc.stop()
            if brk:
                brk.stop()
            raise CliError("web view on port %d: %s" % (args.http, e)) from None
    print("serene server: %d registered devices, broker 127.0.0.1:%d as %s, database %s%s"
          % (len(devices), port, svc.client_id, Store.describe(url),
             ", web view http://127.0.0.1:%d/" % web.port if web else ""), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: stop.set())
    try:
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.is_set():
            if deadline and time.monotonic() >= deadline:
                break
            stop.wait(0.2)
    finally:
        if web:
            web.stop()
        if lora:
            lora.stop()
        svc.stop()
        if brk:
            brk.stop()
    refused = ", ".join("%s %d" % kv for kv in sorted(svc.refused.items())) or "none"
    print("serene server: stopped; %d uplinks processed, %d acks sent, %d refused at intake "
          "(%s), each counted in the ledger" % (svc.processed, svc.acks_sent, svc.dropped,
                                                refused), flush=True)
    if svc.quarantines:
        print("serene server: quarantined (times): %s" % json.dumps(dict(svc.quarantines),
                                                                   sort_keys=True), flush=True)
    if lora:
        print("serene server: LoRaWAN: %d uplinks processed, %d downlinks, %d refused (%s)"
              % (lora.stats["processed"], lora.stats["downlinks"], sum(lora.refused.values()),
                 json.dumps(dict(lora.refused), sort_keys=True)), flush=True)
    print("serene server: main intake stages p95, ms: %s" % json.dumps(svc.stages_p95()),
          flush=True)
    print("serene server: intake latency p95 (received -> durable, acked) by device, ms: %s"
          % json.dumps(svc.latency_p95(), sort_keys=True), flush=True)
    return 0
