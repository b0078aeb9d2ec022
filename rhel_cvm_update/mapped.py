"""A file as a read-only memory mapping: the PE parsers and Authenticode read a 100 MiB UKI
through it without copying it into memory.  Kept apart from measure.py so that ``inspect``
and ``status`` do not import the boot-event and certificate code to open a file."""

import contextlib
import mmap
import os
from typing import Iterator, Tuple

from rhel_cvm_update.errors import FormatError


FileIdentity = Tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns


class MappedFile(mmap.mmap):
    """A read-only mapping that keeps its file open (``fd``): the parsers read the mapping,
    while hashing reads the file with pread into one reused buffer, which is faster than
    faulting in every page of a 100 MiB mapping (formats/authenticode.py)."""

    fd: int


@contextlib.contextmanager
def mapped_file_with_identity(path: str) -> Iterator[Tuple[MappedFile, FileIdentity]]:
    """The mapping and the identity of the file mapped (from fstat of the same open file, so
    a file renamed over ``path`` meanwhile cannot lend its identity to the other's bytes)."""
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror}", source=path) from None
    try:
        try:
            st = os.fstat(f.fileno())
            mapping = MappedFile(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # mmap refuses empty files
            raise FormatError("empty file", source=path, offset=0) from None
        except OSError as e:
            raise FormatError(f"cannot read: {e.strerror}", source=path) from None
        mapping.fd = f.fileno()
        try:
            yield mapping, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        finally:
            try:
                mapping.close()
            except BufferError:
                # A traceback still holds views of the mapping; it is unmapped when they go.
                pass
    finally:
        f.close()


@contextlib.contextmanager
def mapped_file(path: str) -> Iterator[MappedFile]:
    with mapped_file_with_identity(path) as (mapping, _):
        yield mapping
