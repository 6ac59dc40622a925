"""The proof has no holes (issue 8 items 4, 5, 6; contracts A-F), at the ingest: canonical
form, kind from authenticated content, v2 checkpoint links and closed epochs, epoch
acceptance, ranges at seq 2**32-2, acks_failing, the per-device work budget."""

import time
import tracemalloc

import cbor2
import pytest

from serene.server import report
from serene.server.ingest import Ingest
from serene.server.store import Store, db_url
from serene.verifier import from_home
from serene.verifier import protocol as vp
from test_server import (DEV, EPOCH, K_CHECKPOINT, K_EPOCH, K_EVENT, K_RECORD, Clock,  # noqa: F401
                         FakeModule, clock, home, home_template, ingest, ledger, one_ack,
                         started, up)

pytestmark = pytest.mark.usefixtures("database")  # SQLite and PostgreSQL


def with_kid(sealed, epoch):
    """The kid form of a canonical sealed object (what a path could turn it into)."""
    n = sealed[0] & 7
    return bytes([sealed[0] | 0x08]) + sealed[1:1 + n] + vp.kid_for(epoch) + sealed[1 + n:]


def test_a_kid_added_on_the_wire_changes_nothing_stored(home, ingest):
    m = started(home, ingest)
    recs = {s: m.record(s) for s in (1, 2)}
    kid1 = with_kid(recs[1], EPOCH)
    assert kid1 != recs[1] and len(kid1) == len(recs[1]) + 4
    assert m.open_ack(one_ack(ingest.handle(up(), m.frame((K_RECORD, 1, kid1)))))[1:] == (
        EPOCH, 1, 0)
    assert ingest.store.get_object(DEV, EPOCH, 1) == ("record", recs[1])  # canonical
    # The genuine copy is a duplicate, not a "conflict"; the checkpoint over the canonical
    # bytes verifies.
    ingest.handle(up(), m.frame((K_RECORD, 1, recs[1]), (K_RECORD, 2, with_kid(recs[2],
                                                                               EPOCH))))
    ingest.handle(up(), m.frame((K_CHECKPOINT, 3, m.checkpoint(3, 1, recs))))
    led = ledger(ingest)
    assert led["rejects"] == {} and led["duplicates"] == 1
    assert led["epochs"][0]["checkpoints"]["verified"] == 1 and led["complete"]


def test_the_stored_kind_comes_from_the_authenticated_object(home, ingest):
    m = started(home, ingest)
    r1, r2, r3 = m.record(1), m.record(2), m.record(3)
    # Relabelled as a checkpoint, an epoch record, a module event: stored as what it is.
    ingest.handle(up(), m.frame((K_CHECKPOINT, 1, r1), (K_EPOCH, 2, r2), (K_EVENT, 3, r3)))
    rows = ingest.store.execute("SELECT seq, kind, fields FROM objects WHERE seq > 0 "
                                   "ORDER BY seq").fetchall()
    assert [(s, k) for s, k, _ in rows] == [(1, "record"), (2, "record"), (3, "record")]
    assert all('"status"' in f for _, _, f in rows)
    cp = m.checkpoint(4, 1, {1: r1, 2: r2, 3: r3})
    ingest.handle(up(), m.frame((K_RECORD, 4, cp)))  # a checkpoint hinted as a record
    assert ingest.store.get_object(DEV, EPOCH, 4)[0] == "checkpoint"
    led = ledger(ingest)
    assert led["counters"]["kind hint mismatch"] == 3  # kind 3 is a sealed record: no mismatch
    assert led["rejects"] == {} and led["complete"]


def test_checkpoints_link_up_and_a_broken_link_is_named(home, ingest):
    m = started(home, ingest)
    recs = {s: m.record(s) for s in range(1, 8)}
    cp4 = m.checkpoint(4, 1, {s: recs[s] for s in (1, 2, 3)})
    cp8 = m.checkpoint(8, 5, {s: recs[s] for s in (5, 6, 7)})
    # The second checkpoint first: its link waits for the one it names.
    ingest.handle(up(), m.frame(*[(K_RECORD, s, recs[s]) for s in range(5, 8)],
                                (K_CHECKPOINT, 8, cp8)))
    assert ingest.store.checkpoint(DEV, EPOCH, 8)["link"] == "pending"
    ingest.handle(up(), m.frame(*[(K_RECORD, s, recs[s]) for s in range(1, 4)],
                                (K_CHECKPOINT, 4, cp4)))
    assert [ingest.store.checkpoint(DEV, EPOCH, s)["link"] for s in (4, 8)] == ["ok", "ok"]
    assert ledger(ingest)["complete"]
    # A checkpoint whose prev names something else than the checkpoint before it.
    r9 = m.record(9)
    bad = m.checkpoint(10, 9, {9: r9}, prev=bytes(32))
    ingest.handle(up(), m.frame((K_RECORD, 9, r9), (K_CHECKPOINT, 10, bad)))
    led = ledger(ingest)
    assert ingest.store.checkpoint(DEV, EPOCH, 10)["link"] == "broken"
    assert led["rejects"] == {"checkpoint link broken": 1}
    assert led["checkpoint_links_broken"] == 1 and not led["complete"]


def test_a_v1_checkpoint_is_refused(home, ingest):
    m = started(home, ingest)
    r1 = m.record(1)
    v1 = m._sign(cbor2.dumps([2, DEV.encode(), EPOCH, 2, 1, 1, vp.chain_hash([(1, r1)])]), {})
    ingest.handle(up(), m.frame((K_RECORD, 1, r1), (K_CHECKPOINT, 2, v1)))
    assert ledger(ingest)["rejects"] == {"bad payload": 1}


def close_epoch(ing, m, n):
    """Records 1..n of m's epoch, then its closing checkpoint at n + 1."""
    recs = {s: m.record(s) for s in range(1, n + 1)}
    cp = m.checkpoint(n + 1, 1, recs, close=True)
    ing.handle(up(), m.frame(*[(K_RECORD, s, r) for s, r in recs.items()]))
    return recs, cp


def test_an_epoch_is_closed_once_the_next_record_names_its_verified_closing_checkpoint(
        home, ingest):
    m = started(home, ingest)
    recs, closing = close_epoch(ingest, m, 3)
    e = ledger(ingest)["epochs"][0]
    assert e["tail"] == "open" and not e["closed"]
    # The module reboots: the new epoch's record names the closing checkpoint, which has
    # not arrived yet: the old epoch's end is known, so its missing tail is a gap.
    ingest.handle(up(), m.frame((K_EPOCH, 0, m.new_epoch(EPOCH + 1))))
    led = ledger(ingest)
    old = [e for e in led["epochs"] if e["epoch"] == EPOCH][0]
    assert old["tail"] == "closing checkpoint missing" and old["gaps"] == [[4, 4]]
    assert led["epochs_not_closed"] == [EPOCH] and not led["complete"]
    ingest.handle(up(), m.frame((K_CHECKPOINT, 4, closing), epoch=EPOCH))
    led = ledger(ingest)
    old = [e for e in led["epochs"] if e["epoch"] == EPOCH][0]
    assert old["tail"] == "closed" and old["closed"] and old["gaps"] == []
    assert led["complete"]
    assert [e["tail"] for e in led["epochs"]] == ["open", "closed"]  # newest first


def test_epoch_acceptance_step_and_late_older_epochs(home, ingest):
    m = started(home, ingest)  # EPOCH = the registry's first_epoch here
    _, closing = close_epoch(ingest, m, 2)
    ingest.handle(up(), m.frame((K_CHECKPOINT, 3, closing)))
    # A forged-looking jump (the 4294967295): refused before any key is derived.
    far = FakeModule(home, DEV)
    for n in (EPOCH + 1001, 4294967295, EPOCH - 1):
        far.closed = None
        ingest.handle(up(), far.frame((K_EPOCH, 0, far.new_epoch(n)), epoch=n))
    assert ledger(ingest)["rejects"] == {"epoch out of range": 3}
    assert (DEV, 4294967295) not in ingest.v.epochs
    # Within the step: accepted; an older epoch arriving late is accepted only if a verified
    # epoch record names it as its prev.
    e5 = FakeModule(home, DEV)
    e5.closed = [EPOCH + 3, 1, bytes(32)]
    ingest.handle(up(), e5.frame((K_EPOCH, 0, e5.new_epoch(EPOCH + 1000)),
                                 epoch=EPOCH + 1000))
    late = FakeModule(home, DEV)
    late.closed = None
    for n in (EPOCH + 3, EPOCH + 2):
        ingest.handle(up(), late.frame((K_EPOCH, 0, late.new_epoch(n)), epoch=n))
    assert (DEV, EPOCH + 1000) in ingest.v.epochs and (DEV, EPOCH + 3) in ingest.v.epochs
    assert (DEV, EPOCH + 2) not in ingest.v.epochs
    assert ledger(ingest)["rejects"] == {"epoch out of range": 4}


def test_an_epoch_record_with_a_bad_signature_is_cheap_and_budgeted(home, clock, monkeypatch):
    """A device sending bad-signature epoch records is cut to a few verifications a second;
    a genuine module draining a 10,000-record backlog at 1,500 records/s with a checkpoint
    every 32 never meets the budget."""
    ing = Ingest(from_home(home), Store(db_url(home)), clock=clock)
    calls = []
    real = vp.verify_signed
    monkeypatch.setattr(vp, "verify_signed", lambda *a: (calls.append(1), real(*a))[1])
    try:
        m = started(home, ing)
        bad = bytearray(m.new_epoch(EPOCH + 1, by_value=False))
        bad[-1] ^= 1
        frame = m.frame(*[(K_EPOCH, 0, bytes(bad))] * 7, epoch=EPOCH + 1)
        assert len(frame) <= 1024
        clock.step = 0
        calls.clear()
        for _ in range(10_000):  # 10 s of a hostile device at 1,000 frames/s
            clock.t += 0.001
            ing.process(up(), frame)
        ing.commit()
        # burst 20,000 / 1,020 ~ 20, then 5,000 / 1,020 ~ 5 a second
        assert len(calls) < 20 + 10 * 5 + 7, len(calls)
        led = ledger(ing)
        assert led["rejects"]["work budget"] > 9000 and led["rejects"]["bad signature"] == \
            len(calls)
    finally:
        ing.close()


def test_a_genuine_backlog_never_meets_the_work_budget(home, clock):
    ing = Ingest(from_home(home), Store(db_url(home)), clock=clock)
    try:
        m = FakeModule(home, DEV)
        clock.step = 0
        ing.handle(up(), m.frame((K_EPOCH, 0, m.new_epoch())))
        seq, pending, objs = 1, {}, []
        while seq <= 10_000:
            r = m.record(seq)
            pending[seq] = r
            objs.append((K_RECORD, seq, r))
            seq += 1
            if len(pending) == 32:
                objs.append((K_CHECKPOINT, seq, m.checkpoint(seq, seq - 32, pending)))
                pending = {}
                seq += 1
        t0 = clock.t
        for i in range(0, len(objs), 20):  # 20 objects a frame, 1,500 records/s
            clock.t = t0 + (i + 20) / 1500
            ing.process(up(), m.frame(*objs[i:i + 20]))
            if i % 200 == 0:
                ing.commit()
        ing.commit()
        led = ledger(ing)
        assert led["rejects"] == {} and led["complete"]
        n_cp = sum(1 for o in objs if o[0] == K_CHECKPOINT)
        assert led["epochs"][0]["checkpoints"]["verified"] == n_cp > 300
    finally:
        ing.close()


SEQ_MAX = 2**32 - 2


def test_an_authentic_object_at_seq_2_32_minus_2_costs_ranges_not_seqs(home, ingest):
    m = started(home, ingest)
    far = m.record(SEQ_MAX)
    tracemalloc.start()
    t0 = time.perf_counter()
    acks = ingest.handle(up(), m.frame((K_RECORD, SEQ_MAX, far)))
    led = ledger(ingest)
    text = report.table({DEV: led})
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert m.open_ack(one_ack(acks))[1:] == (EPOCH, 0, 0)
    e = led["epochs"][0]
    assert e["received"] == [[0, 0], [SEQ_MAX, SEQ_MAX]] and e["gaps"] == [[1, SEQ_MAX - 1]]
    assert e["missing"] == SEQ_MAX - 1 and "1-4294967293" in text
    assert elapsed < 0.5 and peak < 2_000_000, (elapsed, peak)
    # A checkpoint spanning the whole epoch proves the rest was never sealed.
    cp = m.checkpoint(SEQ_MAX + 1, 1, {SEQ_MAX: far})
    acks = ingest.handle(up(), m.frame((K_CHECKPOINT, SEQ_MAX + 1, cp)))
    assert m.open_ack(one_ack(acks))[1:] == (EPOCH, SEQ_MAX + 1, 0)
    led = ledger(ingest)
    assert led["epochs"][0]["never_sealed"] == [[1, SEQ_MAX - 1]] and led["complete"]


def test_acks_that_keep_failing_show_in_the_ledger_never_complete(home, ingest, clock):
    m = started(home, ingest)
    frame = m.frame((K_RECORD, 1, m.record(1)))
    ingest.handle(up(), frame)
    assert ledger(ingest)["complete"]
    # The module never takes our acks (they do not open there): it resends what we acked.
    for _ in range(3):
        clock.t += 10
        ingest.handle(up(), frame)
    led = ledger(ingest)
    assert led["acks_failing"] and not led["complete"]
    assert led["acks_failing"]["seq"] == 1 and led["acks_failing"]["copies"] == 3
    assert "ACKS FAILING" in report.table({DEV: led})
    # A retransmission soon after an ack (a lost ack) is not evidence.
    clean = FakeModule(home, "SRN-0002")
    ingest.handle(up("SRN-0002"), clean.frame((K_EPOCH, 0, clean.new_epoch())))
    f2 = clean.frame((K_RECORD, 1, clean.record(1)))
    for _ in range(5):
        ingest.handle(up("SRN-0002"), f2)
    assert ledger(ingest, "SRN-0002")["acks_failing"] is None
    # Acks work again: new objects, no stale copy for a minute.
    for s in range(2, 6):
        clock.t += 20
        ingest.handle(up(), m.frame((K_RECORD, s, m.record(s))))
    led = ledger(ingest)
    assert led["acks_failing"] is None and led["complete"]


def test_a_health_record_reporting_rejected_acks_marks_the_device(home, ingest, clock):
    m = started(home, ingest)
    # Health code 13 is the firmware's ACKS_REJECTED (firmware/health.py), cumulative.
    def health(seq, rejected):
        return m.seal(seq, cbor2.dumps({0: 6, 1: seq, -3: 5, 14: 2,
                                        18: {7: 10, 13: rejected}}))

    ingest.handle(up(), m.frame((K_RECORD, 1, health(1, 0))))
    assert ledger(ingest)["acks_failing"] is None
    ingest.handle(up(), m.frame((K_RECORD, 2, health(2, 4))))
    led = ledger(ingest)
    assert led["acks_failing"]["acks_rejected"] == 4 and not led["complete"]
    # The same cumulative count again is no new evidence: acks work again, it clears.
    for s in range(3, 6):
        clock.t += 25
        ingest.handle(up(), m.frame((K_RECORD, s, health(s, 4) if s == 3 else m.record(s))))
    led = ledger(ingest)
    assert led["acks_failing"] is None and led["complete"], led["acks_failing"]


def test_the_fast_signature_check_agrees_with_pycose(home):
    m = FakeModule(home, DEV)
    rec = m.new_epoch()
    pub = m.key.public_key()
    for obj, ok in ((rec, True), (rec[:-1] + bytes([rec[-1] ^ 1]), False),
                    (rec.replace(DEV.encode(), b"SRN-0009"), False)):
        s = vp.parse_signed(obj)
        results = []
        for check in (vp.verify_signed, vp.verify_signed_pycose):
            try:
                check(s, pub)
                results.append(True)
            except vp.VerifyError as e:
                assert e.reason == "bad signature"
                results.append(False)
        assert results == [ok, ok]
