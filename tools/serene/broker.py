"""A private Mosquitto broker for the bench and the tests: per-device accounts and ACLs.

    with Broker(home, ["dev-1", "dev-2"]) as b:    # or b = Broker(...).start(); ...; b.stop()
        b.port                       # the modules' loopback port (plain MQTT); None with tls=True
        b.tls_port                   # the modules' TLS port when Broker(..., tls=True), else None
        b.server_port                # the server processes' own loopback listener (plain MQTT)
        b.credentials("dev-1")       # {"username": "dev-1", "password": "..."}
        b.server_credentials()       # the medical server's account (valid on server_port only)

Two kinds of listener, each with its own accounts (per_listener_settings true):
- the device listener(s) (`port`, and `tls_port` with tls=True): device accounts only, and
  `use_username_as_clientid true`: a connection's client id IS its account name, whatever it
  asked for. One account can take over only its own previous connection, never another
  device's, never a server process's (device ids may not start with SERVER_PREFIX).
- the server listener (`server_port`, 127.0.0.1): the server account only. Server processes
  choose their client ids (serene-server-<worker id>, all under SERVER_PREFIX); no device can
  authenticate there, so no device can take one of them over. It stays plain even with
  tls=True: it is bound to loopback only, so its traffic never leaves the host, and whoever can
  read loopback traffic can read the server's key files too. Server processes on other hosts
  (docs/scale.md) would need a TLS server listener.
With tls=True the plain device listener is closed (TLS only for modules) unless
Broker(..., plain=True) asks for both (benchmarks that compare them).

Everything lives under `<home>/broker/` (mode 0700; every file holding a secret 0600):
    credentials.json   one account per device plus the server's (mode 0600), made once by
                       ensure_credentials() and kept: a module keeps its password across restarts
    devices.passwd     Mosquitto password files, PBKDF2-SHA512 hashes in Mosquitto's own format
    server.passwd      (`user:$7$<iterations>$<salt b64>$<hash b64>`, what mosquitto_passwd -b
                       writes; tests/test_broker.py checks the two agree)
    devices.acl        device <id>: write serene/<id>/up, read serene/<id>/down, nothing else;
                       a BLE hub (Broker(..., hubs={"hub-1": ["SRN-0001"]})): the same two
                       topics of each module it serves, nothing else (hub_acl_text)
    server.acl         the server: read serene/+/up and serene/+/down, write serene/+/down
                       (it subscribes $share/serene-<worker>/serene/<id>/up, one per device:
                       serene.server.service)
    mosquitto.conf     loopback listeners only, allow_anonymous false, no persistence, bounds
    mosquitto.log      the broker's log
    tls/               with tls=True: a self-signed P-256 certificate for 127.0.0.1/localhost that
                       the modules pin (cert.der), and its key

The ports are chosen free at the first start and kept for the Broker object's life, so a broker
stopped and started again (the reconnection tests) listens where the modules expect it.
Mosquitto is Debian's 2.0.x (`apt-get install mosquitto`, done by tools/dev).
"""

import base64
import contextlib
import datetime
import getpass
import hashlib
import ipaddress
import json
import os
import pathlib
import re
import secrets
import shutil
import socket
import subprocess
import time

SERVER_USER = "serene-server"
#: The LoRaWAN network server's account (server listener): it publishes ChirpStack v4
#: integration events and reads their downlink commands (serene.netserver).
NETSERVER_USER = "serene-netserver"
#: Every server account and server client id starts with this; no device id may.
SERVER_PREFIX = "serene-"
#: A device id becomes an MQTT username and a topic level: no wildcard, separator or space.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: PBKDF2-SHA512 as Mosquitto 2.0 stores it (password_mosq.c: hash type 7, 12-byte salt).
PW_HASH_TYPE = 7
PW_SALT_LEN = 12
PW_ITERATIONS = 1000  # mosquitto_passwd's default is 101; more costs only at connect
#: The largest legitimate packet (/tmp contract G, docs/link-format.md): a PUBLISH of a 1024-byte
#: link frame (the LTE-M MTU; LoRa <= 222, BLE <= 244) on serene/<64-char id>/up: fixed header 1
#: + remaining length 2 + topic length 2 + topic 7 + 64 + 3 + packet id 2 + 1024 = 1105 bytes;
#: MQTT 5 properties (none sent today) get the rest of the margin. CONNECT with a 64-char user
#: and a 32-char password is ~120 bytes. Anything larger disconnects its sender.
MAX_PACKET = 1280
#: Per client (the server's persistent session above all): QoS-1 messages sent and not yet
#: PUBACKed. The server PUBACKs only after its database commit (serene.server.service), so its
#: window must cover what arrives during one batch and its commit (~20 ms) at the highest rate
#: (~20,000 frames/s from a flood): 2000 leaves margin; the server's own byte bounds cap what it
#: holds meanwhile. A module receives only acks (< 64 bytes): the same window costs it nothing.
MAX_INFLIGHT = 2000
#: Queued above the in-flight window, per client: what the server cannot take yet waits here
#: (a server restart, a commit stall). 20 MiB / 20,000 frames is ~20 s of a 1,000-module fleet
#: at one frame a second; beyond it Mosquitto drops the newest silently, which loses nothing:
#: a module keeps every object in its outbox until a sealed ack covers it and retransmits.
#: Whichever limit is reached first applies.
MAX_QUEUED_MESSAGES = 20000
MAX_QUEUED_BYTES = 20 * 1024 * 1024
#: How long a starting broker may take to accept connections (it takes ~10 ms here).
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class BrokerError(Exception):
    """The broker could not be configured, started or reached; the message says why."""


def up_topic(device_id):
    return "serene/%s/up" % device_id


def down_topic(device_id):
    return "serene/%s/down" % device_id


def check_device_id(device_id):
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise BrokerError("device id %r is not usable as an MQTT username and topic level "
                          "(letters, digits, '_', '.', '-', at most 64)" % (device_id,))
    if device_id.lower().startswith(SERVER_PREFIX):
        raise BrokerError("device id %r: the prefix %r is reserved for the server's accounts "
                          "and client ids" % (device_id, SERVER_PREFIX))


def mosquitto_exe():
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                        if os.path.exists("/usr/sbin/mosquitto") else None)
    if not exe:
        raise BrokerError("mosquitto is not installed (tools/dev setup installs it; or "
                          "apt-get install -y mosquitto)")
    return exe


def broker_dir(home):
    return pathlib.Path(home) / "broker"


def private_dir(path):
    """A directory only its owner may enter (0700), made with its parents if needed."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def write_private(path, text):
    """Write a file readable by its owner only (0600, even over an existing wider file),
    atomically, in a directory that is private_dir()."""
    path = pathlib.Path(path)
    private_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    os.replace(tmp, path)


_write_private = write_private


def _new_password():
    return secrets.token_urlsafe(24)


def ensure_credentials(home, device_ids, hub_ids=()):
    """Load `<home>/broker/credentials.json`, add an account for each new device (and the
    server, and each hub of `hub_ids`), save it, and return it: {"server": {...},
    "devices": {id: {...}}, "hubs": {id: {...}}}, each account {"username", "password"}.
    Existing passwords are never changed."""
    ids = list(device_ids)
    for dev in ids + list(hub_ids):
        check_device_id(dev)
    d = broker_dir(home)
    private_dir(d)
    path = d / "credentials.json"
    creds = {"server": None, "devices": {}}
    if path.exists():
        try:
            creds = json.loads(path.read_text())
        except ValueError as e:
            raise BrokerError("%s is not JSON: %s" % (path, e)) from None
        if not isinstance(creds, dict) or not isinstance(creds.get("devices"), dict):
            raise BrokerError("%s: not a credentials file" % path)
    changed = False
    if not creds.get("server"):
        creds["server"] = {"username": SERVER_USER, "password": _new_password()}
        changed = True
    if not creds.get("netserver"):
        creds["netserver"] = {"username": NETSERVER_USER, "password": _new_password()}
        changed = True
    for dev in ids:
        if dev not in creds["devices"]:
            creds["devices"][dev] = {"username": dev, "password": _new_password()}
            changed = True
    for hub in hub_ids:
        if hub in creds["devices"]:
            raise BrokerError("hub id %r is also a device id" % hub)
        if hub not in creds.setdefault("hubs", {}):
            creds["hubs"][hub] = {"username": hub, "password": _new_password()}
            changed = True
    if changed or not path.exists():
        _write_private(path, json.dumps(creds, indent=2, sort_keys=True) + "\n")
    return creds


def password_hash(password, salt=None, iterations=PW_ITERATIONS):
    """One password file entry's hash, as mosquitto_passwd writes it (PBKDF2-SHA512)."""
    salt = os.urandom(PW_SALT_LEN) if salt is None else salt
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return "$%d$%d$%s$%s" % (PW_HASH_TYPE, iterations, base64.b64encode(salt).decode(),
                             base64.b64encode(dk).decode())


def _device_accounts(creds):
    """The device accounts of `creds` that may exist on a device listener (a credentials file
    edited by hand with an id under SERVER_PREFIX or unusable as a topic level is ignored)."""
    out = []
    for dev in sorted(creds["devices"]):
        try:
            check_device_id(dev)
        except BrokerError:
            continue
        if creds["devices"][dev].get("username") == dev:
            out.append(creds["devices"][dev])
    return out


def device_ids(home):
    """The device accounts of `<home>/broker/credentials.json` that a device listener
    accepts (what the server subscribes one by one: registered or not, every account that can
    publish an uplink). [] without the file."""
    path = broker_dir(home) / "credentials.json"
    try:
        creds = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError as e:
        raise BrokerError("%s is not JSON: %s" % (path, e)) from None
    if not isinstance(creds, dict) or not isinstance(creds.get("devices"), dict):
        return []
    return [a["username"] for a in _device_accounts(creds)]


def password_file_text(accounts):
    return "".join("%s:%s\n" % (a["username"], password_hash(a["password"])) for a in accounts)


def device_acl_text(creds):
    lines = ["# Generated by serene.broker: each module reaches only its own two topics."]
    for acc in _device_accounts(creds):
        dev = acc["username"]
        lines += ["user %s" % dev,
                  "topic write %s" % up_topic(dev),
                  "topic read %s" % down_topic(dev), ""]
    return "\n".join(lines) + "\n"


def hub_acl_text(creds, hubs):
    """Each BLE home hub (serene.hub) of `hubs` ({hub id: [module ids]}): write the uplink
    topics and read the downlink topics of the modules it serves, nothing else. Hub accounts
    live on the device listener (client id = account name) but outside "devices": the
    server does not subscribe a hub's own topics."""
    lines = ["# BLE home hubs: each relays only for the modules it serves."]
    for hub in sorted(hubs):
        lines.append("user %s" % creds["hubs"][hub]["username"])
        for dev in sorted(hubs[hub]):
            check_device_id(dev)
            lines += ["topic write %s" % up_topic(dev), "topic read %s" % down_topic(dev)]
        lines.append("")
    return "\n".join(lines) + "\n"


def server_acl_text(creds):
    # Reading the downlinks too lets a server-side monitor (the bench's latency probe) see
    # the acks; the server publishes them anyway. It never publishes an uplink.
    return "\n".join(["# Generated by serene.broker: the medical server's account.",
                      "user %s" % creds["server"]["username"],
                      "topic read serene/+/up",
                      "topic readwrite serene/+/down",
                      # LoRaWAN (serene.server.chirpstack): ChirpStack v4 integration topics.
                      "topic read application/+/device/+/event/#",
                      "topic readwrite application/+/device/+/command/down", "",
                      "user %s" % creds["netserver"]["username"],
                      "topic write application/+/device/+/event/#",
                      "topic read application/+/device/+/command/down", ""])


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_tls_cert(tls_dir):
    """A self-signed P-256 certificate for 127.0.0.1 and localhost, made once. Returns the
    paths (cert.pem, key.pem, cert.der); cert.der is what a module pins."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    tls_dir = pathlib.Path(tls_dir)
    cert_pem, key_pem, cert_der = (tls_dir / "cert.pem", tls_dir / "key.pem",
                                   tls_dir / "cert.der")
    if cert_pem.exists() and key_pem.exists() and cert_der.exists():
        return cert_pem, key_pem, cert_der
    private_dir(tls_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "serene broker")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_pem, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode())
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cert_der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return cert_pem, key_pem, cert_der


def config_text(log, device_listeners, server_listener):
    """device_listeners: [(port, tls or None)], tls = (cert.pem, key.pem); each entry's
    password and ACL files are the devices' ones. server_listener: (port, passwd, acl)."""
    lines = [
        "# Generated by serene.broker. Loopback only; no anonymous access.",
        # Accounts and ACLs per listener: device accounts exist only on the device listeners,
        # the server's only on its own (see the module's docstring).
        "per_listener_settings true",
        "persistence false",
        "log_dest file %s" % log,
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        # Medical records are small: the largest legitimate packet and nothing above it.
        "max_packet_size %d" % MAX_PACKET,
        # The bounds of what the broker holds per client (reasoning at MAX_INFLIGHT and
        # MAX_QUEUED_*): the server PUBACKs an uplink only once it is durable.
        "max_inflight_messages %d" % MAX_INFLIGHT,
        "max_queued_messages %d" % MAX_QUEUED_MESSAGES,
        "max_queued_bytes %d" % MAX_QUEUED_BYTES,
        # Each ack is one small PUBLISH: without TCP_NODELAY it waits for the peer's delayed
        # TCP ACK (Nagle), ~40 ms on Linux. Measured by serene fleet: ack p50 49.7 -> 9.1 ms.
        "set_tcp_nodelay true",
    ]
    if os.geteuid() == 0:
        # As root Mosquitto would switch to the 'mosquitto' user, who cannot read our 0600
        # files: stay who we are (the bench runs as the developer; CI runs as root).
        lines.append("user %s" % getpass.getuser())
    for port, passwd, acl, tls in device_listeners:
        lines += ["", "# Modules: the client id is the account name, whatever was asked for.",
                  "listener %d 127.0.0.1" % port,
                  "allow_anonymous false",
                  "password_file %s" % passwd,
                  "acl_file %s" % acl,
                  "use_username_as_clientid true"]
        if tls:
            lines += ["certfile %s" % tls[0], "keyfile %s" % tls[1], "tls_version tlsv1.2"]
    port, passwd, acl = server_listener
    lines += ["", "# Server processes only (their own client ids, serene-server-<worker>).",
              "listener %d 127.0.0.1" % port,
              "allow_anonymous false",
              "password_file %s" % passwd,
              "acl_file %s" % acl]
    return "\n".join(lines) + "\n"


class Broker:
    """A private Mosquitto for `device_ids` under `<home>/broker/`."""

    def __init__(self, home, device_ids, tls=False, port=None, tls_port=None, server_port=None,
                 plain=None, hubs=None):
        self.home = pathlib.Path(home)
        self.device_ids = list(device_ids)
        #: BLE home hubs: {hub id: [module ids it serves]} (accounts: hub_credentials()).
        self.hubs = {h: list(m) for h, m in (hubs or {}).items()}
        self.dir = broker_dir(home)
        self.tls = tls
        #: A plain device listener: always without TLS; with TLS only when asked for.
        self.plain = (not tls) if plain is None else bool(plain)
        self.port = port if self.plain else None
        self.tls_port = tls_port
        self.server_port = server_port
        self.proc = None
        self.creds = None
        self.cert_der = None

    # --- accounts -----------------------------------------------------------------------

    def credentials(self, device_id):
        if self.creds is None:
            self.creds = ensure_credentials(self.home, self.device_ids)
        try:
            return dict(self.creds["devices"][device_id])
        except KeyError:
            raise BrokerError("no broker account for device %r" % device_id) from None

    def hub_credentials(self, hub_id):
        """A BLE home hub's account (device listener; its ACL: hub_acl_text)."""
        if self.creds is None or hub_id not in self.creds.get("hubs", {}):
            self.creds = ensure_credentials(self.home, self.device_ids, self.hubs)
        try:
            return dict(self.creds["hubs"][hub_id])
        except KeyError:
            raise BrokerError("no broker account for hub %r" % hub_id) from None

    def server_credentials(self):
        """The server's account: it authenticates on `server_port` only."""
        if self.creds is None:
            self.creds = ensure_credentials(self.home, self.device_ids)
        return dict(self.creds["server"])

    def netserver_credentials(self):
        """The LoRaWAN network server's account (server_port only)."""
        if self.creds is None:
            self.creds = ensure_credentials(self.home, self.device_ids)
        return dict(self.creds["netserver"])

    def info(self):
        """What modules, servers and the bench need to reach this broker (no secret)."""
        return {"host": "127.0.0.1", "port": self.port, "tls_port": self.tls_port,
                "server_port": self.server_port}

    # --- life cycle ---------------------------------------------------------------------

    def write_config(self):
        self.creds = ensure_credentials(self.home, self.device_ids, self.hubs)
        d = self.dir
        files = {}
        hub_accounts = [self.creds["hubs"][h] for h in sorted(self.hubs)]
        for name, text in (("devices.passwd", password_file_text(_device_accounts(self.creds)
                                                                 + hub_accounts)),
                           ("server.passwd", password_file_text([self.creds["server"],
                                                                self.creds["netserver"]])),
                           ("devices.acl", device_acl_text(self.creds)
                            + (hub_acl_text(self.creds, self.hubs) if self.hubs else "")),
                           ("server.acl", server_acl_text(self.creds))):
            files[name] = d / name
            _write_private(files[name], text)
        for old in ("passwd", "acl"):  # one file for every account, before the split
            with contextlib.suppress(FileNotFoundError):
                (d / old).unlink()
        tls = None
        if self.tls:
            cert_pem, key_pem, self.cert_der = make_tls_cert(d / "tls")
            tls = (cert_pem, key_pem)
            if self.tls_port is None:
                self.tls_port = free_port()
        if self.plain and self.port is None:
            self.port = free_port()
        if self.server_port is None:
            self.server_port = free_port()
        devices = []
        if self.plain:
            devices.append((self.port, files["devices.passwd"], files["devices.acl"], None))
        if self.tls:
            devices.append((self.tls_port, files["devices.passwd"], files["devices.acl"], tls))
        conf = d / "mosquitto.conf"
        _write_private(conf, config_text(
            d / "mosquitto.log", devices,
            (self.server_port, files["server.passwd"], files["server.acl"])))
        return conf

    def ports(self):
        return [p for p in (self.port, self.tls_port if self.tls else None, self.server_port)
                if p is not None]

    def start(self):
        if self.running():
            return self
        # A port chosen here may be taken by someone else before Mosquitto binds it: then
        # choose again (only ports this object picked itself, and only before a first start).
        chosen = [name for name in ("port", "tls_port", "server_port")
                  if getattr(self, name) is None
                  and (name != "port" or self.plain) and (name != "tls_port" or self.tls)]
        for attempt in range(3):
            try:
                return self._start()
            except BrokerError:
                if not chosen or attempt == 2:
                    raise
                for name in chosen:
                    setattr(self, name, None)

    def _start(self):
        conf = self.write_config()
        log = self.dir / "mosquitto.log"
        offset = log.stat().st_size if log.exists() else 0
        self.proc = subprocess.Popen([mosquitto_exe(), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        ports = self.ports()
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                self.proc = None
                raise BrokerError("mosquitto exited at start: %s%s" % (
                    err.strip(), self._log_tail(log, offset)))
            # Ready = Mosquitto says it runs (so it bound every listener: a port taken by
            # someone else makes it exit instead) and the ports answer.
            if self._log_says(log, offset, "running") and all(_accepts(p) for p in ports):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError("mosquitto did not accept connections on %s within %.0f s%s"
                                  % (ports, START_TIMEOUT_S, self._log_tail(log, offset)))
            time.sleep(0.01)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @staticmethod
    def _log_says(log, offset, word):
        try:
            with open(log, "rb") as f:
                f.seek(offset)
                return any(line.rstrip().endswith(word.encode()) for line in f)
        except OSError:
            return False

    @staticmethod
    def _log_tail(log, offset):
        try:
            with open(log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return ("\n" + "\n".join(text.splitlines()[-10:])) if text else ""


def _accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Probe:
    """A small synchronous MQTT client (paho) for tests, the bench and diagnostics.

        p = Probe(port, username, password)      # connected, or BrokerError with the reason
        p.subscribe("serene/+/up")               # -> granted QoS (128 = refused)
        p.publish("serene/x/down", b"...")       # QoS 1, waits for the PUBACK
        topic, payload = p.get(timeout=2)        # next received message, or None
        p.close()
    """

    def __init__(self, port, username=None, password=None, client_id=None, host="127.0.0.1",
                 timeout=5.0, tls_ca=None, on_message=None):
        import queue
        import threading

        import paho.mqtt.client as mqtt

        self._mqtt = mqtt
        self.messages = queue.Queue()
        self.timeout = timeout
        self._subacks = {}
        self._cond = threading.Condition()
        self._connack = None
        self.disconnects = 0
        self._closing = False
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or "probe-" + secrets.token_hex(4))
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls_ca:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.client.on_connect = self._on_connect
        if on_message is None:
            self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        else:
            self.client.on_message = lambda c, u, m: on_message(m.topic, m.payload, time.time())
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        try:
            self.client.connect(host, port, keepalive=30)
        except OSError as e:
            raise BrokerError("cannot reach the broker on %s:%d: %s" % (host, port, e)) from None
        self.client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._connack is not None, timeout)
        if self._connack is None or self._connack.is_failure:
            self.close()
            raise BrokerError("connect as %r refused: %s" % (username, self._connack))

    def _on_connect(self, client, userdata, flags, reason, props):
        with self._cond:
            self._connack = reason
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason, props):
        with self._cond:
            if not self._closing:
                self.disconnects += 1
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reasons, props):
        with self._cond:
            self._subacks[mid] = reasons
            self._cond.notify_all()

    def subscribe(self, topic, qos=1):
        """Subscribe; return the granted QoS (0-2) or 128 when the broker refused it."""
        rc, mid = self.client.subscribe(topic, qos)
        if rc != self._mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError("subscribe %s: %s" % (topic, self._mqtt.error_string(rc)))
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, self.timeout):
                raise BrokerError("no SUBACK for %s" % topic)
            return self._subacks.pop(mid)[0].value

    def publish(self, topic, payload, qos=1):
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(self.timeout)
        if not info.is_published():
            raise BrokerError("publish to %s not acknowledged" % topic)

    def get(self, timeout=None):
        import queue

        try:
            return self.messages.get(timeout=self.timeout if timeout is None else timeout)
        except queue.Empty:
            return None

    def close(self):
        self._closing = True
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
