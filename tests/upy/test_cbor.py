# firmware/cbor.py against the examples of RFC 8949 Appendix A (Table 6), the deterministic
# encoding rules of RFC 8949 §4.2.1, and strict rejection of malformed input.
from binascii import hexlify, unhexlify

from firmware import cbor

# (value, hex) from RFC 8949 Appendix A, every example the data model covers (simple values
# other than false/true/null, undefined and indefinite lengths are out of scope and rejected).
_RFC8949_A = [
    (0, "00"), (1, "01"), (10, "0a"), (23, "17"), (24, "1818"), (25, "1819"), (100, "1864"),
    (1000, "1903e8"), (1000000, "1a000f4240"), (1000000000000, "1b000000e8d4a51000"),
    (18446744073709551615, "1bffffffffffffffff"), (-18446744073709551616, "3bffffffffffffffff"),
    (-1, "20"), (-10, "29"), (-100, "3863"), (-1000, "3903e7"),
    (0.0, "f90000"), (-0.0, "f98000"), (1.0, "f93c00"), (1.1, "fb3ff199999999999a"),
    (1.5, "f93e00"), (65504.0, "f97bff"), (100000.0, "fa47c35000"),
    (3.4028234663852886e38, "fa7f7fffff"), (1.0e300, "fb7e37e43c8800759c"),
    (5.960464477539063e-8, "f90001"), (0.00006103515625, "f90400"), (-4.0, "f9c400"),
    (-4.1, "fbc010666666666666"), (float("inf"), "f97c00"), (float("-inf"), "f9fc00"),
    (False, "f4"), (True, "f5"), (None, "f6"),
    (b"", "40"), (b"\x01\x02\x03\x04", "4401020304"),
    ("", "60"), ("a", "6161"), ("IETF", "6449455446"), ('"\\', "62225c"),
    ("\u00fc", "62c3bc"), ("\u6c34", "63e6b0b4"), ("\U00010151", "64f0908591"),
    ([], "80"), ([1, 2, 3], "83010203"), ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"), ({1: 2, 3: 4}, "a201020304"), ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    ({"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"},
     "a56161614161626142616361436164614461656145"),
    (cbor.Tag(1, 1363896240), "c11a514b67b0"), (cbor.Tag(23, b"\x01\x02\x03\x04"), "d74401020304"),
    (cbor.Tag(24, b"\x64IETF"), "d818456449455446"),
    (cbor.Tag(32, "http://www.example.com"), "d82076687474703a2f2f7777772e6578616d706c652e636f6d"),
]


def _same(a, b):
    # Equal including the sign of zero (0.0 == -0.0 in Python).
    if isinstance(a, float) and a == 0.0:
        return isinstance(b, float) and b == 0.0 and str(a) == str(b)
    return a == b and type(a) == type(b)


def test_rfc8949_appendix_a_encode():
    for value, hx in _RFC8949_A:
        got = hexlify(cbor.encode(value)).decode()
        if got != hx:
            raise AssertionError("%r: %s != %s" % (value, got, hx))


def test_rfc8949_appendix_a_decode():
    for value, hx in _RFC8949_A:
        got = cbor.decode(unhexlify(hx))
        if not _same(got, value):
            raise AssertionError("%s: %r != %r" % (hx, got, value))


def test_nan_is_canonical_half():
    assert cbor.encode(float("nan")) == b"\xf9\x7e\x00"
    x = cbor.decode(b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00")
    assert x != x


def test_subnormal_half_floats_are_shortest():
    # binary16 subnormals (m * 2**-24): MicroPython's struct "e" mis-packs them, the encoder
    # must not rely on it. 0x8214 = -532 * 2**-24; 0x03ff = largest subnormal.
    assert cbor.encode(-532 * 2.0**-24) == b"\xf9\x82\x14"
    assert cbor.encode(1023 * 2.0**-24) == b"\xf9\x03\xff"
    assert cbor.encode(1025 * 2.0**-25) == b"\xfa\x38\x00\x20\x00"  # needs 11 bits


def test_map_keys_sorted_bytewise_not_length_first():
    # RFC 8949 §4.2.1: bytewise lexicographic order of encoded keys: 0x1864 (100) sorts
    # before 0x20 (-1), unlike RFC 7049's length-first canonical order.
    assert cbor.encode({-1: 0, 100: 0, "a": 0, 10: 0}) == unhexlify("a40a00186400200061610" + "0")


def test_encoder_writes_into_caller_buffer():
    buf = bytearray(32)
    enc = cbor.Encoder(buf)
    enc.array(4)
    enc.uint(500)
    enc.int(-500)
    enc.bytes(memoryview(b"xyz")[1:])
    enc.map(1)
    enc.text(b"k")
    enc.null()
    v = enc.view()
    assert bytes(v) == unhexlify("841901f43901f342797aa1616bf6")
    assert enc.n == len(v)
    buf[0] = 0x85
    assert v[0] == 0x85  # aliases buf
    enc.reset()
    enc.bool(True)
    enc.tag(24)
    enc.raw(b"\x40")
    enc.float(1.5)
    assert bytes(enc.view()) == unhexlify("f5d81840f93e00")


def test_encoder_overflow_writes_nothing():
    enc = cbor.Encoder(bytearray(4))
    enc.uint(1)
    for call in (
        lambda: enc.uint(0x10000),
        lambda: enc.bytes(b"abcd"),
        lambda: enc.text("abcd"),
        lambda: enc.float(0.1),
    ):
        try:
            call()
        except cbor.CborError as e:
            assert e.reason == "overflow"
        else:
            raise AssertionError("no overflow")
        assert enc.n == 1
    enc.bytes(b"ab")
    assert bytes(enc.view()) == b"\x01\x42ab"
    for bad in (lambda: enc.uint(-1), lambda: enc.int(1 << 64), lambda: enc.int(-(1 << 64) - 1)):
        try:
            bad()
        except cbor.CborError:
            pass
        else:
            raise AssertionError("accepted")


def test_encode_rejects_unsupported_type():
    try:
        cbor.encode({1: object()})
    except cbor.CborError as e:
        assert "unsupported" in e.reason
    else:
        raise AssertionError("accepted")


_BAD = [
    ("", "truncated"),
    ("18", "truncated"),
    ("1817", "non-shortest head"),
    ("1900ff", "non-shortest head"),
    ("1a0000ffff", "non-shortest head"),
    ("1b00000000ffffffff", "non-shortest head"),
    ("3817", "non-shortest head"),
    ("5f4100ff", "indefinite length"),
    ("9fff", "indefinite length"),
    ("1c", "reserved additional info"),
    ("0102", "trailing bytes"),
    ("4401", "length exceeds input"),
    ("5bffffffffffffffff", "length exceeds input"),
    ("9bffffffffffffffff", "length exceeds input"),
    ("bbffffffffffffffff", "length exceeds input"),
    ("8301", "length exceeds input"),
    ("82010203", "trailing bytes"),
    ("a201000100", "duplicate map key"),
    ("a1800000", "unhashable map key"),
    ("a1c1010000", "tagged map key"),
    ("62c328", "invalid utf-8"),
    ("f7", "unsupported simple value"),
    ("f0", "unsupported simple value"),
    ("f820", "unsupported simple value"),
    ("f97e", "truncated"),
    ("c1", "truncated"),
]


def test_decode_rejects_malformed_with_reason():
    for hx, reason in _BAD:
        try:
            got = cbor.decode(unhexlify(hx))
        except cbor.CborError as e:
            if e.reason != reason:
                raise AssertionError("%s: %s, expected %s" % (hx, e.reason, reason))
        else:
            raise AssertionError("%s accepted as %r" % (hx, got))


def test_depth_limit():
    ok = b"\x81" * (cbor.MAX_DEPTH) + b"\x00"
    cbor.decode(ok)
    try:
        cbor.decode(b"\x81" * (cbor.MAX_DEPTH + 1) + b"\x00")
    except cbor.CborError as e:
        assert e.reason == "too deep"
    else:
        raise AssertionError("accepted")


def test_decode_prefix_reads_a_sequence():
    data = memoryview(b"\x01\x42ab\x80")
    out = []
    p = 0
    while p < len(data):
        obj, p = cbor.decode_prefix(data, p)
        out.append(obj)
    assert out == [1, b"ab", []]
