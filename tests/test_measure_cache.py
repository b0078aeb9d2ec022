"""The digest cache that lets an update hash a 100 MiB UKI once: detect's digests are the
prediction's, for the very same file only (a file rewritten or renamed over is hashed again)."""

import os
import shutil

import pytest

from rhel_cvm_update import measure
from rhel_cvm_update.formats import authenticode
from tests import realbins

SHIM = "/usr/lib/shim/shimx64.efi"


@pytest.fixture
def pe_file(tmp_path):
    if not os.path.exists(SHIM):
        pytest.skip("shim-unsigned is not installed")
    path = tmp_path / "image.efi"
    shutil.copyfile(SHIM, path)
    return path


def counting(monkeypatch):
    calls = []
    real = authenticode.authenticode_digests
    monkeypatch.setattr(measure, "authenticode_digests", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_detect_then_measure_hashes_once(pe_file, monkeypatch):
    calls = counting(monkeypatch)
    cache = measure.DigestCache()
    digests, kernel = measure.image_digests(str(pe_file), ["sha1", "sha256"], cache)
    measured = measure.measure_image(str(pe_file), ["sha1", "sha256"], cache)
    assert len(calls) == 1 and kernel is None
    assert measured.authenticode == digests
    assert digests["sha256"].hex() == realbins.pesign_digest(pe_file)


def test_a_changed_file_is_hashed_again(pe_file, tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    cache = measure.DigestCache()
    first, _ = measure.image_digests(str(pe_file), ["sha256"], cache)
    # Same name and size, new bytes renamed over it (as rpm installs a file).
    data = bytearray(pe_file.read_bytes())
    data[-1] ^= 0xFF
    replacement = tmp_path / "new.efi"
    replacement.write_bytes(bytes(data))
    os.replace(replacement, pe_file)
    second, _ = measure.image_digests(str(pe_file), ["sha256"], cache)
    assert len(calls) == 2 and first != second
    # Other banks are another entry too.
    measure.image_digests(str(pe_file), ["sha1", "sha256"], cache)
    assert len(calls) == 3
