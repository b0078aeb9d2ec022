"""Build crypto-agile TCG event logs byte by byte for tests (independent of the parser)."""

import hashlib
import struct
import uuid
from typing import Dict, Optional, Sequence

ALG_IDS = {"sha1": (0x0004, 20), "sha256": (0x000B, 32), "sha384": (0x000C, 48)}

EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_ACTION = 0x80000007
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0

CALLING = b"Calling EFI Application from Boot Option"
RETURNING = b"Returning from EFI Application from Boot Option"
STUB_VENDOR_GUID = uuid.UUID("55c5d1f8-04cd-46b5-8a20-e56cbb3052d0")


def spec_id_record(banks: Sequence[str]) -> bytes:
    body = b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(banks))
    body += b"".join(struct.pack("<HH", *ALG_IDS[b]) for b in banks) + b"\0"
    return struct.pack("<II20sI", 0, EV_NO_ACTION, b"\0" * 20, len(body)) + body


def event2(pcr: int, event_type: int, data: bytes, banks: Sequence[str],
           digests: Optional[Dict[str, bytes]] = None) -> bytes:
    """digests default to the hash of data in each bank."""
    digests = digests or {b: hashlib.new(b, data).digest() for b in banks}
    out = struct.pack("<III", pcr, event_type, len(banks))
    for b in banks:
        out += struct.pack("<H", ALG_IDS[b][0]) + digests[b]
    return out + struct.pack("<I", len(data)) + data


def build_log(records: Sequence[bytes], banks: Sequence[str] = ("sha1", "sha256")) -> bytes:
    return spec_id_record(banks) + b"".join(records)


def ucs2z(text: str) -> bytes:
    return text.encode("utf-16-le") + b"\0\0"


def file_node(path: str) -> bytes:
    raw = ucs2z(path)
    return struct.pack("<BBH", 4, 4, 4 + len(raw)) + raw


END = bytes.fromhex("7fff0400")


def hd_node(part: int = 1, start: int = 0x800, size: int = 0x10000,
            guid: uuid.UUID = uuid.UUID("11111111-2222-3333-4444-555555555555")) -> bytes:
    return struct.pack("<BBHIQQ16sBB", 4, 1, 42, part, start, size, guid.bytes_le, 2, 2)


def vendor_media_node(guid: uuid.UUID) -> bytes:
    return struct.pack("<BBH", 4, 3, 20) + guid.bytes_le


def image_load_data(device_path: bytes, image_base: int = 0) -> bytes:
    return struct.pack("<QQQQ", 0x7E000000, 0x100000, image_base, len(device_path)) + device_path


def variable_data(guid: uuid.UUID, name: str, data: bytes) -> bytes:
    return struct.pack("<16sQQ", guid.bytes_le, len(name), len(data)) + name.encode("utf-16-le") + data


def extend_chain(bank: str, digests: Sequence[bytes], start: Optional[bytes] = None) -> bytes:
    value = start if start is not None else b"\0" * hashlib.new(bank).digest_size
    for d in digests:
        value = hashlib.new(bank, value + d).digest()
    return value
