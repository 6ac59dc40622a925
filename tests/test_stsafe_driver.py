"""The MicroPython STSAFE-A110 driver (drivers/stsafe, run by the unix port, compiled by
mpy-cross as on the board) against the emulator behind the I2C bridge.

Results are checked against the spec and against `cryptography` (ECDH, ECDSA, X.509), never
against the driver itself. The scenarios are in tests/upy/stsafe_scenarios.py.
"""

import json
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from serene import upy as upy_mod
from serene.i2c_bridge import I2CBridgeServer
from serene.stsafe import profile
from serene.stsafe.emulator import FaultPort, StsafeEmulator
from serene.stsafe.provision import provision

SCRIPT = str(upy_mod.REPO / "tests" / "upy" / "stsafe_scenarios.py")
DEVICE = "SRN-0001"
POINT = (serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp("prov")
    provision(h, [DEVICE])
    return h


@pytest.fixture
def chip(home, tmp_path):
    """A fresh copy of the provisioned chip, and the module's host keys."""
    shutil.copy(home / "devices" / DEVICE / "stsafe.json", tmp_path / "stsafe.json")
    cfg = json.loads((home / "devices" / DEVICE / "module.json").read_text())
    emu = StsafeEmulator.load(tmp_path / "stsafe.json", time_scale=0)
    return emu, cfg


def run(upy, emu, cfg, scenario, *args, keys=True, mpy=True, timeout=60):
    mac, cipher = (cfg["host_mac_key"], cfg["host_cipher_key"]) if keys else ("-", "-")
    with I2CBridgeServer({0x20: emu, FaultPort.ADDR: FaultPort(emu)}) as bridge:
        res = upy.run(
            [SCRIPT, str(bridge.port), mac, cipher, scenario, *map(str, args)],
            heap="128K",  # the scenario script is compiled from source in the same heap
            mpy=mpy,
            timeout=timeout,
        )
    return json.loads(res.stdout.strip().splitlines()[-1])


def verify(pub65, sig, digest):
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pub65)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    pub.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))  # raises if invalid


def test_every_command_round_trips_with_cmac_rmac(upy, chip, home):
    emu, cfg = chip
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_pub = peer.public_key().public_bytes(*POINT)
    digest = bytes(range(1, 33))
    device_cert = x509.load_pem_x509_certificate(
        (home / "devices" / DEVICE / "device.crt.pem").read_bytes()
    )
    pub0 = device_cert.public_key().public_bytes(*POINT)
    r = run(upy, emu, cfg, "roundtrip", peer_pub.hex(), digest.hex(), pub0.hex())

    assert r["mask"] == profile.MASK_ID.hex()
    assert r["echo"] == "serene"
    assert len(bytes.fromhex(r["random"])) == 300 and len(set(bytes.fromhex(r["random"]))) > 100
    assert r["life_cycle"] == profile.LIFE_CYCLE_OPERATIONAL
    assert r["host_key_slot"][0] is True
    # Data partition as the emulated profile defines it, with provisioning's locks.
    zones = {z[0]: z for z in r["zones"]}
    assert sorted(zones) == [z[0] for z in profile.ZONES]
    assert zones[profile.CERT_ZONE][4] == profile.AC_NEVER_LOCKED  # update AC: never
    assert zones[profile.SERVER_KEY_ZONE][4] == 1  # update AC: host
    assert zones[profile.EPOCH_COUNTER_ZONE][1] == 1  # one-way counter
    assert r["auth"] == sorted(list(row) for row in profile.COMMAND_AUTH)
    for cmd in profile.HOST_ONLY_COMMANDS:  # sign, agree, generate, count, wrap, unwrap
        assert [cmd, 3] in [row[:2] for row in r["auth"]], hex(cmd)
    assert r["keys"][0] == [0, True, profile.FACTORY_KEY_MODE, "P-256"]
    # Zones read back what was written (300 bytes: two chunks; 150 atomic: three chunks).
    data = bytes(i & 0xFF for i in range(300))
    assert bytes.fromhex(r["read"]) == data
    assert bytes.fromhex(r["read_atomic"]) == data[:150]
    # One-way counter: only goes down; the data written with Decrement is there.
    assert r["dec"] == [999_999, 999_996] and r["counter"] == 999_996
    assert bytes.fromhex(r["counter_data"])[2:7] == b"epoch"
    # ECDH: the chip's shared secret equals the one computed on the host from the public keys.
    eph = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(r["eph"]))
    assert bytes.fromhex(r["z"]) == peer.exchange(ec.ECDH(), eph)
    assert r["eph_reuse"] == "KeyNotFound"  # slot 0xFF is single use
    # The signature verifies against the certificate read from zone 0, signed by the CA.
    cert = x509.load_der_x509_certificate(bytes.fromhex(r["cert"]))
    assert cert == device_cert
    ca = x509.load_pem_x509_certificate((home / "ca" / "ca.crt.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == DEVICE
    verify(cert.public_key().public_bytes(*POINT), bytes.fromhex(r["sig"]), digest)
    assert r["verify_ok"] is True
    assert r["verify_bad"] is False and r["verify_other_digest"] is False
    assert r["locked_cert_zone"] == "UnsatisfiedAccessCondition"
    assert r["repair"] == "UnsatisfiedAccessCondition"
    assert r["zero_digest"] == "ParameterError"
    assert r["after_hibernate"] == "awake"
    # Every command but Query/Put Attribute/Reset/Hibernate went with a C-MAC, and the
    # driver's counter N is the chip's.
    mac_policy_free = {0x14, 0x10, 0x01, 0x0D}
    for cmd, status, maced in emu.commands:
        assert maced == (cmd not in mac_policy_free), (cmd, status, maced)
    assert {c for c, _, _ in emu.commands} >= {0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x0D, 0x10,
                                               0x11, 0x14, 0x16, 0x17, 0x18}  # fmt: skip
    assert r["n_driver"] == r["n_chip"] == emu.host_counter
    # No all-zero digest reached the chip (it would have hung).
    assert not emu._stuck


def test_one_way_counter_reports_exhaustion(upy, chip):
    emu, cfg = chip
    emu.zone(6)["counter"] = 3
    r = run(upy, emu, cfg, "counter_exhaust", 6)
    assert r["values"] == [3, 2, 1, 0]
    assert r["error"] == "CounterLimitExceeded"
    assert r["after"] == 0 and emu.zone(6)["counter"] == 0
    assert r["zero_amount"] == "ParameterError"
    assert r["n_driver"] == r["n_chip"]


def test_faults_nack_bound_crc_rmac_lost_step(upy, chip):
    emu, cfg = chip
    bound = 300
    r = run(upy, emu, cfg, "faults", bound)
    assert r["stuck"] == "NackTimeout"
    assert bound <= r["stuck_ms"] <= bound + 150, r["stuck_ms"]  # Echo's wait is 0 ms
    assert r["after_stuck"] == "ok1" and r["storm"] == "ok2"
    assert r["crc_once"] == "ok3"
    assert r["crc_many"] == "CRCError" and r["after_crc"] == "ok4"
    assert r["rmac"] == "RMACError" and r["after_rmac"] == "ok5"
    assert r["dropped"] == "NackTimeout" and r["after_drop"] == "ok6"
    assert r["after_step"] == "ok7" and r["resyncs"] == 1
    assert r["status5"] == "UnexpectedError"
    assert r["status1"] == "ok8"
    assert r["n_driver"] == r["n_chip"] == emu.host_counter
    # The CRC-corrupted echo was read again, never executed twice; status 0x05 was not
    # retried, status 0x01 was re-sent once.
    echoes = [s for c, s, m in emu.commands if c == 0x00]
    assert echoes.count(0x16) == 1  # the stepped counter, then the re-send
    assert echoes.count(0x05) == 1  # UNEXPECTED_ERROR: raised, not retried
    i = echoes.index(0x01)
    assert echoes[i + 1] == 0x00  # COMMUNICATION_ERROR: re-sent once, then answered
    assert all(m for c, s, m in emu.commands if c == 0x00)  # every echo went with a C-MAC


def test_other_tasks_run_while_the_chip_is_busy(upy, chip):
    emu, cfg = chip
    emu.time_scale = 1.0  # the datasheet's processing times
    peer = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*POINT)
    r = run(upy, emu, cfg, "ticker", peer.hex(), bytes(range(1, 33)).hex())
    busy_ms = 160 + 260 + 80  # Generate Key + Establish Key + Generate Signature waits
    assert r["elapsed_ms"] >= busy_ms
    assert r["ticks"] >= busy_ms // 4, r  # a 1 ms ticker kept running
    # Never blocked for a chip wait (the shortest here is 80 ms); margin for a loaded machine.
    assert r["max_gap_ms"] < 60, r


def test_commands_and_responses_encrypted_per_authorization_table(upy, chip):
    emu, cfg = chip
    # Echo: command and response encrypted; Update: command; Read: response; Establish Key:
    # both. The driver learns this from Query 0x24 at init().
    emu.set_command_auth([(0x00, 3, 0x03), (0x06, 3, 0x02), (0x05, 3, 0x01), (0x18, 3, 0x03),
                          (0x11, 3, 0x00)])  # fmt: skip
    peer = ec.generate_private_key(ec.SECP256R1())
    r = run(upy, emu, cfg, "encrypted", peer.public_key().public_bytes(*POINT).hex())
    assert bytes.fromhex(r["echo"]) == b"secret echo " * 4
    assert bytes.fromhex(r["read"]) == bytes(range(100, 200))
    eph = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(r["eph"]))
    assert bytes.fromhex(r["z"]) == peer.exchange(ec.ECDH(), eph)
    assert r["n_driver"] == r["n_chip"]
    # On the wire: no plaintext in either direction, for every encrypted command.
    seen = {frame[0] & 0x1F for frame, _ in emu.wire}
    assert {0x00, 0x05, 0x06, 0x18} <= seen
    for frame, rsp in emu.wire:
        assert b"secret echo" not in frame and b"secret echo" not in rsp
        assert bytes(range(100, 120)) not in frame and bytes(range(100, 120)) not in rsp
        assert bytes.fromhex(r["z"])[:16] not in rsp


def test_init_refuses_another_chip(upy, chip):
    emu, cfg = chip
    pd = bytearray.fromhex(emu.state["product_data"])
    pd[3:5] = b"\x60\x01"  # an A120 mask id
    emu.state["product_data"] = pd.hex()
    assert run(upy, emu, cfg, "init_only")["error"] == "WrongDevice"
    emu.state["product_data"] = profile.product_data(bytes(9)).hex()
    emu.set_life_cycle(0x04)  # terminated
    assert run(upy, emu, cfg, "init_only")["error"] == "WrongDevice"


def test_without_host_keys_authenticated_commands_are_refused_locally(upy, chip):
    emu, cfg = chip
    r = run(upy, emu, cfg, "no_keys", keys=False, mpy=False)
    assert r["generate_key"] == "CryptoError" and r["sig"] == "CryptoError"
    assert r["echo"] == "plain"
    assert not {0x11, 0x16} & {c for c, _, _ in emu.commands}


KEY_COMMANDS = ("generate_key_1", "generate_key_ff", "establish_key", "generate_signature",
                "decrement", "wrap", "unwrap")  # fmt: skip


def test_the_chip_is_no_signing_oracle_for_the_bus(upy, chip):
    """Issue 8, item 4: a process on the I2C bus without the host keys cannot make the chip
    sign, agree a key, generate a key, count, wrap or unwrap: the provisioned command
    authorization table needs the host C-MAC for each (UNAUTHORIZED_COMMAND 0x1E), and a
    guessed key gets INVALID_CMAC 0x16. Nothing changes on the chip. The paired MCU can."""
    emu, cfg = chip
    peer = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*POINT)
    before = json.dumps(emu.state, sort_keys=True)
    r = run(upy, emu, cfg, "oracle", peer.hex(), keys=False)
    assert r["plain"] == {**{c: "UnauthorizedCommand" for c in KEY_COMMANDS}, "unwrapped": None}
    assert r["guessed_keys"] == {**{c: "InvalidCMAC" for c in KEY_COMMANDS}, "unwrapped": None}
    # What the chip saw and answered: the plain commands refused with 0x1E, none executed.
    key_cmds = {0x04, 0x0E, 0x0F, 0x11, 0x16, 0x18}
    seen = [(c, st) for c, st, _ in emu.commands if c in key_cmds]
    assert {c for c, _ in seen} == key_cmds
    assert {st for _, st in seen} == {0x1E, 0x16}
    # Nothing changed: counter, key slots (and their usage counts), envelope keys, N.
    assert json.dumps(emu.state, sort_keys=True) == before
    assert emu.zone(profile.EPOCH_COUNTER_ZONE)["counter"] == 1_000_000
    assert emu.public_key(1) is None and emu.public_key(0xFF) is None

    # The paired MCU (the module's host keys, as the firmware runs the driver) can.
    uses = emu.state["key_slots"]["0"]["uses"]
    r = run(upy, emu, cfg, "oracle", peer.hex())["paired"]
    assert {c: r[c] for c in KEY_COMMANDS} == {c: "ok" for c in KEY_COMMANDS}
    assert bytes.fromhex(r["unwrapped"]) == bytes(range(16))
    assert emu.zone(profile.EPOCH_COUNTER_ZONE)["counter"] == 999_999
    assert emu.public_key(1) is not None and emu.state["key_slots"]["0"]["uses"] == uses + 1


# RFC 3394 §4.1 "Wrap 128 bits of Key Data with a 128-bit KEK".
RFC3394_KEK = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
RFC3394_DATA = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
RFC3394_WRAPPED = bytes.fromhex("1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5")


def test_wrap_and_unwrap_local_envelope(upy, chip):
    emu, cfg = chip
    slot = cfg["zones"]["envelope_key_slot"]
    # Provisioning made an AES-128 key in the module's envelope slot; the test gives it the
    # RFC's KEK so that the driver's envelope can be checked against the RFC.
    key = emu.state["envelope_keys"][str(slot)]
    assert key["type"] == 0 and len(bytes.fromhex(key["key"])) == 16
    key["key"] = RFC3394_KEK.hex()
    r = run(upy, emu, cfg, "envelope", slot, RFC3394_DATA.hex())
    assert r["table"] == [[0, 16], [1, None]]
    assert bytes.fromhex(r["envelope"]) == RFC3394_WRAPPED
    assert bytes.fromhex(r["unwrapped"]) == RFC3394_DATA
    assert r["blob_roundtrip"] is True and r["big"] == [488, True]
    assert r["bad_lengths"] == ["ParameterError"] * 9 and r["nothing_sent"] is True
    assert r["altered"] == "InconsistentCommandData"  # the chip's status, as its class
    assert r["empty_slot"] == "KeyNotFound"
    assert r["n_driver"] == r["n_chip"] == emu.host_counter
    # On the bus, the plain data never appears: Wrap's command and Unwrap's response are
    # encrypted (the chip's table), and every Wrap/Unwrap went with a C-MAC.
    blob = bytes(range(32))
    wire = [(f, rsp) for f, rsp in emu.wire if f[0] & 0x1F in (0x0E, 0x0F)]
    assert len(wire) >= 6
    for f, rsp in wire:
        assert f[0] & 0xE0 == 0xE0
        for plain in (RFC3394_DATA, blob[:16]):
            assert plain not in f and plain not in rsp
