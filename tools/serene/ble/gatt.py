"""The module's GATT service as the host tools see it (docs/ble.md), and BLE timing.

The UUIDs were generated once (uuid4) for this product; the four share one base and differ in
the first 32-bit group, as vendor services usually do. drivers/radio/ble.py carries the same
values; tests/test_ble_radio.py checks that the module advertises and registers exactly these.
"""

import math
import struct
import uuid

SERVICE = uuid.UUID("cf0c0001-70d3-4534-86e0-9bcdf6990dc9")
UPLINK = uuid.UUID("cf0c0002-70d3-4534-86e0-9bcdf6990dc9")  # indicate
DOWNLINK = uuid.UUID("cf0c0003-70d3-4534-86e0-9bcdf6990dc9")  # write (with response)
STATUS = uuid.UUID("cf0c0004-70d3-4534-86e0-9bcdf6990dc9")  # read

# ATT characteristic properties as MicroPython's bluetooth module numbers them (the same bits
# as the Characteristic Properties field, Core v5.4 Vol 3 Part G §3.3.1.1) plus its
# permission bits.
F_READ = 0x0002
F_WRITE_NO_RESPONSE = 0x0004
F_WRITE = 0x0008
F_NOTIFY = 0x0010
F_INDICATE = 0x0020
F_READ_ENCRYPTED = 0x0200
F_WRITE_ENCRYPTED = 0x1000
F_WRITABLE = F_WRITE | F_WRITE_NO_RESPONSE

# ATT error codes (Core v5.4 Vol 3 Part F §3.4.1.1, Table 3.4).
ATT_INVALID_HANDLE = 0x01
ATT_READ_NOT_PERMITTED = 0x02
ATT_WRITE_NOT_PERMITTED = 0x03
ATT_INVALID_ATTRIBUTE_LENGTH = 0x0D
ATT_INSUFFICIENT_ENCRYPTION = 0x0F

DEFAULT_ATT_MTU = 23  # Core v5.4 Vol 3 Part F §3.2.8 (ATT_MTU for LE before an exchange)
MAX_ATT_MTU = 247  # what fits one LL PDU of 251 bytes with Data Length Extension (L2CAP 4)
STATUS_VERSION = 1


def advertised_name(device_id):
    """The complete local name a module advertises (e.g. "SRN-0001")."""
    return device_id


def parse_ad(data):
    """AD structures (Core Supplement Part A §1) -> {type: [value bytes, ...]}."""
    out = {}
    i = 0
    data = bytes(data or b"")
    while i < len(data):
        n = data[i]
        if n == 0 or i + 1 + n > len(data):
            break
        out.setdefault(data[i + 1], []).append(data[i + 2 : i + 1 + n])
        i += 1 + n
    return out


def ad_name(adv, resp=b""):
    for blob in (adv, resp):
        names = parse_ad(blob).get(0x09)
        if names:
            return names[0].decode("utf-8", "replace")
    return None


def ad_services128(adv, resp=b""):
    out = []
    for blob in (adv, resp):
        ad = parse_ad(blob)
        for t in (0x06, 0x07):
            for v in ad.get(t, []):
                for k in range(0, len(v) - 15, 16):
                    # AD carries UUIDs little-endian (Core Supplement Part A §1.1).
                    out.append(uuid.UUID(bytes=bytes(reversed(v[k : k + 16]))))
    return out


def parse_status(data):
    """The status characteristic's value: version u8, id length u8, id, objects pending u32,
    ATT MTU u16 (little-endian)."""
    data = bytes(data)
    if len(data) < 2 or data[0] != STATUS_VERSION:
        raise ValueError("status record: version %r" % (data[:1],))
    n = data[1]
    if len(data) != 2 + n + 6:
        raise ValueError("status record: %d bytes for an id of %d" % (len(data), n))
    pending, mtu = struct.unpack_from("<IH", data, 2 + n)
    return {"device_id": data[2 : 2 + n].decode(), "pending": pending, "mtu": mtu}


def indication_events(n, ll_payload=27, pkts_per_event=4):
    """Connection events an n-byte indication takes: its L2CAP PDU (4-byte L2CAP header +
    ATT opcode 1 + handle 2 + n, Core Vol 3 Part A §3.1 and Part F §3.4.7.2) in LL fragments
    of ll_payload bytes (27 without Data Length Extension, 251 with it, Vol 6 Part B §2.4),
    pkts_per_event of them per connection event, then one more event for the client's Handle
    Value Confirmation: the server may not send another indication before it (Part F §3.4.7.3),
    and the confirmation can come at the earliest in the event after the indication's last
    fragment (the client's host answers after its controller has delivered the PDU)."""
    frags = math.ceil((n + 7) / ll_payload)
    return math.ceil(frags / pkts_per_event) + 1


def air_us(n, ll_payload=27, encrypted=True):
    """Radio-on time of the module's transmitter for an n-byte indication on the LE 1M PHY
    (1 µs a bit): each LL data PDU is preamble 1 + access address 4 + header 2 + payload
    + MIC 4 (encrypted links) + CRC 3 bytes (Vol 6 Part B §2.1, §2.4)."""
    total = n + 7
    us = 0
    while total > 0:
        p = min(total, ll_payload)
        us += (1 + 4 + 2 + p + (4 if encrypted else 0) + 3) * 8
        total -= p
    return us
