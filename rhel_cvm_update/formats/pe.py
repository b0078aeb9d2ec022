"""PE/COFF images: headers, sections and WIN_CERTIFICATE (the Authenticode digest: authenticode.py).

Everything here works on a bytes-like buffer (normally a read-only ``mmap`` the caller
opened) through ``memoryview`` slices, so a 100 MiB UKI is read without being copied.

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
import struct
from typing import Dict, List, Optional, Tuple

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
        return _parse_pe(byte_view(buf), source)


def byte_view(buf) -> memoryview:
    """A flat unsigned-byte view of any bytes-like buffer (an mmap, bytes, a memoryview)."""
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


def section_bytes(buf, section: PESection) -> memoryview:
    """The section's raw file data (SizeOfRawData bytes), without copying."""
    view = byte_view(buf)
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
    view = byte_view(buf)
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
