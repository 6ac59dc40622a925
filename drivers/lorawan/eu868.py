# EU863-870 regional parameters (LoRaWAN Regional Parameters RP002-1.0.4, §2.2 "EU863-870").
#
# Copyright (c) the serene-module authors. MIT licence.
#
# Data rates supported here: DR0-DR5 (LoRa SF12-SF7 at 125 kHz, every EU868 gateway and the
# three default channels). DR6 (SF7/250 kHz) and DR7 (FSK) are not implemented: a LinkADRReq
# or NewChannelReq asking for them is refused with the DR bit cleared.
from micropython import const

DR_MIN = const(0)
DR_MAX = const(5)
BW_HZ = const(125_000)
CODING_RATE = const(5)  # 4/5, as lora.AsyncModem's "coding_rate" (denominator)
PREAMBLE = const(8)  # RP002 §2.2.2: 8 symbols preamble in EU868
SYNC_WORD = const(0x34)  # LoRaWAN public network sync word (SX126x 0x3444)

# RP002 §2.2.3 table 7: DR -> SF at 125 kHz.
_SF = (12, 11, 10, 9, 8, 7)
# RP002 §2.2.6 table 10 (repeater compatible, no dwell time): max MACPayload M and max
# application payload N (FRMPayload, no FOpts) per DR.
_M = (59, 59, 59, 123, 230, 230)
_N = (51, 51, 51, 115, 222, 222)
# RP002 §2.2.7 table 11: RX1 DR = DR - RX1DROffset, floored at DR0; offsets 0..5.
RX1_DRO_MAX = const(5)
# RP002 §2.2.3 table 8: TXPower 0..7 = MaxEIRP - 2n dB, MaxEIRP 16 dBm.
MAX_EIRP_DBM = const(16)
TX_POWER_MAX_INDEX = const(7)

# Default channels (RP002 §2.2.2): 868.1, 868.3, 868.5 MHz, DR0-5, always on, unchangeable.
DEFAULT_CHANNELS = (868_100_000, 868_300_000, 868_500_000)
N_CHANNELS = const(16)
# RP002 §2.2.7: RX2 869.525 MHz DR0 by default; join-accept delays 5 s / 6 s; RECEIVE_DELAY1
# 1 s (and RX2 at +1 s).
RX2_FREQ = const(869_525_000)
RX2_DR = const(0)
RECEIVE_DELAY1_MS = const(1000)
JOIN_ACCEPT_DELAY1_MS = const(5000)
JOIN_ACCEPT_DELAY2_MS = const(6000)
# LoRaWAN L2 1.0.4 §4.3.1.1: ADR back-off (RP002 §2.2.7 values for EU868).
ADR_ACK_LIMIT = const(64)
ADR_ACK_DELAY = const(32)
# The band where uplink channels may be defined (RP002 §2.2: 863-870 MHz).
FREQ_MIN = const(863_000_000)
FREQ_MAX = const(870_000_000)

# Sub-bands of ETSI EN 300 220 / ERC REC 70-03 annex 1 that RP002 §2.2 lists for EU868, with
# their duty cycle as 1/x: (low Hz, high Hz, 1/dc). g1..g4 are the ones the brief names; the
# 863-865 / 865-868 bands are there for NewChannelReq channels.
BANDS = (
    (868_000_000, 868_600_000, 100),  # g1  1 %   (the three default channels)
    (868_700_000, 869_200_000, 1000),  # g2  0.1 %
    (869_400_000, 869_650_000, 10),  # g3  10 %  (RX2, downlink only here)
    (869_700_000, 870_000_000, 100),  # g4  1 %
    (863_000_000, 865_000_000, 1000),  # 0.1 %
    (865_000_000, 868_000_000, 100),  # 1 %
)
BAND_NAMES = ("g1", "g2", "g3", "g4", "g863", "g865")


def sf(dr):
    return _SF[dr]


def max_payload(dr):
    """Max FRMPayload (N) at dr, with no FOpts."""
    return _N[dr]


def max_mac_payload(dr):
    return _M[dr]


def band_of(freq):
    """Index into BANDS of the sub-band holding freq (Hz), or -1 (not allowed to transmit)."""
    for i in range(len(BANDS)):
        lo, hi, _ = BANDS[i]
        if lo <= freq <= hi:
            return i
    return -1


def rx1_dr(dr, offset):
    d = dr - offset
    return d if d > DR_MIN else DR_MIN


def tx_power_dbm(index):
    return MAX_EIRP_DBM - 2 * index


def datr(dr):
    """The packet forwarder's data-rate string, e.g. "SF7BW125"."""
    return "SF%dBW125" % _SF[dr]


def time_on_air_us(n, sf_, bw_hz=BW_HZ, cr=CODING_RATE, preamble=PREAMBLE, crc=True,
                   explicit=True):
    """LoRa time on air of an n-byte PHY payload, SX1261/2 datasheet rev 2.1 §6.1.4 (the same
    as Semtech AN1200.13): T = Tsym * Nsym, Tsym = 2^SF / BW, low-data-rate optimisation on
    when Tsym >= 16 ms (SF11/SF12 at 125 kHz, as the SX126x drivers set it), and for SF5/SF6
    the SX126x's 2 extra preamble symbols and no +8 bit term.
        Nsym = Npreamble + 4.25 + 8 + ceil(max(8n + 16 CRC - 4 SF + 8 + 20 H, 0)
                                            / (4 (SF - 2 DE))) * CR
    with H = 1 for an explicit header and CR the 4/x denominator (5 for 4/5). Integer
    microseconds (Tsym truncated to whole microseconds, as micropython-lib does)."""
    tsym = 1_000_000 * (1 << sf_) // bw_hz
    de = 1 if tsym >= 16_000 else 0
    if sf_ < 7:
        extra, b8 = 2, 0
    else:
        extra, b8 = 0, 8
    bits = 8 * n + (16 if crc else 0) - 4 * sf_ + b8 + (20 if explicit else 0)
    if bits < 0:
        bits = 0
    bps = 4 * (sf_ - 2 * de)
    x4 = 17 + 4 * (preamble + extra + 8 + ((bits + bps - 1) // bps) * cr)  # symbols x 4
    return tsym * x4 // 4


def time_on_air_ms(n, dr, uplink=True):
    """Time on air in ms (rounded up) of an n-byte PHY payload at dr; downlinks have no CRC
    (L2 1.0.4 §3.2)."""
    return (time_on_air_us(n, _SF[dr], crc=uplink) + 999) // 1000
