"""Hostile PE input: every refusal is a FormatError naming the source and an offset, and
nothing else (IndexError, struct.error, ValueError, MemoryError) ever escapes."""

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rhel_cvm_update.errors import FormatError, UnsupportedError
from rhel_cvm_update.formats import authenticode, pe, uki
from tests.pebuild import CODE, Section, build_pe, win_certificate

SOURCE = "hostile.efi"


def good_image(pe32_plus=True):
    return build_pe([Section(b".text", b"\x90" * 1000, characteristics=CODE),
                     Section(b".data", b"abc" * 100)], pe32_plus=pe32_plus, trailing=b"tail",
                    certificates=[win_certificate(b"s" * 40)], with_layout=True)


def refused(data, field=None):
    with pytest.raises(FormatError) as e:
        authenticode.authenticode_digests(data, authenticode.HASH_ALGORITHMS, source=SOURCE)
    assert e.value.source == SOURCE
    assert e.value.offset is not None
    assert SOURCE in str(e.value)
    if field is not None:
        assert e.value.field == field
    return e.value


def boundaries(layout, size):
    """Every header boundary of the builder's layout, plus section data ends."""
    opt = layout.optional_header_offset
    points = {0, 1, 2, 0x3C, 0x40, layout.pe_offset, layout.pe_offset + 4, layout.pe_offset + 6,
              layout.pe_offset + 24, opt + 2, opt + 64, opt + 68, opt + 92, opt + 108, opt + 112,
              layout.section_table_offset}
    points.update(layout.section_table_offset + 40 * i + d for i in range(len(layout.sections))
                  for d in (0, 8, 16, 20, 40))
    points.add(layout.size_of_headers - 1)
    points.add(layout.size_of_headers)
    points.update(p + r - 1 for _, _, p, r in layout.sections)
    points.add(layout.certificate_table[0] + 4)
    points.add(size - 1)
    return sorted(p for p in points if 0 <= p < size)


@pytest.mark.parametrize("pe32_plus", [True, False])
def test_truncated_at_every_header_boundary(pe32_plus):
    data, layout = good_image(pe32_plus)
    authenticode.authenticode_digest(data)  # the untruncated image is fine
    for cut in boundaries(layout, len(data)):
        error = refused(data[:cut])
        assert 0 <= error.offset <= len(data)


def test_no_mz_is_refused():
    data, _ = good_image()
    assert refused(b"ZM" + data[2:], "e_magic").offset == 0
    assert refused(b"", "DOS header").offset == 0


@pytest.mark.parametrize("e_lfanew", [0xFFFFFFFF, 0x7FFFFFFF, 0x10000, 0x200 - 4])
def test_e_lfanew_out_of_range(e_lfanew):
    data, _ = good_image()
    bad = bytearray(data)
    struct.pack_into("<I", bad, 0x3C, e_lfanew)
    error = refused(bytes(bad))
    assert error.offset in (0x3C, e_lfanew)


def test_wrong_pe_signature_and_magic():
    data, layout = good_image()
    bad = bytearray(data)
    bad[layout.pe_offset:layout.pe_offset + 4] = b"NE\0\0"
    assert refused(bytes(bad), "Signature").offset == layout.pe_offset
    bad = bytearray(data)
    struct.pack_into("<H", bad, layout.optional_header_offset, 0x107)
    assert refused(bytes(bad), "Magic").offset == layout.optional_header_offset


@pytest.mark.parametrize("count", [97, 1000, 0xFFFF])
def test_absurd_number_of_sections(count):
    data, layout = good_image()
    bad = bytearray(data)
    struct.pack_into("<H", bad, layout.pe_offset + 6, count)
    assert refused(bytes(bad), "NumberOfSections").offset == layout.pe_offset + 6


def test_sections_beyond_size_of_headers():
    # 90 sections declared, only 2 written: the table runs past SizeOfHeaders.
    data, layout = good_image()
    bad = bytearray(data)
    struct.pack_into("<H", bad, layout.pe_offset + 6, 90)
    refused(bytes(bad))


@pytest.mark.parametrize("nrva", [17, 0xFFFFFFFF])
def test_too_many_data_directories(nrva):
    data, layout = good_image()
    bad = bytearray(data)
    struct.pack_into("<I", bad, layout.optional_header_offset + 108, nrva)
    refused(bytes(bad), "NumberOfRvaAndSizes")


def test_size_of_optional_header_mismatch():
    data, layout = good_image()
    bad = bytearray(data)
    struct.pack_into("<H", bad, layout.pe_offset + 20, 0xFFFF)
    refused(bytes(bad), "SizeOfOptionalHeader")


@pytest.mark.parametrize("value", [0, 0x100, 0xFFFFFFFF, 0x7FFFF000])
def test_size_of_headers_bad(value):
    data, layout = good_image()
    bad = bytearray(data)
    struct.pack_into("<I", bad, layout.optional_header_offset + 60, value)
    refused(bytes(bad), "SizeOfHeaders")


def test_size_of_headers_past_end_of_file():
    data = build_pe([], size_of_headers=0x400, size_of_image=0x2000)[:0x300]
    refused(data, "SizeOfHeaders")


@pytest.mark.parametrize("value", [0, 0x200, 0x201])
def test_size_of_image_too_small(value):
    data, layout = good_image()
    bad = bytearray(data)
    struct.pack_into("<I", bad, layout.optional_header_offset + 56, value)
    refused(bytes(bad), "SizeOfImage" if value <= layout.section_table_offset + 80 else None)


@pytest.mark.parametrize("pointer,size", [(0x400, 0xFFFFFFFF), (0xFFFFFFF0, 0x20), (0x400, 0x100000)])
def test_section_raw_data_past_end(pointer, size):
    data, layout = good_image()
    bad = bytearray(data)
    struct.pack_into("<II", bad, layout.section_table_offset + 16, size, pointer)
    assert refused(bytes(bad), "SizeOfRawData").offset == layout.section_table_offset + 16


def test_section_inside_headers():
    data, layout = good_image()
    bad = bytearray(data)
    struct.pack_into("<I", bad, layout.section_table_offset + 20, 0x10)
    assert refused(bytes(bad)).offset == layout.section_table_offset + 12


@pytest.mark.parametrize("offset,size", [(0xFFFFFFFF, 8), (0, 0xFFFFFFFF), (0x1000, 0x100000)])
def test_certificate_table_past_end(offset, size):
    data, layout = good_image()
    bad = bytearray(data)
    dd = layout.optional_header_offset + 112 + 32
    struct.pack_into("<II", bad, dd, offset, size)
    assert refused(bytes(bad), "DataDirectory[SECURITY]").offset == dd


def test_refusals_are_quick_on_huge_declared_sizes(tmp_path):
    # A 64 KiB file declaring 65535 sections and 4 GiB of raw data is refused from the
    # headers alone (no loop over absurd counts, no allocation of declared sizes).
    data, layout = good_image()
    bad = bytearray(data)
    struct.pack_into("<H", bad, layout.pe_offset + 6, 0xFFFF)
    refused(bytes(bad))


# --- property tests --------------------------------------------------------------------------

REAL_HEADERS = [Path(p) for p in ("/usr/lib/shim/shimx64.efi.signed",
                                  "/usr/lib/systemd/boot/efi/linuxx64.efi.stub")]


def _seeds():
    seeds = [good_image(True)[0], good_image(False)[0]]
    for path in REAL_HEADERS:
        if path.exists():
            seeds.append(path.read_bytes()[:8192])
    return seeds


SEEDS = _seeds()


def exercise(data):
    """Everything a caller may do with untrusted bytes; only our errors may escape."""
    try:
        image = pe.PEImage.parse(data, SOURCE)
        authenticode.authenticode_digests(data, ("sha1", "sha256"), SOURCE)
        pe.certificates(data, image)
        for section in image.sections:
            pe.loaded_section(data, section)
        if uki.is_uki(image):
            u = uki.UKI.from_pe(data, image)
            (u.cmdline, u.osrel, u.uname, u.sbat, u.kernel_version)
        uki.shim_sbat_levels(data, SOURCE, image)
        authenticode.shim_authenticode_digest(data, source=SOURCE)
    except FormatError as e:
        assert e.source.startswith(SOURCE)
    except UnsupportedError:
        pass


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), mutations=st.lists(
    st.tuples(st.integers(min_value=0, max_value=8191), st.integers(min_value=0, max_value=255)),
    min_size=1, max_size=8), cut=st.one_of(st.none(), st.integers(min_value=0, max_value=8192)))
def test_mutated_headers_only_raise_our_errors(seed, mutations, cut):
    data = bytearray(seed)
    for position, value in mutations:
        # Aim half the mutations at the first 1 KiB, where the headers are.
        position = position % 1024 if value % 2 else position % len(data)
        data[position] = value
    if cut is not None:
        data = data[:cut]
    exercise(bytes(data))


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=0, max_size=2048))
def test_random_bytes_with_mz_only_raise_our_errors(blob):
    data = bytearray(b"MZ" + blob)
    if len(data) >= 0x40:
        struct.pack_into("<I", data, 0x3C, 0x40 + (blob[0] if blob else 0) % 0x40)
    exercise(bytes(data))


@settings(max_examples=2000, deadline=None)
@given(fields=st.fixed_dictionaries({
    "nsections": st.integers(0, 0xFFFF), "opt_size": st.integers(0, 0xFFFF),
    "magic": st.sampled_from([0x10B, 0x20B, 0x107, 0]), "nrva": st.integers(0, 40),
    "headers": st.integers(0, 0x10000), "image": st.integers(0, 0x100000),
    "cert": st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)),
    "raw": st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)),
}))
def test_random_header_fields_only_raise_our_errors(fields):
    """Structurally valid signatures with random field values: reaches the deep checks."""
    data, layout = good_image()
    bad = bytearray(data)
    opt = layout.optional_header_offset
    struct.pack_into("<H", bad, layout.pe_offset + 6, fields["nsections"])
    struct.pack_into("<H", bad, layout.pe_offset + 20, fields["opt_size"])
    struct.pack_into("<H", bad, opt, fields["magic"])
    struct.pack_into("<I", bad, opt + 108, fields["nrva"])
    struct.pack_into("<I", bad, opt + 60, fields["headers"])
    struct.pack_into("<I", bad, opt + 56, fields["image"])
    struct.pack_into("<II", bad, opt + 144, *fields["cert"])
    struct.pack_into("<II", bad, layout.section_table_offset + 56, *fields["raw"])
    exercise(bytes(bad))


def test_mutation_seeds_include_real_binaries():
    if not all(p.exists() for p in REAL_HEADERS):
        pytest.skip("Debian shim-signed / systemd-boot-efi not installed")
    assert len(SEEDS) == 4
