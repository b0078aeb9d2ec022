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

COMMAND_MODULES = ("inspect", "eventlog", "predict", "reseal", "enroll", "boot", "update", "confirm", "status", "config",
                   "grow-root")


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="configuration file (default: $RHEL_CVM_UPDATE_CONFIG or "
                             "/etc/rhel-cvm-update/config.yaml)")


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole parser; ``only``: with just that command's sub-parser (a command started
    imports and builds nothing of the others)."""
    parser = argparse.ArgumentParser(
        prog="rhel-cvm-update",
        description="Keep a vTPM-unlocked LUKS2 root disk unlocking across UKI kernel updates.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES if only is None else (only,):
        importlib.import_module(f"rhel_cvm_update.commands.{name.replace('-', '_')}").register(sub)
    return parser


def command_named(argv: List[str]) -> Optional[str]:
    """The command ``argv`` runs, when it names a known one and asks for no top-level help or
    version (those list every command); else None."""
    peek = argparse.ArgumentParser(add_help=False)
    _global_options(peek)
    try:
        _, rest = peek.parse_known_args(argv)
    except SystemExit:  # e.g. --config without its value: the full parser reports it
        return None
    words = [w for w in rest if not w.startswith("-")]
    if not words or words[0] not in COMMAND_MODULES:
        return None
    before = rest[:rest.index(words[0])]
    return None if any(w in ("-h", "--help", "--version") for w in before) else words[0]


def main(argv: Optional[List[str]] = None) -> int:
    # libtss2 logs every failed connect or command to stderr (WARNING:tcti:..., ERROR:esys:...)
    # before the exception adapters/tpm.py turns into one error line.  Silenced unless the
    # admin asks for them (TSS2_LOG=all+WARNING, rhel-cvm-update(8)); set before the library
    # loads, since each libtss2 module reads TSS2_LOG once, at its first message.
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(only=command_named(argv)).parse_args(argv)
    try:
        # A command that reads only the files it is given (inspect) needs no configuration.
        config = None
        if not getattr(args, "without_config", False):
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
