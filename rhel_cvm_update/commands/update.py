"""`rhel-cvm-update update [--settle SECONDS] [--json]`: run the update transaction.

Started by rhel-cvm-update.path with ``--settle``: wait until uki_dir and shim's directory
have been quiet for SECONDS (dnf writes several files), then take the state lock, waiting
for it if another transaction holds it.  ``--no-wait`` fails at once instead (exit 4).
"""

import os

LOCK_WAIT_SECONDS = 600.0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "update", help="seal and stage new UKIs, remove deleted ones (the crash-safe transaction)",
        description="Detect new and removed UKIs, predict the next boot's PCRs, add a keyslot + "
                    "systemd-tpm2 token per new chain, point BootNext at the newest, and remove the "
                    "entries and tokens of UKIs that were deleted.  Rerun after a crash: it finishes or "
                    "undoes the interrupted step.")
    parser.add_argument("--settle", type=float, metavar="SECONDS",
                        help="first wait until the UKI and shim directories have been quiet this long")
    parser.add_argument("--no-wait", action="store_true",
                        help="fail (exit 4) instead of waiting when another transaction holds the lock")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def service_hooks():
    """The daemon's hooks (sd_notify, journal, logind inhibitor) when systemd started us."""
    if "INVOCATION_ID" not in os.environ:
        return None
    from rhel_cvm_update.daemon import DaemonHooks

    return DaemonHooks()


def describe_update(result) -> str:
    lines = [f"update: {result.outcome}" + (f" ({result.reason})" if result.reason else "")]
    lines += [f"  recovered: {r}" for r in result.recovered]
    if result.shim_changed:
        lines.append("  shim changed: every chain is new")
    for s in result.sealed:
        lines.append(f"  {s['action']} token {s['token']} (keyslot {s['keyslot']}) for {s['uki']}: "
                     f"PCRs {', '.join(f'{p}={v}' for p, v in s['pcrs'].items())} ({s['source']})")
    if result.staged:
        lines.append(f"  staged {result.staged['uki']} as {result.staged['entry']} (BootNext): reboot when "
                     "convenient; 'rhel-cvm-update confirm' runs after the boot")
    for r in result.removed:
        lines.append(f"  removed {r['uki']}: token {r['token']}, keyslot {r['keyslot']}, "
                     f"entries {', '.join(r['entries']) or 'none'}")
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)


def run(args, config) -> int:
    from rhel_cvm_update.output import print_json
    from rhel_cvm_update.predict import shim_path
    from rhel_cvm_update.transaction import run_update
    from rhel_cvm_update.daemon import service_session, settle

    hooks = service_hooks()
    with service_session(hooks, "update"):  # READY=1, "failed" journal entry, STOPPING=1
        while True:
            if args.settle:
                paths = [config.uki_dir, os.path.dirname(shim_path(config))]
                if hooks is not None:
                    hooks.wait_for_quiet(paths, args.settle)
                else:
                    settle(paths, args.settle)
            result = run_update(config, hooks=hooks, lock_timeout=None if args.no_wait else LOCK_WAIT_SECONDS)
            if hooks is not None:
                hooks.report_update(result)
            # the path unit misses changes made while its service runs: look again (bounded)
            if hooks is None or not args.settle or not hooks.changed_since_settle():
                break
    if args.json:
        print_json(result.to_json())
    else:
        print(describe_update(result))
    if result.outcome == "refused":
        # Two sources that disagree is an error (one of them is wrong), not a wait for input.
        return 2 if result.refusal == "sources-disagree" else 1
    return 0
