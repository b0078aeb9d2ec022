"""Which files the tool may believe: only those no unprivileged user could have written.

The tool runs as root and seals the disk key to what it reads.  A configuration, state file
or event log that another user can write would let that user choose the PCR values (or the
device, or the UKI) the key is sealed to.  So a trusted file must be owned by root, must not
be writable by group or others, and every directory above it must be the same (a writable
directory lets its owner swap the file) unless the directory is sticky (/tmp: others can
add files but not replace one they do not own).

Trusted owners are root and the effective UID of this process: in production both are 0; a
test suite running unprivileged trusts its own files (and root's, which could do anything
anyway) and still nobody else's.  There is no switch that could be left on in production.
"""

import os
import stat
from typing import Optional, Tuple

from rhel_cvm_update.errors import ConfigError, PredictionError

_GROUP_OR_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH


def trusted_owners() -> Tuple[int, ...]:
    return tuple(sorted({0, os.geteuid()}))


def _problem(st: os.stat_result, is_dir: bool) -> Optional[str]:
    if st.st_uid not in trusted_owners():
        return (f"is owned by uid {st.st_uid}, not by root or uid {os.geteuid()} "
                "(the user running this tool)")
    if st.st_mode & _GROUP_OR_OTHER_WRITE and not (is_dir and st.st_mode & stat.S_ISVTX):
        who = " and ".join(w for w, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if st.st_mode & bit)
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_directory_chain(directory: str, what: str, path: str) -> None:
    """Every directory from ``directory`` up to / must be trusted (``path`` names the file
    being checked, for the message)."""
    current = os.path.realpath(directory)
    while True:
        try:
            st = os.stat(current)
        except OSError as e:
            raise ConfigError(f"{what} {path}: cannot check {current}: {e.strerror}") from None
        problem = _problem(st, True)
        if problem:
            raise ConfigError(f"refusing to trust {what} {path}: directory {current} {problem}")
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def check_trusted_stat(st: os.stat_result, path: str, what: str) -> None:
    """``st`` is the fstat of an opened file: check it, then the directories above it."""
    problem = _problem(st, stat.S_ISDIR(st.st_mode))
    if problem:
        raise ConfigError(f"refusing to trust {what} {path}: it {problem}; it must be owned by root "
                          "and writable only by its owner")
    # The directory holding the name (whoever can write it can re-point a symlink) and the
    # one holding the file it resolves to.
    check_directory_chain(os.path.dirname(os.path.abspath(path)), what, path)
    if os.path.islink(path):
        check_directory_chain(os.path.dirname(os.path.realpath(path)), what, path)


def check_trusted_path(path: str, what: str) -> None:
    """For files read by other modules (event log, UKI): stat the path as it will be opened."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    check_trusted_stat(st, path, what)


def read_trusted_file(path: str, what: str, limit: int) -> bytes:
    """Open, check the opened file (no race between the check and the read), read at most
    ``limit`` bytes.  FileNotFoundError propagates so callers can apply their defaults."""
    with open(path, "rb") as f:
        check_trusted_stat(os.fstat(f.fileno()), path, what)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes")
    return data


def ensure_trusted_dir(path: str, what: str) -> None:
    """Create ``path`` (mode 0700) if needed, then require it and its parents to be trusted."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {what} {path}: {e.strerror}") from None
    check_directory_chain(path, what, path)


def require_live_checked(prediction) -> None:
    """A prediction may be sealed to only when its source reproduced the live PCRs read from
    the TPM just now; not one checked against nothing (--offline) or against a file."""
    if prediction.checked_against != "tpm":
        raise PredictionError(f"refusing to seal to a prediction checked against {prediction.checked_against!r}: "
                              "only one that reproduced the live TPM PCRs may be sealed to")
