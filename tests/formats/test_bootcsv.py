"""rhel_cvm_update.formats.bootcsv: shim fallback's BOOTX64.CSV.

The file that Debian's fbx64.efi really turns into a Boot#### entry is exercised in
tests/vm/test_boot_entry_vm.py; here: the encoding rules of shim's fallback.c try_boot_csv.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats.bootcsv import BootCsvEntry, boot_csv_bytes, parse_boot_csv

LINE = "shimx64.efi,Red Hat Enterprise Linux,,This is the boot entry for Red Hat Enterprise Linux"


def test_rhel_style_line_with_and_without_bom():
    body = (LINE + "\n").encode("utf-16-le")
    expected = (BootCsvEntry("shimx64.efi", "Red Hat Enterprise Linux", "",
                             "This is the boot entry for Red Hat Enterprise Linux"),)
    assert parse_boot_csv(body) == expected
    assert parse_boot_csv(b"\xff\xfe" + body) == expected


def test_crlf_cr_and_blank_lines_and_comment_commas():
    text = "\r\n\r\na.efi,A,\\EFI\\Linux\\a.efi,x,y\rb.efi,B\n\n"
    assert parse_boot_csv(text.encode("utf-16-le")) == (
        BootCsvEntry("a.efi", "A", "\\EFI\\Linux\\a.efi", "x,y"), BootCsvEntry("b.efi", "B"))


def test_write_is_bom_plus_ucs2_lines():
    entry = BootCsvEntry("shimx64.efi", "RHEL CVM 5.14", "\\EFI\\Linux\\k.efi", "managed")
    raw = boot_csv_bytes([entry])
    assert raw == b"\xff\xfe" + "shimx64.efi,RHEL CVM 5.14,\\EFI\\Linux\\k.efi,managed\n".encode("utf-16-le")
    assert parse_boot_csv(raw) == (entry,)


def test_utf8_file_is_refused():
    with pytest.raises(FormatError) as info:
        parse_boot_csv((LINE + "\n").encode("utf-8"), source="EFI/redhat/BOOTX64.CSV")
    assert "UTF-8" in str(info.value) and "BOOTX64.CSV" in str(info.value)


@pytest.mark.parametrize("bom", [b"\xef\xbb\xbf", b"\xfe\xff"])
def test_foreign_byte_order_marks_are_refused(bom):
    with pytest.raises(FormatError):
        parse_boot_csv(bom + (LINE + "\n").encode("utf-16-le"))


def test_big_endian_text_without_bom_is_not_silently_misread():
    with pytest.raises(FormatError):
        parse_boot_csv((LINE + "\n").encode("utf-16-be"))


@pytest.mark.parametrize("line", [",label,args", "file,,args", "file"])
def test_missing_filename_or_label(line):
    with pytest.raises(FormatError):
        parse_boot_csv((line + "\n").encode("utf-16-le"))


def test_odd_length_and_embedded_nul():
    with pytest.raises(FormatError):
        parse_boot_csv((LINE + "\n").encode("utf-16-le") + b"\x41")
    with pytest.raises(FormatError):
        parse_boot_csv("a.efi,A,\0,\n".encode("utf-16-le"))


@pytest.mark.parametrize("entry", [BootCsvEntry("a,b.efi", "A"), BootCsvEntry("a.efi", "A,B"),
                                   BootCsvEntry("a.efi", "A", "x,y"), BootCsvEntry("a.efi", ""),
                                   BootCsvEntry("a.efi", "A", comment="two\nlines")])
def test_fields_fallback_would_split_differently_are_refused(entry):
    with pytest.raises(ValueError):
        boot_csv_bytes([entry])


field = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFFFD,
                                       blacklist_categories=("Cs",), blacklist_characters=",\r\n"),
                max_size=20)
entries = st.builds(BootCsvEntry, field.filter(bool), field.filter(bool), field,
                    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFFFD,
                                                   blacklist_categories=("Cs",),
                                                   blacklist_characters="\r\n"), max_size=20))


@settings(max_examples=2000, deadline=None)
@given(st.lists(entries, max_size=4))
def test_roundtrip(items):
    assert parse_boot_csv(boot_csv_bytes(items)) == tuple(items)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_parse_or_raise_format_error(raw):
    try:
        parse_boot_csv(raw)
    except FormatError:
        pass


def test_debian_shim_package_csv():
    """The BOOTX64.CSV Debian's shim package ships (no BOM, LF line ends)."""
    from pathlib import Path

    path = Path("/usr/lib/shim/BOOTX64.CSV")
    if not path.exists():
        pytest.skip("shim-unsigned/shim-signed's BOOTX64.CSV is not installed")
    (entry,) = parse_boot_csv(path.read_bytes(), source=str(path))
    assert (entry.filename, entry.label, entry.arguments) == ("shimx64.efi", "debian", "")
    assert entry.comment.startswith("This is the boot entry for")
