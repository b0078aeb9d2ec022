"""Fixtures for the boot-entry tests: small UKIs built by objcopy from the real systemd stub,
a fake ESP directory with shim, a GPT disk image made by sgdisk, an efivarfs-like directory.

Import the fixtures into a test module: ``from tests.bootfixtures import small_uki, boot_env``.
"""

import dataclasses
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests import realbins

UKI_VERSION = "5.14.0-362.8.1.el9_3.x86_64"
SHIM = Path("/usr/lib/shim/shimx64.efi")


def build_small_uki(out: Path, uname: str) -> Path:
    """A UKI whose .linux is a placeholder: enough for everything but booting."""
    if shutil.which("objcopy") is None or not realbins.SYSTEMD_STUB.exists():
        pytest.skip("objcopy or the systemd stub (systemd-boot-efi) is not installed")
    work = out.parent / (out.name + ".parts")
    work.mkdir(exist_ok=True)
    (work / "kernel").write_bytes(b"placeholder kernel " + uname.encode())
    (work / "initrd").write_bytes(b"placeholder initrd")
    return realbins.build_uki(out, work / "kernel", work / "initrd", "console=ttyS0", uname=uname)


@pytest.fixture(scope="session")
def small_uki(tmp_path_factory) -> Path:
    return build_small_uki(tmp_path_factory.mktemp("uki") / "small.efi", UKI_VERSION)


@dataclasses.dataclass
class BootEnv:
    root: Path
    efivars: Path
    esp: Path
    uki_dir: Path
    disk: Path
    config: Path
    partition_number: int
    partition_start: int
    partition_size: int
    partition_guid: uuid.UUID
    uki_source: Path

    def add_uki(self, name: str) -> Path:
        path = self.uki_dir / name
        shutil.copy(self.uki_source, path)
        return path


@pytest.fixture
def boot_env(tmp_path, small_uki) -> BootEnv:
    """efivars dir, ESP dir (EFI/redhat/shimx64.efi, EFI/Linux/), a GPT image as esp_device."""
    if shutil.which("sgdisk") is None:
        pytest.skip("sgdisk (gdisk) is not installed")
    efivars = tmp_path / "efivars"
    efivars.mkdir()
    esp = tmp_path / "esp"
    (esp / "EFI" / "redhat").mkdir(parents=True)
    uki_dir = esp / "EFI" / "Linux"
    uki_dir.mkdir()
    shim = esp / "EFI" / "redhat" / "shimx64.efi"
    if SHIM.exists():
        shutil.copy(SHIM, shim)
    else:
        shim.write_bytes(b"shim stand-in")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sgdisk", "-n", "1:2048:+32M", "-t", "1:ef00", str(disk)], check=True,
                   stdout=subprocess.DEVNULL)
    info = subprocess.run(["sgdisk", "-i", "1", str(disk)], check=True, stdout=subprocess.PIPE,
                          universal_newlines=True).stdout
    guid = uuid.UUID(info.split("Partition unique GUID: ")[1].split()[0])
    config = tmp_path / "config.yaml"
    config.write_text(f"efivars: {efivars}\nesp: {esp}\nesp_device: {disk}\nuki_dir: {uki_dir}\n"
                      f"vendor: redhat\nstate_dir: {tmp_path / 'state'}\n")
    return BootEnv(tmp_path, efivars, esp, uki_dir, disk, config, 1, 2048, 65536, guid,
                   small_uki)


CORPUS = Path("/work/shared/eventlog-corpus")
CAPTURED_BOOTS = Path(__file__).resolve().parent / "data" / "boots"


def real_boot_variables():
    """(origin, Boot#### data) of every distinct load option real firmware wrote: the
    EV_EFI_VARIABLE_BOOT events (PCR1) of the shared event-log corpus, and the Boot####
    variables the VM captures read from OVMF.  Empty when neither is present."""
    from rhel_cvm_update.errors import CvmUpdateError
    from rhel_cvm_update.formats.loadopt import boot_number
    from rhel_cvm_update.formats.tcg_event_data import decode_event_data
    from rhel_cvm_update.formats.tcglog import parse_event_log

    found = {}
    if CORPUS.is_dir():
        for path in sorted(p for p in CORPUS.rglob("*") if p.is_file()
                           and p.suffix not in (".md", ".tsv")):
            try:
                log = parse_event_log(path.read_bytes(), source=str(path))
            except CvmUpdateError:
                continue  # not an event log, or one the log tests deal with
            for event in log.events:
                if event.event_type != 0x80000002:  # EV_EFI_VARIABLE_BOOT
                    continue
                variable = decode_event_data(event)
                if boot_number(variable.name) is not None:
                    found.setdefault(variable.data, f"{path.relative_to(CORPUS)}:{variable.name}")
    for path in sorted(CAPTURED_BOOTS.glob("*/efivars/Boot*-8be4df61-93ca-11d2-aa0d-00e098032b8c")):
        if boot_number(path.name.split("-", 1)[0]) is not None:
            found.setdefault(path.read_bytes()[4:], str(path.relative_to(CAPTURED_BOOTS)))
    return [(origin, data) for data, origin in found.items()]
