# Power cuts under the outbox on littlefs (vfs.VfsLfs2 on a RAM block device, as on the board).
#
# A workload (epoch record, records, checkpoints, acks + commits, segment reclaim, a reboot,
# a second epoch) runs once to count its flash writes W; then, in this same process, it is run
# again on a fresh filesystem once per cut point K: write K lands only in part and every later
# write fails (the power is gone). The image is remounted, the outbox recovered, and:
#   - every object whose append had returned is there, byte for byte, unless a commit that had
#     returned True acknowledged it (then it may be gone);
#   - nothing a commit that had returned True acknowledged is pending again (cursor atomicity);
#   - pending ids are strictly increasing (no seq twice) and each is an object the workload
#     tried to store, with its exact bytes;
#   - appending works after recovery and survives one more remount.
import os

from firmware.outbox import Outbox
from outbox_util import RAMBlockDev, mount, obj, umount

MNT = "/pc"
ROOT = MNT + "/ob"
BLOCK = 512
BLOCKS = 48
CFG = {"capacity_bytes": 12 * 1024, "segment_bytes": 1024, "reserve_bytes": 128, "max_data": 700}
MIN_CUTS = 200


class PowerLost(Exception):
    pass


class Run:
    def __init__(self, bd):
        self.bd = bd
        self.stored = {}  # id -> kind, appends that returned
        self.tried = {}  # id -> kind, every append attempted
        self.acked_ram = set()  # acked in RAM (mark_acked), durable or not
        self.acked_durable = set()  # acked by a commit that returned True

    def check_power(self):
        if self.bd.dead:
            raise PowerLost()

    def append(self, ob, kind, epoch, seq):
        self.tried[(epoch, seq)] = kind
        ob.append(kind, epoch, seq, obj(kind, epoch, seq))
        self.stored[(epoch, seq)] = kind
        self.check_power()

    def ack(self, ob, epoch, cum, bitmap=0, nbits=0):
        ob.mark_acked(epoch, cum, bitmap, nbits)
        for (e, s) in self.stored:
            if e == epoch and (s <= cum or (s > cum and (bitmap >> (s - cum - 1)) & 1)):
                self.acked_ram.add((e, s))
        ok = ob.commit()
        self.check_power()
        if ok:
            self.acked_durable = set(self.acked_ram)


def workload(run):
    ob = Outbox(ROOT, **CFG)
    ob.recover()
    run.check_power()
    epoch = 1
    run.append(ob, 0, epoch, 0)  # epoch record, ~600 bytes
    for seq in range(1, 46):
        run.append(ob, 2 if seq % 8 == 0 else 1, epoch, seq)
        if seq == 15:
            run.ack(ob, epoch, 9, 0b1011, 4)  # cumulative a little behind, bitmap with holes
        elif seq == 30:
            # a wide bitmap: 13..30 acked except 16, whose segment must stay
            run.ack(ob, epoch, 12, ((1 << 18) - 1) & ~(1 << 3), 18)
        elif seq == 45:
            run.ack(ob, epoch, 39, 0b1011, 4)
    ob.close()
    # reboot: a new epoch
    ob = Outbox(ROOT, **CFG)
    ob.recover()
    run.check_power()
    epoch = 2
    run.append(ob, 0, epoch, 0)
    for seq in range(1, 21):
        run.append(ob, 1, epoch, seq)
        if seq == 10:
            run.ack(ob, 1, 45)
    run.ack(ob, 2, 12, 0b101, 3)
    ob.close()


def verify(run, image, k):
    bd = RAMBlockDev(BLOCK, BLOCKS, image=image)
    mount(bd, MNT)
    try:
        ob = Outbox(ROOT, **CFG)
        rep = ob.recover()
        prev = None
        seen = set()
        for e in ob.pending():
            i = (e.epoch, e.seq)
            if prev is not None and not (i > prev):
                raise AssertionError("cut %d: order/duplicate %r after %r" % (k, i, prev))
            prev = i
            if i not in run.tried:
                raise AssertionError("cut %d: unknown entry %r" % (k, i))
            if e.kind != run.tried[i] or bytes(e.data) != obj(e.kind, e.epoch, e.seq):
                raise AssertionError("cut %d: entry %r altered" % (k, i))
            if i in run.acked_durable:
                raise AssertionError("cut %d: durably acked %r pending again" % (k, i))
            seen.add(i)
        for i in run.stored:
            if i not in seen and i not in run.acked_ram:
                raise AssertionError("cut %d: stored %r lost (%r)" % (k, i, rep))
        if rep["corrupt_regions"] or rep["duplicates"]:
            raise AssertionError("cut %d: %r" % (k, rep))
        # appending works after recovery, and is durable
        nxt = (prev[0] + 1, 0) if prev else (9, 0)
        ob.append(1, nxt[0], 0, obj(1, nxt[0], 0))
        ob.close()
        umount(MNT)
        mount(bd, MNT)
        ob = Outbox(ROOT, **CFG)
        ob.recover()
        last = None
        for e in ob.pending():
            last = (e.epoch, e.seq, bytes(e.data))
        if last != (nxt[0], 0, obj(1, nxt[0], 0)):
            raise AssertionError("cut %d: append after recovery lost" % k)
        ob.close()
    finally:
        umount(MNT)


def fresh(cut_at=None, partial=0):
    bd = RAMBlockDev(BLOCK, BLOCKS)
    mount(bd, MNT, mkfs=True)
    os.mkdir(ROOT)
    bd.writes = 0
    bd.cut_at = cut_at
    bd.partial = partial
    return bd


def test_power_cut_at_every_write():
    bd = fresh()
    run = Run(bd)
    workload(run)
    umount(MNT)
    total = bd.writes
    if len(run.stored) != 67 or total < MIN_CUTS:
        raise AssertionError((len(run.stored), total))
    # every write if that is few enough, else evenly spread cut points, always >= MIN_CUTS
    step = max(1, total // 400)
    cuts = list(range(1, total + 1, step))
    if len(cuts) < MIN_CUTS:
        raise AssertionError(len(cuts))
    lost_power = 0
    for k in cuts:
        bd = fresh(k, (k * 37) % 97)
        run = Run(bd)
        try:
            workload(run)
        except Exception as e:  # the power cut surfaces as PowerLost or an OSError/OutboxError
            if not bd.dead:
                raise
            lost_power += 1
        if not bd.dead:
            raise AssertionError("cut %d never happened (%d writes)" % (k, bd.writes))
        image = bytes(bd.data)
        umount(MNT)
        verify(run, image, k)
    print("cut points:", len(cuts), "of", total, "writes; workload interrupted:", lost_power)
