# STSAFE-A110 driver benchmark: the driver's own time per Generate Signature and per Establish
# Key, without the chip's processing time, and the driver's heap use around them.
#
#   .venv/bin/python tests/bench/bench_stsafe.py [N]
#
# Under CPython: provisions one module, serves its emulated chip with time_scale=0 (answers at
# once) on the I2C bridge, and re-runs this file under the MicroPython unix port (the mpy-cross
# build of drivers/, this file as .mpy too) in a 256 KiB heap (no GC pressure in the timings),
# then in heaps of growing size to find the smallest one the whole bench runs in.
# Under MicroPython (`bench_stsafe.py PORT MAC CIPHER N`): the driver's fixed per-command
# waits (commands.WAIT_MS, the chip's processing time) are set to 0, so an operation's time is
# the driver (framing, CRC, C-MAC/R-MAC, encryption, parsing, asyncio) + the bridge's loopback
# round trips + the emulator's computing of the answer; the emulator's share, measured on the
# host per command, is subtracted. Figures:
#   *_us        median time per operation (driver + bridge), emulator compute subtracted
#   *_alloc     bytes the driver allocates per operation, median and max over N (gc disabled
#               around one operation: nothing is freed, so this also bounds the heap it needs
#               above its baseline; ~0.3 KB of it is the bridge shim's own)
#   footprint   heap in use after init (gc.collect) minus before the driver was created
#   import      heap in use after importing drivers.stsafe (from .mpy; asyncio and the bridge
#               shim already imported). Bytecode loaded from .mpy lives in the heap; frozen
#               into the firmware image it would stay in flash
#   mem_peak    micropython.mem_peak() at the end: on this unix build it counts every
#               m_malloc ever made, not the peak in use; printed for completeness only
#   min heap    the smallest heap (KiB) the bench runs in, imports and init included
import sys

if sys.implementation.name != "micropython":
    import json
    import pathlib
    import statistics
    import tempfile
    import threading

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))
    from serene import upy
    from serene.i2c_bridge import I2CBridgeServer
    from serene.stsafe.emulator import StsafeEmulator
    from serene.stsafe.provision import provision

    N = int(sys.argv[1]) if len(sys.argv) > 1 else 50

    class Timed:
        """The emulator, with its compute time per command recorded (host clock)."""

        def __init__(self, emu):
            self.emu = emu
            self.log = []
            self.lock = threading.Lock()

        def i2c_write(self, data):
            before = self.emu.process_s
            ok = self.emu.i2c_write(data)
            if ok:
                self.log.append((data[0] & 0x1F, self.emu.process_s - before))
            return ok

        def i2c_read(self, n):
            return self.emu.i2c_read(n)

    def bench(code, port, cfg, heap):
        boot = "import sys\nsys.argv[:] = %r\nimport bench_stsafe\n" % (
            ["bench", str(port), cfg["host_mac_key"], cfg["host_cipher_key"], str(N)]
        )
        return upy.run(["-c", boot], heap=heap, code_dir=code, cwd=code, timeout=600)

    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        provision(d / "home", ["SRN-0001"])
        dev = d / "home" / "devices" / "SRN-0001"
        cfg = json.loads((dev / "module.json").read_text())
        emu = StsafeEmulator.load(dev / "stsafe.json", time_scale=0, autosave=False)
        code = upy.compile_tree(d / "mpy")
        upy.compile_file(__file__, code / "bench_stsafe.mpy")
        timed = Timed(emu)
        with I2CBridgeServer({0x20: timed}) as bridge:
            res = bench(code, bridge.port, cfg, "256K")
            if res.returncode != 0:
                sys.exit("bench failed:\n" + res.stdout + res.stderr)
            out = json.loads(res.stdout.strip().splitlines()[-1])
            emu_s = {}
            for cmd, s in timed.log:
                emu_s.setdefault(cmd, []).append(s)
            smallest = None
            for kib in range(40, 129, 4):
                if bench(code, bridge.port, cfg, "%dK" % kib).returncode == 0:
                    smallest = kib
                    break
        sign_emu = statistics.median(emu_s[0x16]) * 1e6
        est_emu = statistics.median(emu_s[0x18]) * 1e6
        print("STSAFE driver bench (unix port, x86_64, drivers/ as .mpy, N=%d)" % N)
        print(
            "  generate_signature: %5.0f us/op (measured %d, emulator %d); allocated/op: %d B"
            " median, %d B max"
            % ((out["sign_us"] - sign_emu, out["sign_us"], sign_emu) + tuple(out["sign_alloc"]))
        )
        print(
            "  establish_key:      %5.0f us/op (measured %d, emulator %d); allocated/op: %d B"
            " median, %d B max"
            % ((out["est_us"] - est_emu, out["est_us"], est_emu) + tuple(out["est_alloc"]))
        )
        print(
            "  heap: import of drivers.stsafe %d B, driver instance after init %d B"
            % (out["import"], out["footprint"])
        )
        print(
            "  (micropython.mem_peak %d: counts every allocation on this build, not a peak)"
            % out["mem_peak"]
        )
        print("  smallest heap the bench runs in: %s KiB" % smallest)
        print("  fixed chip waits not included: Generate Signature 80 ms, Establish Key 260 ms")
    sys.exit(0)

# --- MicroPython side ---
import asyncio
import gc
import time
from binascii import unhexlify

import micropython


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


async def main(port, mac, cipher, n):
    from drivers.unix.i2c_bridge import SocketI2C  # the bench's bus, not the driver

    gc.collect()
    m0 = gc.mem_alloc()
    import drivers.stsafe.commands as c
    from drivers.stsafe import STSAFE

    gc.collect()
    m1 = gc.mem_alloc()
    c.WAIT_MS = (0,) * len(c.WAIT_MS)  # the emulator answers at once (time_scale 0)
    i2c = SocketI2C("127.0.0.1", port)
    gc.collect()
    m2 = gc.mem_alloc()
    se = STSAFE(i2c, host_mac_key=mac, host_cipher_key=cipher)
    await se.init()
    gc.collect()
    footprint = gc.mem_alloc() - m2
    digest = bytes(range(1, 33))
    peer = await se.generate_key(0xFF)  # any valid P-256 point will do as the peer
    sign, est, sign_alloc, est_alloc = [], [], [], []
    for _ in range(n):
        gc.collect()
        gc.disable()
        a = gc.mem_alloc()
        t = time.ticks_us()
        await se.generate_signature(0, digest)
        sign.append(time.ticks_diff(time.ticks_us(), t))
        sign_alloc.append(gc.mem_alloc() - a)
        gc.enable()
        await se.generate_key(0xFF)
        gc.collect()
        gc.disable()
        a = gc.mem_alloc()
        t = time.ticks_us()
        await se.establish_key(0xFF, peer)
        est.append(time.ticks_diff(time.ticks_us(), t))
        est_alloc.append(gc.mem_alloc() - a)
        gc.enable()
    return {
        "sign_us": median(sign),
        "est_us": median(est),
        "sign_alloc": [median(sign_alloc), max(sign_alloc)],
        "est_alloc": [median(est_alloc), max(est_alloc)],
        "import": m1 - m0,
        "footprint": footprint,
        "mem_peak": micropython.mem_peak(),
    }


if sys.argv[0] == "bench":
    import json

    port, mac, cipher, n = (
        int(sys.argv[1]),
        unhexlify(sys.argv[2]),
        unhexlify(sys.argv[3]),
        int(sys.argv[4]),
    )
    print(json.dumps(asyncio.run(main(port, mac, cipher, n))))
