"""The LUKS2 on-disk header: two copies of a 4 KiB binary header followed by the JSON area.

Layout (LUKS2 On-Disk Format Specification, cryptsetup's ``luks2_hdr_disk``), all integers
big-endian::

    0    magic[6]  "LUKS\\xba\\xbe" (primary) or "SKUL\\xba\\xbe" (secondary)
    6    u16 version (2)          8    u64 hdr_size (binary + JSON area, 16 KiB .. 4 MiB)
    16   u64 seqid                72   checksum_alg[32] ("sha256")
    256  u64 hdr_offset           448  csum[64] (over hdr_size bytes, this field zeroed)
    4096 JSON metadata, NUL-padded to hdr_size

The secondary copy starts at the primary's hdr_size.  Like cryptsetup, the copy with the
valid checksum and the higher seqid wins, so a header torn by a crash mid-write still
reads as the last complete one.  Pure functions over bytes: ``status`` reads the keyslots and
tokens this way without starting cryptsetup.
"""

import hashlib
import hmac
import struct
from typing import List, Tuple

from rhel_cvm_update.errors import FormatError, UnsupportedError

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_MAGIC_2ND = b"SKUL\xba\xbe"
BINARY_SIZE = 4096
HEADER_SIZES = tuple(0x4000 << n for n in range(9))  # 16 KiB .. 4 MiB
MAX_HEADER_SIZE = HEADER_SIZES[-1]
_CSUM_OFFSET, _CSUM_SIZE = 448, 64


def check_luks2_magic(header: bytes, *, source: str) -> None:
    """The first bytes of a LUKS device: magic, then a u16 BE version (LUKS2 on-disk format)."""
    if len(header) < 8:
        raise FormatError(f"only {len(header)} bytes, no LUKS header", source=source, offset=0, field="magic")
    if header[:6] not in (LUKS_MAGIC, LUKS_MAGIC_2ND):
        raise FormatError("not a LUKS device (wrong magic)", source=source, offset=0, field="magic")
    (version,) = struct.unpack_from(">H", header, 6)
    if version == 1:
        raise UnsupportedError(f"{source}: LUKS1 header; systemd-tpm2 tokens need LUKS2 "
                               "(cryptsetup convert --type luks2)")
    if version != 2:
        raise FormatError(f"unknown LUKS version {version}", source=source, offset=6, field="version")


def header_size(primary: bytes, *, source: str) -> int:
    """hdr_size of the primary binary header (how many bytes ``read_json_area`` needs: twice it)."""
    check_luks2_magic(primary, source=source)
    if len(primary) < 16:
        raise FormatError("truncated binary header", source=source, offset=len(primary), field="hdr_size")
    (size,) = struct.unpack_from(">Q", primary, 8)
    if size not in HEADER_SIZES:
        raise FormatError(f"hdr_size {size} is not a LUKS2 header size (16 KiB .. 4 MiB, a power of two)",
                          source=source, offset=8, field="hdr_size")
    return size


def _copy(data: bytes, offset: int, magic: bytes, source: str) -> Tuple[int, bytes]:
    """(seqid, JSON bytes) of the header copy at ``offset``; FormatError if it is not valid."""
    binary = data[offset:offset + BINARY_SIZE]
    if len(binary) < BINARY_SIZE:
        raise FormatError(f"truncated: {len(binary)} of {BINARY_SIZE} bytes", source=source, offset=offset,
                          field="binary header")
    if binary[:6] != magic:
        raise FormatError("wrong magic", source=source, offset=offset, field="magic")
    version, size, seqid = struct.unpack_from(">HQQ", binary, 6)
    if version != 2:
        raise FormatError(f"version {version}", source=source, offset=offset + 6, field="version")
    if size not in HEADER_SIZES:
        raise FormatError(f"hdr_size {size}", source=source, offset=offset + 8, field="hdr_size")
    (hdr_offset,) = struct.unpack_from(">Q", binary, 256)
    if hdr_offset != offset:
        raise FormatError(f"hdr_offset {hdr_offset} != its position {offset}", source=source,
                          offset=offset + 256, field="hdr_offset")
    area = data[offset:offset + size]
    if len(area) < size:
        raise FormatError(f"truncated: {len(area)} of hdr_size {size} bytes", source=source, offset=offset,
                          field="json area")
    algorithm = binary[72:104].split(b"\0", 1)[0].decode("ascii", "replace")
    if algorithm not in ("sha256", "sha1", "sha512"):
        raise FormatError(f"checksum algorithm {algorithm!r} not supported", source=source, offset=offset + 72,
                          field="checksum_alg")
    digest = hashlib.new(algorithm)
    digest.update(area[:_CSUM_OFFSET])
    digest.update(bytes(_CSUM_SIZE))
    digest.update(area[_CSUM_OFFSET + _CSUM_SIZE:])
    stored = binary[_CSUM_OFFSET:_CSUM_OFFSET + digest.digest_size]
    if not hmac.compare_digest(stored, digest.digest()):
        raise FormatError("checksum mismatch", source=source, offset=offset + _CSUM_OFFSET, field="csum")
    return seqid, area[BINARY_SIZE:].split(b"\0", 1)[0]


def read_json_area(data: bytes, *, source: str) -> bytes:
    """The JSON metadata of the newest valid header copy in ``data`` (the device's first
    2 x hdr_size bytes).  FormatError, naming the offset, when neither copy is valid."""
    size = header_size(data[:16], source=source)
    found: List[Tuple[int, bytes]] = []
    problems: List[str] = []
    for offset, magic in ((0, LUKS_MAGIC), (size, LUKS_MAGIC_2ND)):
        try:
            found.append(_copy(data, offset, magic, source))
        except FormatError as e:
            problems.append(str(e))
    if not found:
        raise FormatError("no valid header copy (" + "; ".join(problems) + ")", source=source, offset=0,
                          field="LUKS2 header")
    return max(found, key=lambda copy: copy[0])[1]

