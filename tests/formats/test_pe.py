"""Authenticode digests against tools outside this project: pesign, sbsign (read back with
osslsigncode), objcopy, sbattach -- on Debian's real shim/systemd binaries and on
synthetic images for every edge case of measured-boot-reference.md 1.2."""

import hashlib
import mmap
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from rhel_cvm_update.errors import FormatError, UnsupportedError
from rhel_cvm_update.formats import authenticode, pe
from tests.pebuild import (
    CODE, Section, build_pe, pesign_hash, sbsign_digest, win_certificate,
)

REAL_PE_FILES = [
    "/usr/lib/shim/shimx64.efi", "/usr/lib/shim/shimx64.efi.signed",
    "/usr/lib/shim/fbx64.efi", "/usr/lib/shim/fbx64.efi.signed",
    "/usr/lib/shim/mmx64.efi", "/usr/lib/shim/mmx64.efi.signed",
    "/usr/lib/systemd/boot/efi/linuxx64.efi.stub", "/usr/lib/systemd/boot/efi/systemd-bootx64.efi",
]


def need_tools(*names):
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def need_file(path):
    if not Path(path).exists():
        pytest.skip(f"{path} is not installed (Debian packages shim-unsigned/shim-signed/systemd-boot-efi)")
    return Path(path)


def mapped(path):
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory):
    need_tools("openssl")
    directory = tmp_path_factory.mktemp("keys")
    key, cert = directory / "test.key", directory / "test.crt"
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                    "-days", "1", "-subj", "/CN=rhel-cvm-update pe test", "-keyout", str(key),
                    "-out", str(cert)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    return key, cert


def reference_authenticode(data: bytes, algorithm: str, layout) -> bytes:
    """A deliberately naive edk2 re-implementation, used ONLY where no external tool accepts
    the image (no security directory: pesign crashes, sbsign refuses) or lacks the algorithm
    (sha384/sha512: pesign only knows sha1/sha256).  Offsets come from the builder's layout,
    not from the code under test."""
    opt = layout.optional_header_offset
    magic, = struct.unpack_from("<H", data, opt)
    fixed = 112 if magic == 0x20B else 96
    nrva, = struct.unpack_from("<I", data, opt + fixed - 4)
    h = hashlib.new(algorithm)
    h.update(data[:opt + 64])
    if nrva <= 4:
        h.update(data[opt + 68:layout.size_of_headers])
        cert_size = 0
    else:
        dd = opt + fixed + 32
        h.update(data[opt + 68:dd])
        h.update(data[dd + 8:layout.size_of_headers])
        cert_size = struct.unpack_from("<I", data, dd + 4)[0]
    total = layout.size_of_headers
    for _, _, pointer, raw in sorted(layout.sections, key=lambda s: s[2]):
        if raw:
            h.update(data[pointer:pointer + raw])
            total += raw
    if len(data) > total + cert_size:
        h.update(data[total:len(data) - cert_size])
    return h.digest()


# --- real binaries -------------------------------------------------------------------------

@pytest.mark.parametrize("path", REAL_PE_FILES)
@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_real_binaries_match_pesign(path, algorithm):
    need_tools("pesign")
    need_file(path)
    with mapped(path) as m:
        ours = authenticode.authenticode_digests(m, ("sha1", "sha256"), source=path)[algorithm]
    assert ours == pesign_hash(path, algorithm)


@pytest.mark.parametrize("name", ["shimx64.efi", "mmx64.efi", "fbx64.efi"])
def test_debian_signed_shim_digest_equals_unsigned_one_padded(name):
    """The Debian .signed files are the unsigned ones + zero padding to 8 + certificates:
    shim 16.1's padded digest of the unsigned file is the digest of the signed file."""
    need_tools("pesign")
    unsigned = need_file(f"/usr/lib/shim/{name}")
    signed = need_file(f"/usr/lib/shim/{name}.signed")
    with mapped(unsigned) as m:
        assert authenticode.shim_authenticode_digest(m, "sha256", "16.1") == pesign_hash(signed)


@pytest.mark.parametrize("path", ["/usr/lib/shim/shimx64.efi", "/usr/lib/shim/mmx64.efi",
                                  "/usr/lib/systemd/boot/efi/linuxx64.efi.stub",
                                  "/usr/lib/systemd/boot/efi/systemd-bootx64.efi"])
def test_unaligned_trailing_data_edk2_and_shim_disagree(path, tmp_path, signing_key):
    """Unsigned images whose size is not a multiple of 8 (all real files listed here):
    edk2 hashes the trailing data unpadded (= pesign on the file), shim 16.1 pads it to 8
    (= pesign on the file zero-padded, = what sbsign embeds after padding), shim <= 16.0 does
    not hash it (= pesign on the file cut where the trailing data starts)."""
    need_tools("pesign", "sbsign", "osslsigncode")
    source = need_file(path)
    data = source.read_bytes()
    assert len(data) % 8, "the point of this test is an unaligned file"
    padded = tmp_path / "padded.efi"
    padded.write_bytes(data + bytes(-len(data) % 8))
    # Where the trailing data starts: SizeOfHeaders + sum of SizeOfRawData, read with struct.
    lfanew, = struct.unpack_from("<I", data, 0x3C)
    count, opt_size = struct.unpack_from("<H", data, lfanew + 6)[0], struct.unpack_from("<H", data, lfanew + 20)[0]
    opt = lfanew + 24
    hashed = struct.unpack_from("<I", data, opt + 60)[0]
    for i in range(count):
        hashed += struct.unpack_from("<I", data, opt + opt_size + 40 * i + 16)[0]
    cut = tmp_path / "cut.efi"
    cut.write_bytes(data[:hashed])
    with mapped(source) as m:
        edk2 = authenticode.authenticode_digest(m)
        shim161 = authenticode.shim_authenticode_digest(m, "sha256", "16.1")
        shim160 = authenticode.shim_authenticode_digest(m, "sha256", "16.0")
    assert edk2 == pesign_hash(source)
    assert shim161 == pesign_hash(padded) == sbsign_digest(source, *signing_key, tmp_path)
    assert shim160 == pesign_hash(cut)
    assert len({edk2, shim161, shim160}) == 3


def test_certificates_of_signed_shim_match_sbattach(tmp_path):
    need_tools("sbattach")
    path = need_file("/usr/lib/shim/shimx64.efi.signed")
    detached = tmp_path / "sig.p7"
    subprocess.run(["sbattach", "--detach", str(detached), str(path)], check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with mapped(path) as m:
        image = pe.PEImage.parse(m, str(path))
        certs = pe.certificates(m, image)
    assert image.is_signed
    assert certs[0].data == detached.read_bytes()
    assert all(c.revision == pe.WIN_CERT_REVISION_2_0 and
               c.certificate_type == pe.WIN_CERT_TYPE_PKCS_SIGNED_DATA for c in certs)
    assert image.certificate_table[0] + image.certificate_table[1] == image.file_size


@pytest.mark.parametrize("path", ["/usr/lib/shim/shimx64.efi", "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"])
def test_sections_match_objdump_and_objcopy(path, tmp_path):
    """Section names (long names resolved), offsets and in-memory bytes as binutils sees them."""
    need_tools("objdump", "objcopy")
    source = need_file(path)
    listing = subprocess.run(["objdump", "-h", str(source)], stdout=subprocess.PIPE, check=True).stdout.decode()
    rows = [r for r in (line.split() for line in listing.splitlines()) if len(r) >= 7 and r[0].isdigit()]
    with mapped(source) as m:
        image = pe.PEImage.parse(m, str(source))
        assert [r[1] for r in rows] == [s.full_name for s in image.sections]
        for row, section in zip(rows, image.sections):
            assert int(row[2], 16) == section.virtual_size
            assert int(row[5], 16) == section.pointer_to_raw_data
            out = tmp_path / "section.bin"
            subprocess.run(["objcopy", "-O", "binary", f"--only-section={section.full_name}",
                            str(source), str(out)], check=True)
            assert pe.loaded_section(m, section) == out.read_bytes()


# --- synthetic images: every edge case of reference 1.2 ------------------------------------

def _text(size=1000):
    return Section(b".text", bytes(range(256)) * (size // 256) + b"\x90" * (size % 256), characteristics=CODE)


IN_ORDER_LAYOUTS = {
    "pe32plus-basic": dict(sections=[_text(), Section(b".data", b"abc" * 100)]),
    "pe32-basic": dict(sections=[_text(), Section(b".data", b"abc" * 100)], pe32_plus=False),
    "unaligned-trailing": dict(sections=[_text()], trailing=b"1234567"),
    "pe32-unaligned-trailing": dict(sections=[_text()], trailing=b"xyz", pe32_plus=False),
    "zero-size-section": dict(sections=[_text(), Section(b".bss", virtual_size=0x3000, size_of_raw_data=0,
                                                         pointer_to_raw_data=0), Section(b".data", b"d" * 10)]),
    "overlapping-sections": dict(sections=[_text(), Section(b".data", b"x" * 10, pointer_to_raw_data=0x400,
                                                            size_of_raw_data=0x600)], trailing=b"t" * 33),
    "gap-between-sections": dict(sections=[Section(b".text", b"\x90" * 1000, pointer_to_raw_data=0x400),
                                           Section(b".data", b"x" * 10, pointer_to_raw_data=0x1000)],
                                 trailing=b"T" * 100),
    "gap-after-headers": dict(sections=[Section(b".text", b"\x90" * 100, pointer_to_raw_data=0x800)],
                              trailing=b"q" * 5),
    "equal-offsets-keep-table-order": dict(sections=[Section(b".a", b"A" * 10, pointer_to_raw_data=0x400,
                                                             size_of_raw_data=0x200),
                                                     Section(b".b", b"B" * 10, pointer_to_raw_data=0x400,
                                                             size_of_raw_data=0x100)]),
    "headers-not-file-aligned": dict(sections=[_text()], size_of_headers=0x1c8, file_alignment=0x8),
    "signed": dict(sections=[_text()], trailing=b"abc", certificates=[win_certificate(b"x" * 100)]),
    "signed-two-certificates": dict(sections=[_text()], certificates=[win_certificate(b"x" * 99),
                                                                      win_certificate(b"y" * 50)]),
    "signed-cert-table-unaligned": dict(sections=[_text()], trailing=b"abc",
                                        certificates=[win_certificate(b"x" * 100)], cert_padding=False),
    "pe32-signed": dict(sections=[_text()], pe32_plus=False, trailing=b"abcde",
                        certificates=[win_certificate(b"z" * 64)]),
}


@pytest.mark.parametrize("name", sorted(IN_ORDER_LAYOUTS))
@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_synthetic_layouts_match_pesign(name, algorithm, tmp_path):
    need_tools("pesign")
    data = build_pe(**IN_ORDER_LAYOUTS[name])
    path = tmp_path / f"{name}.efi"
    path.write_bytes(data)
    assert authenticode.authenticode_digests(data, ("sha1", "sha256"))[algorithm] == pesign_hash(path, algorithm)


SBSIGN_LAYOUTS = {
    "table-order-reversed": dict(sections=[Section(b".text", b"\x90" * 1000, pointer_to_raw_data=0x600,
                                                   characteristics=CODE),
                                           Section(b".data", b"x" * 10, pointer_to_raw_data=0x400)]),
    "three-shuffled-with-trailing": dict(sections=[Section(b".c", b"C" * 300, pointer_to_raw_data=0xA00),
                                                   Section(b".a", b"A" * 300, pointer_to_raw_data=0x400),
                                                   Section(b".b", b"B" * 700, pointer_to_raw_data=0x600)],
                                         trailing=b"12345678"),
    # pesign crashes on an image without sections.
    "no-sections-trailing": dict(sections=[], trailing=b"01234567"),
}


@pytest.mark.parametrize("name", sorted(SBSIGN_LAYOUTS))
def test_layouts_pesign_cannot_hash_match_sbsign(name, tmp_path, signing_key):
    """pesign hashes in table order; sbsign sorts by PointerToRawData like edk2.  (sbsign pads
    the file to 8 bytes before hashing, so these layouts end 8-byte aligned.)"""
    need_tools("sbsign", "osslsigncode")
    data = build_pe(**SBSIGN_LAYOUTS[name])
    path = tmp_path / f"{name}.efi"
    path.write_bytes(data)
    assert authenticode.authenticode_digest(data) == sbsign_digest(path, *signing_key, tmp_path)


@pytest.mark.parametrize("pe32_plus", [True, False])
@pytest.mark.parametrize("directories", [0, 2, 4])
def test_no_security_directory(pe32_plus, directories):
    """NumberOfRvaAndSizes <= 4: no certificate directory to skip.  pesign crashes on these
    and sbsign refuses them, so the golden value is the naive re-implementation above."""
    data, layout = build_pe([_text(), Section(b".data", b"x" * 10)], pe32_plus=pe32_plus,
                            number_of_rva_and_sizes=directories, trailing=b"abc", with_layout=True)
    image = pe.PEImage.parse(data)
    assert image.certificate_table == (0, 0) and not image.has_security_directory
    assert authenticode.authenticode_digest(data) == reference_authenticode(data, "sha256", layout)


@pytest.mark.parametrize("name", ["pe32plus-basic", "overlapping-sections", "signed", "pe32-signed"])
def test_all_banks_in_one_pass(name):
    """sha384/sha512 banks: pesign has no such digests, so the naive re-implementation."""
    data, layout = build_pe(with_layout=True, **IN_ORDER_LAYOUTS[name])
    digests = authenticode.authenticode_digests(data, authenticode.HASH_ALGORITHMS)
    for algorithm in authenticode.HASH_ALGORITHMS:
        assert digests[algorithm] == reference_authenticode(data, algorithm, layout)


def test_sum_plus_certificate_past_end_is_refused():
    """Overlapping sections inflate ``sum``: filesize < sum + cert size -> edk2 refuses."""
    data = build_pe([_text(), Section(b".data", b"x", pointer_to_raw_data=0x400, size_of_raw_data=0x400)],
                    certificates=[win_certificate(b"c" * 0x500)])
    with pytest.raises(FormatError) as e:
        authenticode.authenticode_digest(data, source="overlap.efi")
    assert e.value.source == "overlap.efi" and e.value.offset is not None


# --- shim's generate_hash variant ------------------------------------------------------------

def test_shim_variants_on_synthetic_unaligned_image(tmp_path):
    need_tools("pesign")
    data = build_pe([_text()], trailing=b"12345")
    padded = tmp_path / "padded.efi"
    padded.write_bytes(data + bytes(-len(data) % 8))
    cut = tmp_path / "cut.efi"
    cut.write_bytes(data[:len(data) - 5])
    assert authenticode.shim_authenticode_digest(data, shim_version="16.1") == pesign_hash(padded)
    assert authenticode.shim_authenticode_digest(data, shim_version="15.8") == pesign_hash(cut)
    assert authenticode.authenticode_digest(data) not in (pesign_hash(padded), pesign_hash(cut))


def test_shim_and_edk2_agree_on_normally_signed_image(tmp_path, signing_key):
    need_tools("sbsign")
    path = tmp_path / "u.efi"
    path.write_bytes(build_pe([_text()], trailing=b"12345"))
    signed = tmp_path / "s.efi"
    subprocess.run(["sbsign", "--key", str(signing_key[0]), "--cert", str(signing_key[1]),
                    "--output", str(signed), str(path)], check=True, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    data = signed.read_bytes()
    edk2 = authenticode.authenticode_digest(data)
    assert edk2 == authenticode.shim_authenticode_digest(data, shim_version="16.1") == \
        authenticode.shim_authenticode_digest(data, shim_version="16.0")


def test_shim_refuses_data_between_sections_and_certificate_table():
    # The directory says the table starts 8 bytes later than sum + trailing: edk2 measures
    # it (it ignores the table's offset), shim refuses it.
    data = build_pe([_text()], trailing=b"abcdefgh", certificates=[win_certificate(b"x" * 40)])
    image = pe.PEImage.parse(data)
    offset, size = image.certificate_table
    moved = bytearray(data)
    struct.pack_into("<II", moved, image.security_directory_offset, offset - 8, size)
    authenticode.authenticode_digest(bytes(moved))
    with pytest.raises(FormatError):
        authenticode.shim_authenticode_digest(bytes(moved))


def test_shim_variant_rejects_unknown_version_and_missing_directory():
    with pytest.raises(UnsupportedError):
        authenticode.shim_authenticode_digest(build_pe([_text()]), shim_version="17.0")
    with pytest.raises(UnsupportedError):
        authenticode.shim_authenticode_digest(build_pe([_text()], number_of_rva_and_sizes=4))


def test_unknown_algorithm_is_unsupported():
    with pytest.raises(UnsupportedError):
        authenticode.authenticode_digests(build_pe([_text()]), ("md5",))


# --- headers, sections, certificates ---------------------------------------------------------

@pytest.mark.parametrize("pe32_plus", [True, False])
def test_header_fields(pe32_plus):
    data, layout = build_pe([_text(), Section(b".data", b"x" * 10)], pe32_plus=pe32_plus,
                            image_base=0x12340000, with_layout=True)
    image = pe.PEImage.parse(data, "x.efi")
    assert image.is_pe32_plus == pe32_plus
    assert image.machine == (0x8664 if pe32_plus else 0x14C)
    assert image.image_base == 0x12340000
    assert image.size_of_headers == layout.size_of_headers
    assert image.optional_header_offset == layout.optional_header_offset
    assert image.number_of_rva_and_sizes == 16
    assert [(s.virtual_address, s.virtual_size, s.pointer_to_raw_data, s.size_of_raw_data)
            for s in image.sections] == layout.sections
    assert image.section(".data").name == ".data" and image.section(".nope") is None


def test_loaded_section_zero_fills_to_virtual_size():
    data = build_pe([_text(), Section(b".data", b"abc", virtual_size=0x1234, size_of_raw_data=0x200)])
    image = pe.PEImage.parse(data)
    section = image.section(".data")
    assert bytes(pe.section_bytes(data, section)) == b"abc" + bytes(0x200 - 3)
    assert pe.loaded_section(data, section) == b"abc" + bytes(0x1234 - 3)


def test_loaded_section_cuts_at_virtual_size_and_treats_zero_as_raw_size():
    data = build_pe([Section(b".a", b"abcdef", virtual_size=4), Section(b".b", b"xyz", virtual_size=0)])
    image = pe.PEImage.parse(data)
    assert pe.loaded_section(data, image.section(".a")) == b"abcd"
    # edk2 PeCoffLoaderLoadImage: VirtualSize 0 -> SizeOfRawData bytes.
    assert pe.loaded_section(data, image.section(".b")) == b"xyz" + bytes(0x200 - 3)


def test_certificates_parse_every_aligned_entry():
    data = build_pe([_text()], certificates=[win_certificate(b"a" * 13), win_certificate(b"b" * 8, 0x0100, 1)])
    image = pe.PEImage.parse(data)
    certs = pe.certificates(data, image)
    assert [(c.length, c.revision, c.certificate_type, c.data) for c in certs] == [
        (21, 0x0200, 2, b"a" * 13), (16, 0x0100, 1, b"b" * 8)]
    assert pe.certificates(build_pe([_text()]), pe.PEImage.parse(build_pe([_text()]))) == []


@pytest.mark.parametrize("bad_length", [0, 7, 10_000])
def test_certificate_entry_with_bad_length_is_refused(bad_length):
    data = bytearray(build_pe([_text()], certificates=[win_certificate(b"a" * 16)]))
    image = pe.PEImage.parse(bytes(data))
    struct.pack_into("<I", data, image.certificate_table[0], bad_length)
    with pytest.raises(FormatError) as e:
        pe.certificates(bytes(data), image)
    assert e.value.offset == image.certificate_table[0]


def test_buffers_of_any_kind():
    data = build_pe([_text()], trailing=b"abc")
    expected = authenticode.authenticode_digest(data)
    assert authenticode.authenticode_digest(bytearray(data)) == expected
    assert authenticode.authenticode_digest(memoryview(data)) == expected


def test_streams_a_large_sparse_file_through_mmap(tmp_path):
    """200 MiB, one section, hashed through mmap: Python allocations stay tiny (nothing is
    copied) and the digest matches hashlib over the same bytes."""
    import tracemalloc

    size = 200 * 1024 * 1024
    header = build_pe([Section(b".data", b"", size_of_raw_data=size - 0x200, pointer_to_raw_data=0x200,
                               virtual_size=size - 0x200)], size_of_headers=0x200)[:0x200]
    path = tmp_path / "sparse.efi"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)
    with mapped(path) as m:
        tracemalloc.start()
        digest = authenticode.authenticode_digest(m, source=str(path))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 256 * 1024
        parsed = pe.PEImage.parse(m)
        opt = parsed.optional_header_offset
    expected = hashlib.sha256()
    expected.update(header[:opt + 64])
    expected.update(header[opt + 68:opt + 112 + 32])
    expected.update(header[opt + 112 + 40:0x200])
    zeros = bytes(1024 * 1024)
    remaining = size - 0x200
    while remaining:
        n = min(remaining, len(zeros))
        expected.update(zeros[:n])
        remaining -= n
    assert digest == expected.digest()


# --- real OVMF boots (fixtures captured by tests/vm/capture.py) ------------------------------

BOOTS = Path(__file__).resolve().parent.parent / "data" / "boots"
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003


def boot_fixtures():
    return sorted(p.parent.name for p in BOOTS.glob("*/boot.json"))


def pcr4_application_events(name):
    from rhel_cvm_update.formats import tcglog

    log = tcglog.parse_event_log((BOOTS / name / "eventlog.bin").read_bytes(), name)
    return log.banks, [e for e in log.events
                       if e.pcr == 4 and e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION]


@pytest.mark.parametrize("name", boot_fixtures())
def test_ovmf_measured_the_shim_with_our_digest(name):
    """The first PCR4 application event of a real OVMF boot is shim, in every bank.  The
    sb-off-shim-b fixture boots the *unsigned* shimx64.efi, whose size is not a multiple of
    8: real firmware measured the unpadded (edk2) digest, not shim 16.1's padded one."""
    import json

    boot = json.loads((BOOTS / name / "boot.json").read_text())
    shim = Path(boot["shim"]["origin"].split(": ", 1)[1].split(" ", 1)[0])
    need_file(shim)
    if hashlib.sha256(shim.read_bytes()).hexdigest() != boot["shim"]["sha256"]:
        pytest.skip(f"{shim} is not the build {name} was captured with (package updated)")
    banks, events = pcr4_application_events(name)
    with mapped(shim) as m:
        image = pe.PEImage.parse(m, str(shim))
        ours = authenticode.authenticode_digests(m, banks)
        padded = authenticode.shim_authenticode_digest(m, "sha256", "16.1")
    assert events[0].digests == ours
    if image.file_size % 8 and not image.is_signed:
        assert padded != ours["sha256"]


@pytest.mark.parametrize("through", ["slices of a buffer", "pread of a mapped file"])
@pytest.mark.parametrize("name", sorted(IN_ORDER_LAYOUTS))
def test_nested_digests_follow_the_outer_pass_or_hash_apart(name, through, monkeypatch, tmp_path):
    """An image embedded in another (as a kernel in a UKI) is hashed from the slices the outer
    pass reads while its hash order is file order; when its next bytes went by already (here
    the gap-after-headers layout hashes .text before the headers' tail: with 512-byte slices
    that is a slice back) it gets a pass of its own.  The digests equal separate passes, for
    a buffer (sliced) and for a mapped file (read with pread), with the updates of every hash
    object spread over threads (several parts of one slice stay in order on one thread)."""
    from rhel_cvm_update.mapped import mapped_file

    monkeypatch.setattr(authenticode, "_HASH_CHUNK", 512)
    monkeypatch.setattr(authenticode, "_READ_CHUNK", 512)
    monkeypatch.setattr(authenticode, "_PARALLEL_MIN", 0)  # banks and the inner image on threads
    inner = build_pe(**IN_ORDER_LAYOUTS[name])
    outer = build_pe([_text(), Section(b".linux", inner)])
    (tmp_path / "outer.efi").write_bytes(outer)
    plan = authenticode.edk2_plan(pe.PEImage.parse(inner, "inner"), len(inner), "inner")
    in_file_order = all(a[1] <= b[0] for a, b in zip(plan.ranges, plan.ranges[1:]))
    apart = []
    real = authenticode.digests_of_plan
    monkeypatch.setattr(authenticode, "digests_of_plan", lambda *a: apart.append(a) or real(*a))
    with mapped_file(str(tmp_path / "outer.efi")) as mapping:
        buf = mapping if through == "pread of a mapped file" else outer
        image = pe.PEImage.parse(buf, "outer")
        start = image.section(".linux").pointer_to_raw_data
        digests, nested = authenticode.nested_authenticode_digests(buf, image, (start, start + len(inner)),
                                                                   authenticode.HASH_ALGORITHMS, "outer", "inner")
    monkeypatch.setattr(authenticode, "digests_of_plan", real)
    assert digests == authenticode.authenticode_digests(outer, authenticode.HASH_ALGORITHMS)
    assert nested == authenticode.authenticode_digests(inner, authenticode.HASH_ALGORITHMS)
    if in_file_order:
        assert apart == [], name
    if name == "gap-after-headers":
        assert not in_file_order and len(apart) == 1
