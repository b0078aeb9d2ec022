"""A file as a read-only memory mapping: the PE parsers and Authenticode read a 100 MiB UKI
through it without copying it into memory.  Kept apart from measure.py so that ``inspect``
and ``status`` do not import the boot-event and certificate code to open a file."""

import contextlib
import mmap
import os
from typing import Iterator, Tuple

from rhel_cvm_update.errors import FormatError


FileIdentity = Tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns


@contextlib.contextmanager
def mapped_file_with_identity(path: str) -> Iterator[Tuple[mmap.mmap, FileIdentity]]:
    """The mapping and the identity of the file mapped (from fstat of the same open file, so
    a file renamed over ``path`` meanwhile cannot lend its identity to the other's bytes)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            try:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # mmap refuses empty files
                raise FormatError("empty file", source=path, offset=0) from None
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror}", source=path) from None
    try:
        yield mapping, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    finally:
        try:
            mapping.close()
        except BufferError:
            # A traceback still holds views of the mapping; it is unmapped when they go.
            pass


@contextlib.contextmanager
def mapped_file(path: str) -> Iterator[mmap.mmap]:
    with mapped_file_with_identity(path) as (mapping, _):
        yield mapping
