"""Provisioning: manufacturer CA, server identity, and each module's identity in its STSAFE.

    serene provision --home DIR --devices N        # SRN-0001 .. SRN-000N, idempotent
    serene.stsafe.provision.provision(home, ["SRN-0001", ...])

Layout under DIR (docs/stsafe.md explains each choice):
    ca/ca.key.pem            manufacturer CA private key (P-256, PKCS#8 PEM, mode 0600)
    ca/ca.crt.pem            manufacturer CA certificate (self-signed)
    server/server.key.pem    the server's static P-256 private key (ECDH with module epochs)
    server/server.crt.pem    the server's certificate, signed by the CA
    devices/<id>/stsafe.json the module's emulated STSAFE-A110 (its private keys live only here)
    devices/<id>/device.crt.pem  the device certificate (also in the chip's zone 0)
    devices/<id>/module.json the MODULE's configuration: device id, I2C address, host MAC and
                             cipher keys (the MCU's half of the pairing), zone map
    registry.json            device id -> certificate, public key, I2C address and
                             first_epoch (the first epoch the module will announce), for the
                             server; dev_eui (LoRaWAN DevEUI: the LoRaWAN intake's map)
    netserver/keys.json      LoRaWAN OTAA keys of every module for the network server's join
                             server (serene.netserver.keys; 0600 in a 0700 directory)
    module.json "lorawan"    {"dev_eui", "join_eui", "appkey_envelope"}: the AppKey wrapped
                             by the chip's local envelope key (never in clear on the module)

Per module, through the chip's own command interface (as a provisioning station would):
Put Attribute host keys -> Generate Key in slot 0 (inside the chip) -> device certificate
signed by the CA -> Update zone 0 and lock it -> pin server + CA public keys in their zone
(update AC host) -> local envelope key in slot 0 -> self-test: the chip signs, the
certificate's key verifies, an envelope round-trips. Each step first
checks whether it is already done, so a second run changes nothing and an interrupted run can
be resumed.
"""

import datetime
import json
import os
import pathlib
import re

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.x509.oid import NameOID

from . import profile
from . import protocol as P
from .emulator import EmulatorError, StsafeEmulator
from .host import StsafeHost, StsafeHostError

DEVICE_ID = re.compile(r"^[A-Z0-9][A-Z0-9-]{0,31}$")
REGISTRY_FORMAT = "serene-registry/1"
MODULE_FORMAT = "serene-module/1"
ORG = "serene"
CA_NAME = "serene manufacturer CA"
SERVER_NAME = "serene medical server"
# RFC 5280 §4.1.2.5: a device certificate with no well-defined expiration date.
NO_EXPIRY = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
CA_YEARS = 25
SERVER_YEARS = 10
_POINT = (serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


class ProvisionError(Exception):
    """Provisioning cannot go on (inconsistent home directory, chip refused a step)."""


def device_ids(n, prefix="SRN-"):
    return ["%s%04d" % (prefix, i) for i in range(1, n + 1)]


# --- files ---


def _write(path, data, mode=0o644):
    """Atomic write: a crash leaves the old file or the new one, never half of it."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json(obj):
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def _load_json(path):
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ProvisionError("cannot read %s: %s" % (path, e)) from None


def _name(cn):
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _now():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path):
    try:
        return serialization.load_pem_private_key(pathlib.Path(path).read_bytes(), None)
    except (OSError, ValueError) as e:
        raise ProvisionError("cannot read key %s: %s" % (path, e)) from None


def _load_cert(path):
    try:
        return x509.load_pem_x509_certificate(pathlib.Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise ProvisionError("cannot read certificate %s: %s" % (path, e)) from None


def _same_key(cert, key):
    return cert.public_key().public_bytes(*_POINT) == key.public_key().public_bytes(*_POINT)


# --- CA and server ---


def _key_and_cert(key_path, cert_path, make_cert):
    """The P-256 key at key_path (made, mode 0600, if absent) and its certificate at
    cert_path (made by make_cert(key) if absent). A certificate without its key, or not
    matching it, is an error: nothing is overwritten."""
    if key_path.exists():
        key = _load_key(key_path)
    elif cert_path.exists():
        raise ProvisionError("%s exists without its key %s" % (cert_path, key_path))
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(key_path, _key_pem(key), 0o600)
    if cert_path.exists():
        cert = _load_cert(cert_path)
        if not _same_key(cert, key):
            raise ProvisionError("%s does not match %s" % (cert_path, key_path))
        return key, cert
    cert = make_cert(key)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _ca_cert(key):
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(CA_NAME))
        .issuer_name(_name(CA_NAME))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now.replace(year=now.year + CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def device_uri(device_id):
    """The device certificate's subjectAltName: a URI in a URN namespace of ours (RFC 8141
    syntax), which X.509 verifiers carry as an ordinary uniformResourceIdentifier SAN."""
    return "urn:serene:device:" + device_id


def _issue(ca_key, ca_cert, subject, pub, not_after, usage, serial_number=None, san=None,
           eku=None):  # fmt: skip
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG)]
    if serial_number:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, subject))
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now())
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if san is not None:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def _device_cert(ca_key, ca_cert, device_id, public_key, st_number):
    """The device certificate: CN and SAN name the device; the key only signs (digital
    signature: the factory key's mode 0x0004 forbids key agreement); the module uses it to
    authenticate itself to the server (clientAuth)."""
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    return _issue(ca_key, ca_cert, device_id, public_key, NO_EXPIRY, usage, st_number,
                  san=[x509.UniformResourceIdentifier(device_uri(device_id))],
                  eku=[x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH])  # fmt: skip


def _old_device_cert(cert, device_id):
    """Why a recorded device certificate is not one a standard verifier accepts, or None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "it has no subjectAltName"
    if device_uri(device_id) not in san.get_values_for_type(x509.UniformResourceIdentifier):
        return "its subjectAltName does not name %s" % device_uri(device_id)
    try:
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return "it has no extendedKeyUsage"
    return None


def _server_cert(ca_key, ca_cert):
    def make(key):
        now = _now()
        # Static ECDH key (epochs: ECDH-ES) that also authenticates the server's sealed acks.
        usage = x509.KeyUsage(False, False, False, False, True, False, False, False, False)
        not_after = now.replace(year=now.year + SERVER_YEARS)
        return _issue(ca_key, ca_cert, SERVER_NAME, key.public_key(), not_after, usage)

    return make


# --- one module ---


def _module_config(device_id, mac_key, cipher_key):
    return {
        "format": MODULE_FORMAT,
        "device_id": device_id,
        "i2c_address": profile.I2C_ADDRESS,
        "host_mac_key": mac_key.hex(),
        "host_cipher_key": cipher_key.hex(),
        "zones": profile.zone_map(),
    }


def _provision_device(home, device_id, ca_key, ca_cert, server_cert):
    """Bring one module to the provisioned state; return (certificate, changed)."""
    d = home / "devices" / device_id
    chip_path, module_path, cert_path = d / "stsafe.json", d / "module.json", d / "device.crt.pem"
    changed = False
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if chip_path.exists():
            emu = StsafeEmulator.load(chip_path, time_scale=0)
        else:
            emu = StsafeEmulator.create(chip_path, time_scale=0)
            changed = True
    except EmulatorError as e:
        raise ProvisionError("%s: %s" % (device_id, e)) from None
    host = StsafeHost(emu)

    # 0. The chip's command authorization table is set at personalisation (change right 0:
    # no command changes it). One that lets a command using a private key, an envelope key
    # or a counter run without the host C-MAC makes the chip a signing oracle for anything on
    # the bus: such a chip is refused, never provisioned.
    auth = host.authorization()
    loose = [
        c for c in profile.HOST_ONLY_COMMANDS if auth.get(c, (P.AC_FREE, 0))[0] != P.AC_HOST
    ]
    if loose:
        raise ProvisionError(
            "%s: the chip's command authorization table lets %s run without the host C-MAC "
            "(an older profile); the table cannot be changed after personalisation: provision "
            "a new chip (remove %s, or use a new --home)"
            % (device_id, ", ".join("0x%02X" % c for c in loose), d)
        )

    # 1. Pairing: the MCU's host keys, recorded before the chip gets them.
    present, _ = host.host_key_slot()
    if module_path.exists():
        cfg = _load_json(module_path)
        if cfg.get("device_id") != device_id:
            raise ProvisionError("%s names device %r" % (module_path, cfg.get("device_id")))
        mac_key, cipher_key = (
            bytes.fromhex(cfg["host_mac_key"]),
            bytes.fromhex(cfg["host_cipher_key"]),
        )
        want = _module_config(device_id, mac_key, cipher_key)
        if "lorawan" in cfg:
            want["lorawan"] = cfg["lorawan"]  # step 8's, kept
        if cfg != want:  # a newer zone map: rewrite, keys unchanged
            _write(module_path, _json(want), 0o600)
            changed = True
    elif present:
        raise ProvisionError(
            "%s: the chip is paired but %s is lost; its host keys cannot be read back"
            % (device_id, module_path)
        )
    else:
        mac_key, cipher_key = os.urandom(16), os.urandom(16)
        _write(module_path, _json(_module_config(device_id, mac_key, cipher_key)), 0o600)
        changed = True
    if not present:
        host.put_host_keys(mac_key, cipher_key)
        changed = True
    else:
        host.mac_key, host.cipher_key = mac_key, cipher_key

    # 2. Factory key, generated inside the chip, and its certificate.
    if not host.private_key_present(profile.FACTORY_KEY_SLOT):
        pub = host.generate_key(profile.FACTORY_KEY_SLOT, profile.FACTORY_KEY_MODE, usage_limit=0)
        public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pub)
        st_number = _product_tlv(host.query(P.TAG_PRODUCT_DATA), 0x02).hex()
        cert = _device_cert(ca_key, ca_cert, device_id, public_key, st_number)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        changed = True
    elif cert_path.exists():
        cert = _load_cert(cert_path)
        why = _old_device_cert(cert, device_id)
        if why is not None:
            # The certificate is locked in chip zone 0 (update never) and its key cannot be
            # re-certified without changing what the chip holds: nothing to upgrade in place.
            raise ProvisionError(
                "%s: the device certificate %s is of an older format (%s) and is locked in the "
                "chip: re-provision (remove %s, or use a new --home)"
                % (device_id, cert_path, why, d)
            )
    else:
        raise ProvisionError(
            "%s: slot 0 holds a key whose certificate was never recorded (%s); the chip cannot "
            "export a public key: replace the chip" % (device_id, cert_path)
        )
    der = cert.public_bytes(serialization.Encoding.DER)

    # 3. Certificate in its zone, then the zone locked (update AC never, no change right).
    zones = host.data_partition()
    cz = zones[profile.CERT_ZONE]
    if host.read(profile.CERT_ZONE, 0, len(der)) != der:
        if cz["update_ac"] != 0:
            raise ProvisionError(
                "%s: zone %d is locked with another certificate" % (device_id, profile.CERT_ZONE)
            )
        host.update(profile.CERT_ZONE, 0, der, lock_ac=profile.AC_NEVER_LOCKED)
        changed = True
    elif cz["update_ac"] != profile.AC_NEVER_LOCKED:
        host.update(profile.CERT_ZONE, 0, der[:1], lock_ac=profile.AC_NEVER_LOCKED)
        changed = True

    # 4. Pinned server and CA public keys; their zone then needs the host C-MAC to change.
    pins = server_cert.public_key().public_bytes(*_POINT) + ca_cert.public_key().public_bytes(
        *_POINT
    )
    sz = zones[profile.SERVER_KEY_ZONE]
    if (
        host.read(profile.SERVER_KEY_ZONE, profile.SERVER_KEY_OFFSET, len(pins)) != pins
        or sz["update_ac"] != 1
    ):
        host.update(profile.SERVER_KEY_ZONE, profile.SERVER_KEY_OFFSET, pins,
                    lock_ac=1 if sz["update_right"] else None)  # fmt: skip
        changed = True

    # 5. The epoch counter zone must be a one-way counter only the paired MCU can decrement.
    ez = zones[profile.EPOCH_COUNTER_ZONE]
    if ez["type"] != 1 or ez["update_ac"] != 1:
        raise ProvisionError(
            "%s: zone %d is not a host-only one-way counter"
            % (device_id, profile.EPOCH_COUNTER_ZONE)
        )

    # 6. The local envelope key (AES-128), generated inside the chip: the module wraps the
    # ack keys it persists with it (Wrap / Unwrap Local Envelope). Written once.
    if host.local_envelope_keys().get(profile.ENVELOPE_KEY_SLOT) is None:
        host.generate_local_envelope_key(profile.ENVELOPE_KEY_SLOT, 0)
        changed = True

    # 7. Self-test after any change: the chip's slot-0 key is the certificate's key, and the
    # envelope key wraps and unwraps.
    if changed:
        probe = os.urandom(32)
        if host.unwrap(profile.ENVELOPE_KEY_SLOT, host.wrap(profile.ENVELOPE_KEY_SLOT, probe)) != (
            probe
        ):
            raise ProvisionError("%s: the chip's local envelope does not round-trip" % device_id)
        digest = os.urandom(32)
        sig = host.command(P.GENERATE_SIGNATURE, bytes([profile.FACTORY_KEY_SLOT]) + P.lv(digest))
        r, off = P.take_lv(sig, 0)
        s, _ = P.take_lv(sig, off)
        try:
            cert.public_key().verify(
                encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big")),
                digest,
                ec.ECDSA(Prehashed(hashes.SHA256())),
            )
        except InvalidSignature:
            raise ProvisionError(
                "%s: the chip's key does not match its certificate" % device_id
            ) from None
    # 8. LoRaWAN OTAA: a DevEUI and an AppKey; the module keeps the AppKey only wrapped by the
    # chip's local envelope key (it unwraps it into RAM to join); the network server's join
    # server gets it in clear, in its own 0600 keys file.
    if _provision_lorawan(home, device_id, host, module_path):
        changed = True
    return cert, changed, ez["counter"]


LORAWAN_JOIN_EUI = "70b3d57ed0000000"


def netserver_keys_path(home):
    return pathlib.Path(home) / "netserver" / "keys.json"


def _provision_lorawan(home, device_id, host, module_path):
    from ..netserver import keys as ns_keys

    cfg = _load_json(module_path)
    lw = cfg.get("lorawan")
    kpath = netserver_keys_path(home)
    known = {d["devEui"]: d for d in ns_keys.load(kpath)} if kpath.exists() else {}
    if lw is None:
        app_key = os.urandom(16)
        lw = {"dev_eui": os.urandom(8).hex(), "join_eui": LORAWAN_JOIN_EUI,
              "appkey_envelope": host.wrap(profile.ENVELOPE_KEY_SLOT, app_key).hex()}
        if host.unwrap(profile.ENVELOPE_KEY_SLOT, bytes.fromhex(lw["appkey_envelope"])) != app_key:
            raise ProvisionError("%s: the AppKey envelope does not round-trip" % device_id)
        cfg["lorawan"] = lw
        _write(module_path, _json(cfg), 0o600)
    elif lw["dev_eui"] in known:
        return False
    else:  # the keys file was lost: the chip gives the AppKey back from its envelope
        app_key = host.unwrap(profile.ENVELOPE_KEY_SLOT, bytes.fromhex(lw["appkey_envelope"]))
    ns_keys.generate(kpath, dev_eui=lw["dev_eui"], join_eui=lw["join_eui"],
                     app_key=app_key.hex(), application_id="serene", device_name=device_id)
    return True


def first_epoch(counter):
    """The first epoch a module announces when its epoch counter zone holds `counter`: the
    firmware's epoch is 2^32 - 1 - (the counter after its Decrement) (firmware/epoch.py)."""
    return 2**32 - 1 - counter + 1


def _product_tlv(pd, tag):
    i = 0
    while i + 2 <= len(pd):
        if pd[i] == tag:
            return pd[i + 2 : i + 2 + pd[i + 1]]
        i += 2 + pd[i + 1]
    raise ProvisionError("product data has no tag 0x%02X" % tag)


def provision(home, device_ids):
    """Provision `device_ids` under `home` (idempotent). Returns {device id: "created" |
    "updated" | "unchanged"}."""
    home = pathlib.Path(home)
    for dev in device_ids:
        if not DEVICE_ID.match(dev):
            raise ProvisionError("bad device id %r (A-Z, 0-9, '-', at most 32)" % dev)
    home.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _key_and_cert(
        home / "ca" / "ca.key.pem", home / "ca" / "ca.crt.pem", _ca_cert
    )
    _, server_cert = _key_and_cert(
        home / "server" / "server.key.pem",
        home / "server" / "server.crt.pem",
        _server_cert(ca_key, ca_cert),
    )
    reg_path = home / "registry.json"
    registry = (
        _load_json(reg_path) if reg_path.exists() else {"format": REGISTRY_FORMAT, "devices": {}}
    )
    old = json.loads(json.dumps(registry))
    registry["ca_certificate"] = ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    registry["server_certificate"] = server_cert.public_bytes(serialization.Encoding.PEM).decode()
    result = {}
    for dev in device_ids:
        fresh = not (home / "devices" / dev / "stsafe.json").exists()
        try:
            cert, changed, counter = _provision_device(home, dev, ca_key, ca_cert, server_cert)
        except StsafeHostError as e:
            raise ProvisionError("%s: %s" % (dev, e)) from None
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        entry = registry["devices"].get(dev, {})
        first = first_epoch(counter)
        if entry.get("certificate") == pem and "first_epoch" in entry:
            first = entry["first_epoch"]  # the same chip may have counted since: kept
        registry["devices"][dev] = {
            "certificate": pem,
            "public_key": cert.public_key().public_bytes(*_POINT).hex(),
            "i2c_address": profile.I2C_ADDRESS,
            "first_epoch": first,
        }
        lw = _load_json(home / "devices" / dev / "module.json").get("lorawan")
        if lw:
            registry["devices"][dev]["dev_eui"] = lw["dev_eui"]
        result[dev] = "created" if fresh else ("updated" if changed else "unchanged")
    if registry != old:
        _write(reg_path, _json(registry))
    return result


# --- CLI: serene provision ---


def add_arguments(parser):
    parser.add_argument("--home", required=True, help="provisioning directory (created if absent)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--devices", type=int, metavar="N", help="provision SRN-0001 .. SRN-N")
    group.add_argument("--ids", help="comma-separated device ids, e.g. SRN-0001,SRN-0042")


def run(args):
    from ..cli import CliError

    if args.devices is not None:
        if args.devices < 1:
            raise CliError("--devices must be at least 1")
        ids = device_ids(args.devices)
    else:
        ids = [i.strip() for i in args.ids.split(",") if i.strip()]
    try:
        result = provision(args.home, ids)
    except ProvisionError as e:
        raise CliError(str(e)) from None
    for dev, what in result.items():
        print("%s %s" % (dev, what))
    return 0
