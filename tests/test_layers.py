"""The house rules, read from the source (every import, also those inside functions):

- ``formats/`` are pure functions over bytes: they import only the standard library, other
  formats and ``errors``;
- only ``adapters/`` talk to the machine: no other module imports subprocess, tpm2-pytss,
  pydbus, pyudev, systemd-python or GObject;
- ``commands/`` parse options and print: they reach the machine only through the
  orchestrating modules (transaction, reseal, bootmgr, status, predict), never an adapter;
- no module grows past what one reads in a sitting (about 450 lines).
"""

import ast
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rhel_cvm_update"
MACHINE_MODULES = ("subprocess", "tpm2_pytss", "pydbus", "pyudev", "systemd", "gi")
MAX_LINES = 460


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def imports(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level])
                yield node.lineno, f"{base}.{node.module}" if node.module else base
            else:
                yield node.lineno, node.module


def layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else "core"


def name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def violations(rule) -> list:
    return [f"{name(p)}:{line} imports {module}" for p in modules() for line, module in imports(p)
            if rule(p, module)]


def top(module: str) -> str:
    return module.split(".")[0]


def test_formats_import_only_the_standard_library_formats_and_errors():
    stdlib = getattr(sys, "stdlib_module_names", None)  # Python 3.10+

    def wrong(path, module):
        if layer(path) != "formats":
            return False
        if top(module) == "rhel_cvm_update":
            return not (module.startswith("rhel_cvm_update.formats") or module == "rhel_cvm_update.errors")
        return top(module) in MACHINE_MODULES or (stdlib is not None and top(module) not in stdlib)
    assert violations(wrong) == []


def test_only_adapters_import_the_machine():
    assert violations(lambda path, module: layer(path) != "adapters" and top(module) in MACHINE_MODULES) == []


def test_commands_do_not_reach_into_adapters():
    assert violations(lambda path, module: layer(path) == "commands"
                      and module.startswith("rhel_cvm_update.adapters")) == []


def test_adapters_do_not_import_the_orchestration():
    """Adapters are leaves over formats: the transaction uses them, never the reverse."""
    allowed = ("rhel_cvm_update.formats", "rhel_cvm_update.errors", "rhel_cvm_update.secrets",
               "rhel_cvm_update.adapters", "rhel_cvm_update.trust")
    assert violations(lambda path, module: layer(path) == "adapters" and top(module) == "rhel_cvm_update"
                      and not module.startswith(allowed)) == []


@pytest.mark.parametrize("path", modules(), ids=name)
def test_module_size(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{name(path)} has {lines} lines; split it along a seam"


def test_the_rules_see_a_violation(tmp_path):
    """The checks above would fail: a function-level import is found and resolved."""
    sample = PACKAGE / "formats" / "pe.py"
    found = dict((m, line) for line, m in imports(sample))
    assert "rhel_cvm_update.errors" in found
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import subprocess\n    from tpm2_pytss import ESAPI\n")
    assert [m for _, m in imports(probe)] == ["subprocess", "tpm2_pytss"]
