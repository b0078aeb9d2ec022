"""`rhel-cvm-update enroll --from-tpm2-import`: convert Azure's first-boot token."""

from rhel_cvm_update.errors import ConfigError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "enroll", help="convert an Azure tpm2-import token into a systemd-tpm2 token",
        description="Import the duplicated parent of each tpm2-import token, unseal its secret, re-seal it "
                    "locally as a systemd-tpm2 token on the same keyslot and policy, then remove the import "
                    "token (what RHEL's tpm2-luks-import.sh does, with verification).")
    parser.add_argument("--from-tpm2-import", action="store_true",
                        help="convert the tpm2-import tokens (the only enrolment source so far)")
    parser.add_argument("--dry-run", action="store_true", help="show what would be done; change nothing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args, config) -> int:
    from rhel_cvm_update.output import print_json
    from rhel_cvm_update.reseal import run_enroll

    if not args.from_tpm2_import:
        raise ConfigError("enroll needs --from-tpm2-import (first enrolment from a passphrase: reseal --key-file -)")
    result = run_enroll(config, dry_run=args.dry_run)
    if args.json:
        print_json(result)
    else:
        for entry in result["converted"]:
            print(f"{result['device']}: tpm2-import token {entry['import_token']} (keyslot {entry['keyslot']}): "
                  f"{entry['action']}" + (f" -> systemd-tpm2 token {entry['token']}" if "token" in entry else ""))
    return 0
