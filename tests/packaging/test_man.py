"""rhel-cvm-update(8): renders without groff warnings and documents what the code has:
every command, every config key with its default, every exit code of errors.py."""

import inspect
import os
import re
import subprocess

import pytest

from rhel_cvm_update import errors
from rhel_cvm_update.config import CONFIG_ITEMS
from tests.packaging.rpmtools import REPO, require
from tests.packaging.test_completion import _subparsers
from rhel_cvm_update.cli import build_parser

PAGE = REPO / "man" / "rhel-cvm-update.8"


@pytest.fixture(scope="module")
def rendered():
    require("man")
    return subprocess.run(["man", "-l", str(PAGE)], env=dict(os.environ, MANWIDTH="80"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=60).stdout


def section(text, name):
    match = re.search(r"^%s\n(.*?)(?=^[A-Z][A-Z ]+\n)" % re.escape(name), text, re.S | re.M)
    assert match, name
    return re.sub(r"\s+", " ", match.group(1).replace("\u2010", "-"))


@pytest.mark.parametrize("width", ["60", "80", "100"])
def test_renders_without_warnings(width):
    require("man")
    result = subprocess.run(["man", "--warnings", "-l", str(PAGE)], env=dict(os.environ, MANWIDTH=width),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stderr == ""


def test_sections(rendered):
    for heading in ("SYNOPSIS", "COMMANDS", "CONFIGURATION", "EXIT STATUS", "HOOKS", "FILES", "EXAMPLES",
                    "RECOVERY", "SEE ALSO"):
        assert "\n" + heading + "\n" in rendered


def test_every_command_is_documented(rendered):
    commands = section(rendered, "COMMANDS")
    for name, sub in _subparsers(build_parser()).items():
        verbs = _subparsers(sub) or {"": None}
        for verb in verbs:
            assert re.search(r"(^| )%s " % re.escape((name + " " + verb).strip()), commands), (name, verb)


def test_every_config_key_and_default_is_documented(rendered):
    configuration = section(rendered, "CONFIGURATION")
    for item in CONFIG_ITEMS:
        assert " %s " % item.key in " " + configuration, item.key
        if item.default not in ("", None):
            default = str(item.default) if not isinstance(item.default, list) else \
                "[" + ", ".join(str(v) for v in item.default) + "]"
            # Long paths may break after a slash: compare without white space.
            assert default.replace(" ", "") in configuration.replace(" ", ""), (item.key, default)


def test_every_exit_code_is_documented(rendered):
    exit_status = section(rendered, "EXIT STATUS")
    codes = {cls.exit_code for _, cls in inspect.getmembers(errors, inspect.isclass)
             if issubclass(cls, errors.CvmUpdateError)}
    codes |= {0, 1, 130}  # success, status "attention needed", KeyboardInterrupt in cli.main
    for code in sorted(codes):
        assert re.search(r"(^| )%d " % code, exit_status), code


def test_recovery_procedure(rendered):
    recovery = section(rendered, "RECOVERY")
    for step in ("BootNext", "firmware boot menu", "efibootmgr --bootnext", "recovery passphrase",
                 "systemd-cryptenroll --wipe-slot=", "systemd-cryptenroll --tpm2-device=auto --tpm2-pcrs=4+7",
                 "rhel-cvm-update update", "rhel-cvm-update status"):
        assert step in recovery, step
