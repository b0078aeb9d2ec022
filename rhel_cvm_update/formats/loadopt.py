"""EFI_LOAD_OPTION (Boot####, UEFI 2.10 section 3.1.3) and the BootOrder/BootNext u16 arrays.

Layout (little-endian): Attributes u32, FilePathListLength u16, Description (UCS-2, NUL
terminated), FilePathList (device paths, the last node End Entire), OptionalData (the rest,
handed to the image as its LoadOptions exactly as stored).

The checks are the ones Linux applies before it passes a Boot#### write to the firmware
(fs/efivarfs/vars.c validate_load_option), so anything this module accepts is also accepted
by efivarfs, and anything it produces is too.
"""

import dataclasses
import re
import struct
from typing import Any, Dict, Optional, Sequence, Tuple

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats.devpath import (DevicePathNode, device_path_bytes, device_path_text,
                                             parse_device_path)
from rhel_cvm_update.formats.efi import decode_ucs2, encode_ucs2, read_ucs2z

LOAD_OPTION_ACTIVE = 0x00000001
LOAD_OPTION_FORCE_RECONNECT = 0x00000002
LOAD_OPTION_HIDDEN = 0x00000008
LOAD_OPTION_CATEGORY = 0x00001F00
LOAD_OPTION_CATEGORY_BOOT = 0x00000000
LOAD_OPTION_CATEGORY_APP = 0x00000100

_HEADER = struct.Struct("<IH")
_U16 = struct.Struct("<H")
_BOOT_NAME = re.compile(r"^Boot([0-9A-Fa-f]{4})$")


@dataclasses.dataclass(frozen=True)
class LoadOption:
    attributes: int
    description: str
    device_path: Tuple[DevicePathNode, ...]
    optional_data: bytes = b""

    @classmethod
    def from_bytes(cls, buf: bytes, source: str = "<load option>") -> "LoadOption":
        buf = bytes(buf)
        if len(buf) < _HEADER.size:
            raise FormatError(f"load option has {len(buf)} bytes, fewer than its 6-byte header",
                              source=source, offset=0, field="Attributes")
        attributes, path_length = _HEADER.unpack_from(buf, 0)
        description, path_start = read_ucs2z(buf, _HEADER.size, len(buf), source, "Description")
        path_end = path_start + path_length
        if path_end > len(buf):
            raise FormatError(f"FilePathListLength {path_length} runs past the end of the "
                              f"{len(buf)}-byte option", source=source, offset=4,
                              field="FilePathListLength")
        nodes = parse_device_path(buf[path_start:path_end], source, path_start)
        return cls(attributes, description, nodes, buf[path_end:])

    def to_bytes(self) -> bytes:
        path = device_path_bytes(self.device_path)
        if len(path) > 0xFFFF:
            raise ValueError(f"device path of {len(path)} bytes does not fit FilePathListLength")
        return (_HEADER.pack(self.attributes, len(path)) + encode_ucs2(self.description) + path
                + self.optional_data)

    @property
    def active(self) -> bool:
        return bool(self.attributes & LOAD_OPTION_ACTIVE)

    def optional_data_path(self) -> Optional[str]:
        """The optional data as the UCS-2 path (with its NUL) that shim reads as its second
        stage; None when the data is anything else."""
        return ucs2z_text(self.optional_data)

    def to_json(self) -> Dict[str, Any]:
        return {
            "attributes": self.attributes,
            "active": self.active,
            "description": self.description,
            "device_path": device_path_text(self.device_path),
            "optional_data": self.optional_data.hex(),
            "optional_data_path": self.optional_data_path(),
        }


def ucs2z_optional_data(path: str) -> bytes:
    """A second-stage path for shim: UCS-2LE with a terminating NUL (shim's
    split_load_options needs a space or NUL to find the end of the first token)."""
    return encode_ucs2(path)


def ucs2z_text(data: bytes) -> Optional[str]:
    """The text of UCS-2LE bytes that end in exactly one NUL and hold no other; else None."""
    if len(data) < 2 or len(data) % 2 or data[-2:] != b"\0\0":
        return None
    try:
        text = decode_ucs2(data[:-2])
    except FormatError:
        return None
    return None if "\0" in text else text


def boot_variable_name(number: int) -> str:
    if not 0 <= number <= 0xFFFF:
        raise ValueError(f"boot option number {number} is outside 0..0xFFFF")
    return f"Boot{number:04X}"


def boot_number(variable_name: str) -> Optional[int]:
    """The number of a ``Boot####`` variable name, None for any other name (BootOrder...)."""
    match = _BOOT_NAME.match(variable_name)
    return int(match.group(1), 16) if match else None


def parse_boot_order(buf: bytes, source: str = "BootOrder") -> Tuple[int, ...]:
    if len(buf) % 2:
        raise FormatError(f"BootOrder has an odd length {len(buf)}", source=source,
                          offset=len(buf) - 1, field="BootOrder")
    return struct.unpack(f"<{len(buf) // 2}H", buf)


def boot_order_bytes(numbers: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(numbers)}H", *numbers)


def parse_boot_next(buf: bytes, source: str = "BootNext") -> int:
    if len(buf) != _U16.size:
        raise FormatError(f"BootNext must be 2 bytes, has {len(buf)}", source=source, offset=0,
                          field="BootNext")
    return _U16.unpack(buf)[0]


def boot_next_bytes(number: int) -> bytes:
    return _U16.pack(number)
