"""A fleet home: N simulated modules, each with its own identity, written once and reused.

    ids = provision_fleet(home, 1000)     # FLT-00001 .. FLT-01000 (idempotent, incremental)
    keys = load_keys(home)                # {device id: ec private key}

Layout under HOME (a provisioning home the server reads as it reads serene provision's):
    ca/, server/            the manufacturer CA and the server identity, made by
                            serene.stsafe.provision's own builders (_key_and_cert, _ca_cert,
                            _server_cert), so the server side is the one of a real deployment
    registry.json           one entry per module: its device certificate (serene.stsafe.provision
                            ._device_cert: CN and SAN urn:serene:device:<id>, digitalSignature,
                            clientAuth, no expiry; it passes serene.verifier.certs), its public
                            key and first_epoch (FIRST_EPOCH: a software module has no epoch
                            counter zone; the fleet keeps its own counter in fleet/state.json)
    fleet/keys.json         the modules' P-256 private keys, 0600: a SOFTWARE key store, fine for
                            load (the firmware and its STSAFE-A110 are not needed to produce
                            genuine v2 objects; the server cannot tell the difference, which is
                            the point of a load test, and nobody should ship this)
    fleet/state.json        the run counter (each run announces a new epoch) and each module's
                            last closed epoch [epoch, end seq, end hash] for the next epoch's prev
    broker/credentials.json one broker account per module (serene.broker.ensure_credentials);
                            the private Mosquitto of `serene server` hashes them into its password
                            file at every start (PBKDF2-SHA512, 1000 iterations each)
"""

import json
import pathlib
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .. import broker as B
from ..stsafe import provision as P

PREFIX = "FLT-"
#: The first epoch every simulated module announces (run 0); run k announces FIRST_EPOCH + k.
FIRST_EPOCH = 1_000_000
KEYS_FORMAT = "serene-fleet-keys/1"
STATE_FORMAT = "serene-fleet-state/1"
MAX_MODULES = 10_000


class FleetError(Exception):
    """The fleet home cannot be made or read; the message says why."""


def fleet_ids(n):
    return ["%s%05d" % (PREFIX, i) for i in range(1, n + 1)]


def keys_path(home):
    return pathlib.Path(home) / "fleet" / "keys.json"


def state_path(home):
    return pathlib.Path(home) / "fleet" / "state.json"


def _d_hex(key):
    return "%064x" % key.private_numbers().private_value


def load_keys(home):
    """{device id: P-256 private key} of the fleet home."""
    path = keys_path(home)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FleetError("%s has no fleet: run serene fleet --home %s --modules N "
                         "--provision-only" % (home, home)) from None
    except ValueError as e:
        raise FleetError("%s is not JSON: %s" % (path, e)) from None
    if doc.get("format") != KEYS_FORMAT:
        raise FleetError("%s: not a fleet key store" % path)
    return {dev: ec.derive_private_key(int(d, 16), ec.SECP256R1())
            for dev, d in doc["devices"].items()}


def provision_fleet(home, n, log=print):
    """Make (or extend) the fleet home to n modules; return their ids. A module already there
    keeps its key, certificate and first_epoch: a second call with the same n writes
    nothing."""
    if not 1 <= n <= MAX_MODULES:
        raise FleetError("--modules must be 1..%d" % MAX_MODULES)
    home = pathlib.Path(home)
    home.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        ca_key, ca_cert = P._key_and_cert(home / "ca" / "ca.key.pem", home / "ca" / "ca.crt.pem",
                                          P._ca_cert)
        _, server_cert = P._key_and_cert(home / "server" / "server.key.pem",
                                         home / "server" / "server.crt.pem",
                                         P._server_cert(ca_key, ca_cert))
    except P.ProvisionError as e:
        raise FleetError(str(e)) from None
    ids = fleet_ids(n)
    kpath = keys_path(home)
    keys = {"format": KEYS_FORMAT, "software_key_store": True, "devices": {}}
    if kpath.exists():
        keys = json.loads(kpath.read_text())
    reg_path = home / "registry.json"
    registry = (json.loads(reg_path.read_text()) if reg_path.exists()
                else {"format": P.REGISTRY_FORMAT, "devices": {}})
    pem = serialization.Encoding.PEM
    registry["ca_certificate"] = ca_cert.public_bytes(pem).decode()
    registry["server_certificate"] = server_cert.public_bytes(pem).decode()
    made = 0
    for dev in ids:
        entry = registry["devices"].get(dev)
        if dev in keys["devices"] and entry:
            continue
        if dev in keys["devices"]:
            key = ec.derive_private_key(int(keys["devices"][dev], 16), ec.SECP256R1())
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            keys["devices"][dev] = _d_hex(key)
        # No STSAFE serial number: a software module has no chip (the attribute is optional).
        cert = P._device_cert(ca_key, ca_cert, dev, key.public_key(), None)
        registry["devices"][dev] = {
            "certificate": cert.public_bytes(pem).decode(),
            "public_key": cert.public_key().public_bytes(*P._POINT).hex(),
            "first_epoch": FIRST_EPOCH,
            "software_key": True,
        }
        made += 1
    if made:
        B.private_dir(kpath.parent)
        B.write_private(kpath, json.dumps(keys, sort_keys=True) + "\n")
        tmp = reg_path.with_name("registry.json.tmp")
        tmp.write_text(json.dumps(registry, indent=1, sort_keys=True) + "\n")
        tmp.replace(reg_path)
    t_certs = time.monotonic() - t0
    try:
        B.ensure_credentials(home, ids)
    except B.BrokerError as e:
        raise FleetError(str(e)) from None
    t1 = time.monotonic()
    # What the private broker pays at each start for these accounts (PBKDF2 per account).
    sample = min(n, 200)
    for _ in range(sample):
        B.password_hash("x" * 32)
    per_hash = (time.monotonic() - t1) / sample
    log("serene fleet: %d modules in %s (%d new, certificates %.1f s); broker password file: "
        "%.2f ms per account, ~%.1f s at each broker start"
        % (n, home, made, t_certs, per_hash * 1e3, per_hash * n))
    return ids


def device_certificate_der(home, dev, registry=None):
    reg = registry or json.loads((pathlib.Path(home) / "registry.json").read_text())
    cert = x509.load_pem_x509_certificate(reg["devices"][dev]["certificate"].encode())
    return cert.public_bytes(serialization.Encoding.DER)


def load_state(home):
    path = state_path(home)
    if not path.exists():
        return {"format": STATE_FORMAT, "run": 0, "closed": {}}
    return json.loads(path.read_text())


def save_state(home, state):
    B.write_private(state_path(home), json.dumps(state, sort_keys=True) + "\n")
