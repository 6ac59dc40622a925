"""The emulated STSAFE-A110's personalisation, and the module's zone map: ONE place for both.

Where the spec (specs/stsafe-a110.md §8) leaves a fact open, the choice made here is listed in
ASSUMPTIONS; the MicroPython driver makes the same ones (drivers/stsafe/commands.py header).
A driver and this emulator can agree and still both be wrong there.
"""

ASSUMPTIONS = {
    "fresh_host_counter": "N = 0 right after Put Attribute of the host keys",
    "counter_limit": "C-MAC refused with 0x09 once N reaches 0xFFFFFE (N+1 must stay valid)",
    "counter_zone_read": "Read of a counter zone returns counter(4) || data; length 0 = counter",
    "counter_exhausted": "Decrement below 0 answers 0x13 COUNTER_LIMIT_EXCEEDED",
    "command_ac_refusal": "a command whose authorization AC is not met answers 0x1E",
    "zone_ac_refusal": "a zone access condition not met answers 0x11",
    "host_keys_once": "Put Attribute of host keys on a paired chip answers 0x11",
    "private_key_table": "[SL] layout: count, change right, global usage limit(2), then per "
    "slot: slot, presence, mode(2), curve OID LV if present",
    "usage_limit_zero": "Generate Key usage limit 0 = no limit",
    "slot0_write_once": "slot 0 can be generated once (factory key); slots 1 and 0xFF again",
    "ephemeral_volatile": "slot 0xFF is erased by Reset, Hibernate, power loss and after use",
    "mode_zero": "Generate Key mode 0x0000 ([SL]) allows every usage",
    "error_frames": "error responses carry the status only: no data, no R-MAC",
    "rmac_needs_cmac": "an R-MAC is produced only for a command with a valid host C-MAC",
    "padding": "responses padded minimally (0x80 then zeros); commands accepted either way",
    "all_zero_digest": "Generate Signature of an all-zero digest hangs the chip (NACKs until a "
    "power cycle), as [MW]'s WORKAROUND_GENERATE_SIGNATURE says",
    "envelope_slots": "two local envelope key slots, 0 and 1 ([MW] STSAFEA_KEY_SLOT_0/1)",
    "envelope_key_once": "Generate Key of a local envelope key into a full slot answers 0x11 "
    "(the slot is written once: regenerating it would make every stored envelope unreadable)",
    "envelope_seed": "the optional seed of the local envelope Generate Key variant is accepted "
    "and not used: the key comes from the chip's random generator",
    "envelope_table": "Query 0x07: <nslots> then per slot <slot><presence>[<key length in "
    "bytes: 16 or 32>]",
    "envelope_sizes": "Wrap takes 16..480 bytes, a multiple of 8 (480: an encrypted Wrap "
    "command, 1 + 480 bytes padded to 496, still fits the 507-byte frame); Unwrap 24..488; "
    "other lengths answer 0x03 VALUE_OUT_OF_RANGE",
    "unwrap_integrity": "an envelope whose RFC 3394 integrity check fails answers 0x02 "
    "INCONSISTENT_COMMAND_DATA (no data)",
}

# Product data TLVs (Query 0x11, §4): 64 bytes on an A110. Mask id 0x4609 is in the A110
# range ([SL]: >= 0x4600 and < 0x6000). The ST number (serial) is random per emulated chip.
MASK_ID = bytes([0x00, 0x46, 0x09])
IO_BUFFER_SIZE = 507
ATOMICITY_BUFFER_SIZE = 64
NVM_SIZE = 6966  # the data zones below


def product_data(st_number):
    tlv = [
        (0x01, MASK_ID),
        (0x02, st_number),
        (0x03, IO_BUFFER_SIZE.to_bytes(2, "big")),
        (0x04, ATOMICITY_BUFFER_SIZE.to_bytes(2, "big")),
        (0x05, NVM_SIZE.to_bytes(2, "big")),
        (0x06, b"\x24\x11"),  # test date
        (0x07, b"\x01"),  # internal product version
        (0x08, b"\x24\x12"),  # module date
        (0x09, b"\x03\x03\x06"),  # firmware traceability
        (0x0A, b"\x00\x00\x01"),  # blackbox traceability
        (0x0B, b"SRN"),  # perso id
        (0x0C, b"\x00\x00\x01"),  # perso batch id
        (0x0D, b"\x24\x12\x01"),  # perso date
    ]
    return b"".join(bytes([t, len(v)]) + v for t, v in tlv)


LIFE_CYCLE_OPERATIONAL = 0x03
I2C_ADDRESS = 0x20

# Data partition of the emulated chip as it leaves the factory (generic profile, sizes
# assumed): index, type (0 data, 1 one-way counter), read AC, read AC change right, update AC,
# update AC change right, size, initial counter. AC: 0 always, 1 host C-MAC, 4-7 never.
ZONES = [
    (0, 0, 0, 0, 0, 1, 1000, None),
    (1, 0, 0, 1, 0, 1, 700, None),
    (2, 0, 0, 1, 0, 1, 600, None),
    (3, 0, 0, 1, 0, 1, 600, None),
    (4, 0, 0, 1, 0, 1, 1696, None),
    (5, 1, 0, 1, 1, 1, 128, 1_000_000),
    (6, 1, 0, 1, 1, 1, 64, 1_000_000),
    (7, 0, 0, 1, 0, 1, 2178, None),
]
ZONE_FIELDS = ("index", "type", "read_ac", "read_right", "update_ac", "update_right", "size",
               "counter")  # fmt: skip

# Command authorization (Query 0x24): (command, AC, encryption flags). AC 3 = host C-MAC;
# flags bit1 = command encrypted, bit0 = response encrypted. Commands not listed are free.
# Every command that uses a private key, a local envelope key or a counter needs the host
# C-MAC (docs/stsafe.md): only the paired MCU can make the chip sign, agree a key, wrap,
# unwrap or count; without it any process on the bus is a signing oracle (issue 8, item 4).
COMMAND_AUTH = [
    (0x04, 3, 0),  # Decrement
    (0x06, 3, 0),  # Update
    (0x0E, 3, 0x02),  # Wrap Local Envelope: command (the plain key) encrypted
    (0x0F, 3, 0x01),  # Unwrap Local Envelope: response (the plain key) encrypted
    (0x11, 3, 0),  # Generate Key
    (0x16, 3, 0),  # Generate Signature
    (0x18, 3, 0x01),  # Establish Key: response (the shared secret) encrypted
]
# The commands that must need the host C-MAC (AC 3) in a chip's table: provisioning refuses a
# chip whose table lets any of them run without it (an older personalisation profile).
HOST_ONLY_COMMANDS = (0x04, 0x0E, 0x0F, 0x11, 0x16, 0x18)
KEY_SLOTS = (0x00, 0x01, 0xFF)
ENVELOPE_SLOTS = (0, 1)  # local envelope key slots
ENVELOPE_KEY_SIZES = {0: 16, 1: 32}  # Generate Key key type -> AES key length

# --- The module's zone map: what lives where. The firmware reads these names from
# devices/<id>/module.json; provisioning writes and locks them. ---
CERT_ZONE = 0  # device certificate (DER), read AC always, locked (update never) once written
SERVER_KEY_ZONE = 2  # pinned server and CA public keys, update AC host (only the paired MCU)
SERVER_KEY_OFFSET = 0  # server static public key, 04||X||Y (65 bytes)
CA_KEY_OFFSET = 65  # manufacturer CA public key, 04||X||Y (65 bytes)
EPOCH_COUNTER_ZONE = 5  # one-way counter: epoch numbers; Decrement needs host C-MAC
FACTORY_KEY_SLOT = 0  # device key (signs epochs and checkpoints); certificate in CERT_ZONE
EPHEMERAL_KEY_SLOT = 0xFF  # per-epoch ECDH key, single use
ENVELOPE_KEY_SLOT = 0  # local envelope key (AES-128): wraps the ack keys the module persists
FACTORY_KEY_MODE = 0x0004  # may sign a host digest, nothing else
AC_NEVER_LOCKED = 4  # update AC written on the certificate zone after provisioning


def zone_map():
    """The zone map as module.json carries it (names the firmware reads)."""
    return {
        "certificate": {"zone": CERT_ZONE, "offset": 0},
        "server_key": {"zone": SERVER_KEY_ZONE, "offset": SERVER_KEY_OFFSET, "length": 65},
        "ca_key": {"zone": SERVER_KEY_ZONE, "offset": CA_KEY_OFFSET, "length": 65},
        "epoch_counter": {"zone": EPOCH_COUNTER_ZONE},
        "factory_key_slot": FACTORY_KEY_SLOT,
        "ephemeral_key_slot": EPHEMERAL_KEY_SLOT,
        "envelope_key_slot": ENVELOPE_KEY_SLOT,
    }
