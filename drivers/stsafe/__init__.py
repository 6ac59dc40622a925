# STSAFE-A110 secure element driver for MicroPython (asyncio).
# MIT licence, (c) serene-module authors.
# Spec: /work/shared/specs/stsafe-a110.md (compiled from ST's STSAFE-A1xx middleware V3.3.6 and
# STSELib v1.1.9); derived test vectors in stsafe-a110-vectors.txt.
#
# Layers (spec §7): STSAFE (this file: API, chunking) -> commands (one function per
# command, code/wait table) -> session (lock, C-MAC/R-MAC, encryption, counter N, exchange)
# -> frame (CRC, header bits, LEN) -> transport (I2C with NACK polling) -> the injected i2c.
#
#     se = STSAFE(i2c, host_mac_key=k1, host_cipher_key=k2)
#     await se.init()
#     sig = await se.generate_signature(0, digest)
#
# Every I/O method is a coroutine; the chip's processing time is spent in asyncio.sleep_ms,
# and each command/response pair holds one asyncio.Lock. Errors: SEError and subclasses
# (errors.py), each carrying .cmd and .code.
from micropython import const

from . import commands as _c
from . import errors
from .errors import (  # noqa: F401 (re-exported)
    BusError,
    CRCError,
    CryptoError,
    LengthError,
    NackTimeout,
    ParameterError,
    RMACError,
    SEError,
    SEHostError,
    SEStatusError,
    WrongDevice,
)
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


def __getattr__(name):
    # The chip-status classes (KeyNotFound, InvalidCMAC, ...), made on first use (errors.py).
    return errors.__getattr__(name)


class STSAFE(Session):
    """An STSAFE-A110 on an I2C bus (an injected object with the machine.I2C API).

    Every I/O method is a coroutine. Results are new objects (the frame buffer never escapes
    the lock). A command/response pair holds the session's asyncio.Lock; chunked operations
    (random, read, update, read_certificate) take it per chunk.
    """

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
        super().__init__(Transport(i2c, addr, poll_ms), keys, busy_timeout_ms, mac_all)
        self.sync = _c.sync_counter
        self.product = None

    @property
    def counter(self):
        """The host C-MAC counter N as the driver tracks it (None = to be re-queried)."""
        return self.n

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
        if self.keys is not None:
            await self.query_host_key_slot()
        self.product = pd
        return pd

    # One command each (commands.py): the function's first argument is this object.
    echo = _c.echo
    reset = _c.reset
    hibernate = _c.hibernate
    query_product_data = _c.query_product_data
    query_host_key_slot = _c.query_host_key_slot
    query_life_cycle = _c.query_life_cycle
    query_i2c_parameters = _c.query_i2c_parameters
    query_data_partition = _c.query_data_partition
    query_command_authorization = _c.query_command_authorization
    query_private_key_table = _c.query_private_key_table
    decrement = _c.decrement
    generate_signature = _c.generate_signature
    verify_signature = _c.verify_signature
    establish_key = _c.establish_key
    query_local_envelope_keys = _c.query_local_envelope_keys
    generate_envelope_key = _c.generate_envelope_key
    wrap = _c.wrap
    unwrap = _c.unwrap

    async def random(self, n):
        """n random bytes from the chip, in commands of at most 255."""
        out = bytearray(n)
        for i in range(0, n, _RANDOM_CHUNK):
            await _c.generate_random_into(self, out, i, min(_RANDOM_CHUNK, n - i))
        return bytes(out)

    async def read(self, zone, offset, length):
        """length bytes of zone from offset, in commands of at most 253 bytes of response.
        For a counter zone (known from init()) the data only, without the counter."""
        out = bytearray(length)
        chunk = _RW_CHUNK - (4 if _c.is_counter_zone(self, zone) else 0)
        for i in range(0, length, chunk):
            await _c.read_into(self, zone, offset + i, out, i, min(chunk, length - i))
        return bytes(out)

    async def update(self, zone, offset, data, atomic=False):
        """Write data to zone at offset; atomic=True: 64-byte atomic commands ([MW]), each
        chunk atomic on its own."""
        chunk = _ATOMIC_CHUNK if atomic else _RW_CHUNK
        mv = memoryview(data)
        for i in range(0, len(data), chunk):
            await _c.update_one(self, zone, offset + i, mv[i : i + chunk], atomic)

    async def read_counter(self, zone):
        """The one-way counter of a counter zone (a Read of length 0; init() first, so that
        the driver knows the zone is a counter)."""
        if not _c.is_counter_zone(self, zone):
            raise ParameterError(_c.READ, detail="not a known counter zone")
        return await _c.read_into(self, zone, 0, None, 0, 0)

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
        z = self.zones.get(zone)
        if z is not None and size > z[3]:
            raise LengthError(_c.READ, detail=size)
        return await self.read(zone, 0, size)

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
        return await _c.generate_key_raw(self, slot, curve, usage_limit, mode)

    async def put_host_keys(self, mac_key, cipher_key):
        """Pair the chip with this MCU: Put Attribute host keys (once per chip). The driver
        uses these keys from then on."""
        if len(mac_key) != 16 or len(cipher_key) != 16:
            raise ParameterError(_c.PUT_ATTRIBUTE, detail="host keys are 16 bytes each")
        keys = HostKeys(mac_key, cipher_key)
        await _c.put_attribute(self, _TAG_HOST_KEYS, bytes(mac_key) + bytes(cipher_key))
        self.keys = keys
        self.n = None
