"""Device certificates: the chain to the manufacturer CA, checked by `cryptography`'s X.509
path validation (cryptography.x509.verification, the RFC 5280 / CA/B Forum profile it
implements), plus what our profile adds on top. docs/stsafe.md says how they are issued.

    checker = DeviceCertChecker(ca_cert)
    checker.check("SRN-0001", cert, now, registered=True)   # or VerifyError("bad certificate")

A device certificate is accepted when:
- it chains to the CA (the only trust anchor; no intermediates) and `now` is in its validity
  period, as the client verifier (build_client_verifier) decides: signature, basicConstraints
  cA not asserted, subjectAltName present, extendedKeyUsage, if present, with clientAuth, the
  CA's own constraints and key usage, no unknown critical extension;
- keyUsage is present, critical, with digitalSignature and neither keyAgreement nor
  keyCertSign / cRLSign (the factory key only signs: its STSAFE mode is 0x0004);
- its key is P-256;
- its subjectAltName holds the URI urn:serene:device:<device id>; for a device that is not in
  the registry, the subject CN is the device id as well.
"""

from __future__ import annotations

import datetime
import re

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification as xv

from .protocol import VerifyError

DEVICE_URI_PREFIX = "urn:serene:device:"
_CONTEXT = re.compile(r"\s*\(encountered processing .*\)$", re.S)


def device_uri(device_id: str) -> str:
    """The subjectAltName URI that names a device (an RFC 8141 style URN of ours)."""
    return DEVICE_URI_PREFIX + device_id


def load_certificate(c) -> x509.Certificate:
    """A certificate from an x509.Certificate, PEM bytes or DER bytes (ValueError if none)."""
    if isinstance(c, x509.Certificate):
        return c
    c = bytes(c)
    if c.startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(c)
    return x509.load_der_x509_certificate(c)


def _key_usage(policy, cert, ku) -> None:
    # Called by the verifier with the leaf's keyUsage (required present and critical).
    if not ku.digital_signature:
        raise ValueError("keyUsage lacks digitalSignature")
    if ku.key_agreement or ku.key_cert_sign or ku.crl_sign:
        raise ValueError("keyUsage allows more than signing")


def _ee_policy() -> xv.ExtensionPolicy:
    return xv.ExtensionPolicy.webpki_defaults_ee().require_present(
        x509.KeyUsage, xv.Criticality.CRITICAL, _key_usage
    )


class DeviceCertChecker:
    def __init__(self, ca_cert):
        self.ca = load_certificate(ca_cert)
        self._store = xv.Store([self.ca])
        self._ee = _ee_policy()
        self._ca_policy = xv.ExtensionPolicy.webpki_defaults_ca()

    def check(
        self,
        device_id: str,
        cert: x509.Certificate,
        now: datetime.datetime,
        registered: bool,
    ) -> None:
        """Raise VerifyError("bad certificate", reason) unless `cert` is a valid device
        certificate for `device_id` at `now` (see the module docstring)."""
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise VerifyError(
                "bad certificate", "no subjectAltName (an old-style certificate: re-provision)"
            ) from None
        except ValueError as e:  # a malformed extension
            raise VerifyError("bad certificate", f"extensions: {e}") from None
        verifier = (
            xv.PolicyBuilder()
            .store(self._store)
            .time(now)
            .max_chain_depth(0)  # device certificate -> CA, nothing in between
            .extension_policies(ca_policy=self._ca_policy, ee_policy=self._ee)
            .build_client_verifier()
        )
        try:
            verifier.verify(cert, [])
        except xv.VerificationError as e:
            why = _CONTEXT.sub("", str(e)).removeprefix("validation failed: ")
            raise VerifyError("bad certificate", f"chain to the CA refused: {why}") from None
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise VerifyError("bad certificate", "not a P-256 key")
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if device_uri(device_id) not in uris:
            raise VerifyError(
                "bad certificate", f"subjectAltName does not name {device_uri(device_id)}"
            )
        if not registered:
            cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            if len(cns) != 1 or cns[0].value != device_id:
                raise VerifyError("bad certificate", "subject CN is not the device id")
