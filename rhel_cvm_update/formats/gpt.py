"""GUID Partition Table (UEFI 2.10 section 5.3): the primary header and its partition entries.

Two readers share these structures: the ESP adapter (what a Hard Drive device-path node
needs: partition number, first LBA, size, unique GUID, and the type GUID to find the ESP;
both CRC32s are checked, so a damaged or half-written table is refused, not trusted) and the
event-log decoder (UEFI_GPT_DATA, the header as the firmware read it followed by only the
used entries, so there is no array CRC to check).
"""

import dataclasses
import struct
import uuid
import zlib
from typing import Optional, Tuple

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats.efi import decode_ucs2

ESP_TYPE_GUID = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
GPT_SIGNATURE = b"EFI PART"

_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_ENTRY = struct.Struct("<16s16sQQQ72s")
# Far above any real table (128 entries of 128 bytes); bounds what a hostile header can ask for.
MAX_ENTRY_ARRAY_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class GptHeader:
    my_lba: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: uuid.UUID
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc32: int

    @classmethod
    def from_bytes(cls, sector: bytes, source: str = "<gpt>", offset: int = 0,
                   verify_crc: bool = True) -> "GptHeader":
        """``verify_crc`` False: the header as an event log records it (only its first 92
        bytes, so a HeaderSize beyond them cannot be checked)."""
        if len(sector) < _HEADER.size:
            raise FormatError(f"GPT header needs {_HEADER.size} bytes, has {len(sector)}",
                              source=source, offset=offset, field="GPT header")
        (signature, _revision, header_size, header_crc, _reserved, my_lba, alternate_lba,
         first_usable, last_usable, disk_guid, entries_lba, entry_count, entry_size,
         entries_crc) = _HEADER.unpack_from(sector, 0)
        if signature != GPT_SIGNATURE:
            raise FormatError("no 'EFI PART' signature", source=source, offset=offset,
                              field="Signature")
        if verify_crc:
            if not _HEADER.size <= header_size <= len(sector):
                raise FormatError(f"HeaderSize {header_size} is invalid", source=source,
                                  offset=offset + 12, field="HeaderSize")
            header = bytearray(sector[:header_size])
            header[16:20] = b"\0\0\0\0"
            if zlib.crc32(bytes(header)) != header_crc:
                raise FormatError("header CRC32 does not match", source=source, offset=offset + 16,
                                  field="HeaderCRC32")
        if entry_size < _ENTRY.size or entry_size % 8:
            raise FormatError(f"SizeOfPartitionEntry {entry_size} is invalid", source=source,
                              offset=offset + 84, field="SizeOfPartitionEntry")
        if entry_count * entry_size > MAX_ENTRY_ARRAY_BYTES:
            raise FormatError(f"{entry_count} entries of {entry_size} bytes is too large",
                              source=source, offset=offset + 80, field="NumberOfPartitionEntries")
        return cls(my_lba, alternate_lba, first_usable, last_usable, uuid.UUID(bytes_le=disk_guid),
                   entries_lba, entry_count, entry_size, entries_crc)

    @property
    def entries_bytes(self) -> int:
        return self.entry_count * self.entry_size


HEADER_SIZE = _HEADER.size


@dataclasses.dataclass(frozen=True)
class GptPartition:
    number: Optional[int]   # 1-based index in the entry array; None in an event log's list
    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int
    name: str

    @property
    def size_lbas(self) -> int:
        return self.last_lba - self.first_lba + 1

    @property
    def is_esp(self) -> bool:
        return self.type_guid == ESP_TYPE_GUID


def parse_partition_entries(header: GptHeader, buf: bytes, source: str = "<gpt>",
                            offset: int = 0) -> Tuple[GptPartition, ...]:
    """The used entries (type GUID not zero) of the entry array ``buf``."""
    if len(buf) < header.entries_bytes:
        raise FormatError(f"partition entry array needs {header.entries_bytes} bytes, has "
                          f"{len(buf)}", source=source, offset=offset, field="PartitionEntryArray")
    if zlib.crc32(bytes(buf[:header.entries_bytes])) != header.entries_crc32:
        raise FormatError("partition entry array CRC32 does not match", source=source,
                          offset=offset, field="PartitionEntryArrayCRC32")
    partitions = []
    for index in range(header.entry_count):
        pos = index * header.entry_size
        if buf[pos:pos + 16] != bytes(16):
            partitions.append(parse_entry(buf, pos, index + 1, source, offset))
    return tuple(partitions)


def parse_entry(buf: bytes, pos: int, number: Optional[int], source: str = "<gpt>",
                offset: int = 0) -> GptPartition:
    """The partition entry at ``buf[pos:]`` (``offset``: where ``buf`` starts in ``source``)."""
    if len(buf) < pos + _ENTRY.size:
        raise FormatError(f"partition entry needs {_ENTRY.size} bytes, has {max(len(buf) - pos, 0)}",
                          source=source, offset=offset + pos, field="PartitionEntry")
    type_raw, unique_raw, first, last, attributes, name_raw = _ENTRY.unpack_from(buf, pos)
    if last < first:
        raise FormatError(f"partition {number or '?'} ends (LBA {last}) before it starts "
                          f"(LBA {first})", source=source, offset=offset + pos + 32, field="EndingLBA")
    name_end = next((i for i in range(0, len(name_raw), 2) if name_raw[i:i + 2] == b"\0\0"), len(name_raw))
    name = decode_ucs2(name_raw[:name_end], source, offset + pos + 56, "PartitionName")
    return GptPartition(number, uuid.UUID(bytes_le=type_raw), uuid.UUID(bytes_le=unique_raw), first, last,
                        attributes, name)
