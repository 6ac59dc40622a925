# Outbox (firmware/outbox.py) on the unix port: plain files (as on the bench) and littlefs on a
# RAM block device (as on the board). Entry bytes are checked against the layout documented in
# the module header (magic, kind, len, epoch, seq, data, crc32 IEEE).
import os
import struct
from binascii import crc32

from firmware.outbox import Outbox, OutboxError, OutboxFull
from outbox_util import RAMBlockDev, file_bytes, mount, obj, rmtree, tmpdir, umount, write_bytes


def entry_bytes(kind, epoch, seq, data):
    body = struct.pack("<BBHII", 0xB1, kind, len(data), epoch, seq) + data
    return body + struct.pack("<I", crc32(body))


def ids(ob, pos=0):
    return [(e.epoch, e.seq) for e in ob.pending(pos)]


def fill(ob, epoch, seqs, kind=1):
    for s in seqs:
        ob.append(kind, epoch, s, obj(kind, epoch, s))


def new(root, **kw):
    cfg = {"capacity_bytes": 64 * 1024, "segment_bytes": 1024, "max_data": 700}
    cfg.update(kw)
    ob = Outbox(root, **cfg)
    rep = ob.recover()
    return ob, rep


def test_entry_bytes_on_flash_exact():
    d = tmpdir("ob")
    try:
        ob, rep = new(d + "/ob")
        if rep["entries"] or rep["state"] != "missing":
            raise AssertionError(rep)
        a = obj(0, 7, 0)
        b = obj(1, 7, 1)
        ob.append(0, 7, 0, a)
        ob.append(1, 7, 1, b)
        ob.close()
        names = sorted(os.listdir(d + "/ob"))
        if names != ["00000001.seg"]:
            raise AssertionError(names)
        got = file_bytes(d + "/ob/00000001.seg")
        want = entry_bytes(0, 7, 0, a) + entry_bytes(1, 7, 1, b)
        if got != want:
            raise AssertionError((got[:40], want[:40]))
    finally:
        rmtree(d)


def test_pending_survives_reopen_in_order_with_exact_data():
    d = tmpdir("ob")
    try:
        ob, _ = new(d + "/ob")
        fill(ob, 3, range(0, 60))
        ob.close()
        ob, rep = new(d + "/ob")
        if rep["entries"] != 60 or rep["pending"] != 60 or rep["segments"] < 2:
            raise AssertionError(rep)
        n = 0
        for e in ob.pending():
            if (e.epoch, e.seq) != (3, n) or bytes(e.data) != obj(1, 3, n) or e.kind != 1:
                raise AssertionError((e.epoch, e.seq, n))
            n += 1
        if n != 60:
            raise AssertionError(n)
        # appending goes on after the last id, and an id not after it is refused
        ob.append(1, 3, 60, obj(1, 3, 60))
        for bad in ((3, 60), (3, 10), (2, 99)):
            try:
                ob.append(1, bad[0], bad[1], b"x" * 20)
                raise AssertionError("accepted %r" % (bad,))
            except OutboxError as e:
                if e.reason != "order":
                    raise
        ob.append(1, 4, 0, obj(1, 4, 0))  # a new epoch restarts seqs
        if ids(ob)[-2:] != [(3, 60), (4, 0)]:
            raise AssertionError(ids(ob)[-2:])
    finally:
        rmtree(d)


def test_position_tokens_read_and_resume():
    d = tmpdir("ob")
    try:
        ob, _ = new(d + "/ob")
        pos = [ob.append(1, 1, s, obj(1, 1, s)) for s in range(40)]
        for s in (0, 17, 39):
            e = ob.read(pos[s])
            if e is None or (e.epoch, e.seq) != (1, s) or bytes(e.data) != obj(1, 1, s):
                raise AssertionError(s)
        # next_entry from a position continues there, across segment boundaries
        e = ob.next_entry(pos[20])
        if (e.epoch, e.seq) != (1, 20):
            raise AssertionError((e.epoch, e.seq))
        rest = ids(ob, e.next)
        if rest != [(1, s) for s in range(21, 40)]:
            raise AssertionError(rest[:2])
        if ob.next_entry(ob.read(pos[39]).next) is not None:
            raise AssertionError("entry past the end")
        # acked entries are skipped; read() of a reclaimed one gives None
        ob.mark_acked(1, 30)
        ob.commit()
        if ids(ob)[0] != (1, 31):
            raise AssertionError(ids(ob)[0])
        if ob.read(pos[0]) is not None:
            raise AssertionError("read of a reclaimed entry")
    finally:
        rmtree(d)


def test_torn_tail_is_cut_and_reported():
    d = tmpdir("ob")
    try:
        ob, _ = new(d + "/ob")
        fill(ob, 1, range(5))
        ob.close()
        seg = d + "/ob/00000001.seg"
        good = file_bytes(seg)
        torn = entry_bytes(1, 1, 5, obj(1, 1, 5))[:23]  # an append cut short
        write_bytes(seg, torn, "ab")
        ob, rep = new(d + "/ob")
        if rep["torn_bytes"] != 23 or rep["corrupt_regions"] or rep["entries"] != 5:
            raise AssertionError(rep)
        if file_bytes(seg) != good:
            raise AssertionError("tail not cut")
        ob.append(1, 1, 5, obj(1, 1, 5))
        ob.close()
        ob, rep = new(d + "/ob")
        if rep["torn_bytes"] or ids(ob) != [(1, s) for s in range(6)]:
            raise AssertionError((rep, ids(ob)))
    finally:
        rmtree(d)


def test_crc_corruption_detected_reported_and_rest_kept():
    d = tmpdir("ob")
    try:
        ob, _ = new(d + "/ob")
        fill(ob, 2, range(6))
        ob.close()
        seg = d + "/ob/00000001.seg"
        raw = bytearray(file_bytes(seg))
        sizes = [len(entry_bytes(1, 2, s, obj(1, 2, s))) for s in range(6)]
        off = sum(sizes[:2]) + 15  # a data byte of seq 2
        raw[off] ^= 0x40
        write_bytes(seg, raw)
        ob, rep = new(d + "/ob")
        if rep["corrupt_regions"] != 1 or rep["corrupt_bytes"] != sizes[2]:
            raise AssertionError(rep)
        if rep["torn_bytes"] or ids(ob) != [(2, 0), (2, 1), (2, 3), (2, 4), (2, 5)]:
            raise AssertionError((rep, ids(ob)))
        for e in ob.pending():
            if bytes(e.data) != obj(1, 2, e.seq):
                raise AssertionError(e.seq)
        # the region was purged: the next boot finds a clean log
        ob.close()
        ob, rep = new(d + "/ob")
        if rep["corrupt_regions"] or rep["entries"] != 5:
            raise AssertionError(rep)
        # damage after recovery (bit rot under a running outbox) is skipped and counted
        ob.close()
        raw = bytearray(file_bytes(seg))
        raw[sizes[0] + 3] ^= 0x01  # length byte of the second entry (seq 1)
        write_bytes(seg, raw)
        ob._cache_seg = -1
        got = ids(ob)
        if got != [(2, 0), (2, 3), (2, 4), (2, 5)] or ob.stats["corrupt"] < 1:
            raise AssertionError((got, ob.stats))
    finally:
        rmtree(d)


def test_acks_cumulative_bitmap_commit_and_reclaim():
    d = tmpdir("ob")
    try:
        ob, _ = new(d + "/ob", segment_bytes=512, max_data=400)
        fill(ob, 5, range(50))
        nseg = len([n for n in os.listdir(d + "/ob") if n.endswith(".seg")])
        if nseg < 4:
            raise AssertionError(nseg)
        # cumulative 9, bitmap bit i = seq 10+i: bits 0 and 2 -> 10 and 12 (11 and 13 not)
        if not ob.mark_acked(5, 9, 0b101, 3):
            raise AssertionError("ack ignored")
        if ob.mark_acked(5, 9, 0b101, 3):
            raise AssertionError("duplicate ack counted as new")
        want = [(5, 11), (5, 13)] + [(5, s) for s in range(14, 50)]
        if ids(ob) != want:
            raise AssertionError(ids(ob)[:4])
        if not ob.commit():
            raise AssertionError("commit")
        ob.close()
        ob, rep = new(d + "/ob", segment_bytes=512, max_data=400)
        if rep["state"] != "ok" or ids(ob) != want:
            raise AssertionError((rep, ids(ob)[:4]))
        # an older cumulative with a bitmap that fills the gap: cum moves to 13
        ob.mark_acked(5, 8, 0b10100, 5)  # bit i = seq 9+i: 11 and 13
        if ids(ob)[0] != (5, 14):
            raise AssertionError(ids(ob)[0])
        before = [n for n in os.listdir(d + "/ob") if n.endswith(".seg")]
        ob.mark_acked(5, 40)
        ob.commit()
        segs = [n for n in os.listdir(d + "/ob") if n.endswith(".seg")]
        gone = len(before) - len(segs)
        if gone < 2 or ob.stats["reclaimed"] != gone or ids(ob)[0] != (5, 41):
            raise AssertionError((before, segs, ob.stats))
        # what is left on flash still starts at or before seq 41 (only whole acked segments go)
        ob._cache_seg = -1
        ob.close()
        first = sorted(segs)[0]
        raw = file_bytes(d + "/ob/" + first)
        if struct.unpack_from("<I", raw, 8)[0] > 41:
            raise AssertionError(struct.unpack_from("<I", raw, 8))
        ob.mark_acked(5, 49)
        ob.commit()
        segs = [n for n in os.listdir(d + "/ob") if n.endswith(".seg")]
        if segs or ob.info()["bytes"] != 0:
            raise AssertionError(segs)
        ob.append(1, 5, 50, obj(1, 5, 50))
        ob.close()
        ob, rep = new(d + "/ob", segment_bytes=512, max_data=400)
        if ids(ob) != [(5, 50)]:
            raise AssertionError(ids(ob))
    finally:
        rmtree(d)


def test_ack_never_ahead_of_log_and_foreign_epochs_ignored():
    d = tmpdir("ob")
    try:
        ob, _ = new(d + "/ob")
        fill(ob, 9, range(5))
        ob.mark_acked(9, 100, (1 << 64) - 1, 64)  # claims far more than was appended
        ob.mark_acked(10, 3)  # an epoch that does not exist yet
        ob.commit()
        fill(ob, 9, range(5, 8))
        fill(ob, 10, range(0, 5))
        if ids(ob) != [(9, 5), (9, 6), (9, 7)] + [(10, s) for s in range(5)]:
            raise AssertionError(ids(ob))
        try:
            ob.mark_acked(9, -2)
            raise AssertionError("bad ack accepted")
        except OutboxError:
            pass
    finally:
        rmtree(d)


def test_cursor_is_atomic_tmp_ignored_corrupt_state_loses_nothing():
    d = tmpdir("ob")
    try:
        ob, _ = new(d + "/ob")
        fill(ob, 1, range(20))
        ob.mark_acked(1, 9)
        ob.commit()
        ob.close()
        state = file_bytes(d + "/ob/state")
        # killed after writing the new cursor to state.tmp, before the rename: old cursor holds
        write_bytes(d + "/ob/state.tmp", state[:7])
        ob, rep = new(d + "/ob")
        if rep["state"] != "ok" or ids(ob)[0] != (1, 10) or "state.tmp" in os.listdir(d + "/ob"):
            raise AssertionError((rep, ids(ob)[:1]))
        # a damaged cursor is detected (CRC) and everything is kept pending (resent)
        ob.close()
        bad = bytearray(state)
        bad[8] ^= 1
        write_bytes(d + "/ob/state", bad)
        ob, rep = new(d + "/ob")
        if rep["state"] != "corrupt" or ids(ob)[0] != (1, 0) or len(ids(ob)) != 20:
            raise AssertionError((rep, ids(ob)[:1]))
        ob.close()
        ob, rep = new(d + "/ob")
        if rep["state"] != "ok":  # rewritten at that recovery
            raise AssertionError(rep)
    finally:
        rmtree(d)


def test_capacity_overflow_reported_and_event_uses_reserve():
    d = tmpdir("ob")
    try:
        kw = {"capacity_bytes": 1024, "segment_bytes": 512, "reserve_bytes": 128, "max_data": 400}
        ob, _ = new(d + "/ob", **kw)
        seq = 0
        while True:
            try:
                ob.append(1, 4, seq, obj(1, 4, seq))
            except OutboxFull as e:
                if e.reason != "capacity" or e.overflow != (4, seq, 4, seq, 1):
                    raise AssertionError((e.reason, e.overflow))
                break
            seq += 1
        first_lost = seq
        stored = seq
        for s in range(seq + 1, seq + 4):
            try:
                ob.append(1, 4, s, obj(1, 4, s))
                raise AssertionError("stored past capacity")
            except OutboxFull:
                pass
        ov = ob.overflow
        if ov != (4, first_lost, 4, first_lost + 3, 4) or ob.stats["lost"] != 4:
            raise AssertionError(ov)
        # the overflow record survives a reboot
        ob.close()
        ob, rep = new(d + "/ob", **kw)
        if rep["overflow"] != ov or ob.overflow != ov:
            raise AssertionError(rep)
        # the application seals an event naming the loss; it goes into the reserve
        ev = struct.pack("<IIIII", *ov)
        ob.append(3, 4, first_lost + 4, ev, covers=ob.overflow)
        if ob.overflow is not None:
            raise AssertionError(ob.overflow)
        ob.close()
        ob, rep = new(d + "/ob", **kw)
        if rep["overflow"] is not None:
            raise AssertionError(rep)
        last = [e for e in ob.pending()][-1]
        if (last.kind, last.seq, bytes(last.data)) != (3, first_lost + 4, ev):
            raise AssertionError((last.kind, last.seq))
        # still full for ordinary records: a new overflow record starts
        try:
            ob.append(1, 4, first_lost + 5, obj(1, 4, first_lost + 5))
            raise AssertionError("stored past capacity")
        except OutboxFull as e:
            if e.overflow != (4, first_lost + 5, 4, first_lost + 5, 1):
                raise AssertionError(e.overflow)
        # nothing stored was lost, and acks make room again
        got = ids(ob)
        if got != [(4, s) for s in range(stored)] + [(4, first_lost + 4)]:
            raise AssertionError(got)
        ob.mark_acked(4, first_lost + 4)
        ob.commit()
        ob.append(1, 4, first_lost + 6, obj(1, 4, first_lost + 6))
        if ids(ob) != [(4, first_lost + 6)]:
            raise AssertionError(ids(ob))
    finally:
        rmtree(d)


def test_flash_full_enospc_on_littlefs():
    bd = RAMBlockDev(512, 24)
    mount(bd, "/fl", mkfs=True)
    try:
        ob, _ = new("/fl/ob", capacity_bytes=1 << 20, segment_bytes=1024)
        seq = 0
        stored = []
        while seq < 2000:
            try:
                ob.append(1, 1, seq, obj(1, 1, seq))
                stored.append(seq)
            except OutboxFull as e:
                if e.reason != "flash":
                    raise
                break
            seq += 1
        if seq >= 2000 or len(stored) < 50:
            raise AssertionError((seq, len(stored)))
        if ob.overflow[1] != seq or ob.overflow[4] != 1:
            raise AssertionError(ob.overflow)
        # everything reported stored is on flash, byte for byte, after a remount
        ob.close()
        umount("/fl")
        mount(bd, "/fl")
        ob, rep = new("/fl/ob", capacity_bytes=1 << 20, segment_bytes=1024)
        got = [(e.seq, bytes(e.data)) for e in ob.pending()]
        if [g[0] for g in got] != stored:
            raise AssertionError((rep, len(got), len(stored)))
        for s, data in got:
            if data != obj(1, 1, s):
                raise AssertionError(s)
        # acks free the flash; appends work again
        ob.mark_acked(1, stored[-1] - 5)
        ob.commit()
        for s in range(seq + 1, seq + 20):
            ob.append(1, 1, s, obj(1, 1, s))
        if ids(ob)[-1] != (1, seq + 19):
            raise AssertionError(ids(ob)[-1])
    finally:
        umount("/fl")


def test_bad_arguments_are_named_errors():
    d = tmpdir("ob")
    try:
        try:
            Outbox(d + "/x", 4096, segment_bytes=100, max_data=700)
            raise AssertionError("bad config accepted")
        except OutboxError as e:
            if e.reason != "config":
                raise
        ob = Outbox(d + "/ob", 4096, segment_bytes=1024, max_data=700)
        try:
            ob.append(1, 1, 1, b"x")
            raise AssertionError("append before recover")
        except OutboxError as e:
            if e.reason != "not recovered":
                raise
        ob.recover()
        for args in ((1, 1, 1, b""), (1, 1, 1, b"x" * 701), (300, 1, 1, b"x"), (1, -1, 0, b"x")):
            try:
                ob.append(*args)
                raise AssertionError("accepted %r" % (args[:3],))
            except OutboxError:
                pass
        if ob.info()["stats"]["appended"] != 0:
            raise AssertionError(ob.info())
    finally:
        rmtree(d)


def test_is_acked_after_reclaim_and_old_epochs():
    d = tmpdir("ob")
    try:
        ob, _ = new(d + "/ob", segment_bytes=512, max_data=400)
        fill(ob, 1, range(10))
        fill(ob, 2, range(30))
        ob.mark_acked(1, 9)
        ob.mark_acked(2, 20)
        ob.commit()
        # epoch 1 left the log entirely (its ack state pruned): still acknowledged
        for s in range(10):
            if not ob.is_acked(1, s):
                raise AssertionError((1, s))
        if ob.is_acked(2, 21) or not ob.is_acked(2, 20):
            raise AssertionError("epoch 2")
        # an ack for an epoch that has left the log changes nothing
        if ob.mark_acked(1, 50):
            raise AssertionError("ack of a gone epoch applied")
        ob.mark_acked(2, 29)
        ob.commit()
        if ob.info()["segments"] != 0 or not ob.is_acked(2, 29) or ob.is_acked(2, 30):
            raise AssertionError(ob.info())
        ob.close()
        ob, rep = new(d + "/ob", segment_bytes=512, max_data=400)
        if rep["entries"] or ob.next_entry(0) is not None:
            raise AssertionError(rep)
    finally:
        rmtree(d)
