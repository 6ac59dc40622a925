"""The medical server's ingest (serene.server): store once, ledger, acks, untrusted input.

Uplinks come from a CPython stand-in for a module (FakeModule): a provisioned home (serene
provision), the device's factory key read from its emulated STSAFE, epoch records and
checkpoints signed with it, records sealed with keys derived from the server's public key,
frames built by serene.linkframe. Acks coming back are opened with the module-side keys and
checked against sequence numbers worked out here by hand.
"""

import hashlib
import json
import os
import pathlib
import random

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from serene import linkframe
from serene.server.ingest import Ingest
from serene.server.store import Store, db_path, db_url  # noqa: F401
from serene.stsafe.provision import provision
from serene.verifier import from_home
from serene.verifier import protocol as vp

DEV, DEV2 = "SRN-0001", "SRN-0002"
EPOCH = 999_999
K_EPOCH, K_RECORD, K_CHECKPOINT, K_EVENT = 0, 1, 2, 3


class FakeModule:
    """What a module puts on the wire, made in CPython from its provisioned identity."""

    def __init__(self, home, dev):
        home = pathlib.Path(home)
        self.dev = dev
        chip = json.loads((home / "devices" / dev / "stsafe.json").read_text())
        d = int(chip["key_slots"]["0"]["private"], 16)
        self.key = ec.derive_private_key(d, ec.SECP256R1())
        cert = x509.load_pem_x509_certificate(
            (home / "devices" / dev / "device.crt.pem").read_bytes())
        assert cert.public_key() == self.key.public_key()
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.server_pub = x509.load_pem_x509_certificate(
            (home / "server" / "server.crt.pem").read_bytes()).public_key()
        self.epoch = None
        self.keys = None
        self.last_hash = None  # SHA-256 of the last signed payload of the epoch (v2 prev)
        self.closed = None  # [epoch, end_seq, end_hash] of the last closed epoch

    def new_epoch(self, epoch=EPOCH, by_value=True, prev="auto"):
        """A v2 epoch record (contract D); prev defaults to the last closed epoch."""
        eph = ec.generate_private_key(ec.SECP256R1())
        z = eph.exchange(ec.ECDH(), self.server_pub)
        self.epoch, self.keys = epoch, vp.derive_keys(z, self.dev.encode(), epoch)
        q = eph.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.CompressedPoint)
        if prev == "auto":
            prev = self.closed
        self.epoch_payload = cbor2.dumps([1, self.dev.encode(), epoch, 0, q, prev])
        self.last_hash = hashlib.sha256(self.epoch_payload).digest()
        return self.epoch_record(by_value)

    def epoch_record(self, by_value=True):
        unprot = {33: self.cert_der} if by_value else {34: [-15, vp.x5t(self.cert_der)]}
        return self._sign(self.epoch_payload, unprot)

    def _sign(self, payload, unprot):
        r, s = decode_dss_signature(
            self.key.sign(vp.sig_structure(payload), ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return cbor2.dumps(cbor2.CBORTag(18, [vp.PROTECTED_ES256, unprot, payload, sig]))

    def seal(self, seq, plaintext, kid=False):
        return vp.seal(plaintext, seq, self.keys.record_key, self.keys.record_iv,
                       self.dev.encode(), self.epoch, with_kid=kid)

    def record(self, seq, rate=1250):
        # A status record (firmware/record.py labels): kind 1, seq, time, rate, volume.
        return self.seal(seq, cbor2.dumps({0: 1, 1: seq, -3: 1_700_000_000 + seq, 2: rate,
                                           3: 100 * seq}))

    def checkpoint(self, seq, first, objs, prev=None, close=False):
        """A v2 checkpoint (contract C). objs: {seq: sealed bytes} covered, first <= s < seq;
        prev defaults to the hash of the previous signed payload; close: it closes the
        epoch (the next epoch's record names it)."""
        chain = vp.chain_hash(sorted(objs.items()))
        payload = cbor2.dumps([2, self.dev.encode(), self.epoch, seq, first, len(objs), chain,
                               self.last_hash if prev is None else prev])
        self.last_hash = hashlib.sha256(payload).digest()
        if close:
            self.closed = [self.epoch, seq, self.last_hash]
        return self._sign(payload, {})

    def frame(self, *entries, epoch=None):
        """entries: (kind, seq, data) whole, or (kind, seq, data, total, offset) fragments."""
        es = []
        for e in entries:
            if len(e) == 3:
                es.append(linkframe.Entry(e[0], e[1], e[2], len(e[2])))
            else:
                es.append(linkframe.Entry(e[0], e[1], e[2], e[3], e[4], True))
        return linkframe.build(linkframe.Frame(self.epoch if epoch is None else epoch,
                                               tuple(es)))

    def open_ack(self, ack):
        """-> (piv, acked epoch, cum, bitmap) if the ack opens under this epoch's ack key."""
        piv, pt = vp.open_sealed(ack, self.keys.ack_key, self.keys.ack_iv, self.dev.encode(),
                                 self.epoch)
        acked, cum, bitmap = cbor2.loads(pt)
        return piv, acked, cum, bitmap


#: every test runs on SQLite and on PostgreSQL (tests/conftest.py: database)
pytestmark = pytest.mark.usefixtures("database")


@pytest.fixture(scope="module")
def home_template(tmp_path_factory):
    home = tmp_path_factory.mktemp("provisioned")
    provision(home, [DEV, DEV2])
    # The tests' epochs start at EPOCH: tell the registry (contract F's first_epoch), as
    # provisioning does for the counter's real initial value.
    reg = json.loads((home / "registry.json").read_text())
    for entry in reg["devices"].values():
        entry["first_epoch"] = EPOCH
    (home / "registry.json").write_text(json.dumps(reg))
    return home


@pytest.fixture
def home(tmp_path, home_template):
    import shutil

    dst = tmp_path / "home"
    shutil.copytree(home_template, dst)
    return dst


class Clock:
    """A wall clock for the ingest that moves `step` seconds at every reading (so acks in a
    row get distinct 10 ms ticks), and can be moved by hand."""

    def __init__(self, t=1_760_000_000.0, step=0.02):
        self.t, self.step = t, step

    def __call__(self):
        self.t += self.step
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ingest(home, clock):
    ing = Ingest(from_home(home), Store(db_url(home)), clock=clock)
    yield ing
    ing.close()


def up(dev=DEV):
    return "serene/%s/up" % dev


def one_ack(acks, dev=DEV):
    assert len(acks) == 1, acks
    topic, ack = acks[0]
    assert topic == "serene/%s/down" % dev
    return ack


def ledger(ing, dev=DEV):
    return ing.store.device_ledger(dev)


def started(home, ing, dev=DEV, epoch=EPOCH):
    m = FakeModule(home, dev)
    rec = m.new_epoch(epoch)
    ing.handle(up(dev), m.frame((K_EPOCH, 0, rec)))
    return m


# --- storage, duplicates, gaps, acks -----------------------------------------------------


def test_objects_are_stored_once_with_sealed_bytes_and_fields(home, ingest):
    m = FakeModule(home, DEV)
    ep = m.new_epoch()
    recs = {s: m.record(s, rate=1000 + s) for s in range(1, 6)}
    acks = ingest.handle(up(), m.frame((K_EPOCH, 0, ep), (K_RECORD, 1, recs[1])))
    piv1, *ack1 = m.open_ack(one_ack(acks))
    assert ack1 == [EPOCH, 1, 0]
    acks = ingest.handle(up(), m.frame(*[(K_RECORD, s, recs[s]) for s in (2, 3, 4, 5)]))
    piv2, *ack2 = m.open_ack(one_ack(acks))
    assert ack2 == [EPOCH, 5, 0]
    # Contract E: PIV = (tick << 4) | worker id, tick = 10 ms since 2025-01-01T00:00:00Z.
    assert piv1 & 0xF == 0 and piv2 > piv1
    assert abs((piv2 >> 4) / 100 + 1735689600 - ingest.clock.t) < 0.1
    rows = ingest.store.execute(
        "SELECT seq, kind, sealed, fields FROM objects WHERE device=? ORDER BY seq",
        (DEV,)).fetchall()
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert bytes(rows[0][2]) == ep and rows[0][1] == "epoch"
    for seq, kind, sealed, fields in rows[1:]:
        assert kind == "record" and bytes(sealed) == recs[seq]
        f = json.loads(fields)
        assert (f["kind"], f["seq"], f["rate"], f["volume"]) == ("status", seq, 1000 + seq,
                                                                 100 * seq)
    led = ledger(ingest)
    assert led["complete"] and led["objects"] == 6 and led["missing"] == 0
    assert led["epochs"][0]["received"] == [[0, 5]] and led["epochs"][0]["gaps"] == []


def test_same_object_twice_is_stored_once_and_counted_as_duplicate(home, ingest):
    m = started(home, ingest)
    r1 = m.record(1)
    frame = m.frame((K_RECORD, 1, r1))
    pivs = []
    for _ in range(3):  # the module resends (its ack was lost), or someone replays it
        piv, acked, cum, bitmap = m.open_ack(one_ack(ingest.handle(up(), frame)))
        assert (acked, cum, bitmap) == (EPOCH, 1, 0)
        pivs.append(piv)
    # A fresh Partial IV for every ack: (ack key, nonce) never repeats.
    assert len(set(pivs)) == 3 and pivs == sorted(pivs)
    # The epoch record again, this time with its certificate by reference: same epoch.
    ingest.handle(up(), m.frame((K_EPOCH, 0, m.epoch_record(by_value=False))))
    assert ingest.store.execute("SELECT COUNT(*) FROM objects").fetchone()[0] == 2
    led = ledger(ingest)
    assert led["duplicates"] == 3 and led["epochs"][0]["duplicates"] == 3
    assert led["objects"] == 2 and led["rejected"] == 0


def test_gaps_are_named_and_acked_around(home, ingest):
    m = started(home, ingest)
    acks = ingest.handle(up(), m.frame(*[(K_RECORD, s, m.record(s)) for s in (1, 2, 5, 6, 9)]))
    # cum = 2 (0..2 here); bit i = seq cum + 2 + i (docs/wire-format.md §6): 5 -> bit 1,
    # 6 -> bit 2, 9 -> bit 5.
    assert m.open_ack(one_ack(acks))[1:] == (EPOCH, 2, 0b100110)
    led = ledger(ingest)
    e = led["epochs"][0]
    assert e["gaps"] == [[3, 4], [7, 8]] and e["missing"] == 4
    assert e["received"] == [[0, 2], [5, 6], [9, 9]]
    assert not led["complete"]
    ingest.handle(up(), m.frame(*[(K_RECORD, s, m.record(s)) for s in (3, 4, 7, 8)]))
    assert ledger(ingest)["complete"]


def test_checkpoints_verified_pending_and_mismatch(home, ingest):
    m = started(home, ingest)
    recs = {s: m.record(s) for s in range(1, 5)}
    cp = m.checkpoint(5, 1, recs)
    # The checkpoint first: pending until the records it covers are all here.
    ingest.handle(up(), m.frame((K_RECORD, 1, recs[1]), (K_CHECKPOINT, 5, cp)))
    assert ledger(ingest)["epochs"][0]["checkpoints"] == {"verified": 0, "pending": 1,
                                                          "mismatch": 0}
    ingest.handle(up(), m.frame(*[(K_RECORD, s, recs[s]) for s in (2, 3, 4)]))
    led = ledger(ingest)
    assert led["epochs"][0]["checkpoints"]["verified"] == 1
    assert {k: led["last_checkpoint"][k] for k in ("epoch", "seq", "first_seq", "count")} == {
        "epoch": EPOCH, "seq": 5, "first_seq": 1, "count": 4}
    # A checkpoint the module signed over bytes other than the ones stored: the server can
    # prove the stored record 6 is not what was sealed.
    r6 = m.record(6)
    ingest.handle(up(), m.frame((K_RECORD, 6, r6)))
    bad = m.checkpoint(7, 6, {6: m.record(6, rate=9999)})
    ingest.handle(up(), m.frame((K_CHECKPOINT, 7, bad)))
    led = ledger(ingest)
    assert led["checkpoint_mismatches"] == 1 and not led["complete"]
    assert led["rejects"] == {"checkpoint mismatch": 1}


def test_checkpoint_proves_sequence_numbers_never_sealed(home, ingest):
    m = started(home, ingest)
    recs = {s: m.record(s) for s in (1, 2, 4)}  # seq 3 consumed without a sealed object
    acks = ingest.handle(up(), m.frame(*[(K_RECORD, s, r) for s, r in recs.items()],
                                       (K_CHECKPOINT, 5, m.checkpoint(5, 1, recs))))
    assert m.open_ack(one_ack(acks))[1:] == (EPOCH, 5, 0)  # 0..5 all accounted for
    e = ledger(ingest)["epochs"][0]
    assert e["gaps"] == [] and e["never_sealed"] == [[3, 3]]
    assert ledger(ingest)["complete"]


def test_fragmented_epoch_record_out_of_order_with_duplicates(home, ingest):
    m = FakeModule(home, DEV)
    ep = m.new_epoch(by_value=True)
    assert len(ep) > 500
    cuts = list(range(0, len(ep), 120))
    frags = [(K_EPOCH, 0, ep[a:a + 120], len(ep), a) for a in cuts]
    random.Random(3).shuffle(frags)
    for f in frags[:-1] + frags[:2]:  # all but one, then two copies
        assert ingest.handle(up(), m.frame(f)) == []
    # A fragment contradicting what came before: refused, and the partial object dropped.
    a = frags[0][4]
    wrong = bytes(b ^ 0xFF for b in frags[0][2])
    ingest.handle(up(), m.frame((K_EPOCH, 0, wrong, len(ep), a)))
    assert ledger(ingest)["rejects"] == {"bad fragment": 1}
    # The module's retransmission (cut at another MTU) completes it.
    for a2 in range(0, len(ep), 200):
        acks = ingest.handle(up(), m.frame((K_EPOCH, 0, ep[a2:a2 + 200], len(ep), a2)))
    assert m.open_ack(one_ack(acks))[1:] == (EPOCH, 0, 0)
    assert ingest.store.get_object(DEV, EPOCH, 0) == ("epoch", ep)
    # Sent again whole: a duplicate.
    ingest.handle(up(), m.frame((K_EPOCH, 0, ep)))
    assert ledger(ingest)["duplicates"] == 1


def test_restart_keeps_keys_and_never_reuses_an_ack_nonce(home, clock):
    ing = Ingest(from_home(home), Store(db_url(home)), clock=clock)
    m = started(home, ing)
    piv1 = m.open_ack(one_ack(ing.handle(up(), m.frame((K_RECORD, 1, m.record(1))))))[0]
    ing.store.close()  # a crash: the lease is not released, its holder is gone
    ing = Ingest(from_home(home), Store(db_url(home)), clock=clock)  # keys from the db
    try:
        piv2, _, cum, _ = m.open_ack(one_ack(ing.handle(up(), m.frame((K_RECORD, 2,
                                                                      m.record(2))))))
        assert cum == 2 and piv2 > piv1
    finally:
        ing.close()


def test_acks_of_an_older_epoch_are_sealed_under_its_own_key(home, ingest):
    m = started(home, ingest, epoch=EPOCH)
    old_keys, old_epoch = m.keys, m.epoch
    ingest.handle(up(), m.frame((K_EPOCH, 0, m.new_epoch(EPOCH + 1))))  # reboot: new epoch
    # A record of the old epoch still in the outbox: acked under the OLD epoch's key
    # (contract E), which the module keeps while that epoch has objects in its outbox.
    acks = ingest.handle(up(), m.frame((K_RECORD, 1, vp.seal(
        cbor2.dumps({0: 1, 1: 1, -3: 5}), 1, old_keys.record_key, old_keys.record_iv,
        DEV.encode(), old_epoch)), epoch=old_epoch))
    ack = one_ack(acks)
    assert vp.parse_sealed(ack).kid == vp.kid_for(EPOCH)
    piv, pt = vp.open_sealed(ack, old_keys.ack_key, old_keys.ack_iv, DEV.encode(), EPOCH)
    assert cbor2.loads(pt) == [EPOCH, 1, 0]
    with pytest.raises(vp.VerifyError):
        m.open_ack(ack)  # not under the new epoch's key
    assert [e["epoch"] for e in ledger(ingest)["epochs"]] == [EPOCH + 1, EPOCH]


# --- untrusted input ---------------------------------------------------------------------


def test_malformed_uplinks_are_rejected_with_reasons_and_nothing_stops(home, ingest):
    m = started(home, ingest)
    other = FakeModule(home, DEV2)
    other.new_epoch(EPOCH)
    r1 = m.record(1)
    forged = bytearray(r1)
    forged[-1] ^= 1
    cases = [
        (up(), os.urandom(64), "bad frame"),
        (up(), cbor2.dumps({"kind": 1, "seq": 1}), "bad frame"),  # CBOR, not a frame
        (up(), b"", "bad frame"),
        (up(), m.frame((K_RECORD, 1, cbor2.dumps([1, 2, 3]))), "bad header"),  # CBOR object
        (up(), m.frame((K_RECORD, 1, cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"", b""])))),
         "bad header"),
        (up(), m.frame((K_RECORD, 1, bytes(forged))), "forged"),
        (up(), m.frame((K_RECORD, 1, r1), epoch=EPOCH - 5), "unknown epoch"),
        (up(), m.frame((K_RECORD, 7, r1)), "identity mismatch"),  # frame lies about seq
        (up(), m.frame((K_RECORD, 1, m.seal(1, b"\xa0", kid=True)), epoch=EPOCH + 1),
         "other epoch"),  # the kid names another epoch than the frame
        (up(), m.frame((K_RECORD, 1, bytes([0x21]) + r1[1:])), "bad header"),  # reserved bit
        (up(), m.frame((K_RECORD, 1, bytes([0x11]) + r1[1:])), "bad header"),  # kid context
        (up(), m.frame((K_RECORD, 1, bytes([0x02, 0x00]) + r1[1:])), "bad header"),  # piv 01
        (up(), m.frame((K_RECORD, 0, bytes([0x01, 0x00]) + r1[2:])), "bad header"),  # piv 0
        (up(), m.frame((99, 1, r1)), "unknown kind"),
        (up(), bytes(1025), "frame too long"),
        (up(), m.frame(*[(99, s, b"x") for s in range(65)]), "too many entries"),
        # Device 2's objects replayed as device 1's: the seals bind the device id.
        (up(), m.frame((K_RECORD, 1, other.record(1))), "forged"),
        (up(), m.frame((K_EPOCH, 0, other.epoch_record())), "wrong device"),
        ("serene/SRN-9999/up", m.frame((K_RECORD, 1, r1)), "unregistered device"),
        ("serene/+/up", m.frame((K_RECORD, 1, r1)), "bad topic"),
        ("serene/SRN-0001/down", m.frame((K_RECORD, 1, r1)), "bad topic"),
    ]
    for topic, payload, reason in cases:
        before = dict(ingest.store.execute("SELECT reason, COUNT(*) FROM rejects GROUP BY "
                                              "reason"))
        assert ingest.handle(topic, payload) == [], reason
        after = dict(ingest.store.execute("SELECT reason, COUNT(*) FROM rejects GROUP BY "
                                             "reason"))
        assert after.get(reason, 0) == before.get(reason, 0) + 1, (reason, after)
    # Nothing of it was stored; the genuine record still goes through.
    assert ingest.store.seqs(DEV, EPOCH) == [0]
    assert m.open_ack(one_ack(ingest.handle(up(), m.frame((K_RECORD, 1, r1)))))[1:] == (
        EPOCH, 1, 0)
    led = ledger(ingest)
    assert led["rejected"] == sum(1 for c in cases if c[0] == up())
    assert led["recent_rejects"][0]["reason"] == "wrong device"  # the newest first


def test_conflicting_authentic_object_is_refused_and_the_first_kept(home, ingest):
    m = started(home, ingest)
    first = m.record(1, rate=100)
    ingest.handle(up(), m.frame((K_RECORD, 1, first)))
    # The same identity sealed again over other content (a nonce reused by a faulty module).
    assert ingest.handle(up(), m.frame((K_RECORD, 1, m.record(1, rate=200)))) == []
    assert ingest.store.get_object(DEV, EPOCH, 1) == ("record", first)
    assert ledger(ingest)["rejects"] == {"conflict": 1}


def test_authentic_but_undecodable_record_is_kept_flagged_and_acked(home, ingest):
    m = started(home, ingest)
    sealed = m.seal(1, cbor2.dumps([1, 2]))  # valid CBOR, authentic, not a record
    acks = ingest.handle(up(), m.frame((K_RECORD, 1, sealed)))
    assert m.open_ack(one_ack(acks))[1:] == (EPOCH, 1, 0)
    (rec,) = ingest.store.records(DEV)
    assert rec["fields"] is None and "not a map" in rec["decode_error"]
    assert ledger(ingest)["epochs"][0]["undecodable"] == 1


def test_database_failure_is_an_internal_error_not_a_crash(home, ingest, monkeypatch):
    m = started(home, ingest)

    def boom(*a, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ingest.store, "add_object", boom)
    assert ingest.handle(up(), m.frame((K_RECORD, 1, m.record(1)))) == []
    monkeypatch.undo()
    assert ledger(ingest)["rejects"] == {"internal error": 1}
    assert one_ack(ingest.handle(up(), m.frame((K_RECORD, 1, m.record(1)))))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(payload=hs.one_of(
    hs.binary(max_size=300),
    # Well-formed frames of random entries: the frame parses, the objects must not.
    hs.lists(hs.tuples(hs.integers(0, 3), hs.integers(0, 2**20), hs.binary(min_size=1,
                                                                           max_size=80)),
             min_size=1, max_size=4).map(
        lambda es: linkframe.build(linkframe.Frame(EPOCH, tuple(
            linkframe.Entry(k, s, d, len(d)) for k, s, d in es))))))
def test_fuzzed_uplinks_never_stop_the_ingest(home_template, tmp_path_factory, payload):
    ing = _fuzz_ingest(home_template, tmp_path_factory)
    n = ing.store.execute("SELECT COUNT(*) FROM rejects").fetchone()[0]
    assert ing.handle(up(), payload) == []
    assert ing.store.execute("SELECT COUNT(*) FROM rejects").fetchone()[0] > n
    assert ing.store.seqs(DEV, EPOCH) == [0]


_FUZZ = {}


def _fuzz_ingest(home_template, tmp_path_factory):
    key = os.environ.get("SERENE_DB", "sqlite")  # one ingest per backend (and database)
    if _FUZZ.get("key") != key:
        _FUZZ.clear()
        _FUZZ["key"] = key
    if "ing" not in _FUZZ:
        import shutil

        home = tmp_path_factory.mktemp("fuzz") / "home"
        shutil.copytree(home_template, home)
        ing = Ingest(from_home(home), Store(db_url(home)))
        started(home, ing)
        _FUZZ["ing"] = ing
    return _FUZZ["ing"]


@settings(max_examples=300, deadline=None)
@given(seqs=hs.sets(hs.integers(1, 200), max_size=120), batches=hs.integers(1, 6),
       seed=hs.integers(0, 2**32))
def test_incremental_ack_state_agrees_with_ack_from_seqs(seqs, batches, seed):
    from serene.server.ingest import AckState

    order = sorted(seqs | {0})
    random.Random(seed).shuffle(order)
    state = AckState()
    for i in range(batches):
        state.add(order[i::batches])
    assert state.ack() == vp.ack_from_seqs(seqs | {0})


def test_process_batches_and_a_failing_frame_loses_only_itself(home, ingest, monkeypatch):
    """process() writes without committing; one frame's unexpected error rolls back that
    frame only (a savepoint), the rest of the batch commits with commit()."""
    m = started(home, ingest)
    acks1 = ingest.process(up(), m.frame((K_RECORD, 1, m.record(1))))
    real = ingest.store.add_object
    calls = []

    def boom(*a, **kw):
        calls.append(a)
        real(*a, **kw)  # the write happens, then the frame fails: it must be rolled back
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ingest.store, "add_object", boom)
    assert ingest.process(up(), m.frame((K_RECORD, 2, m.record(2)))) == []
    monkeypatch.undo()
    acks3 = ingest.process(up(), m.frame((K_RECORD, 3, m.record(3))))
    ingest.refuse(DEV, "queue full", 300)
    # Nothing is durable before commit(): another connection sees only the epoch record.
    other = Store(db_url(home), readonly=True)
    assert [s for (s,) in other.execute("SELECT seq FROM objects")] == [0]
    ingest.commit()
    assert sorted(s for (s,) in other.execute("SELECT seq FROM objects")) == [0, 1, 3]
    other.close()
    assert calls and m.open_ack(one_ack(acks1))[1:] == (EPOCH, 1, 0)
    assert m.open_ack(one_ack(acks3))[1:][:2] == (EPOCH, 1)
    led = ledger(ingest)
    assert led["rejects"] == {"internal error": 1, "queue full": 1}


def test_a_failed_commit_forgets_the_batch_so_no_later_ack_covers_it(home, ingest):
    m = started(home, ingest)
    acks = ingest.process(up(), m.frame((K_RECORD, 1, m.record(1))))
    assert m.open_ack(one_ack(acks))[1:] == (EPOCH, 1, 0)  # never published: commit fails

    class Boom(Exception):
        pass

    real = ingest.store.conn
    ingest.store.conn = type("Conn", (), {  # a connection whose commit fails (disk full)
        "commit": lambda self: (_ for _ in ()).throw(Boom()),
        "rollback": lambda self: real.rollback(),
        "execute": lambda self, *a, **k: real.execute(*a, **k),
        "begin_nested": lambda self: real.begin_nested(),
        "begin": lambda self: real.begin(),
        "connection": property(lambda self: real.connection),
        "in_transaction": lambda self: real.in_transaction()})()
    with pytest.raises(Boom):
        ingest.commit()
    ingest.store.conn = real
    assert ingest.store.seqs(DEV, EPOCH) == [0]
    # The next frame's ack does not claim record 1.
    acks = ingest.handle(up(), m.frame((K_RECORD, 2, m.record(2))))
    assert m.open_ack(one_ack(acks))[1:] == (EPOCH, 0, 0b1)
