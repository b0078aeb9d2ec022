"""`rhel-cvm-update boot list|add|remove`: the UEFI boot entries of UKIs (see bootmgr.py).

``list`` prints the entries the way ``efibootmgr -v`` does (same device-path text, optional
data as printable bytes), then which of them this tool manages.  ``add`` and ``remove``
change variables only after the whole change is planned; ``--dry-run`` prints the plan.
"""

import argparse
from typing import List, Sequence

from rhel_cvm_update.errors import ConfigError
from rhel_cvm_update.output import print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "boot", help="list, add and remove the UEFI boot entries of UKIs",
        description="UEFI Boot#### entries that start a UKI through shim.")
    verbs = parser.add_subparsers(dest="boot_command", metavar="VERB")
    verbs.required = True

    listing = verbs.add_parser("list", help="print the boot entries like efibootmgr -v")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=run_list)

    add = verbs.add_parser("add", help="create (or reuse) the entry of a UKI and make it boot")
    add.add_argument("--uki", required=True, metavar="PATH", help="the UKI, inside uki_dir")
    add.add_argument("--once", action="store_true",
                     help="boot it once through BootNext (a trial); BootOrder keeps its head")
    add.add_argument("--dry-run", action="store_true", help="print the changes, change nothing")
    add.set_defaults(run=run_add)

    remove = verbs.add_parser("remove", help="remove this tool's entries of a UKI")
    remove.add_argument("--uki", required=True, metavar="PATH",
                        help="the UKI path (it may already be deleted)")
    remove.add_argument("--dry-run", action="store_true", help="print the changes, change nothing")
    remove.set_defaults(run=run_remove)


def efibootmgr_raw_text(data: bytes) -> str:
    """Optional data the way efibootmgr -v shows it: printable ASCII as is, other bytes '.'."""
    return "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in data)


def entry_line(entry) -> str:
    from rhel_cvm_update.formats.devpath import device_path_text

    if entry.option is None:
        return f"{entry.name}  (unreadable: {entry.error})"
    mark = "*" if entry.option.active else " "
    return (f"{entry.name}{mark} {entry.option.description}\t"
            f"{device_path_text(entry.option.device_path)}"
            f"{efibootmgr_raw_text(entry.option.optional_data)}")


def run_list(args: argparse.Namespace, config) -> int:
    from rhel_cvm_update.bootmgr import open_boot_manager

    manager = open_boot_manager(config)
    state = manager.state()
    ukis = manager.esp.list_ukis(config.uki_dir)
    if args.json:
        print_json({
            "boot_current": state.boot_current,
            "boot_next": state.boot_next,
            "boot_order": list(state.boot_order),
            "entries": [dict(number=e.number, name=e.name, managed=e.managed,
                             in_boot_order=e.number in state.boot_order, error=e.error,
                             uki=e.uki_path, **(e.option.to_json() if e.option else {}))
                        for e in state.entries],
            "ukis": ukis,
        })
        return 0
    if state.boot_current is not None:
        print(f"BootCurrent: {state.boot_current:04X}")
    if state.boot_next is not None:
        print(f"BootNext: {state.boot_next:04X}")
    print("BootOrder: " + ",".join(f"{n:04X}" for n in state.boot_order))
    for entry in state.entries:
        print(entry_line(entry))
    managed = [e.name for e in state.entries if e.managed]
    print("Managed by rhel-cvm-update: " + (", ".join(managed) if managed else "none"))
    print(f"UKIs in {config.uki_dir}:" + ("" if ukis else " none"))
    for uki in ukis:
        entries = [e.name for e in state.entries if (e.uki_path or "").lower() == uki.esp_path.lower()]
        what = uki.kernel_version or f"not usable: {uki.problem}"
        print(f"  {uki.esp_path}  {what}  entries: {', '.join(entries) or 'none'}")
    return 0


def _report(changes: Sequence, dry_run: bool) -> None:
    verb = "would " if dry_run else ""
    if not changes:
        print("nothing to change")
    for change in changes:
        print(f"{verb}{change.action} {change.target}: {change.summary}")


def _changes_json(changes: Sequence) -> List[dict]:
    return [{"action": c.action, "target": c.target, "summary": c.summary} for c in changes]


def run_add(args: argparse.Namespace, config) -> int:
    from rhel_cvm_update.bootmgr import open_boot_manager
    from rhel_cvm_update.journal import writing_command

    with writing_command(config.state_dir, "boot add", dry_run=args.dry_run) as record:
        manager = open_boot_manager(config, need_partition=True)
        uki = manager.uki(args.uki)
        number, changes = manager.plan_add(uki, once=args.once)
        if not args.dry_run:
            manager.apply(changes)
        record({"outcome": "added", "uki": uki.esp_path, "entry": f"Boot{number:04X}", "once": args.once,
                "changes": _changes_json(changes)})
    _report(changes, args.dry_run)
    print(f"Boot{number:04X} starts {uki.esp_path}" + (" once (BootNext)" if args.once else ""))
    return 0


def run_remove(args: argparse.Namespace, config) -> int:
    from rhel_cvm_update.bootmgr import open_boot_manager
    from rhel_cvm_update.journal import writing_command

    with writing_command(config.state_dir, "boot remove", dry_run=args.dry_run) as record:
        manager = open_boot_manager(config)
        try:
            efi_path = manager.esp.efi_path(args.uki)
        except ConfigError:
            if not args.uki.startswith("\\"):
                raise
            efi_path = args.uki
        changes: List = manager.plan_remove(efi_path)
        if not args.dry_run:
            manager.apply(changes)
        record({"outcome": "removed", "uki": efi_path, "changes": _changes_json(changes)})
    _report(changes, args.dry_run)
    return 0
