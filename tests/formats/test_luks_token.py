"""systemd-tpm2 / tpm2-import token models and LUKS2 metadata (pure).

Real shapes come from systemd-cryptenroll (see tests/interop) and reference 4.1/5.1;
here: round trips, unknown fields, and malformed input naming token id and field.
"""

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rhel_cvm_update.errors import FormatError, UnsupportedError
from rhel_cvm_update.formats.luks_token import LuksMetadata, SystemdTpm2Token, Tpm2ImportToken

BLOB = b"\x00\x04priv" + b"\x00\x06public"


def systemd_token(**changes):
    token = {"type": "systemd-tpm2", "keyslots": ["2"], "tpm2-blob": base64.b64encode(BLOB).decode(),
             "tpm2-pcrs": [4, 7], "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc",
             "tpm2-policy-hash": "ab" * 32, "tpm2-pin": False}
    token.update(changes)
    return {k: v for k, v in token.items() if v is not None}


def test_round_trip_keeps_shape_order_and_unknown_fields():
    raw = systemd_token(kversion="5.14.0-284.el9.x86_64")
    token = SystemdTpm2Token.from_json(raw, 3)
    assert (token.keyslot, token.blob, token.pcrs, token.bank) == (2, BLOB, (4, 7), "sha256")
    assert token.extra == {"kversion": "5.14.0-284.el9.x86_64"}
    assert token.to_json() == raw
    assert list(token.to_json()) == list(raw)


def test_tool_record_and_defaults():
    raw = systemd_token(**{"tpm2-pcr-bank": None, "tpm2-primary-alg": None, "tpm2-pin": None,
                           "rhel-cvm-update": {"uki": "/boot/efi/EFI/Linux/x.efi"}})
    token = SystemdTpm2Token.from_json(raw, 0)
    assert token.pcr_bank is None and token.bank == "sha256" and token.primary_alg is None and not token.pin
    assert token.tool_record == {"uki": "/boot/efi/EFI/Linux/x.efi"}
    assert token.to_json()["rhel-cvm-update"] == {"uki": "/boot/efi/EFI/Linux/x.efi"}


@pytest.mark.parametrize("changes,field", [
    ({"keyslots": ["1", "2"]}, "keyslots"),
    ({"keyslots": [2]}, "keyslots"),
    ({"keyslots": ["02"]}, "keyslots"),
    ({"tpm2-blob": None}, "tpm2-blob"),
    ({"tpm2-blob": "!!"}, "tpm2-blob"),
    ({"tpm2-blob": base64.b64encode(BLOB + b"x").decode()}, "tpm2-blob"),
    ({"tpm2-pcrs": None}, "tpm2-pcrs"),
    ({"tpm2-pcrs": [4, 4]}, "tpm2-pcrs"),
    ({"tpm2-pcrs": [True]}, "tpm2-pcrs"),
    ({"tpm2-pcr-bank": "sha3"}, "tpm2-pcr-bank"),
    ({"tpm2-primary-alg": "dsa"}, "tpm2-primary-alg"),
    ({"tpm2-policy-hash": "zz" * 32}, "tpm2-policy-hash"),
    ({"tpm2-pin": "no"}, "tpm2-pin"),
    ({"tpm2_srk": 5}, "tpm2_srk"),
    ({"type": "systemd-fido2"}, "type"),
])
def test_malformed_tokens_name_token_and_field(changes, field):
    with pytest.raises(FormatError) as err:
        SystemdTpm2Token.from_json(systemd_token(**changes), 7, source="disk.img")
    assert "token 7" in str(err.value) and (err.value.field == field or field in str(err.value))


@pytest.mark.parametrize("changes", [{"tpm2-blob": ["a", "b"]}, {"tpm2-policy-hash": ["ab" * 32]}])
def test_systemd_257_shard_arrays_are_unsupported(changes):
    with pytest.raises(UnsupportedError, match="token 1"):
        SystemdTpm2Token.from_json(systemd_token(**changes), 1)


def import_token(**changes):
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    token = {"type": "tpm2-import", "keyslots": ["0"], "parent_pub": b64(b"pub"), "parent_prv": b64(b"prv"),
             "parent_seed": b64(b"seed"), "seal_pub": b64(b"spub"), "seal_prv": b64(b"sprv"),
             "pcrpolicy_dat": b64(bytes(32)), "tpm2-pcrs": [7], "tpm2-pcr-bank": "sha256"}
    token.update(changes)
    return {k: v for k, v in token.items() if v is not None}


def test_tpm2_import_round_trip_and_errors():
    raw = import_token(unique_dat=base64.b64encode(b"\x01\x00u").decode())
    token = Tpm2ImportToken.from_json(raw, 4)
    assert token.unique == b"\x01\x00u" and token.pcrs == (7,)
    assert token.to_json() == raw
    with pytest.raises(FormatError, match="token 4: .*32-byte"):
        Tpm2ImportToken.from_json(import_token(pcrpolicy_dat=base64.b64encode(bytes(20)).decode()), 4)
    with pytest.raises(FormatError, match="parent_seed"):
        Tpm2ImportToken.from_json(import_token(parent_seed=None), 4)


def metadata(tokens, keyslots=("0", "1", "2")):
    return json.dumps({"keyslots": {k: {"type": "luks2"} for k in keyslots}, "tokens": tokens,
                       "segments": {}, "digests": {}, "config": {}}).encode()


def test_metadata_tokens_and_free_ids():
    meta = LuksMetadata.from_json_bytes(metadata({"0": systemd_token(), "3": import_token()}), "img")
    assert meta.tokens_of_type("systemd-tpm2") == [0] and list(meta.tpm2_import_tokens()) == [3]
    assert meta.free_keyslot() == 3 and meta.free_token_id() == 1


@pytest.mark.parametrize("data,message", [
    (b"\xff", "not JSON"),
    (b"[]", "not a JSON object"),
    (json.dumps({"keyslots": {}}).encode(), "'tokens' is missing"),
    (json.dumps({"keyslots": {"x": {}}, "tokens": {}}).encode(), "id 'x'"),
    (json.dumps({"keyslots": {"32": {}}, "tokens": {}}).encode(), "id '32'"),
    (metadata({"0": {"keyslots": ["0"]}}), "type: token 0: missing or not a string"),
    (metadata({"0": systemd_token(keyslots=["9"])}), "names keyslot 9, which does not exist"),
    (metadata({"0": systemd_token(), "1": systemd_token()}), "keyslot 2 is referenced by systemd-tpm2 tokens 0 and 1"),
])
def test_metadata_rejects_hostile_json(data, message):
    with pytest.raises(FormatError, match=message):
        LuksMetadata.from_json_bytes(data, "img")


def test_import_and_systemd_token_may_share_a_keyslot_mid_conversion():
    meta = LuksMetadata.from_json_bytes(metadata({"0": import_token(keyslots=["2"]), "1": systemd_token()}), "img")
    assert sorted(meta.tokens) == [0, 1]


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 40) | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=6), children, max_size=4), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(systemd_token()) + ["tpm2_srk", "x"]), json_values, max_size=9))
def test_hostile_tokens_only_raise_our_errors(changes):
    try:
        SystemdTpm2Token.from_json(systemd_token(**changes), 0)
    except (FormatError, UnsupportedError):
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(import_token()) + ["unique_dat"]), json_values, max_size=9))
def test_hostile_import_tokens_only_raise_our_errors(changes):
    try:
        Tpm2ImportToken.from_json(import_token(**changes), 0)
    except (FormatError, UnsupportedError):
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["keyslots", "tokens", "x"]), json_values, max_size=3))
def test_hostile_metadata_only_raises_format_error(obj):
    try:
        meta = LuksMetadata.from_json_bytes(json.dumps(obj).encode(), "img")
        meta.systemd_tpm2_tokens()
        meta.tpm2_import_tokens()
    except (FormatError, UnsupportedError):
        pass
