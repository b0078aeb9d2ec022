"""reseal/enroll against swtpm and real LUKS2 images, with explicit PCR values.

Expected values come from outside the code under test: PCR values from tpm2_pcrread after
tpm2_pcrextend, keyslot checks from `cryptsetup open --test-passphrase`.
"""

import base64
import hashlib
import os
import tempfile

import pytest

from rhel_cvm_update.adapters.cryptsetup import Cryptsetup
from rhel_cvm_update.config import config_from_mapping
from rhel_cvm_update.errors import ConfigError, FormatError, MachineError
from rhel_cvm_update.formats.luks_token import SystemdTpm2Token
from rhel_cvm_update.reseal import parse_pcr_options, reseal
from rhel_cvm_update.secrets import Secret
from tests.swtpm_fixtures import (TEST_PASSPHRASE, cryptsetup, fresh_swtpm, header_bytes,  # noqa: F401
                                  import_token_raw, luks2_image, luks2_template, swtpm)

tpm_adapter = pytest.importorskip("rhel_cvm_update.adapters.tpm")

pytestmark = [pytest.mark.swtpm, pytest.mark.root]

SHIM = hashlib.sha256(b"next shim").digest()
UKI = hashlib.sha256(b"next uki").digest()


def _config(swtpm, image, tmp_path):
    return config_from_mapping({"tpm": swtpm.tcti, "luks_device": image, "state_dir": str(tmp_path / "state")})


def _predicted_values(swtpm):
    """What PCR4/PCR7 will be after a reboot that measures SHIM+UKI into PCR4 and one
    event into PCR7: extend a power-cycled swtpm, read with tpm2_pcrread, reset again."""
    swtpm.power_cycle()
    _boot(swtpm)
    values = swtpm.read_sha256([4, 7])
    swtpm.power_cycle()
    return values


def _boot(swtpm):
    swtpm.extend(4, SHIM)
    swtpm.extend(4, UKI)
    swtpm.extend(7, hashlib.sha256(b"SecureBoot=1").digest())


def _key():
    return Secret(bytearray(TEST_PASSPHRASE))


def test_first_enrolment_then_reuse(fresh_swtpm, luks2_image, tmp_path):
    config = _config(fresh_swtpm, luks2_image, tmp_path)
    target = _predicted_values(fresh_swtpm)
    luks = Cryptsetup(luks2_image)
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm, _key() as key:
        first = reseal(config, luks, tpm, pcr_values=target, key=key)
    assert first["action"] == "added" and first["unlocked_with"] == "key-file"
    token = SystemdTpm2Token.from_json(luks.export_token(first["token"]), first["token"])
    assert token.keyslot == first["keyslot"] and token.pcrs == (4, 7) and token.pcr_bank == "sha256"
    assert token.tool_record["pcrs"] == {"4": target[4].hex(), "7": target[7].hex()}
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm, _key() as key:
        again = reseal(config, luks, tpm, pcr_values=target, key=key)
    assert again["action"] == "reused" and again["token"] == first["token"]
    assert sorted(luks.metadata().keyslots) == [0, first["keyslot"]]


def test_reseal_unlocks_with_current_token_and_new_token_opens_after_boot(fresh_swtpm, luks2_image, tmp_path):
    config = _config(fresh_swtpm, luks2_image, tmp_path)
    luks = Cryptsetup(luks2_image)
    current = fresh_swtpm.read_sha256([4, 7])
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm, _key() as key:
        enrolled = reseal(config, luks, tpm, pcr_values=current, key=key)
    target = _predicted_values(fresh_swtpm)
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        plan = reseal(config, luks, tpm, pcr_values=target, dry_run=True)
        assert plan["action"] == "would-add" and plan["unlocked_with"] == f"token {enrolled['token']}"
        done = reseal(config, luks, tpm, pcr_values=target)
    assert done["action"] == "added" and done["unlocked_with"] == f"token {enrolled['token']}"

    # "Reboot" into the predicted chain: the new token unseals, the old one is refused
    # before any unseal is attempted.
    fresh_swtpm.power_cycle()
    _boot(fresh_swtpm)
    tokens = luks.metadata().systemd_tpm2_tokens()
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        with tpm.unseal(tokens[done["token"]], done["token"]) as secret:
            passphrase = base64.b64encode(bytes(secret.data))
        with pytest.raises(MachineError, match="not attempting an unseal"):
            tpm.unseal(tokens[enrolled["token"]], enrolled["token"])
    assert cryptsetup("open", "--test-passphrase", "--key-slot", str(done["keyslot"]), "--key-file=-",
                      luks2_image, input_bytes=passphrase).returncode == 0
    _assert_not_on_disk([passphrase, base64.b64decode(passphrase)], [str(tmp_path), tempfile.gettempdir()])


def _assert_not_on_disk(needles, roots):
    """No regular file modified in the last 10 minutes under roots contains a needle."""
    import time
    recent = time.time() - 600
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                    if not os.path.isfile(path) or st.st_mtime < recent or st.st_size > 64 << 20:
                        continue
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                for needle in needles:
                    assert needle not in data, f"secret found in {path}"


def test_dry_run_and_refusals_leave_header_identical(fresh_swtpm, luks2_image, tmp_path):
    config = _config(fresh_swtpm, luks2_image, tmp_path)
    luks = Cryptsetup(luks2_image)
    target = _predicted_values(fresh_swtpm)
    before = header_bytes(luks2_image)
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        with _key() as key:
            assert reseal(config, luks, tpm, pcr_values=target, key=key, dry_run=True)["action"] == "would-add"
        with pytest.raises(MachineError, match="no systemd-tpm2 token is sealed to the current PCRs"):
            reseal(config, luks, tpm, pcr_values=target)
        with Secret(bytearray(b"wrong passphrase")) as wrong:
            with pytest.raises(MachineError, match="opens no keyslot"):
                reseal(config, luks, tpm, pcr_values=target, key=wrong)
    assert header_bytes(luks2_image) == before
    assert not os.path.exists(tmp_path / "state")


def _systemd_token(keyslot="0", **fields):
    # Shaped like TPM2B_PRIVATE || TPM2B_PUBLIC, contents irrelevant: never loaded.
    blob = b"\x00\x04priv" + b"\x00\x0cpublic area."
    token = {"type": "systemd-tpm2", "keyslots": [keyslot], "tpm2-blob": base64.b64encode(blob).decode(),
             "tpm2-pcrs": [4, 7], "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc",
             "tpm2-policy-hash": "00" * 32, "tpm2-pin": False}
    token.update(fields)
    return token


@pytest.mark.parametrize("fields,message", [
    ({"tpm2-pcr-bank": "md5"}, "token 0: unknown PCR bank"),
    ({"tpm2-blob": "not base64!"}, "token 0: is not valid base64"),
    ({"tpm2-pcrs": [4, 24]}, "token 0: PCR numbers must be integers 0-23"),
    ({"tpm2-policy-hash": "abc"}, "token 0: must be 64 hex digits"),
    ({"keyslots": []}, "token 0: must list exactly one keyslot"),
    ({"keyslots": ["0", "0"]}, "token 0: lists a keyslot twice"),
])
def test_malformed_token_is_refused_with_header_unchanged(fresh_swtpm, luks2_image, tmp_path, fields, message):
    import_token_raw(luks2_image, _systemd_token(**fields), 0)
    before = header_bytes(luks2_image)
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm, _key() as key:
        with pytest.raises(FormatError) as err:
            reseal(_config(fresh_swtpm, luks2_image, tmp_path), Cryptsetup(luks2_image), tpm,
                   pcr_values=fresh_swtpm.read_sha256([4, 7]), key=key)
    assert message in str(err.value) and luks2_image in str(err.value)
    assert header_bytes(luks2_image) == before


def test_blob_of_wrong_size_is_refused_before_any_unseal(fresh_swtpm, luks2_image, tmp_path):
    current = fresh_swtpm.read_sha256([4, 7])
    from rhel_cvm_update.formats.tpm_policy import policy_pcr
    import_token_raw(luks2_image, _systemd_token(**{"tpm2-blob": base64.b64encode(b"\x00\x10" + b"\0" * 7).decode(),
                                                    "tpm2-policy-hash": policy_pcr(current).hex()}), 0)
    before = header_bytes(luks2_image)
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        with pytest.raises(FormatError, match="token 0 tpm2-blob.*TPM2B_PRIVATE: size 16 runs past the end"):
            reseal(_config(fresh_swtpm, luks2_image, tmp_path), Cryptsetup(luks2_image), tpm,
                   pcr_values={4: bytes(32), 7: bytes(32)})
    assert header_bytes(luks2_image) == before


def test_keyslot_referenced_by_two_tokens_is_refused(fresh_swtpm, luks2_image, tmp_path):
    import_token_raw(luks2_image, _systemd_token(), 0)
    import_token_raw(luks2_image, _systemd_token(), 1)
    before = header_bytes(luks2_image)
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm, _key() as key:
        with pytest.raises(FormatError, match="keyslot 0 is referenced by systemd-tpm2 tokens 0 and 1"):
            reseal(_config(fresh_swtpm, luks2_image, tmp_path), Cryptsetup(luks2_image), tpm,
                   pcr_values=fresh_swtpm.read_sha256([4, 7]), key=key)
    assert header_bytes(luks2_image) == before


@pytest.mark.parametrize("options,message", [
    (["4=" + "00" * 32], r"cover PCRs \[4\]"),
    (["4=" + "00" * 31], "expected N=HEX"),
    (["24=" + "00" * 32, "7=" + "00" * 32], "expected N=HEX"),
    (["4=" + "00" * 32, "4=" + "11" * 32], "given twice"),
])
def test_pcr_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        parse_pcr_options(options, [4, 7])


def test_pcr_options_parse():
    assert parse_pcr_options(["7=" + "ab" * 32, "4=" + "CD" * 32], [4, 7]) == {4: b"\xcd" * 32, 7: b"\xab" * 32}


def test_token_claiming_the_wrong_bank_is_never_unsealed(fresh_swtpm, luks2_image, tmp_path):
    """A token sealed over sha256 values whose JSON says sha1: the live sha1 digest differs,
    so it is not used and no dictionary-attack try is spent."""
    import json
    config = _config(fresh_swtpm, luks2_image, tmp_path)
    luks = Cryptsetup(luks2_image)
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm, _key() as key:
        enrolled = reseal(config, luks, tpm, pcr_values=fresh_swtpm.read_sha256([4, 7]), key=key)
    token = luks.export_token(enrolled["token"])
    token["tpm2-pcr-bank"] = "sha1"
    cryptsetup("token", "import", "--token-replace", "--token-id", str(enrolled["token"]), "--json-file", "-",
               luks2_image, input_bytes=json.dumps(token).encode())
    before = header_bytes(luks2_image)
    lockout = [line for line in fresh_swtpm.tool("tpm2_getcap", "properties-variable").stdout.splitlines()
               if "LOCKOUT_COUNTER" in line]
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        with pytest.raises(MachineError, match="no systemd-tpm2 token is sealed to the current PCRs"):
            reseal(config, luks, tpm, pcr_values={4: UKI, 7: SHIM})
        with pytest.raises(MachineError, match="current sha1 PCRs"):
            tpm.unseal(luks.metadata().systemd_tpm2_tokens()[enrolled["token"]], enrolled["token"])
    assert header_bytes(luks2_image) == before
    assert [line for line in fresh_swtpm.tool("tpm2_getcap", "properties-variable").stdout.splitlines()
            if "LOCKOUT_COUNTER" in line] == lockout


def test_newest_uki_is_chosen_by_mtime(tmp_path):
    from rhel_cvm_update.reseal import newest_uki
    for name, mtime in (("b.efi", 200), ("a.EFI", 300), ("c.efi", 100), ("notes.txt", 400)):
        (tmp_path / name).write_bytes(b"MZ")
        os.utime(tmp_path / name, (mtime, mtime))
    assert newest_uki(str(tmp_path)) == str(tmp_path / "a.EFI")
    with pytest.raises(ConfigError, match="missing: No such file or directory"):
        newest_uki(str(tmp_path / "missing"))


def test_without_pcr_values_the_prediction_needs_a_uki(fresh_swtpm, luks2_image, tmp_path):
    (tmp_path / "empty").mkdir()
    config = config_from_mapping({"tpm": fresh_swtpm.tcti, "luks_device": luks2_image,
                                  "state_dir": str(tmp_path / "state"), "uki_dir": str(tmp_path / "empty")})
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        with pytest.raises(ConfigError, match="no UKI"):
            reseal(config, Cryptsetup(luks2_image), tpm)


def test_full_keyslot_area_fails_cleanly_through_reseal(fresh_swtpm, tmp_path):
    from tests.swtpm_fixtures import make_luks2_image
    image = make_luks2_image(str(tmp_path / "small.img"), "--luks2-keyslots-size", "256k")
    before = header_bytes(image)
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm, _key() as key:
        with pytest.raises(MachineError, match="No space for new keyslot"):
            reseal(_config(fresh_swtpm, image, tmp_path), Cryptsetup(image), tpm,
                   pcr_values={4: SHIM, 7: UKI}, key=key)
    assert header_bytes(image) == before
