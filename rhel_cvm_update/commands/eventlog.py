"""`rhel-cvm-update eventlog [FILE] [--json]`: decode a TCG event log and replay it."""

import argparse
import sys
from typing import Any, Dict

from rhel_cvm_update.errors import ConfigError, FormatError

# Real firmware logs are well below 1 MiB; this refuses a wrong file before reading it all.
MAX_FILE_SIZE = 16 * 1024 * 1024


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eventlog", help="decode a TCG event log and replay its PCRs",
        description="Print every event of a TCG event log (crypto-agile or SHA1 format) "
                    "and the PCR values that replaying it gives, per bank.")
    parser.add_argument("file", nargs="?", metavar="FILE",
                        help="event log (default: the 'event_log' configuration key)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(run=run)


def read_log_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            # securityfs reports size 0 for binary_bios_measurements: read, do not stat.
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the event log: {e.strerror}") from None
    if len(data) > MAX_FILE_SIZE:
        raise FormatError(f"larger than {MAX_FILE_SIZE} bytes; not an event log", source=path)
    return data


def log_as_json(log: Any) -> Dict[str, Any]:
    from rhel_cvm_update.formats.tcg_describe import describe_event
    from rhel_cvm_update.formats.tcglog import replay

    return {
        "source": log.source,
        "format": log.format,
        "banks": list(log.banks),
        "startup_locality": log.startup_locality,
        "events": [describe_event(e, log.uintn_size, log.source) for e in log.events],
        "pcrs": {bank: {str(pcr): value.hex() for pcr, value in sorted(values.items())}
                 for bank, values in replay(log).items()},
    }


def print_text(doc: Dict[str, Any]) -> None:
    out = sys.stdout
    out.write(f"{doc['source']}: {doc['format']} log, banks {', '.join(doc['banks'])}, "
              f"{len(doc['events'])} events, startup locality {doc['startup_locality']}\n")
    for event in doc["events"]:
        digests = event["digests"]
        digest = digests.get("sha256") or next(iter(digests.values()), "")
        pcr = event["pcr"] if event["pcr"] < 0x10000 else f"{event['pcr']:#x}"
        out.write(f"{event['index']:4} {pcr:>4} {event['type']:<34} {digest[:16]:<16} "
                  f"{event['summary']}\n")
    for bank, values in doc["pcrs"].items():
        out.write(f"{bank}:\n")
        for pcr, value in values.items():
            out.write(f"  {pcr:>2} {value}\n")


def run(args: argparse.Namespace, config: Any) -> int:
    from rhel_cvm_update.formats.tcglog import parse_event_log
    from rhel_cvm_update.output import print_json

    path = args.file or config.event_log
    log = parse_event_log(read_log_file(path), source=path)
    doc = log_as_json(log)
    if args.json:
        print_json(doc)
    else:
        print_text(doc)
    return 0
