"""PE/COFF images: headers, sections, WIN_CERTIFICATE and the Authenticode digest.

Everything here works on a bytes-like buffer (normally a read-only ``mmap`` the caller
opened) through ``memoryview`` slices, so a 100 MiB UKI is hashed without being copied.

Two Authenticode variants exist and they are NOT interchangeable:

* ``authenticode_digests`` is the digest edk2's ``MeasurePeImageAndExtend``
  (SecurityPkg/Library/DxeTpm2MeasureBootLib/Tcg2MeasurePeImage, Tcg2Dxe's PE_COFF_IMAGE
  path) extends into PCR4.  That is the value to predict.
* ``shim_authenticode_digest`` is shim's ``generate_hash`` (pe.c), used for Secure Boot
  allowlist decisions and the TPM 1.2 path.  It differs from edk2's only for unsigned images
  whose trailing data is not 8-byte aligned (see measured-boot-reference.md, 1.3).

Header validation follows the checks edk2's ``PeCoffLoaderGetPeHeader``
(MdePkg/Library/BasePeCoffLib/BasePeCoff.c) applies before it measures or loads anything:
an image the firmware refuses is refused here too, so we never predict a digest the firmware
would not extend.  We are stricter in one place: a file without the "MZ" DOS header.  edk2
then looks for the PE header at offset 0, but shim's ``generate_hash`` rejects such an image,
nothing in the shim -> UKI chain is built that way, and a missing MZ is far more likely a
truncated or foreign file than a boot image; refusing costs nothing (the old chain keeps
working) while guessing could seal the disk to a wrong value.
"""

import dataclasses
import hashlib
import mmap
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from rhel_cvm_update.errors import FormatError, UnsupportedError

IMAGE_DOS_SIGNATURE = b"MZ"
IMAGE_NT_SIGNATURE = b"PE\0\0"
IMAGE_NT_OPTIONAL_HDR32_MAGIC = 0x10B
IMAGE_NT_OPTIONAL_HDR64_MAGIC = 0x20B
IMAGE_NUMBER_OF_DIRECTORY_ENTRIES = 16
IMAGE_DIRECTORY_ENTRY_SECURITY = 4
IMAGE_SIZEOF_SECTION_HEADER = 40
# The PE/COFF specification limits NumberOfSections to 96.
MAX_NUMBER_OF_SECTIONS = 96
# sizeof(EFI_IMAGE_OPTIONAL_HEADER_UNION): edk2 reads this many bytes at e_lfanew and
# refuses the image if the file is shorter.
EFI_IMAGE_OPTIONAL_HEADER_UNION_SIZE = 4 + 20 + 240

WIN_CERT_REVISION_2_0 = 0x0200
WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002

# Offsets inside the optional header (from its first byte, the Magic field).
_OPT_IMAGE_BASE_PE32 = 28
_OPT_IMAGE_BASE_PE32_PLUS = 24
_OPT_SIZE_OF_IMAGE = 56
_OPT_SIZE_OF_HEADERS = 60
_OPT_CHECKSUM = 64
_OPT_NUMBER_OF_RVA_AND_SIZES = {IMAGE_NT_OPTIONAL_HDR32_MAGIC: 92, IMAGE_NT_OPTIONAL_HDR64_MAGIC: 108}
_OPT_DATA_DIRECTORY = {IMAGE_NT_OPTIONAL_HDR32_MAGIC: 96, IMAGE_NT_OPTIONAL_HDR64_MAGIC: 112}

HASH_ALGORITHMS = ("sha1", "sha256", "sha384", "sha512")

# Hash in slices of this size so a memory-mapped file can drop the pages already hashed.
_HASH_CHUNK = 4 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class PESection:
    # The 8-byte Name field as written.  Loaders (systemd-stub, shim) compare this field, so
    # lookups use it.  GNU ld writes names longer than 8 bytes as "/N", an offset into the
    # COFF string table; ``full_name`` is that resolved name (else equal to ``name``).
    name: str
    virtual_size: int
    virtual_address: int
    size_of_raw_data: int
    pointer_to_raw_data: int
    characteristics: int
    header_offset: int  # file offset of this 40-byte section header
    full_name: str

    def to_json(self) -> Dict[str, object]:
        return {
            "name": self.name,
            "full_name": self.full_name,
            "virtual_size": self.virtual_size,
            "virtual_address": self.virtual_address,
            "size_of_raw_data": self.size_of_raw_data,
            "pointer_to_raw_data": self.pointer_to_raw_data,
            "characteristics": self.characteristics,
        }


@dataclasses.dataclass(frozen=True)
class WinCertificate:
    """One WIN_CERTIFICATE entry of the attribute certificate table."""

    offset: int
    length: int  # dwLength: header + certificate, without the padding to 8
    revision: int
    certificate_type: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class PEImage:
    source: str
    file_size: int
    pe_header_offset: int  # e_lfanew
    machine: int
    number_of_sections: int
    size_of_optional_header: int
    optional_header_offset: int
    is_pe32_plus: bool
    image_base: int
    size_of_image: int
    size_of_headers: int
    checksum: int
    number_of_rva_and_sizes: int
    # (file offset, size) of DataDirectory[4]; (0, 0) when there is none or it is empty.
    certificate_table: Tuple[int, int]
    section_table_offset: int
    sections: List[PESection]

    @property
    def checksum_offset(self) -> int:
        return self.optional_header_offset + _OPT_CHECKSUM

    @property
    def has_security_directory(self) -> bool:
        return self.number_of_rva_and_sizes > IMAGE_DIRECTORY_ENTRY_SECURITY

    @property
    def security_directory_offset(self) -> int:
        """File offset of the 8-byte DataDirectory[4] entry (meaningful only when present)."""
        magic = IMAGE_NT_OPTIONAL_HDR64_MAGIC if self.is_pe32_plus else IMAGE_NT_OPTIONAL_HDR32_MAGIC
        return self.optional_header_offset + _OPT_DATA_DIRECTORY[magic] + 8 * IMAGE_DIRECTORY_ENTRY_SECURITY

    @property
    def is_signed(self) -> bool:
        return self.certificate_table[1] != 0

    def section(self, name: str) -> Optional[PESection]:
        """The first section whose 8-byte Name field is ``name``, or None."""
        for s in self.sections:
            if s.name == name:
                return s
        return None

    def section_by_full_name(self, full_name: str) -> Optional[PESection]:
        """The first section whose (string-table resolved) name is ``full_name``, or None."""
        for s in self.sections:
            if s.full_name == full_name:
                return s
        return None

    @classmethod
    def parse(cls, buf, source: str = "<bytes>") -> "PEImage":
        return _parse_pe(_view(buf), source)


def _view(buf) -> memoryview:
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _u16(view: memoryview, offset: int) -> int:
    return view[offset] | (view[offset + 1] << 8)


def _u32(view: memoryview, offset: int) -> int:
    return struct.unpack_from("<I", view, offset)[0]


def _u64(view: memoryview, offset: int) -> int:
    return struct.unpack_from("<Q", view, offset)[0]


def _need(view: memoryview, offset: int, length: int, source: str, field: str) -> None:
    if offset < 0 or offset + length > len(view):
        raise FormatError(f"needs {length} bytes, the file has {len(view)} in all (truncated?)",
                          source=source, offset=offset, field=field)


def _section_name(raw: bytes) -> str:
    # Names are NUL-padded to 8 bytes.
    return raw.split(b"\0", 1)[0].decode("ascii", "backslashreplace")


def _long_section_name(view: memoryview, name: str, string_table: int) -> str:
    """Resolve a "/N" name through the COFF string table; keep ``name`` when it cannot be.

    Only informational (loaders never resolve these), so a damaged string table is not an
    error: the name simply stays "/N".
    """
    if not string_table or len(name) < 2 or name[0] != "/" or not name[1:].isdigit():
        return name
    start = string_table + int(name[1:])
    if start >= len(view):
        return name
    raw = bytes(view[start:start + 256])
    end = raw.find(b"\0")
    if end <= 0:
        return name
    return raw[:end].decode("ascii", "backslashreplace")


def _parse_pe(view: memoryview, source: str) -> PEImage:
    size = len(view)
    _need(view, 0, 64, source, "DOS header")
    if bytes(view[0:2]) != IMAGE_DOS_SIGNATURE:
        raise FormatError("no 'MZ' DOS header; refusing to guess where the PE header is",
                          source=source, offset=0, field="e_magic")
    pe_offset = _u32(view, 0x3C)
    if pe_offset + EFI_IMAGE_OPTIONAL_HEADER_UNION_SIZE > size:
        raise FormatError(f"e_lfanew {pe_offset:#x} leaves no room for the PE headers "
                          f"({EFI_IMAGE_OPTIONAL_HEADER_UNION_SIZE} bytes) in a {size}-byte file",
                          source=source, offset=0x3C, field="e_lfanew")
    if bytes(view[pe_offset:pe_offset + 4]) != IMAGE_NT_SIGNATURE:
        raise FormatError("no 'PE\\0\\0' signature at e_lfanew", source=source, offset=pe_offset,
                          field="Signature")
    coff = pe_offset + 4
    machine = _u16(view, coff)
    number_of_sections = _u16(view, coff + 2)
    pointer_to_symbol_table, number_of_symbols = struct.unpack_from("<II", view, coff + 8)
    string_table = pointer_to_symbol_table + 18 * number_of_symbols if pointer_to_symbol_table else 0
    size_of_optional_header = _u16(view, coff + 16)
    if number_of_sections > MAX_NUMBER_OF_SECTIONS:
        raise FormatError(f"{number_of_sections} sections, the PE format allows at most "
                          f"{MAX_NUMBER_OF_SECTIONS}", source=source, offset=coff + 2,
                          field="NumberOfSections")
    opt = coff + 20
    magic = _u16(view, opt)
    if magic not in (IMAGE_NT_OPTIONAL_HDR32_MAGIC, IMAGE_NT_OPTIONAL_HDR64_MAGIC):
        # edk2 treats 0x10b on IA64 as PE32+ (an ELILO quirk); no x86-64 image needs that.
        raise FormatError(f"optional header magic {magic:#06x} is neither PE32 (0x10b) nor PE32+ (0x20b)",
                          source=source, offset=opt, field="Magic")
    is_pe32_plus = magic == IMAGE_NT_OPTIONAL_HDR64_MAGIC
    nrva_offset = opt + _OPT_NUMBER_OF_RVA_AND_SIZES[magic]
    number_of_rva_and_sizes = _u32(view, nrva_offset)
    if number_of_rva_and_sizes > IMAGE_NUMBER_OF_DIRECTORY_ENTRIES:
        raise FormatError(f"{number_of_rva_and_sizes} data directories, at most "
                          f"{IMAGE_NUMBER_OF_DIRECTORY_ENTRIES} exist", source=source,
                          offset=nrva_offset, field="NumberOfRvaAndSizes")
    fixed_size = _OPT_DATA_DIRECTORY[magic]
    if size_of_optional_header != fixed_size + 8 * number_of_rva_and_sizes:
        raise FormatError(f"SizeOfOptionalHeader {size_of_optional_header} does not match "
                          f"{number_of_rva_and_sizes} data directories (edk2 requires "
                          f"{fixed_size + 8 * number_of_rva_and_sizes})", source=source,
                          offset=coff + 16, field="SizeOfOptionalHeader")
    image_base = (_u64(view, opt + _OPT_IMAGE_BASE_PE32_PLUS) if is_pe32_plus
                  else _u32(view, opt + _OPT_IMAGE_BASE_PE32))
    size_of_image = _u32(view, opt + _OPT_SIZE_OF_IMAGE)
    size_of_headers = _u32(view, opt + _OPT_SIZE_OF_HEADERS)
    checksum = _u32(view, opt + _OPT_CHECKSUM)
    section_table = opt + size_of_optional_header
    table_end = section_table + IMAGE_SIZEOF_SECTION_HEADER * number_of_sections
    if size_of_image <= section_table or \
            (size_of_image - section_table) // IMAGE_SIZEOF_SECTION_HEADER <= number_of_sections:
        raise FormatError(f"SizeOfImage {size_of_image:#x} does not cover the section table",
                          source=source, offset=opt + _OPT_SIZE_OF_IMAGE, field="SizeOfImage")
    if size_of_headers <= section_table or size_of_headers < table_end or size_of_headers >= size_of_image:
        raise FormatError(f"SizeOfHeaders {size_of_headers:#x} must cover the section table "
                          f"(ends at {table_end:#x}) and be below SizeOfImage {size_of_image:#x}",
                          source=source, offset=opt + _OPT_SIZE_OF_HEADERS, field="SizeOfHeaders")
    if size_of_headers > size:
        raise FormatError(f"SizeOfHeaders {size_of_headers:#x} is past the end of the "
                          f"{size}-byte file", source=source, offset=opt + _OPT_SIZE_OF_HEADERS,
                          field="SizeOfHeaders")

    certificate_table = (0, 0)
    if number_of_rva_and_sizes > IMAGE_DIRECTORY_ENTRY_SECURITY:
        dd = opt + fixed_size + 8 * IMAGE_DIRECTORY_ENTRY_SECURITY
        cert_offset, cert_size = _u32(view, dd), _u32(view, dd + 4)
        if cert_size != 0:
            if cert_offset + cert_size > size:
                raise FormatError(f"certificate table [{cert_offset:#x}, +{cert_size:#x}) is past "
                                  f"the end of the {size}-byte file", source=source, offset=dd,
                                  field="DataDirectory[SECURITY]")
            certificate_table = (cert_offset, cert_size)

    sections: List[PESection] = []
    for index in range(number_of_sections):
        at = section_table + IMAGE_SIZEOF_SECTION_HEADER * index
        virtual_size, virtual_address, size_of_raw_data, pointer_to_raw_data = \
            struct.unpack_from("<IIII", view, at + 8)
        characteristics = _u32(view, at + 36)
        name = _section_name(bytes(view[at:at + 8]))
        if size_of_raw_data:
            if virtual_address < size_of_headers or pointer_to_raw_data < size_of_headers:
                raise FormatError(f"section {index} ({name}) lies inside the headers "
                                  f"(SizeOfHeaders {size_of_headers:#x})", source=source,
                                  offset=at + 12, field="VirtualAddress/PointerToRawData")
            if pointer_to_raw_data + size_of_raw_data > size:
                raise FormatError(f"section {index} ({name}) raw data "
                                  f"[{pointer_to_raw_data:#x}, +{size_of_raw_data:#x}) is past the "
                                  f"end of the {size}-byte file", source=source, offset=at + 16,
                                  field="SizeOfRawData")
            # PeCoffLoaderLoadImage refuses a section whose last byte lies beyond SizeOfImage.
            if virtual_address + max(virtual_size, 1) > size_of_image:
                raise FormatError(f"section {index} ({name}) [{virtual_address:#x}, "
                                  f"+{virtual_size:#x}) lies beyond SizeOfImage {size_of_image:#x}",
                                  source=source, offset=at + 8, field="VirtualSize")
        sections.append(PESection(name, virtual_size, virtual_address, size_of_raw_data,
                                  pointer_to_raw_data, characteristics, at,
                                  _long_section_name(view, name, string_table)))

    return PEImage(
        source=source, file_size=size, pe_header_offset=pe_offset, machine=machine,
        number_of_sections=number_of_sections, size_of_optional_header=size_of_optional_header,
        optional_header_offset=opt, is_pe32_plus=is_pe32_plus, image_base=image_base,
        size_of_image=size_of_image, size_of_headers=size_of_headers, checksum=checksum,
        number_of_rva_and_sizes=number_of_rva_and_sizes, certificate_table=certificate_table,
        section_table_offset=section_table, sections=sections)


def _check_algorithms(algorithms: Iterable[str]) -> Tuple[str, ...]:
    names = tuple(algorithms)
    unknown = [a for a in names if a not in HASH_ALGORITHMS]
    if unknown or not names:
        raise UnsupportedError(f"hash algorithm(s) {unknown or names!r}; known: {', '.join(HASH_ALGORITHMS)}")
    return names


class _MultiHash:
    """Feeds ranges of one buffer to several hash objects in a single pass.

    For an ``mmap`` the pages already hashed are dropped (MADV_DONTNEED; the mapping is
    read-only and file-backed, so a later touch simply faults them back in): peak RSS stays
    near one chunk instead of growing to the file size.
    """

    def __init__(self, view: memoryview, algorithms: Sequence[str], mapping=None):
        self.view = view
        self.hashes = {name: hashlib.new(name) for name in algorithms}
        self.updates = list(h.update for h in self.hashes.values())
        self.mapping = mapping if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED") else None

    def feed(self, start: int, end: int) -> None:
        updates = self.updates
        for chunk_start in range(start, end, _HASH_CHUNK):
            chunk_end = min(chunk_start + _HASH_CHUNK, end)
            piece = self.view[chunk_start:chunk_end]
            for update in updates:
                update(piece)
            if self.mapping is not None:
                page_start = chunk_start - chunk_start % mmap.PAGESIZE
                self.mapping.madvise(mmap.MADV_DONTNEED, page_start, chunk_end - page_start)

    def feed_bytes(self, data: bytes) -> None:
        for update in self.updates:
            update(data)

    def digests(self) -> Dict[str, bytes]:
        return {name: h.digest() for name, h in self.hashes.items()}


def _hash_headers(hasher: _MultiHash, image: PEImage, assume_security_directory: bool) -> None:
    # 1. Everything before CheckSum; 2. after CheckSum up to the certificate directory entry,
    # skip its 8 bytes, then the rest of the headers as SizeOfHeaders states them.
    hasher.feed(0, image.checksum_offset)
    after_checksum = image.checksum_offset + 4
    if image.has_security_directory or assume_security_directory:
        dd = image.security_directory_offset
        hasher.feed(after_checksum, dd)
        hasher.feed(dd + 8, image.size_of_headers)
    else:
        hasher.feed(after_checksum, image.size_of_headers)


def _sections_by_file_offset(image: PEImage) -> List[PESection]:
    # Python's sort is stable, like edk2's insertion sort: ties keep their table order.
    return sorted(image.sections, key=lambda s: s.pointer_to_raw_data)


def authenticode_digests(buf, algorithms: Iterable[str] = ("sha256",), source: str = "<bytes>",
                         image: Optional[PEImage] = None) -> Dict[str, bytes]:
    """The PE/COFF image digest exactly as edk2's MeasurePeImageAndExtend computes it.

    - sections sorted by PointerToRawData (stable), SizeOfRawData == 0 skipped, VirtualSize
      never used, overlapping sections hashed twice;
    - ``sum`` = SizeOfHeaders + the SizeOfRawData of every hashed section, used as the file
      offset where trailing data starts even when there are gaps or overlaps;
    - trailing data ``[sum, filesize - CertificateTable.Size)`` hashed without padding;
      only the certificate table's Size matters, its offset is ignored;
    - edk2 refuses to measure when filesize < sum + CertificateTable.Size.
    """
    names = _check_algorithms(algorithms)
    view = _view(buf)
    if image is None:
        image = _parse_pe(view, source)
    hasher = _MultiHash(view, names, buf)
    _hash_headers(hasher, image, assume_security_directory=False)
    hashed_sum = image.size_of_headers
    for s in _sections_by_file_offset(image):
        if s.size_of_raw_data == 0:
            continue
        hasher.feed(s.pointer_to_raw_data, s.pointer_to_raw_data + s.size_of_raw_data)
        hashed_sum += s.size_of_raw_data
    size = len(view)
    if size > hashed_sum:
        cert_size = image.certificate_table[1]
        if size > hashed_sum + cert_size:
            hasher.feed(hashed_sum, size - cert_size)
        elif size < hashed_sum + cert_size:
            raise FormatError(f"headers + sections ({hashed_sum:#x} bytes) + certificate table "
                              f"({cert_size:#x}) exceed the {size}-byte file; edk2 refuses to "
                              f"measure it", source=source, offset=hashed_sum,
                              field="DataDirectory[SECURITY]")
    return hasher.digests()


def authenticode_digest(buf, algorithm: str = "sha256", source: str = "<bytes>") -> bytes:
    return authenticode_digests(buf, (algorithm,), source=source)[algorithm]


SHIM_HASH_VERSIONS = ("15.6", "15.7", "15.8", "16.0", "16.1")


def shim_authenticode_digest(buf, algorithm: str = "sha256", shim_version: str = "16.1",
                             source: str = "<bytes>") -> bytes:
    """shim's own ``generate_hash`` (pe.c) -- NOT the value in PCR4.

    shim uses it to match db/MokList hashes and on TPM 1.2.  Differences from edk2:
    a signed image must have its certificate table exactly at ``sum + trailing``
    (else shim errors); unsigned trailing data is not hashed at all up to 16.0, and hashed
    then zero-padded to a multiple of 8 from 16.1 (shim commit fb77b445).
    """
    if shim_version not in SHIM_HASH_VERSIONS:
        raise UnsupportedError(f"shim {shim_version!r}: generate_hash is modelled for "
                               f"{', '.join(SHIM_HASH_VERSIONS)}")
    names = _check_algorithms((algorithm,))
    view = _view(buf)
    image = _parse_pe(view, source)
    if not image.has_security_directory:
        # shim's read_header points SecDir at DataDirectory[4] regardless; with fewer
        # directories that is section-table data.  Not a layout worth predicting.
        raise UnsupportedError(f"{source}: image has no security directory; shim's hash of it "
                               f"is not modelled")
    size = len(view)
    hasher = _MultiHash(view, names, buf)
    _hash_headers(hasher, image, assume_security_directory=True)
    hashed_sum = image.size_of_headers
    section_bytes_total = 0
    for s in image.sections:
        if s.size_of_raw_data > size - image.size_of_headers - section_bytes_total:
            raise FormatError("headers + sections exceed the file (shim: 'Malformed section size')",
                              source=source, offset=s.header_offset + 16, field="SizeOfRawData")
        section_bytes_total += s.size_of_raw_data
    for s in _sections_by_file_offset(image):
        if s.size_of_raw_data == 0:
            continue
        hasher.feed(s.pointer_to_raw_data, s.pointer_to_raw_data + s.size_of_raw_data)
        hashed_sum += s.size_of_raw_data
    cert_offset, cert_size = image.certificate_table
    if size > hashed_sum and cert_size:
        trailing = size - cert_size - hashed_sum
        if size - hashed_sum < cert_size or hashed_sum + trailing != cert_offset:
            raise FormatError("data between the sections and the certificate table does not end "
                              "where the table starts (shim: 'Malformed binary after Attribute "
                              "Certificate Table')", source=source, offset=hashed_sum,
                              field="DataDirectory[SECURITY]")
        hasher.feed(hashed_sum, hashed_sum + trailing)
        hashed_sum += trailing
    if size > hashed_sum + cert_size and shim_version == "16.1":
        hasher.feed(hashed_sum, size)
        padding = -size % 8
        if padding:
            hasher.feed_bytes(bytes(padding))
    return hasher.digests()[algorithm]


def section_bytes(buf, section: PESection) -> memoryview:
    """The section's raw file data (SizeOfRawData bytes), without copying."""
    view = _view(buf)
    if section.size_of_raw_data == 0:
        # No file data: edk2's loader reads nothing and never looks at PointerToRawData,
        # which _parse_pe therefore does not check either.
        return view[0:0]
    end = section.pointer_to_raw_data + section.size_of_raw_data
    if end > len(view):
        raise FormatError(f"section {section.name} raw data ends past the end of the file",
                          offset=section.header_offset + 16, field="SizeOfRawData")
    return view[section.pointer_to_raw_data:end]


def loaded_size(section: PESection) -> int:
    """How many bytes the firmware maps for the section.

    edk2's PeCoffLoaderLoadImage copies min(VirtualSize, SizeOfRawData) bytes, zero-fills up
    to VirtualSize, and treats VirtualSize == 0 as SizeOfRawData (old linkers left it 0).
    """
    return section.virtual_size or section.size_of_raw_data


# Zero fill beyond the file data is materialised in memory; a hostile VirtualSize could ask
# for up to 4 GiB.  Real sections exceed their raw data by at most a few MiB (.bss, or the
# kernel's SizeOfImage with ukify 257.0-257.2).
MAX_ZERO_FILL = 256 * 1024 * 1024


def loaded_section(buf, section: PESection) -> bytes:
    """The section as the firmware loads it: loaded_size() bytes, file data then zeros."""
    length = loaded_size(section)
    raw = section_bytes(buf, section)
    if length - len(raw) > MAX_ZERO_FILL:
        raise UnsupportedError(f"section {section.name}: VirtualSize {section.virtual_size:#x} "
                               f"exceeds its {len(raw):#x} bytes of data by more than "
                               f"{MAX_ZERO_FILL:#x}; refusing to build it in memory")
    if length <= len(raw):
        return bytes(raw[:length])
    return bytes(raw) + bytes(length - len(raw))


def certificates(buf, image: PEImage) -> List[WinCertificate]:
    """The WIN_CERTIFICATE entries of the attribute certificate table, each 8-byte aligned."""
    view = _view(buf)
    offset, size = image.certificate_table
    end = offset + size
    entries: List[WinCertificate] = []
    at = offset
    while at < end:
        if end - at < 8:
            raise FormatError(f"{end - at} stray bytes at the end of the certificate table",
                              source=image.source, offset=at, field="WIN_CERTIFICATE")
        length = _u32(view, at)
        revision = _u16(view, at + 4)
        certificate_type = _u16(view, at + 6)
        if length < 8 or length > end - at:
            raise FormatError(f"dwLength {length} does not fit the {end - at} bytes left in the "
                              f"certificate table", source=image.source, offset=at, field="dwLength")
        entries.append(WinCertificate(at, length, revision, certificate_type,
                                      bytes(view[at + 8:at + length])))
        at += (length + 7) & ~7
    return entries
