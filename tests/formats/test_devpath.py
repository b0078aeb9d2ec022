"""rhel_cvm_update.formats.devpath: parsing, byte-exact re-encoding, efibootmgr-style text.

The text of every node kind listed here is compared with what `efibootmgr -v` prints for the
same bytes in tests/interop/test_efibootmgr.py; this file checks structure and hostile input.
"""

import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats.devpath import (END_ENTIRE_NODE, SYSTEMD_STUB_LINUX_VENDOR_GUID,
                                             DevicePathNode, FilePathNode, HardDriveNode,
                                             VendorNode, device_path_bytes, device_path_text,
                                             parse_device_path)

PCI_ROOT = DevicePathNode(0x02, 0x01, struct.pack("<II", 0x0A0341D0, 0))
PCI = DevicePathNode(0x01, 0x01, bytes([0x0, 0x1F]))  # function 0, device 0x1f
SATA = DevicePathNode(0x03, 0x12, struct.pack("<HhH", 0, -1, 0))
END_INSTANCE = DevicePathNode(0x7F, 0x01, b"")


def test_systemd_stub_vendor_path_bytes_from_reference():
    # measured-boot-reference.md 2.3: the device path systemd-stub passes to LoadImage.
    raw = bytes.fromhex("04031400f8d1c555cd04b5468a20e56cbb3052d07fff0400")
    nodes = parse_device_path(raw)
    assert isinstance(nodes[0], VendorNode) and nodes[0].guid == SYSTEMD_STUB_LINUX_VENDOR_GUID
    assert device_path_bytes(nodes) == raw
    assert device_path_bytes([VendorNode.media(SYSTEMD_STUB_LINUX_VENDOR_GUID), END_ENTIRE_NODE]) == raw
    assert device_path_text(nodes) == f"VenMedia({SYSTEMD_STUB_LINUX_VENDOR_GUID})"


def test_full_firmware_style_path_text_and_roundtrip():
    guid = uuid.UUID("dfd174e6-98ed-4451-bef2-87bd26942d4d")
    nodes = (PCI_ROOT, PCI, SATA, HardDriveNode.gpt(1, 0x800, 0x10000, guid),
             FilePathNode.from_path("\\EFI\\redhat\\shimx64.efi"), END_ENTIRE_NODE)
    raw = device_path_bytes(nodes)
    parsed = parse_device_path(raw)
    assert device_path_bytes(parsed) == raw
    assert device_path_text(parsed) == (
        "PciRoot(0x0)/Pci(0x1f,0x0)/Sata(0,65535,0)/"
        f"HD(1,GPT,{guid},0x800,0x10000)/File(\\EFI\\redhat\\shimx64.efi)")


def test_wrong_length_known_node_prints_generic_form():
    short_pci = DevicePathNode(0x01, 0x01, b"\x00")
    assert str(short_pci) == "HardwarePath(1,00)"
    assert str(DevicePathNode(0x20, 0x02, b"\xab")) == "Path(32,2,ab)"


def test_multi_instance_text():
    nodes = (PCI_ROOT, END_INSTANCE, PCI, END_ENTIRE_NODE)
    assert device_path_text(parse_device_path(device_path_bytes(nodes))) == "PciRoot(0x0),Pci(0x1f,0x0)"


@pytest.mark.parametrize("raw", [
    b"\x04\x04",                                  # header cut
    b"\x04\x04\x08\x00\x41\x00",                  # length past the end
    b"\x04\x04\x02\x00\x7f\xff\x04\x00",          # length below the header
    b"\x04\x04\x08\x00\x41\x00\x42\x00\x7f\xff\x04\x00",  # File without NUL
    b"\x04\x01\x10\x00" + bytes(12) + b"\x7f\xff\x04\x00",  # HD of the wrong size
    b"\x04\x03\x08\x00abcd\x7f\xff\x04\x00",       # Vendor shorter than its GUID
    b"\x01\x01\x06\x00\x00\x01",                  # no End node
    b"",
])
def test_hostile_paths(raw):
    with pytest.raises(FormatError):
        parse_device_path(raw, source="test")


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_parse_or_raise_format_error(raw):
    try:
        nodes = parse_device_path(raw)
    except FormatError:
        return
    assert device_path_bytes(nodes) == raw
    device_path_text(nodes)
