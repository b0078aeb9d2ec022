"""`rhel-cvm-update reseal`: seal the LUKS key to the PCRs predicted for a UKI."""

import sys

from rhel_cvm_update.errors import ConfigError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "reseal", help="add a keyslot + systemd-tpm2 token sealed to the next boot's PCRs",
        description="Unlock the LUKS2 volume with a token that matches the current PCRs (or a passphrase on "
                    "stdin), predict the PCRs for the UKI, and add a keyslot and systemd-tpm2 token sealed to "
                    "them.  A token already sealed to the same prediction is reused.")
    parser.add_argument("--uki", metavar="PATH", help="UKI to boot next (default: the newest in uki_dir)")
    parser.add_argument("--dry-run", action="store_true", help="show what would be done; change nothing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--key-file", metavar="-",
                        help="read an existing passphrase from stdin (first enrolment); only '-' is accepted, "
                             "so key material never comes from a file on disk")
    parser.add_argument("--pcr", action="append", default=[], metavar="N=HEX",
                        help="seal to this sha256 PCR value instead of predicting (repeat for every "
                             "configured PCR)")
    parser.set_defaults(run=run)


def describe(result) -> str:
    pcrs = ",".join(result["pcrs"])
    where = f"{result['device']}: "
    if result["action"] == "reused":
        return (f"{where}token {result['token']} (keyslot {result['keyslot']}) is already sealed to PCRs {pcrs} "
                f"= policy {result['policy_hash']}; nothing to do")
    verb = "would add" if result["action"] == "would-add" else "added"
    return (f"{where}{verb} keyslot {result['keyslot']} + systemd-tpm2 token {result['token']} sealed to "
            f"{result['pcr_bank']} PCRs {pcrs} ({result['source']} values, policy {result['policy_hash']}), "
            f"unlocked with {result['unlocked_with']}")


def run(args, config) -> int:
    from rhel_cvm_update.output import print_json
    from rhel_cvm_update.reseal import parse_pcr_options, run_reseal

    if args.key_file is not None and args.key_file != "-":
        raise ConfigError("--key-file takes only '-' (stdin): a key file on disk defeats the point")
    pcr_values = parse_pcr_options(args.pcr, config.pcrs) if args.pcr else None
    result = run_reseal(config, uki=args.uki, pcr_values=pcr_values, dry_run=args.dry_run,
                        key_fd=sys.stdin.fileno() if args.key_file == "-" else None)
    if args.json:
        print_json(result)
    else:
        print(describe(result))
    return 0
