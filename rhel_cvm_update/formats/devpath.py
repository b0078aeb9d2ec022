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
        return f"Path({self.type},{self.subtype},{self.data.hex()})"


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
        return f"HD({self.partition_number},{self.signature_type},{self.start:#x},{self.size:#x})"


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
