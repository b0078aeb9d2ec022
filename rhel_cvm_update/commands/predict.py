"""`rhel-cvm-update predict`: next boot's PCR4/PCR7 for a new UKI (and shim), with the
event-by-event justification (--explain)."""

import os
from typing import Dict

from rhel_cvm_update.errors import ConfigError, FormatError
from rhel_cvm_update.output import print_json

HEX_DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="predict next boot's PCR4 and PCR7 for a new UKI",
        description="Predict the PCR4 and PCR7 values of a boot of shim -> UKI from the current "
                    "event log (or, when it is missing or broken, from a model of the boot), "
                    "trusted only after the source reproduced the live PCRs of this boot.")
    parser.add_argument("--uki", required=True, metavar="NEW", help="the UKI the next boot starts")
    parser.add_argument("--shim", metavar="NEW", help="the shim the next boot starts "
                        "(default: EFI/<vendor>/shimx64.efi on the ESP)")
    parser.add_argument("--event-log", metavar="FILE", help="event log of this boot (default: config "
                        "'event_log')")
    parser.add_argument("--source", choices=("auto", "log", "model"), default="auto")
    live = parser.add_mutually_exclusive_group()
    live.add_argument("--tpm", metavar="TCTI", help="TPM to read the live PCRs from (default: config 'tpm')")
    live.add_argument("--offline", action="store_true",
                      help="do not compare with live PCRs (captured logs); the log must still be consistent")
    live.add_argument("--pcrs-from", metavar="FILE",
                      help="take the live PCRs from a file of 'BANK PCR HEX' lines captured on the "
                           "machine that wrote the log, instead of a TPM")
    parser.add_argument("--efivars", metavar="DIR", help="efivarfs directory (default: config 'efivars')")
    parser.add_argument("--explain", action="store_true", help="print every event and where its digest comes from")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run=run)


def read_pcr_file(path: str) -> Dict[str, Dict[int, bytes]]:
    out: Dict[str, Dict[int, bytes]] = {}
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"cannot read PCR values: {e}", source=path) from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        try:
            bank, pcr, value = parts[0], int(parts[1]), bytes.fromhex(parts[2])
        except (IndexError, ValueError):
            raise FormatError(f"line {number}: expected 'BANK PCR HEX'", source=path) from None
        if len(parts) != 3 or HEX_DIGEST_SIZES.get(bank) != len(value) or not 0 <= pcr < 24:
            raise FormatError(f"line {number}: bad bank, PCR or digest length", source=path)
        out.setdefault(bank, {})[pcr] = value
    return out


def run(args, config) -> int:
    import dataclasses

    from rhel_cvm_update.config import config_from_mapping
    from rhel_cvm_update.predict import predict_next_boot

    overrides = {k: v for k, v in (("tpm", args.tpm), ("efivars", args.efivars)) if v}
    if overrides:
        config = config_from_mapping({**config.as_dict(), **overrides}, config.source or "<command line>")
    for path in [args.uki] + ([args.shim] if args.shim else []):
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such file")
    live = read_pcr_file(args.pcrs_from) if args.pcrs_from else None
    prediction = predict_next_boot(config, os.path.abspath(args.uki),
                                   shim=os.path.abspath(args.shim) if args.shim else None,
                                   source=args.source, event_log=args.event_log,
                                   offline=args.offline, live=live)
    if args.pcrs_from:
        prediction = dataclasses.replace(prediction, checked_against=f"file {args.pcrs_from}")
    if args.json:
        print_json(prediction.to_json())
        return 0
    sha256 = prediction.banks["sha256"]
    print(f"PCR4 sha256 {sha256[4].hex()}")
    print(f"PCR7 sha256 {sha256[7].hex()}")
    print(f"source: {prediction.source}, checked against: {prediction.checked_against}")
    for note in prediction.notes:
        print(f"note: {note}")
    if args.explain:
        for ev in prediction.events:
            print(f"  PCR{ev.pcr} {ev.summary or ev.event_type:<36} {ev.digests['sha256'].hex()[:16]}  {ev.origin}")
    return 0
