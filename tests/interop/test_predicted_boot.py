"""The whole chain on real boots, without a VM: a captured OVMF boot A (event log + PCRs,
tests/data/boots) is replayed into swtpm; the project predicts boot B from A's log;
reseal seals to that prediction; then swtpm is "rebooted" into B's real captured log and
systemd 252's own token plugin must unlock the token -- and must refuse it while the
swtpm still holds boot A."""

import pytest

from rhel_cvm_update.adapters.cryptsetup import Cryptsetup
from rhel_cvm_update.config import config_from_mapping
from rhel_cvm_update.predict_log import predict_from_log
from rhel_cvm_update.reseal import reseal
from rhel_cvm_update.secrets import Secret
from tests.interop.test_systemd_tpm2 import PLUGIN
from tests.swtpm_fixtures import TEST_PASSPHRASE, PtyTpmRelay, missing_tools

tpm_adapter = pytest.importorskip("rhel_cvm_update.adapters.tpm")
golden = pytest.importorskip("tests.test_predict_golden")

pytestmark = [pytest.mark.swtpm, pytest.mark.root]


def _replay(swtpm, boot):
    """Extend PCR4 and PCR7 with the sha1 and sha256 digests of boot's real event log."""
    swtpm.power_cycle()
    for event in boot.log.events:
        if event.pcr in (4, 7):
            swtpm.extend_banks(event.pcr, {b: d for b, d in event.digests.items() if b in ("sha1", "sha256")})
    assert swtpm.read_sha256([4, 7]) == boot.expected(), f"replaying {boot.dir.name} did not give its PCRs"


@pytest.mark.parametrize("now,then", [("sb-off-uki-a", "sb-off-uki-b"), ("sb-off-uki-a", "sb-off-shim-b-uki-a")])
def test_sealed_to_prediction_unlocks_in_the_real_next_boot(fresh_swtpm, luks2_image, tmp_path, now, then):
    if missing_tools(["unshare", "mount"]):
        pytest.skip("unshare/mount not available")
    import os
    if not os.path.exists(PLUGIN):
        pytest.skip(f"systemd's token plugin is not installed ({PLUGIN})")
    current, following = golden.Boot(now), golden.Boot(then)
    prediction = predict_from_log(current.log, current.live(), following.shim(), following.uki(),
                                  booted_shim=current.shim(), efivars_now=current.efivars)
    _replay(fresh_swtpm, current)

    config = config_from_mapping({"tpm": fresh_swtpm.tcti, "luks_device": luks2_image,
                                  "state_dir": str(tmp_path / "state")})
    luks = Cryptsetup(luks2_image)
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        with Secret(bytearray(TEST_PASSPHRASE)) as key:
            enrolled = reseal(config, luks, tpm, pcr_values=tpm.read_pcrs([4, 7]), key=key)
        result = reseal(config, luks, tpm, pcr_values={p: prediction.pcrs[p] for p in (4, 7)})
    assert result["unlocked_with"] == f"token {enrolled['token']}"

    argv = ["cryptsetup", "open", "--test-passphrase", "--token-only", "--token-type", "systemd-tpm2",
            "--token-id", str(result["token"]), luks2_image]
    work = tmp_path / "ns"
    work.mkdir()
    with PtyTpmRelay(fresh_swtpm) as relay:
        refused = relay.run(argv, str(work))
        fresh_swtpm.flush_all()
        assert refused.returncode != 0 and relay.commands > 0
        _replay(fresh_swtpm, following)
        unlocked = relay.run(argv, str(work))
        fresh_swtpm.flush_all()
    assert unlocked.returncode == 0, unlocked.stderr.decode()


@pytest.fixture(scope="module")
def uki_b(tmp_path_factory):
    """UKI B rebuilt reproducibly the way tests/vm/capture.py built it for the capture."""
    capture = pytest.importorskip("tests.vm.capture")
    boot = golden.Boot("sb-off-uki-b")
    work = tmp_path_factory.mktemp("uki-b")
    try:
        built = capture.build_uki(capture.UKI_B, work, None)
    except Exception as e:  # the kernel package may be neither cached nor downloadable
        pytest.skip(f"cannot rebuild UKI B: {e}")
    if built.record["authenticode_sha256"] != boot.info["uki"]["authenticode_sha256"]:
        pytest.skip("the rebuilt UKI B is not the captured one (kernel or stub changed)")
    return built.path


def test_cli_reseal_predicts_from_the_log_and_the_real_next_boot_unlocks(fresh_swtpm, luks2_image, tmp_path, uki_b):
    """`rhel-cvm-update reseal --key-file -` on a machine that is boot A (its real log,
    efivars and PCRs) with UKI B on the ESP: the prediction must equal the PCRs captured
    when B really booted, and systemd's plugin must unlock in B."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    if not os.path.exists(PLUGIN) or missing_tools(["unshare", "mount"]):
        pytest.skip("systemd's token plugin or unshare/mount not available")
    current, following = golden.Boot("sb-off-uki-a"), golden.Boot("sb-off-uki-b")
    following.shim()  # skips unless the installed shim is the captured one
    esp = tmp_path / "esp"
    (esp / "EFI" / "redhat").mkdir(parents=True)
    (esp / "EFI" / "Linux").mkdir(parents=True)
    shutil.copyfile(golden.SIGNED_SHIM, esp / "EFI" / "redhat" / "shimx64.efi")
    shutil.copyfile(uki_b, esp / "EFI" / "Linux" / "uki-b.efi")
    shutil.copytree(current.dir / "efivars", tmp_path / "efivars")
    config = tmp_path / "config.yaml"
    config.write_text(f"tpm: '{fresh_swtpm.tcti}'\nluks_device: {luks2_image}\nstate_dir: {tmp_path / 'state'}\n"
                      f"event_log: {current.dir / 'eventlog.bin'}\nefivars: {tmp_path / 'efivars'}\n"
                      f"esp: {esp}\nuki_dir: {esp / 'EFI' / 'Linux'}\n")
    _replay(fresh_swtpm, current)

    run = subprocess.run([sys.executable, "-m", "rhel_cvm_update", "--config", str(config), "reseal",
                          "--key-file", "-", "--json"], input=TEST_PASSPHRASE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=300)
    assert run.returncode == 0, run.stderr.decode()
    result = json.loads(run.stdout)
    assert result["source"] == "log" and result["uki"] == str(esp / "EFI" / "Linux" / "uki-b.efi")
    assert result["pcrs"] == {str(p): v.hex() for p, v in following.expected().items()}

    argv = ["cryptsetup", "open", "--test-passphrase", "--token-only", "--token-type", "systemd-tpm2",
            "--token-id", str(result["token"]), luks2_image]
    work = tmp_path / "ns"
    work.mkdir()
    with PtyTpmRelay(fresh_swtpm) as relay:
        _replay(fresh_swtpm, following)
        unlocked = relay.run(argv, str(work))
        fresh_swtpm.flush_all()
    assert unlocked.returncode == 0, unlocked.stderr.decode()
