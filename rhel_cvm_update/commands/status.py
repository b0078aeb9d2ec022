"""`rhel-cvm-update status [--json]`: what the next boot will do, without the TPM.

Exit 0: the next boot will unlock; 1: attention needed (the output says what to run);
2: something could not be read.  Imports happen inside ``run`` so that the command starts fast.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "status", help="booted chain, tokens, boot entries, pending transaction; exit 0 if the next boot unlocks",
        description="Print the booted UKI and entry, the live PCRs, every LUKS2 token with its keyslot and "
                    "whether it matches this boot and the staged next boot, the Boot entries, the pending "
                    "transaction and the last result.  Needs no TPM.")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def describe_status(status) -> str:
    booted = status["booted"]
    nxt = status["next_boot"]
    lines = [f"Booted: {booted['uki'] or 'unknown UKI'} via {booted['entry'] or 'unknown entry'}"]
    pcrs = status["live_pcrs"]
    if pcrs["sha256"]:
        lines.append(f"Live PCRs ({pcrs['source']}): "
                     + ", ".join(f"{p}={v}" for p, v in pcrs["sha256"].items()))
    else:
        lines.append("Live PCRs: unknown")
    lines.append(f"Next boot: {nxt['entry'] or 'none'} {nxt['uki'] or ''} -> "
                 + ("unlocks" if nxt["will_unlock"] else "MAY NOT UNLOCK") + f" ({nxt['why']})")
    if status["staged"]:
        lines.append(f"Staged: {status['staged']['uki']} as {status['staged']['entry']} (token {status['staged']['token']})")
    lines.append("Tokens:")
    for t in status["tokens"]:
        flags = [f for f, on in (("current boot", t["matches_current_boot"]),
                                 ("staged boot", t["matches_staged_boot"])) if on]
        lines.append(f"  {t['token']}: {t['type']} keyslots {t['keyslots']} PCRs {t['pcrs']}"
                     + (f" [{t['chain_status']}: {t['uki']}]" if t["uki"] else " [not managed]")
                     + (f" matches {' and '.join(flags)}" if flags else ""))
    for line in status["unaccounted"]:
        lines.append(f"  kept, not managed: {line}")
    lines.append("BootOrder: " + ",".join(status["boot_order"]) + (f"  BootNext: {status['boot_next']}"
                                                                    if status["boot_next"] else ""))
    for e in status["boot_entries"]:
        lines.append(f"  {e['entry']}{' (managed)' if e['managed'] else ''}: {e['description']} {e['uki'] or ''}")
    last = status["last_result"]
    if last:
        lines.append(f"Last result: {last.get('command')} {last.get('outcome')} at {last.get('finished')}")
    for n in status.get("notes", []):
        lines.append(f"Note: {n}")
    for a in status["attention"]:
        lines.append(f"ATTENTION: {a}")
    for e in status["errors"]:
        lines.append(f"ERROR: {e}")
    return "\n".join(lines)


def run(args, config) -> int:
    from rhel_cvm_update.status import collect_status

    status = collect_status(config)
    if args.json:
        from rhel_cvm_update.output import print_json

        print_json(status)
    else:
        print(describe_status(status))
    return status["exit_code"]
