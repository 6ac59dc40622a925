# STSAFE-A110 driver: frame layer (header bits, CRC-16/X-25, response LEN and status).
# MIT licence, (c) serene-module authors. Spec: specs/stsafe-a110.md §2.
#
# Command (one I2C write):  [HDR][PAYLOAD][C-MAC 4, if HDR bit7][CRC 2, MSB first]
# Response (one I2C read):  [STATUS][LEN 2, BE][DATA][R-MAC 4, if STATUS bit6][CRC 2]
# LEN counts DATA + R-MAC + CRC. The CRC covers HDR/STATUS and everything after LEN.
from micropython import const

# Header bits (spec §2, [MW] stsafea_types.h CMAC/RMAC/SCHN positions 7/6/5).
HDR_CMAC = const(0x80)
HDR_RMAC = const(0x40)
HDR_HOST = const(0x20)
HDR_HOST_MAC = const(0xE0)  # what [SL] sets for every host-session command
CMD_MASK = const(0x1F)
STATUS_MASK = const(0x1F)  # [SL] STSE_STSAFEA_RSP_STATUS_MASK
STATUS_RMAC = const(0x40)

MAC_LEN = const(4)  # truncated AES-CMAC ([SL] STSE_MAC_SIZE)
CRC_LEN = const(2)
RSP_HDR_LEN = const(3)  # STATUS + LEN
MAX_FRAME = const(507)  # [MW] STSAFEA_BUFFER_DATA_PACKET_SIZE, [SL] A110 max frame length


def _crc_update(crc, buf, start, end):
    """Running CRC-16/X-25 over buf[start:end]: byte-wise reflected CCITT update (poly
    0x1021 reflected = 0x8408), no table, no allocation."""
    for i in range(start, end):
        d = (buf[i] ^ crc) & 0xFF
        d = (d ^ (d << 4)) & 0xFF
        crc = ((d << 8) | (crc >> 8)) ^ (d >> 4) ^ (d << 3)
    return crc


def crc16(buf, start, end):
    """CRC-16/X-25 of buf[start:end] (init and xorout 0xFFFF); check("123456789") = 0x906E."""
    return _crc_update(0xFFFF, buf, start, end) ^ 0xFFFF


def seal_command(buf, end):
    """Append the CRC of buf[0:end] (header + payload [+ C-MAC]); return the frame length."""
    crc = crc16(buf, 0, end)
    buf[end] = crc >> 8
    buf[end + 1] = crc & 0xFF
    return end + CRC_LEN


def response_length(buf):
    """Total bytes of the response whose first 3 bytes are in buf: 3 + LEN. No check."""
    return RSP_HDR_LEN + ((buf[1] << 8) | buf[2])


def response_crc_ok(buf, total):
    """True if the CRC at the end of the response buf[0:total] is right. It covers STATUS
    (buf[0]) and buf[3:total-2], not the LEN field (spec §2)."""
    if total < RSP_HDR_LEN + CRC_LEN:
        return False
    end = total - CRC_LEN
    crc = _crc_update(_crc_update(0xFFFF, buf, 0, 1), buf, RSP_HDR_LEN, end) ^ 0xFFFF
    return buf[end] == crc >> 8 and buf[end + 1] == crc & 0xFF
