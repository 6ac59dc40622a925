# AES-CCM (RFC 3610) on cryptolib's AES-ECB: COSE algorithm 10, AES-CCM-16-64-128
# (RFC 9053 §4.2: 128-bit key, L = 2, M = 8 bytes of tag, 13-byte nonce) by default.
# MIT licence, (c) serene-module authors.
#
# MicroPython's cryptolib has ECB and CBC, no CTR, so both halves of CCM are built here on
# single-block ECB: the CBC-MAC (RFC 3610 §2.2) and CTR encryption (§2.3). All scratch
# blocks are allocated once per AesCcm object; encrypt/decrypt allocate nothing.
#
# Checked against the RFC 3610 §8 packet vectors with M = 8 (tests/upy/test_crypto_ccm.py)
# and against `cryptography`'s AESCCM on random cases (tests/test_seal_agreement.py).
import cryptolib
from micropython import const

_BLOCK = const(16)
_AES_ECB = const(1)  # cryptolib mode 1 = ECB
_ADATA = const(0x40)  # B0 flag: additional authenticated data present (RFC 3610 §2.2)


class CcmError(ValueError):
    """`reason`: "tag mismatch" (forged or corrupted input; the output buffer is wiped),
    "too short", "bad nonce length", "bad key length", "message too long", "small buffer"."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class AesCcm:
    """One key, fixed tag and nonce lengths. Not reentrant: one object per task."""

    def __init__(self, key, tag_len=8, nonce_len=13):
        if len(key) not in (16, 24, 32):
            raise CcmError("bad key length")
        if tag_len not in (4, 6, 8, 10, 12, 14, 16) or not 7 <= nonce_len <= 13:
            raise CcmError("bad parameters")
        self.tag_len = tag_len
        self.nonce_len = nonce_len
        self._L = 15 - nonce_len
        self._aes = cryptolib.aes(bytes(key), _AES_ECB)
        self._x = bytearray(_BLOCK)  # CBC-MAC chaining value
        self._a = bytearray(_BLOCK)  # counter block A_i
        self._s = bytearray(_BLOCK)  # key stream block S_i

    def _absorb(self, data, off, n, pos):
        # CBC-MAC over data[off:off + n]: XOR into X, encrypt X at each full block.
        x = self._x
        aes = self._aes
        for i in range(off, off + n):
            x[pos] ^= data[i]
            pos += 1
            if pos == _BLOCK:
                aes.encrypt(x, x)
                pos = 0
        return pos

    def _mac(self, nonce, aad, la, msg, moff, mlen):
        # RFC 3610 §2.2: leaves T (first M bytes) in self._x.
        L = self._L
        x = self._x
        x[0] = (_ADATA if la else 0) | (((self.tag_len - 2) >> 1) << 3) | (L - 1)
        for i in range(self.nonce_len):
            x[1 + i] = nonce[i]
        v = mlen
        for i in range(15, 15 - L, -1):
            x[i] = v & 0xFF
            v >>= 8
        self._aes.encrypt(x, x)
        if la:
            if la < 0xFF00:
                x[0] ^= la >> 8
                x[1] ^= la & 0xFF
                pos = 2
            else:
                x[0] ^= 0xFF
                x[1] ^= 0xFE
                for i in range(4):
                    x[2 + i] ^= (la >> (24 - 8 * i)) & 0xFF
                pos = 6
            if self._absorb(aad, 0, la, pos):
                self._aes.encrypt(x, x)
        if mlen and self._absorb(msg, moff, mlen, 0):
            self._aes.encrypt(x, x)

    def _ctr(self, nonce, src, soff, dst, doff, n):
        # RFC 3610 §2.3: dst[doff + i] = src[soff + i] ^ S_1.., counter from 1; S_0 left in
        # self._s.
        a = self._a
        s = self._s
        aes = self._aes
        L = self._L
        a[0] = L - 1
        for i in range(self.nonce_len):
            a[1 + i] = nonce[i]
        ctr = 1
        for off in range(0, n, _BLOCK):
            v = ctr
            for i in range(15, 15 - L, -1):
                a[i] = v & 0xFF
                v >>= 8
            aes.encrypt(a, s)
            end = off + _BLOCK if off + _BLOCK < n else n
            k = 0
            for i in range(off, end):
                dst[doff + i] = src[soff + i] ^ s[k]
                k += 1
            ctr += 1
        for i in range(15, 15 - L, -1):
            a[i] = 0
        aes.encrypt(a, s)

    def _check(self, nonce, n, room):
        if len(nonce) != self.nonce_len:
            raise CcmError("bad nonce length")
        if self._L < 8 and n >> (8 * self._L):
            raise CcmError("message too long")
        if room < 0:
            raise CcmError("small buffer")

    def encrypt(self, nonce, aad, plaintext, out, out_off=0, aad_len=-1):
        """Writes ciphertext || tag into out[out_off:] (out may be the same memory as
        plaintext, at the same offset) and returns its length, len(plaintext) + tag_len.
        aad_len >= 0 uses only aad[:aad_len] (a preallocated AAD buffer, no slicing)."""
        n = len(plaintext)
        m = self.tag_len
        la = len(aad) if aad_len < 0 else aad_len
        self._check(nonce, n, len(out) - out_off - n - m)
        self._mac(nonce, aad, la, plaintext, 0, n)
        self._ctr(nonce, plaintext, 0, out, out_off, n)
        x = self._x
        s = self._s
        for i in range(m):
            out[out_off + n + i] = x[i] ^ s[i]
        return n + m

    def decrypt(self, nonce, aad, data, out, data_off=0, aad_len=-1):
        """Checks and decrypts data[data_off:] = ciphertext || tag into out[0:] (out may be
        the same memory as data when data_off is 0); returns the plaintext length. Raises
        CcmError("tag mismatch") and zeroes the plaintext written so far when the tag does
        not verify."""
        m = self.tag_len
        n = len(data) - data_off - m
        if n < 0:
            raise CcmError("too short")
        la = len(aad) if aad_len < 0 else aad_len
        self._check(nonce, n, len(out) - n)
        self._ctr(nonce, data, data_off, out, 0, n)
        self._mac(nonce, aad, la, out, 0, n)  # leaves S_0 in self._s untouched
        x = self._x
        s0 = self._s
        diff = 0
        t = data_off + n
        for i in range(m):
            diff |= (x[i] ^ s0[i]) ^ data[t + i]
        if diff:
            for i in range(n):
                out[i] = 0
            raise CcmError("tag mismatch")
        return n
