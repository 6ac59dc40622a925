# Link layer benchmark: packing efficiency and cost of building frames, per MTU.
#
#   .venv/bin/python tests/bench/bench_link.py [N]
# Under CPython it re-runs itself under the MicroPython unix port (mpy-cross build of firmware/
# and drivers/); under MicroPython it fills an outbox (plain files) with N 40-byte records after
# a 600-byte epoch record, builds every frame at each LoRa EU868 payload limit (51, 115, 222)
# and at 242 (BLE/LTE-M profile), and prints per MTU: frames, objects per frame, link bytes per
# object beyond the object itself, microseconds per frame built (with an instant ack in RAM
# after each, window 32), heap bytes allocated per frame (ack bookkeeping included; most of it
# is call frames: MicroPython puts the state of any function with more than 11 words of locals
# and stack on the heap, py/objfun.c VM_MAX_STATE_ON_STACK; garbage, not growth).
import sys

if sys.implementation.name != "micropython":
    import pathlib
    import tempfile

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))
    from serene import upy

    n = sys.argv[1] if len(sys.argv) > 1 else "1000"
    with tempfile.TemporaryDirectory() as d:
        code = upy.compile_tree(pathlib.Path(d) / "mpy")
        for f in ("outbox_util.py", "link_sim.py"):
            upy.compile_file(upy.REPO / "tests" / "upy" / f, code / f.replace(".py", ".mpy"))
        upy.compile_file(__file__, code / "bench_link.mpy")
        boot = "import sys\nsys.argv[:] = %r\nimport bench_link\n" % (["bench", n])
        res = upy.run(["-c", boot], heap="256K", code_dir=code, cwd=code, timeout=600)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    sys.exit(res.returncode)

import time

import micropython

from firmware.link import Link
from firmware.outbox import Outbox
from link_sim import FakeOpener, Sim, SimRadio
from outbox_util import obj, rmtree, tmpdir

N = int(sys.argv[1])
REC = bytes(range(40))

for mtu in (51, 115, 222, 242):
    d = tmpdir("benchlink")
    try:
        ob = Outbox(d + "/ob", 512 * 1024, segment_bytes=4096, max_data=1024)
        ob.recover()
        ob.append(0, 1, 0, obj(0, 1, 0))
        for seq in range(1, N + 1):
            ob.append(1, 1, seq, REC)
        radio = SimRadio("r", mtu, Sim())
        link = Link(ob, radio, FakeOpener())  # window 32, as in use
        frames = 0
        nbytes = 0
        a0 = micropython.mem_total()  # bytes allocated so far (MICROPY_MEM_STATS)
        t = time.ticks_us()
        while True:
            f = link.build_frame(radio, 0)
            if f is None:
                break
            frames += 1
            nbytes += len(f)
            # instant acks, in RAM only (no commit): keeps the window open
            done = link.stats["objects"] - (1 if link._cont < 0 else 2)
            ob.mark_acked(1, done)
        dt = time.ticks_diff(time.ticks_us(), t)
        alloc = micropython.mem_total() - a0
        payload = 600 + 40 * N
        print(
            "mtu %3d: %5d frames, %.2f objects/frame, %.2f link bytes/object, "
            "%.0f us/frame, ~%d heap bytes/frame"
            % (mtu, frames, (N + 1) / frames, (nbytes - payload) / (N + 1), dt / frames,
               alloc // frames)
        )
        ob.close()
    finally:
        rmtree(d)
