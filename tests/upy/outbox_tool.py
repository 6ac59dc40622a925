# Outbox driver for host-side tests (tests/test_outbox.py), run as a script under micropython:
#   outbox_tool.py write ROOT EPOCH [N]   recover, then append objects of EPOCH (seq 0, 1, ...)
#                                         forever (or N of them), acking and committing every 7th;
#                                         prints "S epoch seq" once an append returned and
#                                         "A epoch cum" once a commit returned True;
#                                         with a 5th argument "noack", never acks
#   outbox_tool.py dump ROOT              recover; print the report, then "P kind epoch seq hex"
#                                         for every pending entry
# Objects are outbox_util.obj(kind, epoch, seq).
import sys
import binascii

from firmware.outbox import Outbox
from outbox_util import obj

CFG = {"capacity_bytes": 256 * 1024, "segment_bytes": 1024, "max_data": 700}


def main(argv):
    ob = Outbox(argv[2], **CFG)
    rep = ob.recover()
    if argv[1] == "dump":
        print("R", rep["entries"], rep["pending"], rep["torn_bytes"], rep["corrupt_regions"])
        for e in ob.pending():
            print("P", e.kind, e.epoch, e.seq, binascii.hexlify(e.data).decode())
        return
    epoch = int(argv[3])
    n = int(argv[4]) if len(argv) > 4 else -1
    acks = not (len(argv) > 5 and argv[5] == "noack")
    print("READY")
    seq = 0
    while seq != n:
        kind = 0 if seq == 0 else 1
        ob.append(kind, epoch, seq, obj(kind, epoch, seq))
        print("S", epoch, seq)
        if acks and seq % 7 == 6:
            ob.mark_acked(epoch, seq - 3)
            if ob.commit():
                print("A", epoch, seq - 3)
        seq += 1
    ob.close()
    print("DONE", ob.info()["bytes"])


main(sys.argv)
