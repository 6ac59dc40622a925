"""The STSAFE-A110 emulator on its own, driven with raw frames and the CPython host client.

Frames are checked against the spec's derived vectors (specs/stsafe-a110-vectors.txt) and the
cryptography against `cryptography`'s own primitives.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from serene.stsafe import profile
from serene.stsafe import protocol as P
from serene.stsafe.emulator import EmulatorError, StsafeEmulator
from serene.stsafe.host import StsafeHost, StsafeHostError

MAC_KEY = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
CIPHER_KEY = bytes.fromhex("11112222333344445555666677778888")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def paired(tmp_path=None, **kw):
    emu = StsafeEmulator.create(tmp_path / "chip.json" if tmp_path else None, time_scale=0, **kw)
    host = StsafeHost(emu)
    host.put_host_keys(MAC_KEY, CIPHER_KEY)
    return emu, host


def xfer(emu, frame):
    assert emu.i2c_write(frame)
    head = emu.i2c_read(3)
    return emu.i2c_read(3 + int.from_bytes(head[1:3], "big"))


def test_protocol_helpers_match_the_vectors():
    assert P.crc16(b"123456789") == 0x906E
    assert P.command_frame(0x00, b"\x01\x02\x03") == bytes.fromhex("00 01 02 03 a7 29")
    assert P.response_frame(0x00) == bytes.fromhex("000002f078")
    assert P.c_mac(MAC_KEY, 1, 0xF4, b"\x11") == bytes.fromhex("0b92cb35")
    assert P.r_mac(MAC_KEY, 2, 0xF4, b"\x11", 0x40, b"\xab\xcd") == bytes.fromhex("ecf8b1da")
    assert P.iv(CIPHER_KEY, 2, 0xC0).hex() == "8f35feefc02f15f02150d3077e1dec5b"
    assert P.iv(CIPHER_KEY, 2, 0x80).hex() == "4bb14e2538b7d7407e498509574f30a5"


def test_wire_vectors_from_the_emulator():
    emu = StsafeEmulator.create(time_scale=0)
    assert xfer(emu, bytes.fromhex("00010203a729")) == bytes.fromhex("00 00 05 01 02 03 a7 29")
    assert xfer(emu, bytes.fromhex("01e1f1")) == bytes.fromhex("000002f078")
    # a command with a bad CRC: 01 00 02 CRC (spec §2, §7)
    assert xfer(emu, bytes.fromhex("01e1f0")) == P.response_frame(0x01)
    assert xfer(emu, bytes.fromhex("01e1f0"))[:3] == b"\x01\x00\x02"
    r = xfer(emu, bytes.fromhex("02 00 20 52 76"))
    status, data, _ = P.parse_response(r)
    assert status == 0 and len(data) == 32


def test_busy_nack_short_reads_and_rereads():
    clock = Clock()
    emu = StsafeEmulator.create(time_scale=1.0, clock=clock)
    assert emu.i2c_read(3) is None  # nothing to read before a command
    assert emu.i2c_write(P.command_frame(P.GENERATE_RANDOM, b"\x00\x10"))
    assert emu.i2c_read(3) is None  # busy: 15 ms
    assert emu.i2c_write(b"\x00\x00\x00") is False  # and it NACKs writes too
    clock.t += 0.014
    assert emu.i2c_read(3) is None
    clock.t += 0.002
    head = emu.i2c_read(3)  # a short read: the header only
    assert head == b"\x00\x00\x12"
    full = emu.i2c_read(21)
    assert full[:3] == head and emu.i2c_read(21) == full  # each read restarts at byte 0
    P.parse_response(full)
    emu.time_scale = 0.5
    assert emu.i2c_write(P.command_frame(P.ESTABLISH_KEY, b""))
    clock.t += 0.129
    assert emu.i2c_read(3) is None
    clock.t += 0.002
    assert emu.i2c_read(3) is not None  # 260 ms x 0.5


def test_cmac_counter_and_rmac():
    emu, host = paired()
    assert host.host_key_slot() == (True, 0)
    payload = b"hello"
    hdr = P.ECHO | 0xE0
    good = P.command_frame(hdr, payload, P.c_mac(MAC_KEY, 0, hdr, payload))
    status, data, rmac = P.parse_response(xfer(emu, good))
    assert status == 0x40 and data == payload
    assert rmac == P.r_mac(MAC_KEY, 1, hdr, payload, status, data)
    assert emu.host_counter == 1
    # a replay (old N) and a wrong key are refused with INVALID_CMAC, N unchanged
    assert P.parse_response(xfer(emu, good))[0] == 0x16
    bad = P.command_frame(hdr, payload, P.c_mac(bytes(16), 1, hdr, payload))
    assert P.parse_response(xfer(emu, bad))[0] == 0x16
    assert emu.host_counter == 1


def test_establish_key_response_encrypted_per_authorization_table():
    emu, host = paired()
    # the host client decrypts with protocol.decrypt; check the wire against cryptography
    peer = ec.generate_private_key(ec.SECP256R1())
    eph = host.generate_key(0xFF, 0x0001, usage_limit=1)
    _, n = host.host_key_slot()
    hdr = P.ESTABLISH_KEY | 0xE0
    point = peer.public_key().public_bytes(*_POINT)
    payload = b"\xff\x04" + P.lv(point[1:33]) + P.lv(point[33:])
    status, data, _ = P.parse_response(
        xfer(emu, P.command_frame(hdr, payload, P.c_mac(MAC_KEY, n, hdr, payload)))
    )
    assert status == 0x40 and len(data) == 48  # 00 20 Z padded to 3 blocks
    iv = Cipher(algorithms.AES(CIPHER_KEY), modes.ECB()).encryptor().update(P.block(n + 1, 0xC0))
    plain = Cipher(algorithms.AES(CIPHER_KEY), modes.CBC(iv)).decryptor().update(data)
    z = peer.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), eph))
    assert plain == b"\x00\x20" + z + b"\x80" + bytes(13)
    # without the C-MAC the chip refuses (AC host in its table)
    r = P.parse_response(xfer(emu, P.command_frame(P.ESTABLISH_KEY, payload)))
    assert r[0] == 0x1E


def test_key_slots_modes_usage_and_single_use():
    emu, host = paired()
    host.generate_key(0, 0x0004)
    with pytest.raises(StsafeHostError) as e:
        host.generate_key(0, 0x0004)  # the factory slot is written once
    assert e.value.status == 0x11
    digest = os.urandom(32)
    sig = host.command(P.GENERATE_SIGNATURE, b"\x00" + P.lv(digest))
    r, off = P.take_lv(sig, 0)
    s, _ = P.take_lv(sig, off)
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), emu.public_key(0))
    pub.verify(encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big")), digest,
               ec.ECDSA(Prehashed(hashes.SHA256())))  # fmt: skip
    # slot 0 may sign, not establish keys
    peer = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*_POINT)
    est = b"\x00\x04" + P.lv(peer[1:33]) + P.lv(peer[33:])
    with pytest.raises(StsafeHostError) as e:
        host.command(P.ESTABLISH_KEY, est)
    assert e.value.status == 0x1B  # WRONG_KEY_USAGE
    # slot 1 with a usage limit of 2
    host.generate_key(1, 0x0004, usage_limit=2)
    for _ in range(2):
        host.command(P.GENERATE_SIGNATURE, b"\x01" + P.lv(digest))
    with pytest.raises(StsafeHostError) as e:
        host.command(P.GENERATE_SIGNATURE, b"\x01" + P.lv(digest))
    assert e.value.status == 0x0B  # KEY_BLOCKED
    # slot 0xFF: usage limit must be 1, single use, gone after a reset
    with pytest.raises(StsafeHostError):
        host.generate_key(0xFF, 0x0001, usage_limit=2)
    host.generate_key(0xFF, 0x0001, usage_limit=1)
    est = b"\xff" + est[1:]
    host.command(P.ESTABLISH_KEY, est)
    with pytest.raises(StsafeHostError) as e:
        host.command(P.ESTABLISH_KEY, est)
    assert e.value.status == 0x0A  # KEY_NOT_FOUND
    host.generate_key(0xFF, 0x0001, usage_limit=1)
    host.command(P.RESET)
    with pytest.raises(StsafeHostError) as e:
        host.command(P.ESTABLISH_KEY, est)
    assert e.value.status == 0x0A


def test_zone_access_conditions_and_counters():
    emu, host = paired()
    # zone 5: counter, update AC host -> Decrement without C-MAC refused
    dec = b"\x00\x05\x00\x00" + (1).to_bytes(4, "big")
    with pytest.raises(StsafeHostError) as e:
        host.command(P.DECREMENT, dec, mac=False)
    assert e.value.status == 0x1E  # the command table asks for the host C-MAC
    assert host.command(P.DECREMENT, dec) == (999_999).to_bytes(4, "big")
    # counter zones take no Update; data zones no Decrement
    with pytest.raises(StsafeHostError) as e:
        host.command(P.UPDATE, b"\x00\x05\x00\x00x")
    assert e.value.status == 0x12
    with pytest.raises(StsafeHostError) as e:
        host.command(P.DECREMENT, b"\x00\x01\x00\x00" + (1).to_bytes(4, "big"))
    assert e.value.status == 0x12
    # exhaustion
    emu.zone(6)["counter"] = 1
    dec6 = b"\x00\x06\x00\x00" + (1).to_bytes(4, "big")
    assert host.command(P.DECREMENT, dec6) == bytes(4)
    with pytest.raises(StsafeHostError) as e:
        host.command(P.DECREMENT, dec6)
    assert e.value.status == 0x13  # COUNTER_LIMIT_EXCEEDED
    # a counter zone reads as counter || data
    assert host.command(P.READ, b"\x00\x06\x00\x00\x00\x02") == bytes(4) + bytes(2)
    # boundaries and locks
    with pytest.raises(StsafeHostError) as e:
        host.read(1, 699, 2)
    assert e.value.status == 0x14
    host.update(2, 0, b"pin", lock_ac=1)  # update AC -> host, change right cleared
    emu.set_command_auth([])  # from here only the zones' own access conditions apply
    host = StsafeHost(emu, MAC_KEY, CIPHER_KEY)
    with pytest.raises(StsafeHostError) as e:
        host.command(P.DECREMENT, dec, mac=False)
    assert e.value.status == 0x11  # zone 5: update AC host
    assert emu.zone(2)["update_ac"] == 1 and emu.zone(2)["update_right"] == 0
    with pytest.raises(StsafeHostError) as e:
        host.command(P.UPDATE, b"\x00\x02\x00\x00x", mac=False)
    assert e.value.status == 0x11
    with pytest.raises(StsafeHostError) as e:
        host.command(P.UPDATE, b"\x14\x02\x00\x00x")  # change the AC again: no right
    assert e.value.status == 0x11


def test_state_survives_save_and_load(tmp_path):
    emu, host = paired(tmp_path)
    pub = host.generate_key(0, 0x0004)
    host.update(1, 3, b"kept")
    host.generate_key(0xFF, 0x0001, usage_limit=1)
    n = emu.host_counter
    again = StsafeEmulator.load(tmp_path / "chip.json", time_scale=0)
    assert again.host_counter == n
    assert again.public_key(0) == pub
    assert again.public_key(0xFF) is None  # volatile
    assert bytes.fromhex(again.zone(1)["data"])[3:7] == b"kept"
    assert oct(os.stat(tmp_path / "chip.json").st_mode & 0o777) == "0o600"
    with pytest.raises(EmulatorError):
        StsafeEmulator.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(EmulatorError):
        StsafeEmulator.load(tmp_path / "bad.json")


def test_faults():
    emu, host = paired()
    frame = P.command_frame(P.ECHO, b"abc")
    emu.inject("nack_storm", count=2)
    assert emu.i2c_write(frame) is False and emu.i2c_write(frame) is False
    assert emu.i2c_write(frame)
    emu.inject("corrupt_crc", count=1, cmd=P.ECHO)
    head = emu.i2c_read(3)  # a header read does not consume it
    bad = emu.i2c_read(3 + int.from_bytes(head[1:3], "big"))
    with pytest.raises(ValueError):
        P.parse_response(bad)
    assert P.parse_response(emu.i2c_read(len(bad)))[1] == b"abc"  # the next read is good
    emu.inject("status", code=0x05)
    assert P.parse_response(xfer(emu, frame))[0] == 0x05
    emu.inject("drop_response")
    assert emu.i2c_write(frame) and emu.i2c_read(3) is None
    emu.inject("stuck_busy")
    assert emu.i2c_write(frame) is False
    emu.clear()
    assert xfer(emu, frame)[3:6] == b"abc"
    n = emu.host_counter
    emu.inject("counter_step", count=3)
    assert emu.host_counter == n + 3
    emu.inject("corrupt_rmac", cmd=P.ECHO)
    with pytest.raises(StsafeHostError, match="R-MAC"):
        host.command(P.ECHO, b"x", mac=True)
    with pytest.raises(EmulatorError):
        emu.inject("no such fault")


def test_all_zero_digest_hangs_like_the_chip():
    emu, host = paired()
    host.generate_key(0, 0x0004)
    _, n = host.host_key_slot()
    hdr, payload = P.GENERATE_SIGNATURE | 0xE0, b"\x00" + P.lv(bytes(32))  # AC host: C-MAC'd
    assert emu.i2c_write(P.command_frame(hdr, payload, P.c_mac(MAC_KEY, n, hdr, payload)))
    assert emu.i2c_read(3) is None and emu.i2c_write(P.command_frame(0, b"")) is False
    emu.power_cycle()
    assert xfer(emu, P.command_frame(0, b"up"))[3:5] == b"up"


def test_hibernate_wakes_on_i2c_start():
    emu = StsafeEmulator.create(time_scale=0)
    assert P.parse_response(xfer(emu, P.command_frame(P.HIBERNATE, b"\x01")))[0] == 0
    frame = P.command_frame(P.ECHO, b"z")
    assert emu.i2c_write(frame) is False  # this START wakes it
    assert xfer(emu, frame)[3:4] == b"z"


def test_queries():
    emu, host = paired()
    pd = host.query(P.TAG_PRODUCT_DATA)
    assert len(pd) == 64 and pd[:5] == b"\x01\x03" + profile.MASK_ID
    assert host.query(P.TAG_LIFE_CYCLE) == b"\x03"
    assert host.query(P.TAG_I2C) == bytes([0x40, 0])
    table = host.query(P.TAG_COMMAND_AUTH)
    assert table[1] == len(profile.COMMAND_AUTH)
    # Every command using a private key, an envelope key or a counter needs the host C-MAC:
    # sent plain, each is refused with UNAUTHORIZED_COMMAND before it runs.
    assert set(profile.HOST_ONLY_COMMANDS) == {0x04, 0x0E, 0x0F, 0x11, 0x16, 0x18}
    for cmd in profile.HOST_ONLY_COMMANDS:
        assert host.authorization()[cmd][0] == P.AC_HOST
        assert P.parse_response(xfer(emu, P.command_frame(cmd, b"\x00" * 40)))[0] == 0x1E
    zones = host.data_partition()
    assert sorted(zones) == list(range(8)) and zones[5]["counter"] == 1_000_000
    keys = host.query(P.TAG_PRIVATE_KEY_TABLE)
    assert keys[0] == 3 and keys[4:8] == b"\x00\x00\x00\x00"


# RFC 3394 §4.1 "Wrap 128 bits of Key Data with a 128-bit KEK".
RFC3394_KEK = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
RFC3394_DATA = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
RFC3394_WRAPPED = bytes.fromhex("1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5")


def test_wrap_unwrap_local_envelope_rfc3394_vector():
    emu, host = paired()
    assert host.local_envelope_keys() == {0: None, 1: None}
    with pytest.raises(StsafeHostError) as e:
        host.wrap(0, RFC3394_DATA)
    assert e.value.status == 0x0A  # KEY_NOT_FOUND: no key in the slot yet
    host.generate_local_envelope_key(0, 0)
    host.generate_local_envelope_key(1, 1)
    assert host.local_envelope_keys() == {0: 16, 1: 32}
    with pytest.raises(StsafeHostError) as e:
        host.generate_local_envelope_key(0, 0)
    assert e.value.status == 0x11  # written once: old envelopes stay readable
    # The chip's slot-0 key set to the RFC's KEK: Wrap gives the RFC's ciphertext.
    emu.state["envelope_keys"]["0"]["key"] = RFC3394_KEK.hex()
    emu.wire.clear()
    assert host.wrap(0, RFC3394_DATA) == RFC3394_WRAPPED
    assert host.unwrap(0, RFC3394_WRAPPED) == RFC3394_DATA
    # On the wire: the Wrap command and the Unwrap response are encrypted (the plain key
    # never crosses the bus), and both went with a C-MAC and an R-MAC. (The RFC's key data
    # happens to be the test's host MAC key, sent in clear by Put Attribute: not looked at.)
    wraps = [(f, r) for f, r in emu.wire if f[0] & 0x1F in (P.WRAP, P.UNWRAP)]
    assert len(wraps) == 2 and all(f[0] & 0xE0 == 0xE0 and r[0] == 0x40 for f, r in wraps)
    for frame, rsp in wraps:
        assert RFC3394_DATA not in frame and RFC3394_DATA not in rsp
    # A 480-byte key blob (the largest) round-trips through slot 1 (AES-256).
    blob = os.urandom(480)
    env = host.wrap(1, blob)
    assert len(env) == 488 and host.unwrap(1, env) == blob
    # An altered envelope, another slot's envelope, bad lengths: refused, no data.
    bad = bytearray(RFC3394_WRAPPED)
    bad[10] ^= 1
    for slot, envelope, status in ((0, bytes(bad), 0x02), (1, RFC3394_WRAPPED, 0x02),
                                   (0, RFC3394_WRAPPED[:-1], 0x03), (0, bytes(16), 0x03)):
        with pytest.raises(StsafeHostError) as e:
            host.unwrap(slot, envelope)
        assert e.value.status == status
    for data in (bytes(8), bytes(17), bytes(488)):
        with pytest.raises(StsafeHostError) as e:
            host.wrap(0, data)
        assert e.value.status == 0x03
    # Without the host C-MAC: refused (AC host), nothing unwrapped.
    for cmd in (P.WRAP, P.UNWRAP):
        r = P.parse_response(xfer(emu, P.command_frame(cmd, b"\x00" + RFC3394_WRAPPED)))
        assert r[0] == 0x1E and r[1] == b""


def test_cli_serves_the_chip_and_saves_it(tmp_path):
    state = tmp_path / "chip.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serene.cli",
            "stsafe-emu",
            "--state",
            str(state),
            "--create",
            "--time-scale",
            "0",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("port ")
        port = int(line.split()[1])
        import socket

        with socket.create_connection(("127.0.0.1", port)) as s:
            frame = P.command_frame(P.PUT_ATTRIBUTE, b"\x17" + MAC_KEY + CIPHER_KEY)
            s.sendall(b"W\x20" + len(frame).to_bytes(2, "big") + frame)
            assert s.recv(1) == b"\x00"
            s.sendall(b"R\x20\x00\x05")
            assert s.recv(6) == b"\x00" + P.response_frame(0)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
    assert json.loads(state.read_text())["host_keys"]["mac"] == MAC_KEY.hex()


_POINT = (serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
