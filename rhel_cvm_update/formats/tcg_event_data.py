"""The data of TCG event-log events: what each event type's bytes say.

``decode_event_data`` turns an event's data into a typed record (an image load with its
device path, a UEFI variable, a GPT, a firmware blob, a tag, the Spec ID header...);
``describe_event`` is what ``eventlog --json`` and ``predict --explain`` print.  Pure
functions over the bytes of one event, every length checked: hostile data is a FormatError
naming the source, the offset and the field.  The data is untrusted: only its digest,
replayed against the TPM (tcglog.py), is evidence.
"""

import dataclasses
import struct
import uuid
from typing import Any, Callable, Dict, Optional, Tuple

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats.devpath import DevicePathNode, device_path_text, parse_device_path
from rhel_cvm_update.formats.efi import UefiVariableData, decode_ucs2
from rhel_cvm_update.formats.gpt import HEADER_SIZE, GptHeader, GptPartition, parse_entry
from rhel_cvm_update.formats.tcglog import (EV_ACTION, EV_EFI_ACTION,
                                            EV_EFI_BOOT_SERVICES_APPLICATION, EV_EFI_BOOT_SERVICES_DRIVER,
                                            EV_EFI_GPT_EVENT, EV_EFI_HANDOFF_TABLES, EV_EFI_HANDOFF_TABLES2,
                                            EV_EFI_HCRTM_EVENT, EV_EFI_PLATFORM_FIRMWARE_BLOB,
                                            EV_EFI_PLATFORM_FIRMWARE_BLOB2, EV_EFI_RUNTIME_SERVICES_DRIVER,
                                            EV_EFI_VARIABLE_AUTHORITY, EV_EFI_VARIABLE_BOOT,
                                            EV_EFI_VARIABLE_BOOT2, EV_EFI_VARIABLE_DRIVER_CONFIG,
                                            EV_EVENT_TAG, EV_IPL, EV_NO_ACTION, EV_PLATFORM_CONFIG_FLAGS,
                                            EV_POST_CODE, EV_SEPARATOR, EV_S_CRTM_CONTENTS,
                                            EV_S_CRTM_VERSION, SPEC_ID_EVENT03, STARTUP_LOCALITY_SIGNATURE,
                                            TcgEvent, parse_spec_id)

# The Linux EFI stub's EV_EVENT_TAG ids (systemd src/fundamental/tpm2-event-log.h).
LINUX_EVENT_TAGS = {0x8F3B22EC: "Linux initrd", 0x8F3B22ED: "Linux load options"}
SP800_155_SIGNATURES = (b"SP800-155 Event\0", b"SP800-155 Event2", b"SP800-155 Event3")
_U32 = struct.Struct("<I")


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
        return parse_spec_id(data, source, base)
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


def _decode_gpt(event: TcgEvent, uintn_size: int, source: str) -> GptEvent:
    """UEFI_GPT_DATA: EFI_PARTITION_TABLE_HEADER (92 bytes), UINTN NumberOfPartitions, then
    the used entries only (no array CRC to check), parsed with the ESP's own GPT structures."""
    data, base = event.data, _data_base(event)
    if len(data) < HEADER_SIZE:
        raise FormatError(f"GPT event is {len(data)} bytes, needs {HEADER_SIZE}",
                          source=source, offset=base, field="UEFI_GPT_DATA")
    header = GptHeader.from_bytes(data[:HEADER_SIZE], source, base, verify_crc=False)
    # NumberOfPartitions is a UINTN; as for image loads, firmware that declares 32-bit
    # UINTNs has been seen writing a 64-bit count, so the size that fills the event wins.
    for count_fmt in (struct.Struct("<Q" if uintn_size == 8 else "<I"),
                      struct.Struct("<I" if uintn_size == 8 else "<Q")):
        fixed = HEADER_SIZE + count_fmt.size
        if len(data) >= fixed:
            (count,) = count_fmt.unpack_from(data, HEADER_SIZE)
            if count * header.entry_size == len(data) - fixed:
                break
    else:
        raise FormatError("NumberOfPartitions entries do not fill the GPT event", source=source,
                          offset=base + HEADER_SIZE, field="NumberOfPartitions")
    partitions = tuple(parse_entry(data, fixed + i * header.entry_size, None, source, base) for i in range(count))
    return GptEvent(header.disk_guid, partitions)


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
