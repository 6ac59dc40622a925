# HMAC-SHA256 (RFC 2104) and HKDF-SHA256 (RFC 5869) on MicroPython's hashlib.
# MIT licence, (c) serene-module authors.
#
# Used at epoch start (key derivation, RFC 9053 §5.1 "ECDH-ES + HKDF-256"), not per record,
# so small allocations here are acceptable. MicroPython's sha256 has no copy(), so each HMAC
# hashes the padded key again.
# Checked against RFC 5869 Appendix A test cases 1-3 (tests/upy/test_crypto_hkdf.py) and
# against `cryptography` on random cases (tests/test_seal_agreement.py).
import hashlib
from micropython import const

_BLOCK = const(64)  # SHA-256 block size
HASH_LEN = const(32)


class HkdfError(ValueError):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def _pads(key):
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    ipad = bytearray(_BLOCK)
    opad = bytearray(_BLOCK)
    for i in range(_BLOCK):
        k = key[i] if i < len(key) else 0
        ipad[i] = k ^ 0x36
        opad[i] = k ^ 0x5C
    return ipad, opad


def hmac_sha256(key, *parts):
    """HMAC-SHA256 of the concatenation of parts (bytes-like) under key; 32 bytes."""
    ipad, opad = _pads(key)
    h = hashlib.sha256(ipad)
    for p in parts:
        h.update(p)
    inner = h.digest()
    h = hashlib.sha256(opad)
    h.update(inner)
    return h.digest()


def hkdf_extract(salt, ikm):
    """PRK = HMAC(salt, IKM); an empty or None salt means HashLen zero bytes (§2.2)."""
    return hmac_sha256(salt if salt else bytes(HASH_LEN), ikm)


def hkdf_expand(prk, info, length):
    """OKM, `length` bytes (at most 255 * 32, §2.3)."""
    if length > 255 * HASH_LEN or length < 0:
        raise HkdfError("length")
    out = bytearray(length)
    t = b""
    pos = 0
    i = 1
    while pos < length:
        t = hmac_sha256(prk, t, info, bytes((i,)))
        n = min(HASH_LEN, length - pos)
        out[pos : pos + n] = t[:n]
        pos += n
        i += 1
    return bytes(out)


def hkdf(salt, ikm, info, length):
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)
