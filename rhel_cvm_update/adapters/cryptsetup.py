"""A LUKS2 header, through the cryptsetup CLI (2.6+; reference section 9).

Secrets reach cryptsetup only through pipes: the existing passphrase on stdin
(``--key-file=-``, read to EOF, no newline handling) and the new one on an inherited
pipe (``--new-keyfile=/dev/fd/N``).  A pipe's contents live in kernel memory only, never
in a file, argv or the environment.  Works on block devices and on plain image files.
"""

import json
import os
import subprocess
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple

from rhel_cvm_update.adapters.process import run_tool
from rhel_cvm_update.errors import MachineError
from rhel_cvm_update.formats.luks2_header import BINARY_SIZE, check_luks2_magic, header_size, read_json_area
from rhel_cvm_update.formats.luks_token import LuksMetadata

if TYPE_CHECKING:  # only annotations here; importing secrets loads libc through ctypes
    from rhel_cvm_update.secrets import Secret

CRYPTSETUP = "cryptsetup"
# GPT partition type of the x86-64 root partition (Discoverable Partitions Specification).
ROOT_X86_64_GPT_TYPE = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
# Exit code of cryptsetup for "no key available with this passphrase" (cryptsetup(8)).
EXIT_WRONG_KEY = 2
# systemd's cryptsetup_set_minimal_pbkdf: the sealed secret is 256 random bits, so a
# slow KDF adds nothing but boot time and memory.
TPM_KEYSLOT_PBKDF = ("--pbkdf", "pbkdf2", "--hash", "sha512", "--pbkdf-force-iterations", "1000")


def _pipe_with(data: bytearray) -> int:
    """A pipe already holding ``data`` with its write end closed; returns the read end.
    Secrets are a few dozen bytes, far below the pipe buffer, so the write cannot block."""
    read_fd, write_fd = os.pipe()
    try:
        view = memoryview(data)
        written = 0
        while written < len(data):
            written += os.write(write_fd, view[written:])
        view.release()
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd


def find_root_partition() -> str:
    """The one partition whose GPT type is the x86-64 root (config ``luks_device: auto``)."""
    try:
        import pyudev
    except ImportError as e:
        raise MachineError(f"luks_device is 'auto' but pyudev is not installed: {e}") from None
    context = pyudev.Context()
    found = sorted(dev.device_node for dev in context.list_devices(subsystem="block", DEVTYPE="partition")
                   if (dev.properties.get("ID_PART_ENTRY_TYPE") or "").lower() == ROOT_X86_64_GPT_TYPE
                   and dev.device_node)
    if not found:
        raise MachineError(f"no partition of GPT type {ROOT_X86_64_GPT_TYPE} (x86-64 root); "
                           "set luks_device in the configuration")
    if len(found) > 1:
        raise MachineError(f"several x86-64 root partitions ({', '.join(found)}); "
                           "set luks_device in the configuration")
    return found[0]


def resolve_device(luks_device: str) -> str:
    return find_root_partition() if luks_device == "auto" else luks_device


class Cryptsetup:
    """One LUKS2 device or image file."""

    def __init__(self, device: str):
        self.device = device

    def _run(self, argv: Sequence[str], *, stdin: Optional[int] = None, input_bytes: Optional[bytes] = None,
             pass_fds: Sequence[int] = (), ok_codes: Sequence[int] = (0,)) -> subprocess.CompletedProcess:
        return run_tool([CRYPTSETUP, *argv], stdin=stdin, input_bytes=input_bytes, pass_fds=pass_fds,
                        ok_codes=ok_codes, timeout=300)

    def _read(self, size: int) -> bytes:
        try:
            with open(self.device, "rb") as f:
                return f.read(size)
        except OSError as e:
            raise MachineError(f"cannot read {self.device}: {e.strerror}") from None

    def check_header(self) -> None:
        """Refuse LUKS1 and non-LUKS devices before cryptsetup (or the TPM) is involved."""
        check_luks2_magic(self._read(8), source=self.device)

    def header_metadata(self) -> LuksMetadata:
        """The keyslots and tokens read from the header bytes, without starting cryptsetup
        (status's fast path; the transaction asks cryptsetup, which also repairs a header)."""
        size = header_size(self._read(BINARY_SIZE), source=self.device)
        data = read_json_area(self._read(2 * size), source=self.device)
        return LuksMetadata.from_json_bytes(data, source=self.device)

    def metadata(self) -> LuksMetadata:
        self.check_header()
        out = self._run(["luksDump", "--dump-json-metadata", self.device]).stdout
        return LuksMetadata.from_json_bytes(out, source=self.device)

    def add_keyslot(self, existing: "Secret", new: "Secret", slot: int) -> None:
        """luksAddKey with systemd's minimal PBKDF, unlocking with ``existing``."""
        existing_fd = _pipe_with(existing.data)
        try:
            new_fd = _pipe_with(new.data)
            try:
                self._run(["luksAddKey", "-q", *TPM_KEYSLOT_PBKDF, "--new-key-slot", str(slot),
                           "--key-file=-", f"--new-keyfile=/dev/fd/{new_fd}", self.device],
                          stdin=existing_fd, pass_fds=(new_fd,))
            finally:
                os.close(new_fd)
        finally:
            os.close(existing_fd)

    def test_key(self, key: "Secret", keyslot: Optional[int] = None) -> bool:
        """Does ``key`` open the volume (or that keyslot)?  Activates nothing."""
        key_fd = _pipe_with(key.data)
        try:
            argv = ["open", "--test-passphrase", "--key-file=-"]
            if keyslot is not None:
                argv += ["--key-slot", str(keyslot)]
            result = self._run([*argv, self.device], stdin=key_fd, ok_codes=(0, EXIT_WRONG_KEY))
        finally:
            os.close(key_fd)
        return result.returncode == 0

    def import_token(self, token: Mapping[str, Any], token_id: int) -> None:
        data = json.dumps(token, separators=(",", ":")).encode("utf-8")
        self._run(["token", "import", "--json-file", "-", "--token-id", str(token_id), self.device],
                  input_bytes=data)

    def export_token(self, token_id: int) -> Dict[str, Any]:
        out = self._run(["token", "export", "--token-id", str(token_id), self.device]).stdout
        try:
            token = json.loads(out.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurd nesting
            raise MachineError(f"{self.device}: token {token_id} exported as invalid JSON: {e}") from None
        if not isinstance(token, dict):
            raise MachineError(f"{self.device}: token {token_id} exported as {type(token).__name__}")
        return token

    def remove_token(self, token_id: int) -> None:
        self._run(["token", "remove", "--token-id", str(token_id), self.device])

    def resize(self, mapping: str, key: "Secret") -> None:
        """``cryptsetup resize`` of the open mapping to its grown device; LUKS2 with the volume
        key in the kernel keyring needs a passphrase for it, given on stdin."""
        key_fd = _pipe_with(key.data)
        try:
            self._run(["resize", "--key-file=-", mapping], stdin=key_fd)
        finally:
            os.close(key_fd)

    def mapping_sectors(self, mapping: str) -> Tuple[int, int]:
        """(data offset, size) of an open mapping in 512-byte sectors (``cryptsetup status``)."""
        out = self._run(["status", mapping]).stdout.decode("utf-8", "replace")
        values = {}
        for line in out.splitlines():
            key, _, value = line.strip().partition(":")
            if key in ("offset", "size") and value.strip().endswith("sectors"):
                values[key] = int(value.split()[0])
        if len(values) != 2:
            raise MachineError(f"cryptsetup status {mapping}: no offset and size in {out.strip()[:200]!r}")
        return values["offset"], values["size"]

    def kill_keyslot(self, slot: int) -> None:
        """Batch mode (-q) removes the slot without asking for another slot's passphrase."""
        self._run(["luksKillSlot", "-q", self.device, str(slot)])
