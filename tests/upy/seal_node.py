# The module's sealing side, driven by a host test: the real STSAFE driver over the I2C bridge
# (the emulator on the host), firmware/epoch, seal, checkpoint and ack.
#
#   micropython seal_node.py CONFIG.json
#
# CONFIG: {"port", "mac_key", "cipher_key" (hex), "device_id", "counter_zone",
#          "server_key": [zone, offset], "cert_zone", "cert": "x5t" | "x5chain" | "none",
#          "every_n", "every_ms", "fast": bool, "ops": [op, ...] or absent}
# Ops come from CONFIG["ops"], else one JSON object per stdin line; one JSON line out each:
#   {"op": "start"[, "cert": mode]}     -> {"epoch": n, "record": hex}
#   {"op": "seal", "pt": hex, "kid": b} -> {"seq": s, "sealed": hex[, "cp_seq", "checkpoint"]}
#   {"op": "checkpoint"}                -> {"cp_seq", "checkpoint"} (forced, if anything to sign)
#   {"op": "ack", "frame": hex}         -> {"ack": [epoch, cum, bitmap]} | {"err": reason}
#   {"op": "ackflip", "frame": hex}     -> every single-bit flip of frame: {"accepted": n,
#                                          "reasons": {reason: count}}
#   {"op": "quit"}
# "fast": the emulator runs with time_scale 0 (answers at once), so the driver's fixed
# per-command waits are set to 0; the driver still polls NACKs as on the board.
import asyncio
import json
import sys
from binascii import hexlify, unhexlify

from drivers.stsafe import STSAFE
from drivers.unix.i2c_bridge import SocketI2C
from firmware import ack, epoch, signed
from firmware.checkpoint import Checkpointer
from firmware.seal import OVERHEAD_MAX


def _h(b):
    return hexlify(b).decode()


class Node:
    def __init__(self, cfg):
        self.cfg = cfg
        self.ep = None
        self.cp = None
        self.acks = None
        self.out = bytearray(512)

    async def setup(self):
        cfg = self.cfg
        if cfg.get("fast"):
            import drivers.stsafe.commands as c

            c.WAIT_MS = (0,) * len(c.WAIT_MS)
        i2c = SocketI2C("127.0.0.1", cfg["port"])
        # Small request/reply writes: without TCP_NODELAY, Nagle + delayed ACK cost ~20 ms a
        # transfer on loopback (the bridge is a bench artefact, not the board's bus).
        self.se = STSAFE(i2c,
                         host_mac_key=unhexlify(cfg["mac_key"]),
                         host_cipher_key=unhexlify(cfg["cipher_key"]))
        await self.se.init()
        zone, off = cfg["server_key"]
        self.server_pub = await self.se.read(zone, off, 65)
        self.cert = await self.se.read_certificate(cfg["cert_zone"])

    async def op(self, o):
        k = o["op"]
        if k == "start":
            self.ep = await epoch.start(self.se, self.cfg["device_id"].encode(), self.server_pub,
                                        self.cfg["counter_zone"])
            self.cp = Checkpointer(self.ep, self.cfg.get("every_n", 10),
                                   self.cfg.get("every_ms", 600000))
            self.acks = ack.Acks(self.ep.opener)
            mode = o.get("cert", self.cfg.get("cert", "x5t"))
            if mode == "x5chain":
                u = signed.unprotected_x5chain(self.cert)
            elif mode == "x5t":
                u = signed.unprotected_x5t(self.cert)
            else:
                u = signed.UNPROTECTED_EMPTY
            return {"epoch": self.ep.number, "record": _h(self.ep.record(u))}
        if k == "seal":
            pt = unhexlify(o["pt"])
            seq = self.ep.next_seq()
            n = self.ep.sealer.seal(seq, pt, self.out, o.get("kid", False))
            if n > len(pt) + OVERHEAD_MAX:
                raise AssertionError("overhead")
            sealed = bytes(self.out[:n])
            self.cp.add(seq, sealed)
            res = {"seq": seq, "sealed": _h(sealed)}
            if self.cp.due():
                res.update(await self.checkpoint())
            return res
        if k == "checkpoint":
            return await self.checkpoint() if self.cp.count else {}
        if k == "ack":
            try:
                return {"ack": list(self.acks.open(unhexlify(o["frame"])))}
            except ack.AckError as e:
                return {"err": e.reason}
        if k == "ackflip":
            frame = bytearray(unhexlify(o["frame"]))
            accepted = 0
            before = dict(self.acks.counts)
            for i in range(len(frame) * 8):
                frame[i >> 3] ^= 1 << (i & 7)
                try:
                    self.acks.open(frame)
                    accepted += 1
                except ack.AckError:
                    pass
                frame[i >> 3] ^= 1 << (i & 7)
            reasons = {}
            for r in ack.REASONS:
                if self.acks.counts[r] != before[r]:
                    reasons[r] = self.acks.counts[r] - before[r]
            return {"accepted": accepted, "reasons": reasons}
        raise ValueError(k)

    async def checkpoint(self):
        seq = self.ep.next_seq()
        p, obj = await self.cp.checkpoint(self.se, seq)
        self.cp.commit(seq, p)
        return {"cp_seq": seq, "checkpoint": _h(obj)}


def _emit(d):
    print(json.dumps(d))


async def main():
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    node = Node(cfg)
    await node.setup()
    ops = cfg.get("ops")
    if ops is not None:
        for o in ops:
            _emit(await node.op(o))
        return
    _emit({"ready": True})
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        o = json.loads(line)
        if o["op"] == "quit":
            return
        _emit(await node.op(o))


asyncio.run(main())
