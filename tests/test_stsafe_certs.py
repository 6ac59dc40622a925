"""Device and CA certificates as provisioning issues them, checked by `cryptography`'s own X.509
path validation (a standard verifier, not ours) and by the server's check
(serene.verifier.certs, which builds on it): what passes, and what is refused with which
reason (issue 8, item 7)."""

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification as xv
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from serene.stsafe import provision as prov
from serene.verifier.certs import DeviceCertChecker, device_uri
from serene.verifier.protocol import VerifyError
from serene.verifier.verifier import Verifier

DEV = "SRN-0001"


def now():
    return datetime.datetime.now(datetime.timezone.utc)


SIGN_ONLY = x509.KeyUsage(True, False, False, False, False, False, False, False, False)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp("home")
    prov.provision(h, [DEV, "SRN-0002"])
    return h


def _pem(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki(home):
    ca = _pem(home / "ca" / "ca.crt.pem")
    ca_key = serialization.load_pem_private_key((home / "ca" / "ca.key.pem").read_bytes(), None)
    dev = _pem(home / "devices" / DEV / "device.crt.pem")
    return ca, ca_key, dev


def refused(checker, cert, device_id=DEV, registered=True):
    with pytest.raises(VerifyError) as e:
        checker.check(device_id, cert, now(), registered)
    assert e.value.reason == "bad certificate"
    return e.value.detail


def test_a_standard_client_verifier_accepts_the_device_certificate(pki):
    ca, _, dev = pki
    # cryptography's verifier with its default (CA/B Forum, RFC 5280) policy, nothing of ours.
    verifier = xv.PolicyBuilder().store(xv.Store([ca])).time(now()).build_client_verifier()
    got = verifier.verify(dev, [])
    assert got.chain == [dev, ca]
    assert got.subjects == [x509.UniformResourceIdentifier("urn:serene:device:" + DEV)]
    ext = dev.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_agreement
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == (
        ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert dev.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEV
    # The CA: CA:TRUE pathlen 0 (critical), keyCertSign + cRLSign only.
    cbc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert cbc.critical and cbc.value.ca and cbc.value.path_length == 0
    cku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert cku.critical and cku.value.key_cert_sign and cku.value.crl_sign
    assert not cku.value.digital_signature
    # And our check passes it, registered or not (CN = device id too).
    checker = DeviceCertChecker(ca)
    checker.check(DEV, dev, now(), registered=True)
    checker.check(DEV, dev, now(), registered=False)


def _issue(ca, ca_key, pub, *, cn=DEV, san=DEV, ca_flag=False, usage=SIGN_ONLY,
           eku=(ExtendedKeyUsageOID.CLIENT_AUTH,), not_before=None):  # fmt: skip
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now() - datetime.timedelta(days=1))
        .not_valid_after(prov.NO_EXPIRY)
        .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_uri(san))]),
            critical=False,
        )
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def test_what_is_refused_and_why(pki):
    ca, ca_key, dev = pki
    checker = DeviceCertChecker(ca)
    pub = dev.public_key()
    # The control: the same helper with nothing wrong passes (so each refusal below is
    # about the one thing changed).
    checker.check(DEV, _issue(ca, ca_key, pub), now(), registered=False)
    # An old-style certificate (as provisioning issued them before: no SAN, no EKU).
    old = prov._issue(ca_key, ca, DEV, pub, prov.NO_EXPIRY, SIGN_ONLY, "00")
    assert "no subjectAltName" in refused(checker, old)
    # Signed by another CA (same subject, same key, same extensions).
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = prov._ca_cert(other_key)
    assert other_ca.subject == ca.subject
    rogue = _issue(other_ca, other_key, pub)
    assert "chain to the CA refused" in refused(checker, rogue)
    # A CA-flagged device certificate.
    assert "basicConstraints.cA must not be asserted" in refused(
        checker, _issue(ca, ca_key, pub, ca_flag=True)
    )
    # Key agreement allowed, or no keyUsage at all: the factory key only signs.
    agree = x509.KeyUsage(True, False, False, False, True, False, False, False, False)
    assert "keyUsage allows more than signing" in refused(checker, _issue(ca, ca_key, pub,
                                                                           usage=agree))
    # A server-auth-only EKU.
    assert "EKU" in refused(checker, _issue(ca, ca_key, pub, eku=(ExtendedKeyUsageOID.
                                                                    SERVER_AUTH,)))
    # Another device's name in the SAN; for an unregistered device, another CN.
    assert "does not name urn:serene:device:SRN-0001" in refused(
        checker, _issue(ca, ca_key, pub, san="SRN-0002")
    )
    assert "CN is not the device id" in refused(
        checker, _issue(ca, ca_key, pub, cn="SRN-0002"), registered=False
    )
    # Not a P-256 key.
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    assert "not a P-256 key" in refused(checker, _issue(ca, ca_key, p384))
    # Not yet valid.
    later = _issue(ca, ca_key, pub, not_before=now() + datetime.timedelta(days=2))
    assert "chain to the CA refused" in refused(checker, later)


def test_the_server_refuses_a_registry_with_an_old_style_certificate(home, pki):
    ca, ca_key, dev = pki
    server_key = serialization.load_pem_private_key(
        (home / "server" / "server.key.pem").read_bytes(), None
    )
    Verifier(server_key, ca, registry={DEV: dev})  # the provisioned one: fine
    old = prov._issue(ca_key, ca, DEV, dev.public_key(), prov.NO_EXPIRY, SIGN_ONLY, "00")
    with pytest.raises(VerifyError) as e:
        Verifier(server_key, ca, registry={DEV: old})
    assert e.value.reason == "bad certificate" and "no subjectAltName" in e.value.detail


def test_provisioning_refuses_a_home_with_old_style_certificates(tmp_path):
    prov.provision(tmp_path, [DEV])
    d = tmp_path / "devices" / DEV
    ca = _pem(tmp_path / "ca" / "ca.crt.pem")
    ca_key = serialization.load_pem_private_key(
        (tmp_path / "ca" / "ca.key.pem").read_bytes(), None
    )
    cert = _pem(d / "device.crt.pem")
    old = prov._issue(ca_key, ca, DEV, cert.public_key(), prov.NO_EXPIRY, SIGN_ONLY, "00")
    (d / "device.crt.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(prov.ProvisionError, match=r"older format \(it has no subjectAltName\)"
                       r" and is locked in the chip: re-provision"):  # fmt: skip
        prov.provision(tmp_path, [DEV])
