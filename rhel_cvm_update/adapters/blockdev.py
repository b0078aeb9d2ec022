"""The disk under the LUKS2 root, for grow-root: where things are (sysfs and mountinfo), the
raw disk (read, write with fsync), the kernel's view of a partition (``partx --update``:
BLKPG_RESIZE_PARTITION, the re-read that works on a disk whose partitions are in use), and
the filesystem on the open mapping (``resize2fs`` for ext4, ``xfs_growfs`` for XFS, both
online on a mounted filesystem).  Works on plain image files too, where there is no kernel
view to update.
"""

import dataclasses
import fcntl
import os
import re
import stat
import struct
from typing import List, Optional, Sequence, Tuple

from rhel_cvm_update.adapters.process import run_tool
from rhel_cvm_update.errors import MachineError, UnsupportedError

SYS_DEV_BLOCK = "/sys/dev/block"
MOUNTINFO = "/proc/self/mountinfo"
BLKSSZGET = 0x1268
GROWABLE_FILESYSTEMS = ("ext4", "xfs")


@dataclasses.dataclass(frozen=True)
class RootLayout:
    """The LUKS2 root partition, its disk, and what is open and mounted on it."""

    partition: str                 # /dev/sda4
    disk: str                      # /dev/sda
    number: int                    # partition number in the disk's table
    start_sectors: int             # where the kernel has it, in 512-byte sectors
    mapping: Optional[str]         # dm-crypt name ("root"), None when not open
    mapping_device: Optional[str]  # /dev/dm-0
    mount_point: Optional[str]
    fs_type: Optional[str]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def run(argv: Sequence[str], *, stdin: Optional[int] = None, timeout: int = 600) -> str:
    return run_tool(argv, stdin=stdin, timeout=timeout).stdout.decode("utf-8", "replace")


def _sysfs(device: str) -> str:
    try:
        st = os.stat(device)
    except OSError as e:
        raise MachineError(f"{device}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise UnsupportedError(f"{device} is not a block device; grow-root works on the disk the root is on")
    return os.path.realpath(os.path.join(SYS_DEV_BLOCK, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"))


def _read_sysfs(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise MachineError(f"cannot read {path}: {e.strerror}") from None


def _mounts() -> List[Tuple[str, str, str]]:
    """(major:minor, mount point, fs type) of every mount, from mountinfo."""
    found = []
    try:
        with open(MOUNTINFO) as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                found.append((fields[2], fields[4].replace("\\040", " "), fields[sep + 1]))
    except (OSError, ValueError, IndexError):
        pass
    return found


def locate_root(partition: str) -> RootLayout:
    """The layout around ``partition`` (the LUKS2 root as ``luks_device`` names it)."""
    part_dir = _sysfs(partition)
    if not os.path.exists(os.path.join(part_dir, "partition")):
        raise UnsupportedError(f"{partition} is not a partition of a disk (no {part_dir}/partition)")
    number = int(_read_sysfs(os.path.join(part_dir, "partition")))
    start = int(_read_sysfs(os.path.join(part_dir, "start")))
    disk = "/dev/" + os.path.basename(os.path.dirname(part_dir))
    mapping = mapping_device = mount_point = fs_type = None
    holders_dir = os.path.join(part_dir, "holders")
    holders = sorted(os.listdir(holders_dir)) if os.path.isdir(holders_dir) else []
    crypt = [h for h in holders
             if _read_sysfs(os.path.join(holders_dir, h, "dm", "uuid")).startswith("CRYPT-LUKS2-")]
    if len(crypt) > 1:
        raise UnsupportedError(f"{partition} is opened by several dm-crypt mappings ({', '.join(crypt)})")
    if crypt:
        dm_dir = os.path.join(holders_dir, crypt[0])
        mapping = _read_sysfs(os.path.join(dm_dir, "dm", "name"))
        mapping_device = "/dev/" + crypt[0]
        devnum = _read_sysfs(os.path.join(dm_dir, "dev"))
        mounts = [m for m in _mounts() if m[0] == devnum]
        mounts.sort(key=lambda m: (m[1] != "/", m[1]))   # the root mount first
        if mounts:
            _, mount_point, fs_type = mounts[0]
    return RootLayout(partition, disk, number, start, mapping, mapping_device, mount_point, fs_type)


def partition_sectors(partition: str) -> int:
    """The partition's size as the kernel has it (512-byte sectors)."""
    return int(_read_sysfs(os.path.join(_sysfs(partition), "size")))


def tell_kernel(layout: RootLayout) -> None:
    """Make the kernel take the partition's new size from the table (BLKPG through partx:
    BLKRRPART would fail with EBUSY on the disk holding the mounted root)."""
    run(["partx", "--update", "--nr", str(layout.number), layout.disk])


class Disk:
    """A disk or disk image opened for reading and writing its partition table."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise MachineError(f"cannot open {path}: {e.strerror}") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Disk":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def size(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_END)

    def sector_size(self) -> int:
        if not stat.S_ISBLK(os.fstat(self._fd).st_mode):
            return 512
        buf = bytearray(4)
        try:
            fcntl.ioctl(self._fd, BLKSSZGET, buf)
        except OSError as e:
            raise MachineError(f"{self.path}: BLKSSZGET failed: {e.strerror}") from None
        return struct.unpack("<i", bytes(buf))[0]

    def read(self, offset: int, size: int) -> bytes:
        try:
            return os.pread(self._fd, size, offset)
        except OSError as e:
            raise MachineError(f"cannot read {self.path} at {offset:#x}: {e.strerror}") from None

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` and make it durable before returning."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.pwrite(self._fd, view, offset + len(data) - len(view)):]
            os.fsync(self._fd)
        except OSError as e:
            raise MachineError(f"cannot write {self.path} at {offset:#x}: {e.strerror}") from None


def device_bytes(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise MachineError(f"cannot open {path}: {e.strerror}") from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _number(pattern: str, text: str, what: str) -> int:
    match = re.search(pattern, text, re.M)
    if match is None:
        raise MachineError(f"cannot read the {what} from: {text.strip()[:200]}")
    return int(match.group(1))


def filesystem_bytes(fs_type: Optional[str], device: str, mount_point: Optional[str]) -> int:
    """The size the filesystem on ``device`` has now (what a grow would change)."""
    if fs_type == "ext4":
        text = run(["dumpe2fs", "-h", device])
        return _number(r"^Block count:\s+(\d+)$", text, "ext4 block count") * \
            _number(r"^Block size:\s+(\d+)$", text, "ext4 block size")
    if fs_type == "xfs":
        text = run(["xfs_info", mount_point or device])
        match = re.search(r"^data\s+=\s+bsize=(\d+)\s+blocks=(\d+)", text, re.M)
        if match is None:
            raise MachineError(f"cannot read the XFS data size from: {text.strip()[:200]}")
        return int(match.group(1)) * int(match.group(2))
    raise UnsupportedError(f"the root filesystem is {fs_type or 'not mounted'}; grow-root grows "
                           f"{' and '.join(GROWABLE_FILESYSTEMS)}")


def grow_filesystem(fs_type: Optional[str], device: str, mount_point: Optional[str]) -> None:
    if fs_type == "ext4":
        run(["resize2fs", device])
    elif fs_type == "xfs":
        if not mount_point:
            raise UnsupportedError(f"{device}: XFS grows only while mounted (xfs_growfs takes the mount point)")
        run(["xfs_growfs", mount_point])
    else:
        raise UnsupportedError(f"the root filesystem is {fs_type or 'not mounted'}; grow-root grows "
                               f"{' and '.join(GROWABLE_FILESYSTEMS)}")
