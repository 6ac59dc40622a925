"""The server's side of the protocol, with state: trusted CA, server key, registered device
certificates and the epochs seen. Thread-compatible, not thread-safe (one ingest thread)."""

from __future__ import annotations

import dataclasses
import datetime
import warnings
from typing import Mapping

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from . import certs
from . import protocol as p
from .protocol import VerifyError


@dataclasses.dataclass
class EpochContext:
    """What the server keeps per (device, epoch). `next_ack_piv` is the Partial IV of the
    next ack sealed under this epoch's ack key: it must never go back, so an ingest that
    restarts restores it from storage (set it before sealing)."""

    device_id: str
    epoch: int
    keys: p.EpochKeys
    ephemeral: bytes
    record: bytes
    next_ack_piv: int = 0
    #: v2 epoch record: (prev_epoch, end_seq, end_hash) of the epoch before, or None
    prev: tuple | None = None
    payload_hash: bytes = b""


@dataclasses.dataclass(frozen=True)
class Opened:
    """Result of verify_object(). kind: "epoch", "record" or "checkpoint"."""

    kind: str
    device_id: str
    epoch: int
    seq: int
    plaintext: bytes | None = None  # records
    first_seq: int | None = None  # checkpoints: covers first_seq <= s < seq
    count: int | None = None
    chain: bytes | None = None
    signed: p.Signed | None = None
    prev: bytes | None = None  # checkpoints: SHA-256 of the previous signed payload

    @property
    def payload_hash(self) -> bytes | None:
        return None if self.signed is None else self.signed.payload_hash


def _dev_bytes(device_id: str) -> bytes:
    return device_id.encode()


def _load_cert(c) -> x509.Certificate:
    return certs.load_certificate(c)


class Verifier:
    """server_key: the server's static P-256 private key (ECDH with the modules' ephemeral
    keys). ca_cert: the manufacturer CA that signs device certificates. registry: device id
    -> device certificate (DER/PEM bytes or x509.Certificate) registered at provisioning;
    a device not in it is accepted only if `accept_unregistered` and its epoch record carries
    a certificate that chains to the CA with the device id as subject common name."""

    def __init__(
        self,
        server_key: ec.EllipticCurvePrivateKey,
        ca_cert,
        registry: Mapping[str, object] | None = None,
        accept_unregistered: bool = False,
        clock=None,
        max_epoch_step: int = 1000,
        first_epochs: Mapping[str, int] | None = None,
    ):
        if not isinstance(server_key, ec.EllipticCurvePrivateKey) or not isinstance(
            server_key.curve, ec.SECP256R1
        ):
            raise ValueError("server key must be a P-256 private key")
        self.server_key = server_key
        self.ca = _load_cert(ca_cert)
        self.accept_unregistered = accept_unregistered
        self._clock = clock or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self.certs: dict[str, x509.Certificate] = {}
        self.epochs: dict[tuple[str, int], EpochContext] = {}
        #: contract F: an unknown epoch is accepted only within this step of the highest one
        self.max_epoch_step = max_epoch_step
        #: device -> the first epoch its counter can give (registry "first_epoch")
        self.first_epochs: dict[str, int] = dict(first_epochs or {})
        self._highest: dict[str, int] = {}
        self._named_prev: set[tuple[str, int]] = set()
        for dev, cert in (registry or {}).items():
            c = _load_cert(cert)
            self._check_cert(dev, c, registered=True)
            self.certs[dev] = c

    # ---- certificates -------------------------------------------------------------------

    def _check_cert(self, device_id: str, cert: x509.Certificate, registered: bool) -> None:
        # cryptography's X.509 path validation plus our profile (certs.py): chain to the CA,
        # validity, basicConstraints, keyUsage, SAN naming the device, P-256; CN if unknown.
        checker = getattr(self, "_cert_checker", None)
        if checker is None or checker.ca is not self.ca:
            checker = self._cert_checker = certs.DeviceCertChecker(self.ca)
        checker.check(device_id, cert, self._clock(), registered)

    def _device_cert(self, device_id: str, s: p.Signed) -> x509.Certificate:
        known = self.certs.get(device_id)
        u = s.unprotected
        # Strict: nothing in the unprotected bucket but the one certificate parameter, so
        # that no bit of an epoch record can change without the record being refused.
        if len(u) > 1 or (u and next(iter(u)) not in (p.HDR_X5CHAIN, p.HDR_X5T)):
            raise VerifyError("bad header", f"unprotected parameters {sorted(u, key=str)}")
        if p.HDR_X5CHAIN in u:
            der = u[p.HDR_X5CHAIN]
            if isinstance(der, (list, tuple)) and len(der) == 1:
                der = der[0]
            if not isinstance(der, bytes):
                raise VerifyError("bad header", "x5chain is not one certificate")
            try:
                with warnings.catch_warnings():  # e.g. a corrupted serial number
                    warnings.simplefilter("ignore")
                    cert = x509.load_der_x509_certificate(der)
            except (ValueError, x509.InvalidVersion) as e:
                raise VerifyError("bad certificate", str(e)) from None
            if known is not None:
                if cert != known:
                    raise VerifyError("bad certificate", "not the registered certificate")
                return known
            if not self.accept_unregistered:
                raise VerifyError("unknown device", device_id)
            self._check_cert(device_id, cert, registered=False)
            self.certs[device_id] = cert
            return cert
        if known is None:
            raise VerifyError("unknown device", f"{device_id}: no registered certificate")
        if p.HDR_X5T in u:
            t = u[p.HDR_X5T]
            der = known.public_bytes(Encoding.DER)
            if not (
                isinstance(t, (list, tuple))
                and len(t) == 2
                and t[0] == p.X5T_SHA256_64
                and t[1] == p.x5t(der)
            ):
                raise VerifyError("bad certificate", "x5t does not name the registered cert")
        return known

    # ---- objects --------------------------------------------------------------------------

    def _signed_for(self, device_id: str, obj: bytes) -> p.Signed:
        s = p.parse_signed(obj)
        if s.device_id != _dev_bytes(device_id):
            raise VerifyError("wrong device", f"payload names {s.device_id!r}")
        return s

    def accept_epoch(self, device_id: str, obj: bytes) -> EpochContext:
        """Verify an epoch record (certificate chain to the CA, ES256 signature, payload),
        derive the epoch's keys with the server key and remember them. Idempotent for the
        same bytes or a copy differing only in the unprotected bucket (certificate by value
        or by reference); a different record for a known (device, epoch) is rejected."""
        s = self._signed_for(device_id, obj)
        if s.type != p.TYPE_EPOCH:
            raise VerifyError("bad payload", "not an epoch record")
        pub, prev = p.epoch_fields(s)
        old = self.epochs.get((device_id, s.epoch))
        if old is not None and p.parse_signed(old.record).payload != s.payload:
            # Refused whatever its signature: no verification work for it.
            raise VerifyError("epoch conflict", f"epoch {s.epoch} already announced")
        cert = self._device_cert(device_id, s)
        p.verify_signed(s, cert.public_key())  # first: a bad signature costs no chain check
        # Every epoch record's certificate is checked (registered devices too: validity,
        # chain, constraints), not only when a device is first seen.
        self._check_cert(device_id, cert, registered=True)
        if len(pub) != 33 or pub[0] not in (2, 3):
            raise VerifyError("bad ephemeral key", "not a compressed P-256 point")
        if old is not None:
            return old
        z = p.ecdh(self.server_key, pub)
        ctx = EpochContext(
            device_id=device_id,
            epoch=s.epoch,
            keys=p.derive_keys(z, _dev_bytes(device_id), s.epoch),
            ephemeral=pub,
            record=bytes(obj),
            prev=prev,
            payload_hash=s.payload_hash,
        )
        self.epochs[(device_id, s.epoch)] = ctx
        self._highest[device_id] = max(self._highest.get(device_id, -1), s.epoch)
        if prev is not None:
            self._named_prev.add((device_id, prev[0]))
        return ctx

    def check_epoch_number(self, device_id: str, epoch: int) -> None:
        """Contract F: may an UNKNOWN epoch of this device be accepted? Above the highest
        verified epoch by at most max_epoch_step; with none verified yet, within
        max_epoch_step of the registry's first_epoch (any, when the registry has none);
        or named as prev by an epoch record already verified (an older one arriving
        late). VerifyError("epoch out of range") otherwise."""
        if (device_id, epoch) in self.epochs or (device_id, epoch) in self._named_prev:
            return
        top = self._highest.get(device_id)
        step = self.max_epoch_step
        if top is not None:
            if top < epoch <= top + step:
                return
            raise VerifyError("epoch out of range",
                              f"epoch {epoch}, highest verified {top}, step {step}")
        first = self.first_epochs.get(device_id)
        if first is None or first <= epoch <= first + step:
            return
        raise VerifyError("epoch out of range", f"epoch {epoch}, first epoch {first}, "
                                                f"step {step}")

    def epoch(self, device_id: str, epoch: int) -> EpochContext:
        ctx = self.epochs.get((device_id, epoch))
        if ctx is None:
            raise VerifyError("unknown epoch", f"{device_id} epoch {epoch}")
        return ctx

    def current_epoch(self, device_id: str) -> int | None:
        """The device's newest known epoch (epoch numbers only go up: the largest)."""
        known = [e for (d, e) in self.epochs if d == device_id]
        top = self._highest.get(device_id)
        return top if top is not None else (max(known) if known else None)

    def open_record(self, device_id: str, obj: bytes, epoch: int | None = None):
        """Open a sealed object. `epoch` comes from the frame that carried it, or from the
        object's kid. Returns (epoch, seq, plaintext)."""
        s = p.parse_sealed(obj)
        if s.kid is not None:
            kid_epoch = int.from_bytes(s.kid, "big")
            if epoch is not None and epoch != kid_epoch:
                raise VerifyError("other epoch", f"kid {kid_epoch}, frame {epoch}")
            epoch = kid_epoch
        if epoch is None:
            raise VerifyError("unknown epoch", "no kid and no epoch from the frame")
        ctx = self.epoch(device_id, epoch)
        if s.piv == 0:
            raise VerifyError("bad header", "seq 0 is the epoch record, never sealed")
        seq, pt = p.open_sealed(
            obj, ctx.keys.record_key, ctx.keys.record_iv, _dev_bytes(device_id), epoch
        )
        return epoch, seq, pt

    def verify_checkpoint(self, device_id: str, obj: bytes) -> Opened:
        """Check a checkpoint's signature and payload (not yet the records it covers: see
        check_checkpoint). Its epoch must be known (its record verified)."""
        s = self._signed_for(device_id, obj)
        if s.type != p.TYPE_CHECKPOINT:
            raise VerifyError("bad payload", "not a checkpoint")
        self.epoch(device_id, s.epoch)
        if s.unprotected:
            raise VerifyError("bad header", "a checkpoint has an empty unprotected bucket")
        first, count, chain = p.checkpoint_fields(s)
        prev = p.checkpoint_prev(s)
        if prev is None:
            raise VerifyError("bad payload", "checkpoint v1 (no prev): v2 is required")
        p.verify_signed(s, self.certs[device_id].public_key())
        return Opened("checkpoint", device_id, s.epoch, s.seq, None, first, count, chain, s,
                      prev)

    @staticmethod
    def check_checkpoint(cp: Opened, stored: Mapping[int, bytes]) -> None:
        """Prove stored objects (seq -> sealed bytes, of the checkpoint's epoch) are exactly
        what the module sealed in the checkpoint's range, or raise VerifyError."""
        p.check_chain(cp.signed, stored)

    def verify_object(self, device_id: str, obj: bytes, epoch: int | None = None) -> Opened:
        """Any uplink object: epoch record, sealed record/event, or checkpoint."""
        if p.classify(obj) == "sealed":
            ep, seq, pt = self.open_record(device_id, obj, epoch)
            return Opened("record", device_id, ep, seq, pt)
        s = p.parse_signed(obj)
        if s.type == p.TYPE_EPOCH:
            self.check_epoch_number(device_id, s.epoch)
            ctx = self.accept_epoch(device_id, obj)
            return Opened("epoch", device_id, ctx.epoch, 0, signed=s)
        if s.type == p.TYPE_CHECKPOINT:
            return self.verify_checkpoint(device_id, obj)
        raise VerifyError("bad payload", f"unknown signed object type {s.type}")

    def seal_ack(
        self,
        device_id: str,
        acked_epoch: int,
        cum: int,
        bitmap: int,
        epoch: int | None = None,
        piv: int | None = None,
    ) -> bytes:
        """Seal an ack of (acked_epoch, cum, bitmap) under the ack key of `epoch` (default:
        the acked epoch itself, contract E), with the kid and Partial IV `piv` (default:
        the context's next_ack_piv, which then moves on). The caller that passes `piv`
        guarantees it was never used under that key (ingest: (tick << 4) | worker)."""
        if epoch is None:
            epoch = acked_epoch
        ctx = self.epoch(device_id, epoch)
        if piv is None:
            piv = ctx.next_ack_piv
        obj = p.seal(
            p.ack_plaintext(acked_epoch, cum, bitmap),
            piv,
            ctx.keys.ack_key,
            ctx.keys.ack_iv,
            _dev_bytes(device_id),
            epoch,
            with_kid=True,
        )
        ctx.next_ack_piv = max(ctx.next_ack_piv, piv + 1)
        return obj


def load_pem_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(data, None)


__all__ = ["Verifier", "EpochContext", "Opened", "VerifyError", "load_pem_key", "from_home"]


def from_home(home, accept_unregistered: bool = False) -> Verifier:
    """A Verifier from a provisioning directory (serene.stsafe.provision layout):
    server/server.key.pem, ca/ca.crt.pem and registry.json's device certificates."""
    import json
    import pathlib

    home = pathlib.Path(home)
    key = load_pem_key((home / "server" / "server.key.pem").read_bytes())
    ca = (home / "ca" / "ca.crt.pem").read_bytes()
    reg_path = home / "registry.json"
    registry = {}
    first_epochs = {}
    if reg_path.exists():
        reg = json.loads(reg_path.read_text())
        for dev, entry in reg.get("devices", {}).items():
            registry[dev] = entry["certificate"].encode()
            if isinstance(entry.get("first_epoch"), int):
                first_epochs[dev] = entry["first_epoch"]
    return Verifier(key, ca, registry, accept_unregistered=accept_unregistered,
                    first_epochs=first_epochs)
