"""Which allowlist certificate verifies a signed EFI image (Secure Boot authority events).

shim and the firmware verify an image against each allowlist entry as a trusted anchor
(OpenSSL PKCS7_verify with a partial chain): an entry verifies the image when it is one of
the certificates the image's PKCS#7 carries, or it issued one of them.  The authority event
in PCR7 names that entry, so "same anchor" means "same PCR7 event".

This module decides anchors from certificates only.  It does not check the PKCS#7
signature over the image digest: an image whose signature is broken does not boot with
Secure Boot on, whatever PCR7 would have been.
"""

from typing import List, Optional, Sequence

from rhel_cvm_update.errors import FormatError


def certificates_from_pkcs7(der: bytes, source: str = "<pkcs7>") -> List[bytes]:
    """DER certificates carried by an Authenticode PKCS#7 SignedData blob."""
    from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

    try:
        certs = pkcs7.load_der_pkcs7_certificates(_der_element(bytes(der)))
    except ValueError as e:
        raise FormatError(f"signature is not a PKCS#7 SignedData: {e}", source=source) from None
    return [c.public_bytes(Encoding.DER) for c in certs]


def _der_element(raw: bytes) -> bytes:
    """The first DER element of ``raw``: WIN_CERTIFICATE data is padded to 8 bytes after
    the PKCS#7 blob, and those zeros are not part of it."""
    if len(raw) < 2 or raw[0] != 0x30:
        return raw
    length = raw[1]
    header = 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or len(raw) < 2 + count:
            return raw
        length = int.from_bytes(raw[2:2 + count], "big")
        header += count
    return raw[:header + length] if header + length <= len(raw) else raw


def _load(der: bytes):
    from cryptography import x509

    try:
        return x509.load_der_x509_certificate(bytes(der))
    except ValueError:
        return None


def certificate_subject(der: bytes) -> Optional[str]:
    """The RFC 4514 subject of a DER certificate, or None when ``der`` is not one."""
    cert = _load(der)
    return None if cert is None else cert.subject.rfc4514_string()


def tbs_sha256(der: bytes) -> Optional[bytes]:
    """SHA-256 of the TBSCertificate, as a dbx EFI_CERT_X509_SHA256 entry names a certificate."""
    import hashlib

    cert = _load(der)
    return None if cert is None else hashlib.sha256(cert.tbs_certificate_bytes).digest()


def _issued_by(cert, issuer) -> bool:
    """Whether ``issuer``'s key signed ``cert`` (name match and signature check)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    if cert.issuer != issuer.subject:
        return False
    key = issuer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                       cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes,
                       ec.ECDSA(cert.signature_hash_algorithm))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def anchor_verifies(anchor_der: bytes, image_certs: Sequence[bytes]) -> bool:
    """Whether the allowlist certificate ``anchor_der`` is a trust anchor for an image
    whose PKCS#7 carries ``image_certs``."""
    if any(bytes(anchor_der) == bytes(c) for c in image_certs):
        return True
    anchor = _load(anchor_der)
    if anchor is None:
        return False
    return any(cert is not None and _issued_by(cert, anchor) for cert in map(_load, image_certs))
