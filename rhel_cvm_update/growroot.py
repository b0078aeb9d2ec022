"""grow-root: grow the LUKS2 root into the free space of its enlarged disk, with the key from
the vTPM, and retire cloud-init's cleartext key file.

The steps, each idempotent (it looks at the disk first and does nothing when its part is done):

1. locate: the root partition (``luks_device``, ``auto`` as everywhere), its disk, its open
   dm-crypt mapping and the filesystem mounted from it; the header must be LUKS2;
2. plan: both GPTs read and checked, the move of the backup table to the end of the disk and
   the growth of the root partition planned (formats/gpt.py); the key for the resize chosen
   *before* anything is written: the systemd-tpm2 token sealed to the booted chain, unsealed
   here, else ``/cc_growpart_keydata`` (only when it opens its keyslot); no key, no change;
3. partition: the planned table writes, each fsynced, in their crash-safe order;
4. kernel: ``partx --update`` of the root partition when the kernel's size differs;
5. mapping: ``cryptsetup resize`` with the key through a pipe;
6. filesystem: ``resize2fs`` (ext4) or ``xfs_growfs`` (XFS);
7. keyfile: kill the key file's keyslot, then overwrite, unlink and fsync the file away.

Journal: ``state_dir/grow-root.json`` (atomic writes, under the one state lock) names the step
under way; a rerun after a crash reads the partition table in recovery mode (a torn primary
is rebuilt from the new backup) and continues.  ``status`` reports an interrupted grow-root,
a leftover key file and a keyslot the journal says belonged to one.
"""

import contextlib
import os
from typing import Any, Callable, Dict, List, Optional

from rhel_cvm_update.errors import CvmUpdateError, MachineError, UnsupportedError
from rhel_cvm_update.journal import now, read_json, write_json_atomically

KEYFILE = "/cc_growpart_keydata"
STATE_FILE = "grow-root.json"
STEPS = ("partition", "kernel", "mapping", "filesystem", "keyfile")
MIN_FS_GROWTH_BYTES = 1 << 20


class GrowMachine:
    """The adapters grow-root uses; tests give a fake one."""

    def __init__(self, config):
        from rhel_cvm_update.adapters.cryptsetup import Cryptsetup, resolve_device

        self.config = config
        self.luks = Cryptsetup(resolve_device(config.luks_device))

    def layout(self):
        from rhel_cvm_update.adapters import blockdev

        return blockdev.locate_root(self.luks.device)

    def open_disk(self, path: str):
        from rhel_cvm_update.adapters.blockdev import Disk

        return Disk(path)

    def partition_sectors(self, layout) -> int:
        from rhel_cvm_update.adapters import blockdev

        return blockdev.partition_sectors(layout.partition)

    def tell_kernel(self, layout) -> None:
        from rhel_cvm_update.adapters import blockdev

        blockdev.tell_kernel(layout)

    def mapping_sectors(self, layout):
        return self.luks.mapping_sectors(layout.mapping)

    def resize_mapping(self, layout, key) -> None:
        self.luks.resize(layout.mapping, key)

    def device_bytes(self, layout) -> int:
        from rhel_cvm_update.adapters import blockdev

        return blockdev.device_bytes(layout.mapping_device)

    def filesystem_bytes(self, layout) -> int:
        from rhel_cvm_update.adapters import blockdev

        return blockdev.filesystem_bytes(layout.fs_type, layout.mapping_device, layout.mount_point)

    def grow_filesystem(self, layout) -> None:
        from rhel_cvm_update.adapters import blockdev

        blockdev.grow_filesystem(layout.fs_type, layout.mapping_device, layout.mount_point)

    def tpm(self):
        from rhel_cvm_update.adapters.tpm import Tpm

        return Tpm(self.config.tpm)


class GrowState:
    """``state_dir/grow-root.json``."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, STATE_FILE)
        data = read_json(self.path) or {}
        self.pending: Optional[str] = data.get("pending") if isinstance(data.get("pending"), str) else None
        self.fs_grown_at: Optional[int] = data.get("fs_grown_at") if isinstance(data.get("fs_grown_at"), int) else None
        slot = data.get("keyfile_slot")
        self.keyfile_slot: Optional[int] = slot if isinstance(slot, int) and not isinstance(slot, bool) else None
        self.device: Optional[str] = data.get("device") if isinstance(data.get("device"), str) else None

    def save(self) -> None:
        from rhel_cvm_update.trust import ensure_trusted_dir

        ensure_trusted_dir(os.path.dirname(self.path), "state directory")
        write_json_atomically(self.path, {"version": 1, "pending": self.pending, "fs_grown_at": self.fs_grown_at,
                                          "keyfile_slot": self.keyfile_slot, "device": self.device,
                                          "updated": now()})


def crash_point(step: str, where: str) -> None:
    from rhel_cvm_update.machine import crash_point as hook

    hook(f"grow-{step}", where)


def _resize_key(stack: contextlib.ExitStack, machine, meta, keyfile, dry_run: bool):
    """(passphrase Secret or None in a dry run, where it comes from).  The TPM first: a
    systemd-tpm2 token sealed to the live PCRs; else the key file, already checked."""
    from rhel_cvm_update.reseal import find_unlock_token

    tokens = meta.systemd_tpm2_tokens()
    tpm = stack.enter_context(machine.tpm())
    token_id = find_unlock_token(tpm, tokens)
    if token_id is not None:
        if dry_run:
            return None, f"token {token_id}"
        unsealed = stack.enter_context(tpm.unseal(tokens[token_id], token_id))
        passphrase = stack.enter_context(unsealed.base64())
        if not machine.luks.test_key(passphrase, tokens[token_id].keyslot):
            raise MachineError(f"{machine.luks.device}: the secret of token {token_id} does not open keyslot "
                               f"{tokens[token_id].keyslot}; nothing was changed")
        return passphrase, f"token {token_id}"
    if keyfile is not None:
        return (None if dry_run else keyfile.key), f"key file {keyfile.path} (keyslot {keyfile.slot})"
    raise MachineError(f"{machine.luks.device}: no systemd-tpm2 token is sealed to the booted chain's PCRs "
                       f"(tokens: {sorted(tokens) or 'none'}) and there is no usable key file: nothing can "
                       "authorise 'cryptsetup resize'; nothing was changed")


def grow_root(config, machine, *, dry_run: bool = False, probe: bool = False,
              keyfile_path: str = KEYFILE) -> Dict[str, Any]:
    """See the module docstring.  ``probe``: plan only, without the TPM (the unit's
    ExecCondition); the result's ``outcome`` says whether there is work."""
    from rhel_cvm_update.formats.gpt import plan_grow, read_disk_gpt
    from rhel_cvm_update.growroot_keyfile import check_keyfile, read_keyfile

    luks = machine.luks
    luks.check_header()     # a root that is not LUKS2: FormatError, before anything else
    layout = machine.layout()
    if layout.mapping is None:
        raise UnsupportedError(f"{layout.partition} is not open as a dm-crypt mapping: grow-root grows the "
                               "running root")
    state = GrowState(config.state_dir)
    steps: List[Dict[str, Any]] = []
    result: Dict[str, Any] = {"device": layout.partition, "disk": layout.disk, "partition": layout.number,
                              "mapping": layout.mapping, "filesystem": layout.fs_type,
                              "mount_point": layout.mount_point, "dry_run": dry_run or probe, "steps": steps}
    if state.pending:
        result["resumed"] = state.pending
    with machine.open_disk(layout.disk) as disk, contextlib.ExitStack() as stack:
        sector_size = disk.sector_size()
        table = read_disk_gpt(disk.read, disk.size(), sector_size, layout.disk, recover=state.pending == "partition")
        part = table.partition(layout.number)
        if part.first_lba * sector_size // 512 != layout.start_sectors:
            raise MachineError(f"{layout.disk}: partition {layout.number} starts at LBA {part.first_lba} in the GPT "
                               f"but at sector {layout.start_sectors} for the kernel")
        plan = plan_grow(table, layout.number, disk.read(0, 512))
        result["plan"] = plan.to_json()
        target = (plan.new_last_lba - part.first_lba + 1) * sector_size // 512
        offset, mapped = machine.mapping_sectors(layout)
        need_kernel = machine.partition_sectors(layout) != target
        need_mapping = mapped < target - offset
        keyfile = stack.enter_context(_wiping(read_keyfile(keyfile_path)))
        meta = luks.metadata()
        keyfile_live = check_keyfile(luks, keyfile, meta) if keyfile is not None else False
        if probe:
            work = plan.changed or need_kernel or need_mapping or keyfile is not None or \
                _fs_behind(machine, layout, state, mapped, target - offset)
            result["outcome"] = "would-change" if work else "nothing-to-do"
            return result
        key = None
        if need_mapping:
            key, result["key"] = _resize_key(stack, machine, meta, keyfile if keyfile_live else None, dry_run)

        def step(name: str, needed: bool, detail: str, action: Callable[[], None]) -> None:
            if not needed:
                steps.append({"step": name, "action": "nothing-to-do", "detail": detail})
                return
            if dry_run:
                steps.append({"step": name, "action": "would-do", "detail": detail})
                return
            crash_point(name, "before")
            state.pending, state.device = name, layout.partition
            state.save()
            action()
            crash_point(name, "after")
            steps.append({"step": name, "action": "done", "detail": detail})

        def write_table() -> None:
            for write in plan.writes:
                disk.write(write.offset, write.data)
                crash_point("partition", "inside")

        step("partition", plan.changed, plan.reason if not plan.changed else
             f"{', '.join(w.what for w in plan.writes)}; partition {layout.number} ends at LBA {plan.new_last_lba}",
             write_table)
        step("kernel", need_kernel, f"{layout.partition}: {target} sectors", lambda: _tell_kernel(machine, layout, target))
        step("mapping", need_mapping, f"{layout.mapping}: {target - offset} sectors",
             lambda: _resize_mapping(machine, layout, key, target - offset))
        fs_needed = need_mapping or _fs_behind(machine, layout, state, mapped, target - offset)
        step("filesystem", fs_needed, f"{layout.fs_type} on {layout.mapping_device}",
             lambda: _grow_filesystem(machine, layout, state))
        step("keyfile", keyfile is not None, f"{keyfile_path}" + (f" and keyslot {keyfile.slot}" if keyfile_live else
                                                                    " (its keyslot is gone already)"),
             lambda: _retire_keyfile(luks, keyfile, keyfile_live, state))
    if not dry_run:
        state.pending = None
        state.save()
    acted = [s for s in steps if s["action"] != "nothing-to-do"]
    result["outcome"] = ("nothing-to-do" if not acted else "would-change" if dry_run
                         else "grown" if any(s["step"] != "keyfile" for s in acted) else "retired-keyfile")
    return result


@contextlib.contextmanager
def _wiping(keyfile):
    try:
        yield keyfile
    finally:
        if keyfile is not None:
            keyfile.wipe()


def _fs_behind(machine, layout, state: GrowState, mapped: int, target: int) -> bool:
    """The filesystem is smaller than its device by more than a megabyte and was not grown at
    this device size already (resize2fs may stop short of the last partial block group)."""
    device = max(mapped, target) * 512
    if state.fs_grown_at == device:
        return False
    return device - machine.filesystem_bytes(layout) >= MIN_FS_GROWTH_BYTES


def _tell_kernel(machine, layout, target: int) -> None:
    machine.tell_kernel(layout)
    now_sectors = machine.partition_sectors(layout)
    if now_sectors != target:
        raise MachineError(f"{layout.partition}: the kernel still has {now_sectors} sectors, the table {target}")


def _resize_mapping(machine, layout, key, target: int) -> None:
    machine.resize_mapping(layout, key)
    _, size = machine.mapping_sectors(layout)
    if size != target:
        raise MachineError(f"{layout.mapping}: {size} sectors after cryptsetup resize, expected {target}")


def _grow_filesystem(machine, layout, state: GrowState) -> None:
    machine.grow_filesystem(layout)
    state.fs_grown_at = machine.device_bytes(layout)
    state.save()


def _retire_keyfile(luks, keyfile, live: bool, state: GrowState) -> None:
    from rhel_cvm_update.growroot_keyfile import kill_keyfile_slot, remove_keyfile

    if live:
        state.keyfile_slot = keyfile.slot
        state.save()
        kill_keyfile_slot(luks, keyfile, luks.metadata())
        crash_point("keyfile", "inside")
    remove_keyfile(keyfile.path)
    state.keyfile_slot = None
    state.save()


def run_grow_root(config, *, dry_run: bool = False, probe: bool = False) -> Dict[str, Any]:
    """``grow-root`` as the CLI runs it: under the state lock (a dry run or probe takes none),
    its result recorded in ``last-grow-root.json``."""
    from rhel_cvm_update.journal import writing_command

    machine = GrowMachine(config)
    with writing_command(config.state_dir, "grow-root", dry_run=dry_run or probe) as record:
        result = grow_root(config, machine, dry_run=dry_run, probe=probe)
        record(result)
    return result


def attention(config, keyslots, keyfile_path: str = KEYFILE) -> List[str]:
    """What ``status`` says about grow-root (light: no secrets module, no adapters)."""
    found: List[str] = []
    if os.path.lexists(keyfile_path):
        found.append(f"{keyfile_path} (cloud-init's cleartext disk key) is still there; run "
                     "'rhel-cvm-update grow-root' to retire it and its keyslot")
    try:
        state = GrowState(config.state_dir)
    except CvmUpdateError as e:  # a damaged or untrusted file is reported, not fatal for status
        return found + [f"{os.path.join(config.state_dir, STATE_FILE)}: {e}"]
    if state.pending:
        found.append(f"an interrupted grow-root (at {state.pending}); run 'rhel-cvm-update grow-root' to finish it")
    if state.keyfile_slot is not None and keyslots is not None and state.keyfile_slot in keyslots:
        found.append(f"keyslot {state.keyfile_slot} (of cloud-init's key file) still exists; run "
                     "'rhel-cvm-update grow-root' or kill it with cryptsetup luksKillSlot")
    return found
