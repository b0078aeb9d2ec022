"""rhel_cvm_update.formats.tcglog on hand-built logs: every branch of the parser, the
replayer and the event-data decoders.

Records are packed with struct here, from the layouts of the TCG PFP spec (reference
section 3.1); expected PCR values are computed with hashlib from the extend rule
PCR_new = H(PCR_old || digest), never with the code under test.
"""

import dataclasses
import hashlib
import json
import struct
import uuid

import pytest

from rhel_cvm_update.errors import FormatError, UnsupportedError
from rhel_cvm_update.formats import tcg_describe, tcg_event_data, tcglog
from rhel_cvm_update.formats.devpath import (SYSTEMD_STUB_LINUX_VENDOR_GUID, EndNode, FilePathNode,
                                             HardDriveNode, VendorNode)
from rhel_cvm_update.formats.efi import EFI_GLOBAL_VARIABLE, SHIM_LOCK_GUID
from rhel_cvm_update.formats.gpt import GptPartition

SHA1, SHA256, SHA384, SM3 = 0x0004, 0x000B, 0x000C, 0x0012
SHA3_256 = 0x0027  # a real TPM_ALG_ID this module does not know


def spec_id_body(algorithms=((SHA1, 20), (SHA256, 32)), uintn_size=2, vendor=b"",
                 signature=b"Spec ID Event03\0", count=None):
    count = len(algorithms) if count is None else count
    return (signature + struct.pack("<IBBBBI", 0, 0, 2, 0, uintn_size, count)
            + b"".join(struct.pack("<HH", a, s) for a, s in algorithms)
            + bytes([len(vendor)]) + vendor)


def event1(pcr, event_type, digest, data):
    return struct.pack("<II20sI", pcr, event_type, digest, len(data)) + data


def header(**kw):
    return event1(0, tcglog.EV_NO_ACTION, bytes(20), spec_id_body(**kw))


def event2(pcr, event_type, digests, data):
    return (struct.pack("<III", pcr, event_type, len(digests))
            + b"".join(struct.pack("<H", alg) + d for alg, d in digests)
            + struct.pack("<I", len(data)) + data)


def both(data):
    """sha1+sha256 digests of data, as firmware logs them for most events."""
    return [(SHA1, hashlib.sha1(data).digest()), (SHA256, hashlib.sha256(data).digest())]


def measured(pcr, event_type, data):
    return event2(pcr, event_type, both(data), data)


def h_extend(name, old, digest):
    return hashlib.new(name, old + digest).digest()


ACTION = b"Calling EFI Application from Boot Option"
SEPARATOR = bytes(4)
STARTUP_LOCALITY_3 = b"StartupLocality\0\x03"


# --- Crypto-agile and SHA1-format structure --------------------------------------------

def test_crypto_agile_records():
    head = header(vendor=b"AMIAMI")
    first = measured(4, tcglog.EV_EFI_ACTION, ACTION)
    second = measured(4, tcglog.EV_SEPARATOR, SEPARATOR)
    log = tcglog.parse_event_log(head + first + second, source="hand")
    assert (log.source, log.format, log.banks, log.startup_locality) == (
        "hand", "crypto-agile", ("sha1", "sha256"), 0)
    assert log.spec_id == tcglog.SpecIdEvent(0, 2, 0, 0, 2, {SHA1: 20, SHA256: 32}, b"AMIAMI")
    assert log.uintn_size == 8
    a, b = log.events
    assert (a.index, a.offset, a.pcr, a.event_type, a.data) == (
        0, len(head), 4, tcglog.EV_EFI_ACTION, ACTION)
    assert a.data_offset == len(head) + 12 + 2 + 20 + 2 + 32 + 4
    assert a.digests == {"sha1": hashlib.sha1(ACTION).digest(),
                         "sha256": hashlib.sha256(ACTION).digest()}
    assert a.type_name == "EV_EFI_ACTION"
    assert (b.index, b.offset) == (1, len(head) + len(first))


def test_event_types_table_covers_the_reference():
    expected = {0x1: "EV_POST_CODE", 0x3: "EV_NO_ACTION", 0x4: "EV_SEPARATOR", 0x5: "EV_ACTION",
                0x6: "EV_EVENT_TAG", 0x7: "EV_S_CRTM_CONTENTS", 0x8: "EV_S_CRTM_VERSION",
                0x9: "EV_CPU_MICROCODE", 0xA: "EV_PLATFORM_CONFIG_FLAGS",
                0xB: "EV_TABLE_OF_DEVICES", 0xC: "EV_COMPACT_HASH", 0xD: "EV_IPL",
                0xE: "EV_IPL_PARTITION_DATA", 0xF: "EV_NONHOST_CODE", 0x10: "EV_NONHOST_CONFIG",
                0x11: "EV_NONHOST_INFO", 0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
                0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG", 0x80000002: "EV_EFI_VARIABLE_BOOT",
                0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
                0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
                0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER", 0x80000006: "EV_EFI_GPT_EVENT",
                0x80000007: "EV_EFI_ACTION", 0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
                0x80000009: "EV_EFI_HANDOFF_TABLES", 0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
                0x8000000B: "EV_EFI_HANDOFF_TABLES2", 0x8000000C: "EV_EFI_VARIABLE_BOOT2",
                0x80000010: "EV_EFI_HCRTM_EVENT", 0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
                0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB", 0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG"}
    for value, name in expected.items():
        assert tcglog.EVENT_TYPES[value] == name
    assert tcglog.ALGORITHMS == {SHA1: ("sha1", 20), SHA256: ("sha256", 32),
                                 SHA384: ("sha384", 48), 0x000D: ("sha512", 64),
                                 SM3: ("sm3_256", 32)}


def test_unknown_algorithm_is_skipped_by_its_declared_size():
    head = header(algorithms=((SHA3_256, 32), (SHA256, 32)))
    digests = [(SHA3_256, b"\x33" * 32), (SHA256, hashlib.sha256(ACTION).digest())]
    log = tcglog.parse_event_log(head + event2(4, tcglog.EV_EFI_ACTION, digests, ACTION)
                                 + event2(4, tcglog.EV_SEPARATOR, digests, SEPARATOR))
    assert log.banks == ("sha256",)
    assert log.spec_id.algorithms == {SHA3_256: 32, SHA256: 32}
    assert [e.data for e in log.events] == [ACTION, SEPARATOR]
    assert log.events[0].digests == {"sha256": hashlib.sha256(ACTION).digest()}


def test_record_with_fewer_digests_than_the_header():
    head = header()
    only_sha256 = event2(12, tcglog.EV_EVENT_TAG, [(SHA256, b"\x12" * 32)], b"")
    log = tcglog.parse_event_log(head + measured(12, tcglog.EV_IPL, b"boot") + only_sha256)
    assert log.events[1].digests == {"sha256": b"\x12" * 32}
    replayed = tcglog.replay(log)
    assert replayed["sha1"][12] == h_extend("sha1", bytes(20), hashlib.sha1(b"boot").digest())
    assert replayed["sha256"][12] == h_extend(
        "sha256", h_extend("sha256", bytes(32), hashlib.sha256(b"boot").digest()), b"\x12" * 32)


def test_sha1_format_log():
    records = (event1(0, tcglog.EV_S_CRTM_VERSION, hashlib.sha1(b"1.0").digest(), b"1.0")
               + event1(4, tcglog.EV_SEPARATOR, hashlib.sha1(SEPARATOR).digest(), SEPARATOR))
    log = tcglog.parse_event_log(records, source="legacy")
    assert (log.format, log.banks, log.spec_id, log.uintn_size) == ("sha1", ("sha1",), None, 8)
    assert [(e.index, e.offset, e.pcr, e.data_offset) for e in log.events] == [
        (0, 0, 0, 32), (1, 35, 4, 67)]
    assert tcglog.replay(log) == {"sha1": {
        0: h_extend("sha1", bytes(20), hashlib.sha1(b"1.0").digest()),
        4: h_extend("sha1", bytes(20), hashlib.sha1(SEPARATOR).digest())}}


def test_sha1_format_log_headed_by_startup_locality():
    # As on a Dell server: the first record is a StartupLocality EV_NO_ACTION, locality 3.
    crtm = hashlib.sha1(b"v").digest()
    log = tcglog.parse_event_log(event1(0, tcglog.EV_NO_ACTION, bytes(20), STARTUP_LOCALITY_3)
                                 + event1(0, tcglog.EV_S_CRTM_VERSION, crtm, b"v"))
    assert log.format == "sha1" and log.startup_locality == 3
    assert tcglog.replay(log)["sha1"][0] == h_extend("sha1", bytes(19) + b"\x03", crtm)


def test_sha1_format_log_headed_by_tcg12_spec_id():
    body = spec_id_body(signature=b"Spec ID Event02\0")
    log = tcglog.parse_event_log(event1(0, tcglog.EV_NO_ACTION, bytes(20), body)
                                 + event1(4, tcglog.EV_SEPARATOR, bytes(20), SEPARATOR))
    assert log.format == "sha1" and len(log.events) == 2


@pytest.mark.parametrize("fill", [b"\x00", b"\xff"])
def test_trailing_padding_ends_the_log(fill):
    body = header() + measured(4, tcglog.EV_SEPARATOR, SEPARATOR)
    log = tcglog.parse_event_log(body + fill * 4096)
    assert len(log.events) == 1
    legacy = event1(4, tcglog.EV_SEPARATOR, bytes(20), SEPARATOR)
    assert len(tcglog.parse_event_log(legacy + fill * 64).events) == 1


def test_short_zero_tail_is_a_truncated_record_not_padding():
    # Four zero bytes are the PCRIndex of a PCR0 record whose rest is missing.
    body = header() + measured(4, tcglog.EV_SEPARATOR, SEPARATOR)
    with pytest.raises(FormatError) as e:
        tcglog.parse_event_log(body + bytes(4), source="cut")
    assert e.value.offset == len(body) and e.value.source == "cut"


def test_trailing_garbage_is_an_error_at_its_offset():
    body = header() + measured(4, tcglog.EV_SEPARATOR, SEPARATOR)
    with pytest.raises(FormatError) as e:
        tcglog.parse_event_log(body + b"\x01" * 40, source="garbage")
    assert e.value.offset is not None and e.value.offset >= len(body)
    assert "garbage" in str(e.value)


# --- Replay -------------------------------------------------------------------------------

def test_initial_pcr_values():
    assert tcglog.initial_pcr(0, "sha256") == bytes(32)
    assert tcglog.initial_pcr(0, "sha256", 3) == bytes(31) + b"\x03"
    assert tcglog.initial_pcr(0, "sha1", 4) == bytes(19) + b"\x04"
    assert tcglog.initial_pcr(4, "sha256", 3) == bytes(32)
    assert tcglog.initial_pcr(17, "sha384") == b"\xff" * 48
    assert tcglog.initial_pcr(23, "sha256") == bytes(32)
    with pytest.raises(UnsupportedError):
        tcglog.initial_pcr(0, "md5")


def test_extend_and_hash_new():
    d = hashlib.sha256(b"x").digest()
    assert tcglog.extend("sha256", bytes(32), d) == hashlib.sha256(bytes(32) + d).digest()
    assert tcglog.hash_new("sm3_256").digest_size == 32
    with pytest.raises(ValueError):
        tcglog.extend("sha256", bytes(20), d)
    with pytest.raises(UnsupportedError):
        tcglog.hash_new("crc32")


def test_replay_skips_no_action_and_reports_only_extended_pcrs():
    log = tcglog.parse_event_log(
        header()
        + event2(0, tcglog.EV_NO_ACTION, [(SHA1, bytes(20)), (SHA256, bytes(32))], b"x" * 17)
        + measured(4, tcglog.EV_EFI_ACTION, ACTION)
        + measured(4, tcglog.EV_SEPARATOR, SEPARATOR)
        + measured(7, tcglog.EV_SEPARATOR, SEPARATOR))
    pcr4 = h_extend("sha256", h_extend("sha256", bytes(32), hashlib.sha256(ACTION).digest()),
                    hashlib.sha256(SEPARATOR).digest())
    assert tcglog.replay(log)["sha256"] == {
        4: pcr4, 7: h_extend("sha256", bytes(32), hashlib.sha256(SEPARATOR).digest())}
    assert tcglog.replay(log, banks=["sha256"], pcrs=[4]) == {"sha256": {4: pcr4}}
    assert tcglog.replay(log, pcrs=[11]) == {}


def test_startup_locality_event_sets_pcr0_start():
    crtm = b"GCE"
    log = tcglog.parse_event_log(
        header()
        + event2(0, tcglog.EV_NO_ACTION, [(SHA1, bytes(20)), (SHA256, bytes(32))],
                 STARTUP_LOCALITY_3)
        + measured(0, tcglog.EV_S_CRTM_VERSION, crtm))
    assert log.startup_locality == 3
    assert tcglog.replay(log)["sha256"][0] == h_extend("sha256", bytes(31) + b"\x03",
                                                       hashlib.sha256(crtm).digest())


def test_hcrtm_event_means_locality_4():
    log = tcglog.parse_event_log(header() + measured(0, tcglog.EV_EFI_HCRTM_EVENT, b"HCRTM"))
    assert log.startup_locality == 4
    assert tcglog.replay(log)["sha1"][0] == h_extend("sha1", bytes(19) + b"\x04",
                                                     hashlib.sha1(b"HCRTM").digest())


def test_replay_events_on_a_substituted_copy():
    # What prediction does: replace the UKI's digest in a copy of the events and replay.
    log = tcglog.parse_event_log(header() + measured(4, tcglog.EV_SEPARATOR, SEPARATOR)
                                 + measured(4, tcglog.EV_EFI_BOOT_SERVICES_APPLICATION, b"old"))
    new = hashlib.sha256(b"new UKI").digest()
    events = list(log.events)
    events[1] = dataclasses.replace(events[1], digests={"sha256": new})
    sep = h_extend("sha256", bytes(32), hashlib.sha256(SEPARATOR).digest())
    assert tcglog.replay_events(events, "sha256") == {4: h_extend("sha256", sep, new)}
    assert tcglog.replay_events(events, "sha1") == {
        4: h_extend("sha1", bytes(20), hashlib.sha1(SEPARATOR).digest())}


# --- Event data ---------------------------------------------------------------------------

def image_load(path: bytes, uintn="Q", location=0x7C000000, length=0x1000, link=0):
    return struct.pack(f"<Q{uintn}{uintn}{uintn}", location, length, link, len(path)) + path


def event_of(event_type, data, pcr=4):
    return tcglog.TcgEvent(0, 0, pcr, event_type, {}, data)


# systemd-stub's kernel LoadImage device path, reference 2.3, byte for byte.
STUB_KERNEL_PATH = bytes.fromhex("04031400f8d1c555cd04b5468a20e56cbb3052d07fff0400")
# shim's test-load-options.c test_bds_0 device path (reference 6.2): HD + File + End.
SHIM_PATH = (bytes.fromhex("04012a0001000000000800000000000000400600000000001a9e55bf0457f24f"
                           "b44aed264a406a940202")
             + b"\x04\x04\x34\x00" + "\\EFI\\fedora\\shimx64.efi\0".encode("utf-16-le")
             + b"\x7f\xff\x04\x00")


def test_systemd_stub_kernel_event():
    decoded = tcg_event_data.decode_event_data(event_of(tcglog.EV_EFI_BOOT_SERVICES_APPLICATION,
                                                image_load(STUB_KERNEL_PATH, length=8247232)))
    assert isinstance(decoded, tcg_event_data.ImageLoadEvent)
    assert (decoded.location, decoded.length, decoded.link_time_address) == (0x7C000000, 8247232, 0)
    vendor, end = decoded.device_path
    assert isinstance(vendor, VendorNode) and vendor.guid == SYSTEMD_STUB_LINUX_VENDOR_GUID
    assert isinstance(end, EndNode)
    assert decoded.raw_device_path == STUB_KERNEL_PATH
    assert decoded.summary() == "VenMedia(55c5d1f8-04cd-46b5-8a20-e56cbb3052d0)"


def test_shim_full_device_path():
    decoded = tcg_event_data.decode_event_data(event_of(tcglog.EV_EFI_BOOT_SERVICES_APPLICATION,
                                                image_load(SHIM_PATH)))
    hd, file_node, _ = decoded.device_path
    assert isinstance(hd, HardDriveNode) and isinstance(file_node, FilePathNode)
    assert (hd.partition_number, hd.start, hd.size) == (1, 0x800, 0x64000)
    assert hd.partition_guid == uuid.UUID("bf559e1a-5704-4ff2-b44a-ed264a406a94")
    assert file_node.path == "\\EFI\\fedora\\shimx64.efi"
    assert decoded.to_json()["device_path"] == (
        "HD(1,GPT,bf559e1a-5704-4ff2-b44a-ed264a406a94,0x800,0x64000)/File(\\EFI\\fedora\\shimx64.efi)")


def test_image_load_tolerates_real_firmware_shapes():
    name = "\\EFI\\Linux\\a.efi\0".encode("utf-16-le")
    uki_file = struct.pack("<BBH", 4, 4, 4 + len(name)) + name
    shapes = {
        "empty path": image_load(b""),
        "no End node": image_load(uki_file),
        "zeroed End node": image_load(uki_file + bytes(4)),
        "shim 15 slack after an empty path": image_load(b"") + bytes(8),
        "shim 15 slack after a path": image_load(uki_file + b"\x7f\xff\x04\x00") + b"\0" * 8,
    }
    for shape, data in shapes.items():
        decoded = tcg_event_data.decode_event_data(event_of(tcglog.EV_EFI_BOOT_SERVICES_APPLICATION, data))
        paths = [n.path for n in decoded.device_path if isinstance(n, FilePathNode)]
        assert paths == ([] if "empty" in shape else ["\\EFI\\Linux\\a.efi"]), shape


def test_image_load_uintn_sizes():
    event32 = event_of(tcglog.EV_EFI_BOOT_SERVICES_DRIVER, image_load(STUB_KERNEL_PATH, uintn="I"))
    assert tcg_event_data.decode_event_data(event32, uintn_size=4).raw_device_path == STUB_KERNEL_PATH
    # A header declaring 32-bit UINTNs over 64-bit fields (a Dell firmware does this).
    event64 = event_of(tcglog.EV_EFI_RUNTIME_SERVICES_DRIVER, image_load(STUB_KERNEL_PATH))
    assert tcg_event_data.decode_event_data(event64, uintn_size=4).raw_device_path == STUB_KERNEL_PATH


def variable(guid, name, data):
    return (guid.bytes_le + struct.pack("<QQ", len(name), len(data))
            + name.encode("utf-16-le") + data)


def test_variable_events():
    secure_boot = variable(EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x01")
    decoded = tcg_event_data.decode_event_data(event_of(tcglog.EV_EFI_VARIABLE_DRIVER_CONFIG,
                                                secure_boot, pcr=7))
    assert (decoded.guid, decoded.name, decoded.data) == (EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x01")
    # Some firmware measures SecureBoot with no data bytes at all.
    empty = tcg_event_data.decode_event_data(event_of(tcglog.EV_EFI_VARIABLE_DRIVER_CONFIG,
                                              variable(EFI_GLOBAL_VARIABLE, "SecureBoot", b"")))
    assert empty.data == b""
    sbat = variable(SHIM_LOCK_GUID, "SbatLevel", b"sbat,1,2021030218\n")
    for event_type in (tcglog.EV_EFI_VARIABLE_AUTHORITY, tcglog.EV_EFI_VARIABLE_BOOT,
                       tcglog.EV_EFI_VARIABLE_BOOT2):
        assert tcg_event_data.decode_event_data(event_of(event_type, sbat)).name == "SbatLevel"
    described = tcg_describe.describe_event(event_of(tcglog.EV_EFI_VARIABLE_AUTHORITY, sbat, pcr=7))
    assert described["summary"] == "SbatLevel = 'sbat,1,2021030218'"
    assert described["data"]["guid"] == str(SHIM_LOCK_GUID)


def test_variable_with_shim15_slack():
    cert = b"\x30\x82\x01\x00" + b"\xaa" * 256
    data = variable(SHIM_LOCK_GUID, "Shim", cert) + b"\0" * 6
    decoded = tcg_event_data.decode_event_data(event_of(tcglog.EV_EFI_VARIABLE_AUTHORITY, data, pcr=7))
    assert (decoded.name, decoded.data) == ("Shim", cert)


@pytest.mark.parametrize("event_type,raw,text", [
    (tcglog.EV_EFI_ACTION, ACTION, "Calling EFI Application from Boot Option"),
    (tcglog.EV_ACTION, b"Exit Boot Services Invocation", "Exit Boot Services Invocation"),
    (tcglog.EV_S_CRTM_VERSION, "GCE Virtual Firmware v2\0".encode("utf-16-le"),
     "GCE Virtual Firmware v2"),
    (tcglog.EV_S_CRTM_VERSION, b"\0\0", ""),  # OVMF
    (tcglog.EV_IPL, ".linux\0".encode("utf-16-le"), ".linux"),  # systemd-stub PCR11
    (tcglog.EV_IPL, b"MokList\0", "MokList"),  # shim PCR14
    (tcglog.EV_IPL, b"MokList\0\xaf", "MokList"),  # shim 15's stray byte
    (tcglog.EV_IPL, b"grub_cmd: set timeout=5\0", "grub_cmd: set timeout=5"),
    (tcglog.EV_IPL, "initrd=\\x.img\0".encode("utf-16-le")[:-1], "initrd=\\x.img"),
    (tcglog.EV_EFI_HCRTM_EVENT, b"HCRTM", "HCRTM"),
    (tcglog.EV_COMPACT_HASH, b"x", None),
])
def test_text_events(event_type, raw, text):
    assert tcg_event_data.decode_event_data(event_of(event_type, raw)) == text


def test_crtm_version_guid():
    guid = uuid.UUID("1efb6b54-0c1d-4055-a4ad-4ef4bf17b83a")
    assert tcg_event_data.decode_event_data(event_of(tcglog.EV_S_CRTM_VERSION, guid.bytes_le)) == guid


def test_separators():
    assert tcg_event_data.decode_event_data(event_of(tcglog.EV_SEPARATOR, SEPARATOR)) == 0
    assert tcg_event_data.decode_event_data(event_of(tcglog.EV_SEPARATOR, b"\xff" * 4)) == 0xFFFFFFFF
    assert tcg_event_data.decode_event_data(event_of(tcglog.EV_SEPARATOR, b"WBCL")) == 0x4C434257
    with pytest.raises(FormatError):
        tcg_event_data.decode_event_data(event_of(tcglog.EV_SEPARATOR, b"\0" * 5))


def sp800_155_event3():
    def sized(s):
        return bytes([len(s)]) + s
    return (b"SP800-155 Event3" + struct.pack("<I", 11129)
            + uuid.UUID("11111111-2222-3333-4444-555555555555").bytes_le
            + sized(b"Google") + sized(b"Compute Engine") + sized(b"v2") + sized(b"Google")
            + struct.pack("<I", 11129) + sized(b"fw 1.0")
            + struct.pack("<II", 1, 4) + b"http" + struct.pack("<II", 0, 0))


def test_no_action_events():
    no_action = tcglog.EV_NO_ACTION
    assert tcg_event_data.decode_event_data(event_of(no_action, STARTUP_LOCALITY_3, pcr=0)) == \
        tcg_event_data.StartupLocalityEvent(3)
    sp = tcg_event_data.decode_event_data(event_of(no_action, sp800_155_event3(), pcr=0))
    assert (sp.signature, sp.vendor_id, sp.firmware_manufacturer_id) == (
        "SP800-155 Event3", 11129, 11129)
    assert sp.strings == {"platform_manufacturer": "Google", "platform_model": "Compute Engine",
                          "platform_version": "v2", "firmware_manufacturer": "Google",
                          "firmware_version": "fw 1.0"}
    assert sp.rest == struct.pack("<II", 1, 4) + b"http" + struct.pack("<II", 0, 0)
    spec = tcg_event_data.decode_event_data(event_of(no_action, spec_id_body()))
    assert spec.algorithms == {SHA1: 20, SHA256: 32}
    assert tcg_event_data.decode_event_data(event_of(no_action, b"NvIndexInstance\0" + bytes(8))) is None


def test_gpt_event():
    disk = uuid.UUID("5f1c2a9e-3b4d-4e6f-8a7b-9c0d1e2f3a4b")
    esp_type = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
    esp = uuid.UUID("0b5e0e5a-f81f-11d2-ba4b-00a0c93ec93b")
    gpt_header = struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1, 99, 34, 66,
                             disk.bytes_le, 2, 128, 128, 0)
    entry = struct.pack("<16s16sQQQ72s", esp_type.bytes_le, esp.bytes_le, 2048, 98270, 0,
                        "EFI System".encode("utf-16-le").ljust(72, b"\0"))
    for uintn, count in ((8, struct.pack("<Q", 1)), (4, struct.pack("<I", 1))):
        gpt = tcg_event_data.decode_event_data(event_of(tcglog.EV_EFI_GPT_EVENT, gpt_header + count + entry,
                                                pcr=5), uintn_size=uintn)
        assert gpt.disk_guid == disk
        assert gpt.partitions == (GptPartition(None, esp_type, esp, 2048, 98270, 0, "EFI System"),)
    with pytest.raises(FormatError):
        tcg_event_data.decode_event_data(event_of(tcglog.EV_EFI_GPT_EVENT,
                                          b"NOT PART" + gpt_header[8:] + struct.pack("<Q", 0)))


def test_firmware_blobs_and_tags():
    blob = tcg_event_data.decode_event_data(event_of(tcglog.EV_EFI_PLATFORM_FIRMWARE_BLOB,
                                             struct.pack("<QQ", 0xFFC00000, 0x400000), pcr=0))
    assert blob == tcg_event_data.FirmwareBlob(0xFFC00000, 0x400000)
    blob2 = tcg_event_data.decode_event_data(event_of(tcglog.EV_EFI_PLATFORM_FIRMWARE_BLOB2,
                                              b"\x06DXEFV\0" + struct.pack("<QQ", 0x100, 0x200)))
    assert blob2 == tcg_event_data.FirmwareBlob(0x100, 0x200, "DXEFV")
    tag_data = "Linux initrd\0".encode("utf-16-le")
    tag = tcg_event_data.decode_event_data(event_of(tcglog.EV_EVENT_TAG, struct.pack(
        "<II", 0x8F3B22EC, len(tag_data)) + tag_data, pcr=9))
    assert tag == tcg_event_data.TaggedEvent(0x8F3B22EC, tag_data)


def test_unknown_event_type_and_describe():
    event = tcglog.TcgEvent(3, 0x100, 5, 0x0000040E, {"sha256": b"\x01" * 32}, b"\xde\xad",
                            0x130)
    assert event.type_name == "EV_UNKNOWN_0x0000040e"
    assert tcg_event_data.decode_event_data(event) is None
    described = tcg_describe.describe_event(event)
    assert described == {"index": 3, "offset": 0x100, "pcr": 5, "type": "EV_UNKNOWN_0x0000040e",
                         "type_value": 0x40E, "digests": {"sha256": "01" * 32}, "data": None,
                         "data_hex": "dead", "summary": "(2 bytes)"}


def test_describe_undecodable_data_keeps_the_hex_and_the_reason():
    event = tcglog.TcgEvent(0, 0, 4, tcglog.EV_SEPARATOR, {}, b"\x01\x02", 0x40)
    described = tcg_describe.describe_event(event, source="log")
    assert described["data_hex"] == "0102"
    assert "log at offset 0x40" in described["data_error"]


def test_descriptions_are_json():
    events = [
        event_of(tcglog.EV_EFI_BOOT_SERVICES_APPLICATION, image_load(SHIM_PATH)),
        event_of(tcglog.EV_EFI_VARIABLE_DRIVER_CONFIG,
                 variable(EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x01")),
        event_of(tcglog.EV_NO_ACTION, STARTUP_LOCALITY_3),
        event_of(tcglog.EV_NO_ACTION, sp800_155_event3()),
        event_of(tcglog.EV_NO_ACTION, spec_id_body()),
        event_of(tcglog.EV_S_CRTM_VERSION, uuid.uuid4().bytes_le),
        event_of(tcglog.EV_SEPARATOR, SEPARATOR),
        event_of(tcglog.EV_EFI_PLATFORM_FIRMWARE_BLOB, bytes(16)),
        event_of(tcglog.EV_EVENT_TAG, struct.pack("<II", 1, 0)),
    ]
    for event in events:
        described = tcg_describe.describe_event(event)
        assert "data_error" not in described and described["summary"]
        json.dumps(described)


def test_decode_event_data_refuses_a_wrong_uintn_size():
    with pytest.raises(ValueError):
        tcg_event_data.decode_event_data(event_of(tcglog.EV_SEPARATOR, SEPARATOR), uintn_size=2)


def test_handoff_tables():
    smbios = uuid.UUID("f2fd1544-9794-4a2c-992e-e5bbcf20e394")  # SMBIOS3_TABLE_GUID
    entries = smbios.bytes_le + struct.pack("<Q", 0x7F5A0000)
    tables = tcg_event_data.decode_event_data(event_of(tcglog.EV_EFI_HANDOFF_TABLES,
                                               struct.pack("<Q", 1) + entries, pcr=1))
    assert tables == tcg_event_data.HandoffTables(((smbios, 0x7F5A0000),))
    tables2 = tcg_event_data.decode_event_data(event_of(
        tcglog.EV_EFI_HANDOFF_TABLES2, b"\x09SMBIOS3.0" + struct.pack("<Q", 1) + entries, pcr=1))
    assert tables2.description == "SMBIOS3.0" and tables2.tables == ((smbios, 0x7F5A0000),)
    # A 32-bit UINTN count (EFI_HANDOFF_TABLE_POINTERS on IA32) with 32-bit addresses.
    ia32 = struct.pack("<I", 1) + smbios.bytes_le + struct.pack("<I", 0x7F5A0000)
    assert tcg_event_data.decode_event_data(event_of(tcglog.EV_EFI_HANDOFF_TABLES, ia32),
                                    uintn_size=4).tables == ((smbios, 0x7F5A0000),)
    with pytest.raises(FormatError):
        tcg_event_data.decode_event_data(event_of(tcglog.EV_EFI_HANDOFF_TABLES,
                                          struct.pack("<Q", 2) + entries))


@pytest.mark.parametrize("event_type,data,expected", [
    (tcglog.EV_POST_CODE, b"ACPI DATA", "ACPI DATA"),
    (tcglog.EV_POST_CODE, struct.pack("<QQ", 0xFF000000, 0x10000),
     tcg_event_data.FirmwareBlob(0xFF000000, 0x10000)),
    (tcglog.EV_S_CRTM_CONTENTS, b"Boot Guard Measured S-CRTM\0", "Boot Guard Measured S-CRTM"),
    (tcglog.EV_PLATFORM_CONFIG_FLAGS, b"No voltage offset", "No voltage offset"),
    (tcglog.EV_PLATFORM_CONFIG_FLAGS, b"\x01\x00\x00\x00\x02", None),
])
def test_text_or_blob_events(event_type, data, expected):
    assert tcg_event_data.decode_event_data(event_of(event_type, data, pcr=0)) == expected


def test_linux_event_tag_summary():
    data = b"Linux initrd\0"
    event = event_of(tcglog.EV_EVENT_TAG, struct.pack("<II", 0x8F3B22EC, len(data)) + data, pcr=9)
    assert tcg_describe.describe_event(event)["summary"] == "Linux initrd: Linux initrd"
