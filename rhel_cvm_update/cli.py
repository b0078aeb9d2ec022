"""Command-line entry point: a table of verb modules, one error handler.

Each module in ``rhel_cvm_update.commands`` named in COMMAND_MODULES provides
``register(subparsers)``, which adds its sub-command and sets ``run(args, config) -> int``
as the parser default.  Modules import heavy dependencies (tpm2_pytss, pyudev) inside
``run`` so that ``status`` starts fast.
"""

import argparse
import importlib
import os
import sys
from typing import List, Optional

from rhel_cvm_update import __version__
from rhel_cvm_update.errors import CvmUpdateError

COMMAND_MODULES = ("inspect", "eventlog", "predict", "reseal", "enroll", "boot", "update", "confirm", "status", "config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rhel-cvm-update",
        description="Keep a vTPM-unlocked LUKS2 root disk unlocking across UKI kernel updates.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", metavar="FILE",
                        help="configuration file (default: $RHEL_CVM_UPDATE_CONFIG or "
                             "/etc/rhel-cvm-update/config.yaml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"rhel_cvm_update.commands.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    # libtss2 logs every failed connect or command to stderr (WARNING:tcti:..., ERROR:esys:...)
    # before the exception adapters/tpm.py turns into one error line.  Silenced unless the
    # admin asks for them (TSS2_LOG=all+WARNING, rhel-cvm-update(8)); set before the library
    # loads, since each libtss2 module reads TSS2_LOG once, at its first message.
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from rhel_cvm_update.config import load_config

        config = load_config(args.config)
        return int(args.run(args, config) or 0)
    except CvmUpdateError as e:
        print(f"rhel-cvm-update: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("rhel-cvm-update: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
