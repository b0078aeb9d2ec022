"""Which allowlist entries a Secure Boot verifier logs in PCR7 for an image (the authority rule).

Both prediction sources ask this module, so they cannot disagree about it.  An image's
signatures are taken in certificate-table order, each with the certificates its PKCS#7
carries (``ImageMeasurement.signatures``).

The firmware (edk2 DxeImageVerificationLib, ``DxeImageVerificationHandler``), for an image
with signatures, walks them in table order; for each one:
  1. a dbx certificate that anchors it, or a dbx ``EFI_CERT_X509_SHA256`` hash of one of its
     certificates, refuses the whole image (the loop stops there);
  2. while no signature has verified yet, the first db certificate (db order) that anchors it
     verifies the image and is logged;
  3. the image's SHA-256 Authenticode digest in dbx refuses the image; in db it verifies the
     image and that db entry is logged.
An image with no signature is verified by its hash alone (dbx first, then db).

shim (verify.c ``verify_buffer_authenticode``) for the image it loads: its hash in dbx or
MokListX refuses it; its hash in db, then in MokListRT, verifies it (logged); otherwise every
signature in table order: a signature that dbx or MokListX revokes is skipped, the others are
checked against db, then MokList, then shim's built-in certificate ("Shim"), and each one
that verifies logs its entry.  A verifier logs an entry at most once (both keep a list of
what they measured), so the result is deduplicated.

The event data is what each verifier measures: ``UefiVariableData(guid, name, entry)`` with
the EFI_SIGNATURE_DATA (owner GUID + data) of a db/MokListRT entry, or the raw DER of shim's
built-in certificate.
"""

import dataclasses
from typing import List, Mapping, Optional, Sequence, Tuple

from rhel_cvm_update.errors import FormatError, PredictionError
from rhel_cvm_update.formats.efi import (EFI_CERT_SHA256_GUID, EFI_CERT_X509_GUID, EFI_CERT_X509_SHA256_GUID,
                                         EFI_IMAGE_SECURITY_DATABASE_GUID, SHIM_LOCK_GUID, SignatureData,
                                         UefiVariableData, parse_signature_lists)
from rhel_cvm_update.signers import anchor_verifies, certificate_subject, tbs_sha256

EfiVars = Mapping[Tuple[str, str], bytes]  # (name, guid string) -> data, as efivarfs has it


class ImageRefusedError(PredictionError):
    """The verifier would refuse to start the image: nothing can be sealed for that boot."""

    kind = "image-refused"


@dataclasses.dataclass(frozen=True)
class Authority:
    """One EV_EFI_VARIABLE_AUTHORITY event: the variable record and why it is logged."""

    record: UefiVariableData
    reason: str

    def describe(self) -> str:
        return describe_record(self.record)


@dataclasses.dataclass(frozen=True)
class SecureBootDatabases:
    """The lists a verifier consults.  ``mok`` is MokListRT as efivarfs shows it; the
    entry that equals shim's built-in certificate (the addend shim mirrors into it) is
    dropped by ``shim_authorities``, which checks that certificate itself as "Shim"."""

    db: Tuple[SignatureData, ...] = ()
    dbx: Tuple[SignatureData, ...] = ()
    mok: Tuple[SignatureData, ...] = ()
    mokx: Tuple[SignatureData, ...] = ()

    @classmethod
    def from_efivars(cls, efivars: EfiVars) -> "SecureBootDatabases":
        return cls(db=_entries(efivars, "db", EFI_IMAGE_SECURITY_DATABASE_GUID),
                   dbx=_entries(efivars, "dbx", EFI_IMAGE_SECURITY_DATABASE_GUID),
                   mok=_entries(efivars, "MokListRT", SHIM_LOCK_GUID),
                   mokx=_entries(efivars, "MokListXRT", SHIM_LOCK_GUID))


def _entries(efivars: EfiVars, name: str, guid) -> Tuple[SignatureData, ...]:
    raw = efivars.get((name, str(guid)))
    if not raw:
        return ()
    try:
        return tuple(parse_signature_lists(raw, source=f"efivar {name}"))
    except FormatError as e:
        raise PredictionError(f"cannot read {name}: {e}") from None


def describe_record(record: UefiVariableData) -> str:
    """'db certificate CN=...' or 'db SHA-256 hash 0123...' for messages."""
    der = record.data if record.name == "Shim" else record.data[16:]
    subject = certificate_subject(der)
    if subject is not None:
        return f"{record.name} certificate '{subject}'"
    return f"{record.name} entry {record.data[16:].hex()[:16]}... (a hash)"


def _record(name: str, guid, entry: SignatureData) -> UefiVariableData:
    return UefiVariableData(guid, name, entry.to_bytes())


def _revoking_entry(certs: Sequence[bytes], denylist: Sequence[SignatureData]) -> Optional[SignatureData]:
    """The denylist entry that revokes a signature carrying ``certs``, if any."""
    hashes = {tbs_sha256(c) for c in certs} - {None}
    for entry in denylist:
        if entry.signature_type == EFI_CERT_X509_GUID and anchor_verifies(entry.data, certs):
            return entry
        if entry.signature_type == EFI_CERT_X509_SHA256_GUID and entry.data[:32] in hashes:
            return entry
    return None


def _hash_entry(entries: Sequence[SignatureData], image) -> Optional[SignatureData]:
    digest = image.authenticode.get("sha256")
    return next((e for e in entries if e.signature_type == EFI_CERT_SHA256_GUID and e.data == digest), None)


def _cert_entry(entries: Sequence[SignatureData], certs: Sequence[bytes]) -> Optional[SignatureData]:
    return next((e for e in entries if e.signature_type == EFI_CERT_X509_GUID
                 and anchor_verifies(e.data, certs)), None)


def _add(found: List[Authority], record: UefiVariableData, reason: str) -> None:
    if all(a.record != record for a in found):  # each verifier measures an entry once
        found.append(Authority(record, reason))


def firmware_authorities(image, dbs: SecureBootDatabases) -> List[Authority]:
    """The db entries edk2 logs when it verifies ``image`` (shim); raises ImageRefusedError
    when it would not start it."""
    found: List[Authority] = []
    verified = False
    for number, certs in enumerate(image.signatures or [()], 1):
        if image.signatures:
            revoked = _revoking_entry(certs, dbs.dbx)
            if revoked is not None:
                raise ImageRefusedError(
                    f"the firmware would refuse {image.path}: dbx revokes its signature {number} "
                    f"({describe_record(_record('dbx', EFI_IMAGE_SECURITY_DATABASE_GUID, revoked))})")
            if not verified:
                entry = _cert_entry(dbs.db, certs)
                if entry is not None:
                    verified = True
                    _add(found, _record("db", EFI_IMAGE_SECURITY_DATABASE_GUID, entry),
                         f"the db certificate that verifies signature {number} of {image.path}")
        if _hash_entry(dbs.dbx, image) is not None:
            raise ImageRefusedError(f"the firmware would refuse {image.path}: dbx lists its hash")
        entry = _hash_entry(dbs.db, image)
        if entry is not None:
            verified = True
            _add(found, _record("db", EFI_IMAGE_SECURITY_DATABASE_GUID, entry),
                 f"db lists the hash of {image.path}")
    if not verified:
        raise ImageRefusedError(
            f"Secure Boot is on, but no db entry admits {image.path} "
            f"({_signature_summary(image)}): the firmware would refuse it")
    return found


def shim_authorities(image, dbs: SecureBootDatabases, vendor_cert: Optional[bytes],
                     shim_path: str = "shim") -> List[Authority]:
    """The entries shim logs when it verifies ``image`` (the UKI); raises ImageRefusedError
    when shim would not start it."""
    if _hash_entry(dbs.dbx, image) is not None or _hash_entry(dbs.mokx, image) is not None:
        raise ImageRefusedError(f"{shim_path} would refuse {image.path}: dbx or MokListX lists its hash")
    mok = [e for e in dbs.mok if vendor_cert is None or e.data != vendor_cert]
    for name, guid, entries in (("db", EFI_IMAGE_SECURITY_DATABASE_GUID, dbs.db),
                                ("MokListRT", SHIM_LOCK_GUID, mok)):
        entry = _hash_entry(entries, image)
        if entry is not None:
            return [Authority(_record(name, guid, entry), f"{name} lists the hash of {image.path}")]
    found: List[Authority] = []
    denylist = dbs.dbx + dbs.mokx
    for number, certs in enumerate(image.signatures, 1):
        if _revoking_entry(certs, denylist) is not None:
            continue  # shim skips a revoked signature; another one may still verify the image
        for name, guid, entries in (("db", EFI_IMAGE_SECURITY_DATABASE_GUID, dbs.db),
                                    ("MokListRT", SHIM_LOCK_GUID, mok)):
            entry = _cert_entry(entries, certs)
            if entry is not None:
                _add(found, _record(name, guid, entry),
                     f"the {name} certificate that verifies signature {number} of {image.path}")
                break
        else:
            if vendor_cert is not None and anchor_verifies(vendor_cert, certs):
                _add(found, UefiVariableData(SHIM_LOCK_GUID, "Shim", vendor_cert),
                     f"{shim_path}'s built-in certificate verifies signature {number} of {image.path}")
    if not found:
        raise ImageRefusedError(
            f"Secure Boot is on, but neither db, MokList nor {shim_path}'s built-in certificate "
            f"admits {image.path} ({_signature_summary(image)}): shim would refuse to boot it")
    return found


def _signature_summary(image) -> str:
    if not image.signatures:
        return "it is unsigned"
    return "signed with " + "; ".join(
        " + ".join(f"'{certificate_subject(c) or '?'}'" for c in certs) or "no certificate"
        for certs in image.signatures)
