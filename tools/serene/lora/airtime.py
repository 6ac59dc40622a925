"""LoRa time on air, host side (an independent implementation of the Semtech formula).

SX1261/2 datasheet rev 2.1 §6.1.4 (also Semtech AN1200.13 "LoRa Modem Designer's Guide"):

    Tsym = 2**SF / BW
    Npayload = 8 + max(ceil((8 PL - 4 SF + 28 + 16 CRC - 20 IH) / (4 (SF - 2 DE))) * (CR + 4), 0)
    ToA = (Npreamble + 4.25 + Npayload) * Tsym

with IH = 1 for an implicit header, DE = 1 (low data rate optimisation) when Tsym >= 16 ms,
CR = 1..4 for 4/5..4/8. For SF5/SF6 the SX126x adds 2 preamble symbols and drops the "+8" bits
(datasheet §6.1.4 second formula). Computed in exact fractions, then rounded down to whole
microseconds as the modem drivers report it.
"""

from fractions import Fraction
import math


def symbol_time_us(sf, bw_hz):
    return 1_000_000 * (2**sf) // bw_hz


def n_symbols(pl, sf, bw_hz=125_000, cr=1, preamble=8, crc=True, explicit=True):
    """Number of symbols (a Fraction: .25 from the preamble)."""
    tsym_us = symbol_time_us(sf, bw_hz)
    de = 1 if tsym_us >= 16_000 else 0
    ih = 0 if explicit else 1
    if sf >= 7:
        num = 8 * pl - 4 * sf + 28 + 16 * int(crc) - 20 * ih
        extra = 0
    else:
        num = 8 * pl - 4 * sf + 20 + 16 * int(crc) - 20 * ih
        extra = 2
    npay = 8 + max(math.ceil(Fraction(num, 4 * (sf - 2 * de))) * (cr + 4), 0)
    return preamble + extra + Fraction(17, 4) + npay


def time_on_air_us(pl, sf, bw_hz=125_000, cr=1, preamble=8, crc=True, explicit=True):
    n = n_symbols(pl, sf, bw_hz, cr, preamble, crc, explicit)
    return int(n * symbol_time_us(sf, bw_hz))


def time_on_air_ms(pl, sf, bw_hz=125_000, crc=True):
    """Rounded up to whole ms (what the duty-cycle accounting charges)."""
    return -(-time_on_air_us(pl, sf, bw_hz, crc=crc) // 1000)
