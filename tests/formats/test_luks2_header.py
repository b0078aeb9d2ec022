"""The LUKS2 binary header against real headers written by cryptsetup: the JSON area read
from the bytes equals ``cryptsetup luksDump --dump-json-metadata``; a torn or hostile copy
is refused with the offset, and the other copy is used as cryptsetup would."""

import json
import shutil
import struct
import subprocess

import pytest

from rhel_cvm_update.errors import FormatError, UnsupportedError
from rhel_cvm_update.formats.luks2_header import check_luks2_magic, header_size, read_json_area

needs_cryptsetup = pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup is not installed")


@pytest.fixture(scope="module")
def real_header(tmp_path_factory):
    """A LUKS2 image formatted by cryptsetup, with one keyslot and one token, and what
    cryptsetup itself reports as its metadata."""
    if shutil.which("cryptsetup") is None:
        pytest.skip("cryptsetup is not installed")
    image = tmp_path_factory.mktemp("luks") / "disk.img"
    image.write_bytes(bytes(32 << 20))
    run = lambda *argv, **kw: subprocess.run(["cryptsetup", *argv, str(image)], check=True,  # noqa: E731
                                             stdout=subprocess.PIPE, **kw)
    run("luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
        "--key-file=-", input=b"passphrase")
    token = {"type": "example", "keyslots": ["0"], "note": "x"}
    subprocess.run(["cryptsetup", "token", "import", "--token-id", "3", "--json-file", "-", str(image)],
                   input=json.dumps(token).encode(), check=True)
    dumped = run("luksDump", "--dump-json-metadata").stdout
    return image.read_bytes()[:8 << 20], json.loads(dumped)


def test_json_area_equals_what_cryptsetup_dumps(real_header):
    data, dumped = real_header
    assert json.loads(read_json_area(data, source="disk.img")) == dumped
    assert dumped["tokens"]["3"]["type"] == "example"


def _corrupt(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


def test_a_damaged_primary_falls_back_to_the_secondary(real_header):
    data, dumped = real_header
    size = header_size(data, source="d")
    assert json.loads(read_json_area(_corrupt(data, 4096 + 10), source="d")) == dumped  # primary JSON torn
    assert json.loads(read_json_area(_corrupt(data, size + 4096 + 10), source="d")) == dumped  # secondary torn


def test_the_newer_copy_wins(real_header):
    """cryptsetup writes seqid+1 to both; a crash between them leaves one newer copy."""
    data, _ = real_header
    size = header_size(data, source="d")
    area = bytearray(data[:2 * size])
    for offset in (0, size):
        (seqid,) = struct.unpack_from(">Q", area, offset + 16)
        assert seqid >= 1
    # Damage the primary's checksum: only the secondary counts, whatever its seqid.
    area[448] ^= 0xFF
    assert read_json_area(bytes(area), source="d") == read_json_area(data, source="d")


def test_both_copies_damaged_names_both_offsets(real_header):
    data, _ = real_header
    size = header_size(data, source="disk")
    broken = _corrupt(_corrupt(data, 4096 + 10), size + 4096 + 10)
    with pytest.raises(FormatError, match=r"disk at offset 0x0: LUKS2 header: no valid header copy .*"
                                          r"offset 0x1c0: csum: checksum mismatch.*offset 0x41c0: csum"):
        read_json_area(broken, source="disk")


def test_truncated_and_oversized(real_header):
    data, _ = real_header
    size = header_size(data, source="d")
    # A secondary cut short does not matter while the primary is whole; both short does.
    assert read_json_area(data[:size + 100], source="d") == read_json_area(data, source="d")
    with pytest.raises(FormatError, match="truncated: 16284 of hdr_size 16384 bytes.*truncated: 0 of 4096"):
        read_json_area(data[:size - 100], source="d")
    with pytest.raises(FormatError, match="hdr_size"):
        read_json_area(data[:8] + struct.pack(">Q", 12345) + data[16:], source="d")
    with pytest.raises(FormatError, match="hdr_size 8589934592"):
        header_size(data[:8] + struct.pack(">Q", 1 << 33), source="d")
    with pytest.raises(FormatError, match="truncated binary header"):
        header_size(data[:10], source="d")


def test_hdr_offset_must_be_the_copys_position(real_header):
    data, _ = real_header
    size = header_size(data, source="d")
    moved = bytearray(data[:2 * size])
    struct.pack_into(">Q", moved, size + 256, 0)       # secondary claims to be at 0
    moved[448] ^= 0xFF                                 # and the primary is damaged
    with pytest.raises(FormatError, match="hdr_offset 0 != its position"):
        read_json_area(bytes(moved), source="d")


def test_luks_magic():
    check_luks2_magic(b"LUKS\xba\xbe\x00\x02", source="d")
    check_luks2_magic(b"SKUL\xba\xbe\x00\x02", source="d")
    with pytest.raises(UnsupportedError, match="LUKS1"):
        check_luks2_magic(b"LUKS\xba\xbe\x00\x01", source="d")
    with pytest.raises(FormatError, match="wrong magic"):
        check_luks2_magic(b"\x00" * 8, source="d")
    with pytest.raises(FormatError, match="unknown LUKS version 3"):
        check_luks2_magic(b"LUKS\xba\xbe\x00\x03", source="d")
    with pytest.raises(FormatError, match="only 3 bytes"):
        check_luks2_magic(b"LUK", source="d")
