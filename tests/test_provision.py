"""serene provision: CA, server identity, per-module chip identity; idempotent; private keys
only inside the chips' state files and the CA/server directories."""

import json
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from serene import cli
from serene.stsafe import profile
from serene.stsafe.emulator import StsafeEmulator
from serene.stsafe.provision import ProvisionError, provision

IDS = ["SRN-0001", "SRN-0002"]
POINT = (serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def snapshot(home):
    return {
        str(p.relative_to(home)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(home.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp("home")
    assert provision(h, IDS) == {i: "created" for i in IDS}
    return h


def test_layout_and_chain(home):
    ca = x509.load_pem_x509_certificate((home / "ca" / "ca.crt.pem").read_bytes())
    server = x509.load_pem_x509_certificate((home / "server" / "server.crt.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    server_key = serialization.load_pem_private_key(
        (home / "server" / "server.key.pem").read_bytes(), None
    )
    assert server_key.public_key().public_bytes(*POINT) == server.public_key().public_bytes(*POINT)
    registry = json.loads((home / "registry.json").read_text())
    assert sorted(registry["devices"]) == IDS
    for dev in IDS:
        d = home / "devices" / dev
        cert = x509.load_pem_x509_certificate((d / "device.crt.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == dev
        assert registry["devices"][dev]["certificate"] == (d / "device.crt.pem").read_text()
        emu = StsafeEmulator.load(d / "stsafe.json", time_scale=0)
        # the certificate's key is the chip's slot-0 key, and the chip holds the certificate
        assert emu.public_key(0) == cert.public_key().public_bytes(*POINT)
        der = cert.public_bytes(serialization.Encoding.DER)
        z0 = emu.zone(profile.CERT_ZONE)
        assert bytes.fromhex(z0["data"])[: len(der)] == der
        assert z0["update_ac"] == profile.AC_NEVER_LOCKED and z0["update_right"] == 0
        z2 = bytes.fromhex(emu.zone(profile.SERVER_KEY_ZONE)["data"])
        assert z2[:65] == server.public_key().public_bytes(*POINT)
        assert z2[65:130] == ca.public_key().public_bytes(*POINT)
        assert emu.zone(profile.SERVER_KEY_ZONE)["update_ac"] == 1
        cfg = json.loads((d / "module.json").read_text())
        assert cfg["device_id"] == dev and cfg["i2c_address"] == 0x20
        assert emu.state["host_keys"] == {
            "mac": cfg["host_mac_key"],
            "cipher": cfg["host_cipher_key"],
        }
        assert cfg["zones"]["certificate"]["zone"] == profile.CERT_ZONE
        assert cfg["zones"]["epoch_counter"]["zone"] == profile.EPOCH_COUNTER_ZONE
        assert emu.zone(cfg["zones"]["epoch_counter"]["zone"])["type"] == 1
    # the first epoch the module will announce: 2^32-1 - (counter after one Decrement)
    for dev in IDS:
        emu = StsafeEmulator.load(home / "devices" / dev / "stsafe.json", time_scale=0)
        counter = emu.zone(profile.EPOCH_COUNTER_ZONE)["counter"]
        assert counter == 1_000_000
        assert registry["devices"][dev]["first_epoch"] == 2**32 - 1 - (counter - 1)
    # two modules, two different identities and pairings
    a, b = (json.loads((home / "devices" / i / "module.json").read_text()) for i in IDS)
    assert a["host_mac_key"] != b["host_mac_key"]


def test_second_run_changes_nothing(home):
    before = snapshot(home)
    assert provision(home, IDS) == {i: "unchanged" for i in IDS}
    assert snapshot(home) == before  # same bytes, same modification times


def test_private_keys_only_in_chips_and_ca_server(home):
    secrets = {}
    for rel in ("ca/ca.key.pem", "server/server.key.pem"):
        key = serialization.load_pem_private_key((home / rel).read_bytes(), None)
        secrets[rel] = key.private_numbers().private_value.to_bytes(32, "big")
        assert os.stat(home / rel).st_mode & 0o077 == 0
    for dev in IDS:
        state = json.loads((home / "devices" / dev / "stsafe.json").read_text())
        secrets[dev] = bytes.fromhex(state["key_slots"]["0"]["private"])
    pem_files, where = [], {}
    for path in sorted(home.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(home))
        data = path.read_bytes()
        if b"PRIVATE KEY" in data:
            pem_files.append(rel)
        for name, secret in secrets.items():
            if secret in data or secret.hex().encode() in data.lower():
                where.setdefault(name, []).append(rel)
    assert pem_files == ["ca/ca.key.pem", "server/server.key.pem"]
    # raw or hex scalars: each chip's key in its own state file, nowhere else
    assert where == {dev: ["devices/%s/stsafe.json" % dev] for dev in IDS}


def test_first_epoch_kept_after_the_module_counted(tmp_path):
    provision(tmp_path, ["SRN-0001"])
    reg = json.loads((tmp_path / "registry.json").read_text())
    first = reg["devices"]["SRN-0001"]["first_epoch"]
    emu = StsafeEmulator.load(tmp_path / "devices" / "SRN-0001" / "stsafe.json", time_scale=0)
    emu.zone(profile.EPOCH_COUNTER_ZONE)["counter"] -= 5  # the module ran: five epochs
    emu.save()
    provision(tmp_path, ["SRN-0001"])
    reg = json.loads((tmp_path / "registry.json").read_text())
    assert reg["devices"]["SRN-0001"]["first_epoch"] == first == 2**32 - 1_000_000


def test_more_devices_later_and_resume(tmp_path):
    provision(tmp_path, ["SRN-0001"])
    first = snapshot(tmp_path)
    assert provision(tmp_path, ["SRN-0001", "SRN-0002"]) == {
        "SRN-0001": "unchanged",
        "SRN-0002": "created",
    }
    for rel, v in first.items():
        if rel not in ("registry.json", "netserver/keys.json"):  # the two shared lists grow
            assert snapshot(tmp_path)[rel] == v
    # the registry lost: rebuilt from the devices, same certificates
    reg = (tmp_path / "registry.json").read_bytes()
    (tmp_path / "registry.json").unlink()
    assert provision(tmp_path, ["SRN-0001", "SRN-0002"])["SRN-0001"] == "unchanged"
    assert (tmp_path / "registry.json").read_bytes() == reg


def test_interrupted_after_pairing_resumes(tmp_path):
    # Simulate a crash right after module.json was written: the chip has no host keys yet.
    provision(tmp_path, ["SRN-0001"])
    d = tmp_path / "devices" / "SRN-0001"
    cfg = json.loads((d / "module.json").read_text())
    blank = StsafeEmulator.create(d / "stsafe.json", time_scale=0)
    assert blank.state["host_keys"] is None
    (d / "device.crt.pem").unlink()
    assert provision(tmp_path, ["SRN-0001"]) == {"SRN-0001": "updated"}
    emu = StsafeEmulator.load(d / "stsafe.json")
    assert emu.state["host_keys"]["mac"] == cfg["host_mac_key"]  # the recorded keys were used
    cert = x509.load_pem_x509_certificate((d / "device.crt.pem").read_bytes())
    assert emu.public_key(0) == cert.public_key().public_bytes(*POINT)


def test_refuses_what_it_cannot_repair(tmp_path):
    provision(tmp_path, ["SRN-0001"])
    d = tmp_path / "devices" / "SRN-0001"
    (d / "module.json").unlink()  # the host keys are gone; the chip will not give them back
    with pytest.raises(ProvisionError, match="host keys cannot be read back"):
        provision(tmp_path, ["SRN-0001"])
    with pytest.raises(ProvisionError, match="bad device id"):
        provision(tmp_path, ["srn 1"])
    (tmp_path / "server" / "server.key.pem").unlink()  # a certificate is never re-keyed
    with pytest.raises(ProvisionError, match="exists without its key"):
        provision(tmp_path, ["SRN-0002"])
    assert not (tmp_path / "server" / "server.key.pem").exists()


def test_refuses_a_chip_with_the_old_command_table(tmp_path):
    # A home provisioned with the old profile (Generate Signature free, no Wrap/Unwrap rows):
    # its chips are signing oracles and their table cannot be changed; refused, untouched.
    provision(tmp_path, ["SRN-0001"])
    chip = tmp_path / "devices" / "SRN-0001" / "stsafe.json"
    emu = StsafeEmulator.load(chip, time_scale=0)
    emu.set_command_auth([(0x04, 3, 0), (0x06, 3, 0), (0x11, 3, 0), (0x18, 3, 0x01)])
    before = snapshot(tmp_path)
    with pytest.raises(ProvisionError, match=r"lets 0x0E, 0x0F, 0x16 run without the host "
                       r"C-MAC .*provision a new chip"):  # fmt: skip
        provision(tmp_path, ["SRN-0001"])
    assert snapshot(tmp_path) == before
    chip.unlink()  # a new chip for that module: provisioned afresh
    (tmp_path / "devices" / "SRN-0001" / "module.json").unlink()
    (tmp_path / "devices" / "SRN-0001" / "device.crt.pem").unlink()
    assert provision(tmp_path, ["SRN-0001"]) == {"SRN-0001": "created"}


def test_cli(tmp_path, capsys):
    assert cli.main(["provision", "--home", str(tmp_path), "--devices", "2"]) == 0
    assert capsys.readouterr().out.split() == ["SRN-0001", "created", "SRN-0002", "created"]
    assert cli.main(["provision", "--home", str(tmp_path), "--ids", "SRN-0002"]) == 0
    assert capsys.readouterr().out.split() == ["SRN-0002", "unchanged"]
    assert cli.main(["provision", "--home", str(tmp_path), "--devices", "0"]) == 1
    assert "serene: --devices" in capsys.readouterr().err


def test_server_static_key_agrees_with_module_ecdh(home):
    # The pinned server key is the one whose private half the server holds: ECDH both ways.
    server_key = serialization.load_pem_private_key(
        (home / "server" / "server.key.pem").read_bytes(), None
    )
    emu = StsafeEmulator.load(
        home / "devices" / IDS[0] / "stsafe.json", time_scale=0, autosave=False
    )
    pinned = bytes.fromhex(emu.zone(profile.SERVER_KEY_ZONE)["data"])[:65]
    module_eph = ec.generate_private_key(ec.SECP256R1())
    pinned_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pinned)
    assert module_eph.exchange(ec.ECDH(), pinned_key) == server_key.exchange(
        ec.ECDH(), module_eph.public_key()
    )


def test_lorawan_keys_appkey_only_wrapped_on_the_module(home):
    from serene.netserver import keys as ns_keys
    from serene.stsafe.host import StsafeHost
    from serene.stsafe.provision import netserver_keys_path

    kpath = netserver_keys_path(home)
    assert os.stat(kpath).st_mode & 0o777 == 0o600
    assert os.stat(kpath.parent).st_mode & 0o777 == 0o700
    keys = {d["deviceName"]: d for d in ns_keys.load(kpath)}
    reg = json.loads((home / "registry.json").read_text())
    euis = set()
    for dev in IDS:
        cfg = json.loads((home / "devices" / dev / "module.json").read_text())
        lw = cfg["lorawan"]
        assert set(lw) == {"dev_eui", "join_eui", "appkey_envelope"}
        assert reg["devices"][dev]["dev_eui"] == lw["dev_eui"] == keys[dev]["devEui"]
        assert keys[dev]["joinEui"] == lw["join_eui"]
        app_key = bytes.fromhex(keys[dev]["appKey"])
        # the module holds the AppKey only as the chip's envelope: 16 + 8 bytes, and the
        # chip (with the host keys) unwraps it to the network server's key
        env = bytes.fromhex(lw["appkey_envelope"])
        assert len(env) == 24 and app_key.hex() not in json.dumps(cfg)
        emu = StsafeEmulator.load(home / "devices" / dev / "stsafe.json", time_scale=0)
        host = StsafeHost(emu, bytes.fromhex(cfg["host_mac_key"]),
                          bytes.fromhex(cfg["host_cipher_key"]))
        assert host.unwrap(profile.ENVELOPE_KEY_SLOT, env) == app_key
        euis.add(lw["dev_eui"])
    assert len(euis) == len(IDS)
    # The keys file lost: the next run gives it back from the envelopes, same keys.
    kpath.unlink()
    provision(home, IDS)
    assert {d["deviceName"]: d for d in ns_keys.load(kpath)} == keys
