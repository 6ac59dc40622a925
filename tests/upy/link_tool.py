# Frames built by firmware/link.py for host-side tests (tests/test_link.py), as a script:
#   link_tool.py ROOT MTU EPOCH:COUNT [EPOCH:COUNT ...]
# fills an outbox at ROOT with, per epoch, the epoch record (600 B, seq 0), then records with a
# checkpoint every 10th seq (objects are outbox_util.obj), then prints every frame the link
# builds (no acks, no loss) as one hex line each.
import sys
import binascii

from firmware.link import Link
from firmware.outbox import Outbox
from link_sim import FakeOpener, Sim, SimRadio
from outbox_util import obj


def main(argv):
    ob = Outbox(argv[1], 256 * 1024, segment_bytes=2048, max_data=1024)
    ob.recover()
    for spec in argv[3:]:
        epoch, count = [int(x) for x in spec.split(":")]
        for seq in range(count):
            kind = 0 if seq == 0 else (2 if seq % 10 == 0 else 1)
            ob.append(kind, epoch, seq, obj(kind, epoch, seq))
    sim = Sim()
    radio = SimRadio("r", int(argv[2]), sim)
    link = Link(ob, radio, FakeOpener(), window=1000)
    while True:
        f = link.build_frame(radio, 0)
        if f is None:
            break
        print(binascii.hexlify(f).decode())


main(sys.argv)
