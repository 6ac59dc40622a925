"""The at-rest audit (serene report --audit) closes the chain (issue 8 item 6): a deleted
record at the end of an epoch, a deleted checkpoint, a swapped pair of records, a stored
record whose kid was added, a deleted closing checkpoint: each is named."""

import pytest

from serene.server import audit
from serene.server.ingest import Ingest
from serene.server.store import Store, db_url
from serene.verifier import from_home
from test_server import (DEV, EPOCH, K_CHECKPOINT, K_EPOCH, K_RECORD, Clock,  # noqa: F401
                         FakeModule, home, home_template, one_ack, up)
from test_ingest_proof import with_kid

pytestmark = pytest.mark.usefixtures("database")  # SQLite and PostgreSQL


@pytest.fixture
def chained(home):
    """Two epochs of DEV: epoch E with records 1..3, checkpoint 4, records 5..7 and closing
    checkpoint 8; epoch E+1 naming it, records 1..2 and checkpoint 3."""
    ing = Ingest(from_home(home), Store(db_url(home)), clock=Clock())
    m = FakeModule(home, DEV)
    ing.handle(up(), m.frame((K_EPOCH, 0, m.new_epoch(EPOCH))))
    r = {s: m.record(s) for s in (1, 2, 3, 5, 6, 7)}
    cp4 = m.checkpoint(4, 1, {s: r[s] for s in (1, 2, 3)})
    cp8 = m.checkpoint(8, 5, {s: r[s] for s in (5, 6, 7)}, close=True)
    ing.handle(up(), m.frame(*[(K_RECORD, s, r[s]) for s in (1, 2, 3)], (K_CHECKPOINT, 4, cp4),
                             *[(K_RECORD, s, r[s]) for s in (5, 6, 7)], (K_CHECKPOINT, 8, cp8)))
    ing.handle(up(), m.frame((K_EPOCH, 0, m.new_epoch(EPOCH + 1))))
    r2 = {s: m.record(s) for s in (1, 2)}
    ing.handle(up(), m.frame(*[(K_RECORD, s, r2[s]) for s in (1, 2)],
                             (K_CHECKPOINT, 3, m.checkpoint(3, 1, r2))))
    led = ing.store.device_ledger(DEV)
    assert led["complete"] and [e["tail"] for e in led["epochs"]] == ["open", "closed"]
    ing.close()
    res = audit.audit(home)
    assert res["ok"], res["problems"]
    assert (res["epochs"], res["objects"], res["checkpoints"]) == (2, 13, 3)
    return home


def tamper(home, *sql):
    db = Store(db_url(home))
    for q in sql:
        db.execute(*q) if isinstance(q, tuple) else db.execute(q)
    db.commit()
    db.close()
    return audit.audit(home)


def problems(res):
    return [(p["epoch"], p["seq"], p["problem"]) for p in res["problems"]]


def test_a_deleted_record_at_the_end_of_an_epoch(chained):
    res = tamper(chained, ("DELETE FROM objects WHERE epoch=? AND seq=7", (EPOCH,)))
    assert not res["ok"]
    assert (EPOCH, 8, "checkpoint over 5-7: 2 stored objects, 3 signed") in problems(res), \
        problems(res)


def test_a_deleted_checkpoint(chained):
    res = tamper(chained, ("DELETE FROM objects WHERE epoch=? AND seq=4", (EPOCH,)),
                 ("DELETE FROM checkpoints WHERE epoch=? AND seq=4", (EPOCH,)))
    assert any(e == EPOCH and s == 8 and "a checkpoint covering 1-3 is missing" in p
               for e, s, p in problems(res)), problems(res)


def test_a_deleted_closing_checkpoint(chained):
    res = tamper(chained, ("DELETE FROM objects WHERE epoch=? AND seq=8", (EPOCH,)),
                 ("DELETE FROM checkpoints WHERE epoch=? AND seq=8", (EPOCH,)))
    assert any(e == EPOCH and s == 8 and "names closing checkpoint 8" in p
               for e, s, p in problems(res)), problems(res)


def test_a_deleted_closing_checkpoint_and_the_records_before_it(chained):
    res = tamper(chained, ("DELETE FROM objects WHERE epoch=? AND seq>=5", (EPOCH,)),
                 ("DELETE FROM checkpoints WHERE epoch=? AND seq=8", (EPOCH,)))
    assert any("names closing checkpoint 8" in p for _, _, p in problems(res))


def test_a_swapped_pair_of_records(chained):
    db = Store(db_url(chained), readonly=True)
    a, b = (bytes(db.execute("SELECT sealed FROM objects WHERE epoch=? AND seq=?",
                             (EPOCH, s)).fetchone()[0]) for s in (2, 3))
    db.close()
    res = tamper(chained, ("UPDATE objects SET sealed=? WHERE epoch=? AND seq=2", (b, EPOCH)),
                 ("UPDATE objects SET sealed=? WHERE epoch=? AND seq=3", (a, EPOCH)))
    got = problems(res)
    assert (EPOCH, 2, "stored as %d/2, sealed as %d/3" % (EPOCH, EPOCH)) in got, got
    assert any(s == 4 and "do not hash to the chain" in p for _, s, p in got), got


def test_a_stored_record_whose_kid_was_added(chained):
    db = Store(db_url(chained), readonly=True)
    a = bytes(db.execute("SELECT sealed FROM objects WHERE epoch=? AND seq=5",
                         (EPOCH,)).fetchone()[0])
    db.close()
    res = tamper(chained, ("UPDATE objects SET sealed=? WHERE epoch=? AND seq=5",
                           (with_kid(a, EPOCH), EPOCH)))
    got = problems(res)
    assert any(s == 5 and "not canonical" in p for _, s, p in got), got
    assert any(s == 8 and "do not hash to the chain" in p for _, s, p in got), got


def test_the_last_checkpoint_deleted_from_the_objects_is_named(chained):
    # The newest epoch's last checkpoint: no later signed object names it, but the ingest
    # recorded it.
    res = tamper(chained, ("DELETE FROM objects WHERE epoch=? AND seq=3", (EPOCH + 1,)))
    assert any(e == EPOCH + 1 and s == 3 and "recorded at ingest is not stored" in p
               for e, s, p in problems(res)), problems(res)
