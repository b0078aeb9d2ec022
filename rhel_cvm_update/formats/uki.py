"""Unified Kernel Images (systemd-stub + sections) and shim's SBAT sections.

A UKI is a PE image whose ``.linux`` section holds the kernel.  What matters for PCR4 is
how systemd-stub hands that kernel to ``LoadImage``: a buffer of VirtualSize bytes taken
from the *loaded* image (file data, then zero fill), with the Vendor(55c5d1f8...) device
path (systemd src/boot/efi/linux.c, v252-v257; measured-boot-reference.md 2.3).

systemd-stub reads every section through its VirtualSize; a section whose VirtualSize is
0 counts as absent (PE_SECTION_VECTOR_IS_SET in src/boot/efi/pe.h), so text sections here
are read the same way.
"""

import dataclasses
import shlex
import struct
from typing import Dict, Iterable, List, Optional, Tuple

from rhel_cvm_update.errors import FormatError, UnsupportedError
from rhel_cvm_update.formats.authenticode import authenticode_digests, nested_authenticode_digests
from rhel_cvm_update.formats.pe import PEImage, PESection, loaded_section, section_bytes

# Sections systemd-stub looks up by name (252-257).  Two sections with one of these names
# make the stub's choice version-dependent (252 takes the last, 254+ the first): refused.
STUB_SECTIONS = (".linux", ".osrel", ".cmdline", ".initrd", ".ucode", ".splash", ".dtb",
                 ".uname", ".sbat", ".pcrsig", ".pcrpkey", ".profile", ".dtbauto", ".hwids")

# Linux x86 boot protocol (Documentation/arch/x86/boot.rst): the real-mode setup header.
_SETUP_HEADER_MAGIC_OFFSET = 0x202  # "HdrS"
_SETUP_VERSION_OFFSET = 0x206
_KERNEL_VERSION_POINTER_OFFSET = 0x20E  # the string is at 0x200 + this value
_KERNEL_VERSION_MAX = 512


def stub_section_bytes(buf, section: Optional[PESection]) -> Optional[bytes]:
    """The bytes systemd-stub sees for a section, or None when it sees no section."""
    if section is None or section.virtual_size == 0:
        return None
    return loaded_section(buf, section)


def _text(data: Optional[bytes], source: str, section: PESection) -> Optional[str]:
    if data is None:
        return None
    try:
        return data.rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{section.name} is not UTF-8 text: {e.reason}", source=source,
                          offset=section.pointer_to_raw_data + e.start, field=section.name) from None


def parse_os_release(text: str, source: str = "<os-release>") -> Dict[str, str]:
    """os-release(5): KEY=VALUE lines, values optionally shell-quoted; '#' comments."""
    values: Dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.replace("_", "").isalnum():
            raise FormatError(f"line {number} is not KEY=VALUE: {line!r}", source=source,
                              field="os-release")
        try:
            words = shlex.split(value)
        except ValueError as e:
            raise FormatError(f"line {number}: {e}: {line!r}", source=source,
                              field="os-release") from None
        values[key] = " ".join(words)
    return values


def bzimage_version_string(kernel) -> Optional[str]:
    """The kernel_version string of a Linux/x86 bzImage setup header, or None if absent.

    Boot protocol 2.00+: u16 at 0x20E points to a NUL-terminated string at 0x200 + value.
    """
    view = memoryview(kernel)
    if len(view) < _KERNEL_VERSION_POINTER_OFFSET + 2:
        return None
    if bytes(view[_SETUP_HEADER_MAGIC_OFFSET:_SETUP_HEADER_MAGIC_OFFSET + 4]) != b"HdrS":
        return None
    version, = struct.unpack_from("<H", view, _SETUP_VERSION_OFFSET)
    pointer, = struct.unpack_from("<H", view, _KERNEL_VERSION_POINTER_OFFSET)
    if version < 0x0200 or pointer == 0:
        return None
    start = 0x200 + pointer
    raw = bytes(view[start:start + _KERNEL_VERSION_MAX])
    end = raw.find(b"\0")
    if end <= 0:
        return None
    return raw[:end].decode("ascii", "replace")


@dataclasses.dataclass(frozen=True)
class UKI:
    source: str
    pe: PEImage
    buf: object = dataclasses.field(repr=False, compare=False)
    linux: PESection

    @property
    def sections(self) -> List[str]:
        return [s.name for s in self.pe.sections]

    @classmethod
    def parse(cls, buf, source: str = "<bytes>") -> "UKI":
        return cls.from_pe(buf, PEImage.parse(buf, source))

    @classmethod
    def from_pe(cls, buf, pe: PEImage) -> "UKI":
        seen: Dict[str, PESection] = {}
        for s in pe.sections:
            if s.name in STUB_SECTIONS and s.name in seen:
                raise UnsupportedError(f"{pe.source}: two {s.name} sections (headers at "
                                       f"{seen[s.name].header_offset:#x} and {s.header_offset:#x}); "
                                       f"systemd-stub versions disagree on which one they use")
            seen[s.name] = s
        linux = seen.get(".linux")
        if linux is None:
            raise FormatError("not a UKI: no .linux section", source=pe.source,
                              offset=pe.section_table_offset, field=".linux")
        if linux.virtual_size == 0:
            raise FormatError(".linux has VirtualSize 0: systemd-stub would find no kernel",
                              source=pe.source, offset=linux.header_offset + 8, field="VirtualSize")
        return cls(source=pe.source, pe=pe, buf=buf, linux=linux)

    def _section_text(self, name: str) -> Optional[str]:
        section = self.pe.section(name)
        return _text(stub_section_bytes(self.buf, section), self.source, section) if section else None

    def linux_payload(self) -> bytes:
        """The .linux buffer systemd-stub passes to LoadImage: VirtualSize bytes, zero-filled."""
        return loaded_section(self.buf, self.linux)

    def linux_authenticode_digests(self, algorithms: Iterable[str] = ("sha256",)) -> Dict[str, bytes]:
        """edk2's Authenticode of linux_payload(), the kernel event in PCR4 (reference 2.3)."""
        return self.authenticode_digests(algorithms, with_image=False)[1]

    def authenticode_digests(self, algorithms: Iterable[str] = ("sha256",),
                             with_image: bool = True) -> Tuple[Optional[Dict[str, bytes]], Dict[str, bytes]]:
        """(edk2's Authenticode of the UKI itself, of its kernel): the two PCR4 events of the
        UKI.  Usually VirtualSize <= SizeOfRawData, so the kernel is a slice of the file and
        both are hashed in one pass; else the kernel is the zero-filled loaded copy."""
        source = f"{self.source}:.linux"
        raw = section_bytes(self.buf, self.linux)
        in_file = self.linux.virtual_size <= len(raw)
        if with_image and in_file and raw:
            start = self.linux.pointer_to_raw_data
            return nested_authenticode_digests(self.buf, self.pe, (start, start + self.linux.virtual_size),
                                               algorithms, self.source, source)
        image = authenticode_digests(self.buf, algorithms, self.source, self.pe) if with_image else None
        kernel = raw[:self.linux.virtual_size] if in_file else self.linux_payload()
        return image, authenticode_digests(kernel, algorithms, source=source)

    @property
    def cmdline(self) -> Optional[str]:
        text = self._section_text(".cmdline")
        return None if text is None else text.strip()

    @property
    def osrel(self) -> Dict[str, str]:
        text = self._section_text(".osrel")
        return {} if text is None else parse_os_release(text, f"{self.source}:.osrel")

    @property
    def uname(self) -> Optional[str]:
        text = self._section_text(".uname")
        return None if text is None else text.strip() or None

    @property
    def sbat(self) -> Optional[str]:
        return self._section_text(".sbat")

    def kernel_version_with_origin(self) -> Tuple[Optional[str], Optional[str]]:
        """(version, where it came from): ``.uname``, else the bzImage setup header.

        The .osrel VERSION_ID is the OS release (e.g. "9.2"), not a kernel version, so it is
        never used here; callers that want it read ``osrel``.
        """
        if self.uname:
            return self.uname, ".uname"
        raw = section_bytes(self.buf, self.linux)
        words = (bzimage_version_string(raw[:min(len(raw), self.linux.virtual_size)]) or "").split()
        if words:  # a blank version string (hostile or damaged) names no version
            return words[0], "bzImage header"
        return None, None

    @property
    def kernel_version(self) -> Optional[str]:
        return self.kernel_version_with_origin()[0]


def is_uki(pe: PEImage) -> bool:
    return pe.section(".linux") is not None


def pe_sbat(buf, pe: PEImage) -> Optional[str]:
    """The .sbat CSV text of any PE (shim, UKI, systemd-boot), or None."""
    section = pe.section(".sbat")
    return _text(stub_section_bytes(buf, section), pe.source, section) if section else None


_SBATLEVEL_HEADER = struct.Struct("<III")


def shim_sbat_levels(buf, source: str = "<bytes>", pe: Optional[PEImage] = None) -> Dict[str, str]:
    """shim 15.7+ ``.sbatlevel``: {"previous": ..., "latest": ...} SbatLevel payloads.

    Layout (shim sbat.h ``struct sbat_level_section``): u32 version (0), u32 previous,
    u32 latest; each offset counts from the end of the version field and names a
    NUL-terminated string inside the section.
    """
    if pe is None:
        pe = PEImage.parse(buf, source)
    section = pe.section_by_full_name(".sbatlevel")
    if section is None:
        return {}
    data = bytes(section_bytes(buf, section)[:min(section.size_of_raw_data,
                                                  section.virtual_size or section.size_of_raw_data)])
    base = section.pointer_to_raw_data
    if len(data) < _SBATLEVEL_HEADER.size:
        raise FormatError(f".sbatlevel is {len(data)} bytes, shorter than its header",
                          source=pe.source, offset=base, field=".sbatlevel")
    version, previous, latest = _SBATLEVEL_HEADER.unpack_from(data, 0)
    if version != 0:
        raise UnsupportedError(f"{pe.source}: .sbatlevel version {version} (only 0 is known)")
    levels: Dict[str, str] = {}
    for name, pointer, field_offset in (("previous", previous, 4), ("latest", latest, 8)):
        start = 4 + pointer
        end = data.find(b"\0", start) if start < len(data) else -1
        if start < _SBATLEVEL_HEADER.size or end < 0:
            raise FormatError(f".sbatlevel {name} offset {pointer:#x} does not point at a "
                              f"NUL-terminated string in the section", source=pe.source,
                              offset=base + field_offset, field=f".sbatlevel.{name}")
        try:
            levels[name] = data[start:end].decode("ascii")
        except UnicodeDecodeError:
            raise FormatError(f".sbatlevel {name} is not ASCII", source=pe.source,
                              offset=base + start, field=f".sbatlevel.{name}") from None
    return levels
