"""Sealing end to end: the firmware (MicroPython unix port, from the mpy-cross build) starts
epochs and seals records with the real STSAFE driver against the emulator (provisioned by
serene.stsafe.provision, on the I2C bridge); the independent server-side verifier
(serene.verifier: cbor2, pycose, cryptography) checks the certificate chain and signatures,
derives the keys and opens every record; acks sealed by the verifier open on the module."""

import json
import os
import subprocess

import cbor2
import pytest

from serene import upy as upy_mod
from serene.i2c_bridge import I2CBridgeServer
from serene.stsafe import profile
from serene.stsafe.emulator import StsafeEmulator
from serene.stsafe.provision import provision
from serene.verifier import VerifyError, from_home, protocol

DEV = "SRN-0001"
NODE = str(upy_mod.REPO / "tests" / "upy" / "seal_node.py")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp("prov")
    provision(h, [DEV, "SRN-0002"])
    return h


class Chip:
    """The provisioned emulator of DEV on an I2C bridge, and the module's configuration."""

    def __init__(self, home):
        self.emu = StsafeEmulator.load(
            home / "devices" / DEV / "stsafe.json", time_scale=0, autosave=False
        )
        self.module = json.loads((home / "devices" / DEV / "module.json").read_text())
        self.bridge = I2CBridgeServer({profile.I2C_ADDRESS: self.emu}).start()

    def config(self, **kw):
        z = self.module["zones"]
        cfg = {
            "port": self.bridge.port,
            "mac_key": self.module["host_mac_key"],
            "cipher_key": self.module["host_cipher_key"],
            "device_id": self.module["device_id"],
            "counter_zone": z["epoch_counter"]["zone"],
            "server_key": [z["server_key"]["zone"], z["server_key"]["offset"]],
            "cert_zone": z["certificate"]["zone"],
            "fast": True,
        }
        cfg.update(kw)
        return cfg

    def close(self):
        self.bridge.close()


@pytest.fixture
def chip(home):
    c = Chip(home)
    yield c
    c.close()


class Node:
    """A running seal_node.py: one JSON op in, one JSON line out."""

    def __init__(self, upy, procs, tmp_path, cfg):
        path = tmp_path / "node.json"
        path.write_text(json.dumps(cfg))
        self.p = upy.popen(
            [NODE, str(path)], mpy=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        procs.append(self.p)
        assert self._read() == {"ready": True}

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            raise AssertionError("node died: " + self.p.stderr.read())
        return json.loads(line)

    def __call__(self, op, **kw):
        self.p.stdin.write(json.dumps(dict(op=op, **kw)) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self):
        self.p.stdin.write('{"op": "quit"}\n')
        self.p.stdin.flush()
        self.p.wait(10)


def _plaintexts(n):
    return [cbor2.dumps({0: 1, 1: i, 2: 1250 + i, 3: 100000 * i, -3: 1700000000 + 60 * i})
            for i in range(n)]


def test_round_trip_records_checkpoints_acks(chip, home, upy, procs, tmp_path):
    node = Node(upy, procs, tmp_path, chip.config(every_n=4, cert="x5chain"))
    v = from_home(home)
    start = node("start")
    ep = start["epoch"]
    rec = bytes.fromhex(start["record"])
    opened = v.verify_object(DEV, rec)
    assert (opened.kind, opened.epoch, opened.seq) == ("epoch", ep, 0)
    # the epoch number is 2^32 - 1 - the SE's one-way counter
    assert ep == 2**32 - 1 - chip.emu.zone(profile.EPOCH_COUNTER_ZONE)["counter"]
    stored = {}
    checkpoints = []
    pts = _plaintexts(10)
    for i, pt in enumerate(pts):
        r = node("seal", pt=pt.hex(), kid=(i == 3))
        sealed = bytes.fromhex(r["sealed"])
        assert len(sealed) - len(pt) == (14 if i == 3 else 10)  # flags, PIV, [kid], tag
        got = v.verify_object(DEV, sealed, epoch=ep)
        assert (got.kind, got.epoch, got.seq, got.plaintext) == ("record", ep, r["seq"], pt)
        stored[r["seq"]] = sealed
        if "checkpoint" in r:
            checkpoints.append(bytes.fromhex(r["checkpoint"]))
            assert r["cp_seq"] == r["seq"] + 1
    r = node("checkpoint")
    checkpoints.append(bytes.fromhex(r["checkpoint"]))
    assert len(checkpoints) == 3  # every 4 records, then the forced one for the last 2
    covered = 0
    for cpb in checkpoints:
        cp = v.verify_object(DEV, cpb)
        assert cp.kind == "checkpoint" and cp.epoch == ep
        v.check_checkpoint(cp, stored)
        covered += cp.count
        # a stored record altered at rest is caught by its checkpoint
        q = cp.first_seq
        bad = dict(stored)
        bad[q] = bad[q][:-1] + bytes([bad[q][-1] ^ 1])
        with pytest.raises(VerifyError, match="checkpoint mismatch"):
            v.check_checkpoint(cp, bad)
        missing = {k: b for k, b in stored.items() if k != q}
        with pytest.raises(VerifyError, match="checkpoint mismatch"):
            v.check_checkpoint(cp, missing)
    assert covered == 10
    # acks from the server: sealed under the key of the epoch they acknowledge (contract E)
    seqs = {0} | set(stored) | {1 + max(stored) + 1}
    cum, bitmap = protocol.ack_from_seqs(seqs)
    a1 = v.seal_ack(DEV, ep, cum, bitmap, piv=(5 << 4) | 3)  # PIV (tick << 4) | worker
    assert node("ack", frame=a1.hex()) == {"ack": [ep, cum, bitmap]}
    # an ack under this epoch's key that claims another epoch is refused
    a2 = v.seal_ack(DEV, ep + 7, 3, 0b101, epoch=ep, piv=(6 << 4) | 3)
    assert node("ack", frame=a2.hex()) == {"err": "bad payload"}
    assert node("ack", frame=a1.hex()) == {"err": "replay"}
    a3 = v.seal_ack(DEV, ep, cum, bitmap, piv=(7 << 4) | 2)  # another worker, a later tick
    assert node("ack", frame=a3.hex()) == {"ack": [ep, cum, bitmap]}
    node.close()


def test_epoch_record_by_reference_and_unknown_device(chip, home, upy, procs, tmp_path):
    node = Node(upy, procs, tmp_path, chip.config(cert="x5t"))
    rec = bytes.fromhex(node("start")["record"])
    v = from_home(home)
    assert v.verify_object(DEV, rec).kind == "epoch"
    # the same record claimed by another registered device: payload names DEV
    with pytest.raises(VerifyError) as e:
        v.verify_object("SRN-0002", rec)
    assert e.value.reason == "wrong device"
    # a server that has not registered the device
    v2 = from_home(home)
    v2.certs.pop(DEV)
    with pytest.raises(VerifyError) as e:
        v2.verify_object(DEV, rec)
    assert e.value.reason == "unknown device"
    # ... which may learn a certificate sent by value, if it chains to the CA
    by_value = bytes.fromhex(node("start", cert="x5chain")["record"])
    v3 = from_home(home, accept_unregistered=True)
    v3.certs.pop(DEV)
    v3.verify_object(DEV, by_value)
    # the first start's epoch is older than the one now verified and named by no epoch
    # record's prev (it was never closed): refused on the uplink path (contract F) ...
    with pytest.raises(VerifyError) as e:
        v3.verify_object(DEV, rec)
    assert e.value.reason == "epoch out of range"
    # ... the device is now known: its record by reference verifies
    assert v3.accept_epoch(DEV, rec).epoch == protocol.parse_signed(rec).epoch
    # a certificate for the same device key and name from another CA is refused
    rogue = _rogue_certificate(v.certs[DEV])
    s = protocol.parse_signed(by_value)
    forged = cbor2.dumps(cbor2.CBORTag(18, [protocol.PROTECTED_ES256, {33: rogue},
                                            s.message.payload, s.message.signature]))
    v4 = from_home(home, accept_unregistered=True)
    v4.certs.pop(DEV)
    with pytest.raises(VerifyError) as e:
        v4.verify_object(DEV, forged)
    assert e.value.reason == "bad certificate"
    with pytest.raises(VerifyError) as e:  # and, to a server that registered the device
        from_home(home).verify_object(DEV, forged)
    assert e.value.reason == "bad certificate"
    node.close()


def _rogue_certificate(real):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.issuer)  # claims the real CA's name
        .public_key(real.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


def _flip_all(data):
    for i in range(len(data) * 8):
        b = bytearray(data)
        b[i >> 3] ^= 1 << (i & 7)
        yield bytes(b)


def test_any_flipped_bit_is_rejected(chip, home, upy, procs, tmp_path):
    node = Node(upy, procs, tmp_path, chip.config(every_n=2, cert="x5chain"))
    start = node("start")
    ep = start["epoch"]
    rec = bytes.fromhex(start["record"])
    r1 = node("seal", pt=_plaintexts(1)[0].hex())
    r2 = node("seal", pt=_plaintexts(2)[1].hex(), kid=True)
    sealed = [bytes.fromhex(r1["sealed"]), bytes.fromhex(r2["sealed"])]
    cpb = bytes.fromhex(r2["checkpoint"])
    v = from_home(home)
    v.verify_object(DEV, rec)
    reasons = {}

    def rejected(fn, obj):
        try:
            fn(obj)
        except VerifyError as e:
            reasons[e.reason] = reasons.get(e.reason, 0) + 1
            return True
        return False

    for s in sealed:
        for bad in _flip_all(s):
            assert rejected(lambda o: v.open_record(DEV, o, epoch=ep), bad), bad.hex()
    for bad in _flip_all(cpb):
        assert rejected(lambda o: v.verify_checkpoint(DEV, o), bad), bad.hex()
    # epoch record: a fresh verifier each time (a known epoch would short-cut)
    fresh = from_home(home)
    for bad in _flip_all(rec):
        fresh.epochs.clear()
        assert rejected(lambda o: fresh.accept_epoch(DEV, o), bad), bad.hex()
    assert reasons.get("forged", 0) > 0 and reasons.get("bad signature", 0) > 0
    # the originals still verify
    for s in sealed:
        v.open_record(DEV, s, epoch=ep)
    v.verify_checkpoint(DEV, cpb)
    # acks: every single-bit flip is rejected on the module, then the original opens
    ack = v.seal_ack(DEV, ep, 2, 0)
    res = node("ackflip", frame=ack.hex())
    assert res["accepted"] == 0
    assert sum(res["reasons"].values()) == len(ack) * 8
    assert node("ack", frame=ack.hex()) == {"ack": [ep, 2, 0]}
    node.close()


def test_replay_under_other_seq_epoch_or_device_is_rejected(chip, home, upy, procs, tmp_path):
    node = Node(upy, procs, tmp_path, chip.config())
    rec_a = bytes.fromhex(node("start")["record"])
    s_a = bytes.fromhex(node("seal", pt=b"\xa1\x00\x01".hex())["sealed"])  # seq 1, epoch A
    rec_b = bytes.fromhex(node("start")["record"])  # a new epoch B (rotation)
    s_b = bytes.fromhex(node("seal", pt=b"\xa1\x00\x02".hex())["sealed"])
    v = from_home(home)
    ea = v.verify_object(DEV, rec_a).epoch
    eb = v.verify_object(DEV, rec_b).epoch
    assert eb == ea + 1  # the counter counts down, the epoch number up: never reused
    assert v.open_record(DEV, s_a, ea)[1:] == (1, b"\xa1\x00\x01")
    # the same ciphertext under another sequence number
    parsed = protocol.parse_sealed(s_a)
    for seq in (2, 3, 255, 256):
        piv = seq.to_bytes(1 if seq < 256 else 2, "big")
        moved = bytes([len(piv)]) + piv + parsed.ciphertext
        with pytest.raises(VerifyError) as e:
            v.open_record(DEV, moved, ea)
        assert e.value.reason == "forged"
    # under another epoch (frame says B), or with B's kid spliced in
    with pytest.raises(VerifyError) as e:
        v.open_record(DEV, s_a, eb)
    assert e.value.reason == "forged"
    spliced = bytes([0x09]) + s_a[1:2] + protocol.kid_for(eb) + s_a[2:]
    with pytest.raises(VerifyError) as e:
        v.open_record(DEV, spliced)
    assert e.value.reason == "forged"
    # under another device: same key material, the AAD binds the device id
    keys = v.epoch(DEV, ea).keys
    with pytest.raises(VerifyError) as e:
        protocol.open_sealed(s_a, keys.record_key, keys.record_iv, b"SRN-0002", ea)
    assert e.value.reason == "forged"
    assert protocol.open_sealed(s_a, keys.record_key, keys.record_iv, DEV.encode(), ea)[1] == (
        b"\xa1\x00\x01"
    )
    # contract E: an ack of A is sealed under A's key; this node (now in epoch B) holds
    # only B's opener, so it is "other epoch" here
    ack_a = v.seal_ack(DEV, ea, 1, 0)
    assert protocol.parse_sealed(ack_a).kid == protocol.kid_for(ea)
    assert node("ack", frame=ack_a.hex()) == {"err": "other epoch"}
    # A's objects acknowledged under B's key (the v1 way) are refused: epoch is not the kid
    ack_x = v.seal_ack(DEV, ea, 1, 0, epoch=eb)
    assert node("ack", frame=ack_x.hex()) == {"err": "bad payload"}
    ack_b = v.seal_ack(DEV, eb, 1, 0)
    assert node("ack", frame=ack_b.hex()) == {"ack": [eb, 1, 0]}
    assert v.open_record(DEV, s_b, eb)[1:] == (1, b"\xa1\x00\x02")
    node.close()
