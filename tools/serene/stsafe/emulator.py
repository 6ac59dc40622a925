"""STSAFE-A110 emulator: an I2C device for serene.i2c_bridge, its state in a JSON file.

    emu = StsafeEmulator.create("chip.json")      # a blank chip, saved there
    emu = StsafeEmulator.load("chip.json", time_scale=0)
    with I2CBridgeServer({0x20: emu}) as bridge: ...

Behaviour (specs/stsafe-a110.md §7): writes are ACKed (NACKed while busy or asleep); reads
are NACKed until the command's processing time (the §1 wait table x time_scale) has passed;
every read restarts at byte 0 of the response and may be short; a command with a bad CRC
gets status 0x01; the host C-MAC counter N is kept, C-MACs checked (0x16) and R-MACs made;
commands and responses are encrypted as the command authorization table says; zone access
conditions, one-way counters, key slots (modes, usage limits, single-use slot 0xFF), local
envelope keys (Wrap / Unwrap Local Envelope, RFC 3394 AES key wrap) and the life-cycle state
are enforced. Private keys exist only in this object and its state file.

Faults for tests (inject(kind, count=1, cmd=None, **kw); `cmd` limits a fault to one command
code): "nack_storm" (NACK the next `count` transfers), "stuck_busy" (NACK everything until
clear() or power_cycle()), "slow" (ms=: busy that much longer), "corrupt_crc" (flip the CRC of
the next `count` whole-response reads), "corrupt_rmac" (flip the R-MAC, CRC still valid),
"status" (code=: answer that status without executing), "drop_response" (execute, then NACK
every read: the response is lost), "counter_step" (N moves on by `count`, as if a response had
been lost).
"""

import collections
import json
import os
import threading
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import profile
from . import protocol as P

FORMAT = "serene-stsafe-emulator/1"
_EC_CURVES = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "BP256": ec.BrainpoolP256R1,
    "BP384": ec.BrainpoolP384R1,
}
_HASH_BY_LEN = {32: hashes.SHA256(), 48: hashes.SHA384()}
_MODE_MASK = 0x800D
_MODE_ESTABLISH, _MODE_SIGN = 0x0001, 0x0004
FAULTS = (
    "nack_storm",
    "stuck_busy",
    "slow",
    "corrupt_crc",
    "corrupt_rmac",
    "status",
    "drop_response",
    "counter_step",
)


class EmulatorError(Exception):
    """Misuse of the emulator itself (bad state file, unknown fault)."""


class _Fail(Exception):
    """A command fails with a chip status (internal)."""

    def __init__(self, name):
        super().__init__(name)
        self.status = P.ST[name]


def blank_state(rng=os.urandom):
    """The state of a chip as it leaves the factory: no host keys, no keys, empty zones."""
    zones = []
    for z in profile.ZONES:
        d = dict(zip(profile.ZONE_FIELDS, z, strict=True))
        d["data"] = bytes(d["size"]).hex()
        zones.append(d)
    return {
        "format": FORMAT,
        "product_data": profile.product_data(rng(9)).hex(),
        "i2c_address": profile.I2C_ADDRESS,
        "life_cycle": profile.LIFE_CYCLE_OPERATIONAL,
        "host_keys": None,
        "host_counter": 0,
        "command_auth": {"change_right": 0, "table": [list(r) for r in profile.COMMAND_AUTH]},
        "zones": zones,
        "key_slots": {str(s): None for s in profile.KEY_SLOTS if s != 0xFF},
        "envelope_keys": {str(s): None for s in profile.ENVELOPE_SLOTS},
    }


class StsafeEmulator:
    def __init__(self, state, path=None, time_scale=1.0, autosave=None, clock=time.monotonic):
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise EmulatorError("not an STSAFE emulator state (%r)" % (path,))
        # A state saved before local envelope keys existed: empty slots.
        state.setdefault("envelope_keys", {str(s): None for s in profile.ENVELOPE_SLOTS})
        self.state = state
        self.path = path
        self.time_scale = float(time_scale)
        self.autosave = path is not None if autosave is None else autosave
        self.clock = clock
        self._lock = threading.RLock()
        self._busy_until = 0.0
        self._response = None
        self._response_cmd = None
        self._asleep = 0  # 0 awake, 1 wake on I2C start, 2 wake on reset only
        self._stuck = False  # the hang of an all-zero digest, or an injected stuck_busy
        self._ephemeral = None  # slot 0xFF: (private key, curve, mode), volatile
        self._faults = []
        self.commands = []  # (cmd, status, C-MAC'd) of every command executed, for tests
        self.nacks = 0
        self.process_s = 0.0  # time spent computing responses (benches subtract it)
        self.wire = collections.deque(maxlen=64)  # last frames (command, response), for tests

    # --- state ---

    @classmethod
    def create(cls, path=None, rng=os.urandom, **kw):
        emu = cls(blank_state(rng), path, **kw)
        if path is not None:
            emu.save()
        return emu

    @classmethod
    def load(cls, path, **kw):
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise EmulatorError("cannot load %s: %s" % (path, e)) from None
        return cls(state, str(path), **kw)

    def save(self, path=None):
        """Write the whole persistent state as JSON, atomically (rename over the old file)."""
        path = str(path or self.path)
        with self._lock:
            text = json.dumps(self.state, indent=1, sort_keys=True) + "\n"
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _changed(self):
        if self.autosave and self.path:
            self.save()

    @property
    def host_counter(self):
        return self.state["host_counter"]

    def zone(self, index):
        for z in self.state["zones"]:
            if z["index"] == index:
                return z
        return None

    def set_command_auth(self, table, change_right=0):
        """Replace the command authorization table: [(cmd, ac, enc flags), ...]."""
        with self._lock:
            self.state["command_auth"] = {
                "change_right": change_right,
                "table": [list(r) for r in table],
            }
            self._changed()

    def set_life_cycle(self, value):
        with self._lock:
            self.state["life_cycle"] = value
            self._changed()

    def public_key(self, slot):
        """The public key of a slot, 04||X||Y (what a certificate would carry), or None."""
        key = self._key(slot)
        if key is None:
            return None
        return key[0].public_key().public_bytes(*_POINT)

    # --- faults ---

    def inject(self, kind, count=1, cmd=None, **kw):
        if kind not in FAULTS:
            raise EmulatorError("unknown fault %r (one of %s)" % (kind, ", ".join(FAULTS)))
        with self._lock:
            if kind == "stuck_busy":
                self._stuck = True
            elif kind == "counter_step":
                self.state["host_counter"] += count
                self._changed()
            else:
                self._faults.append({"kind": kind, "count": count, "cmd": cmd, **kw})

    def clear(self):
        """Remove every pending fault and un-stick the chip."""
        with self._lock:
            self._faults = []
            self._stuck = False

    def power_cycle(self):
        """Power loss and boot: volatile state gone, busy for the boot time."""
        with self._lock:
            self.clear()
            self._response = None
            self._asleep = 0
            self._ephemeral = None
            self._busy_until = self.clock() + P.BOOT_MS / 1000 * self.time_scale

    def _take(self, kind, cmd=None, any_cmd=False):
        for f in self._faults:
            if f["kind"] == kind and (any_cmd or f["cmd"] is None or f["cmd"] == cmd):
                f["count"] -= 1
                if f["count"] <= 0:
                    self._faults.remove(f)
                return f
        return None

    # --- I2C device interface (serene.i2c_bridge) ---

    def i2c_write(self, data):
        with self._lock:
            now = self.clock()
            if self._stuck or self._take("nack_storm", any_cmd=True) or now < self._busy_until:
                self.nacks += 1
                return False
            if self._asleep:
                if self._asleep == 1:  # this START wakes it; it NACKs while waking up
                    self._asleep = 0
                    self._busy_until = now + P.BOOT_MS / 1000 * self.time_scale
                self.nacks += 1
                return False
            frame = bytes(data)
            cmd = frame[0] & 0x1F if frame else None
            forced = self._take("status", cmd)
            if forced:
                rsp, wait = P.response_frame(forced["code"]), P.WAIT_MS.get(cmd, 0)
                self.commands.append((cmd, forced["code"], bool(frame[0] & P.HDR_CMAC)))
            else:
                rsp, wait = self.process(frame)
            slow = self._take("slow", cmd)
            if slow:
                wait += slow.get("ms", 100)
            self._response = rsp
            self._response_cmd = cmd
            self.wire.append((frame, rsp))
            if self._take("drop_response", cmd):
                self._response = None
            self._busy_until = now + wait / 1000 * self.time_scale
            return True

    def i2c_read(self, n):
        with self._lock:
            now = self.clock()
            if (
                self._stuck
                or self._take("nack_storm", any_cmd=True)
                or now < self._busy_until
                or self._response is None
            ):
                self.nacks += 1
                return None
            rsp = self._response
            if n >= len(rsp) and self._take("corrupt_crc", self._response_cmd):
                rsp = rsp[:-1] + bytes([rsp[-1] ^ 0x01])
            if n >= len(rsp) and rsp[0] & P.STATUS_RMAC:
                if self._take("corrupt_rmac", self._response_cmd):
                    body = bytearray(rsp[:-2])
                    body[-1] ^= 0x01
                    rsp = bytes(body) + P.crc_bytes(body[:1] + body[3:])
            return rsp[:n]

    # --- command processing ---

    def process(self, frame):
        """Execute one command frame: (response frame, processing time in ms)."""
        with self._lock:
            t0 = time.perf_counter()
            cmd = frame[0] & 0x1F if frame else 0
            wait = P.WAIT_MS.get(cmd, 0)
            if len(frame) < 3 or P.crc_bytes(frame[:-2]) != frame[-2:]:
                return P.response_frame(P.ST["COMMUNICATION_ERROR"]), wait
            status, data = self._execute(frame[:-2])
            self.commands.append((cmd, status & 0x1F, bool(frame[0] & P.HDR_CMAC)))
            self.process_s += time.perf_counter() - t0
            if self._stuck:  # hung on an all-zero digest: no response, ever
                return None, wait
            return P.response_frame(status, *data), wait

    def _execute(self, body):
        """(status, (data, rmac))."""
        hdr = body[0]
        cmd = hdr & 0x1F
        try:
            if len(body) > P.MAX_FRAME - 2:
                raise _Fail("BUFFER_LENGTH_EXCEEDED")
            payload = body[1:]
            host = False
            if hdr & P.HDR_CMAC:
                payload, host = self._check_cmac(hdr, body)
            n = self.state["host_counter"]  # already moved on: the R-MAC/IV counter N+1
            auth = self._auth(cmd)
            if auth[0] in (P.AC_NEVER, P.AC_ADMIN, P.AC_ADMIN_OR_PASSWORD) or (
                auth[0] in (P.AC_HOST, P.AC_ADMIN_OR_HOST) and not host
            ):
                raise _Fail("UNAUTHORIZED_COMMAND")
            if auth[1] and not host:
                raise _Fail("UNAUTHORIZED_COMMAND")
            wire_payload = payload
            if auth[1] & P.ENC_CMD:
                try:
                    payload = P.decrypt(self._keys()[1], n, P.SUBJECT_CMD_ENC, payload)
                except ValueError:
                    raise _Fail("COMMAND_DECRYPTION_ERROR") from None
            if self.state["life_cycle"] & 0x7F == 0x04 and cmd != P.QUERY:
                raise _Fail("INVALID_LIFE_CYCLE_STATE")
            handler = _HANDLERS.get(cmd)
            if handler is None:
                raise _Fail("UNSUPPORTED_COMMAND_CODE")
            data = handler(self, payload, host)
        except _Fail as f:
            return f.status, (b"", b"")
        except (ValueError, IndexError):
            return P.ST["INCONSISTENT_COMMAND_DATA"], (b"", b"")
        if not host:
            return P.ST["OK"], (data, b"")
        mac_key, cipher_key = self._keys()
        if auth[1] & P.ENC_RSP:
            data = P.encrypt(cipher_key, n, P.SUBJECT_RSP_DEC, data)
        status = P.ST["OK"] | (P.STATUS_RMAC if hdr & P.HDR_RMAC else 0)
        if not hdr & P.HDR_RMAC:
            return status, (data, b"")
        return status, (data, P.r_mac(mac_key, n, hdr, wire_payload, status, data))

    def _keys(self):
        k = self.state["host_keys"]
        return bytes.fromhex(k["mac"]), bytes.fromhex(k["cipher"])

    def _check_cmac(self, hdr, body):
        if not hdr & P.HDR_HOST:
            raise _Fail("WRONG_SESSION")  # admin (A100) channel: not on this chip
        if self.state["host_keys"] is None:
            raise _Fail("KEY_NOT_FOUND")
        if len(body) < 5:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        n = self.state["host_counter"]
        if n >= 0xFFFFFE:
            raise _Fail("CMAC_COUNTER_LIMIT_REACHED")
        payload, mac = body[1:-4], body[-4:]
        if P.c_mac(self._keys()[0], n, hdr, payload) != mac:
            raise _Fail("INVALID_CMAC")
        self.state["host_counter"] = n + 1
        self._changed()
        return payload, True

    def _auth(self, cmd):
        for c, ac, enc in self.state["command_auth"]["table"]:
            if c == cmd:
                return ac, enc
        return P.AC_FREE, 0

    # --- handlers: (emulator, payload, host C-MAC verified) -> response data ---

    def _echo(self, p, host):
        return p

    def _reset(self, p, host):
        if p:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        self._ephemeral = None
        return b""

    def _random(self, p, host):
        if len(p) != 2:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        if p[0] != 0 or not 1 <= p[1] <= 255:
            raise _Fail("VALUE_OUT_OF_RANGE")
        return os.urandom(p[1])

    def _hibernate(self, p, host):
        if len(p) != 1 or p[0] not in (1, 2):
            raise _Fail("VALUE_OUT_OF_RANGE")
        self._asleep = p[0]
        self._ephemeral = None
        return b""

    def _zone_for(self, index, update, host):
        z = self.zone(index)
        if z is None:
            raise _Fail("ENTRY_NOT_FOUND")
        ac = z["update_ac"] if update else z["read_ac"]
        if not (ac == 0 or (ac == 1 and host)):
            raise _Fail("UNSATISFIED_ACCESS_CONDITION")
        return z

    @staticmethod
    def _change_ac(z, option, update):
        """Option bit4: change the AC to bits 2..0 and the change right to bit3 (§4)."""
        if not option & 0x10:
            return
        right, ac = ("update_right", "update_ac") if update else ("read_right", "read_ac")
        if not z[right]:
            raise _Fail("UNSATISFIED_ACCESS_CONDITION")
        z[ac] = option & 0x07
        z[right] = (option >> 3) & 1

    def _read(self, p, host):
        if len(p) != 6:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        option, index = p[0], p[1]
        offset, length = int.from_bytes(p[2:4], "big"), int.from_bytes(p[4:6], "big")
        z = self._zone_for(index, False, host)
        if offset + length > z["size"]:
            raise _Fail("BOUNDARY_EXCEEDED")
        if length > P.MAX_FRAME - 3 - 2 - 4 - 4:
            raise _Fail("BUFFER_LENGTH_EXCEEDED")
        data = bytes.fromhex(z["data"])[offset : offset + length]
        if option & 0x10:
            self._change_ac(z, option, False)
            self._changed()
        if z["type"] == 1:
            return z["counter"].to_bytes(4, "big") + data
        return data

    def _write_zone(self, z, offset, data):
        if offset + len(data) > z["size"]:
            raise _Fail("BOUNDARY_EXCEEDED")
        buf = bytearray.fromhex(z["data"])
        buf[offset : offset + len(data)] = data
        z["data"] = buf.hex()

    def _update(self, p, host):
        if len(p) < 4:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        option, index, offset, data = p[0], p[1], int.from_bytes(p[2:4], "big"), p[4:]
        z = self._zone_for(index, True, host)
        if z["type"] != 0:
            raise _Fail("INCORRECT_ZONE_TYPE")
        if option & 0x80 and len(data) > profile.ATOMICITY_BUFFER_SIZE:
            raise _Fail("BUFFER_LENGTH_EXCEEDED")
        self._write_zone(z, offset, data)
        self._change_ac(z, option, True)
        self._changed()
        return b""

    def _decrement(self, p, host):
        if len(p) < 8:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        option, index, offset = p[0], p[1], int.from_bytes(p[2:4], "big")
        amount, data = int.from_bytes(p[4:8], "big"), p[8:]
        z = self._zone_for(index, True, host)
        if z["type"] != 1:
            raise _Fail("INCORRECT_ZONE_TYPE")
        if amount == 0:
            raise _Fail("VALUE_OUT_OF_RANGE")
        if z["counter"] < amount:
            raise _Fail("COUNTER_LIMIT_EXCEEDED")
        if data:
            self._write_zone(z, offset, data)
        z["counter"] -= amount
        self._change_ac(z, option, True)
        self._changed()
        return z["counter"].to_bytes(4, "big")

    def _put_attribute(self, p, host):
        if not p:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        if p[0] != 0x17:
            raise _Fail("VALUE_OUT_OF_RANGE")
        if len(p) != 33:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        if self.state["host_keys"] is not None:
            raise _Fail("UNSATISFIED_ACCESS_CONDITION")
        self.state["host_keys"] = {"mac": p[1:17].hex(), "cipher": p[17:33].hex()}
        self.state["host_counter"] = 0
        self._changed()
        return b""

    def _key(self, slot):
        """(private key, curve name, mode, usage limit, uses) of a slot, or None."""
        if slot == 0xFF:
            return self._ephemeral
        k = self.state["key_slots"].get(str(slot))
        if k is None:
            return None
        curve = _EC_CURVES[k["curve"]]()
        priv = ec.derive_private_key(int(k["private"], 16), curve)
        return priv, k["curve"], k["mode"], k["usage_limit"], k["uses"]

    def _use_key(self, slot, need):
        key = self._key(slot)
        if key is None:
            raise _Fail("KEY_NOT_FOUND")
        priv, curve, mode, limit, uses = key
        if mode and not mode & need:
            raise _Fail("WRONG_KEY_USAGE")
        if slot == 0xFF:
            self._ephemeral = None  # single use: gone once used
        else:
            if limit and uses >= limit:
                raise _Fail("KEY_BLOCKED")
            self.state["key_slots"][str(slot)]["uses"] = uses + 1
            self._changed()
        return priv, curve

    def _generate_key(self, p, host):
        if p[:1] == bytes([P.TAG_LOCAL_ENVELOPE]):
            return self._generate_envelope_key(p)
        if len(p) < 8 or p[0] != P.TAG_PRIVATE_KEY_SLOT:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        slot, limit, mode = p[1], int.from_bytes(p[2:4], "big"), int.from_bytes(p[4:6], "big")
        oid, end = P.take_lv(p, 6)
        if end != len(p):
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        curve = P.CURVE_BY_OID.get(oid)
        if curve is None or slot not in profile.KEY_SLOTS:
            raise _Fail("VALUE_OUT_OF_RANGE")
        if mode & ~_MODE_MASK:
            raise _Fail("WRONG_MODE_OF_OPERATION")
        if slot == 0xFF and limit != 1:
            raise _Fail("VALUE_OUT_OF_RANGE")
        if slot == profile.FACTORY_KEY_SLOT and self._key(slot) is not None:
            raise _Fail("UNSATISFIED_ACCESS_CONDITION")
        priv = ec.generate_private_key(_EC_CURVES[curve]())
        if slot == 0xFF:
            self._ephemeral = (priv, curve, mode, 1, 0)
        else:
            size = P.CURVES[curve][1]
            self.state["key_slots"][str(slot)] = {
                "curve": curve,
                "private": priv.private_numbers().private_value.to_bytes(size, "big").hex(),
                "mode": mode,
                "usage_limit": limit,
                "uses": 0,
            }
            self._changed()
        return _point_lv(priv.public_key(), P.CURVES[curve][1])

    def _generate_envelope_key(self, p):
        """Local-envelope variant (§4): 07 <slot> <key type 0 AES-128, 1 AES-256> [seed]."""
        if len(p) < 3:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        slot, keytype = p[1], p[2]
        size = profile.ENVELOPE_KEY_SIZES.get(keytype)
        if slot not in profile.ENVELOPE_SLOTS or size is None:
            raise _Fail("VALUE_OUT_OF_RANGE")
        if self.state["envelope_keys"].get(str(slot)) is not None:
            raise _Fail("UNSATISFIED_ACCESS_CONDITION")  # written once (profile.ASSUMPTIONS)
        self.state["envelope_keys"][str(slot)] = {"type": keytype, "key": os.urandom(size).hex()}
        self._changed()
        return b""

    def _envelope_key(self, p):
        if not p:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        k = self.state["envelope_keys"].get(str(p[0]))
        if k is None:
            raise _Fail("KEY_NOT_FOUND")
        return bytes.fromhex(k["key"])

    def _wrap(self, p, host):
        key = self._envelope_key(p)
        data = p[1:]
        if len(data) % 8 or not _WRAP_MIN <= len(data) <= _WRAP_MAX:
            raise _Fail("VALUE_OUT_OF_RANGE")
        return aes_key_wrap(key, data)

    def _unwrap(self, p, host):
        key = self._envelope_key(p)
        env = p[1:]
        if len(env) % 8 or not _WRAP_MIN + 8 <= len(env) <= _WRAP_MAX + 8:
            raise _Fail("VALUE_OUT_OF_RANGE")
        try:
            return aes_key_unwrap(key, env)
        except InvalidUnwrap:
            raise _Fail("INCONSISTENT_COMMAND_DATA") from None

    def _generate_signature(self, p, host):
        if len(p) < 3:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        slot = p[0]
        digest, end = P.take_lv(p, 1)
        if end != len(p):
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        if len(digest) not in _HASH_BY_LEN:
            raise _Fail("VALUE_OUT_OF_RANGE")
        if not any(digest):
            self._stuck = True  # the real chip hangs (spec §4, [MW] workaround)
            return b""
        priv, curve = self._use_key(slot, _MODE_SIGN)
        der = priv.sign(digest, ec.ECDSA(Prehashed(_HASH_BY_LEN[len(digest)])))
        r, s = decode_dss_signature(der)
        size = P.CURVES[curve][1]
        return P.lv(r.to_bytes(size, "big")) + P.lv(s.to_bytes(size, "big"))

    def _verify_signature(self, p, host):
        if len(p) < 2:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        if p[0] != 0x00:
            raise _Fail("VALUE_OUT_OF_RANGE")  # entity authentication: A100 only
        oid, off = P.take_lv(p, 1)
        curve = P.CURVE_BY_OID.get(oid)
        if curve is None:
            raise _Fail("VALUE_OUT_OF_RANGE")
        pub, off = _take_point(p, off, curve)
        r, off = P.take_lv(p, off)
        s, off = P.take_lv(p, off)
        digest, off = P.take_lv(p, off)
        if off != len(p) or len(digest) not in _HASH_BY_LEN:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        sig = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
        try:
            pub.verify(sig, digest, ec.ECDSA(Prehashed(_HASH_BY_LEN[len(digest)])))
        except InvalidSignature:
            return b"\x00"
        return b"\x01"

    def _establish_key(self, p, host):
        if len(p) < 2:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        slot = p[0]
        key = self._key(slot)
        if key is None:
            raise _Fail("KEY_NOT_FOUND")
        peer, off = _take_point(p, 1, key[1])
        if off != len(p):
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        priv, curve = self._use_key(slot, _MODE_ESTABLISH)
        return P.lv(priv.exchange(ec.ECDH(), peer))

    def _query(self, p, host):
        if len(p) != 1:
            raise _Fail("INCONSISTENT_COMMAND_DATA")
        tag = p[0]
        st = self.state
        if tag == P.TAG_PRODUCT_DATA:
            return bytes.fromhex(st["product_data"])
        if tag == P.TAG_HOST_KEY_SLOT:
            present = st["host_keys"] is not None
            return bytes([int(present)]) + st["host_counter"].to_bytes(3, "big")
        if tag == P.TAG_LIFE_CYCLE:
            return bytes([st["life_cycle"]])
        if tag == P.TAG_I2C:
            return bytes([st["i2c_address"] << 1, 0])
        if tag == P.TAG_DATA_PARTITION:
            out = bytes([len(st["zones"])])
            for z in st["zones"]:
                ac = (z["read_right"] << 7) | (z["read_ac"] << 4)
                ac |= (z["update_right"] << 3) | z["update_ac"]
                out += bytes([z["index"], z["type"], ac]) + z["size"].to_bytes(2, "big")
                if z["type"] == 1:
                    out += z["counter"].to_bytes(4, "big")
            return out
        if tag == P.TAG_COMMAND_AUTH:
            ca = st["command_auth"]
            out = bytes([ca["change_right"], len(ca["table"])])
            return out + b"".join(bytes(r) for r in ca["table"])
        if tag == P.TAG_LOCAL_ENVELOPE:
            out = bytes([len(profile.ENVELOPE_SLOTS)])
            for slot in profile.ENVELOPE_SLOTS:
                k = st["envelope_keys"].get(str(slot))
                out += bytes([slot, 0] if k is None else [slot, 1, len(k["key"]) // 2])
            return out
        if tag == P.TAG_PRIVATE_KEY_TABLE:
            out = bytes([len(profile.KEY_SLOTS), 0]) + b"\xff\xff"
            for slot in profile.KEY_SLOTS:
                key = self._key(slot)
                if key is None:
                    out += bytes([slot, 0, 0, 0])
                else:
                    out += bytes([slot, 1]) + key[2].to_bytes(2, "big")
                    out += P.lv(P.CURVES[key[1]][0])
            return out
        raise _Fail("VALUE_OUT_OF_RANGE")


_POINT = (Encoding.X962, PublicFormat.UncompressedPoint)
_WRAP_MIN, _WRAP_MAX = 16, 480  # Wrap input bytes (profile.ASSUMPTIONS "envelope_sizes")


def _point_lv(pub, size):
    raw = pub.public_bytes(*_POINT)
    return b"\x04" + P.lv(raw[1 : 1 + size]) + P.lv(raw[1 + size :])


def _take_point(p, off, curve):
    """(public key, next offset) from 04 LV(X) LV(Y) at p[off]; INVALID_PUBLIC_KEY if off
    the curve."""
    if off >= len(p) or p[off] != 0x04:
        raise _Fail("INCONSISTENT_COMMAND_DATA")
    x, off = P.take_lv(p, off + 1)
    y, off = P.take_lv(p, off)
    size = P.CURVES[curve][1]
    if len(x) != size or len(y) != size:
        raise _Fail("INVALID_PUBLIC_KEY")
    try:
        pub = ec.EllipticCurvePublicKey.from_encoded_point(_EC_CURVES[curve](), b"\x04" + x + y)
    except ValueError:
        raise _Fail("INVALID_PUBLIC_KEY") from None
    return pub, off


_HANDLERS = {
    P.ECHO: StsafeEmulator._echo,
    P.RESET: StsafeEmulator._reset,
    P.GENERATE_RANDOM: StsafeEmulator._random,
    P.DECREMENT: StsafeEmulator._decrement,
    P.READ: StsafeEmulator._read,
    P.UPDATE: StsafeEmulator._update,
    P.HIBERNATE: StsafeEmulator._hibernate,
    P.PUT_ATTRIBUTE: StsafeEmulator._put_attribute,
    P.GENERATE_KEY: StsafeEmulator._generate_key,
    P.QUERY: StsafeEmulator._query,
    P.GENERATE_SIGNATURE: StsafeEmulator._generate_signature,
    P.VERIFY_SIGNATURE: StsafeEmulator._verify_signature,
    P.ESTABLISH_KEY: StsafeEmulator._establish_key,
    P.WRAP: StsafeEmulator._wrap,
    P.UNWRAP: StsafeEmulator._unwrap,
}


class FaultPort:
    """A second I2C device for tests and benches: a MicroPython script writes a JSON object
    {"fault": kind, "count": n, ...} to inject a fault into `emu`, or {"get": "counter"} and
    then reads the answer (JSON, padded with spaces to the read length)."""

    ADDR = 0x7E

    def __init__(self, emu):
        self.emu = emu
        self._reply = b"{}"

    def i2c_write(self, data):
        try:
            req = json.loads(bytes(data))
            if "fault" in req:
                kind = req.pop("fault")
                self.emu.inject(kind, **req)
                self._reply = b'{"ok": true}'
            elif req.get("get") == "counter":
                self._reply = json.dumps({"counter": self.emu.host_counter}).encode()
            elif req.get("do") == "clear":
                self.emu.clear()
                self._reply = b'{"ok": true}'
            elif req.get("do") == "power_cycle":
                self.emu.power_cycle()
                self._reply = b'{"ok": true}'
            else:
                return False
        except (ValueError, TypeError, EmulatorError):
            return False
        return True

    def i2c_read(self, n):
        return self._reply.ljust(n)[:n]
