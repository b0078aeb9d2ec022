"""End to end through the command line on real files: rebuild the UKIs of the captured
Secure-Boot-off boots, lay out an ESP and an efivarfs copy as the booted VM had them, and
predict boot B from boot A with each source.  The answer must equal the PCRs the TPM held
when B really booted (tests/data/boots/sb-off-uki-b/pcrs.txt)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm import capture

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[2]
BOOTS = REPO / "tests" / "data" / "boots"


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """The ESP, efivarfs and config of the VM while it runs boot sb-off-uki-a."""
    root = tmp_path_factory.mktemp("vm")
    esp = root / "esp"
    (esp / "EFI" / "redhat").mkdir(parents=True)
    (esp / "EFI" / "Linux").mkdir(parents=True)
    shutil.copy(capture.SHIM_SIGNED, esp / "EFI" / "redhat" / "shimx64.efi")
    for spec, boot in ((capture.UKI_A, "sb-off-uki-a"), (capture.UKI_B, "sb-off-uki-b")):
        built = capture.build_uki(spec, root, None)
        recorded = json.loads((BOOTS / boot / "boot.json").read_text())["uki"]["authenticode_sha256"]
        if built.record["authenticode_sha256"] != recorded:
            pytest.skip(f"the rebuilt UKI {spec.name} is not the captured one (kernel package changed?)")
        shutil.copy(built.path, esp / "EFI" / "Linux" / f"uki-{spec.name}.efi")
    efivars = root / "efivars"
    shutil.copytree(BOOTS / "sb-off-uki-a" / "efivars", efivars)
    config = root / "config.yaml"
    config.write_text(f"esp: {esp}\nefivars: {efivars}\nuki_dir: {esp / 'EFI' / 'Linux'}\n"
                      f"event_log: {BOOTS / 'sb-off-uki-a' / 'eventlog.bin'}\n")
    return {"esp": esp, "config": config}


def predict(machine, *args):
    result = subprocess.run(
        [sys.executable, "-m", "rhel_cvm_update", "--config", str(machine["config"]), "predict",
         "--uki", str(machine["esp"] / "EFI" / "Linux" / "uki-b.efi"),
         "--pcrs-from", str(BOOTS / "sb-off-uki-a" / "pcrs.txt"), *args],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    return result.stdout


def expected():
    lines = (BOOTS / "sb-off-uki-b" / "pcrs.txt").read_text().splitlines()
    values = dict((tuple(line.split()[:2]), line.split()[2]) for line in lines if not line.startswith("#"))
    return {"pcr4": values[("sha256", "4")], "pcr7": values[("sha256", "7")],
            "sha1": {"4": values[("sha1", "4")], "7": values[("sha1", "7")]}}


@pytest.mark.parametrize("source", ["log", "model"])
def test_cli_prediction_equals_the_real_boot_of_uki_b(machine, source):
    out = json.loads(predict(machine, "--source", source, "--json"))
    want = expected()
    assert out["source"] == source
    assert (out["pcr4"], out["pcr7"]) == (want["pcr4"], want["pcr7"])
    assert out["banks"]["sha1"] == want["sha1"]  # every bank, not just the sealed one


def test_auto_falls_back_to_the_model_when_the_log_does_not_explain_the_pcrs(machine):
    # The log of another boot: it parses, but does not replay to this boot's PCRs.
    out = json.loads(predict(machine, "--event-log", str(BOOTS / "sb-off-uki-b" / "eventlog.bin"), "--json"))
    assert out["source"] == "model"
    assert (out["pcr4"], out["pcr7"]) == (expected()["pcr4"], expected()["pcr7"])
    assert any("event log was not used" in n and "PCR4" in n for n in out["notes"])


def test_auto_falls_back_to_the_model_when_the_log_is_missing(machine, tmp_path):
    out = json.loads(predict(machine, "--event-log", str(tmp_path / "absent.bin"), "--json"))
    assert out["source"] == "model" and out["pcr4"] == expected()["pcr4"]


def test_explain_gives_the_origin_of_every_digest(machine):
    text = predict(machine, "--source", "log", "--explain")
    assert "uki-b.efi" in text and ".linux payload" in text and "unchanged" in text
