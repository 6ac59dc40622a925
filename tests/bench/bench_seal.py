# Sealing benchmark: protection overhead per record, epoch record and checkpoint sizes, the
# cost of sealing a record relative to CBOR-encoding it, and the heap the sealing path uses.
#
#   .venv/bin/python tests/bench/bench_seal.py [N]
# Under CPython: provisions a module in a temporary directory, serves its emulated STSAFE on
# the I2C bridge (time_scale 0), compiles firmware/ and drivers/ with mpy-cross, and re-runs
# itself under the MicroPython unix port (`bench_seal.py PORT CFG N`) in heaps of growing size;
# the smallest heap the whole run fits in is the peak-heap figure (the unix port's
# micropython.mem_peak counts every allocation ever made, not the peak in use). Under
# MicroPython: real epoch start (STSAFE driver: counter, key, ECDH, signature), then N status
# records encoded by firmware/record.py and sealed, a checkpoint every 16, and the figures.
import sys

if sys.implementation.name != "micropython":
    import json
    import pathlib
    import tempfile

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))
    from serene import upy
    from serene.i2c_bridge import I2CBridgeServer
    from serene.stsafe.emulator import StsafeEmulator
    from serene.stsafe.provision import provision

    n = sys.argv[1] if len(sys.argv) > 1 else "1000"
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        provision(d / "home", ["SRN-0001"])
        dev = d / "home" / "devices" / "SRN-0001"
        module = json.loads((dev / "module.json").read_text())
        (d / "cfg.json").write_text(json.dumps(module))
        emu = StsafeEmulator.load(dev / "stsafe.json", time_scale=0, autosave=False)
        code = upy.compile_tree(d / "mpy")
        upy.compile_file(__file__, code / "bench_seal.mpy")
        with I2CBridgeServer({module["i2c_address"]: emu}) as bridge:
            args = ["bench", str(bridge.port), str(d / "cfg.json"), n]
            boot = "import sys\nsys.argv[:] = %r\nimport bench_seal\n" % args
            best = None
            for kib in range(96, 272, 16):
                res = upy.run(["-c", boot], heap="%dK" % kib, code_dir=code, cwd=code,
                              timeout=600)  # fmt: skip
                emu.power_cycle()
                if res.returncode == 0:
                    best = (kib, res.stdout)
                    break
                if "--why" in sys.argv:
                    print(kib, res.stdout[-300:], res.stderr[-300:])
            if best is None:
                print(res.stdout, res.stderr)
                sys.exit(1)
            # Timings from a roomy heap (no GC pressure in the figures).
            res = upy.run(["-c", boot], heap="256K", code_dir=code, cwd=code, timeout=600)
            print(res.stdout, end="")
            print("peak heap, whole run (smallest -X heapsize that runs it): %d KiB" % best[0])
    sys.exit(0)

import gc

import drivers.stsafe  # noqa: E402,F401  (imported by the app anyway; not counted below)

gc.collect()
_h0 = gc.mem_alloc()
from firmware import ack, cbor, checkpoint, epoch, seal, signed  # noqa: E402,F401
from firmware.crypto import aes_ccm, hkdf  # noqa: E402,F401

gc.collect()
_import_cost = gc.mem_alloc() - _h0

import asyncio  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from binascii import unhexlify  # noqa: E402

import micropython  # noqa: E402
from drivers.stsafe import STSAFE  # noqa: E402
from drivers.unix.i2c_bridge import SocketI2C  # noqa: E402
from firmware import record  # noqa: E402
from firmware.checkpoint import Checkpointer  # noqa: E402
from firmware.epoch import derive_keys, start  # noqa: E402
from firmware.seal import sealed_len  # noqa: E402


class _Status:
    # A typical periodic status: rate, volume, dose, remaining, alarms, state, battery, power.
    def __init__(self, i):
        for name, _ in record.STATUS_FIELDS:
            setattr(self, name, -1)
        self.rate = 1250
        self.volume = 100000 + 37 * i
        self.dose = 1500000
        self.remaining = 600 - i % 600
        self.alarms = 0
        self.state = 2
        self.battery = 87
        self.power = 1


def _us(t0):
    return time.ticks_diff(time.ticks_us(), t0)


async def main(port, cfg_path, n):
    with open(cfg_path) as f:
        m = json.load(f)
    import drivers.stsafe.commands as c

    c.WAIT_MS = (0,) * len(c.WAIT_MS)  # the emulator answers at once (time_scale 0)
    i2c = SocketI2C("127.0.0.1", port)
    se = STSAFE(i2c, host_mac_key=unhexlify(m["host_mac_key"]),
                host_cipher_key=unhexlify(m["host_cipher_key"]))  # fmt: skip
    await se.init()
    gc.collect()
    print("heap: sealing modules' code loaded from .mpy (frozen on a board: 0): %d bytes"
          % _import_cost)  # fmt: skip
    print("heap in use after all imports (driver, asyncio...) and SE init: %d bytes"
          % gc.mem_alloc())  # fmt: skip
    z = m["zones"]
    server_pub = await se.read(z["server_key"]["zone"], z["server_key"]["offset"], 65)
    cert = await se.read_certificate(z["certificate"]["zone"])
    gc.collect()
    heap0 = gc.mem_alloc()
    t0 = time.ticks_us()
    ep = await start(se, m["device_id"].encode(), server_pub, z["epoch_counter"]["zone"])
    t_epoch = _us(t0)
    cp = Checkpointer(ep, 16, 600000)
    enc = record.RecordEncoder()
    out = bytearray(record.RECORD_MAX + 32)
    gc.collect()
    held = gc.mem_alloc() - heap0
    rec_ref = signed.unprotected_x5t(cert)
    rec_val = signed.unprotected_x5chain(cert)
    print("epoch record, certificate by reference (x5t): %d bytes" % len(ep.record(rec_ref)))
    print("epoch record, certificate by value (x5chain, %d-byte cert): %d bytes"
          % (len(cert), len(ep.record(rec_val))))  # fmt: skip
    print("epoch start (counter, key, ECDH, HKDF, signature; emulated SE, no chip waits): %d ms"
          % (t_epoch // 1000))  # fmt: skip
    print("heap held by the epoch (sealer, ack opener, checkpointer, buffers): %d bytes" % held)
    gc.collect()
    gc.disable()
    a = gc.mem_alloc()
    keys = derive_keys(bytes(32), b"SRN-0001", 1)
    epoch.Epoch(b"SRN-0001", 1, b"\x02" + bytes(32), keys)
    transient = gc.mem_alloc() - a
    gc.enable()
    print("heap allocated by key derivation + epoch setup (upper bound of its peak): %d bytes"
          % transient)  # fmt: skip

    stats = [_Status(i) for i in range(8)]
    # CBOR encoding alone
    t0 = time.ticks_us()
    for i in range(n):
        enc.status(i + 1, 1700000000 + i, stats[i & 7])
    t_cbor = _us(t0)
    # encoding + sealing, and encoding + sealing + checkpoint chain
    o_min = s_min = 1 << 30
    o_max = s_max = o_sum = 0
    alloc = 0
    t_seal = 0
    t_chain = 0
    cps = cp_len = 0
    for i in range(n):
        rec = enc.status(i + 1, 1700000000 + i, stats[i & 7])
        seq = ep.next_seq()
        gc.disable()
        a = gc.mem_alloc()
        t0 = time.ticks_us()
        k = ep.sealer.seal(seq, rec, out)
        t_seal += _us(t0)
        alloc += gc.mem_alloc() - a
        gc.enable()
        if k != sealed_len(seq, len(rec)):
            raise AssertionError("length")
        t0 = time.ticks_us()
        cp.add(seq, memoryview(out)[:k])
        t_chain += _us(t0)
        o = k - len(rec)
        o_min, o_max, o_sum = min(o_min, o), max(o_max, o), o_sum + o
        s_min, s_max = min(s_min, len(rec)), max(s_max, len(rec))
        if cp.due():
            cseq = ep.next_seq()
            p, obj = await cp.checkpoint(se, cseq)
            cp.commit(cseq, p)
            cp_len = len(obj)
            cps += 1
    print("records: %d status records of %d..%d bytes (CBOR)" % (n, s_min, s_max))
    print("protection overhead per record: %d..%d bytes (mean %.2f); +4 with the kid"
          % (o_min, o_max, o_sum / n))  # fmt: skip
    print("checkpoint object: %d bytes (%d made, one per 16 records)" % (cp_len, cps))
    print("CBOR-encode one record: %.1f us" % (t_cbor / n))
    print("seal one record: %.1f us" % (t_seal / n))
    print("seal / CBOR-encode cost ratio: %.1f" % (t_seal / t_cbor))
    print("checkpoint chain update per record: %.1f us" % (t_chain / n))
    print("heap allocated per sealed record: %.2f bytes" % (alloc / n))
    print("micropython.mem_peak (every allocation ever, not in use): %d" % micropython.mem_peak())


asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
