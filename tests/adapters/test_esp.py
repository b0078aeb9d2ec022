"""rhel_cvm_update.adapters.esp: GPT reading (checked against sgdisk), ESP discovery through
sysfs/pyudev for a really mounted loop partition, UKI listing, atomic CSV writes."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from rhel_cvm_update.adapters.esp import Esp, esp_from_disk, locate_esp, read_gpt
from rhel_cvm_update.errors import ConfigError, FormatError
from rhel_cvm_update.formats.bootcsv import BootCsvEntry, parse_boot_csv
from rhel_cvm_update.formats.gpt import ESP_TYPE_GUID
from tests.bootfixtures import small_uki  # noqa: F401  (pytest fixture)

REPO = Path(__file__).resolve().parents[2]


def need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def sgdisk_info(image, number):
    out = subprocess.run(["sgdisk", "-i", str(number), str(image)], check=True,
                         stdout=subprocess.PIPE, universal_newlines=True).stdout
    first = int(re.search(r"First sector: (\d+)", out).group(1))
    last = int(re.search(r"Last sector: (\d+)", out).group(1))
    guid = uuid.UUID(re.search(r"Partition unique GUID: (\S+)", out).group(1))
    return first, last, guid


def make_gpt_image(path, partitions, size_mb=64):
    """partitions: list of (number, start, end_spec, type code) for sgdisk -n/-t."""
    need("sgdisk")
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    argv = ["sgdisk"]
    for number, start, end, code in partitions:
        argv += ["-n", f"{number}:{start}:{end}", "-t", f"{number}:{code}"]
    subprocess.run(argv + [str(path)], check=True, stdout=subprocess.DEVNULL)
    return path


def test_gpt_of_image_matches_sgdisk(tmp_path):
    image = make_gpt_image(tmp_path / "disk.img", [(1, 2048, "+16M", "8300"),
                                                   (2, 0, "+32M", "ef00")])
    sector_size, _header, partitions = read_gpt(str(image))
    assert sector_size == 512
    by_number = {p.number: p for p in partitions}
    for number in (1, 2):
        first, last, guid = sgdisk_info(image, number)
        assert (by_number[number].first_lba, by_number[number].last_lba,
                by_number[number].unique_guid) == (first, last, guid)
    assert by_number[2].type_guid == ESP_TYPE_GUID and not by_number[1].is_esp
    esp = esp_from_disk(str(image))
    first, last, guid = sgdisk_info(image, 2)
    assert (esp.partition_number, esp.start, esp.size, esp.partition_guid) == (
        2, first, last - first + 1, guid)
    assert locate_esp(str(image), "/nonexistent") == esp


def test_no_or_two_esps_is_config_error(tmp_path):
    none = make_gpt_image(tmp_path / "none.img", [(1, 2048, "+8M", "8300")])
    two = make_gpt_image(tmp_path / "two.img", [(1, 2048, "+8M", "ef00"), (2, 0, "+8M", "ef00")])
    for image in (none, two):
        with pytest.raises(ConfigError):
            esp_from_disk(str(image))


def test_damaged_gpt_is_format_error(tmp_path):
    image = make_gpt_image(tmp_path / "disk.img", [(1, 2048, "+8M", "ef00")])
    data = bytearray(image.read_bytes())
    data[512 + 40] ^= 0xFF  # inside FirstUsableLBA: header CRC no longer matches
    (tmp_path / "bad-header.img").write_bytes(bytes(data))
    with pytest.raises(FormatError) as info:
        read_gpt(str(tmp_path / "bad-header.img"))
    assert info.value.field == "HeaderCRC32"
    data = bytearray(image.read_bytes())
    data[1024 + 40] ^= 0xFF  # inside entry 1: entry array CRC no longer matches
    (tmp_path / "bad-entries.img").write_bytes(bytes(data))
    with pytest.raises(FormatError) as info:
        read_gpt(str(tmp_path / "bad-entries.img"))
    assert info.value.field == "PartitionEntryArrayCRC32"
    (tmp_path / "blank.img").write_bytes(bytes(8192))
    with pytest.raises(FormatError):
        read_gpt(str(tmp_path / "blank.img"))


def test_efi_paths(tmp_path):
    (tmp_path / "EFI" / "Linux").mkdir(parents=True)
    esp = Esp(str(tmp_path))
    assert esp.efi_path(str(tmp_path / "EFI" / "Linux" / "a.efi")) == "\\EFI\\Linux\\a.efi"
    assert esp.host_path("\\EFI\\Linux\\a.efi") == str(tmp_path.resolve() / "EFI" / "Linux" / "a.efi")
    with pytest.raises(ConfigError):
        esp.efi_path("/etc/passwd")
    with pytest.raises(ConfigError):
        esp.host_path("\\EFI\\..\\..\\etc")


def test_list_ukis_reports_versions_and_problems(tmp_path, small_uki):
    linux = tmp_path / "EFI" / "Linux"
    linux.mkdir(parents=True)
    shutil.copy(small_uki, linux / "b.efi")
    (linux / "a.EFI").write_bytes(b"MZ not a PE")
    (linux / "notes.txt").write_text("skip me")
    found = Esp(str(tmp_path)).list_ukis(str(linux))
    assert [u.esp_path for u in found] == ["\\EFI\\Linux\\a.EFI", "\\EFI\\Linux\\b.efi"]
    assert found[0].kernel_version is None and found[0].problem
    assert found[1].kernel_version == "5.14.0-362.8.1.el9_3.x86_64" and found[1].problem is None


def test_boot_csv_write_is_atomic_and_keeps_existing_case(tmp_path):
    vendor_dir = tmp_path / "EFI" / "redhat"
    vendor_dir.mkdir(parents=True)
    (vendor_dir / "bootx64.csv").write_bytes("old.efi,Old,\n".encode("utf-16-le"))
    esp = Esp(str(tmp_path))
    entry = BootCsvEntry("shimx64.efi", "RHEL CVM UKI 5.14", "\\EFI\\Linux\\k.efi")
    path = esp.write_boot_csv("redhat", [entry])
    assert path == str(tmp_path.resolve() / "EFI" / "redhat" / "bootx64.csv")
    assert sorted(os.listdir(vendor_dir)) == ["bootx64.csv"]
    assert parse_boot_csv((vendor_dir / "bootx64.csv").read_bytes()) == (entry,)
    assert esp.read_boot_csv("redhat") == (entry,)
    with pytest.raises(ConfigError):
        esp.boot_csv_path("../x")


def test_utf8_csv_on_esp_is_a_clear_error(tmp_path):
    vendor_dir = tmp_path / "EFI" / "redhat"
    vendor_dir.mkdir(parents=True)
    (vendor_dir / "BOOTX64.CSV").write_bytes(b"shimx64.efi,RHEL,,\n")
    with pytest.raises(FormatError) as info:
        Esp(str(tmp_path)).read_boot_csv("redhat")
    assert "BOOTX64.CSV" in str(info.value)


@pytest.mark.root
def test_esp_from_mount_of_a_real_loop_partition(tmp_path):
    """Mount a GPT loop partition in a private mount namespace and locate it via sysfs."""
    need("losetup", "unshare", "mkfs.ext4", "mount")
    if os.geteuid() != 0:
        pytest.skip("needs root")
    image = make_gpt_image(tmp_path / "disk.img", [(1, 2048, "+8M", "8300"),
                                                   (2, 0, "+24M", "ef00")])
    proc = subprocess.run(["losetup", "-fP", "--show", str(image)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    if proc.returncode != 0:
        pytest.skip(f"no loop devices: {proc.stderr.strip()}")
    loop = proc.stdout.strip()
    try:
        partition_node = loop + "p2"
        if not os.path.exists(partition_node):
            pytest.skip(f"{partition_node} did not appear (no partition scanning)")
        # ext4, not vfat: this kernel has no vfat, and discovery does not care about the type.
        subprocess.run(["mkfs.ext4", "-q", partition_node], check=True)
        mount_point = tmp_path / "esp"
        mount_point.mkdir()
        script = textwrap.dedent(f"""
            import subprocess, sys
            sys.path.insert(0, {str(REPO)!r})
            subprocess.run(["mount", {partition_node!r}, {str(mount_point)!r}], check=True)
            from rhel_cvm_update.adapters.esp import esp_from_mount
            esp = esp_from_mount({str(mount_point)!r})
            print(esp.disk, esp.partition_number, esp.start, esp.size, esp.partition_guid)
        """)
        child = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c",
                                script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=60)
        assert child.returncode == 0, child.stderr
        first, last, guid = sgdisk_info(image, 2)
        assert child.stdout.split() == [loop, "2", str(first), str(last - first + 1), str(guid)]
    finally:
        subprocess.run(["losetup", "-d", loop])
