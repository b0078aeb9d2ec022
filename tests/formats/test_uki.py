"""UKI parsing against real UKIs built from Debian's systemd-stub + a Debian kernel
(tests/realbins.py: objcopy, sbsign), checked with pesign, objcopy, objdump and sbattach."""

import mmap
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from rhel_cvm_update.errors import FormatError, UnsupportedError
from rhel_cvm_update.formats import authenticode, pe, uki
from tests import realbins
from tests.pebuild import CODE, Section, build_pe, pesign_hash

CMDLINE = "console=ttyS0 quiet root=/dev/mapper/root rd.luks.options=tpm2-device=auto"
OSREL = 'NAME="Red Hat Enterprise Linux"\nVERSION_ID="9.2"\n# comment\nPRETTY_NAME=\'RHEL 9.2 (Plow)\'\nID=rhel\n'
SHIM = Path("/usr/lib/shim/shimx64.efi")


def need_tools(*names):
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def mapped(path):
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


@pytest.fixture(scope="module")
def kernel():
    need_tools("apt-get", "dpkg-deb")
    return realbins.fetch_kernel_package("linux-image-cloud-amd64")


@pytest.fixture(scope="module")
def built(kernel, tmp_path_factory):
    """Unsigned UKI, the same with .uname, and a signed copy."""
    need_tools("objcopy", "sbsign", "openssl", "pesign")
    if not realbins.SYSTEMD_STUB.exists():
        pytest.skip("systemd-boot-efi (linuxx64.efi.stub) is not installed")
    work = tmp_path_factory.mktemp("uki")
    initrd = work / "initrd.img"
    initrd.write_bytes(b"070701" + bytes(range(256)) * 40 + b"odd")
    plain = realbins.build_uki(work / "plain.efi", kernel.vmlinuz, initrd, CMDLINE, osrel=OSREL)
    named = realbins.build_uki(work / "named.efi", kernel.vmlinuz, initrd, CMDLINE, osrel=OSREL,
                               uname="6.99.0-test.x86_64")
    key, cert = realbins.make_test_keys(work / "keys")
    signed = realbins.sign(plain, key, cert, work / "signed.efi")
    return {"plain": plain, "named": named, "signed": signed, "work": work}


def objdump_section(path, name):
    """(VirtualSize, file offset) of a section, as objdump -h prints them."""
    listing = subprocess.run(["objdump", "-h", str(path)], stdout=subprocess.PIPE, check=True).stdout.decode()
    for row in (line.split() for line in listing.splitlines()):
        if len(row) >= 7 and row[0].isdigit() and row[1] == name:
            return int(row[2], 16), int(row[5], 16)
    raise AssertionError(f"objdump shows no {name} in {path}")


def test_real_uki_digest_matches_pesign(built):
    for name in ("plain", "named", "signed"):
        with mapped(built[name]) as m:
            assert authenticode.authenticode_digest(m) == pesign_hash(built[name]), name


def test_signing_changes_the_digest_of_an_unaligned_uki(built):
    """objcopy keeps the stub's COFF symbol table as trailing data, so the UKI's size is not
    a multiple of 8.  sbsign pads it before appending the signature: the signed UKI's digest
    is shim 16.1's padded digest of the unsigned one, not edk2's (reference 1.3)."""
    plain = built["plain"].read_bytes()
    assert len(plain) % 8, "realbins UKIs are expected to end unaligned"
    signed = authenticode.authenticode_digest(built["signed"].read_bytes())
    assert signed == authenticode.shim_authenticode_digest(plain, shim_version="16.1")
    assert signed != authenticode.authenticode_digest(plain)


def test_signed_uki_certificate_matches_sbattach(built):
    need_tools("sbattach")
    detached = built["work"] / "uki.p7"
    subprocess.run(["sbattach", "--detach", str(detached), str(built["signed"])], check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    data = built["signed"].read_bytes()
    image = pe.PEImage.parse(data)
    certs = pe.certificates(data, image)
    assert image.is_signed and len(certs) == 1
    assert certs[0].data == detached.read_bytes()


def test_linux_payload_is_virtual_size_bytes_and_its_digest_matches_pesign(built, kernel):
    vsize, _ = objdump_section(built["plain"], ".linux")
    extracted = realbins.extract_section(built["plain"], ".linux", built["work"] / "linux.bin").read_bytes()
    payload_file = built["work"] / "linux-vsize.bin"
    payload_file.write_bytes(extracted[:vsize] + bytes(max(0, vsize - len(extracted))))
    with mapped(built["plain"]) as m:
        image = uki.UKI.parse(m, str(built["plain"]))
        payload = image.linux_payload()
        digests = image.linux_authenticode_digests(("sha1", "sha256"))
    assert payload == payload_file.read_bytes()
    assert digests["sha256"] == pesign_hash(payload_file)
    assert digests["sha1"] == pesign_hash(payload_file, "sha1")
    # ... which is the vmlinuz's own digest: objcopy sets VirtualSize to the file size.
    assert digests["sha256"] == pesign_hash(kernel.vmlinuz)


def test_uki_fields(built, kernel):
    with mapped(built["plain"]) as m:
        plain = uki.UKI.parse(m, "plain.efi")
        assert plain.sections[-4:] == [".osrel", ".cmdline", ".linux", ".initrd"]
        assert plain.cmdline == CMDLINE
        assert plain.osrel == {"NAME": "Red Hat Enterprise Linux", "VERSION_ID": "9.2",
                               "PRETTY_NAME": "RHEL 9.2 (Plow)", "ID": "rhel"}
        assert plain.uname is None
        # No .uname: the bzImage setup header names the release the package is built for.
        assert plain.kernel_version_with_origin() == (kernel.release, "bzImage header")
        stub_sbat = realbins.extract_section(realbins.SYSTEMD_STUB, ".sbat", built["work"] / "sbat")
        assert plain.sbat == stub_sbat.read_bytes().rstrip(b"\0").decode()
    with mapped(built["named"]) as m:
        named = uki.UKI.parse(m, "named.efi")
        assert named.kernel_version_with_origin() == ("6.99.0-test.x86_64", ".uname")


def test_kernel_version_header_matches_file_output(kernel):
    """file(1) reads the same setup-header string."""
    need_tools("file")
    described = subprocess.run(["file", "-b", str(kernel.vmlinuz)], stdout=subprocess.PIPE,
                               check=True).stdout.decode()
    version = uki.bzimage_version_string(kernel.vmlinuz.read_bytes())
    assert f"version {version.split()[0]} " in described


def test_linux_virtual_size_beyond_raw_data_is_zero_filled(kernel, tmp_path):
    """ukify 257.0-257.2 set .linux VirtualSize to the kernel's SizeOfImage: the stub then
    hands LoadImage zeros after the file data, and the kernel's digest changes."""
    need_tools("pesign")
    vmlinuz = kernel.vmlinuz.read_bytes()
    extra = 0x5000
    image = build_pe([Section(b".text", b"\x90" * 100, characteristics=CODE),
                      Section(b".linux", vmlinuz, virtual_size=len(vmlinuz) + extra)])
    padded = tmp_path / "vmlinuz-zero-filled"
    padded.write_bytes(vmlinuz + bytes(extra))
    parsed = uki.UKI.parse(image, "ukify-257.0.efi")
    assert parsed.linux_payload() == padded.read_bytes()
    digest = parsed.linux_authenticode_digests()["sha256"]
    assert digest == pesign_hash(padded)
    assert digest != pesign_hash(kernel.vmlinuz)


# --- synthetic UKIs ---------------------------------------------------------------------------

def fake_bzimage(version: bytes = b"6.1.0-99-test (builder@host) #1 SMP", protocol: int = 0x020F) -> bytes:
    kernel = bytearray(build_pe([Section(b".text", b"\x90" * 600, characteristics=CODE)],
                                size_of_headers=0x400))
    kernel[0x202:0x206] = b"HdrS"
    struct.pack_into("<HH", kernel, 0x206, protocol, 0)
    struct.pack_into("<H", kernel, 0x20E, 0x300 - 0x200)
    kernel[0x300:0x300 + len(version) + 1] = version + b"\0"
    return bytes(kernel)


def synthetic_uki(*extra, linux=None):
    sections = [Section(b".text", b"\x90" * 100, characteristics=CODE)] + list(extra)
    if linux is not False:
        sections.append(linux or Section(b".linux", fake_bzimage()))
    return build_pe(sections)


def test_bzimage_version_from_header():
    assert uki.bzimage_version_string(fake_bzimage()) == "6.1.0-99-test (builder@host) #1 SMP"
    parsed = uki.UKI.parse(synthetic_uki(Section(b".cmdline", b"quiet\0")))
    assert parsed.kernel_version_with_origin() == ("6.1.0-99-test", "bzImage header")
    assert parsed.cmdline == "quiet"


@pytest.mark.parametrize("kernel", [b"", b"MZ" + bytes(0x300), fake_bzimage(protocol=0x01FF),
                                    fake_bzimage(version=b"")])
def test_no_bzimage_version(kernel):
    assert uki.bzimage_version_string(kernel) is None


def test_plain_pe_is_not_a_uki():
    data = synthetic_uki(linux=False)
    assert not uki.is_uki(pe.PEImage.parse(data))
    with pytest.raises(FormatError) as e:
        uki.UKI.parse(data, "stub.efi")
    assert e.value.field == ".linux" and e.value.source == "stub.efi"


def test_duplicate_stub_section_is_unsupported():
    with pytest.raises(UnsupportedError):
        uki.UKI.parse(synthetic_uki(Section(b".cmdline", b"a"), Section(b".cmdline", b"b")))


def test_linux_with_zero_virtual_size_is_refused():
    with pytest.raises(FormatError) as e:
        uki.UKI.parse(synthetic_uki(linux=Section(b".linux", fake_bzimage(), virtual_size=0)), "z.efi")
    assert e.value.field == "VirtualSize"


def test_text_sections_read_through_virtual_size():
    # The raw data is padded to the file alignment with zeros; VirtualSize cuts it.  A
    # section with VirtualSize 0 does not exist for systemd-stub.
    parsed = uki.UKI.parse(synthetic_uki(Section(b".cmdline", b"ro quiet GARBAGE", virtual_size=8),
                                         Section(b".uname", b"6.2.0", virtual_size=0)))
    assert parsed.cmdline == "ro quiet"
    assert parsed.uname is None


def test_non_utf8_text_section_is_a_format_error():
    with pytest.raises(FormatError) as e:
        uki.UKI.parse(synthetic_uki(Section(b".cmdline", b"\xff\xfe"))).cmdline
    assert e.value.field == ".cmdline"


@pytest.mark.parametrize("text", ["NAME", "NAME=\"unterminated", "BAD KEY=x"])
def test_bad_os_release_lines(text):
    with pytest.raises(FormatError):
        uki.parse_os_release(text, "osrel")


def test_os_release_quoting():
    assert uki.parse_os_release('A="x y"\nB=\'q\'\nC=plain\n\n#X=1\nD="a\\"b"') == \
        {"A": "x y", "B": "q", "C": "plain", "D": 'a"b'}


# --- shim .sbatlevel --------------------------------------------------------------------------

def test_shim_sbat_levels_match_objcopy(tmp_path):
    need_tools("objcopy")
    if not SHIM.exists():
        pytest.skip("shim-unsigned is not installed")
    raw = realbins.extract_section(SHIM, ".sbatlevel", tmp_path / "sbatlevel").read_bytes()
    # Two NUL-terminated strings follow the 12-byte header, previous first.
    previous, latest = raw[12:].split(b"\0")[:2]
    with mapped(SHIM) as m:
        levels = uki.shim_sbat_levels(m, str(SHIM))
        image = pe.PEImage.parse(m, str(SHIM))
        assert uki.pe_sbat(m, image).startswith("sbat,1,")
    assert levels == {"previous": previous.decode(), "latest": latest.decode()}
    assert levels["previous"].startswith("sbat,1,")


def _sbatlevel(version=0, previous=8, latest=17, body=b"sbat,1,A\0sbat,1,B\0"):
    return build_pe([Section(b".sbatlevel", struct.pack("<III", version, previous, latest) + body)])


def test_sbatlevel_synthetic_and_absent():
    # .sbatlevel fits in 8 bytes only as a raw name; GNU ld writes it as "/N" + string table,
    # and the lookup accepts both.
    assert uki.shim_sbat_levels(_sbatlevel()) == {"previous": "sbat,1,A", "latest": "sbat,1,B"}
    assert uki.shim_sbat_levels(build_pe([Section(b".data", b"x")])) == {}


@pytest.mark.parametrize("previous,latest", [(0, 16), (8, 0x1000), (8, 27)])
def test_sbatlevel_bad_offsets(previous, latest):
    with pytest.raises(FormatError):
        uki.shim_sbat_levels(_sbatlevel(previous=previous, latest=latest, body=b"sbat,1,A\0sbat,1,B"), "s")


def test_sbatlevel_unknown_version():
    with pytest.raises(UnsupportedError):
        uki.shim_sbat_levels(_sbatlevel(version=1))


# --- real OVMF boots (fixtures captured by tests/vm/capture.py) ------------------------------

BOOTS = Path(__file__).resolve().parent.parent / "data" / "boots"


def secure_boot_off_fixtures():
    import json

    return sorted(p.parent.name for p in BOOTS.glob("*/boot.json")
                  if not json.loads(p.read_text())["secure_boot"])


@pytest.mark.parametrize("name", secure_boot_off_fixtures())
def test_ovmf_measured_the_kernel_with_our_linux_digest(name, tmp_path):
    """Secure Boot off: the third PCR4 application event is the kernel systemd-stub loads
    (reference 2.3).  Rebuild a UKI around the same Debian vmlinuz with the captured .linux
    VirtualSize and compare our .linux payload digest in every bank."""
    import hashlib
    import json

    from rhel_cvm_update.formats import tcglog

    need_tools("apt-get", "dpkg-deb")
    boot = json.loads((BOOTS / name / "boot.json").read_text())
    recorded = boot["uki"]["kernel"]
    kernel = realbins.fetch_kernel_package(recorded["metapackage"], recorded["version"])
    vmlinuz = kernel.vmlinuz.read_bytes()
    if hashlib.sha256(vmlinuz).hexdigest() != recorded["vmlinuz_sha256"]:
        pytest.skip(f"kernel {recorded['version']} is no longer downloadable; got {kernel.version}")
    log = tcglog.parse_event_log((BOOTS / name / "eventlog.bin").read_bytes(), name)
    events = [e for e in log.events if e.pcr == 4 and e.event_type == 0x80000003]
    image = build_pe([Section(b".text", b"\x90" * 100, characteristics=CODE),
                      Section(b".linux", vmlinuz, virtual_size=boot["uki"]["linux_section"]["virtual_size"])])
    ours = uki.UKI.parse(image, name).linux_authenticode_digests(log.banks)
    assert events[2].digests == ours


def test_one_pass_gives_the_uki_and_kernel_digests_pesign_gives(built, tmp_path):
    """``UKI.authenticode_digests`` hashes the file once, feeding the kernel's ranges from the
    same slices: both digests equal pesign's of the UKI and of the extracted .linux."""
    need_tools("pesign", "objcopy")
    for name in ("plain", "signed"):
        kernel = realbins.extract_section(built[name], ".linux", tmp_path / f"{name}-linux.efi")
        with open(built[name], "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            image = pe.PEImage.parse(m, name)
            outer, inner = uki.UKI.from_pe(m, image).authenticode_digests(authenticode.HASH_ALGORITHMS)
            assert outer["sha256"] == pesign_hash(built[name]), name
            assert inner["sha256"] == pesign_hash(kernel), name
            for algorithm in authenticode.HASH_ALGORITHMS:  # and the separate passes agree
                assert outer[algorithm] == authenticode.authenticode_digests(m, (algorithm,))[algorithm]
                assert inner[algorithm] == authenticode.authenticode_digests(kernel.read_bytes(), (algorithm,))[algorithm]

