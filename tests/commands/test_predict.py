"""`rhel-cvm-update predict` from the outside: exit codes and messages on bad input, and a
prediction from a captured real boot through the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOOT_A = REPO / "tests" / "data" / "boots" / "sb-off-uki-a"


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "rhel_cvm_update", *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})})


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(f"efivars: {tmp_path / 'no-efivars'}\nesp: {tmp_path / 'esp'}\n")
    return str(path)


def test_missing_uki_is_bad_input(config):
    result = cli("--config", config, "predict", "--uki", "/nonexistent.efi", "--offline")
    assert result.returncode == 2
    assert "/nonexistent.efi: no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_truncated_event_log_names_file_and_offset(tmp_path, config):
    log = tmp_path / "log.bin"
    log.write_bytes((BOOT_A / "eventlog.bin").read_bytes()[:1000])
    result = cli("--config", config, "predict", "--uki", "/usr/lib/systemd/boot/efi/linuxx64.efi.stub",
                 "--event-log", str(log), "--source", "log", "--offline")
    assert result.returncode == 2, result.stderr
    assert str(log) in result.stderr and "offset" in result.stderr
    assert "Traceback" not in result.stderr


def test_model_cannot_run_offline(tmp_path, config):
    result = cli("--config", config, "predict", "--uki", "/usr/lib/systemd/boot/efi/linuxx64.efi.stub",
                 "--source", "model", "--offline")
    assert result.returncode == 2
    assert "live PCRs" in result.stderr


def test_non_uki_is_refused_when_the_boot_measured_a_kernel(tmp_path, config):
    esp = tmp_path / "esp" / "EFI" / "redhat"
    esp.mkdir(parents=True)
    (esp / "shimx64.efi").write_bytes(Path("/usr/lib/shim/shimx64.efi.signed").read_bytes())
    result = cli("--config", config, "predict", "--uki", "/usr/lib/systemd/boot/efi/linuxx64.efi.stub",
                 "--event-log", str(BOOT_A / "eventlog.bin"), "--source", "log",
                 "--pcrs-from", str(BOOT_A / "pcrs.txt"))
    assert result.returncode == 2
    assert "no .linux section" in result.stderr


def test_bad_pcr_file_is_bad_input(tmp_path, config):
    pcrs = tmp_path / "pcrs.txt"
    pcrs.write_text("sha256 4 abcd\n")
    result = cli("--config", config, "predict", "--uki", "/usr/lib/systemd/boot/efi/linuxx64.efi.stub",
                 "--pcrs-from", str(pcrs))
    assert result.returncode == 2
    assert "line 1" in result.stderr


def test_config_with_unknown_key_is_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("tmp: device:/dev/tpm0\n")
    result = cli("predict", "--uki", "x", "--offline", env={"RHEL_CVM_UPDATE_CONFIG": str(path)})
    assert result.returncode == 2
    assert "unknown key(s) tmp" in result.stderr
