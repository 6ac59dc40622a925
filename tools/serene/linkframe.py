"""The module's uplink link frame (docs/link-format.md), host side: parse, build, reassemble.

Written from the format document, independently of firmware/link.py; the two meet on the wire
(tests/test_link.py checks firmware-built frames byte for byte).

    frame   = hdr:u8 (version << 4 | flags) epoch:uvarint entry+
              flags: bit 0 (ACK_REQUESTED) = the module asks for an ack now (LoRa: the
              server spends a downlink on it); bits 1-3 reserved, refused when set
    entry   = kf:u8 (FRAG 0x80 | kind 0..127) seq:uvarint
              [total:uvarint offset:uvarint] len:uvarint data
    uvarint = unsigned LEB128, minimal encoding, at most 5 bytes, value < 2**32

Everything from the radio is untrusted: every violation raises LinkFrameError naming the field.
"""

from dataclasses import dataclass, field

VERSION = 1
FRAG = 0x80
KIND_MASK = 0x7F
#: Header flag bit 0: the module asks for an ack (docs/link-format.md "Frame").
ACK_REQUESTED = 0x01
RESERVED_FLAGS = 0x0E
MAX_U32 = 0xFFFFFFFF
#: kinds fixed by the firmware (the frame carries any kind 0..127)
KINDS = {0: "epoch", 1: "record", 2: "checkpoint", 3: "event"}


class LinkFrameError(ValueError):
    """A frame that is not a valid version-1 uplink frame. `field`: where it went wrong."""

    def __init__(self, field, msg, offset=None):
        where = "" if offset is None else " at byte %d" % offset
        super().__init__("%s: %s%s" % (field, msg, where))
        self.field = field
        self.offset = offset


@dataclass(frozen=True)
class Entry:
    kind: int
    seq: int
    data: bytes
    total: int  # length of the whole object
    offset: int = 0  # where data sits in the object
    fragment: bool = False


@dataclass(frozen=True)
class Frame:
    epoch: int
    entries: tuple
    version: int = VERSION
    flags: int = 0


def _uvarint(buf, i, name):
    v = shift = 0
    start = i
    while True:
        if i >= len(buf):
            raise LinkFrameError(name, "truncated varint", start)
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if i - start >= 5:
            raise LinkFrameError(name, "varint longer than 5 bytes", start)
    if i - start > 1 and b == 0:
        raise LinkFrameError(name, "non-minimal varint", start)
    if v > MAX_U32:
        raise LinkFrameError(name, "value above 2**32-1", start)
    return v, i


def uvarint(v):
    if not 0 <= v <= MAX_U32:
        raise ValueError("uvarint out of range: %r" % v)
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def parse(frame, mtu=None, max_entries=None):
    """Parse one uplink payload into a Frame; LinkFrameError if it is not valid (field
    "entries" if it has more than max_entries entries: parsed no further)."""
    buf = bytes(frame)
    if mtu is not None and len(buf) > mtu:
        raise LinkFrameError("frame", "%d bytes > MTU %d" % (len(buf), mtu))
    if len(buf) < 2:
        raise LinkFrameError("frame", "too short (%d bytes)" % len(buf))
    version, flags = buf[0] >> 4, buf[0] & 0x0F
    if version != VERSION:
        raise LinkFrameError("version", "unsupported version %d" % version, 0)
    if flags & RESERVED_FLAGS:
        raise LinkFrameError("flags", "reserved flags set: 0x%x" % flags, 0)
    epoch, i = _uvarint(buf, 1, "epoch")
    entries = []
    while i < len(buf):
        if max_entries is not None and len(entries) >= max_entries:
            raise LinkFrameError("entries", "more than %d entries" % max_entries, i)
        at = i
        kf = buf[i]
        i += 1
        seq, i = _uvarint(buf, i, "seq")
        frag = bool(kf & FRAG)
        if frag:
            total, i = _uvarint(buf, i, "total")
            offset, i = _uvarint(buf, i, "offset")
        n, i = _uvarint(buf, i, "len")
        if n == 0:
            raise LinkFrameError("len", "empty entry", at)
        if i + n > len(buf):
            raise LinkFrameError("len", "entry of %d bytes overruns the frame" % n, at)
        if frag:
            if offset + n > total:
                raise LinkFrameError("offset", "fragment past the object's end", at)
            if offset == 0 and n == total:
                raise LinkFrameError("total", "a fragment that is the whole object", at)
        else:
            total, offset = n, 0
        entries.append(Entry(kf & KIND_MASK, seq, buf[i : i + n], total, offset, frag))
        i += n
    if not entries:
        raise LinkFrameError("frame", "no entry")
    return Frame(epoch, tuple(entries), version, flags)


def build(frame):
    """The bytes of a Frame (the inverse of parse; raises ValueError on an impossible one)."""
    out = bytearray([(frame.version << 4) | frame.flags])
    out += uvarint(frame.epoch)
    for e in frame.entries:
        if not 0 <= e.kind <= KIND_MASK:
            raise ValueError("kind out of range: %r" % e.kind)
        out.append(e.kind | (FRAG if e.fragment else 0))
        out += uvarint(e.seq)
        if e.fragment:
            out += uvarint(e.total) + uvarint(e.offset)
        out += uvarint(len(e.data)) + e.data
    return bytes(out)


@dataclass
class _Partial:
    kind: int
    total: int
    data: bytearray
    have: bytearray  # one flag a byte

    def missing(self):
        return self.have.count(0)


@dataclass
class Reassembler:
    """Collects entries (whole or fragments, in any order, duplicated, from any MTU) into
    objects. feed() returns the complete object bytes once, when its last byte arrives;
    a fragment that contradicts bytes already received raises LinkFrameError."""

    max_total: int = 4096
    max_partial: int = 64
    partial: dict = field(default_factory=dict)
    done: set = field(default_factory=set)

    def feed(self, epoch, e):
        key = (epoch, e.seq)
        if key in self.done:
            return None
        if not e.fragment:
            self.done.add(key)
            self.partial.pop(key, None)
            return e.data
        if e.total > self.max_total:
            raise LinkFrameError("total", "object of %d bytes too large" % e.total)
        p = self.partial.get(key)
        if p is None:
            if len(self.partial) >= self.max_partial:
                raise LinkFrameError("total", "too many partial objects")
            p = _Partial(e.kind, e.total, bytearray(e.total), bytearray(e.total))
            self.partial[key] = p
        if p.total != e.total or p.kind != e.kind:
            raise LinkFrameError("total", "fragment of %r disagrees on size or kind" % (key,))
        for j, b in enumerate(e.data):
            k = e.offset + j
            if p.have[k] and p.data[k] != b:
                raise LinkFrameError("data", "fragments of %r disagree at byte %d" % (key, k))
            p.data[k] = b
            p.have[k] = 1
        if p.missing():
            return None
        del self.partial[key]
        self.done.add(key)
        return bytes(p.data)
