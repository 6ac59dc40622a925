# Prints the firmware's time on air (drivers/lorawan/eu868.time_on_air_us) for the cases on
# stdin, one "sf bw_hz cr preamble n crc explicit" per line -> one integer (us) per line.
import sys
from drivers.lorawan.eu868 import time_on_air_us

for line in sys.stdin:
    f = line.split()
    if not f:
        continue
    sf, bw, cr, pre, n, crc, ex = [int(x) for x in f]
    print(time_on_air_us(n, sf, bw, cr, pre, bool(crc), bool(ex)))
