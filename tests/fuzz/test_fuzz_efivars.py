"""Fuzz the UEFI variable parsers with mutated REAL variables: load options that OVMF and
real machines wrote (tests/data/boots captures, the shared event-log corpus), their device
paths, BootOrder/BootNext/BootCurrent from the captures, db/dbx signature lists, and the
BOOTX64.CSV Debian's shim package ships.

tests/formats/ already feeds random bytes and mutated synthetic options to these parsers;
here the seeds are real, so mutations land on the shapes firmware actually produces.
Only FormatError may escape, naming the source.
"""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats.bootcsv import boot_csv_bytes, parse_boot_csv
from rhel_cvm_update.formats.devpath import device_path_bytes, device_path_text, parse_device_path
from rhel_cvm_update.formats.efi import UefiVariableData, parse_signature_lists
from rhel_cvm_update.formats.loadopt import LoadOption, parse_boot_next, parse_boot_order
from tests.bootfixtures import real_boot_variables
from tests.fuzz.mutation import mutated

BOOTS = Path(__file__).resolve().parents[1] / "data" / "boots"
GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
IMAGE_SECURITY = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"
DEBIAN_SHIM_CSV = Path("/usr/lib/shim/BOOTX64.CSV")
FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOURCE = "fuzzed-variable"


def _captured(name: str, guid: str):
    """The data (attribute word dropped) of every captured copy of a variable, deduplicated."""
    return sorted({p.read_bytes()[4:] for p in BOOTS.glob(f"*/efivars/{name}-{guid}")})


LOAD_OPTIONS = [data for _, data in real_boot_variables()]
DEVICE_PATHS = []
for _data in LOAD_OPTIONS:
    _option = LoadOption.from_bytes(_data)
    DEVICE_PATHS.append(device_path_bytes(_option.device_path))
SIGNATURE_LISTS = _captured("db", IMAGE_SECURITY) + _captured("dbx", IMAGE_SECURITY)
ORDER_LIKE = _captured("BootOrder", GLOBAL) + _captured("BootCurrent", GLOBAL) + _captured("BootNext", GLOBAL)


def _need(seeds, what):
    if not seeds:
        pytest.skip(f"no real {what}: tests/data/boots and the event-log corpus are both absent")


def _only_format_errors(parse, data):
    try:
        return parse(data)
    except FormatError as e:
        assert e.source == SOURCE, e.source
        return None


def test_seeds_are_real_and_parse():
    _need(LOAD_OPTIONS, "load options")
    assert len(LOAD_OPTIONS) >= 5 and all(DEVICE_PATHS)
    _need(SIGNATURE_LISTS, "db/dbx")
    for data in SIGNATURE_LISTS:
        assert parse_signature_lists(data, source=SOURCE)


@FUZZ
@given(st.data())
def test_mutated_real_load_options(data):
    _need(LOAD_OPTIONS, "load options")
    raw = data.draw(mutated(LOAD_OPTIONS, head=128))
    option = _only_format_errors(lambda b: LoadOption.from_bytes(b, source=SOURCE), raw)
    if option is not None:
        # What parsed must print and re-encode to the same bytes (nothing silently dropped).
        device_path_text(option.device_path)
        option.to_json()
        assert option.to_bytes() == raw


@FUZZ
@given(st.data())
def test_mutated_real_device_paths(data):
    _need(DEVICE_PATHS, "device paths")
    raw = data.draw(mutated(DEVICE_PATHS, head=128))
    nodes = _only_format_errors(lambda b: parse_device_path(b, source=SOURCE), raw)
    if nodes is not None:
        device_path_text(nodes)
        assert device_path_bytes(nodes) == raw


@FUZZ
@given(st.data())
def test_mutated_boot_order_boot_next_boot_current(data):
    _need(ORDER_LIKE, "BootOrder/BootCurrent")
    raw = data.draw(mutated(ORDER_LIKE, head=16))
    order = _only_format_errors(lambda b: parse_boot_order(b, source=SOURCE), raw)
    assert order is None or (len(order) == len(raw) // 2 and all(0 <= n <= 0xFFFF for n in order))
    number = _only_format_errors(lambda b: parse_boot_next(b, source=SOURCE), raw)
    assert number is None or len(raw) == 2


@FUZZ
@given(st.data())
def test_mutated_real_signature_lists(data):
    _need(SIGNATURE_LISTS, "db/dbx")
    raw = data.draw(mutated(SIGNATURE_LISTS, head=64))
    _only_format_errors(lambda b: parse_signature_lists(b, source=SOURCE), raw)


@FUZZ
@given(st.data())
def test_mutated_variable_records_from_real_logs(data):
    """UEFI_VARIABLE_DATA as the event log carries it, built around real db contents."""
    _need(SIGNATURE_LISTS, "db/dbx")
    import struct
    import uuid

    body = SIGNATURE_LISTS[0][:512]
    name = "db".encode("utf-16-le")
    record = (uuid.UUID(IMAGE_SECURITY).bytes_le + struct.pack("<QQ", 2, len(body)) + name + body)
    raw = data.draw(mutated([record], head=40))
    _only_format_errors(lambda b: UefiVariableData.from_bytes(b, source=SOURCE), raw)


@FUZZ
@given(st.data())
def test_mutated_debian_bootx64_csv(data):
    if not DEBIAN_SHIM_CSV.exists():
        pytest.skip("Debian's shim BOOTX64.CSV (shim-unsigned) is not installed")
    raw = data.draw(mutated([DEBIAN_SHIM_CSV.read_bytes()], head=64))
    entries = _only_format_errors(lambda b: parse_boot_csv(b, source=SOURCE), raw)
    if entries:
        # Whatever was accepted is written back in the one canonical form and reads the same.
        assert parse_boot_csv(boot_csv_bytes(entries), source=SOURCE) == entries
