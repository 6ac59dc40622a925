# Record sealing: COSE_Encrypt0 (RFC 9052 §5.2) with AES-CCM-16-64-128 (alg 10, RFC 9053
# §4.2), nonce built as in OSCORE (RFC 8613 §5.2), carried compressed as OSCORE carries it
# (RFC 8613 §6). The full wire format, with a worked example, is docs/wire-format.md.
# MIT licence, (c) serene-module authors.
#
# Sealed object (what is stored in the outbox and sent; a retransmission resends these bytes):
#
#   flags (1) | Partial IV (n) | [kid (4)] | ciphertext || tag (8)
#   flags = 0b000_0_k_nnn: n = Partial IV length 1..5, k = kid present; bit 4 (h, kid
#   context) and bits 5-7 are 0. Partial IV = seq, big-endian, shortest (0 -> 0x00).
#   kid = epoch number, 4 bytes big-endian; present only when the receiver cannot infer the
#   epoch from the frame that carries the object.
#
# The receiver rebuilds COSE_Encrypt0 = [h'', {1: 10, 4: kid, 6: piv}, ciphertext] and its
# Enc_structure AAD = ["Encrypt0", h'', external_aad] where
#   external_aad = bstr .cbor [1 (version), 10 (alg), device_id (bstr), epoch (uint),
#                              piv (uint)]
# binds device id, epoch and sequence number (like OSCORE, the algorithm sits in the external
# AAD and the protected bucket is empty).
# Nonce (RFC 8613 §5.2): common_iv XOR (len(kid) (1) | kid left-padded to 7 | piv
# left-padded to 5).
#
# Overhead: 1 + n + 8 bytes = 10 for seq < 256, 11 for seq < 65536 (<= 13 with n <= 4);
# 4 more with the kid.
#
# One Sealer (module -> server, record key) and one Opener (server -> module, ack key) per
# epoch, both made by firmware/epoch.py. Sealing writes into the caller's buffer; the nonce
# and AAD buffers are allocated once per epoch.
import struct
from micropython import const

from firmware.cbor import Encoder
from firmware.crypto.aes_ccm import AesCcm, CcmError

ALG = const(10)  # COSE AES-CCM-16-64-128
TAG_LEN = const(8)
KEY_LEN = const(16)
NONCE_LEN = const(13)
KID_LEN = const(4)  # the epoch number: the STSAFE one-way counter is 4 bytes
MAX_PIV = const(0xFFFFFFFFFF)  # 5 bytes (RFC 8613 §6.1)
AAD_VERSION = const(1)

FLAG_KID = const(0x08)
FLAG_KID_CONTEXT = const(0x10)
_FLAG_N = const(0x07)
_FLAG_RESERVED = const(0xE0)
MAX_HEADER = const(1 + 5 + KID_LEN)
OVERHEAD_MAX = const(MAX_HEADER + TAG_LEN)


class SealError(ValueError):
    """`reason` names the problem; `seq` is the sequence number involved (or -1)."""

    def __init__(self, reason, seq=-1):
        super().__init__(reason, seq)
        self.reason = reason
        self.seq = seq


def piv_len(v):
    """Bytes of the shortest big-endian Partial IV for v (at least 1)."""
    n = 1
    while v > 0xFF and n < 5:
        v >>= 8
        n += 1
    return n


def _head_len(v):
    # Bytes of the CBOR head of argument v (shortest form, RFC 8949 §3).
    if v < 24:
        return 1
    if v < 0x100:
        return 2
    if v < 0x10000:
        return 3
    if v < 0x100000000:
        return 5
    return 9


def sealed_len(seq, plaintext_len, kid=False):
    """Length of the sealed object for a plaintext of that length."""
    return 1 + piv_len(seq) + (KID_LEN if kid else 0) + plaintext_len + TAG_LEN


class _Context:
    """One direction of one epoch: key, nonce base, AAD builder."""

    def __init__(self, key, common_iv, device_id, epoch):
        if len(key) != KEY_LEN or len(common_iv) != NONCE_LEN:
            raise SealError("bad key material")
        if not 0 <= epoch <= 0xFFFFFFFF:
            raise SealError("bad epoch")
        self._ccm = AesCcm(key, TAG_LEN, NONCE_LEN)
        self.epoch = epoch
        self.device_id = bytes(device_id)
        self.kid = struct.pack(">I", epoch)
        # Nonce base: common_iv XOR (S=4 | kid padded to 7 bytes | 5 zero bytes); the Partial
        # IV is XORed into the last 5 bytes per message (RFC 8613 §5.2 steps 1-4).
        base = bytearray(common_iv)
        base[0] ^= KID_LEN
        for i in range(KID_LEN):
            base[8 - KID_LEN + i] ^= self.kid[i]
        self._base = bytes(base)
        self._nonce = bytearray(NONCE_LEN)
        # Enc_structure = ["Encrypt0", h'', bstr(external_aad)], external_aad =
        # [1, 10, device_id, epoch, piv]. Everything before piv is fixed for the epoch.
        dl = len(self.device_id)
        self._ext_fixed = 3 + _head_len(dl) + dl + _head_len(epoch)  # all but piv
        self._aad = bytearray(11 + 3 + self._ext_fixed + 9)
        self._aad_enc = Encoder(self._aad)

    def _prepare(self, piv):
        # Nonce and Enc_structure for this Partial IV into the preallocated buffers, no
        # allocation; returns the AAD length (in self._aad).
        n = self._nonce
        base = self._base
        for i in range(NONCE_LEN):
            n[i] = base[i]
        v = piv
        for i in range(NONCE_LEN - 1, NONCE_LEN - 6, -1):
            n[i] ^= v & 0xFF
            v >>= 8
        a = self._aad_enc
        a.reset()
        a.array(3)
        a.text(b"Encrypt0")
        a.bytes(b"")
        a._head(2, self._ext_fixed + _head_len(piv))  # bstr head of external_aad
        a.array(5)
        a.uint(AAD_VERSION)
        a.uint(ALG)
        a.bytes(self.device_id)
        a.uint(self.epoch)
        a.uint(piv)
        return a.n


class Sealer(_Context):
    """Seals the module's objects of one epoch under the module->server record key."""

    def __init__(self, key, common_iv, device_id, epoch):
        super().__init__(key, common_iv, device_id, epoch)
        self.last_seq = 0  # seq 0 is the epoch record (signed, not sealed)

    def seal(self, seq, plaintext, out, kid=False):
        """Seal plaintext (bytes-like) as object number `seq` into out (bytearray or
        memoryview, at least sealed_len() bytes); return the sealed length.

        seq must be greater than every seq sealed before in this epoch: a (key, nonce) pair
        is never used twice. kid=True carries the epoch number (4 more bytes)."""
        if seq <= self.last_seq:
            raise SealError("seq not increasing", seq)
        if seq > MAX_PIV:
            raise SealError("seq out of range", seq)
        n = piv_len(seq)
        hdr = 1 + n + (KID_LEN if kid else 0)
        if len(out) < hdr + len(plaintext) + TAG_LEN:
            raise SealError("small buffer", seq)
        out[0] = n | (FLAG_KID if kid else 0)
        v = seq
        for i in range(n, 0, -1):
            out[i] = v & 0xFF
            v >>= 8
        if kid:
            k = self.kid
            for i in range(KID_LEN):
                out[1 + n + i] = k[i]
        la = self._prepare(seq)
        self._ccm.encrypt(self._nonce, self._aad, plaintext, out, hdr, la)
        self.last_seq = seq
        return hdr + len(plaintext) + TAG_LEN


def parse_header(obj):
    """(piv, kid or None, header length) of a sealed object; SealError if malformed."""
    if len(obj) < 2:
        raise SealError("truncated")
    f = obj[0]
    if f & (_FLAG_RESERVED | FLAG_KID_CONTEXT):
        raise SealError("bad flags")
    n = f & _FLAG_N
    if n < 1 or n > 5:
        raise SealError("bad partial iv length")
    hdr = 1 + n + (KID_LEN if f & FLAG_KID else 0)
    if len(obj) < hdr + TAG_LEN:
        raise SealError("truncated")
    if n > 1 and obj[1] == 0:
        raise SealError("bad partial iv length")  # not the shortest form (RFC 8613 §6.1)
    piv = 0
    for i in range(1, 1 + n):
        piv = (piv << 8) | obj[i]
    kid = bytes(obj[1 + n : hdr]) if f & FLAG_KID else None
    return piv, kid, hdr


class Opener(_Context):
    """Opens objects sealed for the module (the server's acks) under one epoch's ack key."""

    def open(self, obj, out):
        """Check and decrypt a sealed object into out; return (piv, plaintext length).
        SealError reasons: "truncated", "bad flags", "bad partial iv length", "other
        epoch" (kid names another epoch), "forged" (tag mismatch), "small buffer"."""
        piv, kid, hdr = parse_header(obj)
        if kid is not None and kid != self.kid:
            raise SealError("other epoch", piv)
        n = len(obj) - hdr - TAG_LEN
        if len(out) < n:
            raise SealError("small buffer", piv)
        la = self._prepare(piv)
        try:
            self._ccm.decrypt(self._nonce, self._aad, obj, out, hdr, la)
        except CcmError:
            raise SealError("forged", piv) from None
        return piv, n
