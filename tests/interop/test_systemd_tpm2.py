"""Tokens crossing between this project and real systemd 252 (Debian 12) on swtpm.

1. A token enrolled by systemd-cryptenroll is unsealed by this code and used to add a
   keyslot sealed to predicted values.
2. A token this code sealed to predicted values is unlocked by systemd's own cryptsetup
   token plugin once the swtpm PCRs are extended to exactly those values, and refused
   before (the plugin reaches swtpm through a pty relay in a private mount namespace).
3. systemd-cryptsetup attach with tpm2-device=swtpm:... unseals it (and then fails at
   activation for lack of device-mapper).
"""

import hashlib
import os
import subprocess

import pytest

from rhel_cvm_update.adapters.cryptsetup import Cryptsetup
from rhel_cvm_update.config import config_from_mapping
from rhel_cvm_update.reseal import reseal
from rhel_cvm_update.secrets import Secret
from tests.swtpm_fixtures import TEST_PASSPHRASE, PtyTpmRelay, missing_tools

tpm_adapter = pytest.importorskip("rhel_cvm_update.adapters.tpm")

pytestmark = [pytest.mark.swtpm, pytest.mark.root]

SYSTEMD_CRYPTSETUP = "/lib/systemd/systemd-cryptsetup"
PLUGIN = "/usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so"
NEXT_BOOT = [(4, b"shim 15.8"), (4, b"vmlinuz-5.14.0-362.uki"), (7, b"db cert for shim")]


def _require(*tools):
    missing = missing_tools(tools)
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def _boot(swtpm):
    for pcr, what in NEXT_BOOT:
        swtpm.extend(pcr, hashlib.sha256(what).digest())


def _predicted(swtpm):
    swtpm.power_cycle()
    _boot(swtpm)
    values = swtpm.read_sha256([4, 7])
    swtpm.power_cycle()
    return values


def _config(swtpm, image, tmp_path):
    return config_from_mapping({"tpm": swtpm.tcti, "luks_device": image, "state_dir": str(tmp_path / "state")})


def _seal_to_prediction(swtpm, image, tmp_path):
    target = _predicted(swtpm)
    with tpm_adapter.Tpm(swtpm.tcti) as tpm, Secret(bytearray(TEST_PASSPHRASE)) as key:
        result = reseal(_config(swtpm, image, tmp_path), Cryptsetup(image), tpm, pcr_values=target, key=key)
    assert result["action"] == "added"
    return result


def test_cryptenroll_token_unlocks_our_reseal(fresh_swtpm, luks2_image, tmp_path):
    _require("systemd-cryptenroll")
    fresh_swtpm.extend(4, hashlib.sha256(b"current shim").digest())
    fresh_swtpm.extend(7, hashlib.sha256(b"current db").digest())
    enroll = subprocess.run(["systemd-cryptenroll", f"--tpm2-device={fresh_swtpm.tcti}", "--tpm2-pcrs=4+7",
                             luks2_image], env=dict(os.environ, PASSWORD=TEST_PASSPHRASE.decode()),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert enroll.returncode == 0, enroll.stderr
    fresh_swtpm.flush_all()
    luks = Cryptsetup(luks2_image)
    theirs = luks.metadata().systemd_tpm2_tokens()
    assert list(theirs) == [0] and theirs[0].primary_alg == "ecc" and theirs[0].tool_record is None
    # Our model writes back exactly what systemd wrote.
    assert theirs[0].to_json() == luks.export_token(0)

    target = {4: hashlib.sha256(b"p4").digest(), 7: hashlib.sha256(b"p7").digest()}
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        result = reseal(_config(fresh_swtpm, luks2_image, tmp_path), luks, tpm, pcr_values=target)
    assert result["action"] == "added" and result["unlocked_with"] == "token 0"
    assert sorted(luks.metadata().keyslots) == [0, theirs[0].keyslot, result["keyslot"]]
    assert result["keyslot"] not in (0, theirs[0].keyslot)


def test_systemd_token_plugin_unlocks_only_at_predicted_pcrs(fresh_swtpm, luks2_image, tmp_path):
    _require("unshare", "mount")
    if not os.path.exists(PLUGIN):
        pytest.skip(f"systemd's cryptsetup token plugin is not installed ({PLUGIN})")
    result = _seal_to_prediction(fresh_swtpm, luks2_image, tmp_path)
    argv = ["cryptsetup", "open", "--test-passphrase", "--token-only", "--token-type", "systemd-tpm2",
            "--token-id", str(result["token"]), luks2_image]
    work = tmp_path / "ns"
    work.mkdir()
    with PtyTpmRelay(fresh_swtpm) as relay:
        before = relay.run(argv, str(work))
        fresh_swtpm.flush_all()
        assert before.returncode != 0, "unlocked although the PCRs are not the predicted ones"
        assert relay.commands > 0, "the plugin never reached the TPM: the refusal proves nothing"
        _boot(fresh_swtpm)
        after = relay.run(argv, str(work))
        fresh_swtpm.flush_all()
    assert after.returncode == 0, after.stderr.decode()


def test_systemd_cryptsetup_attach_unseals(fresh_swtpm, luks2_image, tmp_path):
    if not os.path.exists(SYSTEMD_CRYPTSETUP):
        pytest.skip(f"{SYSTEMD_CRYPTSETUP} not installed")
    result = _seal_to_prediction(fresh_swtpm, luks2_image, tmp_path)
    _boot(fresh_swtpm)
    option = f"tpm2-device=swtpm:host=127.0.0.1\\,port={fresh_swtpm.port}"
    attach = subprocess.run([SYSTEMD_CRYPTSETUP, "attach", "rhel-cvm-update-test", luks2_image, "-", option],
                            env=dict(os.environ, SYSTEMD_LOG_LEVEL="debug"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    fresh_swtpm.flush_all()
    log = attach.stderr
    assert "Unsealing HMAC key." in log and "Completed TPM2 key unsealing" in log, log[-3000:]
    # The unsealed key is then offered to exactly our keyslot; only device-mapper is missing.
    assert f"Activating volume rhel-cvm-update-test [keyslot {result['keyslot']}] using passphrase." in log
