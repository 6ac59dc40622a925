"""docs/wire-format.md's worked example is right: every value in it is recomputed by the
independent verifier (cbor2, pycose, cryptography) and by the firmware under the MicroPython
unix port (tests/upy/seal_doc.py), and every annotated byte listing matches the values."""

import hashlib
import json
import re

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from serene import upy as upy_mod
from serene.verifier import protocol as p

DOC = upy_mod.REPO / "docs" / "wire-format.md"
HELPER = str(upy_mod.REPO / "tests" / "upy" / "seal_doc.py")
LABELS = {
    "d_server": "serene example server static key",
    "d_eph": "serene example ephemeral key, epoch 999999",
    "d_dev": "serene example device factory key",
}


@pytest.fixture(scope="module")
def doc():
    return DOC.read_text()


@pytest.fixture(scope="module")
def ex(doc):
    m = re.search(r"<!-- example-json -->\s*```json\n(.*?)```", doc, re.S)
    return json.loads(m.group(1))


def _listings(doc):
    """{name: bytes} of every `<!-- bytes: name -->` listing: per line, the hex before the
    first run of two spaces (comment-only lines are skipped)."""
    out = {}
    for name, body in re.findall(r"<!-- bytes: (\w+) -->\s*```\n(.*?)```", doc, re.S):
        hx = ""
        for line in body.splitlines():
            code = re.split(r"\s{2,}", line.strip())[0]
            if re.fullmatch(r"[0-9a-f]+( [0-9a-f]+)*", code):
                hx += code.replace(" ", "")
        out[name] = bytes.fromhex(hx)
    return out


def _point(d_hex):
    k = ec.derive_private_key(int(d_hex, 16), ec.SECP256R1())
    return k, k.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def test_listings_match_the_values(doc, ex):
    listings = _listings(doc)
    assert set(listings) >= {"ctx_rk", "enc_structure", "sealed", "sealed_kid", "cose_encrypt0",
                             "epoch_record", "checkpoint", "ack"}
    for name, data in listings.items():
        assert data.hex() == ex[name], name


def test_example_keys_come_from_their_labels(ex):
    for name, label in LABELS.items():
        d = int.from_bytes(hashlib.sha256(label.encode()).digest(), "big") % (2**256 - 2**224)
        assert format(d, "064x") == ex[name]
    assert _point(ex["d_server"])[1].hex() == ex["Q_server"]
    assert _point(ex["d_eph"])[1].hex() == ex["Q_eph"]
    assert _point(ex["d_dev"])[1].hex() == ex["Q_dev"]


def test_verifier_reproduces_the_example(ex):
    b = bytes.fromhex
    dev, ep = ex["device_id"].encode(), ex["epoch"]
    srv, _ = _point(ex["d_server"])
    z = p.ecdh(srv, b(ex["Q_eph_c"]))
    assert z.hex() == ex["Z"]
    keys = p.derive_keys(z, dev, ep)
    assert (keys.record_key.hex(), keys.record_iv.hex()) == (ex["record_key"], ex["record_iv"])
    assert (keys.ack_key.hex(), keys.ack_iv.hex()) == (ex["ack_key"], ex["ack_iv"])
    assert p.kdf_context(dev, p.SERVER_IDENTITY, ep, 128, b"key").hex() == ex["ctx_rk"]
    assert p.kdf_context(p.SERVER_IDENTITY, dev, ep, 104, b"iv").hex() == ex["ctx_aiv"]
    assert p.oscore_nonce(keys.record_iv, p.kid_for(ep), 1).hex() == ex["nonce"]
    pt = b(ex["plaintext"])
    for kid, name in ((False, "sealed"), (True, "sealed_kid")):
        obj = p.seal(pt, 1, keys.record_key, keys.record_iv, dev, ep, with_kid=kid)
        assert obj.hex() == ex[name]
        assert p.open_sealed(obj, keys.record_key, keys.record_iv, dev, ep) == (1, pt)
    sealed = b(ex["sealed"])
    assert p.rebuild_encrypt0(p.parse_sealed(sealed), p.kid_for(ep)).hex() == ex["cose_encrypt0"]
    _, q_dev = _point(ex["d_dev"])
    dev_pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), q_dev)
    s = p.parse_signed(b(ex["epoch_record"]))
    assert s.message.payload.hex() == ex["epoch_payload"]
    assert s.unprotected == {34: [-15, hashlib.sha256(b"example certificate DER").digest()[:8]]}
    assert hashlib.sha256(p.sig_structure(s.message.payload)).hexdigest() == ex["epoch_digest"]
    p.verify_signed(s, dev_pub)
    assert (s.type, s.epoch, s.seq, s.fields) == (1, ep, 0, (b(ex["Q_eph_c"]),))
    stored = {1: sealed, 2: b(ex["sealed2"])}
    assert p.chain_hash(sorted(stored.items())).hex() == ex["chain"]
    c = p.parse_signed(b(ex["checkpoint"]))
    assert c.message.payload.hex() == ex["cp_payload"]
    p.verify_signed(c, dev_pub)
    p.check_chain(c, stored)
    assert p.ack_plaintext(ep, 2, 0).hex() == ex["ack_plaintext"]
    assert p.oscore_nonce(keys.ack_iv, p.kid_for(ep), 0).hex() == ex["ack_nonce"]
    assert p.seal(b(ex["ack_plaintext"]), 0, keys.ack_key, keys.ack_iv, dev, ep).hex() == ex["ack"]


def test_firmware_reproduces_the_example(ex, upy, tmp_path):
    path = tmp_path / "example.json"
    path.write_text(json.dumps(ex))
    got = json.loads(upy.run([HELPER, str(path)], mpy=True).stdout)
    assert got.pop("ack_open") == [ex["epoch"], 2, 0]
    for name, value in got.items():
        assert value == ex[name], name
