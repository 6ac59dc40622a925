"""Outbox (firmware/outbox.py) seen from the host.

- The segment and state files are parsed here with an independent implementation of the layout
  documented in the module header (struct + zlib.crc32), against objects rebuilt in CPython.
- kill -9 of the writing process at random instants (between any two syscalls): every object
  whose append had returned is on disk, byte for byte, unless a commit that had returned
  acknowledged it; no seq twice; durably acked objects are not pending again.
- RAM stays bounded: a log of thousands of entries is written and recovered in a 64 KiB heap,
  running the mpy-cross build.
"""

import os
import pathlib
import random
import signal
import struct
import time
import zlib

from serene import upy as upy_mod

TOOL = str(upy_mod.REPO / "tests" / "upy" / "outbox_tool.py")
EXTRA = [upy_mod.REPO / "tests" / "upy"]


def obj(kind, epoch, seq):
    """CPython twin of outbox_util.obj."""
    n = 600 if kind == 0 else 20 + (epoch * 7 + seq * 13) % 41
    head = struct.pack("<BII", kind, epoch, seq)
    return bytes(head[i % 9] ^ ((i * 31 + seq) & 0xFF) for i in range(n))


def parse_segment(raw):
    entries, off = [], 0
    while off < len(raw):
        magic, kind, n, epoch, seq = struct.unpack_from("<BBHII", raw, off)
        assert magic == 0xB1
        data = raw[off + 12 : off + 12 + n]
        (crc,) = struct.unpack_from("<I", raw, off + 12 + n)
        assert crc == zlib.crc32(raw[off : off + 12 + n])
        entries.append((kind, epoch, seq, data))
        off += 16 + n
    return entries


def parse_state(raw):
    assert raw[:4] == b"OBS1"
    assert struct.unpack_from("<I", raw, len(raw) - 4)[0] == zlib.crc32(raw[:-4])
    (cnt,) = struct.unpack_from("<H", raw, 4)
    off, acks = 6, {}
    for _ in range(cnt):
        epoch, cum, nb = struct.unpack_from("<IiB", raw, off)
        off += 9
        acks[epoch] = (cum, int.from_bytes(raw[off : off + nb], "little"))
        off += nb
    ov = None
    if raw[off]:
        ov = struct.unpack_from("<IIIII", raw, off + 1)
        off += 20
    assert off + 1 == len(raw) - 4
    return acks, ov


def dump(upy, root, **kw):
    res = upy.run([TOOL, "dump", str(root)], extra_paths=EXTRA, **kw)
    lines = res.stdout.split()
    rep = None
    pending = []
    for line in res.stdout.splitlines():
        f = line.split()
        if f[0] == "R":
            rep = [int(x) for x in f[1:]]
        elif f[0] == "P":
            pending.append((int(f[1]), int(f[2]), int(f[3]), bytes.fromhex(f[4])))
    assert rep is not None, lines
    return rep, pending


def test_files_match_the_documented_layout(upy, tmp_path):
    root = tmp_path / "ob"
    res = upy.run([TOOL, "write", str(root), "5", "40"], extra_paths=EXTRA)
    acked = [int(line.split()[2]) for line in res.stdout.splitlines() if line.startswith("A ")]
    assert acked[-1] == 31  # acks at seq % 7 == 6: cum = seq - 3
    segs = sorted(root.glob("*.seg"))
    entries = [e for p in segs for e in parse_segment(p.read_bytes())]
    # whole acked segments are gone; what is left is a contiguous tail of what was appended
    first = entries[0][2]
    assert [e[2] for e in entries] == list(range(first, 40))
    assert 0 < first <= 32
    for kind, epoch, seq, data in entries:
        assert (epoch, kind, data) == (5, 0 if seq == 0 else 1, obj(kind, epoch, seq))
    acks, ov = parse_state((root / "state").read_bytes())
    assert acks == {5: (31, 0)} and ov is None
    rep, pending = dump(upy, root)
    assert [p[2] for p in pending] == list(range(32, 40))


def test_kill9_at_random_instants_loses_nothing(upy, procs, tmp_path):
    root = tmp_path / "ob"
    rng = random.Random(1234)
    stored, durable, tried = {}, {}, set()
    for epoch in range(1, 13):
        p = upy.popen(
            [TOOL, "write", str(root), str(epoch)],
            extra_paths=EXTRA,
            stdout=__import__("subprocess").PIPE,
        )
        procs.append(p)
        target = rng.randrange(5, 60)
        n = 0
        seen = []
        for raw in p.stdout:
            seen.append(raw)
            if raw.startswith(b"S "):
                n += 1
                if n >= target:
                    break
        time.sleep(rng.random() * 0.003)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        out = b"".join(seen).decode() + p.stdout.read().decode()
        for line in out.splitlines():
            f = line.split()
            if len(f) == 3 and f[0] == "S":
                stored[(int(f[1]), int(f[2]))] = True
            elif len(f) == 3 and f[0] == "A":
                durable[int(f[1])] = int(f[2])
        last = max(s for (e, s) in stored if e == epoch)
        tried.update((epoch, s) for s in range(last + 2))
    rep, pending = dump(upy, root)
    ids = [(p[1], p[2]) for p in pending]
    assert ids == sorted(set(ids)), "order or duplicate"
    by_id = {(p[1], p[2]): p for p in pending}
    for (epoch, seq), p in by_id.items():
        assert (epoch, seq) in tried
        assert p[3] == obj(p[0], epoch, seq)
        assert seq > durable.get(epoch, -1), "durably acked entry pending again"
    for epoch, seq in stored:
        # an ack in RAM whose commit did not return may or may not be durable: the workload acks
        # seq-3 right after appending seq (seq % 7 == 6), so such a seq is <= last stored - 3
        if seq > durable.get(epoch, -1) + 7:
            assert (epoch, seq) in by_id, "stored entry lost"
    assert rep[2] >= 0 and rep[3] == 0


def test_ram_bounded_thousands_of_entries_in_64k_heap(upy, tmp_path):
    root = tmp_path / "ob"
    res = upy.run(
        [TOOL, "write", str(root), "3", "3000", "noack"], extra_paths=EXTRA, heap="64K", mpy=True
    )
    assert res.stdout.splitlines()[-1].startswith("DONE")
    total = sum(p.stat().st_size for p in root.glob("*.seg"))
    assert total > 100_000  # far more than the heap
    rep, pending = dump(upy, root, heap="64K", mpy=True)
    assert rep[:2] == [3000, 3000]
    assert [p[2] for p in pending] == list(range(3000))
    assert all(p[3] == obj(p[0], 3, p[2]) for p in pending[::97])
