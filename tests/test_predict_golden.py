"""Predictions checked against real boots: OVMF + swtpm + Debian shim + UKIs, captured by
tests/vm/capture.py into tests/data/boots/.  Predicting boot B from the log (or the Secure
Boot variables) and live PCRs of boot A must give exactly the PCRs captured when B booted.

Digests of the images come from boot.json, where the capture recorded them with pesign
(an implementation independent of this project); tests/vm/test_predict_vm.py repeats this
end to end from the rebuilt files through the CLI.
"""

import json
import os
from pathlib import Path

import pytest

from rhel_cvm_update.boot_events import ImageMeasurement
from rhel_cvm_update.commands.predict import read_pcr_file
from rhel_cvm_update.errors import PredictionError
from rhel_cvm_update.formats.tcglog import parse_event_log
from rhel_cvm_update.measure import measure_image
from rhel_cvm_update.predict_log import predict_from_log
from rhel_cvm_update.predict_model import predict_from_model

BOOTS = Path(__file__).parent / "data" / "boots"
SIGNED_SHIM = "/usr/lib/shim/shimx64.efi.signed"
UNSIGNED_SHIM = "/usr/lib/shim/shimx64.efi"


class Boot:
    def __init__(self, name: str):
        self.dir = BOOTS / name
        if not (self.dir / "boot.json").exists():
            pytest.skip(f"no captured boot {name}")
        self.info = json.loads((self.dir / "boot.json").read_text())
        self.log = parse_event_log((self.dir / "eventlog.bin").read_bytes(), source=f"{name}/eventlog.bin")
        self.pcrs = read_pcr_file(str(self.dir / "pcrs.txt"))
        self.efivars = {}
        for f in (self.dir / "efivars").iterdir():
            name_part, guid = f.name.split("-", 1)
            self.efivars[(name_part, guid)] = f.read_bytes()[4:]  # drop the attribute prefix

    def live(self):
        return {b: {p: v[p] for p in (4, 7)} for b, v in self.pcrs.items()}

    def signer_certs(self):
        if not self.info["uki"].get("signed"):
            return ()
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        pem = (self.dir / self.info["db_cert"]["file"]).read_bytes()
        return (x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER),)

    def uki(self) -> ImageMeasurement:
        uki = self.info["uki"]
        return ImageMeasurement(
            path=uki["esp_path"], authenticode={"sha256": bytes.fromhex(uki["authenticode_sha256"])},
            linux_authenticode={"sha256": bytes.fromhex(uki["linux_section"]["authenticode_sha256"])},
            signatures=(self.signer_certs(),) if self.signer_certs() else ())

    def shim(self) -> ImageMeasurement:
        """The captured shim as recorded (pesign digest), with its certificates and
        .sbatlevel from the installed Debian file it was copied from."""
        shim = self.info["shim"]
        installed = SIGNED_SHIM if "shim-signed" in shim["package"] else UNSIGNED_SHIM
        if not os.path.exists(installed):
            pytest.skip(f"{installed} is not installed")
        real = measure_image(installed, ["sha256"])
        if real.authenticode["sha256"].hex() != shim["authenticode_sha256"]:
            pytest.skip(f"installed {installed} is not the shim captured in {self.dir.name}")
        return real

    def expected(self):
        return {p: self.pcrs["sha256"][p] for p in (4, 7)}


LOG_PAIRS = [("sb-off-uki-a", "sb-off-uki-b"), ("sb-off-uki-b", "sb-off-uki-a"),
             ("sb-on-uki-a", "sb-on-uki-b"), ("sb-on-uki-b", "sb-on-uki-a"),
             ("sb-off-uki-a", "sb-off-shim-b-uki-a"), ("sb-off-shim-b-uki-a", "sb-off-uki-b")]


@pytest.mark.parametrize("now,then", LOG_PAIRS)
def test_log_prediction_equals_the_real_next_boot(now, then):
    current, following = Boot(now), Boot(then)
    prediction = predict_from_log(current.log, current.live(), following.shim(), following.uki(),
                                  booted_shim=current.shim(), efivars_now=current.efivars)
    assert {p: prediction.pcrs[p] for p in (4, 7)} == following.expected()
    assert prediction.checked_against == "tpm"


@pytest.mark.parametrize("name", sorted(p.parent.name for p in BOOTS.glob("*/boot.json")))
def test_each_captured_log_predicts_its_own_boot(name):
    boot = Boot(name)
    prediction = predict_from_log(boot.log, boot.live(), boot.shim(), boot.uki(),
                                  booted_shim=boot.shim(), efivars_now=boot.efivars)
    assert {p: prediction.pcrs[p] for p in (4, 7)} == boot.expected()


@pytest.mark.parametrize("now,then", LOG_PAIRS)
def test_model_prediction_equals_the_real_next_boot(now, then):
    current, following = Boot(now), Boot(then)
    prediction = predict_from_model(current.efivars, current.live(), current.shim(), current.uki(),
                                    following.shim(), following.uki())
    assert {p: prediction.pcrs[p] for p in (4, 7)} == following.expected()


def test_secure_boot_log_refuses_an_unsigned_uki():
    current, unsigned = Boot("sb-on-uki-a"), Boot("sb-off-uki-b")
    with pytest.raises(PredictionError, match="unsigned"):
        predict_from_log(current.log, current.live(), current.shim(), unsigned.uki(),
                         efivars_now=current.efivars)


def test_log_of_another_boot_is_refused():
    current, other = Boot("sb-off-uki-a"), Boot("sb-off-uki-b")
    with pytest.raises(PredictionError, match="PCR4"):
        predict_from_log(current.log, other.live(), current.shim(), other.uki())
