"""UEFI boot entries for UKIs started through shim.

An entry for a UKI is::

    Attributes  LOAD_OPTION_ACTIVE
    Description "RHEL CVM UKI <kernel version>"
    FilePath    HD(<ESP partition>)/File(\\EFI\\<vendor>\\shimx64.efi)
    OptionalData UCS-2 "\\EFI\\Linux\\<uki>.efi" + NUL   (shim's second stage, reference 6.3)

which is byte for byte what shim's fallback builds from the CSV line this module writes, so a
fallback-created entry and ours are the same entry.

Which entries are this tool's (the "managed" marker): all three of
  1. the description starts with DESCRIPTION_PREFIX;
  2. the file path is one HD node then File(\\EFI\\<vendor>\\shimx64.efi) then End;
  3. the optional data is a NUL-terminated UCS-2 path inside the configured uki_dir.
Anything else -- firmware entries, entries of other tools, entries whose bytes do not parse --
is never changed, reordered away or deleted; it may only move back one place in BootOrder
when one of ours is promoted in front of it.

Every change is planned first as a list of variable and file changes (what ``--dry-run``
prints), then applied in an order that never lets BootOrder or BootNext name a missing entry:
entries are created before the lists name them, and dropped from the lists before they are
deleted.  If a step fails, the steps already done are undone in reverse order.
"""

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple

from rhel_cvm_update.adapters.efivarfs import NV_BS_RT, EfiVarFs
from rhel_cvm_update.adapters.esp import Esp, EspPartition, UkiFile, locate_esp
from rhel_cvm_update.errors import ConfigError, CvmUpdateError, FormatError, TransactionError
from rhel_cvm_update.formats.bootcsv import BootCsvEntry, boot_csv_bytes
from rhel_cvm_update.formats.devpath import (END, END_ENTIRE, END_ENTIRE_NODE, FilePathNode,
                                             HardDriveNode, device_path_text)
from rhel_cvm_update.formats.efi import EFI_GLOBAL_VARIABLE
from rhel_cvm_update.formats.loadopt import (LOAD_OPTION_ACTIVE, LoadOption, boot_next_bytes,
                                             boot_number, boot_order_bytes, boot_variable_name,
                                             parse_boot_next, parse_boot_order, ucs2z_optional_data)

DESCRIPTION_PREFIX = "RHEL CVM UKI "
SHIM_FILE_NAME = "shimx64.efi"
CSV_COMMENT = "boot entry of rhel-cvm-update"


@dataclasses.dataclass(frozen=True)
class BootEntry:
    number: int
    attributes: int
    raw: bytes
    option: Optional[LoadOption]
    error: Optional[str]
    managed: bool

    @property
    def name(self) -> str:
        return boot_variable_name(self.number)

    @property
    def uki_path(self) -> Optional[str]:
        return self.option.optional_data_path() if self.managed and self.option else None


@dataclasses.dataclass(frozen=True)
class BootState:
    entries: Tuple[BootEntry, ...]
    boot_order: Tuple[int, ...]
    boot_next: Optional[int]
    boot_current: Optional[int]

    def entry(self, number: int) -> Optional[BootEntry]:
        return next((e for e in self.entries if e.number == number), None)


@dataclasses.dataclass(frozen=True)
class Change:
    """One variable or file to create, replace or delete (``new`` None)."""

    target: str  # a variable name, or a file path
    old: Optional[bytes]
    new: Optional[bytes]
    summary: str
    is_file: bool = False

    @property
    def action(self) -> str:
        if self.old is None:
            return "create"
        return "delete" if self.new is None else "replace"


def _hex_list(numbers: Sequence[int]) -> str:
    return ",".join(f"{n:04X}" for n in numbers) or "(empty)"


class BootManager:
    def __init__(self, efivars: EfiVarFs, esp: Esp, vendor: str, uki_dir: str,
                 partition: Optional[EspPartition] = None):
        self.efivars = efivars
        self.esp = esp
        self.vendor = vendor
        self.uki_dir = uki_dir
        self._partition = partition
        self.shim_efi_path = f"\\EFI\\{vendor}\\{SHIM_FILE_NAME}"
        self.uki_dir_efi_path = esp.efi_path(uki_dir)

    # --- reading --------------------------------------------------------------------------

    def state(self) -> BootState:
        entries = []
        for name, guid in self.efivars.list():
            number = boot_number(name)
            if guid != EFI_GLOBAL_VARIABLE or number is None:
                continue
            variable = self.efivars.get(name, guid)
            if variable is None:
                continue
            try:
                option: Optional[LoadOption] = LoadOption.from_bytes(variable.data, source=name)
                error = None
            except FormatError as e:
                option, error = None, str(e)
            entries.append(BootEntry(number, variable.attributes, variable.data, option, error,
                                     option is not None and self.is_managed(option)))
        entries.sort(key=lambda e: e.number)
        return BootState(tuple(entries), self._read_u16_list("BootOrder"),
                         self._read_u16("BootNext"), self._read_u16("BootCurrent"))

    def _read_u16_list(self, name: str) -> Tuple[int, ...]:
        variable = self.efivars.get(name, EFI_GLOBAL_VARIABLE)
        return parse_boot_order(variable.data, source=name) if variable else ()

    def _read_u16(self, name: str) -> Optional[int]:
        variable = self.efivars.get(name, EFI_GLOBAL_VARIABLE)
        return parse_boot_next(variable.data, source=name) if variable else None

    def is_managed(self, option: LoadOption) -> bool:
        nodes = option.device_path
        if not option.description.startswith(DESCRIPTION_PREFIX) or len(nodes) != 3:
            return False
        hd, file_node, end = nodes
        if not (isinstance(hd, HardDriveNode) and isinstance(file_node, FilePathNode)
                and end.type == END and end.subtype == END_ENTIRE):
            return False
        if file_node.path.lower() != self.shim_efi_path.lower():
            return False
        uki = option.optional_data_path()
        prefix = self.uki_dir_efi_path.rstrip("\\").lower() + "\\"
        return uki is not None and uki.lower().startswith(prefix)

    # --- building ---------------------------------------------------------------------------

    @property
    def partition(self) -> EspPartition:
        if self._partition is None:
            raise ConfigError("the ESP's partition is unknown")
        return self._partition

    def uki(self, path: str) -> UkiFile:
        """The UKI at ``path``, which must be a readable UKI inside uki_dir."""
        real = os.path.realpath(path)
        if os.path.dirname(real) != os.path.realpath(self.uki_dir):
            raise ConfigError(f"{path} is not in uki_dir {self.uki_dir}")
        if not os.path.isfile(real):
            raise ConfigError(f"{path} does not exist")
        uki = self.esp.read_uki(real)
        if uki.problem:
            raise ConfigError(f"{path} is not a usable UKI: {uki.problem}")
        return uki

    def option_for(self, uki: UkiFile) -> LoadOption:
        if not os.path.isfile(self.esp.host_path(self.shim_efi_path)):
            raise ConfigError(f"shim is missing: {self.esp.host_path(self.shim_efi_path)}")
        version = uki.kernel_version or os.path.splitext(os.path.basename(uki.path))[0]
        return LoadOption(
            LOAD_OPTION_ACTIVE, DESCRIPTION_PREFIX + version,
            (self.partition.hard_drive_node(), FilePathNode.from_path(self.shim_efi_path),
             END_ENTIRE_NODE),
            ucs2z_optional_data(uki.esp_path))

    def csv_entry_for(self, option: LoadOption) -> BootCsvEntry:
        # fallback builds \EFI\<vendor>\<filename> and stores the arguments with their NUL.
        return BootCsvEntry(SHIM_FILE_NAME, option.description, option.optional_data_path() or "",
                            CSV_COMMENT)

    # --- planning ---------------------------------------------------------------------------

    def plan_add(self, uki: UkiFile, once: bool) -> Tuple[int, List[Change]]:
        """Changes making ``uki`` bootable: for a trial (``once``) through BootNext, with the
        entry at the end of BootOrder; otherwise at the front of BootOrder, and in the CSV."""
        state = self.state()
        option = self.option_for(uki)
        raw = option.to_bytes()
        changes: List[Change] = []
        existing = next((e for e in state.entries
                         if e.raw == raw and e.attributes == NV_BS_RT), None)
        if existing is not None:
            number = existing.number
        else:
            used = {e.number for e in state.entries}
            number = next((n for n in range(0x10000) if n not in used), None)
            if number is None:
                raise TransactionError("all 65536 Boot#### numbers are in use")
            changes.append(Change(boot_variable_name(number), None, raw,
                                  f"{option.description!r} {device_path_text(option.device_path)}"
                                  f" {uki.esp_path}"))
        if once:
            if number not in state.boot_order:
                changes.append(self._order_change(state.boot_order,
                                                  state.boot_order + (number,)))
            if state.boot_next != number:
                changes.append(Change("BootNext", self._current("BootNext"),
                                      boot_next_bytes(number),
                                      f"{_next_text(state.boot_next)} -> {number:04X}"))
        else:
            changes.extend(self._promote_changes(state, number))
            changes.extend(self._csv_changes(option))
        return number, [c for c in changes if c.old != c.new]

    def plan_promote(self, number: int) -> List[Change]:
        state = self.state()
        if state.entry(number) is None:
            raise ConfigError(f"{boot_variable_name(number)} does not exist")
        return self._promote_changes(state, number)

    def _promote_changes(self, state: BootState, number: int) -> List[Change]:
        order = (number,) + tuple(n for n in state.boot_order if n != number)
        return [self._order_change(state.boot_order, order)] if order != state.boot_order else []

    def plan_remove(self, uki_efi_path: str) -> List[Change]:
        """Remove this tool's entries for one UKI path (whether the file still exists or not)."""
        state = self.state()
        doomed = [e for e in state.entries
                  if e.managed and (e.uki_path or "").lower() == uki_efi_path.lower()]
        return self._removal_changes(state, doomed)

    def plan_prune(self) -> List[Change]:
        """Remove this tool's entries whose UKI no longer exists on the ESP."""
        state = self.state()
        doomed = [e for e in state.entries
                  if e.managed and not os.path.isfile(self.esp.host_path(e.uki_path or ""))]
        return self._removal_changes(state, doomed)

    def _removal_changes(self, state: BootState, doomed: List[BootEntry]) -> List[Change]:
        numbers = {e.number for e in doomed}
        changes: List[Change] = []
        order = tuple(n for n in state.boot_order if n not in numbers)
        if order != state.boot_order:
            changes.append(self._order_change(state.boot_order, order))
        if state.boot_next in numbers:
            changes.append(Change("BootNext", self._current("BootNext"), None,
                                  f"{state.boot_next:04X} -> (none)"))
        for entry in doomed:
            description = entry.option.description if entry.option else ""
            changes.append(Change(entry.name, entry.raw, None,
                                  f"delete {description!r} {entry.uki_path}"))
        changes.extend(self._csv_after_removal(state, order, numbers))
        return changes

    def _order_change(self, old: Tuple[int, ...], new: Tuple[int, ...]) -> Change:
        return Change("BootOrder", self._current("BootOrder"), boot_order_bytes(new),
                      f"{_hex_list(old)} -> {_hex_list(new)}")

    def _current(self, name: str) -> Optional[bytes]:
        variable = self.efivars.get(name, EFI_GLOBAL_VARIABLE)
        return variable.data if variable else None

    def _is_managed_csv_line(self, line: BootCsvEntry) -> bool:
        prefix = self.uki_dir_efi_path.rstrip("\\").lower() + "\\"
        return (line.filename.lower() == SHIM_FILE_NAME and line.label.startswith(DESCRIPTION_PREFIX)
                and line.arguments.lower().startswith(prefix))

    def _csv_lines(self) -> Tuple[str, Optional[bytes], List[BootCsvEntry]]:
        path = self.esp.boot_csv_path(self.vendor)
        try:
            with open(path, "rb") as f:
                old = f.read()
        except FileNotFoundError:
            old = None
        except OSError as e:
            raise TransactionError(f"cannot read {path}: {e.strerror}") from None
        lines = list(self.esp.read_boot_csv(self.vendor) or ())
        return path, old, lines

    def _csv_changes(self, option: Optional[LoadOption]) -> List[Change]:
        """Our line (for ``option``; none when None) replaces our previous line; other lines
        stay before it.  fallback puts each entry it creates at the front of BootOrder, so
        the last line ends up first."""
        path, old, lines = self._csv_lines()
        kept = [line for line in lines if not self._is_managed_csv_line(line)]
        ours = [self.csv_entry_for(option)] if option is not None else []
        if old is None and not ours:
            return []
        new = boot_csv_bytes(kept + ours)
        if new == old:
            return []
        what = f"fallback entry {option.description!r}" if option else "no fallback entry of ours"
        return [Change(path, old, new, what, is_file=True)]

    def _csv_after_removal(self, state: BootState, new_order: Tuple[int, ...],
                           removed: set) -> List[Change]:
        """If the CSV names a removed UKI, point it at our entry now first in BootOrder."""
        _, _, lines = self._csv_lines()
        removed_paths = {(e.uki_path or "").lower() for e in state.entries if e.number in removed}
        if not any(self._is_managed_csv_line(line) and line.arguments.lower() in removed_paths
                   for line in lines):
            return []
        successor = next((state.entry(n) for n in new_order
                          if state.entry(n) is not None and state.entry(n).managed), None)
        return self._csv_changes(successor.option if successor else None)

    # --- applying ---------------------------------------------------------------------------

    def apply(self, changes: Sequence[Change]) -> None:
        """Apply in order; on failure undo the applied ones in reverse and re-raise."""
        done: List[Change] = []
        try:
            for change in changes:
                self._write(change, change.new)
                done.append(change)
        except CvmUpdateError as failure:
            undo_errors = []
            for change in reversed(done):
                try:
                    self._write(change, change.old)
                except CvmUpdateError as e:
                    undo_errors.append(f"{change.target}: {e}")
            if undo_errors:
                raise TransactionError(f"{failure}; undoing the earlier steps also failed: "
                                       + "; ".join(undo_errors)) from failure
            raise

    def _write(self, change: Change, data: Optional[bytes]) -> None:
        if change.is_file:
            self.esp.replace_file(change.target, data)
        elif data is None:
            self.efivars.delete(change.target, EFI_GLOBAL_VARIABLE)
        else:
            self.efivars.set(change.target, EFI_GLOBAL_VARIABLE, data, NV_BS_RT)


def _next_text(number: Optional[int]) -> str:
    return "(none)" if number is None else f"{number:04X}"


def open_boot_manager(config, need_partition: bool = False) -> BootManager:
    """The boot manager over the configured efivarfs and ESP.  ``need_partition``: locate the
    ESP's GPT partition too, which only creating an entry needs."""
    partition = locate_esp(config.esp_device, config.esp) if need_partition else None
    return BootManager(EfiVarFs(config.efivars), Esp(config.esp), config.vendor, config.uki_dir, partition)
