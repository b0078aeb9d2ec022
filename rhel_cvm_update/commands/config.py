"""`rhel-cvm-update config show [--json]`: the effective configuration (file + defaults)."""

import json

from rhel_cvm_update.output import print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser("config", help="show the effective configuration",
                                   description="Configuration commands.")
    verbs = parser.add_subparsers(dest="config_command", metavar="VERB")
    verbs.required = True
    show = verbs.add_parser("show", help="print every key with its effective value and where it came from")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=run_show)


def run_show(args, config) -> int:
    from rhel_cvm_update.config import CONFIG_ITEMS

    if args.json:
        print_json({"source": config.source, "config": config.as_dict()})
        return 0
    print(f"# effective configuration (file: {config.source})")
    for item in CONFIG_ITEMS:
        value = config.values[item.key]
        origin = "default" if value == item.default else "set"
        print(f"{item.key}: {json.dumps(value)}  # {origin}")
    return 0
