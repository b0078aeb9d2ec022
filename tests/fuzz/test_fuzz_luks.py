"""Fuzz the LUKS2 metadata and token readers with a REAL header: a LUKS2 image made by
cryptsetup with a systemd-tpm2 token enrolled by systemd-cryptenroll on swtpm.

The metadata JSON is mutated as bytes (what a damaged or hostile header hands to
`luksDump --dump-json-metadata`) and as JSON values (a valid document with hostile
fields), then read the way reseal reads it: tokens, sealed blob, public area.
Only FormatError / UnsupportedError may escape.
"""

import base64
import json
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rhel_cvm_update.errors import CvmUpdateError, FormatError
from rhel_cvm_update.formats import tpm_policy
from rhel_cvm_update.formats.luks2_header import header_size, read_json_area
from rhel_cvm_update.formats.luks_token import LuksMetadata
from tests.fuzz.mutation import mutated
from tests.swtpm_fixtures import TEST_PASSPHRASE, cryptsetup, make_luks2_image, missing_tools, swtpm  # noqa: F401

SOURCE = "fuzzed-header"
pytestmark = pytest.mark.swtpm
FUZZ = settings(max_examples=2000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.text(max_size=12)
    | st.sampled_from(["", "0", "31", "32", "-1", "sha256", "ecc", "rsa", "AAAA", "systemd-tpm2", "tpm2-import"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8)


@pytest.fixture(scope="session")
def enrolled_image(swtpm, tmp_path_factory) -> str:  # noqa: F811
    """A LUKS2 image made by cryptsetup with a systemd-tpm2 token from systemd-cryptenroll."""
    if missing_tools(["cryptsetup", "systemd-cryptenroll"]):
        pytest.skip("cryptsetup or systemd-cryptenroll is not installed")
    image = make_luks2_image(str(tmp_path_factory.mktemp("fuzz-luks") / "disk.img"))
    subprocess.run(["systemd-cryptenroll", f"--tpm2-device={swtpm.tcti}", "--tpm2-pcrs=4+7", image],
                   env=dict(os.environ, PASSWORD=TEST_PASSPHRASE.decode()), check=True, capture_output=True)
    swtpm.flush_all()
    return image


@pytest.fixture(scope="session")
def real_metadata(enrolled_image) -> bytes:
    return cryptsetup("luksDump", "--dump-json-metadata", enrolled_image).stdout


def read_like_reseal(raw: bytes) -> None:
    try:
        meta = LuksMetadata.from_json_bytes(raw, SOURCE)
        for token_id, token in meta.systemd_tpm2_tokens().items():
            token.to_json()
            _, public = tpm_policy.split_sealed_blob(token.blob, source=SOURCE)
            tpm_policy.parse_public_area(public[2:], source=SOURCE)
        meta.tpm2_import_tokens()
        meta.free_keyslot(), meta.free_token_id()
    except FormatError as e:
        assert e.source.startswith(SOURCE), e.source
    except CvmUpdateError:
        pass


def test_real_header_reads_completely(real_metadata):
    meta = LuksMetadata.from_json_bytes(real_metadata, SOURCE)
    tokens = meta.systemd_tpm2_tokens()
    assert len(tokens) == 1
    token = next(iter(tokens.values()))
    assert token.pcrs == (4, 7) and token.keyslot in meta.keyslots
    _, public = tpm_policy.split_sealed_blob(token.blob, source=SOURCE)
    assert tpm_policy.parse_public_area(public[2:], source=SOURCE).auth_policy == token.policy_hash


@FUZZ
@given(st.data())
def test_mutated_metadata_bytes(real_metadata, data):
    read_like_reseal(data.draw(mutated([real_metadata], head=len(real_metadata), max_edits=4)))


@FUZZ
@given(st.data())
def test_hostile_values_in_the_real_token(real_metadata, data):
    doc = json.loads(real_metadata)
    token_id = next(iter(doc["tokens"]))
    token = doc["tokens"][token_id]
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(token) + ["tpm2_srk", "tpm2-pcrlock", "rhel-cvm-update"]))
        if data.draw(st.booleans()):
            token[key] = data.draw(JSON_VALUES)
        else:
            token.pop(key, None)
    read_like_reseal(json.dumps(doc).encode())


@FUZZ
@given(st.data())
def test_mutated_sealed_blob_in_the_real_token(real_metadata, data):
    doc = json.loads(real_metadata)
    token = next(iter(doc["tokens"].values()))
    blob = base64.b64decode(token["tpm2-blob"])
    token["tpm2-blob"] = base64.b64encode(data.draw(mutated([blob], head=len(blob)))).decode()
    read_like_reseal(json.dumps(doc).encode())


@FUZZ
@given(st.data())
def test_hostile_tables(real_metadata, data):
    doc = json.loads(real_metadata)
    table = data.draw(st.sampled_from(["keyslots", "tokens", "segments", "digests"]))
    if data.draw(st.booleans()):
        doc[table] = data.draw(JSON_VALUES)
    else:
        doc[table][data.draw(st.sampled_from(["0", "1", "31", "32", "01", "-1", "x"]))] = data.draw(JSON_VALUES)
    read_like_reseal(json.dumps(doc).encode())


@pytest.fixture(scope="session")
def real_header_bytes(enrolled_image) -> bytes:
    """The first 2 x hdr_size bytes of the enrolled image: what status reads from the device
    (formats/luks2_header.py)."""
    with open(enrolled_image, "rb") as f:
        return f.read(2 * header_size(f.read(16), source=SOURCE))


@FUZZ
@given(st.data())
def test_mutated_binary_headers(real_header_bytes, data):
    """Edits anywhere in both header copies (magic, sizes, seqid, offsets, checksums, JSON):
    the JSON area read is the one of a copy whose checksum holds, or a FormatError names
    the source."""
    raw = data.draw(mutated([real_header_bytes], head=len(real_header_bytes), max_edits=4))
    try:
        read_like_reseal(read_json_area(raw, source=SOURCE))
    except FormatError as e:
        assert e.source == SOURCE
    except CvmUpdateError:
        pass
