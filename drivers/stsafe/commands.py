# STSAFE-A110 driver: service layer. One table of command codes and waits, one function per
# command: check arguments, build the payload in the frame buffer, parse the response.
# MIT licence, (c) serene-module authors. Spec: specs/stsafe-a110.md §4, §5.
#
# Each command is three small functions: a builder (writes the payload into the frame
# buffer), a parser (reads the response data, under the session lock, into new objects or a
# caller's buffer) and the coroutine the API exposes, which hands both to Session.run. They
# become STSAFE methods (the first argument is the STSAFE, a Session).
#
# Assumptions the spec marks as uncertain (§8), kept here in one place (the emulator in
# tools/serene/stsafe/profile.py makes the same ones):
# - Read of a one-way-counter zone returns the 4-byte counter, then the data ([SL]); a Read of
#   length 0 returns the counter alone (read_counter).
# - Private key table (Query 0x14) layout is [SL]'s: <count><change right><global usage
#   limit:2> then per slot <slot><presence><mode:2>[<curve OID LV> if present].
# - Generate Key usage limit 0 = no limit; slot 0xFF always gets usage limit 1 ([MW]).
# - Local envelope key table (Query 0x07): <nslots> then per slot <slot><presence>[<key
#   length in bytes>]. Wrap takes 16..480 bytes, a multiple of 8 (RFC 3394 needs >= 16; 480
#   keeps an encrypted Wrap command, 1 + 480 bytes padded to 496, inside the 507-byte frame).
import struct
from collections import namedtuple
from micropython import const

from . import frame
from .errors import LengthError, ParameterError

# --- Command codes (spec §4) and waits before the first read (spec §1, [MW] stsafea110.h
# STSAFEA_MS_WAIT_TIME_CMD_*, "minimum delay before response"). ---
ECHO = const(0x00)
RESET = const(0x01)
GENERATE_RANDOM = const(0x02)
START_SESSION = const(0x03)
DECREMENT = const(0x04)
READ = const(0x05)
UPDATE = const(0x06)
DELETE = const(0x0C)
HIBERNATE = const(0x0D)
WRAP = const(0x0E)
UNWRAP = const(0x0F)
PUT_ATTRIBUTE = const(0x10)
GENERATE_KEY = const(0x11)
QUERY = const(0x14)
GENERATE_SIGNATURE = const(0x16)
VERIFY_SIGNATURE = const(0x17)
ESTABLISH_KEY = const(0x18)
VERIFY_PASSWORD = const(0x1A)

# Index = command code. 0 for codes the A110 does not implement (they get 0x04 back at once).
WAIT_MS = (
    0,  # 0x00 Echo
    30,  # 0x01 Reset
    15,  # 0x02 Generate Random
    25,  # 0x03 Start Session
    15,  # 0x04 Decrement
    0,  # 0x05 Read
    15,  # 0x06 Update
    0, 0, 0, 0, 0,  # 0x07-0x0B: not A110
    15,  # 0x0C Delete
    50,  # 0x0D Hibernate
    125,  # 0x0E Wrap Local Envelope
    150,  # 0x0F Unwrap Local Envelope
    15,  # 0x10 Put Attribute
    160,  # 0x11 Generate Key
    0, 0,  # 0x12-0x13: not A110
    1,  # 0x14 Query
    0,  # 0x15: not A110
    80,  # 0x16 Generate Signature
    150,  # 0x17 Verify Signature
    260,  # 0x18 Establish Key
    0,  # 0x19: not A110
    15,  # 0x1A Verify Password
)  # fmt: skip

# Query subject tags (spec §4). 0x07 is also Generate Key's local-envelope variant.
TAG_LOCAL_ENVELOPE = const(0x07)
TAG_LIFE_CYCLE = const(0x08)
TAG_I2C = const(0x0A)
TAG_PRODUCT_DATA = const(0x11)
TAG_DATA_PARTITION = const(0x12)
TAG_PRIVATE_KEY_SLOT = const(0x13)
TAG_PRIVATE_KEY_TABLE = const(0x14)
TAG_HOST_KEY_SLOT = const(0x17)
TAG_COMMAND_AUTH = const(0x24)

_WRAP_MIN = const(16)  # Wrap input bytes (see the assumptions above)
_WRAP_MAX = const(480)
_WRAP_OVERHEAD = const(8)  # RFC 3394: the envelope is the data + one 64-bit block
ZONE_COUNTER = const(1)  # data partition zone type 1 = one-way counter (spec §5)
_AC_HOST = const(1)  # zone access condition "host": needs host C-MAC (spec §5)
_POINT_UNCOMPRESSED = const(0x04)
_COUNTER_LEN = const(4)
# Largest payload a builder copies into the 507 + 16-byte buffer; the session then checks
# the whole frame (with C-MAC, padding and CRC) against the 507-byte maximum.
_MAX_DATA = const(500)

# Curves (spec §5): name -> (OID bytes without the DER tag, coordinate size).
CURVES = {
    "P-256": (b"\x2a\x86\x48\xce\x3d\x03\x01\x07", 32),
    "P-384": (b"\x2b\x81\x04\x00\x22", 48),
    "BP256": (b"\x2b\x24\x03\x03\x02\x08\x01\x01\x07", 32),
    "BP384": (b"\x2b\x24\x03\x03\x02\x08\x01\x01\x0b", 48),
}

# Product data TLV tags (spec §4, Query 0x11), index = tag.
_PD_NAMES = (
    None,
    "mask_id",
    "st_number",
    "io_buffer_size",
    "atomicity_buffer_size",
    "nvm_size",
    "test_date",
    "internal_product_version",
    "module_date",
    "firmware_traceability",
    "blackbox_traceability",
    "perso_id",
    "perso_batch_id",
    "perso_date",
)

Zone = namedtuple(
    "Zone", ("index", "type", "read_ac", "read_right", "update_ac", "update_right", "size",
             "counter")
)  # fmt: skip
KeySlot = namedtuple("KeySlot", ("slot", "present", "mode", "curve"))


def _data(s, m):
    """The response data: memoryview aliasing the frame buffer (only inside a parser)."""
    return s.mv[frame.RSP_HDR_LEN : frame.RSP_HDR_LEN + m]


def _check_len(cmd, data, limit):
    if len(data) > limit:
        raise ParameterError(cmd, detail="data too long")


# --- builders: (buf, arg) -> payload length, payload at buf[1:] ---


def _b_raw(buf, data):
    buf[1 : 1 + len(data)] = data
    return len(data)


def _b_none(buf, _):
    return 0


def _b_one(buf, b):
    buf[1] = b
    return 1


def _put_lv(buf, off, data):
    n = len(data)
    buf[off] = n >> 8
    buf[off + 1] = n & 0xFF
    buf[off + 2 : off + 2 + n] = data
    return off + 2 + n


def _put_point(buf, off, pub, size):
    """04 LV(X) LV(Y) from an uncompressed public key 04||X||Y."""
    buf[off] = _POINT_UNCOMPRESSED
    mv = memoryview(pub)
    off = _put_lv(buf, off + 1, mv[1 : 1 + size])
    return _put_lv(buf, off, mv[1 + size : 1 + 2 * size])


# --- parsers: (session, data length, arg) -> result ---


def _p_none(s, m, arg):
    return None


def _p_bytes(s, m, arg):
    return bytes(_data(s, m))


def _p_u32(s, m, arg):
    return struct.unpack_from(">I", s.buf, frame.RSP_HDR_LEN)[0]


def _take_lv(cmd, d, off, size=None):
    """(value start, end) of the LV at d[off]; checks bounds and, if given, the size."""
    if off + 2 > len(d):
        raise LengthError(cmd, detail=off)
    n = (d[off] << 8) | d[off + 1]
    end = off + 2 + n
    if end > len(d) or (size is not None and n != size):
        raise LengthError(cmd, detail=n)
    return off + 2, end


def _check_point(cmd, pub, curve=None):
    """(oid, size) of the curve of pub (04||X||Y; P-256 / P-384 by length unless named)."""
    if curve is None:
        curve = "P-256" if len(pub) == 65 else "P-384"
    c = CURVES.get(curve)
    if c is None:
        raise ParameterError(cmd, detail="unknown curve")
    if len(pub) != 1 + 2 * c[1] or pub[0] != _POINT_UNCOMPRESSED:
        raise ParameterError(cmd, detail="public key is not 04||X||Y for the curve")
    return c


# --- General purpose commands ---


async def echo(s, data):
    """Echo: the chip returns data."""
    _check_len(ECHO, data, _MAX_DATA)
    return await s.run(ECHO, WAIT_MS[ECHO], len(data), _b_raw, _p_bytes, data)


async def reset(s):
    """Reset: the chip's volatile state (ephemeral key) is cleared."""
    await s.run(RESET, WAIT_MS[RESET], 0, _b_none, _p_none, None, no_mac=True)


def _b_random(buf, a):
    buf[1] = 0x00  # subject 0: ephemeral random
    buf[2] = a[2]
    return 2


def _p_into(s, m, a):
    """Copy the response data into a[0] (a bytearray) at offset a[1]."""
    a[0][a[1] : a[1] + m] = _data(s, m)


async def generate_random_into(s, out, off, n):
    """n (1..255) random bytes into out[off:off+n]."""
    if not 0 < n <= 255:
        raise ParameterError(GENERATE_RANDOM, detail="1..255 bytes per command")
    await s.run(GENERATE_RANDOM, WAIT_MS[GENERATE_RANDOM], n, _b_random, _p_into, (out, off, n))


async def hibernate(s, mode=1):
    """Hibernate. mode 1: wake on I2C start or reset; 2: wake on reset only (spec §4)."""
    if mode not in (1, 2):
        raise ParameterError(HIBERNATE, detail="mode 1 or 2")
    await s.run(HIBERNATE, WAIT_MS[HIBERNATE], 0, _b_one, _p_none, mode, no_mac=True)


# --- Query (never MAC'd: it is how the counter N is re-synchronised) ---


async def _query(s, tag, expect, parse):
    return await s.run(QUERY, WAIT_MS[QUERY], expect, _b_one, parse, tag, no_mac=True)


def _p_product_data(s, m, arg):
    d = _data(s, m)
    out = {}
    i = 0
    while i < m:
        if i + 2 > m or i + 2 + d[i + 1] > m:
            raise LengthError(QUERY, detail=i)
        tag = d[i]
        v = bytes(d[i + 2 : i + 2 + d[i + 1]])
        name = _PD_NAMES[tag] if tag < len(_PD_NAMES) else None
        if name and name.endswith("_size") and len(v) == 2:
            v = (v[0] << 8) | v[1]
        out[name or tag] = v
        i += 2 + d[i + 1]
    if len(out.get("mask_id", b"")) != 3:
        raise LengthError(QUERY, detail="no mask id")
    return out


async def query_product_data(s):
    """Product data as a dict: "mask_id" (3 bytes), "st_number" (9), "io_buffer_size" (int),
    ... (names in _PD_NAMES; unknown tags keyed by number)."""
    return await _query(s, TAG_PRODUCT_DATA, None, _p_product_data)


def _p_host_key_slot(s, m, arg):
    d = s.buf
    present = d[3] != 0
    n = (d[4] << 16) | (d[5] << 8) | d[6]
    s.n = n if present else None
    return present, n


async def query_host_key_slot(s):
    """(present, counter N); also resynchronises the driver's N."""
    return await _query(s, TAG_HOST_KEY_SLOT, 4, _p_host_key_slot)


async def sync_counter(s):
    """Query host key slot under the lock already held by Session.run (resync of N)."""
    return await s.run(QUERY, WAIT_MS[QUERY], 4, _b_one, _p_host_key_slot, TAG_HOST_KEY_SLOT,
                       no_mac=True, locked=True)  # fmt: skip


def _p_first(s, m, arg):
    return s.buf[frame.RSP_HDR_LEN]


async def query_life_cycle(s):
    """Life cycle state: 0x01 born, 0x03 operational, 0x04 terminated (+0x80 locked)."""
    return await _query(s, TAG_LIFE_CYCLE, 1, _p_first)


def _p_i2c(s, m, arg):
    d = s.buf
    return d[3] >> 1, d[4]


async def query_i2c_parameters(s):
    """(7-bit address, flags); flags bit0 = lock, bits 2..1 = low-power mode."""
    return await _query(s, TAG_I2C, 2, _p_i2c)


def _p_partition(s, m, arg):
    d = _data(s, m)
    if m < 1:
        raise LengthError(QUERY, detail=0)
    zones = []
    i = 1
    for _ in range(d[0]):
        if i + 5 > m:
            raise LengthError(QUERY, detail=i)
        idx, typ, ac = d[i], d[i + 1], d[i + 2]
        size = (d[i + 3] << 8) | d[i + 4]
        i += 5
        counter = None
        if typ == ZONE_COUNTER:
            if i + 4 > m:
                raise LengthError(QUERY, detail=i)
            counter = struct.unpack_from(">I", d, i)[0]
            i += 4
        z = Zone(idx, typ, (ac >> 4) & 7, ac >> 7, ac & 7, (ac >> 3) & 1, size, counter)
        zones.append(z)
        s.zones[idx] = (typ, z.read_ac, z.update_ac, size)
    return zones


async def query_data_partition(s):
    """List of Zone(index, type, read_ac, read_right, update_ac, update_right, size,
    counter); the driver then knows which zones need the host C-MAC and are counters."""
    return await _query(s, TAG_DATA_PARTITION, None, _p_partition)


def _p_auth(s, m, arg):
    d = _data(s, m)
    if m < 2 or m != 2 + 3 * d[1]:
        raise LengthError(QUERY, detail=m)
    table = {}
    for i in range(2, m, 3):
        table[d[i] & frame.CMD_MASK] = (d[i + 1], d[i + 2])
    s.auth = table
    return d[0], table


async def query_command_authorization(s):
    """(change right, {cmd: (access condition, encryption flags)}); the driver protects
    each command as this table says from then on."""
    return await _query(s, TAG_COMMAND_AUTH, None, _p_auth)


def _p_key_table(s, m, arg):
    d = _data(s, m)
    if m < 4:
        raise LengthError(QUERY, detail=m)
    slots = []
    i = 4
    for _ in range(d[0]):
        if i + 4 > m:
            raise LengthError(QUERY, detail=i)
        slot, present, mode = d[i], d[i + 1] != 0, (d[i + 2] << 8) | d[i + 3]
        i += 4
        curve = None
        if present:
            a, i = _take_lv(QUERY, d, i)
            curve = bytes(d[a:i])
            for name in CURVES:
                if CURVES[name][0] == curve:
                    curve = name
        slots.append(KeySlot(slot, present, mode, curve))
    return slots


async def query_private_key_table(s):
    """List of KeySlot(slot, present, mode, curve name, or OID bytes if unknown)."""
    return await _query(s, TAG_PRIVATE_KEY_TABLE, None, _p_key_table)


def _b_put(buf, a):
    tag, data = a
    buf[1] = tag
    buf[2 : 2 + len(data)] = data
    return 1 + len(data)


async def put_attribute(s, tag, data):
    _check_len(PUT_ATTRIBUTE, data, _MAX_DATA)
    await s.run(PUT_ATTRIBUTE, WAIT_MS[PUT_ATTRIBUTE], 0, _b_put, _p_none, (tag, data),
                no_mac=True)  # fmt: skip


# --- Data partition ---


def zone_needs_mac(s, zone, update):
    z = s.zones.get(zone)
    return z is not None and (z[2] if update else z[1]) == _AC_HOST


def is_counter_zone(s, zone):
    z = s.zones.get(zone)
    return z is not None and z[0] == ZONE_COUNTER


def _b_read(buf, a):
    struct.pack_into(">BBHH", buf, 1, 0x00, a[2], a[3], a[4])  # option 0: plain read
    return 6


def _p_read(s, m, a):
    """Copy the data (after the counter, if any) into a[0] at a[1]; return the counter."""
    out, off, _, _, n, counter = a
    extra = _COUNTER_LEN if counter else 0
    if out is not None:
        out[off : off + n] = s.mv[frame.RSP_HDR_LEN + extra : frame.RSP_HDR_LEN + extra + n]
    if counter:
        return _p_u32(s, m, a)
    return None


async def read_into(s, zone, offset, out, off, n):
    """One Read command: n bytes of zone at offset into out[off:off+n]. For a counter zone
    (known from the data partition) the chip sends the counter first: it is returned."""
    counter = is_counter_zone(s, zone)
    extra = _COUNTER_LEN if counter else 0
    if n < 0 or n + extra > _MAX_DATA or not 0 <= offset <= 0xFFFF:
        raise ParameterError(READ, detail="offset/length")
    return await s.run(READ, WAIT_MS[READ], n + extra, _b_read, _p_read,
                       (out, off, zone, offset, n, counter),
                       need_mac=zone_needs_mac(s, zone, False))  # fmt: skip


def _b_update(buf, a):
    option, zone, offset, data = a
    struct.pack_into(">BBH", buf, 1, option, zone, offset)
    buf[5 : 5 + len(data)] = data
    return 4 + len(data)


async def update_one(s, zone, offset, data, atomic=False):
    """One Update command (the API splits larger writes)."""
    _check_len(UPDATE, data, _MAX_DATA - 4)
    if not 0 <= offset <= 0xFFFF:
        raise ParameterError(UPDATE, detail="offset")
    option = 0x80 if atomic else 0x00  # bit7 = atomic (spec §4)
    await s.run(UPDATE, WAIT_MS[UPDATE], 0, _b_update, _p_none, (option, zone, offset, data),
                need_mac=zone_needs_mac(s, zone, True))  # fmt: skip


def _b_decrement(buf, a):
    zone, offset, amount, data = a
    struct.pack_into(">BBHI", buf, 1, 0x00, zone, offset, amount)  # option 0: no AC change
    buf[9 : 9 + len(data)] = data
    return 8 + len(data)


async def decrement(s, zone, amount=1, data=b"", offset=0):
    """Decrement the one-way counter of zone by amount (optionally writing data at offset
    in the same command); returns the new counter value."""
    _check_len(DECREMENT, data, _MAX_DATA - 8)
    if not 0 < amount <= 0xFFFFFFFF or not 0 <= offset <= 0xFFFF:
        raise ParameterError(DECREMENT, detail="amount/offset")
    return await s.run(DECREMENT, WAIT_MS[DECREMENT], _COUNTER_LEN, _b_decrement, _p_u32,
                       (zone, offset, amount, data),
                       need_mac=zone_needs_mac(s, zone, True))  # fmt: skip


# --- Keys ---


def _b_genkey(buf, a):
    slot, usage_limit, mode, oid, _ = a
    struct.pack_into(">BBHH", buf, 1, TAG_PRIVATE_KEY_SLOT, slot, usage_limit, mode)
    return _put_lv(buf, 7, oid) - 1


def _p_point(s, m, a):
    cmd, size = a[0], a[-1]
    d = _data(s, m)
    if d[0] != _POINT_UNCOMPRESSED:
        raise LengthError(cmd, detail="point format")
    xa, xe = _take_lv(cmd, d, 1, size)
    ya, ye = _take_lv(cmd, d, xe, size)
    out = bytearray(1 + 2 * size)
    out[0] = _POINT_UNCOMPRESSED
    out[1 : 1 + size] = d[xa:xe]
    out[1 + size :] = d[ya:ye]
    return bytes(out)


def _p_genkey(s, m, a):
    return _p_point(s, m, (GENERATE_KEY, a[4]))


async def generate_key_raw(s, slot, curve, usage_limit, mode):
    """Generate Key in a private key slot: returns the public key 04||X||Y."""
    c = CURVES.get(curve)
    if c is None or not 0 <= usage_limit <= 0xFFFF or not 0 <= mode <= 0xFFFF:
        raise ParameterError(GENERATE_KEY, detail="curve/usage limit/mode")
    return await s.run(GENERATE_KEY, WAIT_MS[GENERATE_KEY], 1 + 2 * (2 + c[1]), _b_genkey,
                       _p_genkey, (slot, usage_limit, mode, c[0], c[1]))  # fmt: skip


def _b_sign(buf, a):
    slot, digest = a
    buf[1] = slot
    return _put_lv(buf, 2, digest) - 1


def _p_sign(s, m, a):
    d = _data(s, m)
    ra, re = _take_lv(GENERATE_SIGNATURE, d, 0)
    sa, se = _take_lv(GENERATE_SIGNATURE, d, re)
    size = re - ra
    if se != m or se - sa != size or size not in (32, 48):
        raise LengthError(GENERATE_SIGNATURE, detail=m)
    out = bytearray(2 * size)
    out[:size] = d[ra:re]
    out[size:] = d[sa:se]
    return bytes(out)


async def generate_signature(s, slot, digest):
    """ECDSA signature r||s (64 bytes for P-256) of a 32- or 48-byte digest with the key in
    slot. Refuses an all-zero digest (the chip hangs on it) with ParameterError."""
    if len(digest) not in (32, 48):
        raise ParameterError(GENERATE_SIGNATURE, detail="digest is 32 or 48 bytes")
    for b in digest:
        if b:
            break
    else:
        # [MW] WORKAROUND_GENERATE_SIGNATURE: the A1x0 hangs on an all-zero digest.
        raise ParameterError(GENERATE_SIGNATURE, detail="all-zero digest")
    return await s.run(GENERATE_SIGNATURE, WAIT_MS[GENERATE_SIGNATURE], None, _b_sign, _p_sign,
                       (slot, digest))  # fmt: skip


def _b_verify(buf, a):
    oid, size, pub, sig, digest = a
    buf[1] = 0x00  # subject: message authentication
    off = _put_lv(buf, 2, oid)
    off = _put_point(buf, off, pub, size)
    mv = memoryview(sig)
    off = _put_lv(buf, off, mv[:size])
    off = _put_lv(buf, off, mv[size:])
    return _put_lv(buf, off, digest) - 1


def _p_valid(s, m, a):
    return s.buf[frame.RSP_HDR_LEN] != 0  # [SL]: non-zero = valid


async def verify_signature(s, pubkey, sig, digest, curve=None):
    """True if the chip finds sig (r||s) valid for pubkey (04||X||Y) over digest. The curve
    is P-256 or P-384 from the key's length unless named ("BP256", "BP384")."""
    oid, size = _check_point(VERIFY_SIGNATURE, pubkey, curve)
    if len(sig) != 2 * size or len(digest) not in (32, 48):
        raise ParameterError(VERIFY_SIGNATURE, detail="signature/digest length")
    return await s.run(VERIFY_SIGNATURE, WAIT_MS[VERIFY_SIGNATURE], 1, _b_verify, _p_valid,
                       (oid, size, pubkey, sig, digest))  # fmt: skip


def _b_establish(buf, a):
    slot, pub, size = a
    buf[1] = slot
    return _put_point(buf, 2, pub, size) - 1


def _p_secret(s, m, a):
    d = _data(s, m)
    za, ze = _take_lv(ESTABLISH_KEY, d, 0, a[2])
    return bytes(d[za:ze])


async def establish_key(s, slot, peer_pubkey):
    """ECDH between the key in slot and peer_pubkey (04||X||Y): the shared secret Z (the
    x-coordinate, 32 bytes for P-256), decrypted when the chip encrypts the response."""
    oid, size = _check_point(ESTABLISH_KEY, peer_pubkey)
    return await s.run(ESTABLISH_KEY, WAIT_MS[ESTABLISH_KEY], 2 + size, _b_establish, _p_secret,
                       (slot, peer_pubkey, size))  # fmt: skip


# --- Local envelopes (spec §4: Wrap 0x0E / Unwrap 0x0F, RFC 3394 AES key wrap) ---


def _p_envelope_table(s, m, arg):
    d = _data(s, m)
    if m < 1:
        raise LengthError(QUERY, detail=0)
    out = {}
    i = 1
    for _ in range(d[0]):
        if i + 2 > m:
            raise LengthError(QUERY, detail=i)
        slot, present = d[i], d[i + 1]
        i += 2
        out[slot] = None
        if present:
            if i >= m:
                raise LengthError(QUERY, detail=i)
            out[slot] = d[i]
            i += 1
    return out


async def query_local_envelope_keys(s):
    """{slot: key length in bytes (16 or 32), or None for an empty slot} (Query 0x07)."""
    return await _query(s, TAG_LOCAL_ENVELOPE, None, _p_envelope_table)


def _b_envkey(buf, a):
    buf[1] = TAG_LOCAL_ENVELOPE
    buf[2] = a[0]
    buf[3] = a[1]
    return 3


async def generate_envelope_key(s, slot, aes256=False):
    """Generate Key, local-envelope variant: an AES-128 (or AES-256) key in local envelope
    key slot `slot`, inside the chip. Nothing is returned: the key never leaves it."""
    if not 0 <= slot <= 0xFF:
        raise ParameterError(GENERATE_KEY, detail="slot")
    await s.run(GENERATE_KEY, WAIT_MS[GENERATE_KEY], 0, _b_envkey, _p_none,
                (slot, 1 if aes256 else 0))  # fmt: skip


def _b_slot_data(buf, a):
    n = len(a[1])
    buf[1] = a[0]
    buf[2 : 2 + n] = a[1]
    return 1 + n


def _check_wrap(cmd, slot, n, lo):
    if not 0 <= slot <= 0xFF or n & 7 or not lo <= n <= lo + _WRAP_MAX - _WRAP_MIN:
        raise ParameterError(cmd, detail="slot, or length not a multiple of 8 in range")


async def wrap(s, slot, data):
    """Wrap Local Envelope: data (16..480 bytes, a multiple of 8) wrapped under the local
    envelope key in slot (RFC 3394): an envelope 8 bytes longer. The command, which carries
    data in clear, is encrypted on the bus when the chip's table says so (the profile does)."""
    n = len(data)
    _check_wrap(WRAP, slot, n, _WRAP_MIN)
    return await s.run(WRAP, WAIT_MS[WRAP], n + _WRAP_OVERHEAD, _b_slot_data, _p_bytes,
                       (slot, data))  # fmt: skip


async def unwrap(s, slot, envelope):
    """Unwrap Local Envelope: the data inside an envelope made by wrap() with the same slot.
    An envelope that fails the RFC 3394 integrity check raises the chip's status as an
    SEStatusError subclass; the response (the data in clear) is encrypted on the bus when the
    chip's table says so (the profile does)."""
    n = len(envelope)
    _check_wrap(UNWRAP, slot, n, _WRAP_MIN + _WRAP_OVERHEAD)
    return await s.run(UNWRAP, WAIT_MS[UNWRAP], n - _WRAP_OVERHEAD, _b_slot_data, _p_bytes,
                       (slot, envelope))  # fmt: skip
