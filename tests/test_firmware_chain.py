"""The whole firmware (from .mpy, unix port) closes its chain of proof (issue 8 protocol note,
sections C and D), checked from the host with the verifier's own chain function
(tools/serene/verifier/protocol.py chain_hash: an independent implementation) on the outbox
files the firmware left on its flash:

- after a SIGKILL mid-epoch (a power cut), the next boot stores a tail checkpoint for the
  previous epoch covering exactly the objects after its last checkpoint, above every seq of
  that epoch, linked to that checkpoint; the new epoch record names it;
- at a clean shutdown the epoch's last object is its closing checkpoint, named by the
  epoch_end state file;
- every checkpoint tiles the epoch and links to the signed object before it.
No server runs: nothing is acknowledged, so the whole log stays on flash."""

import hashlib
import json
import signal
import struct
import zlib

import cbor2
from cryptography.hazmat.primitives import serialization

from serene.bench import Chain, FirmwareProcess
from serene.pumpsim import PumpSimulator
from serene.verifier.protocol import chain_hash, derive_keys, ecdh

KIND_EPOCH, KIND_RECORD, KIND_CHECKPOINT, KIND_EVENT = 0, 1, 2, 3


def read_outbox(root):
    """[(kind, epoch, seq, data)] of every entry of the outbox segments, in log order
    (docs: firmware/outbox.py header: magic 0xB1, kind, len u16, epoch u32, seq u32, data,
    crc32, little-endian)."""
    out = []
    for seg in sorted(root.glob("*.seg")):
        raw = seg.read_bytes()
        off = 0
        while off + 16 <= len(raw):
            magic, kind, n, epoch, seq = struct.unpack_from("<BBHII", raw, off)
            assert magic == 0xB1, (seg, off)
            data = raw[off + 12:off + 12 + n]
            (crc,) = struct.unpack_from("<I", raw, off + 12 + n)
            assert zlib.crc32(raw[off:off + 12 + n]) == crc, (seg, off)
            out.append((kind, epoch, seq, data))
            off += 16 + n
    return out


def payload(data):
    tag = cbor2.loads(data)
    assert tag.tag == 18
    return tag.value[2]


def checkpoints(entries, number):
    """Checks tiling, links and chains of epoch `number`; returns [(seq, fields, raw)]."""
    objs = [e for e in entries if e[1] == number]
    assert objs[0][0] == KIND_EPOCH and objs[0][2] == 0
    prev_raw, prev_seq, sealed, out = payload(objs[0][3]), 0, [], []
    for kind, _, seq, data in objs[1:]:
        if kind == KIND_CHECKPOINT:
            raw = payload(data)
            f = cbor2.loads(raw)
            assert f[0] == 2 and f[2] == number and f[3] == seq and len(f) == 8, f
            assert f[4] == prev_seq + 1, ("tiles", seq, f[4], prev_seq)
            assert f[7] == hashlib.sha256(prev_raw).digest(), ("links", seq)
            assert f[5] == len(sealed) and f[6] == chain_hash(sealed), ("chain", seq)
            out.append((seq, f, raw))
            prev_raw, prev_seq, sealed = raw, seq, []
        else:
            sealed.append((seq, data))
    return out


def test_power_cut_tail_checkpoint_and_closing_checkpoint_at_shutdown(tmp_path, mpy_dir):
    sim = PumpSimulator(scenario="normal-feed", speed=10.0)
    sim.start()
    try:
        with Chain(tmp_path, checkpoint_every=4, se_time_scale=0.25, server=False) as chain:
            flash = tmp_path / "flash"
            cfg = {"board": "unix", "pump_device": sim.device_path, "poll_period_ms": 100,
                   "status_every_s": 0, "health_period_s": 1, "data_dir": str(flash)}
            cfg.update(chain.module_config())
            path = tmp_path / "module.json"
            path.write_text(json.dumps(cfg))
            fw = FirmwareProcess(mpy_dir, path)
            # until a checkpoint and at least one record after it are durable
            assert fw.wait_for(lambda: len(fw.sealed()) >= 9 and fw.sealed()[-1][1] % 5, 60), \
                fw.text()[-20:]
            fw.stop(signal.SIGKILL)
            e1 = fw.epochs()[0]
            before = read_outbox(flash / "outbox")
            cfg.update(run_for_s=1, drain_s=0)
            path.write_text(json.dumps(cfg))
            fw2 = FirmwareProcess(mpy_dir, path)
            assert fw2.wait(120) == 0, "\n".join(fw2.text()[-30:])
            e2 = fw2.epochs()[0]
            after = read_outbox(flash / "outbox")
            end = (flash / "epoch_end").read_bytes()
            server_key = serialization.load_pem_private_key(
                (chain.home / "server" / "server.key.pem").read_bytes(), None)
    finally:
        sim.stop()
    old = [e for e in before if e[1] == e1]
    last_cp = [e for e in old if e[0] == KIND_CHECKPOINT][-1]
    open_tail = [(s, d) for k, _, s, d in old if k in (KIND_RECORD, KIND_EVENT) and s > last_cp[2]]
    assert open_tail, "the kill came right after a checkpoint"
    cps1 = checkpoints(after, e1)
    tail_seq, tail, tail_raw = cps1[-1]
    assert tail_seq == max(e[2] for e in old) + 1  # above every seq of the epoch
    assert tail[4] == last_cp[2] + 1 and tail[5] == len(open_tail)
    assert tail[6] == chain_hash(open_tail)  # exactly the objects after the last checkpoint
    assert tail[7] == hashlib.sha256(payload(last_cp[3])).digest()
    rec2 = cbor2.loads(payload([e for e in after if e[1] == e2 and e[0] == KIND_EPOCH][0][3]))
    assert rec2[5] == [e1, tail_seq, hashlib.sha256(tail_raw).digest()], rec2
    cps2 = checkpoints(after, e2)
    last2 = [e for e in after if e[1] == e2][-1]
    assert last2[0] == KIND_CHECKPOINT and last2[2] == cps2[-1][0]  # closed at shutdown
    assert end[:4] == b"SEE1" and struct.unpack_from("<II", end, 4) == (e2, cps2[-1][0])
    assert end[12:44] == hashlib.sha256(cps2[-1][2]).digest()
    assert any("I app: shutdown: epoch %d closed" % e2 in ln for ln in fw2.text())
    # The ack keys (derived here as the server does, from its static key and the epoch
    # records) are on flash only wrapped by the secure element: one 40-byte envelope for each
    # epoch still in the outbox, and the plain bytes in no file.
    files = [p.read_bytes() for p in flash.rglob("*") if p.is_file()]
    for number in (e1, e2):
        rec = cbor2.loads(payload([e for e in after if e[1] == number and e[0] == KIND_EPOCH][0][3]))
        k = derive_keys(ecdh(server_key, rec[4]), rec[1], number)
        assert len((flash / "keys" / ("%d.env" % number)).read_bytes()) == 40
        for raw in files:
            assert k.ack_key not in raw and k.ack_iv not in raw and k.record_key not in raw
