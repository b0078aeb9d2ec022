"""`rhel-cvm-update reseal` and `enroll` as a user runs them (a subprocess, a config file)."""

import json
import subprocess
import sys

import pytest

from tests.swtpm_fixtures import TEST_PASSPHRASE, fresh_swtpm, luks2_image, luks2_template, swtpm  # noqa: F401

pytestmark = [pytest.mark.swtpm, pytest.mark.root]


def _cli(config_file, *argv, stdin=b""):
    return subprocess.run([sys.executable, "-m", "rhel_cvm_update", "--config", str(config_file), *argv],
                          input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)


@pytest.fixture
def config_file(fresh_swtpm, luks2_image, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(f"tpm: '{fresh_swtpm.tcti}'\nluks_device: {luks2_image}\nstate_dir: {tmp_path / 'state'}\n")
    return path


def _pcr_args(swtpm):
    return [arg for pcr, value in sorted(swtpm.read_sha256([4, 7]).items()) for arg in ("--pcr", f"{pcr}={value.hex()}")]


def test_reseal_with_key_on_stdin_then_reuse(config_file, fresh_swtpm, tmp_path):
    pcr_args = _pcr_args(fresh_swtpm)
    dry = _cli(config_file, "reseal", "--dry-run", "--json", "--key-file", "-", *pcr_args, stdin=TEST_PASSPHRASE)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["action"] == "would-add"
    added = _cli(config_file, "reseal", "--json", "--key-file", "-", *pcr_args, stdin=TEST_PASSPHRASE)
    assert added.returncode == 0, added.stderr
    result = json.loads(added.stdout)
    assert result["action"] == "added" and result["unlocked_with"] == "key-file"
    assert json.loads((tmp_path / "state" / "last-reseal.json").read_text())["keyslot"] == result["keyslot"]
    again = _cli(config_file, "reseal", *pcr_args)
    assert again.returncode == 0, again.stderr
    assert b"is already sealed to PCRs 4,7" in again.stdout


@pytest.mark.parametrize("argv,message", [
    (["reseal", "--key-file", "/etc/passphrase", "--pcr", "4=" + "0" * 64, "--pcr", "7=" + "0" * 64],
     b"--key-file takes only '-'"),
    (["reseal", "--pcr", "4=00"], b"expected N=HEX"),
    (["enroll"], b"enroll needs --from-tpm2-import"),
    (["enroll", "--from-tpm2-import"], b"no tpm2-import token to convert"),
])
def test_usage_errors_exit_2(config_file, argv, message):
    result = _cli(config_file, *argv)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_no_matching_token_is_a_machine_error(config_file, fresh_swtpm):
    result = _cli(config_file, "reseal", *_pcr_args(fresh_swtpm))
    assert result.returncode == 3 and b"no systemd-tpm2 token is sealed to the current PCRs" in result.stderr
