"""A file as a read-only memory mapping: the PE parsers and Authenticode read a 100 MiB UKI
through it without copying it into memory.  Kept apart from measure.py so that ``inspect``
and ``status`` do not import the boot-event and certificate code to open a file."""

import contextlib
import mmap
from typing import Iterator

from rhel_cvm_update.errors import FormatError


@contextlib.contextmanager
def mapped_file(path: str) -> Iterator[mmap.mmap]:
    try:
        with open(path, "rb") as f:
            try:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # mmap refuses empty files
                raise FormatError("empty file", source=path, offset=0) from None
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror}", source=path) from None
    try:
        yield mapping
    finally:
        try:
            mapping.close()
        except BufferError:
            # A traceback still holds views of the mapping; it is unmapped when they go.
            pass
