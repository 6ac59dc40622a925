"""Server-side verifier of the module's uplink objects, and sealer of its acks.

Independent implementation (cbor2, pycose, cryptography) of docs/wire-format.md; it never
imports firmware code. The ingest builds one Verifier and calls it for every object:

    from serene.verifier import Verifier, VerifyError

    v = Verifier(server_key, ca_cert, registry={"SRN-0001": cert_der})
    v = from_home(home)     # the same from a `serene provision` directory
    # server_key: cryptography EllipticCurvePrivateKey (P-256), the server's static key
    # ca_cert:    x509.Certificate or DER/PEM bytes of the manufacturer CA
    # registry:   device id -> registered device certificate (DER/PEM bytes or x509)

    res = v.verify_object(device_id, obj, epoch=None)   # -> Opened, or raises VerifyError
        # res.kind == "epoch":      epoch record verified (cert chain, ES256 signature),
        #                           keys derived and kept: records of res.epoch can now open
        # res.kind == "record":     res.epoch, res.seq, res.plaintext (the record's CBOR)
        # res.kind == "checkpoint": res.first_seq, res.count, res.chain (signature checked)
        # `epoch` is the epoch named by the frame that carried a sealed object without kid.
    v.check_checkpoint(res, stored)   # stored: {seq: sealed bytes} of that epoch, as stored;
                                      # raises VerifyError("checkpoint mismatch") if altered
    ack = v.seal_ack(device_id, acked_epoch, cum, bitmap, piv=piv)   # bytes to send down
        # sealed under the ACKED epoch's ack key (contract E); the caller gives a Partial IV
        # never used under that key (the ingest: (tick << 4) | worker_id, persisted)
    v.check_epoch_number(device_id, epoch)   # contract F, applied by verify_object to an
        # unknown epoch record: "epoch out of range" unless within max_epoch_step
    protocol.ack_from_seqs(received_seqs) -> (cum, bitmap)
    protocol.classify(obj) -> "sealed" | "signed"

Finer calls: accept_epoch(device_id, obj) -> EpochContext, open_record(device_id, obj,
epoch=None) -> (epoch, seq, plaintext), verify_checkpoint(device_id, obj) -> Opened,
current_epoch(device_id), epoch(device_id, e) -> EpochContext. After a restart, feed the
stored epoch records to accept_epoch() again to re-derive the keys.

Every rejection is VerifyError(reason, detail); reasons (stable, for counters): truncated,
bad header, bad cbor, bad payload, bad signature, bad certificate, bad ephemeral key,
unknown device, wrong device, unknown epoch, other epoch, epoch conflict, epoch out of
range, forged, checkpoint mismatch. protocol.canonical(obj, epoch) gives a sealed object's
canonical form (no kid; contract A); checkpoints and epoch records must be v2 (with prev).
"""

from . import protocol
from .protocol import VerifyError
from .verifier import EpochContext, Opened, Verifier, from_home, load_pem_key

__all__ = [
    "Verifier", "VerifyError", "EpochContext", "Opened", "from_home", "load_pem_key", "protocol"
]
