# firmware/crypto/aes_ccm.py against the RFC 3610 §8 packet vectors with M = 8, L = 2
# (13-byte nonce): #1-#6 (key C0..CF) and #13-#18 (key D7 82 ..). Each vector's header
# bytes are the CCM additional data; the output is header || ciphertext || tag.
from binascii import unhexlify

from firmware.crypto.aes_ccm import AesCcm, CcmError

_K1 = "c0c1c2c3c4c5c6c7c8c9cacbcccdcecf"
_K2 = "d7828d13b2b0bdc325a76236df93cc6b"
# (key, nonce, aad, plaintext, ciphertext || tag)
_VECTORS = [
    (_K1, "00000003020100a0a1a2a3a4a5", "0001020304050607",
     "08090a0b0c0d0e0f101112131415161718191a1b1c1d1e",
     "588c979a61c663d2f066d0c2c0f989806d5f6b61dac38417e8d12cfdf926e0"),
    (_K1, "00000004030201a0a1a2a3a4a5", "0001020304050607",
     "08090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
     "72c91a36e135f8cf291ca894085c87e3cc15c439c9e43a3ba091d56e10400916"),
    (_K1, "00000005040302a0a1a2a3a4a5", "0001020304050607",
     "08090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20",
     "51b1e5f44a197d1da46b0f8e2d282ae871e838bb64da8596574adaa76fbd9fb0c5"),
    (_K1, "00000006050403a0a1a2a3a4a5", "000102030405060708090a0b",
     "0c0d0e0f101112131415161718191a1b1c1d1e",
     "a28c6865939a9a79faaa5c4c2a9d4a91cdac8c96c861b9c9e61ef1"),
    (_K1, "00000007060504a0a1a2a3a4a5", "000102030405060708090a0b",
     "0c0d0e0f101112131415161718191a1b1c1d1e1f",
     "dcf1fb7b5d9e23fb9d4e131253658ad86ebdca3e51e83f077d9c2d93"),
    (_K1, "00000008070605a0a1a2a3a4a5", "000102030405060708090a0b",
     "0c0d0e0f101112131415161718191a1b1c1d1e1f20",
     "6fc1b011f006568b5171a42d953d469b2570a4bd87405a0443ac91cb94"),
    (_K2, "00412b4ea9cdbe3c9696766cfa", "0be1a88bace018b1",
     "08e8cf97d820ea258460e96ad9cf5289054d895ceac47c",
     "4cb97f86a2a4689a877947ab8091ef5386a6ffbdd080f8e78cf7cb0cddd7b3"),
    (_K2, "0033568ef7b2633c9696766cfa", "63018f76dc8a1bcb",
     "9020ea6f91bdd85afa0039ba4baff9bfb79c7028949cd0ec",
     "4ccb1e7ca981befaa0726c55d378061298c85c92814abc33c52ee81d7d77c08a"),
    (_K2, "00103fe41336713c9696766cfa", "aa6cfa36cae86b40",
     "b916e0eacc1c00d7dcec68ec0b3bbb1a02de8a2d1aa346132e",
     "b1d23a2220ddc0ac900d9aa03c61fcf4a559a4417767089708a776796edb723506"),
    (_K2, "00764c63b8058e3c9696766cfa", "d0d0735c531e1becf049c244",
     "12daac5630efa5396f770ce1a66b21f7b2101c",
     "14d253c3967b70609b7cbb7c499160283245269a6f49975bcadeaf"),
    (_K2, "00f8b678094e3b3c9696766cfa", "77b60f011c03e1525899bcae",
     "e88b6a46c78d63e52eb8c546efb5de6f75e9cc0d",
     "5545ff1a085ee2efbf52b2e04bee1e2336c73e3f762c0c7744fe7e3c"),
    (_K2, "00d560912d3f703c9696766cfa", "cd9044d2b71fdb8120ea60c0",
     "6435acbafb11a82e2f071d7ca4a5ebd93a803ba87f",
     "009769ecabdf48625594c59251e6035722675e04c847099e5ae0704551"),
]


def _vectors():
    for k, n, a, p, c in _VECTORS:
        yield AesCcm(unhexlify(k)), unhexlify(n), unhexlify(a), unhexlify(p), unhexlify(c)


def test_rfc3610_packet_vectors_encrypt():
    for i, (ccm, nonce, aad, pt, ct) in enumerate(_vectors()):
        out = bytearray(len(pt) + 8)
        n = ccm.encrypt(nonce, aad, pt, out)
        if n != len(ct) or bytes(out) != ct:
            raise AssertionError("vector %d" % i)


def test_rfc3610_packet_vectors_decrypt():
    for i, (ccm, nonce, aad, pt, ct) in enumerate(_vectors()):
        out = bytearray(len(ct))
        n = ccm.decrypt(nonce, aad, ct, out)
        if n != len(pt) or bytes(out[:n]) != pt:
            raise AssertionError("vector %d" % i)


def test_in_place_and_memoryview():
    ccm, nonce, aad, pt, ct = next(_vectors())
    buf = bytearray(pt) + bytearray(8)
    mv = memoryview(buf)
    assert ccm.encrypt(nonce, aad, mv[: len(pt)], mv) == len(ct)
    assert bytes(buf) == ct
    assert ccm.decrypt(nonce, aad, mv, mv) == len(pt)
    assert bytes(buf[: len(pt)]) == pt


def test_any_flipped_bit_is_rejected_and_output_wiped():
    ccm, nonce, aad, pt, ct = next(_vectors())
    out = bytearray(len(ct))
    for i in range(len(ct) * 8):
        bad = bytearray(ct)
        bad[i >> 3] ^= 1 << (i & 7)
        for k in range(len(out)):
            out[k] = 0x55
        try:
            ccm.decrypt(nonce, aad, bad, out)
        except CcmError as e:
            assert e.reason == "tag mismatch"
            assert out[: len(pt)] == bytearray(len(pt))
        else:
            raise AssertionError("bit %d accepted" % i)
    for i in range(len(aad) * 8):
        bad = bytearray(aad)
        bad[i >> 3] ^= 1 << (i & 7)
        try:
            ccm.decrypt(nonce, bad, ct, out)
        except CcmError:
            pass
        else:
            raise AssertionError("aad bit %d accepted" % i)
    bad = bytearray(nonce)
    bad[12] ^= 1
    try:
        ccm.decrypt(bad, aad, ct, out)
    except CcmError:
        pass
    else:
        raise AssertionError("other nonce accepted")


def test_argument_errors():
    ccm, nonce, aad, pt, ct = next(_vectors())
    for call, reason in (
        (lambda: ccm.encrypt(nonce[:12], aad, pt, bytearray(64)), "bad nonce length"),
        (lambda: ccm.encrypt(nonce, aad, pt, bytearray(len(pt) + 7)), "small buffer"),
        (lambda: ccm.decrypt(nonce, aad, ct[:7], bytearray(64)), "too short"),
        (lambda: ccm.encrypt(nonce, aad, bytearray(65536), bytearray(65544)), "message too long"),
        (lambda: AesCcm(b"short"), "bad key length"),
    ):
        try:
            call()
        except CcmError as e:
            if e.reason != reason:
                raise AssertionError(e.reason)
        else:
            raise AssertionError("accepted: " + reason)


def test_empty_message_and_empty_aad():
    ccm = AesCcm(b"\x01" * 16)
    nonce = bytes(13)
    out = bytearray(8)
    assert ccm.encrypt(nonce, b"", b"", out) == 8
    assert ccm.decrypt(nonce, b"", out, bytearray(0)) == 0
