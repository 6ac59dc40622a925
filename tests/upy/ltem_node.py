# The module's whole delivery path on the unix port, for tests/test_server_e2e.py:
#   STSAFE-A110 (the emulator, over the I2C bridge) -> firmware/epoch, seal, checkpoint
#   -> firmware/outbox -> firmware/link -> drivers/radio/ltem -> Mosquitto -> serene server
#   -> sealed acks -> firmware/ack -> the outbox drained.
#
#   micropython ltem_node.py CONFIG.json
#
# CONFIG: the chip's keys as for seal_node.py ("port", "mac_key", "cipher_key", "device_id",
# "counter_zone", "server_key": [zone, offset], "cert_zone", "fast"), "radio": LtemRadio keyword
# arguments (device_id, host, port, user, password, ...), "dir": the outbox directory,
# "records": how many records to seal, "every_n": checkpoint period, "timeout_s".
# Prints "SEALED {json}" once everything is in the outbox, then "DONE {json}" when the outbox
# is empty (every object acknowledged by the server) or the time-out passed.
import asyncio
import json
import sys
import time
from binascii import unhexlify

from drivers.radio.ltem import LtemRadio
from drivers.stsafe import STSAFE
from drivers.unix.i2c_bridge import SocketI2C
from firmware import ack, epoch, signed
from firmware.cbor import Encoder
from firmware.checkpoint import Checkpointer
from firmware.link import Cum2Acks, Link
from firmware.outbox import Outbox

K_EPOCH, K_RECORD, K_CHECKPOINT = 0, 1, 2


def status_record(enc, seq):
    # firmware/record.py labels: 0 kind (1 = status), 1 seq, -3 time, 2 rate, 3 volume.
    enc.reset()
    enc.map(5)
    enc.uint(0)
    enc.uint(1)
    enc.uint(1)
    enc.uint(seq)
    enc.int(-3)
    enc.uint(1_700_000_000 + seq)
    enc.uint(2)
    enc.uint(1000 + seq)
    enc.uint(3)
    enc.uint(250 * seq)
    return enc.view()


async def main():
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    if cfg.get("fast"):
        import drivers.stsafe.commands as c

        c.WAIT_MS = (0,) * len(c.WAIT_MS)
    i2c = SocketI2C("127.0.0.1", cfg["port"])
    se = STSAFE(i2c, host_mac_key=unhexlify(cfg["mac_key"]),
                host_cipher_key=unhexlify(cfg["cipher_key"]))
    await se.init()
    zone, off = cfg["server_key"]
    server_pub = await se.read(zone, off, 65)
    cert = await se.read_certificate(cfg["cert_zone"])

    ep = await epoch.start(se, cfg["device_id"].encode(), server_pub, cfg["counter_zone"])
    cp = Checkpointer(ep, cfg.get("every_n", 10), 600_000)
    acks = ack.Acks(ep.opener)
    ob = Outbox(cfg["dir"], 256 * 1024, segment_bytes=4096, max_data=1024)
    ob.recover()
    ob.append(K_EPOCH, ep.number, 0, ep.record(signed.unprotected_x5chain(cert)))
    out = bytearray(128)
    enc = Encoder(bytearray(64))
    for _ in range(cfg["records"]):
        seq = ep.next_seq()
        n = ep.sealer.seal(seq, status_record(enc, seq), out, False)
        sealed = bytes(out[:n])
        ob.append(K_RECORD, ep.number, seq, sealed)
        cp.add(seq, sealed)
        if cp.due():
            cseq = ep.next_seq()
            p, obj = await cp.checkpoint(se, cseq)
            ob.append(K_CHECKPOINT, ep.number, cseq, obj)
            cp.commit(cseq, p)
    if cp.count:
        cseq = ep.next_seq()
        p, obj = await cp.checkpoint(se, cseq)
        ob.append(K_CHECKPOINT, ep.number, cseq, obj)
        cp.commit(cseq, p)
    objects = sum(1 for _ in ob.pending())
    print("SEALED " + json.dumps({"epoch": ep.number, "objects": objects}))

    rc = cfg["radio"]
    args = [rc.pop(k) for k in ("device_id", "host", "port", "user", "password")]
    radio = LtemRadio(*args, **rc)
    link = Link(ob, radio, Cum2Acks(acks), rto_ms=1000, rto_max_ms=4000)
    tasks = [asyncio.create_task(radio.run()), asyncio.create_task(link.run())]
    t0 = time.ticks_ms()
    deadline = time.ticks_add(t0, int(cfg.get("timeout_s", 30) * 1000))
    while next(ob.pending(), None) is not None:
        if time.ticks_diff(deadline, time.ticks_ms()) <= 0:
            break
        await asyncio.sleep_ms(20)
    left = sum(1 for _ in ob.pending())
    dt = time.ticks_diff(time.ticks_ms(), t0)
    for t in tasks:
        t.cancel()
    await asyncio.sleep_ms(20)
    print("DONE " + json.dumps({"left": left, "ms": dt, "link": link.stats,
                                "radio": radio.stats, "acks": acks.counts}))


asyncio.run(main())
