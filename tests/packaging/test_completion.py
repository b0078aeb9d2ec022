"""Bash completion: loads, and offers every command and option the argument parser knows."""

import argparse
import os
import subprocess

import pytest

from rhel_cvm_update.cli import build_parser
from tests.packaging.rpmtools import REPO, require

COMPLETION = REPO / "completion" / "rhel-cvm-update.bash"
BASH_COMPLETION = "/usr/share/bash-completion/bash_completion"


def test_completion_loads():
    require("bash")
    result = subprocess.run(["bash", "-c", 'source "$1"; complete -p rhel-cvm-update', "bash", str(COMPLETION)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "complete -F _rhel_cvm_update rhel-cvm-update"
    assert result.stderr == ""


def complete(words):
    """COMPREPLY for the command line ``words`` (the last one being completed), computed by
    the function under bash-completion, as a TAB press would."""
    if not os.path.exists(BASH_COMPLETION):
        pytest.skip("bash-completion is not installed")
    script = ('source "$1"; source "$2"; shift 2; COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); '
              'COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}; _rhel_cvm_update rhel-cvm-update "${COMP_WORDS[-1]}" '
              '"${COMP_WORDS[-2]}"; printf "%s\\n" "${COMPREPLY[@]}"')
    result = subprocess.run(["bash", "-c", script, "bash", BASH_COMPLETION, str(COMPLETION)] + list(words),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _options(parser):
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def test_every_command_and_option_is_offered():
    parser = build_parser()
    commands = _subparsers(parser)
    assert complete(["rhel-cvm-update", ""]) >= set(commands)
    assert complete(["rhel-cvm-update", "--"]) >= _options(parser)
    for name, sub in commands.items():
        verbs = _subparsers(sub)
        if verbs:
            assert complete(["rhel-cvm-update", name, ""]) >= set(verbs), name
            for verb, verb_parser in verbs.items():
                assert complete(["rhel-cvm-update", name, verb, "--"]) >= _options(verb_parser), (name, verb)
        else:
            assert complete(["rhel-cvm-update", name, "--"]) >= _options(sub), name


def test_option_values():
    assert complete(["rhel-cvm-update", "predict", "--source", ""]) == {"auto", "log", "model"}
    assert complete(["rhel-cvm-update", "inspect", "--hash", "sha3"]) == {"sha384"}
    assert complete(["rhel-cvm-update", "--config", "/etc/host"]) >= {"/etc/hostname"}
    assert complete(["rhel-cvm-update", "--config", "x.yaml", "sta"]) == {"status"}
