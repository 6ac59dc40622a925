"""Nonce uniqueness across reboots and power cuts: (key, nonce) never repeats.

100 simulated reboots of the module (each a fresh MicroPython process, the firmware from the
mpy-cross build, the real STSAFE driver against the provisioned emulator): each starts an
epoch and seals records. A third of them lose power exactly around the epoch counter's
Decrement (before the command reaches the chip, or after the chip executed it but before
the answer is read), another third at a random I2C transfer anywhere in the boot; the
emulator then power-cycles (the ephemeral key slot is lost, the counter is not). The
independent verifier derives every epoch's key from the epoch records and computes every
record's nonce (RFC 8613 §5.2); all (key, nonce) pairs must be distinct, every record must
open, and no epoch number may come back."""

import json
import random
import subprocess
import threading

import pytest

from serene import upy as upy_mod
from serene.i2c_bridge import I2CBridgeServer
from serene.stsafe import profile
from serene.stsafe.emulator import StsafeEmulator
from serene.stsafe.provision import provision
from serene.verifier import from_home, protocol

DEV = "SRN-0001"
NODE = str(upy_mod.REPO / "tests" / "upy" / "seal_node.py")
REBOOTS = 100
RECORDS_PER_BOOT = 3
DECREMENT = 0x04


class CutDevice:
    """The emulator behind a power switch: at a chosen point the module loses power (its
    process is killed) and the bus goes dead until the next boot."""

    def __init__(self, emu):
        self.emu = emu
        self.lock = threading.Lock()
        self.arm(None, None)

    def arm(self, proc, cut):
        self.proc, self.cut = proc, cut  # cut: None, ("at", n), ("decrement", "before"|"after")
        self.transfers = 0
        self.dead = False
        self.decrement_done = False

    def _power_off(self):
        self.dead = True
        self.proc.kill()

    def i2c_write(self, data):
        with self.lock:
            if self.dead:
                return False
            self.transfers += 1
            c = self.cut
            if c and c[0] == "at" and self.transfers >= c[1]:
                self._power_off()
                return False
            is_dec = len(data) > 0 and data[0] & 0x1F == DECREMENT
            if c and c[0] == "decrement" and is_dec and c[1] == "before":
                self._power_off()
                return False
            ok = self.emu.i2c_write(data)
            if ok and is_dec:
                self.decrement_done = True
            return ok

    def i2c_read(self, n):
        with self.lock:
            if self.dead:
                return None
            self.transfers += 1
            c = self.cut
            if c and c[0] == "at" and self.transfers >= c[1]:
                self._power_off()
                return None
            if c and c == ("decrement", "after") and self.decrement_done:
                self._power_off()  # executed by the chip, the answer never read
                return None
            return self.emu.i2c_read(n)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp("prov-nonce")
    provision(h, [DEV])
    return h


def test_no_key_nonce_pair_repeats_over_100_reboots_with_power_cuts(home, upy, tmp_path):
    emu = StsafeEmulator.load(home / "devices" / DEV / "stsafe.json", time_scale=0, autosave=False)
    module = json.loads((home / "devices" / DEV / "module.json").read_text())
    dev = CutDevice(emu)
    rng = random.Random(8613)
    z = module["zones"]
    with I2CBridgeServer({profile.I2C_ADDRESS: dev}) as bridge:
        cfg = {
            "port": bridge.port,
            "mac_key": module["host_mac_key"],
            "cipher_key": module["host_cipher_key"],
            "device_id": DEV,
            "counter_zone": z["epoch_counter"]["zone"],
            "server_key": [z["server_key"]["zone"], z["server_key"]["offset"]],
            "cert_zone": z["certificate"]["zone"],
            "cert": "x5t",
            "fast": True,
            "ops": [{"op": "start"}]
            + [{"op": "seal", "pt": bytes([0xA1, 1, i]).hex()} for i in range(RECORDS_PER_BOOT)],
        }
        path = tmp_path / "boot.json"
        path.write_text(json.dumps(cfg))

        def boot(cut):
            p = upy.popen([NODE, str(path)], mpy=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)  # fmt: skip
            dev.arm(p, cut)
            out, err = p.communicate(timeout=60)
            decrements.append(dev.decrement_done)
            emu.power_cycle()
            if cut is None:
                assert p.returncode == 0, err
            return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

        decrements = []
        counter0 = emu.zone(profile.EPOCH_COUNTER_ZONE)["counter"]
        lines = boot(None)  # a full boot: how many transfers it takes
        full = dev.transfers
        outputs = [lines]
        cuts = {"decrement": 0, "random": 0, "none": 0}
        for i in range(REBOOTS - 1):
            kind = i % 3
            if kind == 0:
                cut = ("decrement", rng.choice(("before", "after")))
                cuts["decrement"] += 1
            elif kind == 1:
                cut = ("at", rng.randrange(1, full))
                cuts["random"] += 1
            else:
                cut = None
                cuts["none"] += 1
            outputs.append(boot(cut))

    v = from_home(home)
    pairs = set()
    epochs = []
    records = 0
    keyed = 0
    for lines in outputs:
        ep = None
        keyed += any("sealed" in d for d in lines)
        for d in lines:
            if "record" in d:
                ep = v.accept_epoch(DEV, bytes.fromhex(d["record"]))
                assert ep.epoch == d["epoch"]
                epochs.append(ep.epoch)
            elif "sealed" in d:
                sealed = bytes.fromhex(d["sealed"])
                e, seq, _ = v.open_record(DEV, sealed, ep.epoch)
                assert seq == d["seq"]
                key = ep.keys.record_key
                nonce = protocol.oscore_nonce(ep.keys.record_iv, protocol.kid_for(e), seq)
                assert (key, nonce) not in pairs
                pairs.add((key, nonce))
                records += 1
    # epoch numbers (2^32 - 1 - counter): strictly increasing over the boots, never reused; a
    # boot cut after the chip executed its Decrement skipped a number (counted, never used)
    assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)
    executed = sum(decrements)
    assert emu.zone(profile.EPOCH_COUNTER_ZONE)["counter"] == counter0 - executed
    top = 2**32 - 1
    assert set(epochs) <= set(range(top - counter0 + 1, top - counter0 + executed + 1))
    assert executed > len(epochs)  # some cuts fell after the Decrement: numbers skipped
    # one record key per epoch that sealed anything
    assert len({k for k, _ in pairs}) == keyed
    # every uncut boot completed; cuts around the Decrement never completed an epoch
    assert len(epochs) >= cuts["none"] + 1
    assert len(epochs) <= REBOOTS - cuts["decrement"]
    assert records >= (cuts["none"] + 1) * RECORDS_PER_BOOT
    assert len(pairs) == records
