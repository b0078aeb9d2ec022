"""rhel_cvm_update.formats.loadopt: EFI_LOAD_OPTION, BootOrder, BootNext.

Golden bytes: shim's test-load-options.c ``test_bds_0`` vector (measured-boot-reference.md 6.2)
and, in tests/interop/test_efibootmgr.py, variables written by efibootmgr itself.
"""

import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats import loadopt
from rhel_cvm_update.formats.devpath import (END_ENTIRE_NODE, NODE_DECODERS, DevicePathNode,
                                             FilePathNode, HardDriveNode, VendorNode,
                                             device_path_text)
from rhel_cvm_update.formats.loadopt import LoadOption

# shim test-load-options.c test_bds_0: "Linux Firmware Updater" -> \EFI\fedora\shimx64.efi with
# optional data \fwupx64.efi.
SHIM_BDS_0 = bytes.fromhex(
    "01000000" "6200"
    + "Linux Firmware Updater\0".encode("utf-16-le").hex()
    + "04012a00" "01000000" "0008000000000000" "0040060000000000"
    "1a9e55bf0457f24fb44aed264a406a94" "02" "02"
    + "04043400" + "\\EFI\\fedora\\shimx64.efi\0".encode("utf-16-le").hex()
    + "7fff0400"
    + "\\fwupx64.efi\0".encode("utf-16-le").hex())


def test_shim_bds_0_vector_decodes():
    option = LoadOption.from_bytes(SHIM_BDS_0)
    assert option.attributes == loadopt.LOAD_OPTION_ACTIVE and option.active
    assert option.description == "Linux Firmware Updater"
    hd, file_node, end = option.device_path
    assert isinstance(hd, HardDriveNode) and isinstance(file_node, FilePathNode)
    assert (hd.partition_number, hd.start, hd.size) == (1, 0x800, 0x64000)
    assert hd.partition_guid == uuid.UUID(bytes_le=bytes.fromhex("1a9e55bf0457f24fb44aed264a406a94"))
    assert file_node.path == "\\EFI\\fedora\\shimx64.efi"
    assert end == END_ENTIRE_NODE
    assert option.optional_data_path() == "\\fwupx64.efi"
    assert device_path_text(option.device_path) == (
        f"HD(1,GPT,{hd.partition_guid},0x800,0x64000)/File(\\EFI\\fedora\\shimx64.efi)")


def test_shim_bds_0_vector_reencodes_byte_exact():
    assert LoadOption.from_bytes(SHIM_BDS_0).to_bytes() == SHIM_BDS_0


def test_built_option_equals_shim_vector():
    guid = uuid.UUID(bytes_le=bytes.fromhex("1a9e55bf0457f24fb44aed264a406a94"))
    built = LoadOption(1, "Linux Firmware Updater",
                       (HardDriveNode.gpt(1, 0x800, 0x64000, guid),
                        FilePathNode.from_path("\\EFI\\fedora\\shimx64.efi"), END_ENTIRE_NODE),
                       loadopt.ucs2z_optional_data("\\fwupx64.efi"))
    assert built.to_bytes() == SHIM_BDS_0


@pytest.mark.parametrize("length", [0, 3, 5, 6, 20, 50, 100, len(SHIM_BDS_0) - 30])
def test_truncated_option_is_format_error(length):
    # Cutting inside the optional data is still a valid option; every cut before it is not.
    with pytest.raises(FormatError):
        LoadOption.from_bytes(SHIM_BDS_0[:length], source="Boot0001")


def test_file_path_list_length_past_end():
    bad = SHIM_BDS_0[:4] + struct.pack("<H", 0x400) + SHIM_BDS_0[6:]
    with pytest.raises(FormatError) as info:
        LoadOption.from_bytes(bad, source="Boot0002")
    assert info.value.field == "FilePathListLength" and "Boot0002" in str(info.value)


def test_description_without_nul():
    bad = struct.pack("<IH", 1, 4) + "abc".encode("utf-16-le")
    with pytest.raises(FormatError) as info:
        LoadOption.from_bytes(bad, source="Boot0003")
    assert info.value.field == "Description"


def test_file_path_list_without_end_node():
    hd_only = SHIM_BDS_0[:0x32] + SHIM_BDS_0[0x32:0x32 + 42]
    bad = hd_only[:4] + struct.pack("<H", 42) + hd_only[6:]
    with pytest.raises(FormatError):
        LoadOption.from_bytes(bad)


def test_node_length_below_header_does_not_loop():
    bad = struct.pack("<IH", 1, 8) + b"\0\0" + b"\x04\x04\x02\x00" + b"\x7f\xff\x04\x00"
    with pytest.raises(FormatError):
        LoadOption.from_bytes(bad)


def test_boot_order_roundtrip_and_odd_length():
    assert loadopt.parse_boot_order(b"\x03\x00\x01\x00\x00\x10") == (3, 1, 0x1000)
    assert loadopt.boot_order_bytes([3, 1, 0x1000]) == b"\x03\x00\x01\x00\x00\x10"
    with pytest.raises(FormatError):
        loadopt.parse_boot_order(b"\x03\x00\x01")


def test_boot_next():
    assert loadopt.parse_boot_next(b"\x0a\x00") == 10
    assert loadopt.boot_next_bytes(10) == b"\x0a\x00"
    for bad in (b"", b"\x01", b"\x01\x00\x02\x00"):
        with pytest.raises(FormatError):
            loadopt.parse_boot_next(bad)


def test_boot_variable_names():
    assert loadopt.boot_variable_name(0xA) == "Boot000A"
    assert loadopt.boot_number("Boot00aF") == 0xAF
    assert loadopt.boot_number("BootOrder") is None
    assert loadopt.boot_number("Boot12345") is None


def test_optional_data_text():
    assert loadopt.ucs2z_text("\\EFI\\Linux\\a.efi\0".encode("utf-16-le")) == "\\EFI\\Linux\\a.efi"
    # efibootmgr -u writes no NUL: not a path shim can take (reference 6.3).
    assert loadopt.ucs2z_text("\\EFI\\Linux\\a.efi".encode("utf-16-le")) is None
    assert loadopt.ucs2z_text(b"\x01\x02\x03") is None
    assert loadopt.ucs2z_text("a\0b\0".encode("utf-16-le")) is None


# --- property tests -------------------------------------------------------------------------

ucs2_text = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0xFFFF,
                                           blacklist_categories=("Cs",)), max_size=40)

# Raw nodes of every type/subtype the parser does not decode into a class of its own.
raw_nodes = st.builds(
    DevicePathNode,
    st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05]),
    st.integers(0, 255),
    st.binary(max_size=40)).filter(lambda n: (n.type, n.subtype) not in NODE_DECODERS)
hd_nodes = st.builds(HardDriveNode.gpt, st.integers(1, 128), st.integers(0, 2**64 - 1),
                     st.integers(0, 2**64 - 1), st.uuids())
file_nodes = st.builds(FilePathNode.from_path, ucs2_text)
vendor_nodes = st.one_of(
    st.builds(VendorNode.media, st.uuids(), st.binary(max_size=20)),
    st.builds(lambda t, g, d: VendorNode(t, {1: 0x04, 3: 0x0A}[t], g.bytes_le + d, g, d),
              st.sampled_from([1, 3]), st.uuids(), st.binary(max_size=20)))
nodes = st.one_of(raw_nodes, hd_nodes, file_nodes, vendor_nodes)

options = st.builds(
    LoadOption,
    st.integers(0, 2**32 - 1),
    ucs2_text,
    st.lists(nodes, max_size=5).map(lambda ns: tuple(ns) + (END_ENTIRE_NODE,)),
    st.binary(max_size=60))


@settings(max_examples=2000, deadline=None)
@given(options)
def test_decode_of_encode_is_identity(option):
    assert LoadOption.from_bytes(option.to_bytes()) == option


@settings(max_examples=2000, deadline=None)
@given(options)
def test_encode_of_decode_is_byte_exact(option):
    raw = option.to_bytes()
    assert LoadOption.from_bytes(raw).to_bytes() == raw


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_format_error(raw):
    try:
        option = LoadOption.from_bytes(raw)
    except FormatError:
        return
    assert option.to_bytes() == raw


@settings(max_examples=2000, deadline=None)
@given(options, st.data())
def test_mutated_options_parse_or_raise_format_error(option, data):
    raw = bytearray(option.to_bytes())
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decoded = LoadOption.from_bytes(bytes(raw[:cut]))
    except FormatError:
        return
    assert decoded.to_bytes() == bytes(raw[:cut])


def test_every_load_option_real_firmware_wrote_reencodes_byte_exact():
    from tests.bootfixtures import real_boot_variables

    variables = real_boot_variables()
    if not variables:
        pytest.skip("neither /work/shared/eventlog-corpus nor tests/data/boots is present")
    for origin, data in variables:
        option = LoadOption.from_bytes(data, source=origin)
        assert option.to_bytes() == data, origin
        device_path_text(option.device_path)
