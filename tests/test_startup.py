"""What a fresh process imports to start the CLI and `status`: never the heavy optional
dependencies (tpm2_pytss, pyudev, gi/pydbus, systemd, cryptography) nor the prediction
stack.  Speed itself is measured in benchmarks/status.py; this test pins the cause."""

import json
import subprocess
import sys
from pathlib import Path

from rhel_cvm_update.commands.inspect import HASH_CHOICES
from rhel_cvm_update.formats.authenticode import HASH_ALGORITHMS

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("tpm2_pytss", "pyudev", "gi", "pydbus", "systemd", "cryptography")
# Also the PE code and the secrets module (ctypes, libc): status reads the ESP and the LUKS2
# header through the adapters without needing either at import time.
PREDICTION_STACK = ("rhel_cvm_update.measure", "rhel_cvm_update.predict_log", "rhel_cvm_update.predict_model",
                    "rhel_cvm_update.signers", "rhel_cvm_update.formats.uki", "rhel_cvm_update.formats.pe",
                    "rhel_cvm_update.secrets")

PROBE = """
import json, sys
from rhel_cvm_update.cli import build_parser
build_parser()
import rhel_cvm_update.status, rhel_cvm_update.commands.status, rhel_cvm_update.config
from rhel_cvm_update.predict import read_event_log, shim_path, booted_chain
from rhel_cvm_update.adapters.esp import Esp
from rhel_cvm_update.adapters.cryptsetup import resolve_device
from rhel_cvm_update.bootmgr import BootManager
print(json.dumps(sorted(sys.modules)))
"""


def test_cli_and_status_import_no_heavy_dependency():
    modules = json.loads(subprocess.run([sys.executable, "-c", PROBE], cwd=str(REPO), check=True,
                                        capture_output=True, text=True).stdout)
    loaded = [m for m in modules if m.split(".")[0] in HEAVY or m in PREDICTION_STACK]
    assert loaded == []
    assert "rhel_cvm_update.cli" in modules and "rhel_cvm_update.status" in modules


def test_inspect_offers_exactly_the_banks_the_pe_code_hashes():
    assert HASH_CHOICES == HASH_ALGORITHMS


def test_a_started_command_builds_only_its_own_parser():
    from rhel_cvm_update.cli import COMMAND_MODULES, command_named

    assert command_named(["inspect", "x.efi"]) == "inspect"
    assert command_named(["--config", "/etc/c.yaml", "status", "--json"]) == "status"
    assert command_named(["--config=/etc/c.yaml", "boot", "add", "--uki", "u"]) == "boot"
    assert command_named(["update", "--help"]) == "update"  # the command's own help
    for argv in (["--help"], ["-h", "status"], ["--version"], [], ["nonsense"], ["--config"], ["--json"]):
        assert command_named(argv) is None, argv  # the full parser lists or reports
    listing = subprocess.run([sys.executable, "-m", "rhel_cvm_update", "--help"], cwd=str(REPO),
                             capture_output=True, text=True)
    assert listing.returncode == 0 and all(name in listing.stdout for name in COMMAND_MODULES)
    unknown = subprocess.run([sys.executable, "-m", "rhel_cvm_update", "nonsense"], cwd=str(REPO),
                             capture_output=True, text=True)
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr and "inspect" in unknown.stderr


def test_inspect_needs_no_configuration(tmp_path):
    """inspect reads only the files it is given: a broken configuration does not stop it
    (every other command reports the configuration)."""
    broken = tmp_path / "config.yaml"
    broken.write_text("no_such_key: 1\n")
    run = lambda *argv: subprocess.run([sys.executable, "-m", "rhel_cvm_update", "--config", str(broken), *argv],  # noqa: E731
                                       cwd=str(REPO), capture_output=True, text=True)
    inspected = run("inspect", "--json", sys.executable)  # not a PE file: a format error, not a config one
    assert inspected.returncode == 2 and "no_such_key" not in inspected.stderr, inspected.stderr
    status = run("status")
    assert status.returncode == 2 and "no_such_key" in status.stderr
