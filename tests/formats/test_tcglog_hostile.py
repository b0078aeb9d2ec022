"""Hostile input: every malformed log or event fails with FormatError naming the source and
the offset, quickly, and nothing else escapes (IndexError, struct.error, ValueError...).

Truncation policy (checked below at every byte of a real log's first records): a log cut
exactly at a record boundary is a shorter log and parses; a cut anywhere inside a record is
a FormatError.  Zero bytes after the last record count as padding only when there are at
least as many as the smallest record, so a cut right after a PCR0 record's PCRIndex (four
zero bytes) is still an error.
"""

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats import tcg_describe, tcg_event_data, tcglog

SHA1, SHA256 = 0x0004, 0x000B
REPO = Path(__file__).resolve().parents[2]
CORPUS = next((p for p in (REPO.parent / "shared" / "eventlog-corpus",
                           Path("/work/shared/eventlog-corpus")) if p.is_dir()), None)


def spec_id(count=None, algorithms=((SHA1, 20), (SHA256, 32)), signature=b"Spec ID Event03\0"):
    count = len(algorithms) if count is None else count
    body = (signature + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, count)
            + b"".join(struct.pack("<HH", a, s) for a, s in algorithms) + b"\0")
    return struct.pack("<II20sI", 0, 3, bytes(20), len(body)) + body


def record(pcr=4, event_type=tcglog.EV_SEPARATOR, digests=((SHA1, bytes(20)), (SHA256, bytes(32))),
           data=bytes(4), count=None, size=None):
    count = len(digests) if count is None else count
    size = len(data) if size is None else size
    return (struct.pack("<III", pcr, event_type, count)
            + b"".join(struct.pack("<H", a) + d for a, d in digests)
            + struct.pack("<I", size) + data)


def fails(buf, source="hostile"):
    with pytest.raises(FormatError) as e:
        tcglog.parse_event_log(buf, source=source)
    assert e.value.source == source and e.value.offset is not None
    assert source in str(e.value)
    return e.value


def a_real_log(name: str) -> bytes:
    if CORPUS is not None and (CORPUS / name).is_file():
        return (CORPUS / name).read_bytes()
    boot = REPO / "tests/data/boots/sb-off-uki-a/eventlog.bin"
    if boot.is_file():
        return boot.read_bytes()
    pytest.skip("no real event log (corpus or tests/data/boots) is present")


@pytest.mark.parametrize("name", ["go-tpm-tools/gce-ubuntu2404-amd-sevsnp.bin",
                                  "go-tpm-tools/gce-debian10-sb-sha1log.bin"])
def test_truncated_at_every_byte_of_the_first_records(name):
    raw = a_real_log(name)
    full = tcglog.parse_event_log(raw)
    first = full.events[:8]
    boundaries = {e.offset for e in first} | {full.events[8].offset}
    if full.format == "sha1":
        boundaries.discard(0)  # an empty buffer is no log
    for cut in range(0, full.events[8].offset + 1):
        if cut in boundaries:
            log = tcglog.parse_event_log(raw[:cut])
            assert log.events == tuple(e for e in first if e.offset < cut)
        else:
            fails(raw[:cut], source=f"cut at {cut}")


def test_event_size_past_the_end():
    err = fails(spec_id() + record(size=1000))
    assert err.field == "EventSize"


def test_event_size_past_the_end_sha1_format():
    fails(struct.pack("<II20sI", 0, tcglog.EV_S_CRTM_VERSION, bytes(20), 2 ** 32 - 1) + b"v")


def test_digest_count_2_to_the_32_minus_1():
    err = fails(spec_id() + record(count=2 ** 32 - 1))
    assert err.field == "TPML_DIGEST_VALUES.count"


def test_zero_digests():
    fails(spec_id() + record(digests=(), count=0))


def test_unknown_algorithm_in_a_record():
    err = fails(spec_id() + record(digests=((SHA1, bytes(20)), (0x0027, bytes(32)))))
    assert err.field == "hashAlg"


def test_same_algorithm_twice_in_a_record():
    fails(spec_id() + record(digests=((SHA1, bytes(20)), (SHA1, bytes(20)))))


@pytest.mark.parametrize("count", [0, 1000, 2 ** 32 - 1])
def test_spec_id_algorithm_count(count):
    err = fails(spec_id(count=count))
    assert err.field == "numberOfAlgorithms"


@pytest.mark.parametrize("algorithms", [
    ((SHA256, 20),),  # a known algorithm with the wrong size
    ((SHA1, 20), (SHA1, 20)),  # listed twice
    ((0x0027, 0),),  # an empty digest
    ((0x0027, 60000),),  # larger than any hash
])
def test_spec_id_algorithm_table(algorithms):
    fails(spec_id(algorithms=algorithms))


def test_spec_id_vendor_info_size_must_fill_the_event():
    raw = bytearray(spec_id())
    raw[-1] = 9  # vendorInfoSize 9, no vendor bytes follow
    fails(bytes(raw))


@pytest.mark.parametrize("signature", [b"Spec ID Event04\0", b"Spec ID Event03X"])
def test_wrong_spec_id_signature(signature):
    err = fails(spec_id(signature=signature) + record())
    assert err.field in ("signature", "TCG_PCR_EVENT")


@pytest.mark.parametrize("magic", [b"\x89PNG\r\n\x1a\n" + bytes(40), b"\x7fELF" + bytes(60),
                                   b"MZ" + bytes(100), bytes(10), b""])
def test_not_an_event_log(magic):
    fails(magic)


def test_spec_id_with_nonzero_digest():
    raw = bytearray(spec_id())
    raw[8] = 1
    fails(bytes(raw))


def test_too_many_events():
    # The smallest record (one sha1 digest, no data) repeated past MAX_EVENTS.
    tiny = struct.pack("<IIIH20sI", 4, tcglog.EV_SEPARATOR, 1, SHA1, bytes(20), 0)
    err = fails(spec_id(algorithms=((SHA1, 20),)) + tiny * (tcglog.MAX_EVENTS + 1))
    assert "events" in str(err)


def test_larger_than_any_log():
    fails(bytes(tcglog.MAX_LOG_SIZE + 1))


def event_of(event_type, data):
    return tcglog.TcgEvent(0, 0x100, 7, event_type, {}, data, 0x120)


def decode_fails(event_type, data):
    with pytest.raises(FormatError) as e:
        tcg_event_data.decode_event_data(event_of(event_type, data), source="ev")
    assert e.value.source == "ev" and e.value.offset is not None and e.value.offset >= 0x120
    return e.value


def test_huge_unicode_name_length():
    data = bytes(16) + struct.pack("<QQ", 2 ** 63, 1) + b"S\0"
    decode_fails(tcglog.EV_EFI_VARIABLE_DRIVER_CONFIG, data)
    decode_fails(tcglog.EV_EFI_VARIABLE_AUTHORITY, bytes(16) + struct.pack("<QQ", 1, 2 ** 64 - 1))


def test_truncated_variable_header():
    decode_fails(tcglog.EV_EFI_VARIABLE_BOOT, bytes(31))


def test_looping_device_path():
    # A File Path node with Length 0 would never advance a naive walker.
    path = b"\x04\x04\x00\x00" + b"\\\0E\0F\0I\0"
    data = struct.pack("<QQQQ", 0, 0, 0, len(path)) + path
    err = decode_fails(tcglog.EV_EFI_BOOT_SERVICES_APPLICATION, data)
    assert err.field == "DevicePath"


def test_device_path_length_past_the_event():
    data = struct.pack("<QQQQ", 0, 0, 0, 2 ** 64 - 1) + b"\x7f\xff\x04\x00"
    decode_fails(tcglog.EV_EFI_BOOT_SERVICES_APPLICATION, data)


def test_device_path_node_longer_than_the_path():
    path = b"\x04\x04\xff\x00\\\0\0\0"
    decode_fails(tcglog.EV_EFI_BOOT_SERVICES_DRIVER, struct.pack("<QQQQ", 0, 0, 0, len(path)) + path)


@pytest.mark.parametrize("event_type,data", [
    (tcglog.EV_EFI_GPT_EVENT, b"EFI PART" + bytes(84) + struct.pack("<Q", 2 ** 40)),
    (tcglog.EV_EFI_GPT_EVENT, b"EFI PART" + bytes(10)),
    (tcglog.EV_NO_ACTION, b"StartupLocality\0"),
    (tcglog.EV_NO_ACTION, b"SP800-155 Event3" + bytes(20) + b"\xff"),
    (tcglog.EV_NO_ACTION, b"Spec ID Event03\0" + bytes(8) + b"\xe8\x03\0\0"),
    (tcglog.EV_EFI_PLATFORM_FIRMWARE_BLOB2, b"\xff" + bytes(16)),
    (tcglog.EV_EVENT_TAG, struct.pack("<II", 1, 2 ** 32 - 1)),
    (tcglog.EV_S_CRTM_VERSION, b"\xff\xfe\xfd"),
    (tcglog.EV_EFI_ACTION, b"\x00\xd8\x00\xdc"),  # a UTF-16 surrogate pair is not UCS-2
])
def test_malformed_event_data(event_type, data):
    decode_fails(event_type, data)


# --- Properties: only FormatError may escape ----------------------------------------------

def parse_and_decode(buf: bytes) -> None:
    try:
        log = tcglog.parse_event_log(buf, source="fuzz")
    except FormatError:
        return
    for event in log.events:
        try:
            tcg_event_data.decode_event_data(event, log.uintn_size, "fuzz")
        except FormatError:
            pass
        tcg_describe.describe_event(event, log.uintn_size, "fuzz")
    tcglog.replay(log)


FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(buf):
    parse_and_decode(buf)


@FUZZ
@given(st.binary(max_size=600))
def test_random_records_after_a_valid_header(tail):
    parse_and_decode(spec_id() + tail)


@FUZZ
@given(st.sampled_from(sorted(tcg_event_data.EVENT_DATA_DECODERS)), st.binary(max_size=300),
       st.sampled_from([4, 8]))
def test_random_event_data(event_type, data, uintn_size):
    event = event_of(event_type, data)
    try:
        tcg_event_data.decode_event_data(event, uintn_size, "fuzz")
    except FormatError:
        pass
    tcg_describe.describe_event(event, uintn_size, "fuzz")


def small_real_logs():
    names = ["tpm2-tools/fedora37-vm-sdboot.bin", "cmc/sha1log-small-efi.bin",
             "tpmtool/linuxboot-ovmf-agile.bin"]
    logs = [(CORPUS / n).read_bytes() for n in names if CORPUS and (CORPUS / n).is_file()]
    if not logs:
        pytest.skip("event log corpus (../shared/eventlog-corpus) is not present")
    return logs


@FUZZ
@given(st.data())
def test_mutated_real_logs(data):
    logs = small_real_logs()
    buf = bytearray(data.draw(st.sampled_from(logs)))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        kind = data.draw(st.sampled_from(["byte", "u32", "insert", "delete"]))
        if kind == "byte":
            buf[pos] = data.draw(st.integers(0, 255))
        elif kind == "u32":
            buf[pos:pos + 4] = struct.pack("<I", data.draw(st.sampled_from(
                [0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, len(buf)])))
        elif kind == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del buf[pos:pos + data.draw(st.integers(1, 16))]
    parse_and_decode(bytes(buf))
