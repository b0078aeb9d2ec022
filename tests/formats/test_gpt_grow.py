"""Growing a GPT disk (formats/gpt.py: read_disk_gpt, plan_grow) on real image files.

The images are made by sgdisk and then enlarged with truncate, as `qemu-img resize` or an
Azure disk resize leaves them: the backup table still at the old end.  The golden values come
from sgdisk: `sgdisk -v` finds no problem in the result, and the tables are byte for byte the
ones sgdisk writes itself for "move the backup to the end (-e), recreate the partition with the
same GUID, type and name up to the same end".
"""

import hashlib
import os
import re
import shutil
import struct
import subprocess
import zlib

import pytest

from rhel_cvm_update.errors import FormatError, UnsupportedError
from rhel_cvm_update.formats import gpt

pytestmark = pytest.mark.skipif(shutil.which("sgdisk") is None, reason="sgdisk (gdisk) is not installed")

ROOT_TYPE = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
MIB = 1 << 20


def sgdisk(*args) -> str:
    return subprocess.run(["sgdisk", *map(str, args)], check=True, capture_output=True, text=True).stdout


def make_disk(path, size_mib=64, grow_to_mib=128, extra=()):
    """An ESP (16 MiB) and an x86-64 root partition filling the disk, then the disk enlarged."""
    subprocess.run(["truncate", "-s", f"{size_mib}M", str(path)], check=True)
    sgdisk("-o", "-n", "1:2048:+16M", "-t", "1:ef00", "-c", "1:EFI System",
           *extra, "-n", "2:0:0", "-t", f"2:{ROOT_TYPE}", "-c", "2:root", path)
    if grow_to_mib:
        subprocess.run(["truncate", "-s", f"{grow_to_mib}M", str(path)], check=True)
    return path


def read_disk(path, recover=False, sector_size=512):
    with open(path, "rb") as f:
        data = f.read()
    return gpt.read_disk_gpt(lambda off, n: data[off:off + n], len(data), sector_size, str(path), recover=recover), data


def apply(path, plan):
    fd = os.open(str(path), os.O_RDWR)
    try:
        for write in plan.writes:
            os.pwrite(fd, write.data, write.offset)
    finally:
        os.close(fd)


def grow(path, number=2):
    disk, data = read_disk(path)
    plan = gpt.plan_grow(disk, number, data[:512])
    apply(path, plan)
    return plan


def sgdisk_verify(path) -> str:
    return subprocess.run(["sgdisk", "-v", str(path)], capture_output=True, text=True).stdout


def partition_info(path, number):
    text = sgdisk("-i", number, path)
    first = int(re.search(r"First sector: (\d+)", text).group(1))
    last = int(re.search(r"Last sector: (\d+)", text).group(1))
    guid = re.search(r"Partition unique GUID: (\S+)", text).group(1)
    return first, last, guid


def test_an_enlarged_disk_is_grown_as_sgdisk_would(tmp_path):
    path = make_disk(tmp_path / "disk.img")
    assert "secondary header's self-pointer" in sgdisk_verify(path)   # the state after a disk resize
    first, old_last, guid = partition_info(path, 2)
    golden = tmp_path / "golden.img"
    shutil.copy(path, golden)

    plan = grow(path)

    assert "No problems found" in sgdisk_verify(path)
    assert plan.grown and plan.old_last_lba == old_last and plan.new_backup_lba == 128 * MIB // 512 - 1
    _, last, _ = partition_info(path, 2)
    assert last == plan.new_last_lba and (last + 1) % 2048 == 0 and (last - first + 1) % 8 == 0
    assert partition_info(path, 1)[:2] == (2048, 2048 + 16 * 2048 - 1)   # the ESP untouched
    # sgdisk itself: backup to the end, the root recreated with the same GUID up to the same end.
    sgdisk("-e", "-d", 2, "-n", f"2:{first}:{last}", "-t", f"2:{ROOT_TYPE}", "-c", "2:root", "-u", f"2:{guid}", golden)
    ours, theirs = path.read_bytes(), golden.read_bytes()
    assert ours[512:34 * 512] == theirs[512:34 * 512]                 # primary header + entries
    assert ours[-33 * 512:] == theirs[-33 * 512:]                     # backup entries + header
    # Protective MBR: sgdisk also rewrites the CHS end (bytes 451-453), which we leave alone.
    assert ours[:451] == theirs[:451] and ours[454:512] == theirs[454:512]
    assert struct.unpack_from("<I", ours, 446 + 12)[0] == 128 * MIB // 512 - 1
    assert ours[64 * MIB - 512:64 * MIB] == bytes(512)                # the stale backup header zeroed


def test_a_second_run_has_nothing_to_write_and_says_why(tmp_path):
    path = make_disk(tmp_path / "disk.img")
    grow(path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    plan = grow(path)
    assert not plan.changed and not plan.grown and "no free space after partition 2" in plan.reason
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_a_disk_not_enlarged_has_nothing_to_do(tmp_path):
    path = make_disk(tmp_path / "disk.img", grow_to_mib=0)
    disk, data = read_disk(path)
    plan = gpt.plan_grow(disk, 2, data[:512])
    assert plan.writes == () and "no free space" in plan.reason


def test_a_small_enlargement_only_moves_the_backup(tmp_path):
    """Less than 1 MiB to gain: the partition stays, the backup still goes to the end."""
    path = make_disk(tmp_path / "disk.img", grow_to_mib=0)
    with open(path, "ab") as f:
        f.truncate(64 * MIB + 64 * 1024)
    _, old_last, _ = partition_info(path, 2)
    plan = grow(path)
    assert not plan.grown and plan.changed and "backup GPT moved" in plan.reason
    assert "No problems found" in sgdisk_verify(path) and partition_info(path, 2)[1] == old_last


def test_a_partition_after_the_root_is_refused(tmp_path):
    path = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "64M", str(path)], check=True)
    sgdisk("-o", "-n", "1:2048:+16M", "-t", "1:ef00", "-n", "2:0:+20M", "-t", f"2:{ROOT_TYPE}",
           "-n", "3:0:+8M", "-t", "3:8300", "-c", "3:data", path)
    subprocess.run(["truncate", "-s", "128M", str(path)], check=True)
    disk, data = read_disk(path)
    with pytest.raises(UnsupportedError, match=r"partition 3 \(data, LBA \d+-\d+\) follows partition 2"):
        gpt.plan_grow(disk, 2, data[:512])
    assert gpt.plan_grow(disk, 3, data[:512]).grown   # the last one can grow


def test_no_such_partition(tmp_path):
    disk, data = read_disk(make_disk(tmp_path / "disk.img"))
    with pytest.raises(UnsupportedError, match="no partition 7"):
        gpt.plan_grow(disk, 7, data[:512])


def _patched(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return path


def _rewrite_primary(path, mutate_entries=None, **header_fields):
    """The primary table with changed fields and valid CRCs (hostile but self-consistent)."""
    disk, data = read_disk(path)
    entries = bytearray(disk.entries)
    if mutate_entries:
        mutate_entries(entries)
    header = gpt.GptHeader.from_bytes(data[512:1024], str(path), 512)
    header = header.__class__(**dict(header.__dict__, entries_crc32=zlib.crc32(bytes(entries)), **header_fields))
    with open(path, "r+b") as f:
        f.seek(512)
        f.write(header.to_bytes(512))
        f.seek(header.entries_lba * 512)
        f.write(bytes(entries))


@pytest.mark.parametrize("case,offset,message", [
    ("wrong signature", None, r"at offset 0x200: Signature: no 'EFI PART' signature"),
    ("bad header CRC", None, r"at offset 0x210: HeaderCRC32: header CRC32 does not match"),
    ("bad entries CRC", None, r"at offset 0x400: PartitionEntryArrayCRC32"),
    ("bad backup CRC", None, r"at offset 0x3fffe10: HeaderCRC32"),
    ("overlap", None, r"partition 2 \(LBA \d+-\d+\) overlaps partition 1"),
    ("entries out of range", None, r"PartitionEntryLBA: partition entry array at LBA 40-71 is out of range"),
    ("backup beyond the disk", None, r"AlternateLBA: AlternateLBA 999999 is not between"),
    ("truncated", None, r"cannot hold a GPT disk"),
])
def test_hostile_tables_are_refused_naming_file_and_offset(tmp_path, case, offset, message):
    path = make_disk(tmp_path / "disk.img")
    if case == "wrong signature":
        _patched(path, 512, b"EFI PARX")
    elif case == "bad header CRC":
        _patched(path, 512 + 40, b"\x01")
    elif case == "bad entries CRC":
        _patched(path, 1024 + 128 + 56, b"X\0")
    elif case == "bad backup CRC":
        _patched(path, 64 * MIB - 512 + 40, b"\x01")
    elif case == "overlap":
        _rewrite_primary(path, lambda e: struct.pack_into("<Q", e, 128 + 32, 4096))
    elif case == "entries out of range":
        _rewrite_primary(path, entries_lba=40)
    elif case == "backup beyond the disk":
        _rewrite_primary(path, alternate_lba=999999)
    elif case == "truncated":
        with open(path, "r+b") as f:
            f.truncate(20 * 512)
    before = path.read_bytes()
    with pytest.raises(FormatError, match=message) as info:
        read_disk(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before


def test_an_mbr_disk_is_refused(tmp_path):
    path = tmp_path / "mbr.img"
    mbr = bytearray(512)
    struct.pack_into("<B3sB3sII", mbr, 446, 0x80, b"\0\0\0", 0x83, b"\0\0\0", 2048, 100000)
    mbr[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(mbr) + bytes(64 * MIB - 512))
    with pytest.raises(FormatError, match=r"mbr.img at offset 0x200: GPT header: an MBR \(DOS\) partition table"):
        read_disk(path)


def test_backup_that_differs_is_refused_but_ignored_in_recovery(tmp_path):
    """A good primary and a backup with other entries: refused; when resuming an interrupted
    grow (recover) the primary wins and both tables are written again."""
    path = make_disk(tmp_path / "disk.img")
    golden = tmp_path / "golden.img"
    shutil.copy(path, golden)
    grow(golden)
    # The state after a power cut between the backup write and the primary write.
    disk, data = read_disk(path)
    plan = gpt.plan_grow(disk, 2, data[:512])
    apply(path, gpt.GrowPlan(**dict(plan.__dict__, writes=plan.writes[:1])))
    # The primary still points at the old backup, which is intact: consistent, replanned the same.
    assert gpt.plan_grow(read_disk(path)[0], 2, data[:512]).writes == plan.writes
    # A backup rewritten in place with other entries (a crash of a growth that kept its place).
    _patched(path, 64 * MIB - 33 * 512 + 128 + 40, b"\x07")
    with pytest.raises(FormatError, match="PartitionEntryArrayCRC32"):
        read_disk(path)
    recovered, data = read_disk(path, recover=True)
    assert "backup GPT ignored" in recovered.recovered
    apply(path, gpt.plan_grow(recovered, 2, data[:512]))
    assert "No problems found" in sgdisk_verify(path)
    assert path.read_bytes()[512:34 * 512] == golden.read_bytes()[512:34 * 512]


def test_a_torn_primary_is_rebuilt_from_the_new_backup_in_recovery(tmp_path):
    path = make_disk(tmp_path / "disk.img")
    disk, data = read_disk(path)
    plan = gpt.plan_grow(disk, 2, data[:512])
    backup_write, primary_write = plan.writes[:2]
    apply(path, gpt.GrowPlan(**dict(plan.__dict__, writes=(backup_write,))))
    with open(path, "r+b") as f:       # the power went after the header's sector, before the entries'
        f.seek(primary_write.offset)
        f.write(primary_write.data[:512])
    with pytest.raises(FormatError):
        read_disk(path)
    recovered, data = read_disk(path, recover=True)
    assert "rebuilt from the backup" in recovered.recovered
    plan2 = gpt.plan_grow(recovered, 2, data[:512])
    assert plan2.new_last_lba == plan.new_last_lba
    apply(path, plan2)
    assert "No problems found" in sgdisk_verify(path)
    assert partition_info(path, 2)[1] == plan.new_last_lba


def test_header_round_trip():
    header = gpt.GptHeader(1, 262143, 34, 262110, __import__("uuid").uuid4(), 2, 128, 128, 0x1234)
    sector = header.to_bytes(512)
    assert len(sector) == 512 and gpt.GptHeader.from_bytes(sector) == header
