# Outbox benchmark: appends/s, bytes on flash per record, peak heap.
#
#   .venv/bin/python tests/bench/bench_outbox.py [N]
# Under CPython it re-runs itself under the MicroPython unix port (the mpy-cross build of
# firmware/) once per backend; under MicroPython (`bench_outbox.py BACKEND N`) it runs the
# bench and prints one line per figure. Backends:
#   posix plain files under /tmp (the bench), one fsync per append. Run in heaps of growing
#         size: the smallest heap the whole bench runs in is the peak-heap figure (the unix
#         port's micropython.mem_peak counts every allocation ever made, not the peak in use);
#   lfs   littlefs (vfs.VfsLfs2) on a RAM block device, 4096-byte blocks (SPI NOR-like), 1 MiB,
#         in a 4 MiB heap (the RAM disk lives there), with 4096- and 1024-byte segments; counts
#         block-device programs and erases and the bytes they carry.
# "working set" = heap in use (after gc.collect) with the outbox open after N appends, minus
# the heap in use before it was created.
# Objects are 40 bytes (a sealed record of typical size).
import sys

if sys.implementation.name != "micropython":
    import pathlib
    import subprocess
    import tempfile

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))
    from serene import upy

    n = sys.argv[1] if len(sys.argv) > 1 else "2000"
    rc = 0

    def bench(code, args, heap):
        # The bench and its helper run as .mpy too, so no source is compiled in the heap.
        boot = "import sys\nsys.argv[:] = %r\nimport bench_outbox\n" % (["bench"] + args)
        return upy.run(["-c", boot], heap=heap, code_dir=code, cwd=code, timeout=600)

    with tempfile.TemporaryDirectory() as d:
        code = upy.compile_tree(pathlib.Path(d) / "mpy")
        upy.compile_file(__file__, code / "bench_outbox.mpy")
        upy.compile_file(upy.REPO / "tests" / "upy" / "outbox_util.py", code / "outbox_util.mpy")
        for kib in (16, 24, 32, 36, 40, 44, 48, 56, 64):
            res = bench(code, ["posix", n, "4096"], "%dK" % kib)
            if res.returncode == 0:
                sys.stdout.write(res.stdout)
                print("posix smallest heap the bench runs in: %d KiB (of 16..64 KiB tried)" % kib)
                break
        else:
            sys.stdout.write(res.stdout + res.stderr)
            rc = 1
        for seg in ("4096", "1024"):
            res = bench(code, ["lfs", n, seg], "4M")
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            rc |= res.returncode
    sys.exit(rc)

import gc
import os
import time

from firmware.outbox import Outbox
from outbox_util import RAMBlockDev, mount, rmtree, tmpdir, umount

BACKEND = sys.argv[1]
N = int(sys.argv[2])
SEG = int(sys.argv[3])
MAXD = 1024 if SEG >= 2048 else 700  # an epoch record with its certificate is ~600 bytes
OBJ = bytes(range(40))
BS = 4096


class CountingBD(RAMBlockDev):
    def __init__(self, *a):
        super().__init__(*a)
        self.prog_bytes = 0
        self.erases = 0

    def writeblocks(self, block, buf, off=0):
        self.prog_bytes += len(buf)
        return super().writeblocks(block, buf, off)

    def ioctl(self, op, arg):
        if op == 6:
            self.erases += 1
        return super().ioctl(op, arg)


def run(root, label, bd=None):
    label = "%s seg=%d" % (label, SEG)
    gc.collect()
    heap0 = gc.mem_alloc()
    ob = Outbox(root, 512 * 1024, segment_bytes=SEG, max_data=MAXD)
    ob.recover()
    if bd is not None:
        free0 = os.statvfs(root)[3]
        w0, p0, e0 = bd.writes, bd.prog_bytes, bd.erases
    t = time.ticks_us()
    for seq in range(N):
        ob.append(1, 1, seq, OBJ)
    dt = time.ticks_diff(time.ticks_us(), t)
    gc.collect()
    heap1 = gc.mem_alloc()
    print("%s appends/s: %d (%.1f us each, durable)" % (label, N * 1000000 // dt, dt / N))
    print("%s entry bytes per record: %d (40-byte object + 16)" % (label, ob.info()["bytes"] // N))
    if bd is not None:
        used = (free0 - os.statvfs(root)[3]) * BS
        print("%s flash blocks used per record: %.1f bytes" % (label, used / N))
        print(
            "%s per append: %.2f programs, %.0f bytes programmed, %.3f erases"
            % (label, (bd.writes - w0) / N, (bd.prog_bytes - p0) / N, (bd.erases - e0) / N)
        )
    print("%s working set after %d appends: %d bytes" % (label, N, heap1 - heap0))
    ob.close()
    ob = None
    gc.collect()
    ob = Outbox(root, 512 * 1024, segment_bytes=SEG, max_data=MAXD)
    t = time.ticks_us()
    rep = ob.recover()
    dt = time.ticks_diff(time.ticks_us(), t)
    print("%s recover of %d entries: %d ms" % (label, rep["entries"], dt // 1000))
    t = time.ticks_us()
    n = 0
    for _ in ob.pending():
        n += 1
    dt = time.ticks_diff(time.ticks_us(), t)
    print("%s pending iteration: %d entries/s" % (label, n * 1000000 // dt))
    t = time.ticks_us()
    ob.mark_acked(1, N // 2)
    ob.commit()
    dt = time.ticks_diff(time.ticks_us(), t)
    print("%s ack + commit (reclaims %d segments): %d us" % (label, ob.stats["reclaimed"], dt))
    ob.close()


if BACKEND == "lfs":
    bd = CountingBD(BS, 256)
    mount(bd, "/bench", mkfs=True)
    try:
        run("/bench/ob", "lfs", bd)
    finally:
        umount("/bench")
else:
    d = tmpdir("bench")
    try:
        run(d + "/ob", "posix")
    finally:
        rmtree(d)

