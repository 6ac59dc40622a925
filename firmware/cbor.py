# CBOR (RFC 8949) encoder and strict decoder for the firmware.
# MIT licence, (c) serene-module authors.
#
# Encoding is deterministic as in RFC 8949 §4.2.1 ("core deterministic encoding"): integers,
# lengths and tags in their shortest head, definite lengths only, map keys sorted by the
# bytewise order of their encodings (encode() only; an Encoder writes items in the order the
# caller gives), floats in the shortest of half/single/double that keeps the value (§4.2.2).
#
# Encoder writes into a caller's preallocated bytearray: no allocation per item, so the record
# path does not churn the heap. decode() is for data from the wire: it accepts exactly one
# well-formed item of the subset below and raises CborError(reason) for anything else.
#
# Data model: int (major 0/1, -2**64 .. 2**64-1), bytes (2), str (3), list (4), dict (5),
# Tag (6), False/True/None and float (7). Not supported, rejected by decode(): indefinite
# lengths, undefined and other simple values, non-shortest integer heads, duplicate map keys,
# unhashable (array/map) map keys, invalid UTF-8, trailing bytes, nesting deeper than
# MAX_DEPTH.
import struct
from micropython import const

_MAJ_UINT = const(0)
_MAJ_NINT = const(1)
_MAJ_BYTES = const(2)
_MAJ_TEXT = const(3)
_MAJ_ARRAY = const(4)
_MAJ_MAP = const(5)
_MAJ_TAG = const(6)
_MAJ_SIMPLE = const(7)

_AI_1 = const(24)  # additional info: 1-byte argument follows
_AI_2 = const(25)
_AI_4 = const(26)
_AI_8 = const(27)
_AI_INDEF = const(31)

_FALSE = const(0xF4)
_TRUE = const(0xF5)
_NULL = const(0xF6)

#: Deepest nesting of arrays/maps/tags decode() accepts (a record is 2-3 levels deep).
MAX_DEPTH = 16

_U64_LIMIT = 1 << 64


class CborError(ValueError):
    """Bad CBOR input, or an Encoder buffer too small. `reason` names the problem; `offset`
    is the input offset where it was found (decode) or the write offset (encode), or -1."""

    def __init__(self, reason, offset=-1):
        super().__init__(reason, offset)
        self.reason = reason
        self.offset = offset


class Tag:
    """A tagged item (major type 6): `tag` number and `value`."""

    def __init__(self, tag, value):
        self.tag = tag
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Tag) and other.tag == self.tag and other.value == self.value

    def __repr__(self):
        return "Tag(%d, %r)" % (self.tag, self.value)


class Encoder:
    """Writes CBOR items into `buf` (a bytearray) from offset 0.

    `n` is the number of bytes written so far. Every method raises CborError("overflow") and
    writes nothing when the item does not fit; the buffer is never grown. Arrays and maps
    are written as a head (`array(count)`, `map(count)`) followed by their items."""

    def __init__(self, buf):
        self.buf = buf
        self._mv = memoryview(buf)
        self.n = 0

    def reset(self):
        self.n = 0

    def view(self):
        """What was written so far, as a memoryview that aliases `buf` (valid until the next
        reset/write)."""
        return self._mv[: self.n]

    def _head(self, major, v):
        # Shortest head for argument v (RFC 8949 §3 and §4.2.1).
        buf = self.buf
        i = self.n
        mt = major << 5
        if v < 24:
            if i >= len(buf):
                raise CborError("overflow", i)
            buf[i] = mt | v
            self.n = i + 1
        elif v < 0x100:
            if i + 2 > len(buf):
                raise CborError("overflow", i)
            buf[i] = mt | _AI_1
            buf[i + 1] = v
            self.n = i + 2
        elif v < 0x10000:
            if i + 3 > len(buf):
                raise CborError("overflow", i)
            buf[i] = mt | _AI_2
            buf[i + 1] = v >> 8
            buf[i + 2] = v & 0xFF
            self.n = i + 3
        elif v < 0x100000000:
            if i + 5 > len(buf):
                raise CborError("overflow", i)
            buf[i] = mt | _AI_4
            struct.pack_into(">I", buf, i + 1, v)
            self.n = i + 5
        elif v < _U64_LIMIT:
            if i + 9 > len(buf):
                raise CborError("overflow", i)
            buf[i] = mt | _AI_8
            struct.pack_into(">Q", buf, i + 1, v)
            self.n = i + 9
        else:
            raise CborError("int out of range", i)

    def uint(self, n):
        if n < 0:
            raise CborError("negative uint", self.n)
        self._head(_MAJ_UINT, n)

    def int(self, n):
        if n >= 0:
            self._head(_MAJ_UINT, n)
        else:
            self._head(_MAJ_NINT, -1 - n)

    def _payload(self, major, b, ln):
        start = self.n
        self._head(major, ln)
        i = self.n
        if i + ln > len(self.buf):
            self.n = start
            raise CborError("overflow", start)
        self._mv[i : i + ln] = b
        self.n = i + ln

    def bytes(self, b):
        """A byte string; b is bytes, bytearray or memoryview (copied, not kept)."""
        self._payload(_MAJ_BYTES, b, len(b))

    def text(self, s):
        """A text string. s is a str (encoded to UTF-8: allocates) or bytes-like already in
        UTF-8 (no allocation; not validated)."""
        if isinstance(s, str):
            s = s.encode()
        self._payload(_MAJ_TEXT, s, len(s))

    def array(self, count):
        self._head(_MAJ_ARRAY, count)

    def map(self, count):
        self._head(_MAJ_MAP, count)

    def tag(self, n):
        self._head(_MAJ_TAG, n)

    def _byte(self, v):
        i = self.n
        if i >= len(self.buf):
            raise CborError("overflow", i)
        self.buf[i] = v
        self.n = i + 1

    def bool(self, v):
        self._byte(_TRUE if v else _FALSE)

    def null(self):
        self._byte(_NULL)

    def float(self, x):
        """Shortest of half/single/double that keeps the value (RFC 8949 §4.2.2; NaN as
        0xf97e00). On a single-precision port, at most a single is written."""
        i = self.n
        buf = self.buf
        if x != x:
            h = 0x7E00
        else:
            h = _half_bits(x)
        if h >= 0:
            if i + 3 > len(buf):
                raise CborError("overflow", i)
            buf[i] = 0xF9
            buf[i + 1] = h >> 8
            buf[i + 2] = h & 0xFF
            self.n = i + 3
            return
        if _fits_single(x):
            need, fmt, ai = 5, ">f", _AI_4
        else:
            need, fmt, ai = 9, ">d", _AI_8
        if i + need > len(buf):
            raise CborError("overflow", i)
        buf[i] = 0xE0 | ai
        struct.pack_into(fmt, buf, i + 1, x)
        self.n = i + need

    def raw(self, b):
        """Bytes already CBOR-encoded (e.g. a nested item encoded elsewhere), copied as is."""
        i = self.n
        ln = len(b)
        if i + ln > len(self.buf):
            raise CborError("overflow", i)
        self._mv[i : i + ln] = b
        self.n = i + ln

    def item(self, obj):
        """Any supported object (see encode()); maps are written with sorted keys."""
        if obj is None:
            self.null()
        elif obj is True or obj is False:
            self.bool(obj)
        elif isinstance(obj, int):
            self.int(obj)
        elif isinstance(obj, (bytes, bytearray, memoryview)):
            self.bytes(obj)
        elif isinstance(obj, str):
            self.text(obj)
        elif isinstance(obj, (list, tuple)):
            self.array(len(obj))
            for x in obj:
                self.item(x)
        elif isinstance(obj, dict):
            self.map(len(obj))
            # Core deterministic order: bytewise lexicographic order of the encoded keys.
            pairs = sorted(((encode(k), k) for k in obj), key=_first)
            for ek, k in pairs:
                self.raw(ek)
                self.item(obj[k])
        elif isinstance(obj, float):
            self.float(obj)
        elif isinstance(obj, Tag):
            self.tag(obj.tag)
            self.item(obj.value)
        else:
            raise CborError("unsupported type %s" % type(obj).__name__, self.n)


def _fits_single(x):
    try:
        return struct.unpack(">f", struct.pack(">f", x))[0] == x
    except (OverflowError, ValueError):
        return False


def _half_bits(x):
    # IEEE 754 binary16 bits of x when x is exactly representable, else -1. Computed from
    # the binary32 bits: MicroPython's struct "e" packs subnormal halves wrongly (1.29).
    if not _fits_single(x):
        return -1
    b = struct.unpack(">I", struct.pack(">f", x))[0]
    sign = (b >> 16) & 0x8000
    exp = (b >> 23) & 0xFF
    mant = b & 0x7FFFFF
    if exp == 0xFF:  # infinity (NaN is handled by the caller)
        return sign | 0x7C00
    if exp == 0:
        return sign if mant == 0 else -1  # zero; binary32 subnormals are far below half range
    e = exp - 127
    if -14 <= e <= 15:
        return -1 if mant & 0x1FFF else sign | ((e + 15) << 10) | (mant >> 13)
    if -24 <= e < -14:  # a half subnormal: value = m * 2**-24
        m = 0x800000 | mant
        shift = -(e + 1)
        return -1 if m & ((1 << shift) - 1) else sign | (m >> shift)
    return -1


def _first(t):
    return t[0]


def encode(obj):
    """Deterministic CBOR encoding of obj as new bytes (allocates; for setup paths and tests,
    not the per-record path: use an Encoder there)."""
    size = 64
    while True:
        enc = Encoder(bytearray(size))
        try:
            enc.item(obj)
        except CborError as e:
            if e.reason != "overflow":
                raise
            size *= 4
            continue
        return bytes(enc.view())


def _arg(d, p, end, ai, major):
    # Returns (argument, new offset) for additional info `ai` of the head at p - 1.
    if ai < 24:
        return ai, p
    if ai == _AI_1:
        need = 1
    elif ai == _AI_2:
        need = 2
    elif ai == _AI_4:
        need = 4
    elif ai == _AI_8:
        need = 8
    elif ai == _AI_INDEF:
        raise CborError("indefinite length", p - 1)
    else:
        raise CborError("reserved additional info", p - 1)
    if p + need > end:
        raise CborError("truncated", p - 1)
    v = 0
    for k in range(p, p + need):
        v = (v << 8) | d[k]
    if major != _MAJ_SIMPLE and v < (24 if need == 1 else 1 << (4 * need)):
        raise CborError("non-shortest head", p - 1)
    return v, p + need


def _item(d, p, end, depth):
    if p >= end:
        raise CborError("truncated", p)
    ib = d[p]
    major = ib >> 5
    ai = ib & 0x1F
    start = p
    if major == _MAJ_SIMPLE:
        if ai == 20:
            return False, p + 1
        if ai == 21:
            return True, p + 1
        if ai == 22:
            return None, p + 1
        if ai in (_AI_2, _AI_4, _AI_8):
            need = 1 << (ai - _AI_2 + 1)
            if p + 1 + need > end:
                raise CborError("truncated", p)
            fmt = ">e" if need == 2 else (">f" if need == 4 else ">d")
            return struct.unpack(fmt, d[p + 1 : p + 1 + need])[0], p + 1 + need
        raise CborError("unsupported simple value", p)
    v, p = _arg(d, p + 1, end, ai, major)
    if major == _MAJ_UINT:
        return v, p
    if major == _MAJ_NINT:
        return -1 - v, p
    if major == _MAJ_BYTES or major == _MAJ_TEXT:
        if v > end - p:
            raise CborError("length exceeds input", start)
        b = bytes(d[p : p + v])
        if major == _MAJ_TEXT:
            try:
                b = str(b, "utf-8")
            except UnicodeError:
                raise CborError("invalid utf-8", start) from None
        return b, p + v
    if depth >= MAX_DEPTH:
        raise CborError("too deep", start)
    if major == _MAJ_ARRAY:
        if v > end - p:  # every item takes at least one byte
            raise CborError("length exceeds input", start)
        out = [None] * v
        for k in range(v):
            out[k], p = _item(d, p, end, depth + 1)
        return out, p
    if major == _MAJ_MAP:
        if 2 * v > end - p:
            raise CborError("length exceeds input", start)
        out = {}
        for _ in range(v):
            kp = p
            k, p = _item(d, p, end, depth + 1)
            if isinstance(k, (list, dict)):
                raise CborError("unhashable map key", kp)
            if isinstance(k, Tag):
                raise CborError("tagged map key", kp)
            if k in out:
                raise CborError("duplicate map key", kp)
            out[k], p = _item(d, p, end, depth + 1)
        return out, p
    # major 6
    val, p = _item(d, p, end, depth + 1)
    return Tag(v, val), p


def decode_prefix(data, offset=0):
    """Decode one item starting at `offset`; return (obj, end offset). Trailing bytes after
    the item are allowed (the caller reads a sequence of items)."""
    d = data if isinstance(data, memoryview) else memoryview(data)
    return _item(d, offset, len(d), 0)


def decode(data):
    """Decode exactly one CBOR item from data (bytes-like); CborError on anything else."""
    d = data if isinstance(data, memoryview) else memoryview(data)
    obj, p = _item(d, 0, len(d), 0)
    if p != len(d):
        raise CborError("trailing bytes", p)
    return obj
