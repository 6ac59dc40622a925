# The STSAFE-A110 driver's own code against the derived test vectors of
# /work/shared/specs/stsafe-a110-vectors.txt (spec §2 and §6), the published AES-CMAC vectors
# of RFC 4493 §4, and a bit-wise CRC (stsafe_fake.crc_x25). MicroPython, no emulator.
import asyncio

from drivers.stsafe import STSAFE, errors, frame
from drivers.stsafe.session import HostKeys
from stsafe_fake import FakeI2C, crc_x25, rsp, unhex

MAC_KEY = unhex("00112233445566778899AABBCCDDEEFF")  # ST evaluation keys (spec §6)
CIPHER_KEY = unhex("11112222333344445555666677778888")


def eq(got, want):
    if bytes(got) != bytes(want):
        raise AssertionError("got %s want %s" % (bytes(got), bytes(want)))


def test_crc_check_value():
    b = b"123456789"
    if frame.crc16(b, 0, len(b)) != 0x906E or crc_x25(b) != 0x906E:
        raise AssertionError(hex(frame.crc16(b, 0, len(b))))


def test_crc_matches_bitwise_reference():
    import os

    for n in (0, 1, 2, 17, 100, 507):
        d = os.urandom(n)
        if frame.crc16(d, 0, n) != crc_x25(d):
            raise AssertionError(n)


def _run(i2c, coro_fn):
    se = STSAFE(i2c)
    return asyncio.run(coro_fn(se))


def test_plain_command_frames_on_the_wire():
    # Each command as the driver writes it, answered with the vector responses.
    cases = [
        (
            lambda se: se.echo(b"\x01\x02\x03"),
            "00 01 02 03 a7 29",
            unhex("00 00 05 01 02 03 a7 29"),
        ),
        (lambda se: se.reset(), "01 e1 f1", unhex("00 00 02 f0 78")),
        (lambda se: se.random(32), "02 00 20 52 76", rsp(0, bytes(range(32)))),
        (lambda se: se.query_host_key_slot(), "14 17 99 88", rsp(0, b"\x01\x00\x00\x07")),
        (lambda se: se.read(0, 0, 4), "05 00 00 00 00 00 04 3a f7", rsp(0, b"\x30\x82\x01\x23")),
    ]
    for call, wire, answer in cases:
        i2c = FakeI2C([answer])
        _run(i2c, call)
        eq(i2c.written[0], unhex(wire))
    # the vector responses decode: echo data, empty OK, host key slot counter
    i2c = FakeI2C([unhex("00 00 05 01 02 03 a7 29")])
    eq(_run(i2c, lambda se: se.echo(b"\x01\x02\x03")), b"\x01\x02\x03")
    i2c = FakeI2C([rsp(0, b"\x01\x00\x00\x07")])
    if _run(i2c, lambda se: se.query_host_key_slot()) != (True, 7):
        raise AssertionError("host key slot")


def test_local_envelope_frames_on_the_wire():
    # No host keys, no authorization table: the plain frames of spec §4 (cmd <slot> <data>;
    # Generate Key's local-envelope variant 07 <slot> <key type>; Query tag 07), CRC by the
    # bit-wise reference.
    data = bytes(range(16))
    env = bytes(range(100, 124))

    def frame_of(body):
        c = crc_x25(body)
        return body + bytes([c >> 8, c & 0xFF])

    cases = [
        (lambda se: se.wrap(1, data), b"\x0e\x01" + data, rsp(0, env), env),
        (lambda se: se.unwrap(1, env), b"\x0f\x01" + env, rsp(0, data), data),
        (lambda se: se.generate_envelope_key(0), b"\x11\x07\x00\x00", rsp(0), None),
        (lambda se: se.generate_envelope_key(1, aes256=True), b"\x11\x07\x01\x01", rsp(0),
         None),
        (lambda se: se.query_local_envelope_keys(), b"\x14\x07",
         rsp(0, b"\x02\x00\x01\x10\x01\x00"), {0: 16, 1: None}),
    ]
    for call, body, answer, want in cases:
        i2c = FakeI2C([answer])
        got = _run(i2c, call)
        eq(i2c.written[0], frame_of(body))
        if got != want:
            raise AssertionError((body, got, want))
    # An envelope refused by the chip: its status as a named SEStatusError.
    i2c = FakeI2C([rsp(0x02)])
    try:
        _run(i2c, lambda se: se.unwrap(0, env))
    except errors.SEStatusError as e:
        if type(e).__name__ != "InconsistentCommandData" or e.code != 0x02 or e.cmd != 0x0F:
            raise AssertionError(repr(e))
    else:
        raise AssertionError("bad envelope accepted")


def test_query_product_data_frame_and_mask_check():
    pd = b"\x01\x03\x00\x46\x09" + b"\x02\x09" + bytes(9) + b"\x03\x02\x01\xfb"
    i2c = FakeI2C([rsp(0, pd)])
    got = _run(i2c, lambda se: se.query_product_data())
    eq(i2c.written[0], unhex("14 11 fc be"))
    if got["mask_id"] != b"\x00\x46\x09" or got["io_buffer_size"] != 507:
        raise AssertionError(got)
    # an A100 (mask 0x4012) fails loudly at init
    a100 = b"\x01\x03\x00\x40\x12"
    i2c = FakeI2C([rsp(0, a100)])
    try:
        _run(i2c, lambda se: se.init())
    except errors.WrongDevice as e:
        eq(e.detail, b"\x00\x40\x12")
    else:
        raise AssertionError("A100 accepted")


def test_cmac_rfc4493_vectors():
    key = unhex("2b7e151628aed2a6abf7158809cf4f3c")
    msg = unhex(
        "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
        "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
    )
    want = {
        0: "bb1d6929e95937287fa37d129b756746",
        16: "070a16b46b4d4144f79bdd9dd04a287c",
        40: "dfa66747de9ae63030ca32611497c827",
        64: "51f0bebf7e3b9d92fc49741779363cfe",
    }
    hk = HostKeys(key, key)
    for n, tag in want.items():
        m = hk.c_mac
        m.start()
        m.update(msg, 0, n // 2)  # two updates: the streaming path
        m.update(msg, n // 2, n)
        eq(m.finish(), unhex(tag))


def test_cmac_vector_for_query_with_host_mac():
    keys = HostKeys(MAC_KEY, CIPHER_KEY)
    buf = bytearray(32)
    buf[0] = 0xF4  # Query | C-MAC | R-MAC | host channel
    buf[1] = 0x11
    keys.mac_command(1, buf, 1)
    eq(buf[2:6], unhex("0b 92 cb 35"))
    n = frame.seal_command(buf, 6)
    eq(buf[:n], unhex("f4 11 0b 92 cb 35 2c 7c"))
    # R-MAC (N+1 = 2) over that command and the response status 0x40, data AB CD
    r = bytearray(unhex("40 00 08 ab cd ec f8 b1 da 00 00"))
    if not keys.check_rmac(r, 2):
        raise AssertionError("vector R-MAC rejected")
    keys.mac_command(1, buf, 1)
    r[4] ^= 1
    if keys.check_rmac(r, 2):
        raise AssertionError("altered response accepted")


def test_iv_vectors():
    keys = HostKeys(MAC_KEY, CIPHER_KEY)
    eq(keys.iv(2, 0xC0), unhex("8f 35 fe ef c0 2f 15 f0 21 50 d3 07 7e 1d ec 5b"))
    eq(keys.iv(2, 0x80), unhex("4b b1 4e 25 38 b7 d7 40 7e 49 85 09 57 4f 30 a5"))


EK_CMD = unhex(
    "f8ff0400200102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f2000202122232425"
    "262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f406c995bad42c2"
)
EK_RSP = unhex(
    "4000367491ba9cb03364864a94b2a0f35e0d13a953c5805e40679f20c92d169399dde7b3795a244b393c350a"
    "b537dc29f2a25296ee94d16f8f"
)
PEER = b"\x04" + bytes(range(1, 0x41))  # X = 01..20, Y = 21..40, as in the vector


def _ek_session(ek_rsp):
    # Command authorization: Establish Key needs host C-MAC, response encrypted; N = 1.
    auth = rsp(0, b"\x00\x01\x18\x03\x01")
    slot = rsp(0, b"\x01\x00\x00\x01")
    i2c = FakeI2C([auth, slot, ek_rsp])

    async def go(se):
        await se.query_command_authorization()
        await se.query_host_key_slot()
        try:
            return await se.establish_key(0xFF, PEER), se
        except errors.SEError as e:
            return e, se

    se = STSAFE(i2c, host_mac_key=MAC_KEY, host_cipher_key=CIPHER_KEY)
    z, se = asyncio.run(go(se))
    return i2c, z, se


def test_encrypted_establish_key_vector():
    i2c, z, se = _ek_session(EK_RSP)
    eq(
        i2c.written[0],
        unhex("14 24") + bytes([crc_x25(b"\x14\x24") >> 8, crc_x25(b"\x14\x24") & 0xFF]),
    )
    eq(i2c.written[2], EK_CMD)
    # The vector's shared secret is 32 bytes of 0xA5 (its plaintext is 00 20 A5..A5).
    eq(z, b"\xa5" * 32)
    if se.counter != 2:
        raise AssertionError("N after one MAC'd command: %r" % se.counter)


def test_establish_key_rejects_altered_ciphertext():
    bad = bytearray(EK_RSP)
    bad[10] ^= 0x01  # inside the ciphertext
    c = crc_x25(bytes(bad[:1]) + bytes(bad[3:-2]))
    bad[-2], bad[-1] = c >> 8, c & 0xFF  # CRC fixed up: only the R-MAC can catch it
    i2c, err, se = _ek_session(bytes(bad))
    if not isinstance(err, errors.RMACError) or err.cmd != 0x18:
        raise AssertionError(repr(err))
    if se.counter is not None:
        raise AssertionError("counter must be re-queried after a bad R-MAC")


def test_establish_key_crc_error_is_reread_then_reported():
    bad = bytearray(EK_RSP)
    bad[-1] ^= 0x01
    i2c, err, se = _ek_session(bytes(bad))
    if not isinstance(err, errors.CRCError) or err.cmd != 0x18:
        raise AssertionError(repr(err))
    if len(i2c.reads) < 3 + 2:  # 2 queries + the first read and its 2 re-reads
        raise AssertionError(i2c.reads)
    if len(i2c.written) != 3:
        raise AssertionError("a bad response CRC must never re-send the command")


def test_encrypt_decrypt_padding():
    keys = HostKeys(MAC_KEY, CIPHER_KEY)
    for p in (0, 1, 15, 16, 34, 47, 70):
        buf = bytearray(100)
        for i in range(p):
            buf[3 + i] = (i * 7 + 1) & 0xFF
        plain = bytes(buf[3 : 3 + p])
        q = keys.encrypt(5, buf, 3, p)
        if q % 16 or q <= p or q - p > 16:
            raise AssertionError((p, q))
        # decrypted by cryptolib's own CBC with the command IV: the plaintext comes back
        m = _decrypt_with_subject(keys, 5, buf, 3, q, 0x80)
        eq(buf[3 : 3 + m], plain)
    # [MW] pads 15-mod-16 plaintexts with one more block: accepted on decrypt
    buf = bytearray(64)
    buf[3:18] = b"A" * 15
    buf[18] = 0x80
    for i in range(19, 35):
        buf[i] = 0
    _cbc_encrypt_with_subject(keys, 9, buf, 3, 32, 0xC0)
    if keys.decrypt(9, buf, 3, 32) != 15:
        raise AssertionError("MW padding")
    # no 0x80 marker: refused
    buf = bytearray(32)
    _cbc_encrypt_with_subject(keys, 9, buf, 0, 16, 0xC0)
    if keys.decrypt(9, buf, 0, 16) != -1:
        raise AssertionError("bad padding accepted")


def _decrypt_with_subject(keys, n, buf, start, m, subject):
    from cryptolib import aes

    iv = bytes(keys.iv((n + 1) & 0xFFFFFF, subject))
    out = aes(CIPHER_KEY, 2, iv).decrypt(bytes(buf[start : start + m]))
    buf[start : start + m] = out
    i = m - 1
    while out[i] == 0:
        i -= 1
    if out[i] != 0x80:
        raise AssertionError("padding")
    return i


def _cbc_encrypt_with_subject(keys, n, buf, start, m, subject):
    from cryptolib import aes

    iv = bytes(keys.iv((n + 1) & 0xFFFFFF, subject))
    buf[start : start + m] = aes(CIPHER_KEY, 2, iv).encrypt(bytes(buf[start : start + m]))


def test_every_status_has_its_exception():
    for code in range(1, 32):
        e = errors.status_error(0x16, code)
        if not isinstance(e, errors.SEStatusError) or e.code != code or e.cmd != 0x16:
            raise AssertionError((code, e))
    if errors.status_error(0, 0x40 | 0x13).code != 0x13:
        raise AssertionError("R-MAC bit must be masked off")


def test_chip_status_is_raised_and_not_resent():
    i2c = FakeI2C([rsp(0x0A)])  # KEY_NOT_FOUND
    try:
        _run(i2c, lambda se: se.generate_signature(1, b"\x01" * 32))
    except errors.KeyNotFound as e:
        if e.cmd != 0x16:
            raise AssertionError(e.cmd) from None
    else:
        raise AssertionError("no error")
    if len(i2c.written) != 1:
        raise AssertionError(i2c.written)


def test_communication_error_is_resent_once():
    i2c = FakeI2C([rsp(0x01), unhex("00 00 05 01 02 03 a7 29")])
    eq(_run(i2c, lambda se: se.echo(b"\x01\x02\x03")), b"\x01\x02\x03")
    if i2c.written != [unhex("00 01 02 03 a7 29")] * 2:
        raise AssertionError(i2c.written)


def test_all_zero_digest_is_refused_before_the_bus():
    i2c = FakeI2C([])
    try:
        _run(i2c, lambda se: se.generate_signature(0, bytes(32)))
    except errors.ParameterError as e:
        if e.cmd != 0x16:
            raise AssertionError(e.cmd) from None
    else:
        raise AssertionError("all-zero digest sent")
    if i2c.written:
        raise AssertionError("bytes went on the bus")


def test_nack_polling_then_answer():
    i2c = FakeI2C([unhex("00 00 05 01 02 03 a7 29")], busy_reads=5)
    eq(_run(i2c, lambda se: se.echo(b"\x01\x02\x03")), b"\x01\x02\x03")
    if i2c.busy_reads:
        raise AssertionError("NACKs not consumed")


def test_read_certificate_length_from_der_header():
    der = b"\x30\x82\x01\x00" + bytes(range(256))  # 260 bytes: two 253-byte-max chunks
    i2c = FakeI2C([rsp(0, der[:4]), rsp(0, der[:253]), rsp(0, der[253:])])
    got = _run(i2c, lambda se: se.read_certificate(0))
    eq(got, der)
    eq(i2c.written[1][:7], unhex("05 00 00 00 00 00 fd"))  # zone 0, offset 0, 253 bytes
    eq(i2c.written[2][:7], unhex("05 00 00 00 fd 00 07"))  # offset 253, the last 7 bytes
