# The firmware's side of docs/wire-format.md's worked example: reads the example's inputs
# (JSON file) and prints, as one JSON object, what the firmware computes from them.
#   micropython seal_doc.py EXAMPLE.json
import json
import sys
from binascii import hexlify, unhexlify

from firmware import ack, epoch, seal, signed
from firmware.checkpoint import Checkpointer


def h(b):
    return hexlify(b).decode()


def main():
    with open(sys.argv[1]) as f:
        ex = json.load(f)
    u = lambda k: unhexlify(ex[k])  # noqa: E731
    dev = ex["device_id"].encode()
    ep = ex["epoch"]
    out = {}
    for name, sender, recipient, bits, label in (
        ("ctx_rk", dev, epoch.SERVER_IDENTITY, 128, b"key"),
        ("ctx_riv", dev, epoch.SERVER_IDENTITY, 104, b"iv"),
        ("ctx_ak", epoch.SERVER_IDENTITY, dev, 128, b"key"),
        ("ctx_aiv", epoch.SERVER_IDENTITY, dev, 104, b"iv"),
    ):
        out[name] = h(epoch.kdf_context(sender, recipient, ep, bits, label))
    rk, riv, ak, aiv = epoch.derive_keys(u("Z"), dev, ep)
    out.update(record_key=h(rk), record_iv=h(riv), ack_key=h(ak), ack_iv=h(aiv))
    out["Q_eph_c"] = h(epoch.compress_point(u("Q_eph")))
    s = seal.Sealer(rk, riv, dev, ep)
    la = s._prepare(1)
    out["enc_structure"] = h(s._aad[:la])
    out["nonce"] = h(s._nonce)
    out["kid"] = h(s.kid)
    buf = bytearray(128)
    n = s.seal(1, u("plaintext"), buf)
    out["sealed"] = h(buf[:n])
    n = seal.Sealer(rk, riv, dev, ep).seal(1, u("plaintext"), buf, kid=True)
    out["sealed_kid"] = h(buf[:n])
    n = s.seal(2, u("plaintext2"), buf)
    out["sealed2"] = h(buf[:n])
    payload = epoch.epoch_payload(dev, ep, u("Q_eph_c"))
    out["epoch_payload"] = h(payload)
    out["epoch_digest"] = h(signed.sig_structure_digest(payload))
    unprot = signed.unprotected_x5t(b"example certificate DER")
    out["epoch_record"] = h(signed.encode(payload, u("epoch_record")[-64:], unprot))

    class Ep:
        device_id = dev
        number = ep

    Ep.payload = payload  # the first checkpoint links to the epoch record

    cp = Checkpointer(Ep(), 16, 60000)
    cp.add(1, u("sealed"))
    cp.add(2, u("sealed2"))
    p = cp.payload(3)
    cp.commit(3, p)
    out["cp_payload"] = h(p)
    out["checkpoint"] = h(signed.encode(p, u("checkpoint")[-64:]))
    acks = ack.Acks(seal.Opener(ak, aiv, dev, ep))
    out["ack_open"] = list(acks.open(u("ack")))
    print(json.dumps(out))


main()
