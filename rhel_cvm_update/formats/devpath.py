"""UEFI device paths (UEFI 2.10 chapter 10): parse, encode, print.

A device path is a sequence of nodes, each ``Type u8, SubType u8, Length u16`` plus data.
Nodes this module knows get a class with named fields; every other node is kept as
``DevicePathNode`` with its raw data, so decode-then-encode is byte-exact for paths that
firmware or other tools wrote.
"""

import dataclasses
import struct
import uuid
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats.efi import decode_ucs2, encode_ucs2

HARDWARE, ACPI, MESSAGING, MEDIA, BBS, END = 0x01, 0x02, 0x03, 0x04, 0x05, 0x7F
END_ENTIRE, END_INSTANCE = 0xFF, 0x01
NODE_HEADER = struct.Struct("<BBH")

# systemd-stub (252-257) loads the embedded kernel with this media vendor node as its path.
SYSTEMD_STUB_LINUX_VENDOR_GUID = uuid.UUID("55c5d1f8-04cd-46b5-8a20-e56cbb3052d0")


@dataclasses.dataclass(frozen=True)
class DevicePathNode:
    """A node kept as raw bytes (any type this module does not decode)."""

    type: int
    subtype: int
    data: bytes

    def to_bytes(self) -> bytes:
        return NODE_HEADER.pack(self.type, self.subtype, NODE_HEADER.size + len(self.data)) + self.data

    def __str__(self) -> str:
        return node_text(self)


@dataclasses.dataclass(frozen=True)
class HardDriveNode(DevicePathNode):
    """Media Hard Drive node (04 01).  ``signature`` is the GPT unique partition GUID for
    signature_type 2, else raw."""

    partition_number: int = 0
    start: int = 0
    size: int = 0
    signature: bytes = b"\0" * 16
    mbr_type: int = 2
    signature_type: int = 2

    LAYOUT = struct.Struct("<IQQ16sBB")

    @classmethod
    def gpt(cls, partition_number: int, start: int, size: int, part_guid: uuid.UUID) -> "HardDriveNode":
        data = cls.LAYOUT.pack(partition_number, start, size, part_guid.bytes_le, 2, 2)
        return cls(MEDIA, 0x01, data, partition_number, start, size, part_guid.bytes_le, 2, 2)

    @classmethod
    def decode(cls, node: DevicePathNode, source: str, offset: int) -> "DevicePathNode":
        if len(node.data) != cls.LAYOUT.size:
            raise FormatError(f"Hard Drive node must be 42 bytes, is {len(node.data) + 4}",
                              source=source, offset=offset, field="HD")
        return cls(node.type, node.subtype, node.data, *cls.LAYOUT.unpack(node.data))

    @property
    def partition_guid(self) -> uuid.UUID:
        return uuid.UUID(bytes_le=self.signature)

    def __str__(self) -> str:
        if self.signature_type == 2:
            return (f"HD({self.partition_number},GPT,{self.partition_guid},"
                    f"{self.start:#x},{self.size:#x})")
        if self.signature_type == 1:
            sig = int.from_bytes(self.signature[:4], "little")
            return f"HD({self.partition_number},MBR,{sig:#010x},{self.start:#x},{self.size:#x})"
        return (f"HD({self.partition_number},{self.signature_type},{self.signature.hex()},"
                f"{self.start:#x},{self.size:#x})")


@dataclasses.dataclass(frozen=True)
class FilePathNode(DevicePathNode):
    """Media File Path node (04 04): a NUL-terminated UCS-2 path."""

    path: str = ""

    @classmethod
    def from_path(cls, path: str) -> "FilePathNode":
        return cls(MEDIA, 0x04, encode_ucs2(path), path)

    @classmethod
    def decode(cls, node: DevicePathNode, source: str, offset: int) -> "DevicePathNode":
        raw = node.data
        if len(raw) < 2 or raw[-2:] != b"\0\0":
            raise FormatError("File Path node is not NUL-terminated", source=source, offset=offset,
                              field="File")
        return cls(node.type, node.subtype, raw, decode_ucs2(raw[:-2], source, offset + 4, "File"))

    def __str__(self) -> str:
        return f"File({self.path})"


_VENDOR_TEXT = {HARDWARE: "VenHw", MESSAGING: "VenMsg", MEDIA: "VenMedia"}


@dataclasses.dataclass(frozen=True)
class VendorNode(DevicePathNode):
    """Vendor node (hardware 01 04, messaging 03 0A, media 04 03): GUID + vendor data."""

    guid: uuid.UUID = uuid.UUID(int=0)
    vendor_data: bytes = b""

    @classmethod
    def media(cls, guid: uuid.UUID, vendor_data: bytes = b"") -> "VendorNode":
        return cls(MEDIA, 0x03, guid.bytes_le + vendor_data, guid, vendor_data)

    @classmethod
    def decode(cls, node: DevicePathNode, source: str, offset: int) -> "DevicePathNode":
        if len(node.data) < 16:
            raise FormatError("Vendor node shorter than its GUID", source=source, offset=offset,
                              field="Vendor")
        return cls(node.type, node.subtype, node.data, uuid.UUID(bytes_le=node.data[:16]),
                   node.data[16:])

    def __str__(self) -> str:
        if self.type == MESSAGING and self.guid in _MESSAGING_VENDOR_TEXT:
            return _MESSAGING_VENDOR_TEXT[self.guid](self.vendor_data)
        extra = f",{self.vendor_data.hex()}" if self.vendor_data else ""
        return f"{_VENDOR_TEXT[self.type]}({self.guid}{extra})"


@dataclasses.dataclass(frozen=True)
class EndNode(DevicePathNode):
    def __str__(self) -> str:
        return "" if self.subtype == END_ENTIRE else ","


END_ENTIRE_NODE = EndNode(END, END_ENTIRE, b"")

Decoder = Callable[[DevicePathNode, str, int], DevicePathNode]
NODE_DECODERS: Dict[Tuple[int, int], Decoder] = {
    (MEDIA, 0x01): HardDriveNode.decode,
    (MEDIA, 0x04): FilePathNode.decode,
    (HARDWARE, 0x04): VendorNode.decode,
    (MESSAGING, 0x0A): VendorNode.decode,
    (MEDIA, 0x03): VendorNode.decode,
    (END, END_ENTIRE): lambda n, s, o: EndNode(n.type, n.subtype, n.data),
    (END, END_INSTANCE): lambda n, s, o: EndNode(n.type, n.subtype, n.data),
}


def iter_nodes(buf: bytes, source: str = "<bytes>", base_offset: int = 0) -> Iterator[DevicePathNode]:
    pos = 0
    while pos < len(buf):
        if pos + NODE_HEADER.size > len(buf):
            raise FormatError("device path node header runs past the end", source=source,
                              offset=base_offset + pos, field="DevicePath")
        ntype, subtype, length = NODE_HEADER.unpack_from(buf, pos)
        # A length below the header size would never advance: the classic looping device path.
        if length < NODE_HEADER.size or pos + length > len(buf):
            raise FormatError(f"device path node length {length} is invalid", source=source,
                              offset=base_offset + pos, field="DevicePath")
        raw = DevicePathNode(ntype, subtype, bytes(buf[pos + NODE_HEADER.size:pos + length]))
        decode = NODE_DECODERS.get((ntype, subtype))
        yield decode(raw, source, base_offset + pos) if decode else raw
        pos += length


def parse_device_path(buf: bytes, source: str = "<bytes>", base_offset: int = 0,
                      require_end: bool = True) -> Tuple[DevicePathNode, ...]:
    """All nodes of ``buf`` (one or more instances).  With require_end, the last node must be
    End Entire and nothing may follow it."""
    nodes = tuple(iter_nodes(buf, source, base_offset))
    if require_end:
        if not nodes or not (nodes[-1].type == END and nodes[-1].subtype == END_ENTIRE):
            raise FormatError("device path does not end with an End Entire node", source=source,
                              offset=base_offset + len(buf), field="DevicePath")
    return nodes


def device_path_bytes(nodes: Sequence[DevicePathNode]) -> bytes:
    return b"".join(n.to_bytes() for n in nodes)


def device_path_text(nodes: Sequence[DevicePathNode]) -> str:
    """efibootmgr-like text: nodes joined by '/', instances by ','."""
    parts: List[str] = []
    for node in nodes:
        if isinstance(node, EndNode):
            if node.subtype == END_INSTANCE:
                parts.append(",")
            continue
        if parts and parts[-1] != ",":
            parts.append("/")
        parts.append(str(node))
    return "".join(parts)


# --- Text of the nodes that only need printing --------------------------------------------------
# The spellings follow libefivar (efivar 37, src/dp-*.c), which `efibootmgr -v` prints with, so
# `boot list` and efibootmgr show the same text.  A node whose length does not fit its layout is
# printed with the generic form of its type instead of being guessed at.

TextFormatter = Callable[[bytes], str]

# ACPI _HID values: EISA "PNP" id in the low half, device number in the high half.
_ACPI_HID_TEXT = {
    0x0A0341D0: "PciRoot",
    0x0A0841D0: "PcieRoot",
    0x060441D0: "Floppy",
    0x030341D0: "Keyboard",
    0x050141D0: "Serial",
}

_RAMDISK_TYPES = {
    uuid.UUID("77ab535a-45fc-624b-5560-f7b281d1f96e"): "VirtualDisk",
    uuid.UUID("3d5abd30-4175-87ce-6d64-d2ade523c4bb"): "VirtualCD",
    uuid.UUID("5cea02c9-4d07-69d3-269f-4496fbe096f9"): "PersistentVirtualDisk",
    uuid.UUID("08018188-42cd-bb48-100f-5387d53ded3d"): "PersistentVirtualCD",
}

_BBS_DEVICE_TYPES = {1: "Floppy", 2: "HD", 3: "CDROM", 4: "PCMCIA", 5: "USB", 6: "Network"}

_GENERIC_TYPE_TEXT = {HARDWARE: "HardwarePath", ACPI: "AcpiPath", MESSAGING: "Msg",
                      MEDIA: "MediaPath", BBS: "BbsPath"}


def _fixed(layout: str, render: Callable[..., str]) -> TextFormatter:
    """A formatter for a node with a fixed layout; other lengths get the generic text."""
    shape = struct.Struct("<" + layout)

    def formatter(data: bytes) -> str:
        if len(data) != shape.size:
            raise _NoSpecificText
        return render(*shape.unpack(data))
    return formatter


class _NoSpecificText(Exception):
    """Internal: this node has no text of its own (wrong length for its layout, or a variant
    libefivar does not name); it is printed in the generic form of its type."""


def _acpi_hid(hid: int, uid: int) -> str:
    name = _ACPI_HID_TEXT.get(hid)
    return f"{name}({uid:#x})" if name else f"Acpi({hid:#010x},{uid:#x})"


def _acpi_adr(data: bytes) -> str:
    if not data or len(data) % 4:
        raise _NoSpecificText
    values = struct.unpack(f"<{len(data) // 4}I", data)
    return "AcpiAdr(" + ",".join(f"{v:#x}" for v in values) + ")"


def _ipv4_address(raw: bytes, port: int) -> str:
    text = ".".join(str(b) for b in raw)
    return f"{text}:{port}" if port > 0 else text


def _ipv4(local: bytes, remote: bytes, local_port: int, remote_port: int, protocol: int,
          static: int, _gateway: bytes, _mask: bytes) -> str:
    # libefivar prints the two addresses without a separator between them.
    return (f"IPv4({_ipv4_address(local, local_port)}{_ipv4_address(remote, remote_port)},"
            f"{protocol:x},{static:x})")


def _mac(data: bytes) -> str:
    if len(data) != 33:
        raise _NoSpecificText
    if_type = data[32]
    address = data[:6] if if_type < 2 else data[:32]
    return f"MAC({address.hex()},{if_type})"


_USB_CLASS_TEXT = {0x01: "UsbAudio", 0x02: "UsbCDCControl", 0x03: "UsbHID", 0x06: "UsbImage",
                   0x07: "UsbPrinter", 0x08: "UsbMassStorage", 0x09: "UsbHub",
                   0x0A: "UsbCDCData", 0x0B: "UsbSmartCard", 0x0E: "UsbVideo",
                   0xDC: "UsbDiagnostic", 0xE0: "UsbWireless"}


def _usb_class(vendor: int, product: int, device_class: int, subclass: int, protocol: int) -> str:
    label = _USB_CLASS_TEXT.get(device_class)
    if label:
        return f"{label}({vendor:#x},{product:#x},{subclass},{protocol})"
    if device_class == 0xFE:
        raise _NoSpecificText
    return f"UsbClass({vendor:x},{product:x},{subclass},{protocol})"


def _uri(data: bytes) -> str:
    return "Uri(" + data.split(b"\0", 1)[0].decode("latin-1") + ")"


def _nvme(namespace: int, eui: bytes) -> str:
    return f"NVMe({namespace:#x},{'-'.join(f'{b:02X}' for b in eui)})"


def _ramdisk(data: bytes) -> str:
    if len(data) != 34:
        raise _NoSpecificText
    start, end = struct.unpack_from("<QQ", data, 0)
    disk_type = uuid.UUID(bytes_le=data[16:32])
    (instance,) = struct.unpack_from("<H", data, 32)
    label = _RAMDISK_TYPES.get(disk_type)
    if label:
        return f"{label}({start:#x},{end:#x},{instance})"
    return f"Ramdisk({start:#x},{end:#x},{instance},{disk_type})"


def _guid_node(label: str) -> TextFormatter:
    def formatter(data: bytes) -> str:
        if len(data) != 16:
            raise _NoSpecificText
        return f"{label}({uuid.UUID(bytes_le=data)})"
    return formatter


def _uart(data: bytes) -> str:
    if len(data) != 15:
        raise _NoSpecificText
    baud, data_bits, parity, stop_bits = struct.unpack_from("<QBBB", data, 4)
    parity_text = "DNEOMS"[parity] if parity <= 5 else str(parity)
    stop_text = ("D", "1", "1.5", "2")[stop_bits] if stop_bits <= 3 else str(stop_bits)
    return f"Uart({baud or 115200},{data_bits or 8},{parity_text},{stop_text})"


def _bbs(data: bytes) -> str:
    if len(data) < 5 or data[-1] != 0:
        raise _NoSpecificText
    device_type, status = struct.unpack_from("<HH", data, 0)
    description = data[4:-1].split(b"\0", 1)[0].decode("latin-1")
    kind = _BBS_DEVICE_TYPES.get(device_type, str(device_type))
    return f"BBS({kind},{description},{status:#x})"


NODE_TEXT: Dict[Tuple[int, int], TextFormatter] = {
    (HARDWARE, 0x01): _fixed("BB", lambda function, device: f"Pci({device:#x},{function:#x})"),
    (HARDWARE, 0x02): _fixed("B", lambda function: f"PcCard({function:#x})"),
    (HARDWARE, 0x03): _fixed("IQQ", lambda kind, start, end: f"MemoryMapped({kind},{start:#x},{end:#x})"),
    (HARDWARE, 0x05): _fixed("I", lambda controller: f"Ctrl({controller:#x})"),
    (ACPI, 0x01): _fixed("II", _acpi_hid),
    (ACPI, 0x03): _acpi_adr,
    (MESSAGING, 0x01): _fixed("BBH", lambda primary, slave, lun: f"Ata({primary},{slave},{lun})"),
    (MESSAGING, 0x02): _fixed("HH", lambda target, lun: f"SCSI({target},{lun})"),
    (MESSAGING, 0x05): _fixed("BB", lambda port, interface: f"USB({port},{interface})"),
    (MESSAGING, 0x0B): _mac,
    (MESSAGING, 0x0C): _fixed("4s4sHHHB4s4s", _ipv4),
    (MESSAGING, 0x0E): _uart,
    (MESSAGING, 0x0F): _fixed("HHBBB", _usb_class),
    (MESSAGING, 0x11): _fixed("B", lambda lun: f"Unit({lun})"),
    # libefivar 37 prints the port multiplier port unsigned: 0xFFFF (none) shows as 65535.
    (MESSAGING, 0x12): _fixed("HHH", lambda hba, pmp, lun: f"Sata({hba},{pmp},{lun})"),
    (MESSAGING, 0x14): _fixed("H", lambda vlan: f"Vlan({vlan})"),
    (MESSAGING, 0x17): _fixed("I8s", _nvme),
    (MESSAGING, 0x18): _uri,
    (MESSAGING, 0x1A): _fixed("B", lambda slot: f"SD({slot})"),
    (MESSAGING, 0x1D): _fixed("B", lambda slot: f"eMMC({slot})"),
    (MEDIA, 0x02): _fixed("IQQ", lambda entry, start, size: f"CDROM({entry},{start:#x},{size:#x})"),
    (MEDIA, 0x05): _guid_node("Media"),
    (MEDIA, 0x06): _guid_node("FvFile"),
    (MEDIA, 0x07): _guid_node("FvVol"),
    (MEDIA, 0x08): _fixed("IQQ", lambda _reserved, first, last: f"Offset({first:#x},{last:#x})"),
    (MEDIA, 0x09): _ramdisk,
    (BBS, 0x01): _bbs,
}


def _terminal(label: str) -> Callable[[bytes], str]:
    return lambda vendor_data: f"{label}({vendor_data.hex()})"


def _uart_flow_control(vendor_data: bytes) -> str:
    if len(vendor_data) != 4:
        return f"VenMsg(37499a9d-542f-4c89-a026-35da142094e4,{vendor_data.hex()})"
    (flow,) = struct.unpack("<I", vendor_data)
    return f"UartFlowControl({('None', 'Hardware', 'XonXoff')[flow] if flow <= 2 else flow})"


_MESSAGING_VENDOR_TEXT: Dict[uuid.UUID, Callable[[bytes], str]] = {
    uuid.UUID("e0c14753-f9be-11d2-9a0c-0090273fc14d"): _terminal("VenPcAnsi"),
    uuid.UUID("dfa66065-b419-11d3-9a2d-0090273fc14d"): _terminal("VenVt100"),
    uuid.UUID("7baec70b-57e0-4c76-8e87-2f9e28088343"): _terminal("VenVt100Plus"),
    uuid.UUID("ad15a0d6-8bec-4acf-a073-d01de77e2d88"): _terminal("VenUtf8"),
    uuid.UUID("eba4e8d2-3858-41ec-a281-2647ba9660d0"): _terminal("DebugPort"),
    uuid.UUID("37499a9d-542f-4c89-a026-35da142094e4"): _uart_flow_control,
}


def node_text(node: DevicePathNode) -> str:
    """efibootmgr's text for a node kept as raw bytes."""
    formatter = NODE_TEXT.get((node.type, node.subtype))
    if formatter is not None:
        try:
            return formatter(node.data)
        except _NoSpecificText:
            pass
    generic = _GENERIC_TYPE_TEXT.get(node.type)
    if generic:
        return f"{generic}({node.subtype},{node.data.hex()})"
    return f"Path({node.type},{node.subtype},{node.data.hex()})"
