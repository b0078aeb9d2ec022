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


# --- sealing, unsealing, handles, dictionary-attack counter ---

import base64  # noqa: E402
import os  # noqa: E402

from rhel_cvm_update.errors import FormatError, UnsupportedError  # noqa: E402
from rhel_cvm_update.formats import tpm_policy  # noqa: E402
from rhel_cvm_update.formats.luks_token import SystemdTpm2Token  # noqa: E402
from rhel_cvm_update.secrets import Secret  # noqa: E402


def _getcap(swtpm, what):
    return swtpm.tool("tpm2_getcap", what).stdout


def _lockout_counter(swtpm) -> int:
    for line in _getcap(swtpm, "properties-variable").splitlines():
        if line.startswith("TPM2_PT_LOCKOUT_COUNTER:"):
            return int(line.split(":")[1], 0)
    raise AssertionError("tpm2_getcap did not report TPM2_PT_LOCKOUT_COUNTER")


def _assert_no_handles(swtpm):
    assert _getcap(swtpm, "handles-transient").strip() == ""
    assert _getcap(swtpm, "handles-loaded-session").strip() == ""
    assert _getcap(swtpm, "handles-saved-session").strip() == ""


def _token(blob, alg, policy, **kw):
    return SystemdTpm2Token(keyslot=1, blob=blob, pcrs=(4, 7), pcr_bank="sha256", primary_alg=alg,
                            policy_hash=policy, pin=False, **kw)


def test_seal_then_unseal_at_the_sealed_pcrs_only(fresh_swtpm):
    fresh_swtpm.extend(4, hashlib.sha256(b"uki").digest())
    predicted = fresh_swtpm.read_sha256([4, 7])
    fresh_swtpm.power_cycle()
    policy = tpm_policy.policy_pcr(predicted)
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm, Secret(bytearray(os.urandom(32))) as secret:
        blob, alg = tpm.seal(secret, policy)
        sealed = bytes(secret.data)
        token = _token(blob, alg, policy)
        with pytest.raises(MachineError, match="not attempting an unseal"):
            tpm.unseal(token, 3)
    _assert_no_handles(fresh_swtpm)
    assert (len(blob), alg) == (240, "ecc")  # reference 4.4/testing doc: 240-byte blob, ECC primary
    area = tpm_policy.parse_public_area(tpm_policy.split_sealed_blob(blob, source="t")[1][2:], source="t")
    assert (area.obj_type, area.attributes, area.auth_policy) == (0x0008, 0x00000012, policy)

    fresh_swtpm.extend(4, hashlib.sha256(b"uki").digest())
    before = _lockout_counter(fresh_swtpm)
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        with tpm.unseal(token, 3) as out:
            assert bytes(out.data) == sealed
    assert _lockout_counter(fresh_swtpm) == before
    _assert_no_handles(fresh_swtpm)


def test_refused_unseal_costs_no_dictionary_attack_try(fresh_swtpm):
    policy = tpm_policy.policy_pcr({4: b"\x11" * 32, 7: b"\x22" * 32})
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm, Secret(bytearray(32)) as secret:
        blob, alg = tpm.seal(secret, policy)
        before = _lockout_counter(fresh_swtpm)
        for _ in range(3):
            with pytest.raises(MachineError):
                tpm.unseal(_token(blob, alg, policy), 0)
    assert _lockout_counter(fresh_swtpm) == before
    _assert_no_handles(fresh_swtpm)


def test_unseal_of_a_blob_that_the_tpm_rejects_flushes_everything(fresh_swtpm):
    current = tpm_policy.policy_pcr(fresh_swtpm.read_sha256([4, 7]))
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm, Secret(bytearray(32)) as secret:
        blob, alg = tpm.seal(secret, current)
        # Flip a byte inside the encrypted private part: the TPM's integrity check fails at Load.
        damaged = bytearray(blob)
        damaged[40] ^= 0xFF
        with pytest.raises(MachineError, match="TPM2_Load"):
            tpm.unseal(_token(bytes(damaged), alg, current), 0)
    _assert_no_handles(fresh_swtpm)


@pytest.mark.parametrize("kw,message", [({"pin": True}, "PIN"),
                                        ({"extra": {"tpm2_pubkey": "x"}}, "signed or pcrlock")])
def test_unsupported_tokens_are_refused_before_the_tpm(swtpm, kw, message):
    fields = dict(keyslot=1, blob=b"\x00\x01a\x00\x01b", pcrs=(4, 7), pcr_bank="sha256", primary_alg="ecc",
                  policy_hash=bytes(32), pin=False)
    fields.update(kw)
    with tpm_adapter.Tpm(swtpm.tcti) as tpm:
        with pytest.raises(UnsupportedError, match=message):
            tpm.unseal(SystemdTpm2Token(**fields), 0)


def test_malformed_blob_is_a_format_error(fresh_swtpm):
    current = tpm_policy.policy_pcr(fresh_swtpm.read_sha256([4, 7]))
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        with pytest.raises(FormatError, match="token 9 tpm2-blob"):
            tpm.unseal(_token(b"\x00\x05abc", "ecc", current), 9)
    _assert_no_handles(fresh_swtpm)


@pytest.mark.parametrize("alg,tools_alg", [("ecc", "ecc"), ("rsa", "rsa")])
def test_legacy_primary_equals_tpm2_tools_createprimary(swtpm, tmp_path, alg, tools_alg):
    """Reference 10.2: tpm2_createprimary -C o -G ecc yields systemd's legacy ECC primary
    (RHEL's tpm2-luks-import.sh relies on it).  Same Name = same public area."""
    ctx, name_file = tmp_path / "p.ctx", tmp_path / "p.name"
    swtpm.tool("tpm2_createprimary", "-C", "o", "-G", tools_alg, "-c", str(ctx))
    swtpm.tool("tpm2_readpublic", "-c", str(ctx), "-n", str(name_file))
    swtpm.flush_all()
    with tpm_adapter.Tpm(swtpm.tcti) as tpm:
        with tpm.primary(alg) as handle:
            ours = tpm.object_name(handle)
    assert ours == name_file.read_bytes()
    _assert_no_handles(swtpm)


def test_unseal_token_under_persistent_srk(fresh_swtpm, tmp_path):
    """A systemd >= 254 token (tpm2_srk): sealed object under the SRK at 0x81000001,
    made here with tpm2-tools, unsealed by this code."""
    srk_ctx, srk_tr = tmp_path / "srk.ctx", tmp_path / "srk.tr"
    secret_file, pub, priv = tmp_path / "s", tmp_path / "s.pub", tmp_path / "s.priv"
    fresh_swtpm.tool("tpm2_evictcontrol", "-C", "o", "-c", "0x81000001", check=False)
    fresh_swtpm.tool("tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", str(srk_ctx), "-a",
                     "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda")
    fresh_swtpm.tool("tpm2_evictcontrol", "-C", "o", "-c", str(srk_ctx), "0x81000001")
    fresh_swtpm.flush_all()
    fresh_swtpm.tool("tpm2_readpublic", "-c", "0x81000001", "-t", str(srk_tr))
    policy = tpm_policy.policy_pcr(fresh_swtpm.read_sha256([4, 7]))
    (tmp_path / "policy").write_bytes(policy)
    secret_file.write_bytes(b"S" * 32)
    try:
        fresh_swtpm.tool("tpm2_create", "-C", "0x81000001", "-L", str(tmp_path / "policy"), "-i",
                         str(secret_file), "-u", str(pub), "-r", str(priv), "-a", "fixedtpm|fixedparent")
        blob = priv.read_bytes() + pub.read_bytes()
        token = SystemdTpm2Token.from_json({
            "type": "systemd-tpm2", "keyslots": ["1"], "tpm2-blob": base64.b64encode(blob).decode(),
            "tpm2-pcrs": [4, 7], "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc",
            "tpm2-policy-hash": policy.hex(), "tpm2-pin": False,
            "tpm2_srk": base64.b64encode(srk_tr.read_bytes()).decode()}, 0)
        with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
            with tpm.unseal(token, 0) as out:
                assert bytes(out.data) == b"S" * 32
            other = bytearray(srk_tr.read_bytes())
            other[10] ^= 1  # u32 handle, u16 size, u16 nameAlg, digest from offset 8
            with pytest.raises(MachineError, match="is not the key the token was sealed under"):
                tpm.unseal(SystemdTpm2Token.from_json(dict(token.to_json(), tpm2_srk=base64.b64encode(
                    bytes(other)).decode()), 0), 0)
        _assert_no_handles(fresh_swtpm)
    finally:
        fresh_swtpm.tool("tpm2_evictcontrol", "-C", "o", "-c", "0x81000001", check=False)
