# firmware/crypto/hkdf.py against RFC 5869 Appendix A, test cases 1-3 (SHA-256), PRK and OKM.
from binascii import hexlify, unhexlify

from firmware.crypto import hkdf

_CASES = [
    # (IKM, salt, info, L, PRK, OKM)
    (b"\x0b" * 22, bytes(range(0x0D)), bytes(range(0xF0, 0xFA)), 42,
     "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    (bytes(range(0x50)), bytes(range(0x60, 0xB0)), bytes(range(0xB0, 0x100)), 82,
     "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
     "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
     "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
     "cc30c58179ec3e87c14c01d5c1f3434f1d87"),
    (b"\x0b" * 22, b"", b"", 42,
     "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
]


def test_rfc5869_sha256_cases():
    for i, (ikm, salt, info, n, prk, okm) in enumerate(_CASES):
        got_prk = hkdf.hkdf_extract(salt, ikm)
        if hexlify(got_prk).decode() != prk:
            raise AssertionError("case %d PRK" % (i + 1))
        got = hkdf.hkdf_expand(got_prk, info, n)
        if hexlify(got).decode() != okm:
            raise AssertionError("case %d OKM" % (i + 1))
        assert hkdf.hkdf(salt, ikm, info, n) == unhexlify(okm)


def test_hmac_long_key_and_parts():
    # RFC 4231 test case 6: 131-byte key (longer than the block: hashed first).
    key = b"\xaa" * 131
    mac = hkdf.hmac_sha256(key, b"Test Using Larger Than Block-Size Key - ", b"Hash Key First")
    assert hexlify(mac) == b"60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"


def test_expand_length_limit():
    try:
        hkdf.hkdf_expand(bytes(32), b"", 255 * 32 + 1)
    except hkdf.HkdfError:
        pass
    else:
        raise AssertionError("accepted")
    assert len(hkdf.hkdf_expand(bytes(32), b"", 255 * 32)) == 255 * 32
