"""shim's fallback boot list, ``\\EFI\\<vendor>\\BOOTX64.CSV`` (shim fallback.c, README.fallback).

The file is UCS-2 little-endian; an optional leading byte order mark U+FEFF is skipped.  Lines
end in CR and/or LF.  Each line is ``filename,label,arguments[,comment]``: the filename is
relative to the CSV's own directory, the label becomes the Boot#### description and must not
be empty, the arguments become the entry's optional data (UCS-2 with a NUL; none when empty).

fbx64.efi splits at the first three commas only, so a comment may hold further commas but a
label or argument cannot; this module refuses to write such fields rather than produce a line
fallback would read differently.
"""

import dataclasses
import re
from typing import Sequence, Tuple

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats.efi import decode_ucs2, encode_ucs2

BOM_UCS2LE = b"\xff\xfe"
_LINE = re.compile(r"[^\r\n]+")
_REFUSED_BOMS = ((b"\xef\xbb\xbf", "a UTF-8 byte order mark"),
                 (b"\xfe\xff", "a big-endian UTF-16 byte order mark"))


@dataclasses.dataclass(frozen=True)
class BootCsvEntry:
    filename: str
    label: str
    arguments: str = ""
    comment: str = ""

    def line(self) -> str:
        for name in ("filename", "label", "arguments"):
            value = getattr(self, name)
            if any(c in value for c in ",\r\n\0"):
                raise ValueError(f"CSV {name} {value!r} may not contain ',', CR, LF or NUL")
        if not self.filename or not self.label:
            raise ValueError("CSV filename and label must not be empty")
        if any(c in self.comment for c in "\r\n\0"):
            raise ValueError(f"CSV comment {self.comment!r} may not contain CR, LF or NUL")
        fields = [self.filename, self.label, self.arguments]
        if self.comment:
            fields.append(self.comment)
        return ",".join(fields)


def parse_boot_csv(buf: bytes, source: str = "BOOTX64.CSV") -> Tuple[BootCsvEntry, ...]:
    """Every line fallback would turn into a boot entry, in file order."""
    buf = bytes(buf)
    for bom, what in _REFUSED_BOMS:
        if buf.startswith(bom):
            raise FormatError(f"starts with {what}; fallback reads only UCS-2 little-endian",
                              source=source, offset=0, field="encoding")
    start = len(BOM_UCS2LE) if buf.startswith(BOM_UCS2LE) else 0
    # Every CSV line has a comma, 2C 00 in UCS-2LE: text without any NUL byte is 8-bit text.
    if len(buf) > start and b"\0" not in buf[start:]:
        raise FormatError("holds no UCS-2 text (no NUL bytes: looks like UTF-8 or ASCII); "
                          "fallback reads only UCS-2 little-endian", source=source,
                          offset=start, field="encoding")
    text = decode_ucs2(buf[start:], source, start, "encoding")
    # fallback reads the file as a NUL-terminated string: anything after a NUL is ignored by it,
    # so a NUL inside is a damaged file rather than something to guess about.
    if "\0" in text:
        raise FormatError("contains a NUL character", source=source,
                          offset=start + 2 * text.index("\0"), field="encoding")
    return tuple(_parse_line(match.group(), source, start + 2 * match.start())
                 for match in _LINE.finditer(text))


def _parse_line(line: str, source: str, offset: int) -> BootCsvEntry:
    fields = line.split(",", 3)
    if len(fields) < 2 or not fields[0]:
        raise FormatError(f"line {line!r} has no filename", source=source, offset=offset,
                          field="filename")
    if not fields[1]:
        raise FormatError(f"line {line!r} has an empty label", source=source, offset=offset,
                          field="label")
    arguments = fields[2] if len(fields) > 2 else ""
    comment = fields[3] if len(fields) > 3 else ""
    return BootCsvEntry(fields[0], fields[1], arguments, comment)


def boot_csv_bytes(entries: Sequence[BootCsvEntry]) -> bytes:
    """UCS-2LE with a byte order mark (fallback skips it; text editors then know the
    encoding), one LF-terminated line per entry."""
    text = "".join(entry.line() + "\n" for entry in entries)
    return BOM_UCS2LE + encode_ucs2(text, terminate=False)
