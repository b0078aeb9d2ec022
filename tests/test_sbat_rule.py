"""shim's SbatLevel rule (sbat_rule.py), case by case from shim's sbat.c."""

import pytest

from rhel_cvm_update.errors import PredictionError
from rhel_cvm_update.sbat_rule import ORIGINAL_LEVEL, next_sbat_level

OLD = b"sbat,1,2024010900\nshim,4\ngrub,3\n"
NEW = "sbat,1,2025021800\nshim,4\ngrub,5\n"
LATEST = "sbat,1,2025051000\nshim,4\ngrub,5\ngrub.proxmox,2\n"
LEVELS = {"previous": NEW, "latest": LATEST}
SHIM_SBAT = "sbat,1,SBAT Version,sbat,1,https://github.com/rhboot/shim/blob/main/SBAT.md\nshim,4,UEFI shim,shim,1,https://github.com/rhboot/shim\n"


def rule(current, levels=LEVELS, secure_boot=True, policy=None, sbat=SHIM_SBAT, same_shim=False):
    return next_sbat_level(current, levels, sbat, secure_boot, policy, "shim.efi", same_shim=same_shim)


def test_newer_automatic_level_is_applied_with_secure_boot_on():
    assert rule(OLD) == NEW.encode()


def test_current_level_is_kept_when_not_older():
    assert rule(LATEST.encode()) == LATEST.encode()
    assert rule(NEW.encode()) == NEW.encode()


def test_secure_boot_off_resets_to_the_original_level():
    assert rule(OLD, secure_boot=False) == ORIGINAL_LEVEL


@pytest.mark.parametrize("policy,secure_boot,expected", [
    (b"\x01", True, LATEST.encode()), (b"\x02", False, NEW.encode()), (b"\x03", True, NEW.encode()),
    (b"\x03", False, ORIGINAL_LEVEL), (b"\x09", True, NEW.encode())])
def test_sbat_policy_chooses_the_candidate(policy, secure_boot, expected):
    assert rule(OLD, secure_boot=secure_boot, policy=policy) == expected


def test_corrupt_current_level_is_replaced():
    assert rule(b"garbage") == NEW.encode()


def test_level_that_revokes_shim_itself_is_refused_with_secure_boot_on():
    revoking = {"previous": "sbat,1,2030010100\nshim,5\n", "latest": "sbat,1,2030010100\nshim,5\n"}
    with pytest.raises(PredictionError, match="revokes its own components"):
        rule(OLD, levels=revoking)


def test_shim_without_sbatlevel_cannot_be_decided_unless_it_is_the_booted_one():
    with pytest.raises(PredictionError, match="no .sbatlevel"):
        rule(OLD, levels={})
    assert rule(OLD, levels={}, same_shim=True) == OLD
