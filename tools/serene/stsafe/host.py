"""A small synchronous STSAFE-A110 host in CPython: the provisioning station's side of the bus.

It talks to any object with the I2C device interface of serene.i2c_bridge (i2c_write /
i2c_read), normally a StsafeEmulator in the same process. Like [MW], it re-queries the host
C-MAC counter before every MAC'd command. The firmware uses drivers/stsafe instead.
"""

import time

from . import protocol as P


class StsafeHostError(Exception):
    """The chip answered an error status, or the exchange failed. .status = chip status."""

    def __init__(self, message, cmd=None, status=None):
        super().__init__(message)
        self.cmd = cmd
        self.status = status


class StsafeHost:
    POLL_S = 0.003  # [MW] STSAFEA_I2C_POLLING_STEP
    BUSY_TIMEOUT_S = 0.83  # [MW] STSAFEA_I2C_POLLING_MAX, after the fixed wait

    def __init__(self, device, mac_key=None, cipher_key=None):
        self.device = device
        self.mac_key = mac_key
        self.cipher_key = cipher_key
        self._auth = None

    def _poll(self, fn, what, cmd, deadline):
        while True:
            r = fn()
            if r not in (None, False):
                return r
            if time.monotonic() > deadline:
                raise StsafeHostError("STSAFE NACKs the %s (cmd 0x%02X)" % (what, cmd), cmd)
            time.sleep(self.POLL_S)

    def exchange(self, frame, cmd):
        """Write one command frame, wait, read the whole response: (status, data, rmac)."""
        wait = P.WAIT_MS.get(cmd, 0) / 1000
        deadline = time.monotonic() + wait + self.BUSY_TIMEOUT_S
        self._poll(lambda: self.device.i2c_write(frame), "command", cmd, deadline)
        head = self._poll(lambda: self.device.i2c_read(3), "response", cmd, deadline)
        total = 3 + int.from_bytes(head[1:3], "big")
        rsp = self._poll(lambda: self.device.i2c_read(total), "response", cmd, deadline)
        try:
            return P.parse_response(bytes(rsp))
        except ValueError as e:
            raise StsafeHostError("cmd 0x%02X: %s" % (cmd, e), cmd) from None

    def command(self, cmd, payload=b"", mac=None):
        """Run one command; mac=None: C-MAC when the chip's authorization table asks for it.
        Returns the response data (decrypted). Raises StsafeHostError on a non-zero status."""
        ac, enc = self.authorization().get(cmd, (P.AC_FREE, 0))
        if mac is None:
            mac = enc != 0 or ac in (P.AC_HOST, P.AC_ADMIN_OR_HOST)
        if not mac:
            status, data, _ = self.exchange(P.command_frame(cmd, payload), cmd)
            self._check(cmd, status)
            return data
        if self.mac_key is None:
            raise StsafeHostError("cmd 0x%02X needs the host keys" % cmd, cmd)
        present, n = self.host_key_slot()
        if not present:
            raise StsafeHostError("the chip has no host keys", cmd)
        hdr = cmd | P.HDR_CMAC | P.HDR_RMAC | P.HDR_HOST
        if enc & P.ENC_CMD:
            payload = P.encrypt(self.cipher_key, n + 1, P.SUBJECT_CMD_ENC, payload)
        cmac = P.c_mac(self.mac_key, n, hdr, payload)
        status, data, rmac = self.exchange(P.command_frame(hdr, payload, cmac), cmd)
        self._check(cmd, status)
        if not status & P.STATUS_RMAC or rmac != P.r_mac(
            self.mac_key, n + 1, hdr, payload, status, data
        ):
            raise StsafeHostError("cmd 0x%02X: bad R-MAC" % cmd, cmd)
        if enc & P.ENC_RSP:
            data = P.decrypt(self.cipher_key, n + 1, P.SUBJECT_RSP_DEC, data)
        return data

    @staticmethod
    def _check(cmd, status):
        code = status & 0x1F
        if code:
            raise StsafeHostError(
                "cmd 0x%02X: status 0x%02X %s" % (cmd, code, P.STATUS_NAMES[code]), cmd, code
            )

    # --- commands used by provisioning and the tests ---

    def query(self, tag):
        return self.command(P.QUERY, bytes([tag]), mac=False)

    def authorization(self):
        if self._auth is None:
            self._auth = {}  # Query itself is free: avoid recursing
            d = self.query(P.TAG_COMMAND_AUTH)
            self._auth = {d[i]: (d[i + 1], d[i + 2]) for i in range(2, len(d), 3)}
        return self._auth

    def host_key_slot(self):
        d = self.query(P.TAG_HOST_KEY_SLOT)
        return d[0] != 0, int.from_bytes(d[1:4], "big")

    def private_key_present(self, slot):
        d = self.query(P.TAG_PRIVATE_KEY_TABLE)
        off = 4
        for _ in range(d[0]):
            s, present = d[off], d[off + 1]
            off += 4
            if present:
                off += 2 + int.from_bytes(d[off : off + 2], "big")
            if s == slot:
                return bool(present)
        return False

    def data_partition(self):
        d = self.query(P.TAG_DATA_PARTITION)
        zones, off = {}, 1
        for _ in range(d[0]):
            idx, typ, ac, size = (
                d[off],
                d[off + 1],
                d[off + 2],
                int.from_bytes(d[off + 3 : off + 5], "big"),
            )
            off += 5
            counter = None
            if typ == 1:
                counter = int.from_bytes(d[off : off + 4], "big")
                off += 4
            zones[idx] = {"type": typ, "read_ac": (ac >> 4) & 7, "read_right": ac >> 7,
                          "update_ac": ac & 7, "update_right": (ac >> 3) & 1, "size": size,
                          "counter": counter}  # fmt: skip
        return zones

    def put_host_keys(self, mac_key, cipher_key):
        self.command(P.PUT_ATTRIBUTE, b"\x17" + mac_key + cipher_key, mac=False)
        self.mac_key, self.cipher_key = mac_key, cipher_key

    def generate_key(self, slot, mode, usage_limit=0, curve="P-256"):
        oid, size = P.CURVES[curve]
        payload = bytes([P.TAG_PRIVATE_KEY_SLOT, slot]) + usage_limit.to_bytes(2, "big")
        d = self.command(P.GENERATE_KEY, payload + mode.to_bytes(2, "big") + P.lv(oid))
        x, off = P.take_lv(d, 1)
        y, _ = P.take_lv(d, off)
        if d[0] != 0x04 or len(x) != size or len(y) != size:
            raise StsafeHostError("Generate Key: unexpected response", P.GENERATE_KEY)
        return b"\x04" + x + y

    def read(self, zone, offset, length, chunk=253):
        out = b""
        while len(out) < length:
            k = min(chunk, length - len(out))
            payload = (
                bytes([0, zone]) + (offset + len(out)).to_bytes(2, "big") + k.to_bytes(2, "big")
            )
            out += self.command(P.READ, payload)[-k:] if k else b""
        return out

    def update(self, zone, offset, data, chunk=253, lock_ac=None):
        """Write data; with lock_ac, the last chunk also sets the zone's update AC to lock_ac
        and clears its change right (option bit4, §4)."""
        i = 0
        while i < len(data):
            k = min(chunk, len(data) - i)
            option = 0
            if lock_ac is not None and i + k == len(data):
                option = 0x10 | (lock_ac & 7)
            payload = bytes([option, zone]) + (offset + i).to_bytes(2, "big") + data[i : i + k]
            self.command(P.UPDATE, payload)
            i += k

    # --- local envelopes (Wrap / Unwrap Local Envelope, §4) ---

    def local_envelope_keys(self):
        """{slot: key length in bytes, or None if the slot is empty} (Query 0x07)."""
        d = self.query(P.TAG_LOCAL_ENVELOPE)
        out, off = {}, 1
        for _ in range(d[0]):
            slot, present = d[off], d[off + 1]
            off += 2
            out[slot] = None
            if present:
                out[slot] = d[off]
                off += 1
        return out

    def generate_local_envelope_key(self, slot, keytype=0):
        """Generate Key, local-envelope variant: 07 <slot> <0 AES-128 | 1 AES-256>."""
        self.command(P.GENERATE_KEY, bytes([P.TAG_LOCAL_ENVELOPE, slot, keytype]))

    def wrap(self, slot, data):
        return self.command(P.WRAP, bytes([slot]) + data)

    def unwrap(self, slot, envelope):
        return self.command(P.UNWRAP, bytes([slot]) + envelope)
