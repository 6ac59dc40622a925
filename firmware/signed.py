# COSE_Sign1 objects (RFC 9052 §4.2) signed by the STSAFE-A110's factory key (slot 0) with
# ES256 (ECDSA P-256 + SHA-256, RFC 9053 §2.1): the epoch record and the checkpoints.
# MIT licence, (c) serene-module authors. Wire format: docs/wire-format.md.
#
#   tag 18 ( [ protected = h'A10126' ({1: -7}), unprotected, payload: bstr, signature: bstr(64) ] )
#
# The secure element signs a digest: the digest of the Sig_structure
#   ["Signature1", h'A10126', h'' (external_aad), payload]
# is computed here by streaming its CBOR encoding into SHA-256 (no copy of the payload).
# The signature is r || s (32 bytes each), as COSE wants it (RFC 9053 §2.1).
#
# The payload of every signed object is a CBOR array whose first element is its type:
#   [TYPE_EPOCH, device_id, epoch, seq = 0, ephemeral key (33, SEC1 compressed), prev]
#       prev = null or [prev_epoch, end_seq, end_hash (32)] (firmware/epoch.py)
#   [TYPE_CHECKPOINT, device_id, epoch, seq, first_seq, count, chain (32), prev (32)]
#       (firmware/checkpoint.py)
# (see docs/wire-format.md).
import hashlib
from micropython import const

from firmware.cbor import Encoder

TAG_SIGN1 = const(18)
PROTECTED = b"\xa1\x01\x26"  # {1: -7}: alg ES256
SIG_LEN = const(64)
SIGN_SLOT = const(0)  # STSAFE factory key slot

TYPE_EPOCH = const(1)
TYPE_CHECKPOINT = const(2)

# Unprotected header labels (RFC 9360 §2): x5chain 33 (a single certificate as a bstr),
# x5t 34 = [hash alg, hash]; alg -15 = SHA-256/64 (SHA-256 truncated to 8 bytes).
HDR_X5CHAIN = const(33)
HDR_X5T = const(34)
X5T_ALG = const(-15)
X5T_LEN = const(8)


class SignError(ValueError):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def _head(major, n):
    # A CBOR head (shortest form) as bytes; only for the Sig_structure digest.
    b = bytearray(9)
    e = Encoder(b)
    e._head(major, n)
    return bytes(e.view())


def sig_structure_digest(payload):
    """SHA-256 of CBOR(["Signature1", PROTECTED, h'', payload])."""
    h = hashlib.sha256(b"\x84\x6aSignature1\x43" + PROTECTED + b"\x40")
    h.update(_head(2, len(payload)))
    h.update(payload)
    return h.digest()


async def sign(se, payload):
    """The 64-byte ES256 signature of payload by the SE's slot-0 key."""
    sig = await se.generate_signature(SIGN_SLOT, sig_structure_digest(payload))
    if len(sig) != SIG_LEN:
        raise SignError("signature length %d" % len(sig))
    return bytes(sig)


def x5t(cert_der):
    """COSE x5t value bytes for a certificate: CBOR [-15, SHA-256/64(cert)]."""
    d = hashlib.sha256(cert_der).digest()[:X5T_LEN]
    return b"\x82\x2e\x48" + d


def unprotected_x5t(cert_der):
    """Unprotected bucket {34: x5t} (encoded), the certificate by reference."""
    return b"\xa1\x18\x22" + x5t(cert_der)


def unprotected_x5chain(cert_der):
    """Unprotected bucket {33: cert} (encoded), the certificate by value."""
    return b"\xa1\x18\x21" + _head(2, len(cert_der)) + bytes(cert_der)


UNPROTECTED_EMPTY = b"\xa0"


def encode(payload, signature, unprotected=UNPROTECTED_EMPTY):
    """The tagged COSE_Sign1 bytes. `unprotected` is an encoded CBOR map."""
    n = 1 + 1 + 4 + len(unprotected) + 9 + len(payload) + 2 + SIG_LEN
    buf = bytearray(n)
    e = Encoder(buf)
    e.tag(TAG_SIGN1)
    e.array(4)
    e.bytes(PROTECTED)
    e.raw(unprotected)
    e.bytes(payload)
    e.bytes(signature)
    return bytes(e.view())
