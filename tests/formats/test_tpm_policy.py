"""Offline PolicyPCR digests and TPM2B helpers.

Golden values: the reference's test vectors (section 4.5) and trial policy sessions run
by tpm2-tools (`tpm2_createpolicy --policy-pcr -f FILE`) on swtpm.
"""

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats import tpm_policy
from tests.swtpm_fixtures import swtpm  # noqa: F401


def test_reference_vectors():
    zeros = {4: bytes(32), 7: bytes(32)}
    policy = tpm_policy.policy_pcr(zeros)
    assert policy.hex() == "4f3d0316367f04116f53e36d21aa213e2b91f4720303c6049bb6d4bc7fe8e2f9"
    assert tpm_policy.policy_auth_value(policy).hex() == \
        "3e39754a1de4c816b35f52b5ec517fb1c841cbd0f3c2d619c1270fa049b5317d"


def test_pcr_selection_bytes():
    assert tpm_policy.pcr_selection("sha256", [7, 4]).hex() == "00000001000b03900000"
    assert tpm_policy.pcr_selection("sha1", [0, 23]).hex() == "00000001000403010080"


@pytest.mark.swtpm
@pytest.mark.parametrize("bank,pcrs", [("sha256", [4, 7]), ("sha256", [0, 4, 7, 11, 23]), ("sha1", [4, 7])])
def test_matches_tpm_trial_session(swtpm, tmp_path, bank, pcrs):
    size = 32 if bank == "sha256" else 20
    values = {p: os.urandom(size) for p in pcrs}
    (tmp_path / "pcrs.bin").write_bytes(b"".join(values[p] for p in sorted(pcrs)))
    swtpm.tool("tpm2_createpolicy", "--policy-pcr", "-l", f"{bank}:{','.join(map(str, pcrs))}",
               "-f", str(tmp_path / "pcrs.bin"), "-L", str(tmp_path / "policy"))
    swtpm.flush_all()
    assert tpm_policy.policy_pcr(values, bank) == (tmp_path / "policy").read_bytes()


@pytest.mark.parametrize("values,bank,message", [
    ({4: bytes(31), 7: bytes(32)}, "sha256", "PCR 4 value has 31 bytes"),
    ({4: bytes(32)}, "md5", "unknown PCR bank"),
    ({}, "sha256", "no PCRs selected"),
    ({24: bytes(32)}, "sha256", "PCR index must be an integer 0-23"),
])
def test_policy_rejects_bad_input(values, bank, message):
    with pytest.raises(FormatError, match=message):
        tpm_policy.policy_pcr(values, bank)


def test_tpm2b_round_trip_and_truncation():
    assert tpm_policy.tpm2b(b"abc") == b"\x00\x03abc"
    assert tpm_policy.read_tpm2b(b"\x00\x03abcdef", 0, source="s", field="f") == (b"abc", 5)
    with pytest.raises(FormatError, match="s at offset 0x0: f: size 3 runs past"):
        tpm_policy.read_tpm2b(b"\x00\x03ab", 0, source="s", field="f")
    with pytest.raises(FormatError, match="no room for the u16 size"):
        tpm_policy.read_tpm2b(b"\x00", 0, source="s", field="f")


def test_split_sealed_blob():
    private, public = b"\x00\x02pp", b"\x00\x03PUB"
    assert tpm_policy.split_sealed_blob(private + public, source="b") == (private, public)
    with pytest.raises(FormatError, match="2 unexpected bytes after TPM2B_PUBLIC"):
        tpm_policy.split_sealed_blob(private + public + b"xx", source="b")
    with pytest.raises(FormatError, match="empty TPM2B_PRIVATE"):
        tpm_policy.split_sealed_blob(b"\x00\x00" + public, source="b")
    with pytest.raises(FormatError, match="TPM2B_PUBLIC"):
        tpm_policy.split_sealed_blob(private, source="b")


def test_public_area_and_name():
    policy = bytes(range(32))
    area = struct.pack(">HHI", 0x0008, 0x000B, 0x12) + tpm_policy.tpm2b(policy) + b"\x00\x10\x00\x00"
    parsed = tpm_policy.parse_public_area(area, source="p")
    assert (parsed.obj_type, parsed.name_alg, parsed.attributes, parsed.auth_policy) == (8, 0xB, 0x12, policy)
    import hashlib
    assert parsed.name == b"\x00\x0b" + hashlib.sha256(area).digest()
    with pytest.raises(FormatError, match="too short"):
        tpm_policy.parse_public_area(area[:9], source="p")


def test_rsa_unique_and_serialized_handle():
    assert tpm_policy.rsa_unique_from_tpm2_tools(b"\x03\x00abc", source="u") == b"abc"
    with pytest.raises(FormatError, match="unique_dat"):
        tpm_policy.rsa_unique_from_tpm2_tools(b"\x05\x00abc", source="u")
    serialized = struct.pack(">I", 0x81000001) + tpm_policy.tpm2b(b"\x00\x0b" + bytes(32)) + b"\x00\x00\x00\x01"
    assert tpm_policy.serialized_handle_name(serialized, source="s") == (0x81000001, b"\x00\x0b" + bytes(32))
    with pytest.raises(FormatError, match="empty name"):
        tpm_policy.serialized_handle_name(b"\x81\x00\x00\x01\x00\x00", source="s")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_hostile_bytes_only_raise_format_error(data):
    for parse in (lambda: tpm_policy.split_sealed_blob(data, source="h"),
                  lambda: tpm_policy.parse_public_area(data, source="h"),
                  lambda: tpm_policy.serialized_handle_name(data, source="h"),
                  lambda: tpm_policy.rsa_unique_from_tpm2_tools(data, source="h")):
        try:
            parse()
        except FormatError:
            pass
