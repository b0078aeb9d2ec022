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


ZERO_PCRS = ["--pcr", "4=" + "0" * 64, "--pcr", "7=" + "0" * 64]


def _unreachable_tpm_config(tmp_path, device):
    path = tmp_path / "unreachable.yaml"
    path.write_text(f"tpm: 'swtpm:host=127.0.0.1,port=1'\nluks_device: {device}\nstate_dir: {tmp_path / 'state'}\n")
    return path


def test_reseal_on_a_non_luks_file_exits_2_before_the_tpm(tmp_path):
    """The device is checked first: one line naming the file and offset, no libtss2 noise
    (the TPM here is unreachable and never opened), nothing written anywhere."""
    device = tmp_path / "not-luks.img"
    device.write_bytes(b"\x00" * 65536)
    result = _cli(_unreachable_tpm_config(tmp_path, device), "reseal", *ZERO_PCRS)
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode().splitlines() == [
        f"rhel-cvm-update: {device} at offset 0x0: magic: not a LUKS device (wrong magic)"]
    assert device.read_bytes() == b"\x00" * 65536
    assert not (tmp_path / "state").exists()


def test_unreachable_tpm_is_one_line_without_libtss2_noise(tmp_path, luks2_image):
    result = _cli(_unreachable_tpm_config(tmp_path, luks2_image), "reseal", *ZERO_PCRS)
    assert result.returncode == 3
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "cannot open TPM 'swtpm:host=127.0.0.1,port=1'" in lines[0], lines
    assert "is a TPM simulator listening at host=127.0.0.1,port=1?" in lines[0]
    recorded = json.loads((tmp_path / "state" / "last-reseal.json").read_text())
    assert recorded["outcome"] == "failed" and recorded["kind"] == "machine" and recorded["command"] == "reseal"


def test_writing_commands_exit_4_while_the_lock_is_held(config_file, fresh_swtpm, luks2_image, tmp_path):
    """An admin's reseal or enroll during a path-unit update waits for nothing and writes
    nothing: exit 4, the header unchanged."""
    from rhel_cvm_update.journal import state_lock
    from tests.swtpm_fixtures import header_bytes

    before = header_bytes(luks2_image)
    with state_lock(str(tmp_path / "state")):
        for argv in (["reseal", "--key-file", "-", *_pcr_args(fresh_swtpm)], ["enroll", "--from-tpm2-import"]):
            result = _cli(config_file, *argv, stdin=TEST_PASSPHRASE)
            assert result.returncode == 4, result.stderr
            assert b"another rhel-cvm-update transaction holds" in result.stderr
        # A dry run writes nothing and needs no lock.
        dry = _cli(config_file, "reseal", "--dry-run", "--key-file", "-", *_pcr_args(fresh_swtpm),
                   stdin=TEST_PASSPHRASE)
        assert dry.returncode == 0, dry.stderr
    assert header_bytes(luks2_image) == before
    assert not (tmp_path / "state" / "last-reseal.json").exists()
