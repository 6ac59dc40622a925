"""STSAFE-A110 wire protocol on the host (specs/stsafe-a110.md §2-§6), with `cryptography`.

Shared by the emulator and the host client. Independent of the MicroPython driver (drivers/
stsafe), which implements the same spec on cryptolib; the two meet only on the wire.
"""

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC

# Commands (§4) and the minimum wait before the response, ms (§1, [MW] stsafea110.h).
ECHO, RESET, GENERATE_RANDOM, START_SESSION, DECREMENT, READ, UPDATE = 0, 1, 2, 3, 4, 5, 6
DELETE, HIBERNATE, WRAP, UNWRAP, PUT_ATTRIBUTE, GENERATE_KEY = 0x0C, 0x0D, 0x0E, 0x0F, 0x10, 0x11
QUERY, GENERATE_SIGNATURE, VERIFY_SIGNATURE, ESTABLISH_KEY = 0x14, 0x16, 0x17, 0x18
VERIFY_PASSWORD = 0x1A
WAIT_MS = {
    ECHO: 0, RESET: 30, GENERATE_RANDOM: 15, START_SESSION: 25, DECREMENT: 15, READ: 0,
    UPDATE: 15, HIBERNATE: 50, WRAP: 125, UNWRAP: 150, PUT_ATTRIBUTE: 15, GENERATE_KEY: 160,
    DELETE: 15, QUERY: 1, GENERATE_SIGNATURE: 80, VERIFY_SIGNATURE: 150, ESTABLISH_KEY: 260,
    VERIFY_PASSWORD: 15,
}  # fmt: skip
BOOT_MS = 10  # [SL] stsafea_boot_time / wake-up time

# Query tags (§4). TAG_LOCAL_ENVELOPE is also Generate Key's local-envelope variant.
TAG_LOCAL_ENVELOPE = 0x07
TAG_LIFE_CYCLE, TAG_I2C, TAG_PRODUCT_DATA, TAG_DATA_PARTITION = 0x08, 0x0A, 0x11, 0x12
TAG_PRIVATE_KEY_SLOT, TAG_PRIVATE_KEY_TABLE, TAG_HOST_KEY_SLOT = 0x13, 0x14, 0x17
TAG_COMMAND_AUTH = 0x24

# Status codes (§3).
STATUS_NAMES = (
    "OK COMMUNICATION_ERROR INCONSISTENT_COMMAND_DATA VALUE_OUT_OF_RANGE "
    "UNSUPPORTED_COMMAND_CODE UNEXPECTED_ERROR BUFFER_LENGTH_EXCEEDED WRONG_SESSION "
    "TOO_MANY_MESSAGE_LOST CMAC_COUNTER_LIMIT_REACHED KEY_NOT_FOUND KEY_BLOCKED WRONG_KEY_TYPE "
    "COUNTER_OUT_OF_RANGE DEPTH_OUT_OF_RANGE INVALID_LIFE_CYCLE_STATE ENTRY_NOT_FOUND "
    "UNSATISFIED_ACCESS_CONDITION INCORRECT_ZONE_TYPE COUNTER_LIMIT_EXCEEDED BOUNDARY_EXCEEDED "
    "INVALID_PRIVATE_KEY INVALID_CMAC CHALLENGE_MISSING COMMAND_DECRYPTION_ERROR "
    "INVALID_PUBLIC_KEY PASSWORD_BLOCKED WRONG_KEY_USAGE WRONG_MODE_OF_OPERATION "
    "WRONG_MAC_LENGTH UNAUTHORIZED_COMMAND OLD_MESSAGE"
).split()
ST = {name: code for code, name in enumerate(STATUS_NAMES)}

HDR_CMAC, HDR_RMAC, HDR_HOST = 0x80, 0x40, 0x20
STATUS_RMAC = 0x40
MAX_FRAME = 507
SUBJECT_CMAC, SUBJECT_RMAC, SUBJECT_CMD_ENC, SUBJECT_RSP_DEC = 0x00, 0x40, 0x80, 0xC0
AC_NEVER, AC_FREE, AC_ADMIN, AC_HOST, AC_ADMIN_OR_PASSWORD, AC_ADMIN_OR_HOST = range(6)
ENC_RSP, ENC_CMD = 0x01, 0x02
COUNTER_MASK = 0xFFFFFF

# Curves (§5): name -> (OID bytes without the DER tag, coordinate size).
CURVES = {
    "P-256": (bytes.fromhex("2a8648ce3d030107"), 32),
    "P-384": (bytes.fromhex("2b81040022"), 48),
    "BP256": (bytes.fromhex("2b2403030208010107"), 32),
    "BP384": (bytes.fromhex("2b240303020801010b"), 48),
}
CURVE_BY_OID = {oid: name for name, (oid, _) in CURVES.items()}


def crc16(data):
    """CRC-16/X-25: poly 0x1021 reflected (0x8408), init 0xFFFF, xorout 0xFFFF."""
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc ^ 0xFFFF


def crc_bytes(data):
    return (crc16(data)).to_bytes(2, "big")  # MSB first on the wire (§2)


def command_frame(hdr, payload, mac=b""):
    body = bytes([hdr]) + payload + mac
    return body + crc_bytes(body)


def response_frame(status, data=b"", rmac=b""):
    """[STATUS][LEN][DATA][R-MAC][CRC]; LEN counts DATA, R-MAC and CRC; CRC skips LEN."""
    covered = bytes([status]) + data + rmac
    return (
        bytes([status])
        + (len(data) + len(rmac) + 2).to_bytes(2, "big")
        + covered[1:]
        + (crc_bytes(covered))
    )


def parse_response(frame):
    """(status, data, rmac) of a whole response frame; ValueError if LEN or CRC is wrong."""
    if len(frame) < 5:
        raise ValueError("short response")
    total = 3 + int.from_bytes(frame[1:3], "big")
    if total != len(frame):
        raise ValueError("LEN %d for a %d-byte frame" % (total, len(frame)))
    covered = frame[:1] + frame[3:-2]
    if crc_bytes(covered) != frame[-2:]:
        raise ValueError("bad response CRC")
    status = frame[0]
    body = frame[3:-2]
    if status & STATUS_RMAC:
        return status, body[:-4], body[-4:]
    return status, body, b""


def block(n, subject):
    """IV/subject block [N2 N1 N0][subject][0x80][0 x 11] (§6)."""
    return (n & COUNTER_MASK).to_bytes(3, "big") + bytes([subject, 0x80]) + bytes(11)


def aes_cmac(key, msg):
    c = CMAC(algorithms.AES(key))
    c.update(msg)
    return c.finalize()


def c_mac(mac_key, n, hdr, payload):
    """C-MAC: 4 bytes of AES-CMAC over block(N, 0x00) || 00 || HDR || BE16(len) || payload."""
    msg = block(n, SUBJECT_CMAC) + bytes([0x00, hdr]) + len(payload).to_bytes(2, "big") + payload
    return aes_cmac(mac_key, msg)[:4]


def r_mac(mac_key, n, hdr, payload, status, data):
    """R-MAC with counter n (the chip's N+1): over block(n, 0x40) || 80 || command || response."""
    msg = (
        block(n, SUBJECT_RMAC)
        + bytes([0x80, hdr])
        + len(payload).to_bytes(2, "big")
        + payload
        + bytes([status])
        + len(data).to_bytes(2, "big")
        + data
    )
    return aes_cmac(mac_key, msg)[:4]


def _ecb(key, data):
    e = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return e.update(data) + e.finalize()


def iv(cipher_key, n, subject):
    return _ecb(cipher_key, block(n, subject))


def pad(data):
    """ISO/IEC 9797-1 method 2, minimal: 0x80 then zeros to a multiple of 16."""
    data = data + b"\x80"
    return data + bytes(-len(data) % 16)


def unpad(data):
    """Strip 0x80 00..; ValueError if absent (accepts [MW]'s extra block, up to 16 zeros)."""
    stripped = data.rstrip(b"\x00")
    if not stripped or stripped[-1] != 0x80 or len(data) - len(stripped) > 16:
        raise ValueError("bad padding")
    return stripped[:-1]


def encrypt(cipher_key, n, subject, plaintext):
    e = Cipher(algorithms.AES(cipher_key), modes.CBC(iv(cipher_key, n, subject))).encryptor()
    return e.update(pad(plaintext)) + e.finalize()


def decrypt(cipher_key, n, subject, ciphertext):
    if not ciphertext or len(ciphertext) % 16:
        raise ValueError("ciphertext length %d" % len(ciphertext))
    d = Cipher(algorithms.AES(cipher_key), modes.CBC(iv(cipher_key, n, subject))).decryptor()
    return unpad(d.update(ciphertext) + d.finalize())


def lv(data):
    return len(data).to_bytes(2, "big") + data


def take_lv(buf, off):
    """(value, next offset) of the LV at buf[off]; ValueError if it overruns."""
    if off + 2 > len(buf):
        raise ValueError("LV header overruns")
    n = int.from_bytes(buf[off : off + 2], "big")
    if off + 2 + n > len(buf):
        raise ValueError("LV value overruns")
    return buf[off + 2 : off + 2 + n], off + 2 + n
