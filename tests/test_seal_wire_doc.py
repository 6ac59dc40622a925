"""docs/wire-format.md's worked example is right: every value in it is recomputed by the
independent verifier (cbor2, pycose, cryptography) and by the firmware under the MicroPython
unix port (tests/upy/seal_doc.py), every annotated byte listing matches the values, and the
sizes the document gives follow from its formulas. docs/link-format.md's example frames are
parsed and rebuilt by serene.linkframe and built by firmware/link.py from an outbox holding
the example objects (tests/upy/seal_doc.py link)."""

import calendar
import hashlib
import json
import re

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from serene import linkframe as lf
from serene import upy as upy_mod
from serene.server import ingest
from serene.verifier import protocol as p
from serene.verifier.protocol import VerifyError

DOC = upy_mod.REPO / "docs" / "wire-format.md"
LINK_DOC = upy_mod.REPO / "docs" / "link-format.md"
HELPER = str(upy_mod.REPO / "tests" / "upy" / "seal_doc.py")
LABELS = {
    "d_server": "serene example server static key",
    "d_eph": "serene example ephemeral key, epoch 999999",
    "d_eph2": "serene example ephemeral key, epoch 1000000",
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


def _h(v):
    """Length of the CBOR head of uint v (the document's h(v))."""
    return 1 if v < 24 else 2 if v < 1 << 8 else 3 if v < 1 << 16 else 5 if v < 1 << 32 else 9


def test_listings_match_the_values(doc, ex):
    listings = _listings(doc)
    assert set(listings) >= {"ctx_rk", "enc_structure", "sealed", "sealed_kid", "cose_encrypt0",
                             "epoch_record", "checkpoint", "epoch2_payload", "ack"}
    for name, data in listings.items():
        assert data.hex() == ex[name], name


def test_example_keys_come_from_their_labels(ex):
    for name, label in LABELS.items():
        d = int.from_bytes(hashlib.sha256(label.encode()).digest(), "big") % (2**256 - 2**224)
        assert format(d, "064x") == ex[name]
    assert _point(ex["d_server"])[1].hex() == ex["Q_server"]
    assert _point(ex["d_eph"])[1].hex() == ex["Q_eph"]
    assert _point(ex["d_eph2"])[1].hex() == ex["Q_eph2"]
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
    assert p.kdf_context(dev, p.SERVER_IDENTITY, ep, 104, b"iv").hex() == ex["ctx_riv"]
    assert p.kdf_context(p.SERVER_IDENTITY, dev, ep, 128, b"key").hex() == ex["ctx_ak"]
    assert p.kdf_context(p.SERVER_IDENTITY, dev, ep, 104, b"iv").hex() == ex["ctx_aiv"]
    assert p.kid_for(ep).hex() == ex["kid"]
    assert p.oscore_nonce(keys.record_iv, p.kid_for(ep), 1).hex() == ex["nonce"]
    assert b"\x83" + b"\x68Encrypt0" + b"\x40" + b"\x52" + p.external_aad(dev, ep, 1) == b(
        ex["enc_structure"])
    pt = b(ex["plaintext"])
    for kid, name in ((False, "sealed"), (True, "sealed_kid")):
        obj = p.seal(pt, 1, keys.record_key, keys.record_iv, dev, ep, with_kid=kid)
        assert obj.hex() == ex[name]
        assert p.open_sealed(obj, keys.record_key, keys.record_iv, dev, ep) == (1, pt)
    sealed = b(ex["sealed"])
    assert p.seal(b(ex["plaintext2"]), 2, keys.record_key, keys.record_iv, dev, ep,
                  with_kid=False).hex() == ex["sealed2"]
    assert p.rebuild_encrypt0(p.parse_sealed(sealed), p.kid_for(ep)).hex() == ex["cose_encrypt0"]
    # the canonical form (section 3.3): the kid checked against the frame's epoch, stripped
    assert p.canonical(b(ex["sealed_kid"]), ep) == sealed
    assert p.canonical(sealed, ep) == sealed
    with pytest.raises(VerifyError) as e:
        p.canonical(b(ex["sealed_kid"]), ep + 1)
    assert e.value.reason == "other epoch"

    _, q_dev = _point(ex["d_dev"])
    dev_pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), q_dev)
    # epoch record v2, prev null
    s = p.parse_signed(b(ex["epoch_record"]))
    assert s.payload.hex() == ex["epoch_payload"]
    assert s.payload_hash.hex() == ex["epoch_payload_hash"]
    assert s.unprotected == {34: [-15, hashlib.sha256(b"example certificate DER").digest()[:8]]}
    assert p.x5t(b"example certificate DER").hex() == ex["x5t"]
    assert hashlib.sha256(p.sig_structure(s.payload)).hexdigest() == ex["epoch_digest"]
    p.verify_signed(s, dev_pub)
    p.verify_signed_pycose(s, dev_pub)
    assert (s.type, s.epoch, s.seq) == (1, ep, 0)
    assert p.epoch_fields(s) == (b(ex["Q_eph_c"]), None)
    # checkpoint v2: chain over seq 1 and 2, prev = the epoch record's payload hash
    stored = {1: sealed, 2: b(ex["sealed2"])}
    assert p.chain_hash(sorted(stored.items())).hex() == ex["chain"]
    c = p.parse_signed(b(ex["checkpoint"]))
    assert c.payload.hex() == ex["cp_payload"]
    assert c.payload_hash.hex() == ex["cp_payload_hash"]
    assert c.unprotected == {}
    p.verify_signed(c, dev_pub)
    assert (c.type, c.epoch, c.seq) == (2, ep, 3)
    assert p.checkpoint_fields(c) == (1, 2, b(ex["chain"]))
    assert p.checkpoint_prev(c) == s.payload_hash
    p.check_chain(c, stored)
    with pytest.raises(VerifyError):
        p.check_chain(c, {1: sealed})  # a deleted record
    with pytest.raises(VerifyError):
        p.check_chain(c, {1: b(ex["sealed_kid"]), 2: b(ex["sealed2"])})  # not canonical
    # the next epoch's record names checkpoint 3 as the closing one
    s2 = p.parse_signed(b(ex["epoch2_record"]))
    assert s2.payload.hex() == ex["epoch2_payload"]
    p.verify_signed(s2, dev_pub)
    assert (s2.type, s2.epoch, s2.seq) == (1, ex["epoch2"], 0)
    assert s2.unprotected == s.unprotected
    assert p.epoch_fields(s2) == (b(ex["Q_eph2_c"]), (ep, 3, c.payload_hash))
    # the ack: sealed under the acked epoch's key, PIV (tick << 4) | worker
    t = calendar.timegm(tuple(int(x) for x in re.findall(r"\d+", ex["ack_time"])))
    assert ingest.tick_of(t) == ex["ack_tick"]
    assert (ex["ack_tick"] << ingest.WORKER_BITS) | ex["ack_worker"] == ex["ack_piv"]
    assert ex["ack_piv"].to_bytes(5, "big").hex() == b(ex["ack"])[1:6].hex()
    state = ingest.AckState()
    state.add([0, 1, 3])  # what the server holds in the example
    assert state.ack() == (ex["ack_cum"], ex["ack_bitmap"])
    assert p.ack_from_seqs({0, 1, 3}) == (ex["ack_cum"], ex["ack_bitmap"])
    apt = p.ack_plaintext(ep, ex["ack_cum"], ex["ack_bitmap"])
    assert apt.hex() == ex["ack_plaintext"]
    assert p.oscore_nonce(keys.ack_iv, p.kid_for(ep), ex["ack_piv"]).hex() == ex["ack_nonce"]
    ack = p.seal(apt, ex["ack_piv"], keys.ack_key, keys.ack_iv, dev, ep)
    assert ack.hex() == ex["ack"]
    assert p.open_sealed(ack, keys.ack_key, keys.ack_iv, dev, ep) == (ex["ack_piv"], apt)


def test_receiver_header_rules(ex):
    """Section 3.4 steps 1-4 as the verifier applies them."""
    sealed = bytes.fromhex(ex["sealed"])
    cases = {
        bytes([sealed[0] | 0x20]) + sealed[1:]: "bad header",  # reserved bit
        bytes([sealed[0] | 0x10]) + sealed[1:]: "bad header",  # kid context
        b"\x02\x00" + sealed[1:]: "bad header",  # partial IV not minimal
        b"\x00" + sealed[1:]: "bad header",  # n = 0
        b"\x06" + sealed[1:]: "bad header",  # n = 6
        b"\x01\x00" + sealed[2:]: "bad header",  # partial IV 0: never a sealed record
        sealed[:9]: "truncated",
    }
    for obj, why in cases.items():
        with pytest.raises(VerifyError) as e:
            p.canonical(obj, ex["epoch"])
        assert e.value.reason == why, obj.hex()


def test_pycose_pitfall(ex):
    """Section 3.1: with a common IV whose first byte gives a nonce starting with 0, plain
    pycose 1.1 cannot open what the verifier (nonce padded to 13 bytes) seals and opens."""
    from pycose.messages import Enc0Message

    import cbor2
    from cryptography.exceptions import InvalidTag
    from pycose.messages import Enc0Message

    b = bytes.fromhex
    dev, ep, kid = ex["device_id"].encode(), ex["epoch"], p.kid_for(ex["epoch"])
    key, pt = b(ex["record_key"]), b(ex["plaintext"])

    def plain_pycose_open(obj, iv):
        s = p.parse_sealed(obj)
        raw = cbor2.loads(p.rebuild_encrypt0(s, kid)).value
        msg = Enc0Message.from_cose_obj(list(p._thaw(raw)), True)
        msg.external_aad = p.external_aad(dev, ep, s.piv)
        msg.key = p._cose_key(key, iv, kid)
        return msg.decrypt()

    iv = b(ex["record_iv"])
    assert plain_pycose_open(b(ex["sealed"]), iv) == pt  # the example's epoch is fine
    iv = b"\x04" + iv[1:]  # an epoch whose nonces start with 0: 1 in 256
    assert p.oscore_nonce(iv, kid, 1)[0] == 0
    obj = p.seal(pt, 1, key, iv, dev, ep, with_kid=False)
    assert p.open_sealed(obj, key, iv, dev, ep) == (1, pt)
    with pytest.raises((InvalidTag, ValueError)):
        plain_pycose_open(obj, iv)


def test_sizes_follow_the_formulas(doc, ex):
    """Section 9's formulas give the example's lengths, and the ranges it states."""
    b = bytes.fromhex
    dev, ep = len(ex["device_id"]), ex["epoch"]

    def epoch_record(u, e, prev=None):
        pl = 40 + dev + _h(e) if prev is None else 74 + dev + _h(e) + _h(prev[0]) + _h(prev[1])
        return 74 + u + pl

    def checkpoint(e, seq, first, count):
        return 75 + 71 + dev + _h(e) + _h(seq) + _h(first) + _h(count)

    def ack(e, cum, bitmap):
        return 18 + 1 + _h(e) + _h(cum) + _h(bitmap)

    assert len(b(ex["epoch_payload"])) == 40 + dev + _h(ep) == 53
    assert len(b(ex["epoch_record"])) == epoch_record(14, ep) == 141
    assert len(b(ex["epoch2_record"])) == epoch_record(14, ex["epoch2"], (ep, 3)) == 181
    assert len(b(ex["checkpoint"])) == checkpoint(ep, 3, 1, 2) == 162
    assert len(b(ex["ack"])) == ack(ep, ex["ack_cum"], ex["ack_bitmap"]) == 26
    assert epoch_record(14, ep, (ep - 1, 2**32 - 1)) == 185
    assert epoch_record(6 + 537, ep) == 670  # measured on the bench (537-byte certificate)
    assert (epoch_record(6 + 537, ep, (ep - 1, 0)), epoch_record(6 + 537, ep, (ep - 1, 1 << 31))
            ) == (710, 714)
    assert checkpoint(ep, 2**32 - 1, 2**32 - 1 - 70000, 70000) == 174
    assert checkpoint(ep, 300, 284, 16) == 166  # measured on the bench
    assert ack(2**32 - 1, 2**32 - 1, 2**64 - 1) == 38
    assert 1 + 5 + 4 + len(p.ack_plaintext(2**32 - 1, 2**32 - 1, 2**64 - 1)) + 8 == 38
    for s in ("| epoch record, by reference, prev null | 141", "181..185", "670", "710..714",
              "162..174", "| ack | 26 (§8.6) to 38"):
        assert s in doc, s


def test_firmware_reproduces_the_example(ex, upy, tmp_path):
    path = tmp_path / "example.json"
    path.write_text(json.dumps(ex))
    got = json.loads(upy.run([HELPER, str(path)], mpy=True).stdout)
    checks = got.pop("checks")
    for name, value in got.items():
        assert value == ex[name], name
    assert checks["next_first_seq"] == 4
    assert checks["next_prev"] == ex["cp_payload_hash"]
    assert checks["ack_open"] == [ex["epoch"], ex["ack_cum"], ex["ack_bitmap"]]
    assert checks["ack_piv"] == ex["ack_piv"]
    assert checks["ack_again"] == "replay"
    assert checks["ack_other_epoch"] == "other epoch"
    assert checks["ack_forged"] == "forged"
    assert checks["ack_covers"] == [True, True, False, True, False, False]
    # the link's internal form: bit i = seq cum + 1 + i, 65 bits
    assert checks["ack_link_form"] == [ex["epoch"], 1, 2, 65]
    assert checks["header_rejects"] == {
        "reserved_bit": "bad flags", "kid_context": "bad flags",
        "non_minimal_piv": "bad partial iv length", "piv_length_0": "bad partial iv length",
        "piv_length_6": "bad partial iv length", "truncated": "truncated"}


# ---- docs/link-format.md ------------------------------------------------------------------

LINK_OBJECTS = [  # the example's objects, as the document describes them
    (1, 5, 1, bytes(range(1, 11))),
    (1, 5, 2, bytes(range(0x11, 0x1D))),
    (2, 5, 300, bytes(range(40))),
]
EPOCH_RECORD = bytes(i & 0xFF for i in range(600))  # kind 0, epoch 5, seq 0


def _firmware_frames(upy, tmp_path, name, mtu, objects, asks=False):
    spec = tmp_path / (name + ".json")
    spec.write_text(json.dumps({"mtu": mtu, "asks": asks, "objects": [[k, e, s, d.hex()]
                                                                      for k, e, s, d in
                                                                      objects]}))
    res = upy.run([HELPER, "link", str(tmp_path / name), str(spec)], mpy=True)
    return [bytes.fromhex(line) for line in res.stdout.split()]


@pytest.fixture(scope="module")
def link_doc():
    return LINK_DOC.read_text()


def test_link_doc_listings_parse_and_rebuild(link_doc):
    got = _listings(link_doc)
    assert set(got) == {"small_frame1", "small_frame2", "frag_frame1", "frag_frame4",
                        "frag_frame15", "ask_frame2"}
    ask = lf.parse(got["ask_frame2"], mtu=51)
    assert ask.flags == lf.ACK_REQUESTED and got["ask_frame2"][1:] == got["small_frame2"][1:]
    f1, f2 = lf.parse(got["small_frame1"], mtu=51), lf.parse(got["small_frame2"], mtu=51)
    assert (len(got["small_frame1"]), len(got["small_frame2"])) == (30, 46)
    assert f1.epoch == f2.epoch == 5
    assert [(e.kind, e.seq, e.data) for e in f1.entries + f2.entries] == [
        (k, s, d) for k, _, s, d in LINK_OBJECTS]
    assert not any(e.fragment for e in f1.entries + f2.entries)
    # "does not fit the 21 bytes left in frame 1": 1 + 2 + 1 + 40 = 44 > 51 - 30 = 21
    assert 51 - len(got["small_frame1"]) == 21
    for name, off, n, size in (("frag_frame1", 0, 43, 51), ("frag_frame4", 129, 42, 51),
                               ("frag_frame15", 591, 9, 18)):
        fr = lf.parse(got[name], mtu=51)
        (e,) = fr.entries
        assert (fr.epoch, e.kind, e.seq, e.fragment, e.total) == (5, 0, 0, True, 600), name
        assert (e.offset, len(e.data), e.data, len(got[name])) == (
            off, n, EPOCH_RECORD[off:off + n], size), name
    for frame in got.values():
        assert lf.build(lf.parse(frame)) == frame


def test_firmware_builds_the_link_doc_frames(link_doc, upy, tmp_path):
    got = _listings(link_doc)
    small = _firmware_frames(upy, tmp_path, "small", 51, LINK_OBJECTS)
    assert small == [got["small_frame1"], got["small_frame2"]]
    # The same objects on a radio that asks for acks (LoRa): the end of the burst asks.
    asked = _firmware_frames(upy, tmp_path, "ask", 51, LINK_OBJECTS, asks=True)
    assert asked == [got["small_frame1"], got["ask_frame2"]]
    frags = _firmware_frames(upy, tmp_path, "frag", 51, [(0, 5, 0, EPOCH_RECORD)])
    assert len(frags) == 15
    assert (frags[0], frags[3], frags[14]) == (got["frag_frame1"], got["frag_frame4"],
                                              got["frag_frame15"])
    assert frags[1][:8].hex() == "10058000d8042b2b" and frags[2][:8].hex() == "10058000d804562b"
    r = lf.Reassembler()
    out = [r.feed(5, e) for f in frags for e in lf.parse(f, mtu=51).entries]
    assert out[:-1] == [None] * 14 and out[-1] == EPOCH_RECORD
