# STSAFE-A110 secure element driver for MicroPython (asyncio).
# MIT licence, (c) serene-module authors.
# Spec: /work/shared/specs/stsafe-a110.md (compiled from ST's STSAFE-A1xx middleware V3.3.6 and
# STSELib v1.1.9); derived test vectors in stsafe-a110-vectors.txt.
#
# Layers (spec §7): STSAFE (this file: API, lock, chunking) -> commands (one function per
# command, code/wait table) -> session (C-MAC/R-MAC, encryption, counter N, one exchange)
# -> frame (CRC, header bits, LEN) -> transport (I2C with NACK polling) -> the injected i2c.
#
#     se = STSAFE(i2c, host_mac_key=k1, host_cipher_key=k2)
#     await se.init()
#     sig = await se.generate_signature(0, digest)
#
# Every I/O method is a coroutine; the chip's processing time is spent in asyncio.sleep_ms,
# and each command/response pair holds one asyncio.Lock. Errors: SEError and subclasses
# (errors.py), each carrying .cmd and .code.
import asyncio
from micropython import const

from . import commands as _c
from .errors import *  # noqa: F401,F403 (re-exported: the driver's exception classes)
from .errors import CryptoError, LengthError, ParameterError, SEError, WrongDevice
from .session import HostKeys, Session
from .transport import Transport

ADDR = const(0x20)  # spec §1, [MW] STSAFEA_DEVICE_ADDRESS
# After the fixed wait, how long the chip may keep NACKing before the command fails: [MW]
# polls 3 ms steps up to STSAFEA_I2C_POLLING_MAX = 2500, about 0.83 s (spec §1).
BUSY_TIMEOUT_MS = const(830)
_POLL_MS = const(3)  # [MW] STSAFEA_I2C_POLLING_STEP
_RANDOM_CHUNK = const(255)  # Generate Random takes n in 1..255 (spec §4)
# [SL] stse_get_device_certificate reads 253-byte chunks ("Above, it throw a
# STSE_CORE_FRAME_CRC_ERROR", spec §1); used for Update too.
_RW_CHUNK = const(253)
_ATOMIC_CHUNK = const(64)  # [MW] STSAFEA_ATOMICITY_BUFFER_SIZE
_SLOT_EPHEMERAL = const(0xFF)
_MODE_ESTABLISH = const(0x0001)  # Generate Key mode bits (spec §4)
_MODE_SIGN_DIGEST = const(0x0004)
_TAG_HOST_KEYS = const(0x17)
# Mask id ranges, [SL] stse_device_management.c: >= 0x6000 A120, >= 0x4600 A110.
_MASK_A110 = const(0x4600)
_MASK_A120 = const(0x6000)
_LC_TERMINATED = const(0x04)


class STSAFE:
    """An STSAFE-A110 on an I2C bus (an injected object with the machine.I2C API)."""

    def __init__(
        self,
        i2c,
        addr=ADDR,
        host_mac_key=None,
        host_cipher_key=None,
        busy_timeout_ms=BUSY_TIMEOUT_MS,
        poll_ms=_POLL_MS,
        mac_all=True,
    ):
        """mac_all: when host keys are known, C-MAC/R-MAC every command but Query, Reset,
        Hibernate and Put Attribute, not only those the chip requires, so that a device on
        the bus cannot forge an answer (a Verify Signature "valid", a counter value)."""
        keys = None
        if host_mac_key is not None or host_cipher_key is not None:
            if host_mac_key is None or host_cipher_key is None:
                raise ParameterError(None, detail="give both host keys or neither")
            keys = HostKeys(host_mac_key, host_cipher_key)
        self._s = Session(Transport(i2c, addr, poll_ms), keys, busy_timeout_ms, mac_all)
        self._s.sync = _c.query_host_key_slot
        self._lock = asyncio.Lock()
        self.product = None

    @property
    def counter(self):
        """The host C-MAC counter N as the driver tracks it (None = to be re-queried)."""
        return self._s.n

    @property
    def resyncs(self):
        """How many times a lost counter step was resynchronised."""
        return self._s.resyncs

    async def init(self):
        """Check the chip is an operational A110; read the command authorization table,
        the data partition (zone access conditions) and the host key slot counter.
        Returns the product data dict. Raises WrongDevice for another chip."""
        pd = await self.query_product_data()
        mid = pd["mask_id"]
        mask = (mid[1] << 8) | mid[2]
        if not _MASK_A110 <= mask < _MASK_A120:
            raise WrongDevice(_c.QUERY, detail=mid)
        if (await self.query_life_cycle()) & 0x7F == _LC_TERMINATED:
            raise WrongDevice(_c.QUERY, detail="life cycle: terminated")
        await self.query_command_authorization()
        await self.query_data_partition()
        if self._s.keys is not None:
            await self.query_host_key_slot()
        self.product = pd
        return pd

    # --- General purpose ---

    async def echo(self, data):
        async with self._lock:
            return bytes(await _c.echo(self._s, data))

    async def reset(self):
        async with self._lock:
            await _c.reset(self._s)

    async def hibernate(self, mode=1):
        async with self._lock:
            await _c.hibernate(self._s, mode)

    async def random(self, n):
        """n random bytes from the chip, in commands of at most 255."""
        out = bytearray(n)
        i = 0
        while i < n:
            k = min(_RANDOM_CHUNK, n - i)
            async with self._lock:
                out[i : i + k] = await _c.generate_random(self._s, k)
            i += k
        return bytes(out)

    # --- Query ---

    async def _q(self, fn):
        async with self._lock:
            return await fn(self._s)

    async def query_product_data(self):
        return await self._q(_c.query_product_data)

    async def query_host_key_slot(self):
        """(present, counter N); also resynchronises the driver's N."""
        return await self._q(_c.query_host_key_slot)

    async def query_life_cycle(self):
        return await self._q(_c.query_life_cycle)

    async def query_i2c_parameters(self):
        return await self._q(_c.query_i2c_parameters)

    async def query_data_partition(self):
        """List of commands.Zone(index, type, read_ac, read_right, update_ac, update_right,
        size, counter)."""
        return await self._q(_c.query_data_partition)

    async def query_command_authorization(self):
        """(change right, {cmd: (access condition, encryption flags)})."""
        return await self._q(_c.query_command_authorization)

    async def query_private_key_table(self):
        """List of commands.KeySlot(slot, present, mode, curve)."""
        return await self._q(_c.query_private_key_table)

    # --- Data partition ---

    async def read(self, zone, offset, length):
        """length bytes of zone from offset, in commands of at most 253 bytes. For a
        counter zone (known from init()) the data only, without the counter."""
        out = bytearray(length)
        counter = _c.is_counter_zone(self._s, zone)
        chunk = _RW_CHUNK - (4 if counter else 0)
        i = 0
        while i < length:
            k = min(chunk, length - i)
            async with self._lock:
                d = await _c.read(self._s, zone, offset + i, k, counter)
                out[i : i + k] = d[4:] if counter else d
            i += k
        return bytes(out)

    async def update(self, zone, offset, data, atomic=False):
        """Write data to zone at offset; atomic=True: 64-byte atomic commands ([MW]), each
        chunk atomic on its own."""
        chunk = _ATOMIC_CHUNK if atomic else _RW_CHUNK
        mv = memoryview(data)
        i = 0
        while i < len(data):
            k = min(chunk, len(data) - i)
            async with self._lock:
                await _c.update(self._s, zone, offset + i, mv[i : i + k], atomic)
            i += k

    async def decrement(self, zone, amount=1, data=b"", offset=0):
        """Decrement the one-way counter of zone by amount (optionally writing data at
        offset in the same command); returns the new counter value."""
        async with self._lock:
            return await _c.decrement(self._s, zone, amount, data, offset)

    async def read_counter(self, zone):
        """The one-way counter of a counter zone (Read of length 0, see commands.py)."""
        async with self._lock:
            d = await _c.read(self._s, zone, 0, 0, True)
            return (d[0] << 24) | (d[1] << 16) | (d[2] << 8) | d[3]

    async def read_certificate(self, zone=0):
        """The DER certificate stored at the start of zone; its size comes from the DER
        header in the first 4 bytes (30 82 HH LL, 30 81 LL or 30 LL; spec §5)."""
        h = await self.read(zone, 0, 4)
        if h[0] != 0x30:
            raise LengthError(_c.READ, detail="no DER SEQUENCE in zone")
        if h[1] == 0x82:
            size = ((h[2] << 8) | h[3]) + 4
        elif h[1] == 0x81:
            size = h[2] + 3
        elif h[1] < 0x80:
            size = h[1] + 2
        else:
            raise LengthError(_c.READ, detail="DER length form")
        z = self._s.zones.get(zone)
        if z is not None and size > z[3]:
            raise LengthError(_c.READ, detail=size)
        return await self.read(zone, 0, size)

    # --- Keys ---

    async def generate_key(self, slot, curve="P-256", usage_limit=None, mode=None):
        """Generate a key pair in slot; returns the public key 04||X||Y (65 bytes for P-256).
        Defaults: slot 0xFF (ephemeral) usage limit 1, mode key establishment; other slots no
        usage limit (0), mode sign host digest."""
        eph = slot == _SLOT_EPHEMERAL
        if eph:
            usage_limit = 1  # [MW] forces 1 for the ephemeral slot
        elif usage_limit is None:
            usage_limit = 0
        if mode is None:
            mode = _MODE_ESTABLISH if eph else _MODE_SIGN_DIGEST
        async with self._lock:
            return await _c.generate_key(self._s, slot, curve, usage_limit, mode)

    async def generate_signature(self, slot, digest):
        """ECDSA signature r||s (64 bytes for P-256) of a 32/48-byte digest with the key in
        slot. Refuses an all-zero digest (the chip hangs on it) with ParameterError."""
        async with self._lock:
            return await _c.generate_signature(self._s, slot, digest)

    async def verify_signature(self, pubkey, sig, digest, curve=None):
        """True if the chip finds sig (r||s) valid for pubkey (04||X||Y) over digest."""
        async with self._lock:
            return await _c.verify_signature(self._s, pubkey, sig, digest, curve)

    async def establish_key(self, slot, peer_pubkey):
        """ECDH between the key in slot and peer_pubkey (04||X||Y): shared secret Z (32
        bytes for P-256), decrypted when the chip encrypts the response."""
        async with self._lock:
            return await _c.establish_key(self._s, slot, peer_pubkey)

    async def put_host_keys(self, mac_key, cipher_key):
        """Pair the chip with this MCU: Put Attribute host keys (once per chip). The driver
        uses these keys from then on."""
        if len(mac_key) != 16 or len(cipher_key) != 16:
            raise ParameterError(_c.PUT_ATTRIBUTE, detail="host keys are 16 bytes each")
        keys = HostKeys(mac_key, cipher_key)
        async with self._lock:
            await _c.put_attribute(self._s, _TAG_HOST_KEYS, bytes(mac_key) + bytes(cipher_key))
            self._s.keys = keys
            self._s.n = None
