# Epoch start: a fresh epoch number, an ephemeral key agreement with the server, the keys of
# the epoch, and the signed epoch record that announces them. At boot and at every rotation.
# MIT licence, (c) serene-module authors. Wire format: docs/wire-format.md.
#
# 1. Decrement the STSAFE one-way counter zone: epoch number = 2^32 - 1 - the new counter
#    value. The counter only goes down, so epoch numbers only go up (the outbox, the link and
#    the server order epochs by number) and one is never used twice, even after a reflash or
#    a power cut (a cut after the decrement only skips a number).
# 2. Generate Key in the ephemeral slot 0xFF (usage limit 1), then Establish Key (ECDH P-256)
#    with the server's pinned static public key: Z, 32 bytes. The private key never leaves
#    the chip and is unusable after this one agreement.
# 3. Key derivation as COSE "ECDH-ES + HKDF-256" (RFC 9053 §6.3.1, alg -25): HKDF-SHA256,
#    no salt, IKM = Z, info = COSE_KDF_Context (RFC 9053 §5.2):
#      [AlgorithmID = 10,
#       PartyUInfo = [sender identity, epoch, nil],
#       PartyVInfo = [recipient identity, nil, nil],
#       SuppPubInfo = [keyDataLength in bits, h'A1013818' ({1: -25}), label]]
#    with sender/recipient = (device_id, "serene-server") for the module->server direction
#    and the reverse for server->module: direction-separated. label "key" (128 bits) gives
#    the AES-CCM key, label "iv" (104 bits) the common IV of the OSCORE-style nonce.
# 4. The epoch record, object seq 0 of the epoch: COSE_Sign1 signed by the factory key over
#    the payload v2 [1, device_id, epoch, 0, ephemeral public key (SEC1 compressed, 33
#    bytes), prev], prev = null (no previous epoch known to this module) or [prev_epoch,
#    end_seq, end_hash (32)]: where the previous epoch ended, its closing checkpoint's seq
#    and the SHA-256 of that checkpoint's payload (issue 8 protocol note, section D), with
#    the device certificate by reference (x5t) or by value (x5chain).
# No handshake: sealing works offline from here on.
#
# Only start() talks to the secure element; derive_keys() and Epoch are testable with
# injected values.
from micropython import const

from firmware import log, signed
from firmware.ack import Acks
from firmware.cbor import Encoder
from firmware.crypto import hkdf
from firmware.seal import ALG, KEY_LEN, NONCE_LEN, Opener, Sealer

try:
    from drivers.stsafe.errors import SEError as _SEError
except ImportError:  # a build without the STSAFE driver
    _SEError = OSError
# What a failed secure-element step raises: driver errors, bus errors, bad lengths.
_SE_FAILURES = (_SEError, OSError, ValueError)

EPHEMERAL_SLOT = const(0xFF)
EPOCH_TOP = const(0xFFFFFFFF)  # epoch = EPOCH_TOP - counter: the counter is 4 bytes
SERVER_IDENTITY = b"serene-server"
_KDF_ALG = const(-25)  # ECDH-ES + HKDF-256
_PROTECTED_KDF = b"\xa1\x01\x38\x18"  # {1: -25}
PUB_LEN = const(65)  # 04 || X || Y
PUB_COMPRESSED_LEN = const(33)


class EpochError(Exception):
    """Epoch start failed at `step` ("counter", "keygen", "ecdh", "sign", "input");
    `cause` is the underlying exception or a description. Retry with a new start(): a failed
    start never leaves usable keys behind."""

    def __init__(self, step, cause):
        super().__init__(step, cause)
        self.step = step
        self.cause = cause


def kdf_context(sender, recipient, epoch, bits, label):
    """Encoded COSE_KDF_Context for one derived value (see module header)."""
    buf = bytearray(48 + len(sender) + len(recipient))
    e = Encoder(buf)
    e.array(4)
    e.int(ALG)
    e.array(3)
    e.bytes(sender)
    e.uint(epoch)
    e.null()
    e.array(3)
    e.bytes(recipient)
    e.null()
    e.null()
    e.array(3)
    e.uint(bits)
    e.bytes(_PROTECTED_KDF)
    e.bytes(label)
    return bytes(e.view())


def derive_keys(z, device_id, epoch):
    """(record_key, record_iv, ack_key, ack_iv) from the ECDH shared secret Z."""
    prk = hkdf.hkdf_extract(None, z)
    dev = bytes(device_id)
    out = []
    for sender, recipient in ((dev, SERVER_IDENTITY), (SERVER_IDENTITY, dev)):
        out.append(hkdf.hkdf_expand(prk, kdf_context(sender, recipient, epoch, 128, b"key"),
                                    KEY_LEN))
        out.append(hkdf.hkdf_expand(prk, kdf_context(sender, recipient, epoch, 104, b"iv"),
                                    NONCE_LEN))
    return tuple(out)


def compress_point(pub):
    """SEC1 compressed form (33 bytes) of an uncompressed P-256 point 04 || X || Y."""
    if len(pub) != PUB_LEN or pub[0] != 4:
        raise EpochError("input", "public key is not an uncompressed P-256 point")
    out = bytearray(PUB_COMPRESSED_LEN)
    out[0] = 2 | (pub[64] & 1)
    out[1:] = pub[1:33]
    return bytes(out)


def epoch_payload(device_id, epoch, pub33, prev=None):
    """Payload v2; prev = None or (prev_epoch, end_seq, end_hash)."""
    buf = bytearray(64 + len(device_id) + PUB_COMPRESSED_LEN)
    e = Encoder(buf)
    e.array(6)
    e.uint(signed.TYPE_EPOCH)
    e.bytes(device_id)
    e.uint(epoch)
    e.uint(0)
    e.bytes(pub33)
    if prev is None:
        e.null()
    else:
        if len(prev[2]) != 32 or prev[0] >= epoch:
            raise EpochError("input", "prev is not an earlier epoch's end")
        e.array(3)
        e.uint(prev[0])
        e.uint(prev[1])
        e.bytes(prev[2])
    return bytes(e.view())


class Epoch:
    """One epoch: its number, the per-epoch object counter, the record `sealer`, the
    `acks` opener (firmware/ack.py) and the signed epoch record.

    `next_seq()` hands out the object sequence numbers (1, 2, ...) for sealed records,
    checkpoints and module events alike; seq 0 is the epoch record."""

    def __init__(self, device_id, number, pub33, keys, signature=None, prev=None):
        self.device_id = bytes(device_id)
        self.number = number
        self.pub = pub33
        rk, riv, ak, aiv = keys
        self.sealer = Sealer(rk, riv, self.device_id, number)
        self.opener = Opener(ak, aiv, self.device_id, number)
        self.acks = Acks(self.opener)
        # The ack key and IV, for the secure element to wrap (firmware/ackkeys.py): taken
        # once by take_ack_material(), never written anywhere in clear.
        self._ack_material = (ak, aiv)
        self.prev = prev
        self.payload = epoch_payload(self.device_id, number, pub33, prev)
        self.signature = signature
        self.seq = 0

    def next_seq(self):
        self.seq += 1
        return self.seq

    def take_ack_material(self):
        """(ack key, ack common IV), once; None afterwards."""
        m, self._ack_material = self._ack_material, None
        return m

    def record(self, unprotected=signed.UNPROTECTED_EMPTY):
        """The epoch record (seq 0), a tagged COSE_Sign1. Pass
        signed.unprotected_x5t(cert) (by reference) or signed.unprotected_x5chain(cert) (by
        value): the signature does not cover the unprotected bucket, so either form can be
        sent for the same epoch."""
        if self.signature is None:
            raise EpochError("sign", "epoch record not signed")
        return signed.encode(self.payload, self.signature, unprotected)


async def start(se, device_id, server_pub, counter_zone, prev=None):
    """Start a new epoch with the secure element `se` (drivers/stsafe API); return an Epoch
    with its record signed. `server_pub` is the server's static P-256 key, 65 bytes
    uncompressed (pinned at provisioning); `prev` the previous epoch's end (epoch_payload).
    Raises EpochError(step, cause)."""
    if len(server_pub) != PUB_LEN or server_pub[0] != 4:
        raise EpochError("input", "server key is not an uncompressed P-256 point")
    device_id = bytes(device_id)
    try:
        counter = await se.decrement(counter_zone, 1)
    except _SE_FAILURES as e:  # the caller retries a whole start()
        raise EpochError("counter", e)
    if not 0 <= counter <= EPOCH_TOP:
        raise EpochError("counter", "value out of range")
    number = EPOCH_TOP - counter
    try:
        pub = await se.generate_key(EPHEMERAL_SLOT)
    except _SE_FAILURES as e:
        raise EpochError("keygen", e)
    pub33 = compress_point(pub)
    try:
        z = await se.establish_key(EPHEMERAL_SLOT, server_pub)
    except _SE_FAILURES as e:
        raise EpochError("ecdh", e)
    if len(z) != 32:
        raise EpochError("ecdh", "shared secret length %d" % len(z))
    keys = derive_keys(z, device_id, number)
    if isinstance(z, bytearray):
        for i in range(len(z)):
            z[i] = 0
    if prev is not None and prev[0] >= number:
        # Not an earlier epoch (a state file from another chip, or a reflashed counter zone):
        # name none, and say so: the server's ledger then shows the older epoch unclosed.
        log.Logger("epoch").warn("previous epoch end %d/%d is not below epoch %d: not named",
                                 prev[0], prev[1], number)
        prev = None
    ep = Epoch(device_id, number, pub33, keys, prev=prev)
    try:
        ep.signature = await signed.sign(se, ep.payload)
    except _SE_FAILURES as e:
        raise EpochError("sign", e)
    return ep
