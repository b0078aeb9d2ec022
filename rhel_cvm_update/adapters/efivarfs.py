"""UEFI variables through efivarfs (config key ``efivars``, default /sys/firmware/efi/efivars).

A variable is the file ``<Name>-<lowercase guid>``; its contents are a 4-byte little-endian
attribute word followed by the data.  The same layout in a plain directory stands in for
efivarfs in tests and offline images (efibootmgr accepts it with ``EFIVARFS_PATH``).

Writes follow the kernel's rules (Documentation/filesystems/efivarfs.rst and
fs/efivarfs/file.c): every ``write()`` is one SetVariable whose attributes come from its first
four bytes, so prefix and data go out in a single ``os.write``.  Variables outside the kernel's
allow-list are created immutable; like efivar's ``efivarfs_set_variable`` (efivar 38) the flag
is cleared before a write or unlink and restored afterwards.
"""

import dataclasses
import errno
import fcntl
import os
import re
import struct
import uuid
from typing import List, Optional, Tuple

from rhel_cvm_update.errors import FormatError, MachineError

EFI_VARIABLE_NON_VOLATILE = 0x1
EFI_VARIABLE_BOOTSERVICE_ACCESS = 0x2
EFI_VARIABLE_RUNTIME_ACCESS = 0x4
EFI_VARIABLE_APPEND_WRITE = 0x40
NV_BS_RT = EFI_VARIABLE_NON_VOLATILE | EFI_VARIABLE_BOOTSERVICE_ACCESS | EFI_VARIABLE_RUNTIME_ACCESS

# linux/fs.h: _IOR('f', 1, long) and _IOW('f', 2, long); the kernel moves an int through them.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
_FLAGS = struct.Struct("<I")
_ATTRIBUTES = struct.Struct("<I")

# Filesystems without inode flags answer these; the variable then simply has no immutable flag.
_NO_FLAGS_ERRNOS = (errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

# No variable the firmware keeps is anywhere near this; a bigger file is not a variable.
MAX_VARIABLE_FILE_SIZE = 1 << 20

_FILE_NAME = re.compile(r"^(?P<name>[^/\0]+)-(?P<guid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-"
                        r"[0-9a-f]{4}-[0-9a-f]{12})$")

# What each errno means when it comes back from a SetVariable through efivarfs
# (drivers/firmware/efi/vars.c efi_status_to_err, and the VFS for EPERM/EROFS).
_WRITE_ERRNO_TEXT = {
    errno.EINVAL: "the kernel or firmware refused the value as invalid (EINVAL)",
    errno.ENOSPC: "the firmware variable store is full (ENOSPC)",
    errno.EPERM: "not permitted: the variable is immutable or this process may not change it (EPERM)",
    errno.EROFS: "the variable or the variable store is read-only (EROFS)",
    errno.EACCES: "access denied: the firmware protects this variable (EACCES)",
    errno.EIO: "the firmware reported a device error (EIO)",
}


@dataclasses.dataclass(frozen=True)
class EfiVariable:
    name: str
    guid: uuid.UUID
    attributes: int
    data: bytes


def variable_file_name(name: str, guid: uuid.UUID) -> str:
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a UEFI variable name")
    return f"{name}-{guid}"


class EfiVarFs:
    """Read, create, replace and delete UEFI variables under one efivarfs directory."""

    def __init__(self, path: str):
        self.path = path

    def _file(self, name: str, guid: uuid.UUID) -> str:
        return os.path.join(self.path, variable_file_name(name, guid))

    def list(self) -> List[Tuple[str, uuid.UUID]]:
        """Every variable's (name, guid), sorted; files not named like variables are skipped."""
        try:
            entries = os.listdir(self.path)
        except OSError as e:
            raise MachineError(f"cannot list UEFI variables in {self.path}: {e.strerror}") from None
        found: List[Tuple[str, uuid.UUID]] = []
        for entry in entries:
            match = _FILE_NAME.match(entry)
            if match:
                found.append((match.group("name"), uuid.UUID(match.group("guid"))))
        return sorted(found, key=lambda item: (item[0], str(item[1])))

    def get(self, name: str, guid: uuid.UUID) -> Optional[EfiVariable]:
        """The variable, or None when it does not exist."""
        path = self._file(name, guid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise MachineError(f"cannot open UEFI variable {path}: {e.strerror}") from None
        try:
            raw = self._read_all(fd, path)
        finally:
            os.close(fd)
        if len(raw) < _ATTRIBUTES.size:
            raise FormatError(f"variable file has {len(raw)} bytes, fewer than the 4-byte "
                              "attribute prefix", source=path, offset=0, field="Attributes")
        (attributes,) = _ATTRIBUTES.unpack_from(raw, 0)
        return EfiVariable(name, guid, attributes, raw[_ATTRIBUTES.size:])

    @staticmethod
    def _read_all(fd: int, path: str) -> bytes:
        chunks: List[bytes] = []
        total = 0
        while True:
            try:
                chunk = os.read(fd, 65536)
            except FileNotFoundError:
                # efivarfs: a file that exists but whose variable the firmware no longer has.
                return b""
            except OSError as e:
                raise MachineError(f"cannot read UEFI variable {path}: {e.strerror}") from None
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > MAX_VARIABLE_FILE_SIZE:
                raise FormatError(f"variable file is larger than {MAX_VARIABLE_FILE_SIZE} bytes",
                                  source=path, offset=MAX_VARIABLE_FILE_SIZE)
            chunks.append(chunk)

    def set(self, name: str, guid: uuid.UUID, data: bytes, attributes: int = NV_BS_RT) -> None:
        """Create or replace a variable with one SetVariable, then read it back.

        On failure the variable is as it was: a file created for a new variable is removed."""
        if attributes & EFI_VARIABLE_APPEND_WRITE:
            raise ValueError("append writes are not supported: they cannot be verified")
        path = self._file(name, guid)
        payload = _ATTRIBUTES.pack(attributes) + bytes(data)
        created = False
        restore: Optional[Tuple[int, int]] = None
        read_fd = -1
        write_fd = -1
        try:
            try:
                read_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                read_fd = -1
            except OSError as e:
                raise self._write_error("open", path, e) from None
            if read_fd >= 0:
                restore = self._make_mutable(read_fd, path)
                flags = os.O_WRONLY | os.O_CLOEXEC
            else:
                # O_EXCL: a variable created by someone else in between is not silently replaced.
                flags = os.O_WRONLY | os.O_CLOEXEC | os.O_CREAT | os.O_EXCL
            try:
                write_fd = os.open(path, flags, 0o644)
            except OSError as e:
                raise self._write_error("open", path, e) from None
            created = read_fd < 0
            if created:
                # The kernel creates variables outside its allow-list immutable at once.
                restore = self._make_mutable(write_fd, path)
            try:
                written = os.write(write_fd, payload)
            except OSError as e:
                raise self._write_error("write", path, e) from None
            if written != len(payload):
                raise MachineError(f"cannot write UEFI variable {path}: short write of {written} "
                                   f"of {len(payload)} bytes")
            # A plain-directory copy keeps stale trailing bytes after a shorter value; efivarfs
            # itself sets the file size on every successful write, so this never fires there.
            if os.fstat(write_fd).st_size > len(payload):
                os.ftruncate(write_fd, len(payload))
            created = False
        finally:
            if created:
                self._remove_quietly(path)
            if restore is not None:
                self._set_flags(*restore, path=path)
            for fd in (write_fd, read_fd):
                if fd >= 0:
                    os.close(fd)
        stored = self.get(name, guid)
        if stored is None or stored.attributes != attributes or stored.data != bytes(data):
            raise MachineError(f"UEFI variable {path} does not read back as written")

    def delete(self, name: str, guid: uuid.UUID) -> bool:
        """Delete a variable; False when it did not exist."""
        path = self._file(name, guid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise self._write_error("open", path, e) from None
        restore: Optional[Tuple[int, int]] = None
        try:
            restore = self._make_mutable(fd, path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
            except OSError as e:
                raise self._write_error("delete", path, e) from None
            restore = None  # the file is gone: nothing to restore
            return True
        finally:
            if restore is not None:
                self._set_flags(*restore, path=path)
            os.close(fd)

    def _make_mutable(self, fd: int, path: str) -> Optional[Tuple[int, int]]:
        """Clear the immutable flag; returns (fd, original flags) to restore, or None."""
        try:
            raw = fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(_FLAGS.size))
        except OSError as e:
            if e.errno in _NO_FLAGS_ERRNOS:
                return None
            raise self._write_error("read the flags of", path, e) from None
        (flags,) = _FLAGS.unpack(raw[:_FLAGS.size])
        if not flags & FS_IMMUTABLE_FL:
            return None
        self._set_flags(fd, flags & ~FS_IMMUTABLE_FL, path=path)
        return fd, flags

    def _set_flags(self, fd: int, flags: int, path: str) -> None:
        try:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, _FLAGS.pack(flags))
        except OSError as e:
            raise self._write_error("change the immutable flag of", path, e) from None

    @staticmethod
    def _remove_quietly(path: str) -> None:
        # efivarfs refuses to unlink a file whose variable the firmware never stored; that
        # file disappears with the next mount and reads as absent, so the error is harmless.
        try:
            os.unlink(path)
        except OSError:
            pass

    @staticmethod
    def _write_error(action: str, path: str, error: OSError) -> MachineError:
        reason = _WRITE_ERRNO_TEXT.get(error.errno or 0, error.strerror or str(error))
        return MachineError(f"cannot {action} UEFI variable {path}: {reason}")
