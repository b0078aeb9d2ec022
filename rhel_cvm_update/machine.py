"""The machine one transaction changes: its adapters, opened for it, and the fault-injection
hook the crash tests use.

Test hook: ``RHEL_CVM_UPDATE_CRASH_AT=<step>:<before|inside|after>`` makes the process
SIGKILL itself at that point; ``inside`` is after the first write of the step (every write
method of the LUKS and efivarfs adapters a step uses is wrapped by ``CrashAfterWrites``).
"""

import os
import signal
from typing import Any, Optional, Tuple

CRASH_ENV = "RHEL_CVM_UPDATE_CRASH_AT"


def crash_point(step: str, where: str) -> None:
    """Test hook: SIGKILL this process at ``step:where`` when RHEL_CVM_UPDATE_CRASH_AT says so."""
    if os.environ.get(CRASH_ENV) == f"{step}:{where}":
        os.kill(os.getpid(), signal.SIGKILL)


class CrashAfterWrites:
    """Passes every call through to ``target``; after each call of a writing method, the
    ``<step>:inside`` crash point."""

    def __init__(self, target: Any, step: str, writers: Tuple[str, ...]):
        self._target, self._step, self._writers = target, step, writers

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if name not in self._writers:
            return attribute

        def write(*args, **kwargs):
            result = attribute(*args, **kwargs)
            crash_point(self._step, "inside")
            return result
        return write


class Machine:
    """The adapters one transaction uses, opened lazily."""

    def __init__(self, config, tpm):
        from rhel_cvm_update.adapters.cryptsetup import Cryptsetup, resolve_device
        from rhel_cvm_update.adapters.efivarfs import EfiVarFs
        from rhel_cvm_update.adapters.esp import Esp
        from rhel_cvm_update.measure import DigestCache

        self.config = config
        self.tpm = tpm
        self.luks = Cryptsetup(resolve_device(config.luks_device))
        self.efivarfs = EfiVarFs(config.efivars)
        self.esp = Esp(config.esp)
        self._partition = None
        self.banks: Tuple[str, ...] = ("sha256",)  # detect sets the live ones
        self.digest_cache = DigestCache()

    def boot_manager(self, step: Optional[str] = None, need_partition: bool = False):
        from rhel_cvm_update.adapters.esp import locate_esp
        from rhel_cvm_update.bootmgr import BootManager

        if need_partition and self._partition is None:
            self._partition = locate_esp(self.config.esp_device, self.config.esp)
        efivarfs = self.efivarfs if step is None else CrashAfterWrites(self.efivarfs, step, ("set", "delete"))
        return BootManager(efivarfs, self.esp, self.config.vendor, self.config.uki_dir, self._partition)

    def luks_for(self, step: str):
        return CrashAfterWrites(self.luks, step, ("add_keyslot", "import_token", "remove_token", "kill_keyslot"))

    def digest(self, path: str, all_banks: bool = True) -> str:
        """The sha256 PCR4 digest of a PE file.  With ``all_banks`` computed for every live
        bank (``banks``, set by detect) and kept, with a UKI's kernel digests, for the
        prediction that follows; else for sha256 only."""
        from rhel_cvm_update.measure import image_digests

        return image_digests(path, self.banks if all_banks else ("sha256",), self.digest_cache)[0]["sha256"].hex()


def file_signature_digest(path: str) -> str:
    """The signature digest of a PE file (formats.authenticode.signature_digest)."""
    from rhel_cvm_update.formats.authenticode import signature_digest
    from rhel_cvm_update.mapped import mapped_file

    with mapped_file(path) as buf:
        return signature_digest(buf, path)
