"""Stateless pieces of the module<->server protocol, written from the specs (RFC 9052/9053
COSE, RFC 8613 §5.2/§6 OSCORE nonce and compression, RFC 5869 HKDF) with cbor2, pycose and
cryptography. See docs/wire-format.md for the byte layout; this is an independent
implementation of it, not a port of the firmware.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Any, Iterable, Mapping

import cbor2
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pycose import headers
from pycose.algorithms import AESCCM1664128, Es256
from pycose.exceptions import CoseException
from pycose.keys import EC2Key, SymmetricKey
from pycose.keys.curves import P256
from pycose.keys.keyparam import KpAlg, KpBaseIV
from pycose.messages import Enc0Message, Sign1Message

ALG_AES_CCM_16_64_128 = 10
ALG_ECDH_ES_HKDF_256 = -25
TAG_LEN = 8
NONCE_LEN = 13
KID_LEN = 4
AAD_VERSION = 1
SERVER_IDENTITY = b"serene-server"

TYPE_EPOCH = 1
TYPE_CHECKPOINT = 2
SIGN1_TAG = 18
PROTECTED_ES256 = cbor2.dumps({1: -7})
HDR_X5CHAIN = 33
HDR_X5T = 34
X5T_SHA256_64 = -15

FLAG_KID = 0x08
FLAG_KID_CONTEXT = 0x10
FLAGS_RESERVED = 0xE0


class VerifyError(Exception):
    """Rejected input. `reason` is a short stable name (for ledgers and counters), `detail`
    a human explanation."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class EpochKeys:
    record_key: bytes
    record_iv: bytes
    ack_key: bytes
    ack_iv: bytes


# ---- key derivation ---------------------------------------------------------------------


def kdf_context(sender: bytes, recipient: bytes, epoch: int, bits: int, label: bytes) -> bytes:
    """COSE_KDF_Context (RFC 9053 §5.2) for one derived value; see docs/wire-format.md."""
    return cbor2.dumps(
        [
            ALG_AES_CCM_16_64_128,
            [sender, epoch, None],
            [recipient, None, None],
            [bits, cbor2.dumps({1: ALG_ECDH_ES_HKDF_256}), label],
        ]
    )


def derive_keys(z: bytes, device_id: bytes, epoch: int) -> EpochKeys:
    """ECDH-ES + HKDF-256 (RFC 9053 §6.3.1): HKDF-SHA256, no salt, info = COSE_KDF_Context."""

    def hk(sender, recipient, bits, label):
        info = kdf_context(sender, recipient, epoch, bits, label)
        return HKDF(hashes.SHA256(), bits // 8, None, info).derive(z)

    up = (device_id, SERVER_IDENTITY)
    down = (SERVER_IDENTITY, device_id)
    return EpochKeys(
        record_key=hk(*up, 128, b"key"),
        record_iv=hk(*up, 104, b"iv"),
        ack_key=hk(*down, 128, b"key"),
        ack_iv=hk(*down, 104, b"iv"),
    )


def ecdh(server_key: ec.EllipticCurvePrivateKey, peer_point: bytes) -> bytes:
    """Z = ECDH(server static key, the module's ephemeral key), 32 bytes."""
    try:
        pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), peer_point)
    except ValueError as e:
        raise VerifyError("bad ephemeral key", str(e)) from None
    return server_key.exchange(ec.ECDH(), pub)


# ---- sealed objects (compressed COSE_Encrypt0) ------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sealed:
    piv: int
    piv_bytes: bytes
    kid: bytes | None
    ciphertext: bytes  # ciphertext || tag


def parse_sealed(obj: bytes) -> Sealed:
    """Split a compressed object (RFC 8613 §6.1 flag byte, Partial IV, kid, ciphertext)."""
    if len(obj) < 2:
        raise VerifyError("truncated", "sealed object shorter than 2 bytes")
    flags = obj[0]
    if flags & (FLAGS_RESERVED | FLAG_KID_CONTEXT):
        raise VerifyError("bad header", f"flags 0x{flags:02x}")
    n = flags & 0x07
    if not 1 <= n <= 5:
        raise VerifyError("bad header", f"partial IV length {n}")
    kid_len = KID_LEN if flags & FLAG_KID else 0
    hdr = 1 + n + kid_len
    if len(obj) < hdr + TAG_LEN:
        raise VerifyError("truncated", f"{len(obj)} bytes, header {hdr} + tag {TAG_LEN}")
    piv_bytes = bytes(obj[1 : 1 + n])
    if n > 1 and piv_bytes[0] == 0:
        raise VerifyError("bad header", "partial IV not in its shortest form")
    return Sealed(
        piv=int.from_bytes(piv_bytes, "big"),
        piv_bytes=piv_bytes,
        kid=bytes(obj[1 + n : hdr]) if kid_len else None,
        ciphertext=bytes(obj[hdr:]),
    )


def kid_for(epoch: int) -> bytes:
    return struct.pack(">I", epoch)


def external_aad(device_id: bytes, epoch: int, piv: int) -> bytes:
    return cbor2.dumps([AAD_VERSION, ALG_AES_CCM_16_64_128, device_id, epoch, piv])


def base_iv(common_iv: bytes, kid: bytes) -> bytes:
    """RFC 8613 §5.2 nonce with a zero Partial IV: common_iv XOR (S | kid padded to
    nonce_len - 6 | 00 00 00 00 00). XORing the left-padded Partial IV into it gives the
    OSCORE nonce, which is exactly COSE's Partial IV rule (RFC 9052 §3.1, "Base IV")."""
    pad = bytes([len(kid)]) + kid.rjust(NONCE_LEN - 6, b"\0") + bytes(5)
    return bytes(a ^ b for a, b in zip(common_iv, pad))


def oscore_nonce(common_iv: bytes, kid: bytes, piv: int) -> bytes:
    b = base_iv(common_iv, kid)
    p = piv.to_bytes(NONCE_LEN, "big")
    return bytes(x ^ y for x, y in zip(b, p))


def _thaw(x):
    """cbor2's immutable containers (inside tags) back to list/dict for pycose."""
    if isinstance(x, Mapping):
        return {_thaw(k): _thaw(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return [_thaw(v) for v in x]
    return x


class _Enc0(Enc0Message):
    """pycose's COSE_Encrypt0 with its Partial IV nonce left-padded to the IV length:
    pycose 1.1 converts base_iv XOR piv back to bytes in its shortest form, which drops a
    leading zero byte of the nonce (1 time in 256 here)."""

    def _get_nonce(self):
        nonce = super()._get_nonce()
        return nonce.rjust(NONCE_LEN, b"\0") if len(nonce) < NONCE_LEN else nonce


def _cose_key(key: bytes, common_iv: bytes, kid: bytes) -> SymmetricKey:
    return SymmetricKey(
        k=key, optional_params={KpAlg: AESCCM1664128, KpBaseIV: base_iv(common_iv, kid)}
    )


def rebuild_encrypt0(s: Sealed, kid: bytes) -> bytes:
    """The full COSE_Encrypt0 (tag 16) the compressed object stands for."""
    msg = Enc0Message(
        phdr={},
        uhdr={headers.Algorithm: AESCCM1664128, headers.KID: kid, headers.PartialIV: s.piv_bytes},
        payload=s.ciphertext,
    )
    return msg.encode(tag=True, encrypt=False)


def open_sealed(
    obj: bytes, key: bytes, common_iv: bytes, device_id: bytes, epoch: int
) -> tuple[int, bytes]:
    """Open a sealed object of (device_id, epoch): rebuild the COSE_Encrypt0, decrypt it with
    pycose. Returns (piv, plaintext). VerifyError: truncated, bad header, other epoch
    (kid names another epoch), forged (authentication failed)."""
    s = parse_sealed(obj)
    kid = kid_for(epoch)
    if s.kid is not None and s.kid != kid:
        raise VerifyError("other epoch", f"kid {s.kid.hex()} is not epoch {epoch}")
    full = _Enc0.from_cose_obj(_thaw(cbor2.loads(rebuild_encrypt0(s, kid)).value), True)
    msg = _Enc0(
        phdr=full.phdr,
        uhdr=full.uhdr,
        payload=full.payload,
        external_aad=external_aad(device_id, epoch, s.piv),
        key=_cose_key(key, common_iv, kid),
    )
    try:
        return s.piv, msg.decrypt()
    except (InvalidTag, CoseException, ValueError):
        raise VerifyError("forged", "authentication tag does not verify") from None


def seal(
    plaintext: bytes,
    piv: int,
    key: bytes,
    common_iv: bytes,
    device_id: bytes,
    epoch: int,
    with_kid: bool = True,
) -> bytes:
    """Seal plaintext as a compressed COSE_Encrypt0 (the server's acks; tests)."""
    if not 0 <= piv < 1 << 40:
        raise ValueError("partial IV out of range")
    kid = kid_for(epoch)
    piv_bytes = piv.to_bytes(max(1, (piv.bit_length() + 7) // 8), "big")
    msg = _Enc0(
        phdr={},
        uhdr={headers.Algorithm: AESCCM1664128, headers.KID: kid, headers.PartialIV: piv_bytes},
        payload=plaintext,
        external_aad=external_aad(device_id, epoch, piv),
        key=_cose_key(key, common_iv, kid),
    )
    ciphertext = msg.encrypt()
    flags = len(piv_bytes) | (FLAG_KID if with_kid else 0)
    return bytes([flags]) + piv_bytes + (kid if with_kid else b"") + ciphertext


# ---- signed objects (COSE_Sign1, ES256) --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Signed:
    type: int
    device_id: bytes
    epoch: int
    seq: int
    fields: tuple  # the payload elements after seq
    unprotected: dict
    message: Sign1Message
    payload: bytes = b""  # the signed payload bytes (the bstr content)
    signature: bytes = b""  # r || s

    @property
    def payload_hash(self) -> bytes:
        """SHA-256 of the payload bytes: what the next checkpoint's `prev` (or the next
        epoch record's `end_hash`) names."""
        return hashlib.sha256(self.payload).digest()


def _check_uint(v: Any, what: str, bits: int = 64) -> int:
    if type(v) is not int or v < 0 or v >> bits:
        raise VerifyError("bad payload", f"{what} is not a uint{bits}")
    return v


def parse_signed(obj: bytes) -> Signed:
    """Decode a tagged COSE_Sign1 and its payload, WITHOUT checking the signature."""
    try:
        item = cbor2.loads(obj)
    except Exception as e:  # cbor2 raises several types on malformed input
        raise VerifyError("bad cbor", str(e)) from None
    if not isinstance(item, cbor2.CBORTag) or item.tag != SIGN1_TAG:
        raise VerifyError("bad header", "not a tagged COSE_Sign1")
    v = item.value  # cbor2 gives immutable containers inside a tag: tuple, FrozenDict
    if (
        not isinstance(v, (list, tuple))
        or len(v) != 4
        or not all(isinstance(x, bytes) for x in (v[0], v[2], v[3]))
        or not isinstance(v[1], Mapping)
    ):
        raise VerifyError("bad header", "COSE_Sign1 structure")
    if v[0] != PROTECTED_ES256:
        raise VerifyError("bad header", "protected header must be exactly {1: -7} (ES256)")
    if len(v[3]) != 64:
        raise VerifyError("bad signature", f"signature is {len(v[3])} bytes")
    try:
        payload = cbor2.loads(v[2])
    except Exception as e:
        raise VerifyError("bad payload", str(e)) from None
    if not isinstance(payload, list) or len(payload) < 4:
        raise VerifyError("bad payload", "not [type, device_id, epoch, seq, ...]")
    typ, dev, epoch, seq = payload[:4]
    _check_uint(typ, "type", 8)
    if not isinstance(dev, bytes):
        raise VerifyError("bad payload", "device_id is not a bstr")
    _check_uint(epoch, "epoch", 32)
    _check_uint(seq, "seq", 32)  # the chain and the link frame carry 4 bytes
    try:
        # pycose's own decode() wants a list inside the tag, cbor2 6 gives a tuple: hand
        # pycose the decoded structure through its from_cose_obj() (what decode() calls).
        msg = Sign1Message.from_cose_obj([v[0], _thaw(v[1]), v[2], v[3]], True)
    except Exception as e:  # pycose raises assorted types on headers it cannot parse
        raise VerifyError("bad header", f"pycose: {e}") from None
    return Signed(typ, dev, epoch, seq, tuple(payload[4:]), _thaw(v[1]), msg, bytes(v[2]),
                  bytes(v[3]))


def verify_signed(s: Signed, public_key: ec.EllipticCurvePublicKey) -> None:
    """Check the ES256 signature over the Sig_structure (RFC 9052 §4.4) with cryptography
    (OpenSSL: ~30x faster than pycose's pure-Python ecdsa, which matters when a hostile
    device sends bad signatures); VerifyError("bad signature") otherwise."""
    if s.payload and len(s.signature) == 64:
        der = encode_dss_signature(int.from_bytes(s.signature[:32], "big"),
                                   int.from_bytes(s.signature[32:], "big"))
        try:
            public_key.verify(der, sig_structure(s.payload), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise VerifyError("bad signature", "ES256 signature does not verify") from None
        return
    verify_signed_pycose(s, public_key)


def verify_signed_pycose(s: Signed, public_key: ec.EllipticCurvePublicKey) -> None:
    """The same check through pycose (tests: the two must agree)."""
    nums = public_key.public_numbers()
    s.message.key = EC2Key(
        crv=P256, x=nums.x.to_bytes(32, "big"), y=nums.y.to_bytes(32, "big")
    )
    try:
        ok = s.message.verify_signature()
    except (InvalidSignature, CoseException, ValueError):
        ok = False
    if not ok:
        raise VerifyError("bad signature", "ES256 signature does not verify")


def sig_structure(payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", PROTECTED_ES256, b"", payload])


def x5t(cert_der: bytes) -> bytes:
    """SHA-256/64 certificate thumbprint (RFC 9360 x5t with alg -15)."""
    return hashlib.sha256(cert_der).digest()[:8]


# ---- checkpoints --------------------------------------------------------------------------


def chain_hash(objects: Iterable[tuple[int, bytes]]) -> bytes:
    """SHA-256 over seq (4, BE) || len (2, BE) || bytes of each (seq, sealed) in order."""
    h = hashlib.sha256()
    for seq, obj in objects:
        h.update(seq.to_bytes(4, "big") + len(obj).to_bytes(2, "big") + bytes(obj))
    return h.digest()


def checkpoint_fields(s: Signed) -> tuple[int, int, bytes]:
    """(first_seq, count, chain) of a checkpoint payload (v1: 3 fields, v2: 4 with prev)."""
    if s.type != TYPE_CHECKPOINT or len(s.fields) not in (3, 4):
        raise VerifyError("bad payload", "not a checkpoint")
    first, count, chain = s.fields[:3]
    _check_uint(first, "first_seq", 32)
    _check_uint(count, "count", 32)
    if not isinstance(chain, bytes) or len(chain) != 32:
        raise VerifyError("bad payload", "chain is not 32 bytes")
    if not 1 <= first <= s.seq or count > s.seq - first:
        raise VerifyError("bad payload", "inconsistent range")
    return first, count, chain


def checkpoint_prev(s: Signed) -> bytes | None:
    """The v2 checkpoint's `prev` (SHA-256 of the previous signed object's payload of the
    epoch); None for a v1 checkpoint (which the Verifier refuses)."""
    checkpoint_fields(s)
    if len(s.fields) == 3:
        return None
    prev = s.fields[3]
    if not isinstance(prev, bytes) or len(prev) != 32:
        raise VerifyError("bad payload", "checkpoint prev is not 32 bytes")
    return prev


def epoch_fields(s: Signed) -> tuple[bytes, tuple[int, int, bytes] | None]:
    """(Q_eph, prev) of a v2 epoch record [1, dev, epoch, 0, Q_eph, prev]: prev is None
    (no previous epoch known to the module) or (prev_epoch, end_seq, end_hash)."""
    if s.type != TYPE_EPOCH or s.seq != 0 or len(s.fields) != 2:
        raise VerifyError("bad payload", "epoch record must be [1, dev, epoch, 0, key, prev]")
    pub, prev = s.fields
    if not isinstance(pub, bytes):
        raise VerifyError("bad payload", "ephemeral key is not a bstr")
    if prev is None:
        return pub, None
    if not isinstance(prev, (list, tuple)) or len(prev) != 3:
        raise VerifyError("bad payload", "prev must be null or [epoch, end_seq, end_hash]")
    pe, end_seq, end_hash = prev
    _check_uint(pe, "prev epoch", 32)
    _check_uint(end_seq, "end_seq", 32)
    if not isinstance(end_hash, bytes) or len(end_hash) != 32:
        raise VerifyError("bad payload", "end_hash is not 32 bytes")
    if pe >= s.epoch:
        raise VerifyError("bad payload", f"previous epoch {pe} is not below {s.epoch}")
    return pub, (pe, end_seq, end_hash)


def check_chain(s: Signed, stored: Mapping[int, bytes]) -> None:
    """Recompute a checkpoint's chain from the stored sealed objects (seq -> bytes) in its
    range; VerifyError("checkpoint mismatch") unless exactly `count` of them hash to it."""
    first, count, chain = checkpoint_fields(s)
    objs = sorted((q, stored[q]) for q in stored if first <= q < s.seq)
    if len(objs) != count:
        raise VerifyError("checkpoint mismatch", f"{len(objs)} stored objects, {count} signed")
    if chain_hash(objs) != chain:
        raise VerifyError("checkpoint mismatch", "stored objects do not hash to the chain")


# ---- acks ---------------------------------------------------------------------------------


def ack_plaintext(acked_epoch: int, cum: int, bitmap: int) -> bytes:
    if min(acked_epoch, cum, bitmap) < 0 or bitmap >> 64 or acked_epoch >> 32:
        raise ValueError("ack fields out of range")
    return cbor2.dumps([acked_epoch, cum, bitmap])


def ack_from_seqs(seqs: Iterable[int], width: int = 64) -> tuple[int, int]:
    """(cum, bitmap) for a set of received sequence numbers (seq 0 must be in it):
    cum = highest seq with all of 0..cum received; bit i = seq cum + 2 + i received."""
    got = set(seqs)
    if 0 not in got:
        raise ValueError("the epoch record (seq 0) is always received first")
    cum = 0
    while cum + 1 in got:
        cum += 1
    bitmap = 0
    for i in range(width):
        if cum + 2 + i in got:
            bitmap |= 1 << i
    return cum, bitmap


def canonical(obj: bytes, epoch: int) -> bytes:
    """The canonical form of a sealed object of `epoch` (the frame's): without the kid,
    after checking the kid names that epoch. Refuses what parse_sealed refuses (reserved
    flag bits, kid context, non-minimal partial IV, truncated) and partial IV 0."""
    s = parse_sealed(obj)
    if s.piv == 0:
        raise VerifyError("bad header", "partial IV 0 is the epoch record, never sealed")
    if s.kid is None:
        return bytes(obj)
    if s.kid != kid_for(epoch):
        raise VerifyError("other epoch",
                          f"kid {int.from_bytes(s.kid, 'big')} is not the frame's epoch {epoch}")
    n = obj[0] & 0x07
    return bytes([obj[0] & ~FLAG_KID]) + bytes(obj[1 : 1 + n]) + bytes(obj[1 + n + KID_LEN :])


def is_canonical(obj: bytes) -> bool:
    """True if a sealed object is in its canonical form (no kid)."""
    return bool(obj) and not obj[0] & FLAG_KID


def classify(obj: bytes) -> str:
    """'sealed' (compressed COSE_Encrypt0: flag byte < 0x20) or 'signed' (tag 18)."""
    if not obj:
        raise VerifyError("truncated", "empty object")
    if obj[0] < 0x20:
        return "sealed"
    if obj[0] == 0xD2:
        return "signed"
    raise VerifyError("bad header", f"first byte 0x{obj[0]:02x}")
