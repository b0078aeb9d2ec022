"""TCG PC Client event logs: parse and replay (the event data: tcg_event_data.py).

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
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from rhel_cvm_update.errors import FormatError, UnsupportedError

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


def parse_spec_id(data: bytes, source: str, base: int) -> SpecIdEvent:
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
        spec_id = parse_spec_id(first_data, source, data_pos)
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
