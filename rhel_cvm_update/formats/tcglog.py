"""TCG PC Client event logs: parse, decode, replay.

Two on-disk formats (TCG PC Client Platform Firmware Profile, "PFP", 1.05/1.06):

* crypto-agile: a SHA1-format TCG_PCR_EVENT whose data is the "Spec ID Event03" header,
  then TCG_PCR_EVENT2 records (PCRIndex u32, EventType u32, TPML_DIGEST_VALUES, EventSize
  u32, Event).  Digest sizes come from the header's algorithm table, so an algorithm this
  module does not know is skipped by its declared size.
* legacy SHA1 ("TCG 1.2" EFI format): TCG_PCR_EVENT records only (PCRIndex u32,
  EventType u32, SHA1 digest, EventSize u32, Event); the first record is a real event.

Everything is little-endian.  The parser is pure and every length is checked against the
bytes that remain, so hostile input fails with FormatError naming the source, the offset
and the field.  Event data stays untrusted: nothing here claims that a log is genuine,
only replay() against PCRs read from the TPM can show that.
"""

import dataclasses
import hashlib
import struct
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from rhel_cvm_update.errors import FormatError, UnsupportedError
from rhel_cvm_update.formats.devpath import DevicePathNode, device_path_text, parse_device_path
from rhel_cvm_update.formats.efi import UefiVariableData, decode_ucs2

# --- Event types (PFP 1.06 section 10.4.1; edk2 MdePkg UefiTcgPlatform.h) -------------
EV_PREBOOT_CERT = 0x00000000
EV_POST_CODE = 0x00000001
EV_UNUSED = 0x00000002
EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_ACTION = 0x00000005
EV_EVENT_TAG = 0x00000006
EV_S_CRTM_CONTENTS = 0x00000007
EV_S_CRTM_VERSION = 0x00000008
EV_CPU_MICROCODE = 0x00000009
EV_PLATFORM_CONFIG_FLAGS = 0x0000000A
EV_TABLE_OF_DEVICES = 0x0000000B
EV_COMPACT_HASH = 0x0000000C
EV_IPL = 0x0000000D
EV_IPL_PARTITION_DATA = 0x0000000E
EV_NONHOST_CODE = 0x0000000F
EV_NONHOST_CONFIG = 0x00000010
EV_NONHOST_INFO = 0x00000011
EV_OMIT_BOOT_DEVICE_EVENTS = 0x00000012
EV_EFI_EVENT_BASE = 0x80000000
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
EV_EFI_HANDOFF_TABLES = 0x80000009
EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
EV_EFI_HANDOFF_TABLES2 = 0x8000000B
EV_EFI_VARIABLE_BOOT2 = 0x8000000C
EV_EFI_HCRTM_EVENT = 0x80000010
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2
EV_EFI_SPDM_DEVICE_POLICY = 0x800000E3
EV_EFI_SPDM_DEVICE_AUTHORITY = 0x800000E4

EVENT_TYPES: Dict[int, str] = {value: name for name, value in sorted(globals().items())
                               if name.startswith("EV_") and name != "EV_EFI_EVENT_BASE"}

# --- Hash algorithms (TCG Algorithm Registry TPM_ALG_ID) --------------------------------
TPM_ALG_SHA1 = 0x0004
TPM_ALG_SHA256 = 0x000B
TPM_ALG_SHA384 = 0x000C
TPM_ALG_SHA512 = 0x000D
TPM_ALG_SM3_256 = 0x0012

ALGORITHMS: Dict[int, Tuple[str, int]] = {
    TPM_ALG_SHA1: ("sha1", 20),
    TPM_ALG_SHA256: ("sha256", 32),
    TPM_ALG_SHA384: ("sha384", 48),
    TPM_ALG_SHA512: ("sha512", 64),
    TPM_ALG_SM3_256: ("sm3_256", 32),
}
BANK_DIGEST_SIZES: Dict[str, int] = {name: size for name, size in ALGORITHMS.values()}
_HASHLIB_NAMES = {"sm3_256": "sm3"}

# --- Bounds that make hostile input fail fast -------------------------------------------
MAX_LOG_SIZE = 16 * 1024 * 1024
MAX_EVENTS = 100_000
# No registry has more than a handful of hash algorithms; a table of hundreds is garbage.
MAX_SPEC_ID_ALGORITHMS = 16
MAX_DIGEST_SIZE = 512

SPEC_ID_EVENT03 = b"Spec ID Event03\0"
SPEC_ID_PREFIX = b"Spec ID Event"
# TCG 1.2 PC Client ("00") and EFI ("02") Spec ID events head SHA1-format logs.
SPEC_ID_SHA1_FORMAT = (b"Spec ID Event00\0", b"Spec ID Event02\0")
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\0"
# The Linux EFI stub's EV_EVENT_TAG ids (systemd src/fundamental/tpm2-event-log.h).
LINUX_EVENT_TAGS = {0x8F3B22EC: "Linux initrd", 0x8F3B22ED: "Linux load options"}
SP800_155_SIGNATURES = (b"SP800-155 Event\0", b"SP800-155 Event2", b"SP800-155 Event3")

_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_EVENT1_HEADER = struct.Struct("<II20sI")  # TCG_PCR_EVENT up to the data
_EVENT2_HEADER = struct.Struct("<III")  # PCRIndex, EventType, TPML_DIGEST_VALUES.count
_SPEC_ID_FIXED = struct.Struct("<16sIBBBBI")
_ALG_ENTRY = struct.Struct("<HH")


@dataclasses.dataclass(frozen=True)
class TcgEvent:
    """One record of the log.  ``digests`` maps bank name to digest (banks this module knows);
    ``data_offset`` is where the event data sits in the log (None for events built by hand)."""

    index: int
    offset: int
    pcr: int
    event_type: int
    digests: Dict[str, bytes]
    data: bytes
    data_offset: Optional[int] = None

    @property
    def type_name(self) -> str:
        return EVENT_TYPES.get(self.event_type, f"EV_UNKNOWN_{self.event_type:#010x}")


@dataclasses.dataclass(frozen=True)
class SpecIdEvent:
    """TCG_EfiSpecIDEventStruct ("Spec ID Event03")."""

    platform_class: int
    spec_version_major: int
    spec_version_minor: int
    spec_errata: int
    uintn_size: int  # 1 = UINT32, 2 = UINT64, as the header encodes it
    algorithms: Dict[int, int]  # TPM_ALG_ID -> digest size, in log order
    vendor_info: bytes

    @property
    def uintn_bytes(self) -> int:
        return 4 if self.uintn_size == 1 else 8


@dataclasses.dataclass(frozen=True)
class EventLog:
    source: str
    format: str  # "crypto-agile" or "sha1"
    spec_id: Optional[SpecIdEvent]
    events: Tuple[TcgEvent, ...]
    banks: Tuple[str, ...]
    startup_locality: int

    @property
    def uintn_size(self) -> int:
        """Bytes in a UINTN of this log's event structures (8 unless the header says 32-bit)."""
        return self.spec_id.uintn_bytes if self.spec_id else 8


# --- Parsing -----------------------------------------------------------------------------

def _is_padding(buf: bytes, pos: int, min_record: int) -> bool:
    """CCEL logs and some kernels hand out the whole reserved area: the log ends where only
    0x00 or only 0xFF bytes remain.  A tail shorter than the smallest record is not taken
    for padding: it is as likely the start of a truncated PCR0 record (PCRIndex 0)."""
    remaining = len(buf) - pos
    if remaining < min_record:
        return False
    # The first min_record bytes of a real record are never all 0x00 or all 0xFF (its
    # digest count or EventType is neither), so only true padding pays for scanning the rest.
    for fill in (b"\0", b"\xff"):
        if buf.count(fill, pos, pos + min_record) == min_record:
            return buf.count(fill, pos) == remaining
    return False


def _parse_spec_id(data: bytes, source: str, base: int) -> SpecIdEvent:
    if len(data) < _SPEC_ID_FIXED.size:
        raise FormatError(f"Spec ID event is {len(data)} bytes, needs at least {_SPEC_ID_FIXED.size}",
                          source=source, offset=base, field="SpecIdEvent")
    _, platform_class, minor, major, errata, uintn_size, count = _SPEC_ID_FIXED.unpack_from(data, 0)
    if uintn_size not in (1, 2):
        raise FormatError(f"uintnSize {uintn_size} is neither 1 (UINT32) nor 2 (UINT64)",
                          source=source, offset=base + 23, field="uintnSize")
    if not 1 <= count <= MAX_SPEC_ID_ALGORITHMS:
        raise FormatError(f"{count} algorithms (expected 1 to {MAX_SPEC_ID_ALGORITHMS})",
                          source=source, offset=base + 24, field="numberOfAlgorithms")
    pos = _SPEC_ID_FIXED.size
    if pos + count * _ALG_ENTRY.size + 1 > len(data):
        raise FormatError(f"{count} algorithm entries run past the {len(data)}-byte event",
                          source=source, offset=base + 24, field="numberOfAlgorithms")
    algorithms: Dict[int, int] = {}
    for _ in range(count):
        alg_id, size = _ALG_ENTRY.unpack_from(data, pos)
        if alg_id in algorithms:
            raise FormatError(f"algorithm {alg_id:#06x} listed twice", source=source,
                              offset=base + pos, field="digestSizes")
        known = ALGORITHMS.get(alg_id)
        if known and known[1] != size:
            raise FormatError(f"{known[0]} digest size {size}, must be {known[1]}", source=source,
                              offset=base + pos, field="digestSizes")
        if not 1 <= size <= MAX_DIGEST_SIZE:
            raise FormatError(f"digest size {size} of algorithm {alg_id:#06x}", source=source,
                              offset=base + pos, field="digestSizes")
        algorithms[alg_id] = size
        pos += _ALG_ENTRY.size
    vendor_size = data[pos]
    if pos + 1 + vendor_size != len(data):
        raise FormatError(f"vendorInfoSize {vendor_size} does not fill the {len(data)}-byte event",
                          source=source, offset=base + pos, field="vendorInfoSize")
    return SpecIdEvent(platform_class, major, minor, errata, uintn_size, algorithms,
                       bytes(data[pos + 1:]))


def _read_event1(buf: bytes, pos: int, source: str) -> Tuple[int, int, bytes, int, int]:
    """A SHA1-format TCG_PCR_EVENT at pos: (pcr, type, digest, data offset, data end)."""
    if pos + _EVENT1_HEADER.size > len(buf):
        raise FormatError(f"record header needs {_EVENT1_HEADER.size} bytes, {len(buf) - pos} remain",
                          source=source, offset=pos, field="TCG_PCR_EVENT")
    pcr, event_type, digest, size = _EVENT1_HEADER.unpack_from(buf, pos)
    data_pos = pos + _EVENT1_HEADER.size
    if size > len(buf) - data_pos:
        raise FormatError(f"EventSize {size} runs past the end ({len(buf) - data_pos} bytes remain)",
                          source=source, offset=pos + 28, field="EventSize")
    return pcr, event_type, digest, data_pos, data_pos + size


def _read_event2(buf: bytes, pos: int, index: int, table: Dict[int, int],
                 source: str) -> Tuple[TcgEvent, int]:
    if pos + _EVENT2_HEADER.size > len(buf):
        raise FormatError(f"record header needs {_EVENT2_HEADER.size} bytes, {len(buf) - pos} remain",
                          source=source, offset=pos, field="TCG_PCR_EVENT2")
    pcr, event_type, count = _EVENT2_HEADER.unpack_from(buf, pos)
    # The header table lists every bank the firmware logs; a record may carry fewer
    # (Windows boot-manager events carry only sha256) but never more.
    if not 1 <= count <= len(table):
        raise FormatError(f"digest count {count}, the Spec ID header lists {len(table)} algorithms",
                          source=source, offset=pos + 8, field="TPML_DIGEST_VALUES.count")
    cur = pos + _EVENT2_HEADER.size
    digests: Dict[str, bytes] = {}
    seen = set()
    for _ in range(count):
        if cur + _U16.size > len(buf):
            raise FormatError("digest algorithm runs past the end", source=source, offset=cur,
                              field="hashAlg")
        (alg_id,) = _U16.unpack_from(buf, cur)
        size = table.get(alg_id)
        if size is None:
            raise FormatError(f"algorithm {alg_id:#06x} is not in the Spec ID header", source=source,
                              offset=cur, field="hashAlg")
        if alg_id in seen:
            raise FormatError(f"algorithm {alg_id:#06x} appears twice", source=source, offset=cur,
                              field="hashAlg")
        seen.add(alg_id)
        cur += _U16.size
        if cur + size > len(buf):
            raise FormatError(f"{size}-byte digest runs past the end", source=source, offset=cur,
                              field="digest")
        if alg_id in ALGORITHMS:
            digests[ALGORITHMS[alg_id][0]] = bytes(buf[cur:cur + size])
        cur += size
    if cur + _U32.size > len(buf):
        raise FormatError("EventSize runs past the end", source=source, offset=cur, field="EventSize")
    (size,) = _U32.unpack_from(buf, cur)
    data_pos = cur + _U32.size
    if size > len(buf) - data_pos:
        raise FormatError(f"EventSize {size} runs past the end ({len(buf) - data_pos} bytes remain)",
                          source=source, offset=cur, field="EventSize")
    end = data_pos + size
    return TcgEvent(index, pos, pcr, event_type, digests, bytes(buf[data_pos:end]), data_pos), end


def _startup_locality(events: Iterable[TcgEvent]) -> int:
    for event in events:
        if (event.event_type == EV_NO_ACTION and event.pcr == 0
                and event.data[:16] == STARTUP_LOCALITY_SIGNATURE and len(event.data) == 17):
            return event.data[16]
    # An H-CRTM sequence (_TPM_Hash_Start.._TPM_Hash_End, sent at locality 4) makes PCR0
    # start at 4 before its extend, and firmware logs it as EV_EFI_HCRTM_EVENT without a
    # StartupLocality event.  tpm2-tss replays such logs the same way, and the recorded
    # PCR0 of the corpus's Hygon log (the only H-CRTM log) is reproduced only like this.
    for event in events:
        if event.event_type == EV_EFI_HCRTM_EVENT and event.pcr == 0:
            return 4
    return 0


def _looks_like_event1(pcr: int, event_type: int) -> bool:
    # A SHA1-format log starts with a real event (or StartupLocality) for one of the 24
    # PCRs, of a type the PFP defines; anything else at offset 0 is not an event log.
    return pcr < 24 and event_type in EVENT_TYPES


def parse_event_log(buf: bytes, source: str = "<bytes>") -> EventLog:
    if len(buf) > MAX_LOG_SIZE:
        raise FormatError(f"{len(buf)} bytes is larger than any event log ({MAX_LOG_SIZE} max)",
                          source=source, offset=0)
    pcr, event_type, digest, data_pos, data_end = _read_event1(buf, 0, source)
    first_data = buf[data_pos:data_end]
    if event_type == EV_NO_ACTION and first_data[:16] == SPEC_ID_EVENT03:
        if pcr != 0 or digest != bytes(20):
            raise FormatError("Spec ID event must be PCR 0 with a zero digest", source=source,
                              offset=0, field="TCG_PCR_EVENT")
        spec_id = _parse_spec_id(first_data, source, data_pos)
        return _parse_crypto_agile(buf, data_end, spec_id, source)
    if event_type == EV_NO_ACTION and first_data[:13] == SPEC_ID_PREFIX \
            and first_data[:16] not in SPEC_ID_SHA1_FORMAT:
        raise FormatError(f"unknown Spec ID signature {bytes(first_data[:16])!r}", source=source,
                          offset=data_pos, field="signature")
    if not _looks_like_event1(pcr, event_type):
        raise FormatError(f"neither a Spec ID Event03 header nor a SHA1-format event "
                          f"(PCR {pcr}, type {event_type:#x})", source=source, offset=0,
                          field="TCG_PCR_EVENT")
    return _parse_sha1(buf, source)


def _parse_crypto_agile(buf: bytes, pos: int, spec_id: SpecIdEvent, source: str) -> EventLog:
    events: List[TcgEvent] = []
    min_record = _EVENT2_HEADER.size + _U16.size + min(spec_id.algorithms.values()) + _U32.size
    while pos < len(buf) and not _is_padding(buf, pos, min_record):
        if len(events) >= MAX_EVENTS:
            raise FormatError(f"more than {MAX_EVENTS} events", source=source, offset=pos)
        event, pos = _read_event2(buf, pos, len(events), spec_id.algorithms, source)
        events.append(event)
    banks = tuple(ALGORITHMS[a][0] for a in spec_id.algorithms if a in ALGORITHMS)
    return EventLog(source, "crypto-agile", spec_id, tuple(events), banks, _startup_locality(events))


def _parse_sha1(buf: bytes, source: str) -> EventLog:
    events: List[TcgEvent] = []
    pos = 0
    while pos < len(buf) and not _is_padding(buf, pos, _EVENT1_HEADER.size):
        if len(events) >= MAX_EVENTS:
            raise FormatError(f"more than {MAX_EVENTS} events", source=source, offset=pos)
        pcr, event_type, digest, data_pos, end = _read_event1(buf, pos, source)
        events.append(TcgEvent(len(events), pos, pcr, event_type, {"sha1": digest},
                               bytes(buf[data_pos:end]), data_pos))
        pos = end
    return EventLog(source, "sha1", None, tuple(events), ("sha1",), _startup_locality(events))


# --- Replay ------------------------------------------------------------------------------

def hash_new(bank: str) -> "hashlib._Hash":
    if bank not in BANK_DIGEST_SIZES:
        raise UnsupportedError(f"unknown PCR bank {bank!r}")
    try:
        return hashlib.new(_HASHLIB_NAMES.get(bank, bank))
    except ValueError:
        raise UnsupportedError(f"this Python's OpenSSL cannot compute {bank}") from None


def initial_pcr(pcr: int, bank: str, startup_locality: int = 0) -> bytes:
    """PCR value after TPM2_Startup(CLEAR) (PC Client PTP: PCR0 carries the startup
    locality 3 or 4 in its last byte; PCRs 17-22, the D-RTM ones, start as all ones)."""
    size = BANK_DIGEST_SIZES.get(bank)
    if size is None:
        raise UnsupportedError(f"unknown PCR bank {bank!r}")
    if pcr == 0 and startup_locality in (3, 4):
        return bytes(size - 1) + bytes([startup_locality])
    if 17 <= pcr <= 22:
        return b"\xff" * size
    return bytes(size)


def extend(bank: str, value: bytes, digest: bytes) -> bytes:
    h = hash_new(bank)
    if len(value) != h.digest_size or len(digest) != h.digest_size:
        raise ValueError(f"{bank} extend needs {h.digest_size}-byte values, got "
                         f"{len(value)} and {len(digest)}")
    h.update(value)
    h.update(digest)
    return h.digest()


def replay_events(events: Iterable[TcgEvent], bank: str, startup_locality: int = 0,
                  pcrs: Optional[Sequence[int]] = None) -> Dict[int, bytes]:
    """PCR values after extending each event's ``bank`` digest in order.  EV_NO_ACTION
    records and events without a digest in this bank extend nothing."""
    wanted = None if pcrs is None else set(pcrs)
    values: Dict[int, bytes] = {}
    for event in events:
        if event.event_type == EV_NO_ACTION or bank not in event.digests:
            continue
        if wanted is not None and event.pcr not in wanted:
            continue
        old = values.get(event.pcr)
        if old is None:
            old = initial_pcr(event.pcr, bank, startup_locality)
        values[event.pcr] = extend(bank, old, event.digests[bank])
    return values


def replay(log: EventLog, banks: Optional[Sequence[str]] = None,
           pcrs: Optional[Sequence[int]] = None) -> Dict[str, Dict[int, bytes]]:
    """{bank: {pcr: value}} for every bank of the log (or those asked for) and every PCR
    that some event extended."""
    out: Dict[str, Dict[int, bytes]] = {}
    for bank in (log.banks if banks is None else banks):
        values = replay_events(log.events, bank, log.startup_locality, pcrs)
        if values:
            out[bank] = values
    return out


# --- Event data --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImageLoadEvent:
    """UEFI_IMAGE_LOAD_EVENT of EV_EFI_BOOT_SERVICES_APPLICATION/DRIVER and
    EV_EFI_RUNTIME_SERVICES_DRIVER."""

    location: int
    length: int
    link_time_address: int
    device_path: Tuple[DevicePathNode, ...]
    raw_device_path: bytes

    def to_json(self) -> Dict[str, Any]:
        return {"location": self.location, "length": self.length,
                "link_time_address": self.link_time_address,
                "device_path": device_path_text(self.device_path),
                "device_path_hex": self.raw_device_path.hex()}

    def summary(self) -> str:
        return device_path_text(self.device_path) or "(no device path)"


@dataclasses.dataclass(frozen=True)
class StartupLocalityEvent:
    locality: int

    def to_json(self) -> Dict[str, Any]:
        return {"signature": "StartupLocality", "locality": self.locality}

    def summary(self) -> str:
        return f"StartupLocality {self.locality}"


@dataclasses.dataclass(frozen=True)
class Sp800155Event:
    """TCG_Sp800_155_PlatformId_Event2/3 (PFP 1.06 section 10.4.5.2).  The original
    "SP800-155 Event" only promises VendorId and the manifest GUID; its tail is kept raw."""

    signature: str
    vendor_id: int
    reference_manifest_guid: uuid.UUID
    strings: Dict[str, str]
    firmware_manufacturer_id: Optional[int]
    rest: bytes

    def to_json(self) -> Dict[str, Any]:
        return {"signature": self.signature, "vendor_id": self.vendor_id,
                "reference_manifest_guid": str(self.reference_manifest_guid),
                **self.strings, "firmware_manufacturer_id": self.firmware_manufacturer_id,
                "rest_hex": self.rest.hex()}

    def summary(self) -> str:
        names = " ".join(v for v in self.strings.values() if v)
        return f"{self.signature} vendor {self.vendor_id} {names}".rstrip()


@dataclasses.dataclass(frozen=True)
class GptPartition:
    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int
    name: str


@dataclasses.dataclass(frozen=True)
class GptEvent:
    """UEFI_GPT_DATA: the GPT header as read plus the non-empty partition entries."""

    disk_guid: uuid.UUID
    partitions: Tuple[GptPartition, ...]

    def to_json(self) -> Dict[str, Any]:
        return {"disk_guid": str(self.disk_guid),
                "partitions": [{"type_guid": str(p.type_guid), "unique_guid": str(p.unique_guid),
                                "first_lba": p.first_lba, "last_lba": p.last_lba,
                                "attributes": p.attributes, "name": p.name}
                               for p in self.partitions]}

    def summary(self) -> str:
        count = len(self.partitions)
        return f"disk {self.disk_guid}, {count} partition{'' if count == 1 else 's'}"


@dataclasses.dataclass(frozen=True)
class FirmwareBlob:
    """UEFI_PLATFORM_FIRMWARE_BLOB(2): where a measured firmware volume sits in memory."""

    base: int
    length: int
    description: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        return {"base": self.base, "length": self.length, "description": self.description}

    def summary(self) -> str:
        prefix = f"{self.description} " if self.description else ""
        return f"{prefix}base {self.base:#x} length {self.length:#x}"


@dataclasses.dataclass(frozen=True)
class TaggedEvent:
    """TCG_PCClientTaggedEvent (EV_EVENT_TAG), e.g. the Linux EFI stub's initrd and load
    options tags 0x8F3B22EC/0x8F3B22ED."""

    tag_id: int
    tag_data: bytes

    def to_json(self) -> Dict[str, Any]:
        return {"tag_id": self.tag_id, "tag_data_hex": self.tag_data.hex()}

    def summary(self) -> str:
        name = LINUX_EVENT_TAGS.get(self.tag_id, f"tag {self.tag_id:#010x}")
        try:
            return f"{name}: {decode_text(self.tag_data)}"
        except FormatError:
            return f"{name} ({len(self.tag_data)} bytes)"


@dataclasses.dataclass(frozen=True)
class HandoffTables:
    """UEFI_HANDOFF_TABLE_POINTERS(2): the configuration tables (SMBIOS, ACPI...) handed to
    the OS, by vendor GUID and address."""

    tables: Tuple[Tuple[uuid.UUID, int], ...]
    description: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        return {"description": self.description,
                "tables": [{"guid": str(g), "address": a} for g, a in self.tables]}

    def summary(self) -> str:
        prefix = f"{self.description}: " if self.description else ""
        return prefix + ", ".join(f"{g} at {a:#x}" for g, a in self.tables)


def _data_base(event: TcgEvent) -> int:
    return event.data_offset if event.data_offset is not None else event.offset


def decode_text(raw: bytes, source: str = "<bytes>", offset: int = 0, field: str = "text") -> str:
    """Event text as firmware and boot loaders write it: ASCII/UTF-8 (EFI actions, grub,
    shim variable names) or UCS-2 (S-CRTM versions, systemd-boot/stub), NUL-terminated or
    not.  Found in real logs and accepted: all-NUL data (OVMF's empty S-CRTM version), a
    UCS-2 string ending in a single NUL byte (systemd-boot before 250), and bytes after the
    NUL of an ASCII string (shim 15's "MokList\0" plus one stray byte)."""
    if raw.count(0) == len(raw):
        return ""
    try:
        text = raw.decode("utf-8").rstrip("\0")
        if _printable(text):
            return text
    except UnicodeDecodeError:
        pass
    ucs2 = raw[:-1] if len(raw) % 2 and raw[-1] == 0 else raw
    if len(ucs2) % 2 == 0:
        try:
            text = decode_ucs2(ucs2, source, offset, field).rstrip("\0")
        except FormatError:
            text = ""
        if text and _printable(text):
            return text
    head = raw.split(b"\0", 1)[0]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if len(text) >= 2 and _printable(text):
        return text
    raise FormatError(f"{len(raw)} bytes are neither ASCII/UTF-8 nor UCS-2 text", source=source,
                      offset=offset, field=field)


def _printable(text: str) -> bool:
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _decode_image_load(event: TcgEvent, uintn_size: int, source: str) -> ImageLoadEvent:
    data, base = event.data, _data_base(event)
    # ImageLocationInMemory is always 64-bit; the other three are UINTN.  Some firmware
    # declares 32-bit UINTNs in the Spec ID header yet writes 64-bit fields, so a layout
    # whose LengthOfDevicePath exactly fills the event wins, the declared one first.
    # shim before 15.3 logged sizeof(EFI_IMAGE_LOAD_EVENT) + path length, 8 or 9 bytes
    # more than the path needs: failing an exact fit, the declared layout may leave slack.
    declared = struct.Struct("<QQQQ" if uintn_size == 8 else "<QIII")
    other = struct.Struct("<QIII" if uintn_size == 8 else "<QQQQ")
    for layout, exact in ((declared, True), (other, True), (declared, False)):
        if len(data) < layout.size:
            continue
        location, length, link, path_len = layout.unpack_from(data, 0)
        end = layout.size + path_len
        if end == len(data) or (not exact and end < len(data)):
            raw_path = bytes(data[layout.size:end])
            return ImageLoadEvent(location, length, link,
                                  _parse_logged_device_path(raw_path, source, base + layout.size),
                                  raw_path)
    raise FormatError(f"LengthOfDevicePath does not fit the {len(data)}-byte image load event",
                      source=source, offset=base, field="LengthOfDevicePath")


def _parse_logged_device_path(raw: bytes, source: str, base: int) -> Tuple[DevicePathNode, ...]:
    """Device paths as firmware logs them: possibly empty, possibly without an End node,
    possibly followed by zero bytes (a zeroed End node) instead of one."""
    try:
        return parse_device_path(raw, source, base, require_end=False)
    except FormatError as e:
        cut = (e.offset or base) - base
        if 0 < cut < len(raw) and raw[cut:].count(0) == len(raw) - cut:
            return parse_device_path(raw[:cut], source, base, require_end=False)
        raise


def _decode_variable(event: TcgEvent, uintn_size: int, source: str) -> UefiVariableData:
    data, base = event.data, _data_base(event)
    header = UefiVariableData.HEADER
    if len(data) >= header.size:
        # shim before 15.3 logged sizeof(EFI_VARIABLE_DATA_TREE) slack after the variable
        # data, and TPM 1.2 firmware has been seen measuring several variables in one event:
        # the first variable is decoded, the bytes after it stay in event.data (and in the
        # digest).  UnicodeNameLength and VariableDataLength still have to fit.
        _, name_len, data_len = header.unpack_from(data, 0)
        needed = header.size + 2 * name_len + data_len
        if needed < len(data):
            return UefiVariableData.from_bytes(data[:needed], source, base)
    return UefiVariableData.from_bytes(data, source, base)


def _decode_text_event(event: TcgEvent, uintn_size: int, source: str) -> str:
    return decode_text(event.data, source, _data_base(event), event.type_name)


def _decode_crtm_version(event: TcgEvent, uintn_size: int, source: str) -> object:
    try:
        return decode_text(event.data, source, _data_base(event), "S-CRTM version")
    except FormatError:
        # AMI-style firmware records its S-CRTM version as a bare 16-byte GUID.
        if len(event.data) == 16:
            return uuid.UUID(bytes_le=event.data)
        raise


def _decode_separator(event: TcgEvent, uintn_size: int, source: str) -> int:
    if len(event.data) != 4:
        raise FormatError(f"separator is {len(event.data)} bytes, not 4", source=source,
                          offset=_data_base(event), field="EV_SEPARATOR")
    return _U32.unpack(event.data)[0]


def _decode_no_action(event: TcgEvent, uintn_size: int, source: str) -> object:
    data, base = event.data, _data_base(event)
    signature = data[:16]
    if signature == STARTUP_LOCALITY_SIGNATURE:
        if len(data) != 17:
            raise FormatError(f"StartupLocality event is {len(data)} bytes, not 17", source=source,
                              offset=base, field="StartupLocality")
        return StartupLocalityEvent(data[16])
    if signature == SPEC_ID_EVENT03:
        return _parse_spec_id(data, source, base)
    if signature in SP800_155_SIGNATURES:
        return _decode_sp800_155(data, source, base)
    return None


def _decode_sp800_155(data: bytes, source: str, base: int) -> Sp800155Event:
    if len(data) < 36:
        raise FormatError(f"SP800-155 event is {len(data)} bytes, needs 36", source=source,
                          offset=base, field="SP800-155")
    signature = data[:16].rstrip(b"\0").decode("ascii")
    (vendor_id,) = _U32.unpack_from(data, 16)
    manifest = uuid.UUID(bytes_le=data[20:36])
    if signature == "SP800-155 Event":
        return Sp800155Event(signature, vendor_id, manifest, {}, None, bytes(data[36:]))
    pos = 36
    strings: Dict[str, str] = {}

    def sized_string(name: str) -> None:
        nonlocal pos
        if pos >= len(data) or pos + 1 + data[pos] > len(data):
            raise FormatError(f"{name} runs past the end", source=source, offset=base + pos,
                              field=name)
        raw = data[pos + 1:pos + 1 + data[pos]]
        strings[name] = raw.rstrip(b"\0").decode("utf-8", "replace")
        pos += 1 + data[pos]

    for name in ("platform_manufacturer", "platform_model", "platform_version",
                 "firmware_manufacturer"):
        sized_string(name)
    if pos + 4 > len(data):
        raise FormatError("FirmwareManufacturerId runs past the end", source=source,
                          offset=base + pos, field="FirmwareManufacturerId")
    (fw_manufacturer_id,) = _U32.unpack_from(data, pos)
    pos += 4
    sized_string("firmware_version")
    return Sp800155Event(signature, vendor_id, manifest, strings, fw_manufacturer_id,
                         bytes(data[pos:]))


_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # EFI_PARTITION_TABLE_HEADER, 92 bytes
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")


def _decode_gpt(event: TcgEvent, uintn_size: int, source: str) -> GptEvent:
    data, base = event.data, _data_base(event)
    if len(data) < _GPT_HEADER.size:
        raise FormatError(f"GPT event is {len(data)} bytes, needs {_GPT_HEADER.size}",
                          source=source, offset=base, field="UEFI_GPT_DATA")
    header = _GPT_HEADER.unpack_from(data, 0)
    if header[0] != b"EFI PART":
        raise FormatError("GPT header signature is not 'EFI PART'", source=source, offset=base,
                          field="Signature")
    disk_guid, entry_size = uuid.UUID(bytes_le=header[9]), header[12]
    if entry_size < _GPT_ENTRY.size:
        raise FormatError(f"SizeOfPartitionEntry {entry_size} is below {_GPT_ENTRY.size}",
                          source=source, offset=base + 84, field="SizeOfPartitionEntry")
    # NumberOfPartitions is a UINTN; as for image loads, firmware that declares 32-bit
    # UINTNs has been seen writing a 64-bit count, so the size that fills the event wins.
    for count_fmt in (struct.Struct("<Q" if uintn_size == 8 else "<I"),
                      struct.Struct("<I" if uintn_size == 8 else "<Q")):
        fixed = _GPT_HEADER.size + count_fmt.size
        if len(data) >= fixed:
            (count,) = count_fmt.unpack_from(data, _GPT_HEADER.size)
            if count * entry_size == len(data) - fixed:
                break
    else:
        raise FormatError("NumberOfPartitions entries do not fill the GPT event", source=source,
                          offset=base + _GPT_HEADER.size, field="NumberOfPartitions")
    partitions = []
    for i in range(count):
        pos = fixed + i * entry_size
        type_raw, unique_raw, first, last, attributes, name_raw = _GPT_ENTRY.unpack_from(data, pos)
        name = decode_ucs2(name_raw, source, base + pos + 56, "PartitionName").split("\0", 1)[0]
        partitions.append(GptPartition(uuid.UUID(bytes_le=type_raw), uuid.UUID(bytes_le=unique_raw),
                                       first, last, attributes, name))
    return GptEvent(disk_guid, tuple(partitions))


def _decode_firmware_blob(event: TcgEvent, uintn_size: int, source: str) -> FirmwareBlob:
    if len(event.data) != 16:
        raise FormatError(f"firmware blob is {len(event.data)} bytes, not 16", source=source,
                          offset=_data_base(event), field="UEFI_PLATFORM_FIRMWARE_BLOB")
    return FirmwareBlob(*struct.unpack("<QQ", event.data))


def _decode_firmware_blob2(event: TcgEvent, uintn_size: int, source: str) -> FirmwareBlob:
    data, base = event.data, _data_base(event)
    if not data or len(data) != 1 + data[0] + 16:
        raise FormatError(f"BlobDescriptionSize does not fit the {len(data)}-byte event",
                          source=source, offset=base, field="BlobDescriptionSize")
    description = decode_text(data[1:1 + data[0]], source, base + 1, "BlobDescription")
    return FirmwareBlob(*struct.unpack_from("<QQ", data, 1 + data[0]), description=description)


def _decode_tagged(event: TcgEvent, uintn_size: int, source: str) -> TaggedEvent:
    data = event.data
    if len(data) < 8 or 8 + _U32.unpack_from(data, 4)[0] != len(data):
        raise FormatError("taggedEventDataSize does not fill the event", source=source,
                          offset=_data_base(event), field="TCG_PCClientTaggedEvent")
    return TaggedEvent(_U32.unpack_from(data, 0)[0], bytes(data[8:]))


def _decode_handoff_tables(event: TcgEvent, uintn_size: int, source: str) -> HandoffTables:
    data, base = event.data, _data_base(event)
    description = None
    pos = 0
    if event.event_type == EV_EFI_HANDOFF_TABLES2:
        if not data or 1 + data[0] > len(data):
            raise FormatError("TableDescriptionSize runs past the event", source=source,
                              offset=base, field="TableDescriptionSize")
        description = decode_text(data[1:1 + data[0]], source, base + 1, "TableDescription")
        pos = 1 + data[0]
    # NumberOfTables is a UINTN in the EFI_ form and a UINT64 in the UEFI_ form; the size
    # whose count exactly fills the event wins, the declared one first.
    for count_fmt in (struct.Struct("<Q" if uintn_size == 8 else "<I"),
                      struct.Struct("<I" if uintn_size == 8 else "<Q")):
        entry = struct.Struct("<16s" + count_fmt.format[-1])
        if pos + count_fmt.size <= len(data):
            (count,) = count_fmt.unpack_from(data, pos)
            if count * entry.size == len(data) - pos - count_fmt.size:
                start = pos + count_fmt.size
                tables = tuple((uuid.UUID(bytes_le=g), address) for g, address in
                               (entry.unpack_from(data, start + i * entry.size)
                                for i in range(count)))
                return HandoffTables(tables, description)
    raise FormatError("NumberOfTables entries do not fill the event", source=source,
                      offset=base + pos, field="NumberOfTables")


def _decode_text_or_blob(event: TcgEvent, uintn_size: int, source: str) -> object:
    """POST codes, S-CRTM contents and platform config flags: firmware writes either a
    description ("ACPI DATA", "Boot Guard Measured S-CRTM") or a UEFI_PLATFORM_FIRMWARE_BLOB;
    anything else is vendor data, shown raw."""
    try:
        return decode_text(event.data, source, _data_base(event), event.type_name)
    except FormatError:
        pass
    if len(event.data) == 16 and event.event_type != EV_PLATFORM_CONFIG_FLAGS:
        return FirmwareBlob(*struct.unpack("<QQ", event.data))
    return None


Decoder = Callable[[TcgEvent, int, str], object]
EVENT_DATA_DECODERS: Dict[int, Decoder] = {
    EV_EFI_BOOT_SERVICES_APPLICATION: _decode_image_load,
    EV_EFI_BOOT_SERVICES_DRIVER: _decode_image_load,
    EV_EFI_RUNTIME_SERVICES_DRIVER: _decode_image_load,
    EV_EFI_VARIABLE_DRIVER_CONFIG: _decode_variable,
    EV_EFI_VARIABLE_BOOT: _decode_variable,
    EV_EFI_VARIABLE_BOOT2: _decode_variable,
    EV_EFI_VARIABLE_AUTHORITY: _decode_variable,
    EV_EFI_ACTION: _decode_text_event,
    EV_ACTION: _decode_text_event,
    EV_IPL: _decode_text_event,
    EV_EFI_HCRTM_EVENT: _decode_text_event,
    EV_S_CRTM_VERSION: _decode_crtm_version,
    EV_SEPARATOR: _decode_separator,
    EV_NO_ACTION: _decode_no_action,
    EV_EFI_GPT_EVENT: _decode_gpt,
    EV_EFI_PLATFORM_FIRMWARE_BLOB: _decode_firmware_blob,
    EV_EFI_PLATFORM_FIRMWARE_BLOB2: _decode_firmware_blob2,
    EV_EVENT_TAG: _decode_tagged,
    EV_EFI_HANDOFF_TABLES: _decode_handoff_tables,
    EV_EFI_HANDOFF_TABLES2: _decode_handoff_tables,
    EV_POST_CODE: _decode_text_or_blob,
    EV_S_CRTM_CONTENTS: _decode_text_or_blob,
    EV_PLATFORM_CONFIG_FLAGS: _decode_text_or_blob,
}


def decode_event_data(event: TcgEvent, uintn_size: int = 8, source: str = "<bytes>") -> object:
    """The decoded event data, or None for event types without a decoder.  ``uintn_size``
    is in bytes (EventLog.uintn_size)."""
    if uintn_size not in (4, 8):
        raise ValueError(f"uintn_size must be 4 or 8 bytes, not {uintn_size}")
    decoder = EVENT_DATA_DECODERS.get(event.event_type)
    return decoder(event, uintn_size, source) if decoder else None


# --- Description (eventlog --json, predict --explain) -------------------------------------

def _variable_json(var: UefiVariableData) -> Dict[str, Any]:
    return {"guid": str(var.guid), "name": var.name, "data_hex": var.data.hex()}


def _variable_summary(var: UefiVariableData) -> str:
    if len(var.data) <= 4:
        return f"{var.name} = {var.data.hex() or '(empty)'}"
    if var.name == "SbatLevel":
        return f"{var.name} = {var.data.decode('ascii', 'replace').strip()!r}"
    return f"{var.name} ({len(var.data)} bytes)"


def _json_and_summary(decoded: object) -> Tuple[Any, str]:
    if isinstance(decoded, str):
        return decoded, decoded or "(empty text)"
    if isinstance(decoded, int):
        return decoded, f"{decoded:#010x}"
    if isinstance(decoded, uuid.UUID):
        return str(decoded), str(decoded)
    if isinstance(decoded, UefiVariableData):
        return _variable_json(decoded), _variable_summary(decoded)
    if isinstance(decoded, SpecIdEvent):
        algs = {ALGORITHMS.get(a, (f"{a:#06x}", 0))[0]: s for a, s in decoded.algorithms.items()}
        return ({"signature": "Spec ID Event03", "uintn_size": decoded.uintn_size,
                 "algorithms": algs, "vendor_info_hex": decoded.vendor_info.hex()},
                "Spec ID Event03 " + ",".join(algs))
    return decoded.to_json(), decoded.summary()  # type: ignore[attr-defined]


def describe_event(event: TcgEvent, uintn_size: int = 8, source: str = "<bytes>") -> Dict[str, Any]:
    """A JSON-able description.  Event data that fails to decode is shown as hex together
    with the reason, so one odd event never hides the rest of a log."""
    out: Dict[str, Any] = {
        "index": event.index, "offset": event.offset, "pcr": event.pcr,
        "type": event.type_name, "type_value": event.event_type,
        "digests": {bank: digest.hex() for bank, digest in event.digests.items()},
    }
    try:
        decoded = decode_event_data(event, uintn_size, source)
    except FormatError as e:
        out.update(data=None, data_hex=event.data.hex(), data_error=str(e),
                   summary=f"({len(event.data)} bytes, undecodable: {e})")
        return out
    if decoded is None:
        out.update(data=None, data_hex=event.data.hex(), summary=f"({len(event.data)} bytes)")
    else:
        out["data"], out["summary"] = _json_and_summary(decoded)
    return out
