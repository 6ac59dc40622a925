# The firmware's side of docs/wire-format.md's worked example: reads the example's inputs
# (JSON file) and prints, as one JSON object, what the firmware computes from them. Keys
# named as in the example are compared with it; "checks" holds the other results (acks
# opened, refusals) that tests/test_seal_wire_doc.py compares with what the document says.
#   micropython seal_doc.py EXAMPLE.json
# and the firmware's side of docs/link-format.md's example: fills an outbox at ROOT with the
# objects of OBJECTS.json ({"mtu": n, "objects": [[kind, epoch, seq, hex], ...]}) and prints
# every frame firmware/link.py builds from it (no acks, no loss), one hex line each.
#   micropython seal_doc.py link ROOT OBJECTS.json
import hashlib
import json
import sys
from binascii import hexlify, unhexlify

from firmware import ack, epoch, seal, signed
from firmware.checkpoint import Checkpointer
from firmware.link import Cum2Acks


def h(b):
    return hexlify(b).decode()


def reason(fn, *args):
    try:
        fn(*args)
    except (ack.AckError, seal.SealError) as e:
        return e.reason
    return None


def main():
    with open(sys.argv[1]) as f:
        ex = json.load(f)
    u = lambda k: unhexlify(ex[k])  # noqa: E731
    dev = ex["device_id"].encode()
    ep = ex["epoch"]
    out = {}
    checks = {}
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
    out["Q_eph2_c"] = h(epoch.compress_point(u("Q_eph2")))

    # 8.2 sealed records (canonical form: no kid), and the kid form
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

    # 8.3 epoch record v2, prev null
    payload = epoch.epoch_payload(dev, ep, u("Q_eph_c"))
    out["epoch_payload"] = h(payload)
    out["epoch_payload_hash"] = h(hashlib.sha256(payload).digest())
    out["epoch_digest"] = h(signed.sig_structure_digest(payload))
    unprot = signed.unprotected_x5t(b"example certificate DER")
    out["epoch_record"] = h(signed.encode(payload, u("epoch_record")[-64:], unprot))

    # 8.4 checkpoint v2: the first of the epoch links to the epoch record's payload
    class Ep:
        device_id = dev
        number = ep

    Ep.payload = payload
    cp = Checkpointer(Ep(), 16, 60000)
    cp.add(1, u("sealed"))
    cp.add(2, u("sealed2"))
    p = cp.payload(3)
    cp.commit(3, p)
    out["cp_payload"] = h(p)
    out["cp_payload_hash"] = h(hashlib.sha256(p).digest())
    out["checkpoint"] = h(signed.encode(p, u("checkpoint")[-64:]))
    checks["next_first_seq"] = cp.first_seq  # tiling: the next interval starts at seq 4
    checks["next_prev"] = h(cp.prev)  # and links to checkpoint 3

    # 8.5 the next epoch's record names checkpoint 3 as epoch 999999's closing checkpoint
    p2 = epoch.epoch_payload(dev, ex["epoch2"], u("Q_eph2_c"), prev=(ep, 3, cp.prev))
    out["epoch2_payload"] = h(p2)
    out["epoch2_record"] = h(signed.encode(p2, u("epoch2_record")[-64:], unprot))

    # 8.6 the ack, opened with the key of the epoch it acknowledges
    acks = ack.EpochAcks()
    acks.add(ack.Acks(seal.Opener(ak, aiv, dev, ep)))
    a = u("ack")
    checks["ack_open"] = list(acks.open(a))
    checks["ack_piv"] = acks.by_epoch[ep].last_piv
    checks["ack_again"] = reason(acks.open, a)
    other = bytearray(a)
    other[6:10] = ex["epoch2"].to_bytes(4, "big")
    checks["ack_other_epoch"] = reason(acks.open, bytes(other))
    forged = bytearray(a)
    forged[-1] ^= 1
    checks["ack_forged"] = reason(acks.open, bytes(forged))
    cum, bitmap = checks["ack_open"][1:]
    checks["ack_covers"] = [ack.acked(cum, bitmap, q) for q in range(6)]
    link_acks = Cum2Acks(ack.Acks(seal.Opener(ak, aiv, dev, ep)))
    checks["ack_link_form"] = list(link_acks.open(a))

    # 3.4: the header rules (the module applies them to acks)
    sealed = u("sealed")
    bad = {
        "reserved_bit": bytes([sealed[0] | 0x20]) + sealed[1:],
        "kid_context": bytes([sealed[0] | 0x10]) + sealed[1:],
        "non_minimal_piv": b"\x02\x00" + sealed[1:],
        "piv_length_0": b"\x00" + sealed[1:],
        "piv_length_6": b"\x06" + sealed[1:],
        "truncated": sealed[:9],
    }
    checks["header_rejects"] = {k: reason(seal.parse_header, v) for k, v in bad.items()}
    out["checks"] = checks
    print(json.dumps(out))


class _Radio:
    def __init__(self, mtu):
        self.mtu = mtu

    def is_up(self):
        return True

    def time_on_air_ms(self, n):
        return 0


class _NoAcks:
    def open(self, payload):
        raise ValueError("no acks here")


def link_main(root, path):
    from firmware.link import Link
    from firmware.outbox import Outbox

    with open(path) as f:
        spec = json.load(f)
    ob = Outbox(root, 256 * 1024, segment_bytes=2048, max_data=1024)
    ob.recover()
    for kind, ep, seq, data in spec["objects"]:
        ob.append(kind, ep, seq, unhexlify(data))
    radio = _Radio(spec["mtu"])
    radio.asks_acks = spec.get("asks", False)  # a LoRa-like radio: the link asks for acks
    link = Link(ob, radio, _NoAcks(), window=1000)
    while True:
        f = link.build_frame(radio, 0)
        if f is None:
            break
        print(h(f))


if sys.argv[1] == "link":
    link_main(sys.argv[2], sys.argv[3])
else:
    main()
