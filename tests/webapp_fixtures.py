"""Shared by tests/test_webapp_*.py and tests/bench/bench_patient_page.py: a provisioned
server home, records sealed as a module seals them and put through the real ingest
(Ingest.handle), the application on a free loopback port, accounts, patients, Chromium."""

import hashlib
import json
import pathlib
import re
import time

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from serene import linkframe
from serene.server.ingest import Ingest
from serene.server.store import Store, db_url
from serene.verifier import from_home
from serene.verifier import protocol as vp

EPOCH = 999_999
K_EPOCH, K_RECORD, K_CHECKPOINT = 0, 1, 2
PASSWORD = "correct horse battery staple"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def provision_home(path, devices):
    from serene.stsafe.provision import provision

    provision(path, devices)
    reg = json.loads((path / "registry.json").read_text())
    for entry in reg["devices"].values():
        entry["first_epoch"] = EPOCH
    (path / "registry.json").write_text(json.dumps(reg))
    return path


class Module:
    """What a module seals and sends, made in CPython from its provisioned identity (as
    tests/test_server.py's FakeModule)."""

    def __init__(self, home, dev):
        home = pathlib.Path(home)
        self.dev = dev
        chip = json.loads((home / "devices" / dev / "stsafe.json").read_text())
        self.key = ec.derive_private_key(int(chip["key_slots"]["0"]["private"], 16),
                                         ec.SECP256R1())
        cert = x509.load_pem_x509_certificate(
            (home / "devices" / dev / "device.crt.pem").read_bytes())
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.server_pub = x509.load_pem_x509_certificate(
            (home / "server" / "server.crt.pem").read_bytes()).public_key()

    def new_epoch(self, epoch=EPOCH):
        eph = ec.generate_private_key(ec.SECP256R1())
        z = eph.exchange(ec.ECDH(), self.server_pub)
        self.epoch, self.keys = epoch, vp.derive_keys(z, self.dev.encode(), epoch)
        q = eph.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.CompressedPoint)
        payload = cbor2.dumps([1, self.dev.encode(), epoch, 0, q, None])
        self.last_hash = hashlib.sha256(payload).digest()
        return self._sign(payload, {33: self.cert_der})

    def _sign(self, payload, unprot):
        r, s = decode_dss_signature(
            self.key.sign(vp.sig_structure(payload), ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return cbor2.dumps(cbor2.CBORTag(18, [vp.PROTECTED_ES256, unprot, payload, sig]))

    def seal(self, seq, fields):
        return vp.seal(cbor2.dumps(fields), seq, self.keys.record_key, self.keys.record_iv,
                       self.dev.encode(), self.epoch, with_kid=False)

    def checkpoint(self, seq, first, objs):
        chain = vp.chain_hash(sorted(objs.items()))
        payload = cbor2.dumps([2, self.dev.encode(), self.epoch, seq, first, len(objs), chain,
                               self.last_hash])
        self.last_hash = hashlib.sha256(payload).digest()
        return self._sign(payload, {})

    def frame(self, entries):
        return linkframe.build(linkframe.Frame(self.epoch, tuple(
            linkframe.Entry(k, s, d, len(d)) for k, s, d in entries)))


def status(t, rate=1250, volume=0, dose=1_000_000, remaining=480, alarms=0, state=2,
           battery=80, power=1):
    """A status record's labels (firmware/record.py): rate 0.1 ml/h, volume/dose µl."""
    return {0: 1, -3: int(t), 2: rate, 3: volume, 4: dose, 5: remaining, 6: alarms, 7: state,
            8: battery, 9: power}


def feed(home, dev, records, checkpoint_every=16, skip=(), per_frame=8, epoch=EPOCH):
    """Seal `records` (label dicts without seq) as seq 1..n of a new epoch and put them
    through the real ingest, with a checkpoint after every `checkpoint_every` records;
    seqs in `skip` are sealed (and checkpointed) but never sent: a gap. -> {seq: fields}"""
    m = Module(home, dev)
    ing = Ingest(from_home(home), Store(db_url(home)))
    try:
        ing.handle("serene/%s/up" % dev, m.frame([(K_EPOCH, 0, m.new_epoch(epoch))]))
        seq, pending, batch, first, out = 1, {}, [], 1, {}
        for fields in records:
            f = dict(fields)
            f[1] = seq
            sealed = m.seal(seq, f)
            out[seq] = f
            pending[seq] = sealed
            if seq not in skip:
                batch.append((K_RECORD, seq, sealed))
            seq += 1
            if len(pending) >= checkpoint_every:
                batch.append((K_CHECKPOINT, seq, m.checkpoint(seq, first, pending)))
                seq += 1
                first, pending = seq, {}
            if len(batch) >= per_frame:
                ing.handle("serene/%s/up" % dev, m.frame(batch))
                batch = []
        if pending:
            batch.append((K_CHECKPOINT, seq, m.checkpoint(seq, first, pending)))
        for i in range(0, len(batch), per_frame):
            ing.handle("serene/%s/up" % dev, m.frame(batch[i:i + per_frame]))
    finally:
        ing.close()
    return out


def add_user(engine, username, role, language="en"):
    from serene.webapp.views import create_user

    with engine.begin() as conn:
        return create_user(conn, username, role, PASSWORD, username.title(), language)


def add_patient(engine, mrn, name, device=None, clinicians=(), since=0.0):
    from serene.webapp import db
    from serene.webapp.views import add_to_care_team, assign_device

    with engine.begin() as conn:
        pid = conn.execute(db.patients.insert().values(
            mrn=mrn, display_name=name, created_at=time.time())).inserted_primary_key[0]
        if device:
            assign_device(conn, pid, device, since)
        for uid in clinicians:
            add_to_care_team(conn, pid, uid, since)
    return pid


def login(page, base, username, password=PASSWORD):
    page.goto(base + "login")
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("button#login")


def launch_chromium(p):
    return p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS,
                             headless=True)


def csrf_of(html):
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
