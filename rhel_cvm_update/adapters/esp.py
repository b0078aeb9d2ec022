"""The EFI system partition: where it is on disk, its UKIs, and shim's fallback CSV.

Location (what a Hard Drive device-path node needs):
* config ``esp_device`` set: read the GPT of that disk or image file and take its one
  partition of the ESP type;
* otherwise: the block device mounted at ``esp`` (pyudev over sysfs: partition number, start,
  size), its unique partition GUID from the udev database or, without one (containers,
  initrd-less boots), from the GPT of the parent disk.

Paths on the ESP are written the firmware's way, ``\\EFI\\Linux\\x.efi``: the ESP mount point
is the root, separators are backslashes.
"""

import dataclasses
import mmap
import os
import uuid
from typing import List, Optional, Tuple

from rhel_cvm_update.errors import ConfigError, CvmUpdateError, FormatError, MachineError
from rhel_cvm_update.formats.bootcsv import BootCsvEntry, boot_csv_bytes, parse_boot_csv
from rhel_cvm_update.formats.devpath import HardDriveNode
from rhel_cvm_update.formats.gpt import (GPT_SIGNATURE, GptHeader, GptPartition,
                                         parse_partition_entries)

SECTOR_SIZES = (512, 4096)
BOOT_CSV_NAME = "BOOTX64.CSV"


@dataclasses.dataclass(frozen=True)
class EspPartition:
    disk: str
    partition_number: int
    start: int  # in logical blocks of the disk, as the Hard Drive node wants it
    size: int
    partition_guid: uuid.UUID

    def hard_drive_node(self) -> HardDriveNode:
        return HardDriveNode.gpt(self.partition_number, self.start, self.size, self.partition_guid)


def read_gpt(path: str) -> Tuple[int, GptHeader, Tuple[GptPartition, ...]]:
    """(logical block size, header, used partitions) of a disk or disk image."""
    try:
        with open(path, "rb") as disk:
            for sector_size in SECTOR_SIZES:
                disk.seek(sector_size)
                sector = disk.read(sector_size)
                if not sector.startswith(GPT_SIGNATURE):
                    continue
                header = GptHeader.from_bytes(sector, source=path, offset=sector_size)
                disk.seek(header.entries_lba * sector_size)
                entries = disk.read(header.entries_bytes)
                return sector_size, header, parse_partition_entries(
                    header, entries, source=path, offset=header.entries_lba * sector_size)
    except OSError as e:
        raise MachineError(f"cannot read the partition table of {path}: {e.strerror}") from None
    raise FormatError("no GPT header at LBA 1 for 512- or 4096-byte sectors", source=path,
                      offset=512, field="GPT header")


def esp_from_disk(path: str) -> EspPartition:
    """The single ESP-type partition of a GPT disk or image."""
    _, _, partitions = read_gpt(path)
    esps = [p for p in partitions if p.is_esp]
    if len(esps) != 1:
        # Which of several ESPs the firmware boots is not for this tool to guess.
        raise ConfigError(f"{path} has {len(esps)} EFI system partitions, need exactly one")
    esp = esps[0]
    return EspPartition(path, esp.number, esp.first_lba, esp.size_lbas, esp.unique_guid)


def esp_from_mount(mount_point: str) -> EspPartition:
    """The partition mounted at ``mount_point`` (sysfs through pyudev)."""
    import pyudev  # imported here: only this path needs libudev

    try:
        device_number = os.stat(mount_point).st_dev
    except OSError as e:
        raise ConfigError(f"ESP mount point {mount_point}: {e.strerror}") from None
    context = pyudev.Context()
    try:
        partition = pyudev.Devices.from_device_number(context, "block", device_number)
    except pyudev.DeviceNotFoundError:
        raise ConfigError(f"{mount_point} is not on a block device; set esp_device") from None
    if partition.device_type != "partition":
        raise ConfigError(f"{mount_point} is on {partition.device_node}, not on a partition; "
                          "set esp_device")
    disk = partition.find_parent("block", "disk")
    if disk is None or not disk.device_node:
        raise MachineError(f"cannot find the disk holding {partition.device_node}")
    try:
        number = partition.attributes.asint("partition")
        start_512 = partition.attributes.asint("start")
        size_512 = partition.attributes.asint("size")
    except (KeyError, ValueError) as e:
        raise MachineError(f"sysfs lacks partition data for {partition.device_node}: {e}") from None
    # sysfs counts 512-byte sectors; the Hard Drive node counts logical blocks of the disk.
    try:
        block_size = disk.attributes.asint("queue/logical_block_size")
    except (KeyError, ValueError):
        block_size = 512
    ratio = block_size // 512
    udev_guid = partition.properties.get("ID_PART_ENTRY_UUID")
    if udev_guid and partition.properties.get("ID_PART_ENTRY_SCHEME") == "gpt":
        guid = uuid.UUID(udev_guid)
    else:
        _, _, entries = read_gpt(disk.device_node)
        matching = [p for p in entries if p.number == number]
        if not matching or matching[0].first_lba != start_512 // ratio:
            raise MachineError(f"the GPT of {disk.device_node} has no partition {number} "
                               f"starting at sector {start_512}")
        guid = matching[0].unique_guid
    return EspPartition(disk.device_node, number, start_512 // ratio, size_512 // ratio, guid)


def locate_esp(esp_device: str, esp_mount: str) -> EspPartition:
    return esp_from_disk(esp_device) if esp_device else esp_from_mount(esp_mount)


@dataclasses.dataclass(frozen=True)
class UkiFile:
    path: str  # on this system
    esp_path: str  # as the firmware and shim name it
    kernel_version: Optional[str]
    problem: Optional[str] = None  # why it could not be read as a UKI

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Esp:
    """The mounted ESP directory."""

    def __init__(self, mount_point: str):
        self.mount_point = os.path.realpath(mount_point)

    def efi_path(self, path: str) -> str:
        """``/boot/efi/EFI/Linux/x.efi`` -> ``\\EFI\\Linux\\x.efi``."""
        real = os.path.realpath(path)
        relative = os.path.relpath(real, self.mount_point)
        if relative == "." or relative.startswith(".." + os.sep) or relative == "..":
            raise ConfigError(f"{path} is not on the ESP mounted at {self.mount_point}")
        return "\\" + relative.replace(os.sep, "\\")

    def host_path(self, efi_path: str) -> str:
        parts = [p for p in efi_path.split("\\") if p]
        if any(p in (".", "..") for p in parts):
            raise ConfigError(f"{efi_path!r} is not a plain ESP path")
        return os.path.join(self.mount_point, *parts)

    def list_ukis(self, uki_dir: str) -> List[UkiFile]:
        """Every ``*.efi`` in uki_dir, sorted by name, with the kernel version it carries."""
        try:
            names = sorted(n for n in os.listdir(uki_dir) if n.lower().endswith(".efi"))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise MachineError(f"cannot list UKIs in {uki_dir}: {e.strerror}") from None
        found = []
        for name in names:
            path = os.path.join(uki_dir, name)
            if os.path.isfile(path):
                found.append(self.read_uki(path))
        return found

    def read_uki(self, path: str) -> UkiFile:
        # The PE code is imported here: `status` uses the ESP without reading UKIs.
        from rhel_cvm_update.formats.uki import UKI

        efi_path = self.efi_path(path)
        version: Optional[str] = None
        problem: Optional[str] = None
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return UkiFile(path, efi_path, None, "empty file")
                view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise MachineError(f"cannot read {path}: {e.strerror}") from None
        try:
            version = UKI.parse(view, source=path).kernel_version
        except CvmUpdateError as e:
            problem = str(e)
        try:
            view.close()
        except BufferError:
            # A parse error's traceback still holds slices of the mapping; it is unmapped
            # when they are released.
            pass
        return UkiFile(path, efi_path, version, problem)

    def _vendor_dir(self, vendor: str) -> str:
        if not vendor or "/" in vendor or "\\" in vendor or vendor in (".", ".."):
            raise ConfigError(f"vendor {vendor!r} is not a directory name under EFI/")
        return os.path.join(self.mount_point, "EFI", vendor)

    def boot_csv_path(self, vendor: str) -> str:
        """The vendor's BOOTX64.CSV; FAT and fallback ignore case, so an existing file of any
        case is the one."""
        directory = self._vendor_dir(vendor)
        try:
            for name in os.listdir(directory):
                if name.upper() == BOOT_CSV_NAME:
                    return os.path.join(directory, name)
        except FileNotFoundError:
            pass
        return os.path.join(directory, BOOT_CSV_NAME)

    def read_boot_csv(self, vendor: str) -> Optional[Tuple[BootCsvEntry, ...]]:
        path = self.boot_csv_path(vendor)
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 20)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise MachineError(f"cannot read {path}: {e.strerror}") from None
        return parse_boot_csv(raw, source=path)

    def write_boot_csv(self, vendor: str, entries: List[BootCsvEntry]) -> str:
        path = self.boot_csv_path(vendor)
        self.replace_file(path, boot_csv_bytes(entries))
        return path

    def replace_file(self, path: str, data: Optional[bytes]) -> None:
        """Replace (or with None delete) a file on the ESP atomically: temp file, fsync,
        rename, fsync the directory."""
        directory = os.path.dirname(path)
        if data is None:
            try:
                os.unlink(path)
                self._fsync_dir(directory)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise MachineError(f"cannot remove {path}: {e.strerror}") from None
            return
        temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
            self._fsync_dir(directory)
        except OSError as e:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise MachineError(f"cannot write {path}: {e.strerror}") from None

    @staticmethod
    def _fsync_dir(directory: str) -> None:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
