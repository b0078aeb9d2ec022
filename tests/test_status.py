"""`status` on the sandbox CVM: exit codes, what it reports, and that it needs no TPM."""

import json
import os
import subprocess
import sys

import pytest

from rhel_cvm_update.journal import LiveReading
from rhel_cvm_update.status import live_pcrs
from rhel_cvm_update.transaction import run_update
from tests.sandbox import captured_pcrs, sandbox  # noqa: F401  (fixture)

pytestmark = [pytest.mark.swtpm, pytest.mark.root]


def status(config_path, *argv):
    run = subprocess.run([sys.executable, "-m", "rhel_cvm_update", "--config", str(config_path), "status", *argv],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    return run.returncode, (json.loads(run.stdout) if "--json" in argv else run.stdout)


def test_fresh_vm_will_unlock_without_the_tpm(sandbox):
    cvm = sandbox
    cvm.swtpm.stop()  # status must not need it
    code, document = status(cvm.config_path, "--json")
    assert code == 0, document["attention"]
    assert document["booted"] == {"entry": "Boot0007", "uki": "\\EFI\\Linux\\uki-a.efi"}
    assert document["live_pcrs"]["source"] == "event-log"
    assert document["live_pcrs"]["sha256"] == {str(p): v.hex() for p, v in captured_pcrs("sb-off-uki-a").items()}
    (token,) = document["tokens"]
    assert token["token"] == 0 and token["matches_current_boot"] and token["keyslots"] == [1]
    assert document["next_boot"]["will_unlock"]
    # systemd-cryptenroll's token is not adopted until a transaction ran; the recovery
    # passphrase never is.
    assert document["unaccounted"][-1].startswith("keyslot 0:")
    code, text = status(cvm.config_path)
    assert code == 0 and "Booted: \\EFI\\Linux\\uki-a.efi via Boot0007" in text


def test_unsealed_new_uki_needs_attention_until_updated(sandbox):
    cvm = sandbox
    cvm.install_uki("b")
    code, document = status(cvm.config_path, "--json")
    assert code == 1 and any("run 'rhel-cvm-update update'" in a for a in document["attention"])
    run_update(cvm.config())
    code, document = status(cvm.config_path, "--json")
    assert code == 0, document["attention"]
    assert document["staged"]["entry"] == document["boot_next"] == document["next_boot"]["entry"]
    staged = [t for t in document["tokens"] if t["matches_staged_boot"]]
    assert [t["uki"] for t in staged] == [str(cvm.uki_dir / "uki-b.efi")]
    assert document["last_result"]["outcome"] == "staged"


def test_unreadable_luks_device_is_an_error(sandbox):
    cvm = sandbox
    os.rename(cvm.luks, str(cvm.luks) + ".gone")
    code, document = status(cvm.config_path, "--json")
    assert code == 2 and document["errors"]


def test_live_pcrs_prefer_sysfs_then_log_then_journal(sandbox, tmp_path):
    cvm = sandbox
    config = cvm.config()
    sysfs = tmp_path / "pcr-sha256"
    sysfs.mkdir()
    b = captured_pcrs("sb-off-uki-b")  # what a guest kernel really printed for boot B
    for pcr, value in b.items():
        (sysfs / str(pcr)).write_text(value.hex().upper() + "\n")
    assert live_pcrs(config, None, str(sysfs)) == (b, "sysfs")
    assert live_pcrs(config, None, str(tmp_path / "absent")) == (captured_pcrs("sb-off-uki-a"), "event-log")
    os.unlink(cvm.event_log)
    recorded = LiveReading(pcrs={"4": "11" * 32, "7": "22" * 32}, read="2026-01-01T00:00:00Z")
    assert live_pcrs(config, recorded, str(tmp_path / "absent")) == (
        {4: b"\x11" * 32, 7: b"\x22" * 32}, "recorded 2026-01-01T00:00:00Z")
    assert live_pcrs(config, None, str(tmp_path / "absent")) == (None, "unknown")


def test_ambiguous_header_is_reported_not_crashed_on(sandbox):
    """A second systemd-tpm2 token on systemd-cryptenroll's keyslot: retiring either would
    kill the other's keyslot, so status reports an error and update refuses to touch it."""
    from tests.swtpm_fixtures import header_bytes, import_token_raw

    cvm = sandbox
    token = cvm.luks_json()["tokens"]["0"]
    import_token_raw(str(cvm.luks), token, 5)
    code, document = status(cvm.config_path, "--json")
    assert code == 2 and any("ambiguous" in e for e in document["errors"])
    assert document["booted"]["entry"] == "Boot0007"  # what it could read is still there
    cvm.install_uki("b")
    header = header_bytes(str(cvm.luks))
    update = subprocess.run([sys.executable, "-m", "rhel_cvm_update", "--config", str(cvm.config_path), "update"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert update.returncode == 2 and "ambiguous" in update.stderr
    assert header_bytes(str(cvm.luks)) == header
