"""Synthesise PE/COFF files for tests, in pure Python (no committed binaries).

The builder writes every header field explicitly so that tests can produce the layouts
edk2's Authenticode code has to survive: zero-size, overlapping and out-of-order sections,
gaps, unaligned trailing data, PE32 and PE32+, with and without a security directory and a
certificate table.  It checks nothing: hostile layouts are the point.
"""

import dataclasses
import struct
import subprocess
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

IMAGE_FILE_MACHINE_I386 = 0x014C
IMAGE_FILE_MACHINE_AMD64 = 0x8664
IMAGE_SUBSYSTEM_EFI_APPLICATION = 10
SCN_CNT_CODE = 0x00000020
SCN_CNT_INITIALIZED_DATA = 0x00000040
SCN_MEM_EXECUTE = 0x20000000
SCN_MEM_READ = 0x40000000
DATA = SCN_CNT_INITIALIZED_DATA | SCN_MEM_READ
CODE = SCN_CNT_CODE | SCN_MEM_EXECUTE | SCN_MEM_READ


def align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclasses.dataclass
class Section:
    name: bytes
    data: bytes = b""
    # None: derived (VirtualSize = len(data); SizeOfRawData = len(data) rounded up to the
    # file alignment; PointerToRawData/VirtualAddress = next free aligned spot).
    virtual_size: Optional[int] = None
    size_of_raw_data: Optional[int] = None
    pointer_to_raw_data: Optional[int] = None
    virtual_address: Optional[int] = None
    characteristics: int = DATA


@dataclasses.dataclass
class Layout:
    """Where the builder put things, for tests that need the offsets."""

    pe_offset: int
    optional_header_offset: int
    section_table_offset: int
    size_of_headers: int
    sections: List[Tuple[int, int, int, int]]  # (VirtualAddress, VirtualSize, PointerToRawData, SizeOfRawData)
    certificate_table: Tuple[int, int]


def win_certificate(payload: bytes, revision: int = 0x0200, certificate_type: int = 0x0002) -> bytes:
    """One WIN_CERTIFICATE entry padded to 8 bytes (dwLength excludes the padding)."""
    entry = struct.pack("<IHH", 8 + len(payload), revision, certificate_type) + payload
    return entry + bytes(-len(entry) % 8)


def build_pe(sections: Sequence[Section] = (), *, pe32_plus: bool = True,
             number_of_rva_and_sizes: int = 16, file_alignment: int = 0x200,
             section_alignment: int = 0x1000, e_lfanew: int = 0x80,
             size_of_headers: Optional[int] = None, trailing: bytes = b"",
             certificates: Sequence[bytes] = (), cert_padding: bool = True,
             certificate_directory: Optional[Tuple[int, int]] = None,
             size_of_image: Optional[int] = None, image_base: int = 0x10000000,
             machine: Optional[int] = None, with_layout: bool = False):
    """A PE image as bytes (or (bytes, Layout) with ``with_layout``).

    ``certificates``: WIN_CERTIFICATE entries (see win_certificate) appended after the
    trailing data -- first padded to 8 bytes like sbsign/pesign do unless ``cert_padding``
    is False -- and described by DataDirectory[4] (override with ``certificate_directory``).
    """
    magic = 0x20B if pe32_plus else 0x10B
    fixed = 112 if pe32_plus else 96
    size_of_optional_header = fixed + 8 * number_of_rva_and_sizes
    coff = e_lfanew + 4
    opt = coff + 20
    table = opt + size_of_optional_header
    headers_end = table + 40 * len(sections)
    if size_of_headers is None:
        size_of_headers = align(headers_end, file_alignment)

    placed = []
    next_raw = size_of_headers
    next_va = align(size_of_headers, section_alignment)
    for s in sections:
        raw_size = align(len(s.data), file_alignment) if s.size_of_raw_data is None else s.size_of_raw_data
        pointer = next_raw if s.pointer_to_raw_data is None else s.pointer_to_raw_data
        vsize = len(s.data) if s.virtual_size is None else s.virtual_size
        va = next_va if s.virtual_address is None else s.virtual_address
        placed.append((va, vsize, pointer, raw_size))
        if s.pointer_to_raw_data is None:
            next_raw = pointer + raw_size
        next_va = align(max(next_va, va + max(vsize, 1)), section_alignment)

    end_of_sections = max([size_of_headers] + [p + r for _, _, p, r in placed])
    image = bytearray(end_of_sections)
    for s, (va, vsize, pointer, raw_size) in zip(sections, placed):
        chunk = s.data[:raw_size] + bytes(max(0, raw_size - len(s.data)))
        image[pointer:pointer + raw_size] = chunk
    # Names longer than 8 bytes go to a COFF string table after the sections, as GNU ld
    # does; the header then says "/N" (N = offset in the table, whose first u32 is its size).
    header_names = []
    strings = bytearray()
    for s in sections:
        if len(s.name) > 8:
            header_names.append(b"/%d" % (4 + len(strings)))
            strings += s.name + b"\0"
        else:
            header_names.append(s.name)
    symbol_table = 0
    if strings:
        symbol_table = len(image)
        image += struct.pack("<I", 4 + len(strings)) + strings
    image += trailing

    cert_table = (0, 0)
    if certificates:
        if cert_padding:
            image += bytes(-len(image) % 8)
        blob = b"".join(certificates)
        cert_table = (len(image), len(blob))
        image += blob
    if certificate_directory is not None:
        cert_table = certificate_directory

    if size_of_image is None:
        size_of_image = align(max([size_of_headers + 1] + [va + max(vs, 1) for va, vs, _, _ in placed]),
                              section_alignment)
    if machine is None:
        machine = IMAGE_FILE_MACHINE_AMD64 if pe32_plus else IMAGE_FILE_MACHINE_I386

    header = bytearray(size_of_headers if size_of_headers >= headers_end else headers_end)
    header[0:2] = b"MZ"
    struct.pack_into("<I", header, 0x3C, e_lfanew)
    header[e_lfanew:e_lfanew + 4] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", header, coff, machine, len(sections), 0, symbol_table, 0,
                     size_of_optional_header, 0x0206 if pe32_plus else 0x0102)
    entry = placed[0][0] if placed else 0
    struct.pack_into("<HBBIII I", header, opt, magic, 2, 40, 0, 0, 0, entry)
    if pe32_plus:
        struct.pack_into("<IQ", header, opt + 20, 0, image_base)
    else:
        struct.pack_into("<III", header, opt + 20, 0, 0, image_base)
    struct.pack_into("<IIHHHHHHI", header, opt + 32, section_alignment, file_alignment,
                     0, 0, 0, 0, 0, 0, 0)
    struct.pack_into("<IIIHH", header, opt + 56, size_of_image, size_of_headers, 0,
                     IMAGE_SUBSYSTEM_EFI_APPLICATION, 0)
    if pe32_plus:
        struct.pack_into("<QQQQII", header, opt + 72, 0x100000, 0x1000, 0x100000, 0x1000, 0,
                         number_of_rva_and_sizes)
    else:
        struct.pack_into("<IIIIII", header, opt + 72, 0x100000, 0x1000, 0x100000, 0x1000, 0,
                         number_of_rva_and_sizes)
    if number_of_rva_and_sizes > 4:
        struct.pack_into("<II", header, opt + fixed + 8 * 4, *cert_table)
    for index, (s, (va, vsize, pointer, raw_size)) in enumerate(zip(sections, placed)):
        at = table + 40 * index
        header[at:at + 8] = header_names[index].ljust(8, b"\0")
        struct.pack_into("<IIIIIIHHI", header, at + 8, vsize, va, raw_size, pointer, 0, 0, 0, 0,
                         s.characteristics)
    # The headers (including a section table longer than a hostile SizeOfHeaders) overwrite
    # whatever a section placed inside them.
    if len(image) < len(header):
        image += bytes(len(header) - len(image))
    image[0:len(header)] = header
    data = bytes(image)
    if with_layout:
        return data, Layout(e_lfanew, opt, table, size_of_headers, placed, cert_table)
    return data


# ---------------------------------------------------------------------------------------------
# Golden digests from tools outside the code under test


def pesign_hash(path, algorithm: str = "sha256") -> bytes:
    """``pesign -h -d ALG -i FILE``: its Authenticode digest.

    pesign hashes the sections in table order (it does not sort them by file offset like
    edk2 and sbsign do), so it is a golden source only for images whose table is in file
    order; and it crashes on images without a security directory.
    """
    proc = subprocess.run(["pesign", "-h", "-d", algorithm, "-i", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    out = proc.stdout.decode().strip()
    if not out.startswith("hash: "):
        raise AssertionError(f"unexpected pesign output {out!r}")
    return bytes.fromhex(out[len("hash: "):])


def sbsign_digest(path, key, cert, workdir) -> bytes:
    """The SHA-256 Authenticode digest sbsign computes and embeds when it signs ``path``.

    sbsign sorts sections by file offset like edk2.  The digest is read back out of the
    signature's SpcIndirectDataContent by osslsigncode ("Current message digest").
    """
    signed = Path(workdir) / (Path(path).name + ".sbsigned")
    subprocess.run(["sbsign", "--key", str(key), "--cert", str(cert), "--output", str(signed),
                    str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    proc = subprocess.run(["osslsigncode", "verify", "-in", str(signed)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout.decode(errors="replace").splitlines():
        if line.startswith("Current message digest"):
            return bytes.fromhex(line.split(":", 1)[1].strip())
    raise AssertionError(f"osslsigncode printed no message digest for {signed}")
