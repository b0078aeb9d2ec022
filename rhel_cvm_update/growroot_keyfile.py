"""cloud-init's growpart key file, ``/cc_growpart_keydata``: read it, check it, retire it.

The file is JSON ``{"key": base64, "slot": N}``; the decoded key opens keyslot N (cloud-init
passes it to ``cryptsetup --key-file -``).  It is parsed without the key ever becoming an
immutable ``bytes``/``str``: the key's text is located in the file's bytearray, the rest is
validated as JSON with the key blanked out, and the key is decoded into a ``Secret``.

Retiring it: the keyslot is killed (never the last keyslot, never one a token names), then
the file is overwritten with zeros, fsynced, unlinked and its directory fsynced.
"""

import dataclasses
import json
import os
import re
import stat
from typing import Optional

from rhel_cvm_update.errors import FormatError, MachineError, UnsupportedError
from rhel_cvm_update.secrets import Secret, wipe
from rhel_cvm_update.trust import check_trusted_stat

MAX_KEYFILE_BYTES = 4096
_KEY_RE = re.compile(rb'"key"\s*:\s*"([A-Za-z0-9+/=]*)"')


@dataclasses.dataclass
class KeyFile:
    path: str
    slot: int
    key: Secret

    def wipe(self) -> None:
        self.key.wipe()


def read_keyfile(path: str) -> Optional[KeyFile]:
    """The key file, or None when there is none.  A file another user could have written, or
    one that is not ``{"key": base64, "slot": N}``, is a FormatError naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MachineError(f"cannot open {path}: {e.strerror}") from None
    raw = bytearray(MAX_KEYFILE_BYTES + 1)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError("not a regular file", source=path)
        check_trusted_stat(st, path, "key file")
        length = os.readv(fd, [raw])
    finally:
        os.close(fd)
    try:
        if length > MAX_KEYFILE_BYTES:
            raise FormatError(f"longer than {MAX_KEYFILE_BYTES} bytes", source=path)
        del raw[length:]
        match = _KEY_RE.search(raw)
        if match is None:
            raise FormatError('no "key": "<base64>" member', source=path, field="key")
        start, end = match.span(1)
        blanked = bytearray(raw)
        blanked[start:end] = b"A" * (end - start)
        try:
            obj = json.loads(bytes(blanked).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise FormatError(f"not JSON: {e}", source=path) from None
        finally:
            wipe(blanked)
        if not isinstance(obj, dict) or sorted(obj) != ["key", "slot"]:
            raise FormatError('expected exactly {"key": base64, "slot": N}', source=path)
        slot = obj["slot"]
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < 32:
            raise FormatError(f"slot {slot!r} is not a LUKS2 keyslot number (0-31)", source=path, field="slot")
        text = raw[start:end]
        try:
            key = Secret.from_base64(text)
        except ValueError:
            raise FormatError("the key is not base64", source=path, offset=start, field="key") from None
        finally:
            wipe(text)
    finally:
        wipe(raw)
    if len(key) == 0:
        key.wipe()
        raise FormatError("the key is empty", source=path, field="key")
    return KeyFile(path, slot, key)


def check_keyfile(luks, keyfile: KeyFile, meta) -> bool:
    """True when the key opens its keyslot; False when that keyslot is gone already (a
    retirement interrupted after the kill: only the file is left).  A key that does not open
    an existing keyslot is refused: the file is not what it claims, nothing is touched."""
    if keyfile.slot not in meta.keyslots:
        return False
    if not luks.test_key(keyfile.key, keyfile.slot):
        raise UnsupportedError(f"{keyfile.path}: its key does not open keyslot {keyfile.slot} of {luks.device}; "
                               "neither the file nor the keyslot is touched: check them by hand")
    return True


def kill_keyfile_slot(luks, keyfile: KeyFile, meta) -> None:
    """Kill the key file's keyslot, unless a token names it or it is the only one left."""
    owners = [t for t, token in meta.tokens.items() if str(keyfile.slot) in token.get("keyslots", [])]
    if owners:
        raise UnsupportedError(f"{luks.device}: keyslot {keyfile.slot} of {keyfile.path} is also used by token "
                               f"{owners[0]}; not killing it")
    if len(meta.keyslots) < 2:
        raise UnsupportedError(f"{luks.device}: keyslot {keyfile.slot} of {keyfile.path} is the only keyslot; "
                               "not killing it")
    luks.kill_keyslot(keyfile.slot)


def remove_keyfile(path: str) -> None:
    """Overwrite with zeros, fsync, unlink, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            os.pwrite(fd, bytes(size), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(path)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise MachineError(f"cannot remove {path}: {e.strerror}") from None
