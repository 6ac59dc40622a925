# Module-side protocol logic without the secure element (injected keys and a fake SE):
# sealed-object layout (RFC 8613 §6.1 flag byte), sequence rules, opening and rejection,
# acks, checkpoint policy and chain, KDF context structure (RFC 9053 §5.2), Sig_structure
# digest (RFC 9052 §4.4), epoch start order and failures. Interoperability with the
# independent verifier is in tests/test_seal_roundtrip.py.
import asyncio
import hashlib
import struct

from firmware import ack, cbor, checkpoint, epoch, seal, signed

K = bytes(range(16))
IV = bytes(range(100, 113))
DEV = b"SRN-0001"
EP = 999990


def _pair(dev=DEV, ep=EP):
    return seal.Sealer(K, IV, dev, ep), seal.Opener(K, IV, dev, ep)


def test_header_layout_and_overhead():
    s, _ = _pair()
    out = bytearray(64)
    pt = b"\xa2\x00\x01\x01\x05"
    for seq, flags, piv in ((1, 0x01, b"\x01"), (255, 0x01, b"\xff"), (256, 0x02, b"\x01\x00"),
                            (70000, 0x03, b"\x01\x11\x70")):
        n = s.seal(seq, pt, out)
        assert out[0] == flags and bytes(out[1 : 1 + len(piv)]) == piv
        assert n == 1 + len(piv) + len(pt) + seal.TAG_LEN == seal.sealed_len(seq, len(pt))
        assert n - len(pt) <= 13
    n = s.seal(70001, pt, out, kid=True)
    assert out[0] == 0x0B  # n = 3, k = 1
    assert bytes(out[4:8]) == struct.pack(">I", EP)
    assert n == 1 + 3 + 4 + len(pt) + 8 == seal.sealed_len(70001, len(pt), True)


def test_seq_must_increase_and_buffer_must_fit():
    s, _ = _pair()
    out = bytearray(64)
    for seq, reason in ((0, "seq not increasing"), (1 << 40, "seq out of range")):
        try:
            s.seal(seq, b"x", out)
        except seal.SealError as e:
            assert e.reason == reason
        else:
            raise AssertionError(reason)
    s.seal(5, b"x", out)
    for seq in (5, 4):
        try:
            s.seal(seq, b"x", out)
        except seal.SealError as e:
            assert e.reason == "seq not increasing" and e.seq == seq
        else:
            raise AssertionError("reused seq")
    try:
        s.seal(6, bytes(10), bytearray(1 + 1 + 10 + 7))
    except seal.SealError as e:
        assert e.reason == "small buffer"
    else:
        raise AssertionError("overflow")


def test_open_round_trip_and_every_flip_rejected():
    s, o = _pair()
    out = bytearray(64)
    pt = b"\xa3\x00\x01\x01\x18\x2a\x02\x19\x04\xe2"
    n = s.seal(42, pt, out, kid=True)
    sealed = bytes(out[:n])
    buf = bytearray(64)
    assert o.open(sealed, buf) == (42, len(pt)) and bytes(buf[: len(pt)]) == pt
    without_kid = bytes([sealed[0] & ~seal.FLAG_KID]) + sealed[1:2] + sealed[6:]
    assert o.open(without_kid, buf) == (42, len(pt))
    for i in range(len(sealed) * 8):
        bad = bytearray(sealed)
        bad[i >> 3] ^= 1 << (i & 7)
        try:
            o.open(bad, buf)
        except seal.SealError:
            pass
        else:
            raise AssertionError("flip %d accepted" % i)


def test_aad_binds_device_epoch_and_seq():
    s, _ = _pair()
    out = bytearray(64)
    n = s.seal(7, b"record", out)
    sealed = bytes(out[:n])
    buf = bytearray(64)
    for other in (seal.Opener(K, IV, b"SRN-0002", EP), seal.Opener(K, IV, DEV, EP - 1)):
        try:
            other.open(sealed, buf)
        except seal.SealError as e:
            assert e.reason == "forged"
        else:
            raise AssertionError("opened under another device/epoch")
    moved = bytes([1, 8]) + sealed[2:]
    try:
        seal.Opener(K, IV, DEV, EP).open(moved, buf)
    except seal.SealError as e:
        assert e.reason == "forged"
    else:
        raise AssertionError("opened under another seq")


def test_parse_header_rejects_malformed():
    for obj, reason in ((b"\x01", "truncated"), (b"\x21\x01" + bytes(8), "bad flags"),
                        (b"\x11\x01" + bytes(8), "bad flags"),
                        (b"\x00" + bytes(9), "bad partial iv length"),
                        (b"\x06" + bytes(14), "bad partial iv length"),
                        (b"\x02\x00\x05" + bytes(8), "bad partial iv length"),
                        (b"\x01\x01" + bytes(7), "truncated"),
                        (b"\x09\x01\x00\x00\x00" + bytes(7), "truncated")):
        try:
            seal.parse_header(obj)
        except seal.SealError as e:
            if e.reason != reason:
                raise AssertionError("%s: %s" % (obj, e.reason))
        else:
            raise AssertionError("accepted")


def _ack(sealer, piv, body, kid=True):
    out = bytearray(96)
    pt = cbor.encode(body)
    n = sealer.seal(piv, pt, out, kid=kid)
    return bytes(out[:n])


def test_acks_open_and_rejections_are_counted():
    server = seal.Sealer(K, IV, DEV, EP)  # the server's ack direction, same key material
    acks = ack.Acks(seal.Opener(K, IV, DEV, EP))
    a1 = _ack(server, 1, [EP, 10, 0b101])
    assert acks.open(a1) == (EP, 10, 5)
    cases = [
        (a1, "replay"),
        (a1[:9], "truncated"),
        (a1[:-1] + bytes([a1[-1] ^ 0x80]), "forged"),
        (_ack(seal.Sealer(K, IV, DEV, EP + 1), 5, [EP, 1, 0]), "other epoch"),
        (_ack(server, 2, [EP, 1]), "bad payload"),
        (_ack(server, 3, [EP, -1, 0]), "bad payload"),
        (_ack(server, 4, [EP, 1, cbor.Tag(2, b"\x01" + bytes(8))]), "bad payload"),
        (_ack(server, 5, [EP, 1, True]), "bad payload"),
        (b"\x41\x01" + bytes(12), "bad header"),
        # v2: the acked epoch must be the kid's (issue 8 protocol note, section E)
        (_ack(server, 6, [EP - 1, 1, 0]), "bad payload"),
    ]
    for frame, reason in cases:
        try:
            acks.open(frame)
        except ack.AckError as e:
            if e.reason != reason:
                raise AssertionError("%s, expected %s" % (e.reason, reason))
        else:
            raise AssertionError("accepted: " + reason)
    assert acks.counts["replay"] == 1 and acks.counts["bad payload"] == 5
    assert acks.counts["forged"] == 1 and acks.counts["other epoch"] == 1
    assert acks.accepted == 1
    # a later Partial IV (without kid: the opener's epoch is assumed) opens
    assert acks.open(_ack(server, 9, [EP, 0, 0], kid=False)) == (EP, 0, 0)
    assert acks.last_piv == 9
    assert ack.acked(10, 0b101, 10) and ack.acked(10, 0b101, 12) and ack.acked(10, 0b101, 14)
    assert not ack.acked(10, 0b101, 11) and not ack.acked(10, 0b101, 13)


class _Ep:
    device_id = DEV
    number = EP
    payload = b"epoch record payload"


def test_checkpoint_policy_and_chain():
    cp = checkpoint.Checkpointer(_Ep(), 3, 60000)
    assert not cp.due()
    objs = [(1, b"\x01\x01abcdefgh"), (2, b"\x01\x02" + bytes(30)), (4, b"\x01\x04xyz" + bytes(8))]
    cp.add(*objs[0])
    assert not cp.due(cp._since + 59999) and cp.due(cp._since + 60000)
    cp.add(*objs[1])
    assert not cp.due(cp._since)
    cp.add(*objs[2])
    assert cp.due(cp._since)
    try:
        cp.add(3, b"late")
    except checkpoint.CheckpointError:
        pass
    else:
        raise AssertionError("out of order")
    raw5 = cp.payload(5)
    p = cbor.decode(raw5)
    h = hashlib.sha256()
    for seq, b in objs:
        h.update(struct.pack(">I", seq) + struct.pack(">H", len(b)) + b)
    # v2: the first checkpoint links to the epoch record's payload
    prev0 = hashlib.sha256(_Ep.payload).digest()
    assert p == [signed.TYPE_CHECKPOINT, DEV, EP, 5, 1, 3, h.digest(), prev0]
    cp.commit(5, raw5)
    assert cp.count == 0 and cp.first_seq == 6 and not cp.due(cp._since + 10 ** 6)
    cp.add(6, b"x" * 9)
    p7 = cbor.decode(cp.payload(7))
    # tiles (first_seq = 5 + 1) and links (prev = SHA-256 of checkpoint 5's payload)
    assert p7[4:6] == [6, 1] and p7[7] == hashlib.sha256(raw5).digest()
    cp1 = checkpoint.Checkpointer(_Ep(), 1, 1)
    cp1.add(1, b"y" * 9)
    assert cp1.due()  # N = 1: every record


def test_kdf_context_structure():
    ctx = cbor.decode(epoch.kdf_context(DEV, b"serene-server", EP, 128, b"key"))
    assert ctx == [10, [DEV, EP, None], [b"serene-server", None, None],
                   [128, b"\xa1\x01\x38\x18", b"key"]]
    assert cbor.decode(b"\xa1\x01\x38\x18") == {1: -25}
    keys = epoch.derive_keys(bytes(32), DEV, EP)
    assert [len(k) for k in keys] == [16, 13, 16, 13]
    assert len(set(keys)) == 4  # direction- and purpose-separated
    assert epoch.derive_keys(bytes(32), DEV, EP + 1)[0] != keys[0]


def test_sig_structure_digest_and_sign1_layout():
    payload = epoch.epoch_payload(DEV, EP, b"\x02" + bytes(32))
    want = hashlib.sha256(cbor.encode(["Signature1", b"\xa1\x01\x26", b"", payload])).digest()
    assert signed.sig_structure_digest(payload) == want
    big = bytes(300)
    want = hashlib.sha256(cbor.encode(["Signature1", b"\xa1\x01\x26", b"", big])).digest()
    assert signed.sig_structure_digest(big) == want
    obj = signed.encode(payload, bytes(64), signed.unprotected_x5t(b"cert"))
    t = cbor.decode(obj)
    assert t.tag == 18
    assert t.value == [b"\xa1\x01\x26", {34: [-15, hashlib.sha256(b"cert").digest()[:8]]},
                       payload, bytes(64)]
    assert cbor.decode(signed.unprotected_x5chain(b"\x30\x03abc")) == {33: b"\x30\x03abc"}
    assert cbor.decode(payload) == [1, DEV, EP, 0, b"\x02" + bytes(32), None]
    # v2: the epoch record names where the previous epoch ended
    end = (EP - 1, 41, bytes(range(32)))
    p2 = epoch.epoch_payload(DEV, EP, b"\x02" + bytes(32), end)
    assert cbor.decode(p2) == [1, DEV, EP, 0, b"\x02" + bytes(32), [EP - 1, 41, bytes(range(32))]]
    try:
        epoch.epoch_payload(DEV, EP, b"\x02" + bytes(32), (EP, 1, bytes(32)))
    except epoch.EpochError as e:
        assert e.step == "input"
    else:
        raise AssertionError("a prev that is not an earlier epoch was accepted")


def test_compress_point():
    x = bytes(range(1, 33))
    assert epoch.compress_point(b"\x04" + x + bytes(31) + b"\x01") == b"\x03" + x
    assert epoch.compress_point(b"\x04" + x + bytes(31) + b"\x02") == b"\x02" + x
    try:
        epoch.compress_point(b"\x02" + x)
    except epoch.EpochError as e:
        assert e.step == "input"
    else:
        raise AssertionError("accepted")


class FakeSE:
    """Records the call order; `fail` names a call that raises OSError (a bus failure)."""

    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail
        self.counter = 1000

    async def _call(self, name, value):
        self.calls.append(name)
        if name == self.fail:
            raise OSError(5)
        return value

    async def decrement(self, zone, amount=1):
        self.counter -= amount
        return await self._call("decrement", self.counter)

    async def generate_key(self, slot):
        assert slot == 0xFF
        return await self._call("generate_key", b"\x04" + bytes(range(64)))

    async def establish_key(self, slot, pub):
        assert slot == 0xFF and len(pub) == 65
        return await self._call("establish_key", bytearray(b"Z" * 32))

    async def generate_signature(self, slot, digest):
        assert slot == 0 and len(digest) == 32
        return await self._call("generate_signature", bytes(64))


SERVER = b"\x04" + bytes(64)


async def test_epoch_start_order_and_result():
    se = FakeSE()
    ep = await epoch.start(se, DEV, SERVER, 5)
    assert se.calls == ["decrement", "generate_key", "establish_key", "generate_signature"]
    assert ep.number == 0xFFFFFFFF - 999 and ep.pub == b"\x03" + bytes(range(32))
    assert ep.next_seq() == 1 and ep.next_seq() == 2
    assert cbor.decode(ep.record()).value[2] == ep.payload
    number = 0xFFFFFFFF - 999  # the counter after the Decrement was 999
    want = epoch.derive_keys(b"Z" * 32, DEV, number)
    out = bytearray(64)
    n = ep.sealer.seal(1, b"abc", out)
    buf = bytearray(16)
    assert seal.Opener(want[0], want[1], DEV, number).open(out[:n], buf) == (1, 3)


async def test_epoch_start_failures_name_the_step():
    for step in ("decrement", "generate_key", "establish_key", "generate_signature"):
        try:
            await epoch.start(FakeSE(step), DEV, SERVER, 5)
        except epoch.EpochError as e:
            assert e.step == {"decrement": "counter", "generate_key": "keygen",
                              "establish_key": "ecdh", "generate_signature": "sign"}[step]
        else:
            raise AssertionError(step)
    try:
        await epoch.start(FakeSE(), DEV, b"\x04" + bytes(10), 5)
    except epoch.EpochError as e:
        assert e.step == "input"
    else:
        raise AssertionError("bad server key accepted")
    try:
        epoch.Epoch(DEV, 1, b"\x02" + bytes(32), epoch.derive_keys(bytes(32), DEV, 1)).record()
    except epoch.EpochError as e:
        assert e.step == "sign"
    else:
        raise AssertionError("unsigned record")


def test_sealing_allocates_nothing_per_record():
    import gc

    s, o = _pair()
    out = bytearray(96)
    pt = bytes(40)
    s.seal(1, pt, out)
    gc.collect()
    gc.disable()
    try:
        before = gc.mem_alloc()
        for seq in range(2, 52):
            s.seal(seq, pt, out)
        used = gc.mem_alloc() - before
    finally:
        gc.enable()
    assert used < 64, used  # 50 records: no per-record heap
