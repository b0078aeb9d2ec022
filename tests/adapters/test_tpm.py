"""rhel_cvm_update.adapters.tpm against a real swtpm; expected values come from tpm2-tools."""

import hashlib

import pytest

from rhel_cvm_update.errors import ConfigError, MachineError
from tests.swtpm_fixtures import fresh_swtpm, swtpm  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.swtpm

tpm_adapter = pytest.importorskip("rhel_cvm_update.adapters.tpm")


def test_read_pcrs_matches_tpm2_pcrread_after_extends(fresh_swtpm):
    fresh_swtpm.extend(4, hashlib.sha256(b"shim").digest())
    fresh_swtpm.extend(7, hashlib.sha256(b"secure boot").digest())
    expected = fresh_swtpm.read_sha256([0, 4, 7])
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        got = tpm.read_pcrs([4, 7, 0])
    assert got == expected
    assert got[4] != bytes(32) and got[0] == bytes(32)


def test_read_pcrs_more_than_eight_in_one_call(fresh_swtpm):
    # TPML_DIGEST carries at most 8 digests: 24 PCRs need several TPM2_PCR_Read calls.
    for pcr in (1, 9, 16, 23):
        fresh_swtpm.extend(pcr, hashlib.sha256(bytes([pcr])).digest())
    expected = fresh_swtpm.read_sha256(list(range(0, 12)))
    expected.update(fresh_swtpm.read_sha256(list(range(12, 24))))
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        got = tpm.read_pcrs(range(24))
    assert sorted(got) == list(range(24))
    assert got == expected


def test_read_pcrs_sha1_bank(fresh_swtpm):
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        got = tpm.read_pcrs([4], bank="sha1")
    assert got == {4: bytes(20)}


@pytest.mark.parametrize("pcrs,bank", [([24], "sha256"), ([-1], "sha256"), ([True], "sha256"),
                                       ([4], "md5")])
def test_read_pcrs_rejects_bad_arguments(swtpm, pcrs, bank):
    with tpm_adapter.Tpm(swtpm.tcti) as tpm:
        with pytest.raises(ConfigError):
            tpm.read_pcrs(pcrs, bank=bank)


def test_unreachable_tpm_is_a_machine_error():
    with pytest.raises(MachineError):
        with tpm_adapter.Tpm("swtpm:host=127.0.0.1,port=1"):
            pass
