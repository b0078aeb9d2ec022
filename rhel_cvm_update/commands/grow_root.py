"""`rhel-cvm-update grow-root [--dry-run] [--json]`: grow the LUKS2 root into free disk space
with the key from the vTPM, and retire cloud-init's /cc_growpart_keydata."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "grow-root", help="grow the root partition, its LUKS2 mapping and filesystem into free disk space",
        description="On the disk holding the LUKS2 root: move the backup GPT to the end of the disk and extend "
                    "the root partition into the free space after it, tell the kernel, 'cryptsetup resize' the "
                    "open mapping with the key of the systemd-tpm2 token sealed to this boot (passed through a "
                    "pipe), and grow the filesystem (xfs_growfs or resize2fs).  If /cc_growpart_keydata "
                    "exists it is used only when no token matches this boot, and then retired: its keyslot "
                    "killed, the file overwritten and removed.  Each step is journaled; a rerun resumes, and "
                    "with nothing to grow changes nothing.")
    parser.add_argument("--dry-run", action="store_true", help="show what would be done; change nothing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--check", action="store_true",
                        help="change nothing and open no TPM; exit 0 when there is something to do, 1 when not "
                             "(the unit's ExecCondition=)")
    parser.set_defaults(run=run)


def describe(result) -> str:
    lines = [f"{result['device']} (partition {result['partition']} of {result['disk']}, mapping "
             f"{result['mapping']}, {result['filesystem'] or 'no filesystem'} on {result['mount_point'] or '-'}): "
             f"{result['outcome']}"]
    if result.get("resumed"):
        lines.append(f"  resumed an interrupted run (at {result['resumed']})")
    if result.get("key"):
        lines.append(f"  key for the resize: {result['key']}")
    for step in result.get("steps", []):
        lines.append(f"  {step['step']}: {step['action']} ({step['detail']})")
    return "\n".join(lines)


def run(args, config) -> int:
    from rhel_cvm_update.growroot import run_grow_root
    from rhel_cvm_update.output import print_json

    result = run_grow_root(config, dry_run=args.dry_run, probe=args.check)
    if args.json:
        print_json(result)
    else:
        print(describe(result))
    if args.check:
        return 0 if result["outcome"] != "nothing-to-do" else 1
    return 0
