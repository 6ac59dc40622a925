"""Ack nonces (issue 8 item 8, contract E): PIV = (tick << 4) | worker_id, persisted per
(device, epoch, worker) before the ack leaves, deferred to the next tick rather than reused.
A restored backup and two workers on one database never reuse a (key, PIV) pair; a worker id
collision is refused at start."""

import collections
import shutil
import sqlite3

import pytest

from serene.server.ingest import Ingest, WorkerIdInUse
from serene.server.store import Store, db_path, db_url
from serene.verifier import from_home
from test_server import (DEV, EPOCH, K_RECORD, Clock, FakeModule, home, home_template,  # noqa: F401
                         one_ack, started, up)

pytestmark = pytest.mark.usefixtures("database")  # SQLite and PostgreSQL


def make(home, clock, worker_id=0):
    return Ingest(from_home(home), Store(db_url(home)), clock=clock, worker_id=worker_id)


def test_a_restored_backup_never_reuses_an_ack_nonce(home, tmp_path, database):
    clock = Clock()
    seen = collections.Counter()  # (epoch, piv) of every ack, across the whole test
    ing = make(home, clock)
    m = started(home, ing)

    def ack(ing, seq):
        piv, acked, cum, _ = m.open_ack(one_ack(ing.handle(up(), m.frame(
            (K_RECORD, seq, m.record(seq))))))
        seen[(acked, piv)] += 1
        return piv

    for s in range(1, 6):
        ack(ing, s)
    # an online backup, as an operator would take it (SQLite's backup API; pg_dump)
    backup = tmp_path / "backup.sqlite3"
    if database.is_pg:
        database.cluster.backup(database.dbname, backup)
    else:
        dst = sqlite3.connect(backup)
        ing.store.conn.connection.dbapi_connection.backup(dst)
        dst.close()
    after_backup = [ack(ing, s) for s in range(6, 12)]  # acks the backup knows nothing of
    ing.close()
    if database.is_pg:
        database.cluster.restore(backup, database.dbname)
    else:
        path = db_path(home)
        for suffix in ("-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        shutil.copy(backup, path)  # restore
    ing = make(home, clock)  # restart on the restored database
    try:
        # The restored database forgot seqs 6..11 and the PIVs of their acks: the module
        # resends them; every new PIV is above every PIV used before the restore.
        restored = [ack(ing, s) for s in range(6, 12)] + [ack(ing, 1)]
        assert min(restored) > max(after_backup)
    finally:
        ing.close()
    assert len(seen) == 18 and set(seen.values()) == {1}, "a (key, PIV) pair was reused"


def test_two_workers_on_one_database_never_share_a_nonce(home):
    clock = Clock(step=0)  # both workers read the SAME tick: only the worker bits differ
    a, b = make(home, clock, worker_id=1), make(home, clock, worker_id=2)
    seen = collections.Counter()
    try:
        m = started(home, a)
        for s in range(1, 21):
            for ing in (a, b):
                acks = ing.handle(up(), m.frame((K_RECORD, s, m.record(s))))
                if not acks:  # this worker already acked this epoch in this tick: deferred
                    assert ing.due_acks(clock.t) == []  # not before the next tick
                    clock.t += 0.01
                    acks = ing.due_acks(clock.t)
                    ing.commit()
                piv, acked, _, _ = m.open_ack(one_ack(acks))
                assert piv & 0xF == ing.worker_id
                seen[(acked, piv)] += 1
            clock.t += 0.004
    finally:
        a.close()
        b.close()
    assert len(seen) == 40 and set(seen.values()) == {1}


def test_an_ack_is_deferred_to_the_next_tick_not_sealed_with_a_used_nonce(home):
    clock = Clock(step=0)
    ing = make(home, clock)
    try:
        m = started(home, ing)
        clock.t += 0.01
        first = m.open_ack(one_ack(ing.handle(up(), m.frame((K_RECORD, 1, m.record(1))))))
        # Same 10 ms tick: the ack of record 2 waits (acks are cumulative: nothing lost).
        assert ing.handle(up(), m.frame((K_RECORD, 2, m.record(2)))) == []
        assert ing.handle(up(), m.frame((K_RECORD, 3, m.record(3)))) == []
        assert ing.due_acks() == []
        clock.t += 0.01
        acks = ing.due_acks()
        ing.commit()
        piv, _, cum, _ = m.open_ack(one_ack(acks))
        assert cum == 3 and piv > first[0] and (piv >> 4) == (first[0] >> 4) + 1
        assert ing.due_acks() == []  # once
    finally:
        ing.close()


def test_a_worker_id_collision_is_refused_at_start(home):
    clock = Clock()
    a = make(home, clock, worker_id=3)
    with pytest.raises(WorkerIdInUse, match="worker id 3 is held by another running ingest"):
        make(home, clock, worker_id=3)
    other = make(home, clock, worker_id=4)  # another id is fine
    other.close()
    a.close()  # a clean stop releases the lease
    b = make(home, clock, worker_id=3)
    b.close()


def test_a_stalled_worker_whose_lease_was_taken_cannot_commit_acks(home):
    clock = Clock()
    a = make(home, clock, worker_id=5)
    m = started(home, a)
    clock.t += 60  # a stalls past its lease; an operator starts another worker 5
    b = make(home, clock, worker_id=5)
    try:
        acks = a.process(up(), m.frame((K_RECORD, 1, m.record(1))))
        assert acks  # sealed, but must never be published:
        with pytest.raises(WorkerIdInUse, match="taken over"):
            a.commit()
        assert b.store.seqs(DEV, EPOCH) == [0]  # a's batch was rolled back
        assert m.open_ack(one_ack(b.handle(up(), m.frame((K_RECORD, 1, m.record(1))))))
    finally:
        b.close()
        a.store.close()


def test_a_crashed_worker_is_replaced_at_once(home):
    clock = Clock()
    a = make(home, clock, worker_id=6)
    a.store.close()  # killed: its lease is still in the database, its holder is gone
    b = make(home, clock, worker_id=6)
    b.close()
