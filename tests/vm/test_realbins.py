"""tests/realbins.py builds what the boot fixtures are made of; check it with other tools."""

import hashlib
import random
import shutil
import subprocess
import struct

import pytest

from tests import realbins

needs = pytest.mark.skipif


def _tool_missing(*names):
    return [n for n in names if shutil.which(n) is None]


@pytest.fixture
def payload(tmp_path):
    """A stand-in kernel: the UKI layout does not care what .linux holds."""
    rng = random.Random(4)
    path = tmp_path / "vmlinuz"
    path.write_bytes(bytes(rng.getrandbits(8) for _ in range(300_001)))
    return path


@pytest.fixture
def initrd(tmp_path):
    return realbins.busybox_initramfs(tmp_path / "initrd.img", "#!/bin/sh\nexec /bin/busybox sh\n")


def _objdump_sections(pe):
    out = subprocess.run(["objdump", "-h", str(pe)], check=True, stdout=subprocess.PIPE).stdout.decode()
    sections = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[0].isdigit():
            sections[fields[1]] = (int(fields[2], 16), int(fields[3], 16))
    return sections


@needs(bool(_tool_missing("objcopy", "objdump")) or not realbins.SYSTEMD_STUB.exists(),
       reason="objcopy/objdump or systemd-boot-efi's stub not installed")
class TestBuildUki:
    def test_same_inputs_give_identical_bytes(self, tmp_path, payload, initrd, monkeypatch):
        first = realbins.build_uki(tmp_path / "a.efi", payload, initrd, "console=ttyS0", uname="6.1.0-test")
        # objcopy stamps the wall-clock time unless SOURCE_DATE_EPOCH says otherwise; vary both.
        monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234567890")
        second = realbins.build_uki(tmp_path / "b.efi", payload, initrd, "console=ttyS0", uname="6.1.0-test")
        assert first.read_bytes() == second.read_bytes()

    def test_cmdline_changes_the_image(self, tmp_path, payload, initrd):
        a = realbins.build_uki(tmp_path / "a.efi", payload, initrd, "console=ttyS0")
        b = realbins.build_uki(tmp_path / "b.efi", payload, initrd, "console=ttyS0 quiet")
        assert a.read_bytes() != b.read_bytes()

    def test_sections_sit_above_the_stub_in_stub_order_without_overlap(self, tmp_path, payload, initrd):
        uki = realbins.build_uki(tmp_path / "u.efi", payload, initrd, "x=1", uname="6.1.0-test")
        stub = _objdump_sections(realbins.SYSTEMD_STUB)
        sections = _objdump_sections(uki)
        stub_end = max(vma + size for size, vma in stub.values())
        added = [".osrel", ".cmdline", ".uname", ".linux", ".initrd"]
        previous_end = stub_end
        for name in added:
            size, vma = sections[name]
            assert vma >= previous_end and vma % 0x1000 == 0, name
            previous_end = vma + size
        assert sections[".linux"][0] == payload.stat().st_size

    def test_section_contents_round_trip(self, tmp_path, payload, initrd):
        uki = realbins.build_uki(tmp_path / "u.efi", payload, initrd, "root=/dev/x quiet")
        cmdline = realbins.extract_section(uki, ".cmdline", tmp_path / "cmdline")
        linux = realbins.extract_section(uki, ".linux", tmp_path / "linux")
        assert cmdline.read_bytes() == b"root=/dev/x quiet"
        assert linux.read_bytes() == payload.read_bytes()

    def test_header_timestamp_is_zero_and_checksum_matches_objdump(self, tmp_path, payload, initrd):
        uki = realbins.build_uki(tmp_path / "u.efi", payload, initrd, "x=1")
        out = subprocess.run(["objdump", "-p", str(uki)], check=True, stdout=subprocess.PIPE).stdout.decode()
        assert "Time/Date\t\tThu Jan  1 00:00:00 1970" in out
        (checksum_line,) = [l for l in out.splitlines() if l.startswith("CheckSum")]
        assert int(checksum_line.split()[1], 16) == realbins.pe_checksum(uki.read_bytes())


def test_pe_checksum_matches_the_one_the_stub_was_linked_with():
    if not realbins.SYSTEMD_STUB.exists():
        pytest.skip("systemd-boot-efi not installed")
    image = realbins.SYSTEMD_STUB.read_bytes()
    _, checksum_at = realbins._pe_offsets(image)
    (linked,) = struct.unpack_from("<I", image, checksum_at)
    assert linked != 0
    assert realbins.pe_checksum(image) == linked


@needs(bool(_tool_missing("cpio")) or not realbins.BUSYBOX.exists(), reason="cpio or busybox-static missing")
def test_initramfs_is_reproducible_and_readable_by_cpio(tmp_path):
    module = tmp_path / "efivarfs.ko"
    module.write_bytes(b"\x7fELF module stand-in")
    a = realbins.busybox_initramfs(tmp_path / "a.img", "#!/bin/sh\necho hi\n", {"lib/modules/efivarfs.ko": module})
    b = realbins.busybox_initramfs(tmp_path / "b.img", "#!/bin/sh\necho hi\n", {"lib/modules/efivarfs.ko": module})
    assert a.read_bytes() == b.read_bytes()
    listing = subprocess.run(["sh", "-c", 'zcat "$1" | cpio -tv --quiet', "-", str(a)],
                             check=True, stdout=subprocess.PIPE).stdout.decode()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing.splitlines()]
    assert names == sorted(names)
    assert {"init", "bin/busybox", "bin/sh", "dev/console", "lib/modules/efivarfs.ko"} <= set(names)
    console = [l for l in listing.splitlines() if l.endswith("dev/console")][0]
    assert console.startswith("crw-------") and "5,   1" in console


@needs(bool(_tool_missing("openssl", "sbsign", "sbverify", "pesign", "objcopy")) or not realbins.SYSTEMD_STUB.exists(),
       reason="openssl, sbsigntool, pesign or binutils missing")
def test_signed_uki_verifies_with_the_test_cert_and_has_its_own_digest(tmp_path, payload, initrd):
    key, cert = realbins.make_test_keys(tmp_path / "keys")
    uki = realbins.build_uki(tmp_path / "u.efi", payload, initrd, "x=1")
    signed = realbins.sign(uki, key, cert, tmp_path / "u.signed.efi")
    subprocess.run(["sbverify", "--cert", str(cert), str(signed)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert realbins.pesign_digest(signed) != realbins.pesign_digest(uki)
    fingerprint = realbins.cert_sha256_fingerprint(cert)
    der = (tmp_path / "keys" / "db.der").read_bytes()
    assert fingerprint == hashlib.sha256(der).hexdigest()
