"""Predictions checked against real boots: OVMF + swtpm + Debian shim + UKIs, captured by
tests/vm/capture.py into tests/data/boots/.  Predicting boot B from the log (or the Secure
Boot variables) and live PCRs of boot A must give exactly the PCRs captured when B booted.

Digests of the images come from boot.json, where the capture recorded them with pesign
(an implementation independent of this project); tests/vm/test_predict_vm.py repeats this
end to end from the rebuilt files through the CLI.
"""

import dataclasses
import json
import os
from pathlib import Path

import pytest

from rhel_cvm_update.authority import ImageRefusedError
from rhel_cvm_update.boot_events import ImageMeasurement
from rhel_cvm_update.commands.predict import read_pcr_file
from rhel_cvm_update.errors import PredictionError
from rhel_cvm_update.formats.tcglog import parse_event_log
from rhel_cvm_update.measure import measure_image
from rhel_cvm_update.predict import run_source, agree
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

    def certificates(self, name: str):
        """The DER certificates of a PEM bundle in the capture directory."""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        return tuple(c.public_bytes(Encoding.DER)
                     for c in x509.load_pem_x509_certificates((self.dir / name).read_bytes()))

    def uki_signatures(self):
        if "signing" in self.info:  # as sbattach + openssl extracted them from the booted UKI
            return tuple(self.certificates(s["certificates"]) for s in self.info["signing"]["uki_signatures"])
        if not self.info["uki"].get("signed"):
            return ()
        return (self.certificates(self.info["db_cert"]["file"]),)

    def uki(self) -> ImageMeasurement:
        uki = self.info["uki"]
        return ImageMeasurement(
            path=uki["esp_path"], authenticode={"sha256": bytes.fromhex(uki["authenticode_sha256"])},
            linux_authenticode={"sha256": bytes.fromhex(uki["linux_section"]["authenticode_sha256"])},
            signatures=self.uki_signatures())

    def shim(self) -> ImageMeasurement:
        """The captured shim as recorded (pesign digest), with its certificates and
        .sbatlevel from the installed Debian file it was copied from.  A signer-chain shim was
        rebuilt from that file: its signatures (sbattach + openssl), .sbatlevel and .sbat
        (objcopy) are what the capture recorded; its built-in vendor certificate is Debian's."""
        shim = self.info["shim"]
        installed = SIGNED_SHIM if "shim-signed" in shim["package"] else UNSIGNED_SHIM
        if not os.path.exists(installed):
            pytest.skip(f"{installed} is not installed")
        real = measure_image(installed, ["sha256"])
        signing = self.info.get("signing")
        if signing:
            if real.sbat != signing["shim_sbat"]:
                pytest.skip(f"installed {installed} is not the shim {self.dir.name} was rebuilt from")
            return dataclasses.replace(
                real, authenticode={"sha256": bytes.fromhex(shim["authenticode_sha256"])},
                signatures=tuple(self.certificates(s["certificates"]) for s in signing["shim_signatures"]),
                sbat_levels=dict(signing["shim_sbatlevel"]))
        if real.authenticode["sha256"].hex() != shim["authenticode_sha256"]:
            pytest.skip(f"installed {installed} is not the shim captured in {self.dir.name}")
        return real

    def expected(self):
        return {p: self.pcrs["sha256"][p] for p in (4, 7)}


LOG_PAIRS = [("sb-off-uki-a", "sb-off-uki-b"), ("sb-off-uki-b", "sb-off-uki-a"),
             ("sb-on-uki-a", "sb-on-uki-b"), ("sb-on-uki-b", "sb-on-uki-a"),
             ("sb-off-uki-a", "sb-off-shim-b-uki-a"), ("sb-off-shim-b-uki-a", "sb-off-uki-b")]
# The signer chain (tests/vm/capture.py SIGNER_SCENARIOS): each "then" booted from variables
# equal to the state "now" left, so these are real next boots.  Same Authenticode, other signer.
SIGNER_PAIRS = [("sb2-shim-ms2011", "sb2-shim-ms2023"), ("sb2-shim-ms2023", "sb2-shim-ms2011"),
                ("sb2-shim-ms2011", "sb2-shim-dual"), ("sb2-shim-ms2023", "sb2-shim-dual"),
                ("sb2-shim-dual", "sb2-shim-dual-2023-first"), ("sb2-shim-dual-2023-first", "sb2-shim-dual"),
                ("sb2-shim-dual", "sb2-uki-ca2"), ("sb2-uki-ca2", "sb2-shim-ms2011"),
                # a newer shim whose .sbatlevel shim applies (PCR4 and the SbatLevel event change)
                ("sb2-uki-ca2", "sb2-shim-sbat"),
                # dbx gains the Microsoft UEFI CA 2011 at runtime; the CA 2023-only shim boots next
                ("sb2-shim-sbat", "sb2-dbx-ms2011"),
                # the vendor re-signs with its own CAs (test CA 1 -> CA 2, dual, and back)
                ("sb2-dbx-ms2011", "sb2-shim-ca2"), ("sb2-shim-ca2", "sb2-shim-ca-dual"),
                ("sb2-shim-ca-dual", "sb2-shim-ca2"),
                # a MOK enrolled by the previous boot; the UKI re-signed by it (shim logs MokListRT)
                ("sb2-mok-enrolled", "sb2-uki-mok"), ("sb2-uki-mok", "sb2-mok-enrolled")]
# Variables written at runtime before the next boot: the live efivarfs has them, the log not yet.
RUNTIME_UPDATES = {("sb2-shim-sbat", "sb2-dbx-ms2011"): ("dbx",)}


def efivars_before(current: Boot, following: Boot):
    updated = RUNTIME_UPDATES.get((current.dir.name, following.dir.name), ())
    return {key: (following.efivars[key] if key[0] in updated else value) for key, value in current.efivars.items()}


@pytest.mark.parametrize("now,then", LOG_PAIRS + SIGNER_PAIRS)
def test_log_prediction_equals_the_real_next_boot(now, then):
    current, following = Boot(now), Boot(then)
    prediction = predict_from_log(current.log, current.live(), following.shim(), following.uki(),
                                  booted_shim=current.shim(), booted_uki=current.uki(),
                                  efivars_now=efivars_before(current, following))
    assert {p: prediction.pcrs[p] for p in (4, 7)} == following.expected()
    assert prediction.checked_against == "tpm"


@pytest.mark.parametrize("name", sorted(p.parent.name for p in BOOTS.glob("*/boot.json")))
def test_each_captured_log_predicts_its_own_boot(name):
    boot = Boot(name)
    prediction = predict_from_log(boot.log, boot.live(), boot.shim(), boot.uki(),
                                  booted_shim=boot.shim(), efivars_now=boot.efivars)
    assert {p: prediction.pcrs[p] for p in (4, 7)} == boot.expected()


@pytest.mark.parametrize("now,then", LOG_PAIRS + [p for p in SIGNER_PAIRS if p not in RUNTIME_UPDATES])
def test_model_prediction_equals_the_real_next_boot(now, then):
    current, following = Boot(now), Boot(then)
    prediction = predict_from_model(efivars_before(current, following), current.live(), current.shim(),
                                    current.uki(), following.shim(), following.uki())
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


def _both_sources(current: Boot, shim: ImageMeasurement, uki: ImageMeasurement, efivars):
    """Each source's run for booting ``shim`` and ``uki`` next from ``current``."""
    return {"log": run_source(lambda: predict_from_log(current.log, current.live(), shim, uki,
                                                       booted_shim=current.shim(), booted_uki=current.uki(),
                                                       efivars_now=efivars)),
            "model": run_source(lambda: predict_from_model(efivars, current.live(), current.shim(), current.uki(),
                                                           shim, uki))}


@pytest.mark.parametrize("now,then", SIGNER_PAIRS)
def test_auto_agreement_equals_the_real_next_boot(now, then):
    # What `predict --source auto`, `update` and `reseal` do: run both, seal only what both say.
    current, following = Boot(now), Boot(then)
    result = agree(_both_sources(current, following.shim(), following.uki(), efivars_before(current, following)))
    assert {p: result.pcrs[p] for p in (4, 7)} == following.expected()
    if (now, then) in RUNTIME_UPDATES:
        # dbx changed after this boot measured it: the model cannot reproduce today's PCR7 from
        # today's variables, so it refuses and only the log (which replays the old dbx) runs.
        assert result.agreed is None and result.sources["model"]["ran"] is False
        assert "does not reproduce live PCR7" in result.sources["model"]["error"]
        assert any("only the log source could run" in n for n in result.notes)
    else:
        assert result.agreed is True and result.sources["model"]["pcr7"] == result.sources["log"]["pcr7"]


def test_a_shim_whose_first_signature_dbx_revokes_is_refused_by_both_sources():
    # Real dbx (sb2-dbx-ms2011: the Microsoft UEFI CA 2011 added at runtime) and Debian's
    # dual-signed shim, CA 2011 signature first: edk2 stops at the revoked signature and refuses
    # the image although its second signature (CA 2023) would verify.
    current, dual = Boot("sb2-dbx-ms2011"), Boot("sb2-shim-dual")
    runs = _both_sources(current, dual.shim(), current.uki(), current.efivars)
    for name, run in runs.items():
        assert isinstance(run.error, ImageRefusedError), (name, run)
        assert "dbx" in str(run.error) and "Microsoft Corporation UEFI CA 2011" in str(run.error), str(run.error)
    with pytest.raises(PredictionError, match="neither source"):
        agree(runs)
