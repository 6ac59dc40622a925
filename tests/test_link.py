"""Link frames: firmware/link.py builds them under MicroPython, serene.linkframe (written from
docs/link-format.md) parses them here, byte for byte; plus linkframe's own strictness."""

import pytest

from serene import linkframe as lf
from serene import upy as upy_mod

from test_outbox import obj

TOOL = str(upy_mod.REPO / "tests" / "upy" / "link_tool.py")
EXTRA = [upy_mod.REPO / "tests" / "upy"]


def firmware_frames(upy, tmp_path, mtu, *specs):
    res = upy.run([TOOL, str(tmp_path / "ob"), str(mtu)] + list(specs), extra_paths=EXTRA)
    return [bytes.fromhex(line) for line in res.stdout.split()]


def expected(*specs):
    want = {}
    for spec in specs:
        epoch, count = (int(x) for x in spec.split(":"))
        for seq in range(count):
            kind = 0 if seq == 0 else (2 if seq % 10 == 0 else 1)
            want[(epoch, seq)] = (kind, obj(kind, epoch, seq))
    return want


@pytest.mark.parametrize("mtu", [51, 115, 222, 242])
def test_firmware_frames_parse_rebuild_and_reassemble(upy, tmp_path, mtu):
    specs = ("3:45", "4:12")
    frames = firmware_frames(upy, tmp_path, mtu, *specs)
    want = expected(*specs)
    r = lf.Reassembler()
    got = {}
    order = []
    for f in frames:
        fr = lf.parse(f, mtu=mtu)
        assert lf.build(fr) == f  # exact bytes both ways
        for e in fr.entries:
            data = r.feed(fr.epoch, e)
            if data is not None:
                got[(fr.epoch, e.seq)] = (e.kind, data)
                order.append((fr.epoch, e.seq))
    assert got == want
    assert order == sorted(want)  # log order: epoch record first, checkpoints in place
    assert not r.partial
    # frames are full: each but the last of an epoch leaves less room than the next object
    assert max(len(f) for f in frames) <= mtu


def test_doc_example_exact_bytes(upy, tmp_path):
    # docs/link-format.md: the 600-byte epoch record at MTU 51
    frames = firmware_frames(upy, tmp_path, 51, "5:1")
    rec = obj(0, 5, 0)
    assert frames[0] == bytes.fromhex("100580 00 d804 00 2b".replace(" ", "")) + rec[:43]
    assert frames[1] == bytes.fromhex("10058000d8042b2b") + rec[43:86]
    assert len(frames) == 15
    last = lf.parse(frames[-1])
    assert (last.entries[0].offset, len(last.entries[0].data)) == (591, 9)
    built = lf.build(lf.Frame(5, (lf.Entry(0, 0, rec[:43], 600, 0, True),)))
    assert built == frames[0]


def test_small_records_example():
    a, b, c = bytes(range(1, 11)), bytes(range(0x11, 0x1D)), bytes(range(40))
    f1 = lf.build(lf.Frame(5, (lf.Entry(1, 1, a, 10), lf.Entry(1, 2, b, 12))))
    f2 = lf.build(lf.Frame(5, (lf.Entry(2, 300, c, 40),)))
    assert f1 == b"\x10\x05\x01\x01\x0a" + a + b"\x01\x02\x0c" + b and len(f1) == 30
    assert f2 == b"\x10\x05\x02\xac\x02\x28" + c and len(f2) == 46


@pytest.mark.parametrize(
    "frame,field",
    [
        (b"", "frame"),
        (b"\x20\x05\x01\x01\x01\x00", "version"),
        (b"\x12\x05\x01\x01\x01\x00", "flags"),  # reserved flag bits 1-3
        (b"\x14\x05\x01\x01\x01\x00", "flags"),
        (b"\x18\x05\x01\x01\x01\x00", "flags"),
        (b"\x13\x05\x01\x01\x01\x00", "flags"),  # ack requested + a reserved bit
        (b"\x10\x05", "frame"),
        (b"\x10\x85", "epoch"),  # truncated varint
        (b"\x10\x80\x00\x01\x01\x01\x00", "epoch"),  # non-minimal
        (b"\x10\xff\xff\xff\xff\x7f\x01\x01\x01\x00", "epoch"),  # > 2**32-1
        (b"\x10\x05\x01\x01\x00", "len"),  # empty entry
        (b"\x10\x05\x01\x01\x05\x00", "len"),  # overruns
        (b"\x10\x05\x81\x01\x04\x03\x02\xaa\xbb", "offset"),  # 3 + 2 > 4
        (b"\x10\x05\x81\x01\x02\x00\x02\xaa\xbb", "total"),  # a fragment that is everything
    ],
)
def test_parse_rejects_with_named_field(frame, field):
    with pytest.raises(lf.LinkFrameError) as ei:
        lf.parse(frame)
    assert ei.value.field == field


def test_ack_requested_flag():
    f = lf.parse(b"\x11\x05\x01\x01\x01\x00")
    assert f.flags == lf.ACK_REQUESTED and f.entries[0].data == b"\x00"
    assert lf.build(f) == b"\x11\x05\x01\x01\x01\x00"
    assert lf.parse(b"\x10\x05\x01\x01\x01\x00").flags == 0


def test_parse_rejects_frame_over_mtu():
    f = lf.build(lf.Frame(1, (lf.Entry(1, 0, b"x" * 60, 60),)))
    with pytest.raises(lf.LinkFrameError):
        lf.parse(f, mtu=51)


def test_reassembler_mixed_fragmentations_and_conflicts():
    data = bytes(range(200))
    r = lf.Reassembler()
    # cut once at MTU 51 sizes, once differently (failover), fed out of order and duplicated
    parts = [lf.Entry(0, 0, data[o : o + 43], 200, o, True) for o in range(0, 200, 43)]
    other = [lf.Entry(0, 0, data[o : o + 100], 200, o, True) for o in (0, 100)]
    assert r.feed(7, parts[3]) is None
    assert r.feed(7, parts[3]) is None
    assert r.feed(7, other[1]) is None
    assert r.feed(7, parts[0]) is None
    assert r.feed(7, parts[1]) is None
    assert r.feed(7, parts[2]) == data
    assert r.feed(7, other[0]) is None  # already complete: delivered once
    bad = lf.Entry(0, 1, b"\x00" * 10, 50, 0, True)
    r.feed(7, bad)
    with pytest.raises(lf.LinkFrameError) as ei:
        r.feed(7, lf.Entry(0, 1, b"\x01" * 10, 50, 5, True))
    assert ei.value.field == "data"
