"""The atheris entry points in fuzz/targets.py run every parser on real seeds (and a few
hostile ones) with only the project's errors escaping, so they stay usable for long runs."""

from pathlib import Path

import pytest

from fuzz.targets import TARGETS, run_one

BOOTS = Path(__file__).resolve().parents[1] / "data" / "boots" / "sb-on-uki-a"
GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
SEEDS = {
    "pe": [Path("/usr/lib/shim/shimx64.efi.signed"), Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")],
    "event-log": [BOOTS / "eventlog.bin"],
    "load-option": [BOOTS / "efivars" / f"Boot0007-{GLOBAL}"],
    "boot-order": [BOOTS / "efivars" / f"BootOrder-{GLOBAL}", BOOTS / "efivars" / f"BootCurrent-{GLOBAL}"],
    "boot-csv": [Path("/usr/lib/shim/BOOTX64.CSV")],
    "signature-lists": [BOOTS / "efivars" / "db-d719b2cb-3d3a-4596-a3bc-dad00e67656f"],
}
# efivarfs files start with a 4-byte attribute word that the adapter strips.
EFIVARFS = ("load-option", "boot-order", "signature-lists")
HOSTILE = [b"", b"\0" * 64, b"\xff" * 600, b"MZ" + b"\x41" * 300, b"{" * 2000, b"[" * 5000]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_target_runs_on_seeds_and_hostile_input(target):
    seeds = [p for p in SEEDS.get(target, []) if p.exists()]
    for path in seeds:
        data = path.read_bytes()
        run_one(target, data[4:] if target in EFIVARFS else data)
    for data in HOSTILE:
        run_one(target, data)


def test_seeds_parse_without_error():
    """The seeds are valid input: the targets accept them whole, not just survive them."""
    for target in ("pe", "event-log", "load-option", "boot-order", "signature-lists"):
        for path in (p for p in SEEDS[target] if p.exists()):
            data = path.read_bytes()
            TARGETS[target](data[4:] if target in EFIVARFS else data)
