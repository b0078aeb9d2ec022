"""Fuzz the GPT reader with mutated partition tables that sgdisk wrote.

Most random edits only break a CRC32; so each mutated table is tried twice: as mutated, and
with both CRCs recomputed, which lets the mutation reach the field checks behind them.
"""

import shutil
import struct
import subprocess
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats.gpt import GptHeader, parse_partition_entries
from tests.fuzz.mutation import mutated

SOURCE = "fuzzed-disk"
SECTOR = 512
FUZZ = settings(max_examples=2000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="session")
def sgdisk_tables(tmp_path_factory):
    """LBA 1 (header) + the entry array of real sgdisk tables: an ESP and root like a RHEL
    CVM disk, and a table with 128 used-or-not entries of a non-default count."""
    if shutil.which("sgdisk") is None:
        pytest.skip("sgdisk (gdisk) is not installed")
    work = tmp_path_factory.mktemp("gpt")
    tables = []
    for name, argv in (("cvm", ["-n", "1:2048:+32M", "-t", "1:ef00", "-c", "1:EFI System",
                                "-n", "2:0:0", "-t", "2:4f68bce3-e8cd-4db1-96e7-fbcaf984b709", "-c", "2:root"]),
                       ("small", ["-a", "1", "-n", "1:34:100", "-t", "1:ef00", "-n", "2:101:200"])):
        disk = work / f"{name}.img"
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        subprocess.run(["sgdisk", *argv, str(disk)], check=True, stdout=subprocess.DEVNULL)
        tables.append(disk.read_bytes()[SECTOR:34 * SECTOR])
    return tables


def fix_crcs(table: bytearray) -> None:
    """Recompute the entry-array and header CRC32 as a consistent (hostile) writer would."""
    if len(table) < 92:
        return
    header_size, = struct.unpack_from("<I", table, 12)
    count, size = struct.unpack_from("<II", table, 80)
    entries = bytes(table[SECTOR:SECTOR + min(count * size, len(table))])
    struct.pack_into("<I", table, 88, zlib.crc32(entries))
    if 92 <= header_size <= SECTOR:
        header = bytearray(table[:header_size])
        header[16:20] = bytes(4)
        struct.pack_into("<I", table, 16, zlib.crc32(bytes(header)))


def read_table(table: bytes):
    try:
        header = GptHeader.from_bytes(table[:SECTOR], source=SOURCE, offset=SECTOR)
        # The entry array follows at LBA 2 in every sgdisk table; a hostile entries_lba only
        # moves where the adapter reads, the bytes it hands over are bounded by entries_bytes.
        return header, parse_partition_entries(header, table[SECTOR:SECTOR + header.entries_bytes],
                                               source=SOURCE, offset=2 * SECTOR)
    except FormatError as e:
        assert e.source == SOURCE and e.offset is not None
        return None


def test_seed_tables_parse(sgdisk_tables):
    header, partitions = read_table(sgdisk_tables[0])
    assert [p.name for p in partitions] == ["EFI System", "root"] and partitions[0].is_esp
    assert header.entry_count == 128


@FUZZ
@given(st.data())
def test_mutated_tables(sgdisk_tables, data):
    table = bytearray(data.draw(mutated(sgdisk_tables, head=SECTOR + 256)))
    read_table(bytes(table))
    fix_crcs(table)
    result = read_table(bytes(table))
    if result is not None:
        header, partitions = result
        assert header.entries_bytes <= len(table)
        assert all(p.first_lba <= p.last_lba for p in partitions)


def test_huge_entry_array_is_refused_before_reading_it(sgdisk_tables):
    table = bytearray(sgdisk_tables[0])
    struct.pack_into("<I", table, 80, 0xFFFFFFFF)  # NumberOfPartitionEntries
    fix_crcs(table)
    with pytest.raises(FormatError) as e:
        GptHeader.from_bytes(bytes(table[:SECTOR]), source=SOURCE, offset=SECTOR)
    assert e.value.field == "NumberOfPartitionEntries"
