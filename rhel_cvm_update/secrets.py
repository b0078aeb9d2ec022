"""Key material held in mutable buffers that are overwritten after use.

Python copies immutable ``bytes`` freely, so secrets live in a ``bytearray`` owned by a
``Secret`` and are zeroed when its ``with`` block ends.  While any secret is alive the
process is made non-dumpable (prctl PR_SET_DUMPABLE 0): no core dump and no ptrace
attach by other unprivileged processes can read it.  The LUKS passphrase derived from a
sealed secret (standard base64, as systemd computes it) is built in a bytearray too,
without going through ``base64.b64encode``.
"""

import ctypes
import ctypes.util
import os
from typing import Optional

from rhel_cvm_update.errors import ConfigError

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_live_secrets = 0
_dumpable_before: Optional[int] = None


def _hold() -> None:
    global _live_secrets, _dumpable_before
    if _live_secrets == 0:
        _dumpable_before = _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    _live_secrets += 1


def _release() -> None:
    global _live_secrets
    _live_secrets -= 1
    if _live_secrets == 0 and _dumpable_before and _dumpable_before > 0:
        _libc.prctl(PR_SET_DUMPABLE, _dumpable_before, 0, 0, 0)


def is_dumpable() -> bool:
    return _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1


def wipe(buf: bytearray) -> None:
    for i in range(len(buf)):
        buf[i] = 0


class Secret:
    """A bytearray that is zeroed at the end of its ``with`` block (or by ``wipe()``)."""

    def __init__(self, data: bytearray):
        if not isinstance(data, bytearray):
            raise TypeError("a Secret takes ownership of a bytearray")
        self._data = data
        self._held = False
        _hold()
        self._held = True

    @classmethod
    def random(cls, size: int = 32) -> "Secret":
        buf = bytearray(size)
        # os.urandom returns immutable bytes; readinto from the kernel avoids that copy.
        with open("/dev/urandom", "rb", buffering=0) as f:
            got = f.readinto(buf)
        if got != size:
            raise OSError(f"short read from /dev/urandom: {got} of {size} bytes")
        return cls(buf)

    @classmethod
    def read_from_fd(cls, fd: int, limit: int = 8192) -> "Secret":
        """Read a key file from a pipe or file descriptor to EOF (like cryptsetup's
        --key-file=-: no newline handling, every byte counts)."""
        buf = bytearray(limit + 1)
        view = memoryview(buf)
        length = 0
        while length <= limit:
            n = os.readv(fd, [view[length:]])
            if n == 0:
                break
            length += n
        view.release()
        if length > limit:
            wipe(buf)
            raise ConfigError(f"key file longer than {limit} bytes")
        secret = cls(buf[:length])
        wipe(buf)
        return secret

    @property
    def data(self) -> bytearray:
        if self._data is None:
            raise ValueError("secret already wiped")
        return self._data

    def __len__(self) -> int:
        return len(self.data)

    def base64(self) -> "Secret":
        """Standard base64 with padding and no newline: systemd's LUKS passphrase for a
        sealed secret (reference 4.2)."""
        src = self.data
        out = bytearray(4 * ((len(src) + 2) // 3))
        o = 0
        for i in range(0, len(src), 3):
            chunk = src[i:i + 3]
            n = (chunk[0] << 16) | ((chunk[1] if len(chunk) > 1 else 0) << 8) | (chunk[2] if len(chunk) > 2 else 0)
            out[o] = _B64_ALPHABET[(n >> 18) & 63]
            out[o + 1] = _B64_ALPHABET[(n >> 12) & 63]
            out[o + 2] = _B64_ALPHABET[(n >> 6) & 63] if len(chunk) > 1 else ord("=")
            out[o + 3] = _B64_ALPHABET[n & 63] if len(chunk) > 2 else ord("=")
            o += 4
            wipe(chunk)
        return Secret(out)

    @classmethod
    def from_base64(cls, text: bytearray) -> "Secret":
        """Decode standard base64 (padding optional, no whitespace) from a bytearray without
        an immutable copy (``base64.b64decode`` returns bytes).  ValueError if it is not."""
        values = bytearray(len(text))
        n = 0
        try:
            for ch in text:
                if ch == ord("="):
                    break
                index = _B64_ALPHABET.find(bytes((ch,)))
                if index < 0:
                    raise ValueError("not base64")
                values[n] = index
                n += 1
            if any(ch != ord("=") for ch in text[n:]) or n % 4 == 1 or len(text) - n > 2:
                raise ValueError("not base64")
            out = bytearray(n * 3 // 4)
            o = 0
            for i in range(0, n, 4):
                group = values[i:min(i + 4, n)]
                acc = 0
                for v in group:
                    acc = (acc << 6) | v
                acc <<= 6 * (4 - len(group))
                for k in range(len(group) - 1):
                    out[o] = (acc >> (16 - 8 * k)) & 0xFF
                    o += 1
                wipe(group)
                acc = 0
            return cls(out)
        finally:
            wipe(values)

    def wipe(self) -> None:
        if self._data is not None:
            wipe(self._data)
            self._data = None
        if self._held:
            self._held = False
            _release()

    def __enter__(self) -> "Secret":
        return self

    def __exit__(self, *exc_info) -> None:
        self.wipe()

    def __del__(self) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return "<Secret wiped>" if self._data is None else f"<Secret {len(self._data)} bytes>"
