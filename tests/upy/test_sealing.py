# The sealing side's chain of proof and ack keys (issue 8 protocol note, sections C, D, E),
# with a fake secure element (tests/upy/sealing_util.py): every sealed object is in the
# checkpoint chain (the overflow event too), checkpoints tile the epoch and link to the signed
# object before them, an epoch is closed at rotation and at shutdown, and after a power cut the
# next boot checkpoints the open tail from the outbox; the ack keys of previous epochs come
# back from their envelopes after a reboot, and the plain key is on no file.
# A "power cut" here drops every object and builds them again over the same files: that is
# all a reboot keeps. (SIGKILL of the whole firmware is in tests/test_firmware_chain.py.)
import hashlib
import os

from firmware import cbor
from firmware import health as H
from firmware.ack import AckError
from firmware.outbox import KIND_CHECKPOINT, KIND_EPOCH
from firmware.seal import Sealer
from outbox_util import rmtree, tmpdir
from sealing_util import DEV, FakeSE, Module, chain

K_EVENT = 3


def _payload(data):
    return cbor.decode(data).value[2]


def check_log(entries, closed=()):
    """Checks every epoch in the log (entries in log order, nothing reclaimed): the first
    signed object is the epoch record; every checkpoint tiles (first_seq = previous seq + 1),
    links (prev = SHA-256 of the previous signed payload) and its chain and count are those of
    the stored sealed objects in its range. Epochs in `closed` must end with a checkpoint.
    Returns {epoch: [(seq, payload list, payload bytes)] of its checkpoints}."""
    out = {}
    by_epoch = {}
    for kind, e, s, data in entries:
        by_epoch.setdefault(e, []).append((kind, s, data))
    for e, objs in by_epoch.items():
        kind, s, data = objs[0]
        assert kind == KIND_EPOCH and s == 0, (e, kind, s)
        prev_raw = _payload(data)
        prev_seq = 0
        sealed = []
        cps = out[e] = []
        for kind, s, data in objs[1:]:
            if kind == KIND_CHECKPOINT:
                raw = _payload(data)
                p = cbor.decode(raw)
                assert p[0] == 2 and p[1] == DEV.encode() and p[2] == e and p[3] == s, p
                assert p[4] == prev_seq + 1, ("tiling", e, s, p[4], prev_seq)
                assert p[7] == hashlib.sha256(prev_raw).digest(), ("link", e, s)
                assert p[5] == len(sealed) and p[6] == chain(sealed), ("chain", e, s)
                cps.append((s, p, raw))
                prev_raw, prev_seq, sealed = raw, s, []
            else:
                sealed.append((s, data))
        if e in closed:
            assert objs[-1][0] == KIND_CHECKPOINT, ("not closed", e)
    return out


def _end_of(entries, number):
    """(end_seq, end_hash) of epoch `number`'s last checkpoint."""
    last = [x for x in entries if x[1] == number and x[0] == KIND_CHECKPOINT][-1]
    return last[2], hashlib.sha256(_payload(last[3])).digest()


def _epoch_prev(entries, number):
    rec = [x for x in entries if x[1] == number and x[0] == KIND_EPOCH][0]
    return cbor.decode(_payload(rec[3]))[5]


def _ack_all(m):
    ob = m.outbox
    for e in set(x[1] for x in m.entries()):
        top = max(x[2] for x in m.entries() if x[1] == e)
        ob.mark_acked(e, top)
    ob.commit()


async def test_overflow_event_is_in_the_chain():
    d = tmpdir("seal-ov")
    try:
        m = Module(d, FakeSE(), capacity=2048, every_n=1000, segment=1024)
        e1 = (await m.boot()).number
        while not m.health.counters.get(H.RECORDS_LOST):
            await m.record()
        before = m.entries()  # nothing acked: the whole epoch is there
        events = [x for x in before if x[0] == K_EVENT]
        assert events, "no records_lost event stored"
        # The full outbox made a checkpoint at once (it may use the reserve, so the pin moves)
        # and the event is in its chain: check_log recomputes every chain.
        cps = check_log(before)[e1]
        assert [c for c in cps if c[1][4] <= events[0][2] < c[0]], "event not covered"
        _ack_all(m)  # room again: only what the pin holds stays
        await m.record()
        assert await m.sink.close()
        after = m.entries()
        last_cp = cps[-1]
        close = [x for x in after if x[0] == KIND_CHECKPOINT][-1]
        p = cbor.decode(_payload(close[3]))
        assert p[4] == last_cp[0] + 1 and p[7] == hashlib.sha256(last_cp[2]).digest()
        inside = [(x[2], x[3]) for x in after if x[0] in (1, K_EVENT) and p[4] <= x[2] < p[3]]
        assert p[5] == len(inside) and p[6] == chain(inside)
    finally:
        rmtree(d)


async def test_checkpoints_tile_link_and_close_at_rotation_and_shutdown():
    d = tmpdir("seal-rot")
    try:
        m = Module(d, FakeSE(), every_n=4)
        e1 = (await m.boot()).number
        for _ in range(10):
            await m.record()
        e2 = (await m.sink.rotate()).number
        e3 = (await m.sink.rotate()).number  # nothing sealed in e2: closed over 0 objects
        await m.record()
        assert await m.sink.close()
        entries = m.entries()
        cps = check_log(entries, closed=(e1, e2, e3))
        assert [c[0] for c in cps[e1]] == [5, 10, 13]  # every 4 objects, then the closing one
        assert cps[e1][-1][1][5] == 2  # the closing one covers records 11 and 12
        assert len(cps[e2]) == 1 and cps[e2][0][1][5] == 0  # count 0, still closes e2
        assert _epoch_prev(entries, e1) is None
        for old, new in ((e1, e2), (e2, e3)):
            seq, h = _end_of(entries, old)
            assert _epoch_prev(entries, new) == [old, seq, h], (old, new)
        assert m.sink.closed_end == (e3,) + _end_of(entries, e3)
    finally:
        rmtree(d)


async def test_power_cut_leaves_a_tail_that_the_next_boot_checkpoints():
    d = tmpdir("seal-cut")
    try:
        se = FakeSE()
        m = Module(d, se, every_n=4)
        e1 = (await m.boot()).number
        for _ in range(6):  # checkpoint at 5, then records 6 and 7 stay open
            await m.record()
        _ack_all(m)  # acked: only the pin keeps checkpoint 5 and records 6, 7 on flash
        before = m.entries()
        kept = [x[2] for x in before if x[1] == e1]
        assert kept[-3:] == [5, 6, 7], kept  # (and what shares a segment with them)
        m.sink.next_seq()  # seq 8 consumed, never stored: the cut came before the append
        m = None  # power cut
        m2 = Module(d, se, every_n=4)
        e2 = (await m2.boot()).number
        entries = m2.entries()
        tail = [x for x in entries if x[1] == e1 and x[0] == KIND_CHECKPOINT][-1]
        p = cbor.decode(_payload(tail[3]))
        # exactly the objects after the last checkpoint: 6 and 7; above every stored seq
        assert p[3] == 8 and p[4] == 6 and p[5] == 2, p
        opened = [(x[2], x[3]) for x in before if x[1] == e1 and x[2] in (6, 7)]
        assert p[6] == chain(opened)
        cp5 = [x for x in before if x[1] == e1 and x[2] == 5][0]
        assert p[7] == hashlib.sha256(_payload(cp5[3])).digest()
        assert _epoch_prev(entries, e2) == [e1, 8, hashlib.sha256(_payload(tail[3])).digest()]
        # A second boot with no cut in between finds e2 open at its record: a count-0 tail.
        m3 = Module(d, se, every_n=4)
        e3 = (await m3.boot()).number
        t2 = [x for x in m3.entries() if x[1] == e2 and x[0] == KIND_CHECKPOINT]
        assert len(t2) == 1 and cbor.decode(_payload(t2[0][3]))[3:6] == [1, 1, 0]
        assert _epoch_prev(m3.entries(), e3)[:2] == [e2, 1]
    finally:
        rmtree(d)


async def test_tail_seq_is_above_a_refused_seq_of_the_overflow_record():
    d = tmpdir("seal-cutov")
    try:
        se = FakeSE()
        m = Module(d, se, capacity=2048, every_n=1000, segment=1024)
        e1 = (await m.boot()).number
        for _ in range(200):  # until a loss is left unreported (the reserve is used up)
            await m.record()
            if m.outbox.overflow is not None:
                break
        ov = m.outbox.overflow
        top = max(x[2] for x in m.entries() if x[1] == e1)
        assert ov is not None and ov[2] == e1 and ov[3] > top, (ov, top)
        m = None  # power cut
        m2 = Module(d, se, capacity=64 * 1024, every_n=1000, segment=1024)
        e2 = (await m2.boot()).number
        tail = [x for x in m2.entries() if x[1] == e1 and x[0] == KIND_CHECKPOINT][-1]
        assert tail[2] == ov[3] + 1, (tail[2], top, ov)  # never a seq the loss report names
        assert _epoch_prev(m2.entries(), e2)[:2] == [e1, ov[3] + 1]
    finally:
        rmtree(d)


async def test_a_checkpoint_not_signed_leaves_the_interval_open_and_the_next_one_covers_it():
    d = tmpdir("seal-fail")
    try:
        se = FakeSE()
        m = Module(d, se, every_n=3)
        e1 = (await m.boot()).number
        for _ in range(2):
            await m.record()
        se.fail_sign = 1
        await m.record()  # checkpoint 4 due, not signed: seq 4 consumed, no object
        assert m.health.counters.get(H.SE_ERRORS) == 1
        for _ in range(3):
            await m.record()
        cps = check_log(m.entries())
        # due again at once after the rebuild (3 objects), at record 5: 1, 2, 3 and 5
        assert [c[0] for c in cps[e1]] == [6] and cps[e1][0][1][4:6] == [1, 4], cps[e1]
    finally:
        rmtree(d)


def _ack(key, iv, number, piv, body, kid_epoch=None):
    s = Sealer(key, iv, DEV.encode(), number if kid_epoch is None else kid_epoch)
    out = bytearray(64)
    n = s.seal(piv, cbor.encode(body), out, True)
    return bytes(out[:n])


def _files(root):
    for ent in os.ilistdir(root):
        p = root + "/" + ent[0]
        if ent[1] == 0x4000:
            yield from _files(p)
        else:
            yield p


async def test_acks_of_an_older_epoch_open_after_a_reboot_and_no_plain_key_on_flash():
    d = tmpdir("seal-keys")
    try:
        se = FakeSE()
        m = Module(d, se)
        e1 = (await m.boot()).number
        for _ in range(3):
            await m.record()
        key, iv = m.ack_material
        m = None  # power cut: the epoch's keys were in RAM only
        m2 = Module(d, se)
        e2 = (await m2.boot()).number
        assert sorted(m2.acks.epochs()) == [e1, e2]
        assert m2.acks.open(_ack(key, iv, e1, 7, [e1, 3, 0])) == (e1, 3, 0)
        for frame, reason in (
            (_ack(key, iv, e1, 8, [e2, 3, 0]), "bad payload"),  # plaintext epoch != kid
            (_ack(key, iv, e1, 7, [e1, 3, 0]), "replay"),
            (_ack(key, iv, e1, 9, [e1, 3, 0], kid_epoch=e1 + 100), "other epoch"),
        ):
            try:
                m2.acks.open(frame)
            except AckError as e:
                assert e.reason == reason, (e.reason, reason)
            else:
                raise AssertionError("accepted: " + reason)
        assert m2.acks.rejected() == 3
        for path in _files(d):
            with open(path, "rb") as f:
                raw = f.read()
            assert raw.find(key) < 0 and raw.find(iv) < 0, "plain ack key in " + path
    finally:
        rmtree(d)
