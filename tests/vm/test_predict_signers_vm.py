"""The signer chain end to end through the command line, as the daemon predicts: rebuild each
boot's shim (Debian's file with its Microsoft signatures selected, or re-signed by the committed
test CAs) and UKI, lay out the ESP and efivarfs of boot A with A's chain on it, and run
`predict --source log|model|auto` for B's shim and UKI against A's event log and PCRs.  The
answer must be the PCRs the TPM held when B really booted (tests/data/boots/sb2-*)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import realbins
from tests.vm import capture, signing
from tests.test_predict_golden import RUNTIME_UPDATES, SIGNER_PAIRS
from tests.vm.test_capture_fixtures import boot_json, read_pcrs

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[2]
BOOTS = REPO / "tests" / "data" / "boots"


def pcrs(name):
    return read_pcrs(BOOTS / name / "pcrs.txt")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Each chain boot's shim and UKI rebuilt, checked against what the capture recorded."""
    if not capture.SHIM_SIGNED.exists():
        pytest.skip(f"{capture.SHIM_SIGNED} is not installed")
    work = tmp_path_factory.mktemp("signers")
    cas = signing.load_test_cas()
    ukis = {}
    for tag, ca in cas.items():
        (work / tag).mkdir()
        ukis[tag] = capture.build_uki(capture.UKI_A, work / tag, (ca.leaf_key, ca.leaf_cert)).path
    files = {}
    for scenario in capture.SIGNER_SCENARIOS:
        record = boot_json(scenario.name)
        if record["uki"]["authenticode_sha256"] != realbins.pesign_digest(ukis[scenario.signing.uki_signer]):
            pytest.skip("the rebuilt UKI A is not the captured one (kernel package changed?)")
        shim = signing.build_shim(capture.SHIM_SIGNED, scenario.signing, cas, work / (scenario.name + ".efi"))
        assert realbins.pesign_digest(shim) == record["shim"]["authenticode_sha256"], scenario.name
        files[scenario.name] = (shim, ukis[scenario.signing.uki_signer])
    return work, files


def machine(work: Path, files, now: str, then: str) -> dict:
    """Boot ``now``'s machine: its shim and UKI on the ESP where its boot entry points, its
    efivarfs (plus what was written at runtime before ``then``), its event log."""
    root = work / ("%s--%s" % (now, then))
    esp = root / "esp"
    (esp / "EFI" / "redhat").mkdir(parents=True)
    (esp / "EFI" / "Linux").mkdir(parents=True)
    shim, uki = files[now]
    shutil.copy(shim, esp / "EFI" / "redhat" / "shimx64.efi")
    shutil.copy(uki, esp / "EFI" / "Linux" / "uki-a.efi")
    next_shim, next_uki = root / "shimx64.efi.new", esp / "EFI" / "Linux" / "uki-next.efi"
    shutil.copy(files[then][0], next_shim)
    shutil.copy(files[then][1], next_uki)
    efivars = root / "efivars"
    shutil.copytree(BOOTS / now / "efivars", efivars)
    for name in RUNTIME_UPDATES.get((now, then), ()):
        for updated in (BOOTS / then / "efivars").glob(name + "-*"):
            shutil.copy(updated, efivars / updated.name)
    config = root / "config.yaml"
    config.write_text(f"esp: {esp}\nefivars: {efivars}\nuki_dir: {esp / 'EFI' / 'Linux'}\n"
                      f"event_log: {BOOTS / now / 'eventlog.bin'}\n")
    return {"config": config, "shim": next_shim, "uki": next_uki, "pcrs": BOOTS / now / "pcrs.txt"}


def predict(m, source):
    return subprocess.run(
        [sys.executable, "-m", "rhel_cvm_update", "--config", str(m["config"]), "predict",
         "--uki", str(m["uki"]), "--shim", str(m["shim"]), "--pcrs-from", str(m["pcrs"]),
         "--source", source, "--json"],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ))


@pytest.mark.parametrize("now,then", SIGNER_PAIRS)
def test_every_source_predicts_the_real_next_boot_or_says_why_not(chain, now, then):
    work, files = chain
    m = machine(work, files, now, then)
    want = {"pcr4": pcrs(then)[("sha256", 4)], "pcr7": pcrs(then)[("sha256", 7)]}
    for source in ("log", "model", "auto"):
        result = predict(m, source)
        if source == "model" and (now, then) in RUNTIME_UPDATES:
            # dbx changed after this boot measured it: refusing is the only right answer.
            assert result.returncode == 2 and "does not reproduce live PCR7" in result.stderr, result.stderr
            continue
        assert result.returncode == 0, (source, result.stderr)
        out = json.loads(result.stdout)
        assert {"pcr4": out["pcr4"], "pcr7": out["pcr7"]} == want, (source, out.get("notes"))
        assert out["banks"]["sha1"] == {"4": pcrs(then)[("sha1", 4)], "7": pcrs(then)[("sha1", 7)]}
        if source == "auto":
            assert out["source"] == "log"
            assert out["agreed"] is (None if (now, then) in RUNTIME_UPDATES else True), out["notes"]
