"""Fuzz the UKI section readers: real objcopy-built UKIs (Debian's systemd stub) and Debian's
signed shim, with the section contents and section-table fields mutated.

tests/formats/test_pe_hostile.py already mutates the PE headers; here the bytes under the
section table change: .osrel, .cmdline, .uname, .linux (its bzImage setup header), .sbat and
shim's .sbatlevel, and each section's VirtualSize.  Only the project's errors may escape.
"""

import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rhel_cvm_update.errors import CvmUpdateError, FormatError
from rhel_cvm_update.formats import pe, uki
from tests import realbins
from tests.fuzz.mutation import BOUNDARY_U32, mutated

SOURCE = "fuzz.efi"
SHIM_SIGNED = Path("/usr/lib/shim/shimx64.efi.signed")
FUZZ = settings(max_examples=2000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TEXT_SECTIONS = (".osrel", ".cmdline", ".uname", ".linux", ".sbat", ".sbatlevel")


def fake_bzimage(version: bytes) -> bytes:
    """A kernel with a boot-protocol 2.15 setup header whose kernel_version points at ``version``."""
    kernel = bytearray(0x1000)
    kernel[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", kernel, 0x206, 0x020F)
    struct.pack_into("<H", kernel, 0x20E, 0x300)
    kernel[0x500:0x500 + len(version) + 1] = version + b"\0"
    return bytes(kernel)


@pytest.fixture(scope="session")
def seeds(tmp_path_factory):
    if not realbins.SYSTEMD_STUB.exists() or shutil.which("objcopy") is None:
        pytest.skip("objcopy or Debian's systemd stub (systemd-boot-efi) is not installed")
    work = tmp_path_factory.mktemp("fuzz-uki")
    (work / "kernel").write_bytes(fake_bzimage(b"6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP"))
    (work / "initrd").write_bytes(b"initrd")
    out = [realbins.build_uki(work / "with-uname.efi", work / "kernel", work / "initrd", "console=ttyS0 quiet",
                              uname="5.14.0-362.8.1.el9_3.x86_64").read_bytes(),
           realbins.build_uki(work / "no-uname.efi", work / "kernel", work / "initrd", "root=/dev/vda2",
                              osrel='NAME="Red Hat Enterprise Linux"\nVERSION_ID="9.3"\n# comment\n').read_bytes()]
    if SHIM_SIGNED.exists():
        out.append(SHIM_SIGNED.read_bytes())
    return out


def exercise(data: bytes) -> None:
    """Everything the tool does with a UKI or shim it did not build; only our errors may escape."""
    try:
        image = pe.PEImage.parse(data, SOURCE)
        uki.pe_sbat(data, image)
        uki.shim_sbat_levels(data, SOURCE, image)
        if uki.is_uki(image):
            u = uki.UKI.from_pe(data, image)
            (u.cmdline, u.osrel, u.uname, u.sbat, u.kernel_version_with_origin(), u.sections)
            u.linux_authenticode_digests(("sha256",))
    except FormatError as e:
        assert e.source.startswith(SOURCE), e.source
    except CvmUpdateError:
        pass


def test_seeds_are_whole_ukis(seeds):
    """The unmutated seeds parse completely: the mutations start from valid input."""
    for data in seeds[:2]:
        u = uki.UKI.parse(data, SOURCE)
        assert u.kernel_version_with_origin()[0] in ("5.14.0-362.8.1.el9_3.x86_64", "6.1.0-56-cloud-amd64")
        assert u.cmdline in ("console=ttyS0 quiet", "root=/dev/vda2")


@FUZZ
@given(st.data())
def test_mutated_section_contents(seeds, data):
    seed = data.draw(st.sampled_from(seeds))
    image = pe.PEImage.parse(seed, SOURCE)
    targets = [s for s in image.sections if s.full_name in TEXT_SECTIONS and s.size_of_raw_data]
    section = data.draw(st.sampled_from(targets))
    raw = bytes(seed[section.pointer_to_raw_data:section.pointer_to_raw_data + section.size_of_raw_data])
    # Keep the layout: the mutated contents are cut or zero-padded to SizeOfRawData.
    content = data.draw(mutated([raw[:2048]], head=0x600))[:len(raw)]
    buf = bytearray(seed)
    buf[section.pointer_to_raw_data:section.pointer_to_raw_data + len(raw)] = content.ljust(len(raw), b"\0")
    exercise(bytes(buf))


@FUZZ
@given(st.data())
def test_mutated_section_table_fields(seeds, data):
    seed = data.draw(st.sampled_from(seeds))
    image = pe.PEImage.parse(seed, SOURCE)
    buf = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        section = data.draw(st.sampled_from(image.sections))
        # VirtualSize, VirtualAddress, SizeOfRawData, PointerToRawData, or the name.
        field = data.draw(st.sampled_from((8, 12, 16, 20, 0)))
        if field:
            value = data.draw(st.one_of(st.sampled_from(BOUNDARY_U32), st.integers(0, 0xFFFFFFFF)))
            struct.pack_into("<I", buf, section.header_offset + field, value)
        else:
            name = data.draw(st.sampled_from([n.encode() for n in TEXT_SECTIONS] + [b"/4", b""]))
            buf[section.header_offset:section.header_offset + 8] = name.ljust(8, b"\0")
    exercise(bytes(buf))


@FUZZ
@given(st.data())
def test_mutated_whole_images(seeds, data):
    exercise(data.draw(mutated(seeds, head=1024)))


def test_four_gib_virtual_size_is_refused_quickly(seeds):
    """A .linux claiming 4 GiB of zero fill is refused without allocating it."""
    image = pe.PEImage.parse(seeds[0], SOURCE)
    linux = image.section(".linux")
    buf = bytearray(seeds[0])
    struct.pack_into("<I", buf, linux.header_offset + 8, 0xFFFFFFFF)
    struct.pack_into("<I", buf, image.optional_header_offset + 56, 0xFFFFFFFF)  # SizeOfImage
    with pytest.raises(CvmUpdateError):
        u = uki.UKI.parse(bytes(buf), SOURCE)
        u.linux_payload()


def test_section_without_file_data_has_no_pointer_to_check(seeds):
    """SizeOfRawData 0 means no file data (edk2 reads nothing and ignores PointerToRawData),
    so a garbage pointer there is no error; found by this fuzzer as a FormatError naming no
    source."""
    image = pe.PEImage.parse(seeds[0], SOURCE)
    sbat = image.section(".sbat")
    buf = bytearray(seeds[0])
    struct.pack_into("<II", buf, sbat.header_offset + 16, 0, 0xFFFFFFF0)  # SizeOfRawData, PointerToRawData
    image = pe.PEImage.parse(bytes(buf), SOURCE)
    section = image.section(".sbat")
    assert bytes(pe.section_bytes(bytes(buf), section)) == b""
    assert len(pe.loaded_section(bytes(buf), section)) == section.virtual_size
    exercise(bytes(buf))
