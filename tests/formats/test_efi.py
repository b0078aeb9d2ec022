"""UEFI basics: variable records and signature lists, on real captured variables and on
hostile input (only FormatError may escape)."""

import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats.efi import (EFI_CERT_X509_GUID, EFI_IMAGE_SECURITY_DATABASE_GUID,
                                         UefiVariableData, decode_ucs2, encode_ucs2,
                                         parse_signature_lists, read_ucs2z)

BOOTS = Path(__file__).resolve().parents[1] / "data" / "boots"


def captured(name: str) -> bytes:
    path = BOOTS / "sb-on-uki-a" / "efivars" / f"{name}-d719b2cb-3d3a-4596-a3bc-dad00e67656f"
    if not path.exists():
        pytest.skip("no captured Secure Boot variables")
    return path.read_bytes()[4:]


def test_captured_db_holds_the_test_certificate_and_microsoft_cas():
    from cryptography import x509

    entries = parse_signature_lists(captured("db"), source="db")
    subjects = [x509.load_der_x509_certificate(e.data).subject.rfc4514_string()
                for e in entries if e.signature_type == EFI_CERT_X509_GUID]
    assert any("rhel-cvm-update test db" in s for s in subjects)
    assert any("Microsoft" in s for s in subjects)


def test_captured_dbx_parses():
    assert all(len(e.data) in (32, 48, 64) or e.signature_type == EFI_CERT_X509_GUID
               for e in parse_signature_lists(captured("dbx"), source="dbx"))


def test_variable_record_layout_matches_the_tcg_structure():
    rec = UefiVariableData(EFI_IMAGE_SECURITY_DATABASE_GUID, "db", b"\x01\x02")
    raw = rec.to_bytes()
    assert raw == (EFI_IMAGE_SECURITY_DATABASE_GUID.bytes_le + struct.pack("<QQ", 2, 2)
                   + "db".encode("utf-16-le") + b"\x01\x02")
    assert UefiVariableData.from_bytes(raw) == rec


@pytest.mark.parametrize("raw,field", [
    (b"\0" * 31, None),
    (uuid.uuid4().bytes_le + struct.pack("<QQ", 2**62, 0), "UnicodeNameLength"),
    (uuid.uuid4().bytes_le + struct.pack("<QQ", 1, 5) + b"a\0", "UnicodeNameLength"),
])
def test_bad_variable_records(raw, field):
    with pytest.raises(FormatError) as err:
        UefiVariableData.from_bytes(raw, source="ev")
    assert "ev" in str(err.value) and (field is None or field in str(err.value))


def test_signature_list_with_size_not_dividing_is_refused():
    bad = struct.pack("<16sIII", EFI_CERT_X509_GUID.bytes_le, 28 + 50, 0, 40) + b"\0" * 50
    with pytest.raises(FormatError, match="SignatureSize"):
        parse_signature_lists(bad, source="db")


def test_ucs2_rejects_surrogates_and_odd_lengths():
    with pytest.raises(FormatError):
        decode_ucs2(b"a\0b")
    with pytest.raises(FormatError):
        decode_ucs2(b"\x00\xd8\x00\xdc")
    with pytest.raises(ValueError):
        encode_ucs2("\U0001F600")
    with pytest.raises(FormatError, match="NUL"):
        read_ucs2z(b"a\0b\0", 0, 4)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_random_variable_records_raise_only_format_errors(raw):
    try:
        UefiVariableData.from_bytes(raw)
    except FormatError:
        pass


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 299), st.integers(0, 255))
def test_mutated_signature_lists_raise_only_format_errors(raw, pos, value):
    base = bytearray(struct.pack("<16sIII", EFI_CERT_X509_GUID.bytes_le, 28 + 48, 0, 48) + b"\1" * 48 + raw)
    base[pos % len(base)] = value
    try:
        parse_signature_lists(bytes(base))
    except FormatError:
        pass
