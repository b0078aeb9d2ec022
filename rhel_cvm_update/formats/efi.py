"""UEFI basics shared by every format: GUIDs, UCS-2 strings, variable records, signature lists.

GUIDs are stored on disk in the EFI mixed-endian layout, which is ``uuid.UUID.bytes_le``.
"""

import dataclasses
import struct
import uuid
from typing import List, Tuple

from rhel_cvm_update.errors import FormatError

EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE_GUID = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
SHIM_LOCK_GUID = uuid.UUID("605dab50-e046-4300-abb6-3dd810dd8b23")
EFI_CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_SHA256_GUID = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")
# dbx: SHA-256 of a certificate's TBSCertificate (+ revocation time), revoking that certificate.
EFI_CERT_X509_SHA256_GUID = uuid.UUID("3bd2a492-96c0-4079-b420-fcf98ef103ed")

# Which GUID each Secure Boot variable lives under (UEFI 2.10 section 3.3 and 32.6).
SECURE_BOOT_VARIABLE_GUIDS = {
    "SecureBoot": EFI_GLOBAL_VARIABLE,
    "PK": EFI_GLOBAL_VARIABLE,
    "KEK": EFI_GLOBAL_VARIABLE,
    "db": EFI_IMAGE_SECURITY_DATABASE_GUID,
    "dbx": EFI_IMAGE_SECURITY_DATABASE_GUID,
    "dbt": EFI_IMAGE_SECURITY_DATABASE_GUID,
}


def read_guid(buf: bytes, offset: int, source: str = "<bytes>", field: str = "guid") -> uuid.UUID:
    if offset < 0 or offset + 16 > len(buf):
        raise FormatError("GUID runs past the end of the data", source=source, offset=offset, field=field)
    return uuid.UUID(bytes_le=bytes(buf[offset:offset + 16]))


def decode_ucs2(raw: bytes, source: str = "<bytes>", offset: int = 0, field: str = "string") -> str:
    """UCS-2LE text without a terminator.  Surrogates are refused: UEFI strings are UCS-2."""
    if len(raw) % 2:
        raise FormatError("UCS-2 string has an odd byte length", source=source, offset=offset, field=field)
    try:
        text = bytes(raw).decode("utf-16-le")
    except UnicodeDecodeError as e:
        raise FormatError(f"not UCS-2 text ({e.reason})", source=source, offset=offset + e.start,
                          field=field) from None
    if any(0xD800 <= ord(c) <= 0xDFFF or ord(c) > 0xFFFF for c in text):
        raise FormatError("character outside UCS-2", source=source, offset=offset, field=field)
    return text


def read_ucs2z(buf: bytes, offset: int, end: int, source: str = "<bytes>",
               field: str = "string") -> Tuple[str, int]:
    """A NUL-terminated UCS-2LE string starting at offset, before end.  Returns (text, next offset)."""
    pos = offset
    while pos + 1 < end:
        if buf[pos] == 0 and buf[pos + 1] == 0:
            return decode_ucs2(buf[offset:pos], source, offset, field), pos + 2
        pos += 2
    raise FormatError("string has no NUL terminator", source=source, offset=offset, field=field)


def encode_ucs2(text: str, terminate: bool = True) -> bytes:
    if any(ord(c) > 0xFFFF or 0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise ValueError(f"{text!r} has characters outside UCS-2")
    return text.encode("utf-16-le") + (b"\0\0" if terminate else b"")


@dataclasses.dataclass(frozen=True)
class UefiVariableData:
    """UEFI_VARIABLE_DATA (TCG PFP) and shim's identical EFI_VARIABLE_DATA_TREE.

    The digest of PCR7 (and PCR1) variable events is the hash of these bytes."""

    guid: uuid.UUID
    name: str
    data: bytes

    HEADER = struct.Struct("<16sQQ")

    @classmethod
    def from_bytes(cls, buf: bytes, source: str = "<bytes>", offset: int = 0) -> "UefiVariableData":
        if len(buf) < cls.HEADER.size:
            raise FormatError(f"UEFI_VARIABLE_DATA needs {cls.HEADER.size} bytes, has {len(buf)}",
                              source=source, offset=offset)
        guid_raw, name_len, data_len = cls.HEADER.unpack_from(buf, 0)
        name_end = cls.HEADER.size + 2 * name_len
        if name_end > len(buf) or name_end + data_len != len(buf):
            raise FormatError(f"name length {name_len} and data length {data_len} do not fill "
                              f"the {len(buf)}-byte record", source=source, offset=offset,
                              field="UnicodeNameLength")
        name = decode_ucs2(buf[cls.HEADER.size:name_end], source, offset + cls.HEADER.size,
                           "UnicodeName")
        return cls(uuid.UUID(bytes_le=guid_raw), name, bytes(buf[name_end:]))

    def to_bytes(self) -> bytes:
        return (self.HEADER.pack(self.guid.bytes_le, len(self.name), len(self.data))
                + encode_ucs2(self.name, terminate=False) + self.data)


@dataclasses.dataclass(frozen=True)
class SignatureData:
    """One EFI_SIGNATURE_DATA of an EFI_SIGNATURE_LIST (db, dbx, MokList...)."""

    signature_type: uuid.UUID
    owner: uuid.UUID
    data: bytes

    def to_bytes(self) -> bytes:
        """EFI_SIGNATURE_DATA as measured in an EV_EFI_VARIABLE_AUTHORITY event: owner || data."""
        return self.owner.bytes_le + self.data


def parse_signature_lists(buf: bytes, source: str = "<bytes>") -> List[SignatureData]:
    """The concatenated EFI_SIGNATURE_LISTs of db/dbx/KEK/PK/MokList (UEFI 2.10 section 32.4.1)."""
    header = struct.Struct("<16sIII")
    out: List[SignatureData] = []
    pos = 0
    while pos < len(buf):
        if pos + header.size > len(buf):
            raise FormatError("truncated EFI_SIGNATURE_LIST header", source=source, offset=pos)
        type_raw, list_size, header_size, sig_size = header.unpack_from(buf, pos)
        body = pos + header.size + header_size
        if list_size < header.size + header_size or pos + list_size > len(buf):
            raise FormatError(f"SignatureListSize {list_size} does not fit", source=source,
                              offset=pos, field="SignatureListSize")
        if sig_size < 16 or (list_size - header.size - header_size) % sig_size:
            raise FormatError(f"SignatureSize {sig_size} does not divide the list", source=source,
                              offset=pos, field="SignatureSize")
        sig_type = uuid.UUID(bytes_le=type_raw)
        for entry in range(body, pos + list_size, sig_size):
            out.append(SignatureData(sig_type, uuid.UUID(bytes_le=bytes(buf[entry:entry + 16])),
                                     bytes(buf[entry + 16:entry + sig_size])))
        pos += list_size
    return out
