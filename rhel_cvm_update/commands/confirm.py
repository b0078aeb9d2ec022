"""`rhel-cvm-update confirm [--json]`: after a boot, promote the staged chain if it came up
with its predicted PCRs and retire old chains; record a failed trial boot otherwise."""

from rhel_cvm_update.commands.update import LOCK_WAIT_SECONDS, service_hooks


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "confirm", help="after booting a staged UKI: make it the default and retire old chains",
        description="Run after boot (rhel-cvm-update-confirm.service).  If the staged entry booted with the "
                    "predicted PCR values, put it first in BootOrder and BOOTX64.CSV and remove chains beyond "
                    "keep_previous; if the old kernel booted instead, record the failed trial and change nothing.")
    parser.add_argument("--no-wait", action="store_true",
                        help="fail (exit 4) instead of waiting when another transaction holds the lock")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def describe_confirm(result) -> str:
    lines = [f"confirm: {result.outcome}" + (f" ({result.reason})" if result.reason else "")]
    lines += [f"  recovered: {r}" for r in result.recovered]
    lines.append(f"  booted {result.booted_uki} via {result.boot_current}")
    if result.promoted:
        lines.append(f"  {result.promoted} is now first in BootOrder and in BOOTX64.CSV")
    for r in result.removed:
        lines.append(f"  retired {r['uki']}: token {r['token']}, keyslot {r['keyslot']}, "
                     f"entries {', '.join(r['entries']) or 'none'}")
    lines.append("  kept: " + (", ".join(str(k) for k in result.kept) or "none"))
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)


def run(args, config) -> int:
    from rhel_cvm_update.output import print_json
    from rhel_cvm_update.transaction import run_confirm
    from rhel_cvm_update.daemon import service_session

    hooks = service_hooks()
    with service_session(hooks, "confirm"):  # READY=1, "failed" journal entry, STOPPING=1
        result = run_confirm(config, hooks=hooks, lock_timeout=None if args.no_wait else LOCK_WAIT_SECONDS)
        if hooks is not None:
            hooks.report_confirm(result)
    if args.json:
        print_json(result.to_json())
    else:
        print(describe_confirm(result))
    return 1 if result.outcome == "trial-failed" else 0
