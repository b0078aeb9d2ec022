"""Read boot images and Secure Boot state from the machine into measurement inputs.

Files are memory-mapped read-only (mapped.py): a 100 MiB UKI is hashed without being read
into memory.
"""

import contextlib
import struct
from typing import Dict, Optional, Sequence, Tuple

from rhel_cvm_update.boot_events import ImageMeasurement
from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats.authenticode import authenticode_digests
from rhel_cvm_update.formats.pe import PEImage, certificates, section_bytes
from rhel_cvm_update.formats.uki import UKI, is_uki, pe_sbat, shim_sbat_levels
from rhel_cvm_update.mapped import FileIdentity, mapped_file_with_identity
from rhel_cvm_update.signers import certificates_from_pkcs7

WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002
# Variables next boot's PCR7 depends on (the model reads them; the log source compares them).
POLICY_VARIABLE_NAMES = ("SecureBoot", "PK", "KEK", "db", "dbx", "dbt", "SbatLevelRT", "SbatPolicy",
                         "MokSBStateRT", "MokListRT", "MokListXRT")


def shim_vendor_cert(raw: bytes, source: str = "<.vendor_cert>") -> Optional[bytes]:
    """shim's built-in certificate from its .vendor_cert section (cert_table in shim.c:
    authorized size, deauthorized size, authorized offset, deauthorized offset), when it is
    a single DER certificate (VENDOR_CERT_FILE builds; a VENDOR_DB_FILE ESL returns None)."""
    header = struct.Struct("<IIII")
    if len(raw) < header.size:
        raise FormatError(".vendor_cert section is shorter than its header", source=source, offset=0)
    size, _, offset, _ = header.unpack_from(raw, 0)
    if size == 0:
        return None
    if offset + size > len(raw):
        raise FormatError(f"vendor certificate ({size} bytes at {offset:#x}) runs past the section",
                          source=source, offset=8, field="vendor_authorized_offset")
    der = bytes(raw[offset:offset + size])
    return der if der[:1] == b"\x30" else None


ImageDigests = Tuple[Dict[str, bytes], Optional[Dict[str, bytes]]]  # the image's, a UKI's kernel's


class DigestCache:
    """Authenticode digests already computed in this process, by file identity (device,
    inode, size, mtime, ctime) and banks: an update hashes every UKI to find the new ones,
    then measures the new one for its prediction; a 100 MiB UKI is hashed once."""

    def __init__(self) -> None:
        self._digests: Dict[Tuple[FileIdentity, Tuple[str, ...]], ImageDigests] = {}

    def get(self, identity: FileIdentity, banks: Sequence[str], compute) -> ImageDigests:
        key = (identity, tuple(banks))
        if key not in self._digests:
            self._digests[key] = compute()
        return self._digests[key]


@contextlib.contextmanager
def _opened_image(path: str, banks: Sequence[str], cache: Optional[DigestCache]):
    """(mapping, PE, UKI or None, digests) of a PE file, the digests from ``cache`` when it
    has them for this very file."""
    with mapped_file_with_identity(path) as (buf, identity):
        pe = PEImage.parse(buf, path)
        uki = UKI.from_pe(buf, pe) if is_uki(pe) else None

        def compute() -> ImageDigests:
            if uki is not None:
                return uki.authenticode_digests(banks)  # one pass over the file
            return authenticode_digests(buf, banks, source=path, image=pe), None
        yield buf, pe, uki, (cache.get(identity, banks, compute) if cache is not None else compute())


def image_digests(path: str, banks: Sequence[str], cache: Optional[DigestCache] = None) -> ImageDigests:
    """The PCR4 digests of a PE file (and of its kernel, for a UKI), without the rest of a
    measurement (no signature parsing)."""
    with _opened_image(path, banks, cache) as (_, _, _, digests):
        return digests


def measure_image(path: str, banks: Sequence[str], cache: Optional[DigestCache] = None) -> ImageMeasurement:
    with _opened_image(path, banks, cache) as (buf, pe, uki, (authenticode, linux)):
        signatures = tuple(tuple(certificates_from_pkcs7(cert.data, source=f"{path} signature {n}"))
                           for n, cert in enumerate(certificates(buf, pe), 1)
                           if cert.certificate_type == WIN_CERT_TYPE_PKCS_SIGNED_DATA)
        kernel_version = uki.kernel_version if uki is not None else None
        # shim's sections have long names (string table), e.g. "/26" in the header.
        vendor_section = pe.section_by_full_name(".vendor_cert")
        return ImageMeasurement(
            path=path, authenticode=authenticode, linux_authenticode=linux, signatures=signatures,
            sbat_levels=shim_sbat_levels(buf, path, pe), sbat=pe_sbat(buf, pe),
            vendor_cert=shim_vendor_cert(bytes(section_bytes(buf, vendor_section)), f"{path}:.vendor_cert")
            if vendor_section else None,
            kernel_version=kernel_version)


def read_policy_variables(efivarfs) -> Dict[Tuple[str, str], bytes]:
    """The Secure Boot policy variables as efivarfs has them now, keyed (name, guid)."""
    out: Dict[Tuple[str, str], bytes] = {}
    for name, guid in efivarfs.list():
        if name in POLICY_VARIABLE_NAMES:
            var = efivarfs.get(name, guid)
            if var is not None:
                out[(name, str(guid))] = var.data
    return out
