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
