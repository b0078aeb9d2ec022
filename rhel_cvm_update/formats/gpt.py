"""GUID Partition Table (UEFI 2.10 section 5.3): headers, partition entries, and growing a disk.

Three users share these structures: the ESP adapter (what a Hard Drive device-path node
needs: partition number, first LBA, size, unique GUID, and the type GUID to find the ESP;
both CRC32s are checked, so a damaged or half-written table is refused, not trusted) and the
event-log decoder (UEFI_GPT_DATA, the header as the firmware read it followed by only the
used entries, so there is no array CRC to check), and ``grow-root`` (``read_disk_gpt`` checks
the primary and the backup table of a whole disk against each other and against the disk's
size; ``plan_grow`` moves the backup table to the new end of an enlarged disk and extends one
partition into the free space directly after it, as byte writes in a crash-safe order).

Everything here is a pure function over bytes: the disk is read through a ``read(offset,
size)`` callable and changed only by the caller, which performs the planned writes.
"""

import dataclasses
import struct
import uuid
import zlib
from typing import Callable, List, Optional, Tuple

from rhel_cvm_update.errors import FormatError, UnsupportedError
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
    revision: int = 0x00010000
    header_size: int = 92

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
                   entries_lba, entry_count, entry_size, entries_crc, _revision, header_size)

    @property
    def entries_bytes(self) -> int:
        return self.entry_count * self.entry_size

    def entries_sectors(self, sector_size: int) -> int:
        return -(-self.entries_bytes // sector_size)

    def to_bytes(self, sector_size: int) -> bytes:
        """The header sector with its HeaderCRC32 (HeaderSize 92; the rest of the sector zero)."""
        fields = [GPT_SIGNATURE, self.revision, _HEADER.size, 0, 0, self.my_lba, self.alternate_lba,
                  self.first_usable_lba, self.last_usable_lba, self.disk_guid.bytes_le, self.entries_lba,
                  self.entry_count, self.entry_size, self.entries_crc32]
        fields[3] = zlib.crc32(_HEADER.pack(*fields))
        return _HEADER.pack(*fields).ljust(sector_size, b"\0")


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


# --- a whole disk: primary and backup table ----------------------------------------------

Reader = Callable[[int, int], bytes]   # (byte offset, size) -> the bytes there
MBR_SIGNATURE = b"\x55\xaa"
PROTECTIVE_MBR_TYPE = 0xEE
_MBR_ENTRIES = 446
# A grown partition ends on a 1 MiB boundary (as sgdisk and parted align partitions; sgdisk -v
# cautions about any other end) and its size is a multiple of 4 KiB: dm-crypt with 4096-byte
# encryption sectors (cryptsetup's default on such disks) refuses any other size.
GROW_END_ALIGN_BYTES = 1 << 20
GROW_SIZE_ALIGN_BYTES = 4096
# Like growpart: less than 1 MiB to gain is not worth a partition-table write.
MIN_GROWTH_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class GptDisk:
    """A disk's GPT after every consistency check; ``entries`` is the primary entry array."""

    source: str
    sector_size: int
    disk_lbas: int
    primary: GptHeader
    backup: Optional[GptHeader]     # None only when ``recovered`` from a damaged table
    entries: bytes
    partitions: Tuple[GptPartition, ...]
    recovered: Optional[str] = None  # why the tables were not consistent (recovery mode)

    def partition(self, number: int) -> GptPartition:
        for part in self.partitions:
            if part.number == number:
                return part
        raise UnsupportedError(f"{self.source}: the GPT has no partition {number}")


def _geometry_error(message: str, source: str, offset: int, field: str) -> FormatError:
    return FormatError(message, source=source, offset=offset, field=field)


def _check_header_geometry(h: GptHeader, disk_lbas: int, sector_size: int, source: str, primary: bool) -> None:
    at = h.my_lba * sector_size
    entries_end = h.entries_lba + h.entries_sectors(sector_size) - 1
    if not 2 <= h.first_usable_lba <= h.last_usable_lba < disk_lbas:
        raise _geometry_error(f"usable LBAs {h.first_usable_lba}-{h.last_usable_lba} do not fit a disk of "
                              f"{disk_lbas} sectors", source, at + 40, "FirstUsableLBA")
    if primary:
        if h.my_lba != 1:
            raise _geometry_error(f"MyLBA is {h.my_lba}, not 1", source, at + 24, "MyLBA")
        if not h.last_usable_lba < h.alternate_lba < disk_lbas:
            raise _geometry_error(f"AlternateLBA {h.alternate_lba} is not between the last usable LBA "
                                  f"{h.last_usable_lba} and the end of the disk ({disk_lbas} sectors; a shrunk "
                                  "disk?)", source, at + 32, "AlternateLBA")
        if not (h.entries_lba >= 2 and entries_end < h.first_usable_lba):
            raise _geometry_error(f"partition entry array at LBA {h.entries_lba}-{entries_end} is out of range "
                                  f"(LBA 2 to {h.first_usable_lba - 1})", source, at + 72, "PartitionEntryLBA")
    else:
        if not (h.entries_lba > h.last_usable_lba and entries_end < h.my_lba):
            raise _geometry_error(f"backup partition entry array at LBA {h.entries_lba}-{entries_end} is out of "
                                  f"range (LBA {h.last_usable_lba + 1} to {h.my_lba - 1})", source, at + 72,
                                  "PartitionEntryLBA")


def _check_partitions(h: GptHeader, parts: Tuple[GptPartition, ...], source: str, entries_offset: int) -> None:
    previous: Optional[GptPartition] = None
    for part in sorted(parts, key=lambda p: p.first_lba):
        where = entries_offset + (part.number - 1) * h.entry_size + 32
        if part.first_lba < h.first_usable_lba or part.last_lba > h.last_usable_lba:
            raise FormatError(f"partition {part.number} (LBA {part.first_lba}-{part.last_lba}) lies outside the "
                              f"usable LBAs {h.first_usable_lba}-{h.last_usable_lba}", source=source,
                              offset=where, field="StartingLBA")
        if previous is not None and part.first_lba <= previous.last_lba:
            raise FormatError(f"partition {part.number} (LBA {part.first_lba}-{part.last_lba}) overlaps partition "
                              f"{previous.number} (LBA {previous.first_lba}-{previous.last_lba})", source=source,
                              offset=where, field="StartingLBA")
        previous = part


def _read_table(read: Reader, lba: int, disk_lbas: int, sector_size: int, source: str,
                primary: bool) -> Tuple[GptHeader, bytes, Tuple[GptPartition, ...]]:
    sector = read(lba * sector_size, sector_size)
    if len(sector) < sector_size:
        raise FormatError(f"the disk ends inside the GPT header at LBA {lba}", source=source,
                          offset=lba * sector_size, field="GPT header")
    header = GptHeader.from_bytes(sector, source=source, offset=lba * sector_size)
    if not primary and header.my_lba != lba:
        raise _geometry_error(f"MyLBA is {header.my_lba}, the header is at LBA {lba}", source,
                              lba * sector_size + 24, "MyLBA")
    _check_header_geometry(header, disk_lbas, sector_size, source, primary)
    offset = header.entries_lba * sector_size
    entries = read(offset, header.entries_bytes)
    parts = parse_partition_entries(header, entries, source=source, offset=offset)
    _check_partitions(header, parts, source, offset)
    return header, bytes(entries[:header.entries_bytes]), parts


def _mbr_only_error(read: Reader, sector_size: int, source: str) -> Optional[FormatError]:
    mbr = read(0, 512)
    if len(mbr) == 512 and mbr[510:512] == MBR_SIGNATURE:
        types = [mbr[_MBR_ENTRIES + 16 * i + 4] for i in range(4)]
        if any(t not in (0, PROTECTIVE_MBR_TYPE) for t in types):
            return FormatError("an MBR (DOS) partition table and no GPT: only GPT disks are grown",
                               source=source, offset=sector_size, field="GPT header")
    return None


def read_disk_gpt(read: Reader, disk_bytes: int, sector_size: int, source: str = "<disk>",
                  recover: bool = False) -> GptDisk:
    """The GPT of a disk of ``disk_bytes``: both headers' CRCs, both entry arrays' CRCs, the
    layout (entry arrays outside the usable LBAs, partitions inside them and not overlapping,
    the backup at the primary's AlternateLBA) and the two tables equal.

    ``recover`` (a grow-root that was interrupted while it wrote the table): a primary that
    does not parse is replaced by the backup at the last LBA, and a backup that disagrees with
    a good primary is ignored; ``recovered`` says which."""
    if sector_size not in (512, 4096) or disk_bytes < 67 * sector_size:
        raise FormatError(f"{disk_bytes} bytes in {sector_size}-byte sectors cannot hold a GPT disk",
                          source=source, offset=0, field="disk size")
    disk_lbas = disk_bytes // sector_size
    if read(sector_size, 8) != GPT_SIGNATURE:
        mbr_only = _mbr_only_error(read, sector_size, source)
        if mbr_only is not None:
            raise mbr_only
    try:
        primary, entries, parts = _read_table(read, 1, disk_lbas, sector_size, source, True)
    except FormatError as e:
        if not recover:
            raise
        backup, entries, parts = _read_table(read, disk_lbas - 1, disk_lbas, sector_size, source, False)
        primary = dataclasses.replace(backup, my_lba=1, alternate_lba=disk_lbas - 1,
                                      entries_lba=2)
        return GptDisk(source, sector_size, disk_lbas, primary, None, entries, parts,
                       recovered=f"primary GPT damaged ({e}); rebuilt from the backup at LBA {disk_lbas - 1}")
    try:
        backup, backup_entries, _ = _read_table(read, primary.alternate_lba, disk_lbas, sector_size, source, False)
        mismatch = [name for name in ("disk_guid", "first_usable_lba", "last_usable_lba", "entry_count",
                                      "entry_size", "entries_crc32") if getattr(primary, name) != getattr(backup, name)]
        if backup.alternate_lba != 1:
            mismatch.append("alternate_lba")
        if backup_entries != entries:
            mismatch.append("entries")
        if mismatch:
            raise FormatError(f"the backup GPT differs from the primary in {', '.join(mismatch)}; check the disk "
                              "with 'sgdisk -v'", source=source, offset=primary.alternate_lba * sector_size,
                              field="backup GPT")
    except FormatError as e:
        if not recover:
            raise
        return GptDisk(source, sector_size, disk_lbas, primary, None, entries, parts,
                       recovered=f"backup GPT ignored ({e})")
    return GptDisk(source, sector_size, disk_lbas, primary, backup, entries, parts)


# --- growing: move the backup to the end, extend one partition ---------------------------

@dataclasses.dataclass(frozen=True)
class GptWrite:
    what: str
    offset: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class GrowPlan:
    """What ``plan_grow`` decided.  ``writes`` in their order; the caller makes each durable
    (fsync) before the next: the new backup first (free space nothing points at), then the
    primary (one write when its entry array follows the header), then the protective MBR's
    size and the stale old backup header zeroed."""

    partition: int
    old_last_lba: int
    new_last_lba: int
    old_backup_lba: int
    new_backup_lba: int
    sector_size: int
    writes: Tuple[GptWrite, ...]
    reason: str

    @property
    def changed(self) -> bool:
        return bool(self.writes)

    @property
    def grown(self) -> bool:
        return self.new_last_lba > self.old_last_lba

    def to_json(self) -> dict:
        return {"partition": self.partition, "old_last_lba": self.old_last_lba, "new_last_lba": self.new_last_lba,
                "old_backup_lba": self.old_backup_lba, "new_backup_lba": self.new_backup_lba,
                "sector_size": self.sector_size, "writes": [w.what for w in self.writes], "reason": self.reason}


def protective_mbr_update(mbr: bytes, disk_lbas: int) -> Optional[bytes]:
    """``mbr`` with its protective (0xEE, from LBA 1) entry sized to the disk, or None when
    there is nothing to change (no such entry, or it is right already; a hybrid MBR's other
    entries are left as they are)."""
    if len(mbr) < 512 or mbr[510:512] != MBR_SIGNATURE:
        return None
    want = min(disk_lbas - 1, 0xFFFFFFFF)
    for i in range(4):
        pos = _MBR_ENTRIES + 16 * i
        kind, = struct.unpack_from("<B", mbr, pos + 4)
        start, size = struct.unpack_from("<II", mbr, pos + 8)
        if kind == PROTECTIVE_MBR_TYPE and start == 1:
            if size == want:
                return None
            out = bytearray(mbr[:512])
            struct.pack_into("<I", out, pos + 12, want)
            return bytes(out)
    return None


def _entries_with_end(disk: GptDisk, number: int, last_lba: int) -> bytes:
    entries = bytearray(disk.entries)
    struct.pack_into("<Q", entries, (number - 1) * disk.primary.entry_size + 40, last_lba)
    return bytes(entries)


def plan_grow(disk: GptDisk, number: int, mbr: bytes = b"", min_growth_bytes: int = MIN_GROWTH_BYTES) -> GrowPlan:
    """Move the backup GPT to the last LBA and extend partition ``number`` up to the new last
    usable LBA (ending on a 1 MiB boundary, its size a multiple of 4 KiB).  A partition that starts after it is
    refused (UnsupportedError): the root would have to grow into it.  A disk with nothing to
    gain gives a plan without writes (``reason`` says why) -- unless ``disk.recovered``, when
    both tables are written again."""
    ss, p = disk.sector_size, disk.primary
    part = disk.partition(number)
    after = sorted((q for q in disk.partitions if q.first_lba > part.last_lba), key=lambda q: q.first_lba)
    if after:
        q = after[0]
        raise UnsupportedError(f"{disk.source}: partition {q.number} ({q.name or 'no name'}, LBA {q.first_lba}-"
                               f"{q.last_lba}) follows partition {number}: it cannot grow into it")
    sectors = p.entries_sectors(ss)
    new_backup = disk.disk_lbas - 1
    new_backup_entries = new_backup - sectors
    new_last_usable = new_backup_entries - 1
    end_align, size_align = GROW_END_ALIGN_BYTES // ss, max(1, GROW_SIZE_ALIGN_BYTES // ss)
    end = (new_last_usable + 1) // end_align * end_align      # first LBA after the partition
    size = end - part.first_lba
    new_last = part.first_lba + size - size % size_align - 1
    reason = "grown"
    if (new_last - part.last_lba) * ss < min_growth_bytes:
        new_last = part.last_lba
        reason = (f"no free space after partition {number}: it ends at LBA {part.last_lba}, the disk's last "
                  f"usable LBA is {new_last_usable}")
    moves = p.alternate_lba != new_backup or p.last_usable_lba != new_last_usable
    if not moves and new_last == part.last_lba and disk.recovered is None:
        return GrowPlan(number, part.last_lba, part.last_lba, p.alternate_lba, new_backup, ss, (), reason)
    if reason != "grown":
        reason = "backup GPT moved to the end of the disk; " + reason
    entries = _entries_with_end(disk, number, new_last)
    crc = zlib.crc32(entries)
    primary = dataclasses.replace(p, alternate_lba=new_backup, last_usable_lba=new_last_usable, entries_crc32=crc)
    backup = dataclasses.replace(primary, my_lba=new_backup, alternate_lba=1, entries_lba=new_backup_entries)
    padded = entries.ljust(sectors * ss, b"\0")
    writes: List[GptWrite] = [GptWrite("backup GPT", new_backup_entries * ss, padded + backup.to_bytes(ss))]
    if primary.entries_lba == 2:
        writes.append(GptWrite("primary GPT", ss, primary.to_bytes(ss) + padded))
    else:
        writes.append(GptWrite("primary GPT entries", primary.entries_lba * ss, padded))
        writes.append(GptWrite("primary GPT header", ss, primary.to_bytes(ss)))
    new_mbr = protective_mbr_update(mbr, disk.disk_lbas)
    if new_mbr is not None:
        writes.append(GptWrite("protective MBR", 0, new_mbr))
    # Zeroed only when it lies before the new backup (a disk grown by fewer sectors than the
    # entry array has its old backup header inside the new backup array).
    if disk.backup is not None and p.alternate_lba < new_backup_entries:
        writes.append(GptWrite("old backup GPT header (zeroed)", p.alternate_lba * ss, bytes(ss)))
    return GrowPlan(number, part.last_lba, new_last, p.alternate_lba, new_backup, ss, tuple(writes),
                    disk.recovered or reason)
