"""Throwaway X.509 certificates for signer tests (EC P-256: fast to make)."""

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID


def make_cert(common_name: str, issuer=None):
    """Returns (certificate, private key); self-signed unless issuer=(cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = datetime.datetime(2025, 1, 1)
    cert = (x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_cert.subject if issuer_cert else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(issuer_key, hashes.SHA256()))
    return cert, key


def der(cert) -> bytes:
    return cert.public_bytes(Encoding.DER)
