"""Real firmware reads the boot entries this tool writes.

1. The Boot#### + BootOrder that BootManager writes, put into a copy of OVMF's variable store
   with virt-fw-vars, make OVMF start shim, and shim start the UKI named in the optional data:
   the guest reports BootCurrent = our entry, the firmware still holds our bytes, and PCR4's
   boot-application events are shim (full HD()/File() path) then the UKI (File() node only).
2. shim's fallback (Debian's fbx64.efi), started from \\EFI\\BOOT\\BOOTX64.EFI, turns the
   BOOTX64.CSV this tool writes into a Boot#### byte-identical to the entry BootManager builds.

Reuses the capture harness of tests/vm/capture.py (ESP image, UKI build, swtpm, QEMU argv).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rhel_cvm_update.adapters.efivarfs import EfiVarFs
from rhel_cvm_update.adapters.esp import Esp, esp_from_disk
from rhel_cvm_update.bootmgr import BootManager
from rhel_cvm_update.formats.devpath import FilePathNode, HardDriveNode
from rhel_cvm_update.formats.efi import EFI_GLOBAL_VARIABLE
from rhel_cvm_update.formats.loadopt import LoadOption, parse_boot_next, parse_boot_order
from rhel_cvm_update.formats.tcg_event_data import ImageLoadEvent, decode_event_data
from rhel_cvm_update.formats.tcglog import parse_event_log
from tests.bootfixtures import small_uki  # noqa: F401  (pytest fixture)

pytestmark = [pytest.mark.vm, pytest.mark.root]

TOOLS = ("qemu-system-x86_64", "swtpm", "swtpm_setup", "sgdisk", "mkfs.vfat", "mcopy", "mmd",
         "objcopy")
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
FBX64 = Path("/usr/lib/shim/fbx64.efi.signed")


@pytest.fixture(scope="module")
def capture():
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from tests.vm import capture as harness
    for needed in (harness.SHIM_SIGNED, harness.OVMF_DIR / "OVMF_CODE_4M.fd",
                   harness.OVMF_DIR / "OVMF_VARS_4M.fd"):
        if not needed.exists():
            pytest.skip(f"{needed} is not installed")
    try:
        import virt.firmware  # noqa: F401
    except ImportError:
        pytest.skip("virt-firmware (test extra) is not installed")
    return harness


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy(source, target)


def host_esp(work: Path, files) -> Path:
    """A directory standing in for the mounted ESP (same files as the disk image)."""
    esp = work / "esp-mount"
    for esp_path, source in files.items():
        link_or_copy(Path(source), esp.joinpath(*esp_path.strip("\\").split("\\")))
    (esp / "EFI" / "Linux").mkdir(parents=True, exist_ok=True)
    return esp


def vars_with(capture, work: Path, efivars: Path, names) -> Path:
    """A copy of OVMF's vars template holding ``names`` from our efivarfs directory."""
    store = EfiVarFs(str(efivars))
    variables = {}
    for name in names:
        var = store.get(name, EFI_GLOBAL_VARIABLE)
        variables[f"{name}-{EFI_GLOBAL_VARIABLE}"] = {"attr": var.attributes, "data": var.data.hex()}
    vars_file = work / "OVMF_VARS.fd"
    capture.make_vars(capture.OVMF_DIR / "OVMF_VARS_4M.fd", vars_file, work,
                      {"variables": variables}, None)
    return vars_file


def boot(capture, work: Path, disk: Path, vars_file: Path) -> str:
    sock = work / "swtpm.sock"
    serial = work / "serial.log"
    swtpm = capture.start_swtpm(work / "tpmstate", sock)
    argv = capture.qemu_argv(capture.OVMF_DIR / "OVMF_CODE_4M.fd", vars_file, disk, sock, serial,
                             False)
    try:
        qemu = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=capture.QEMU_TIMEOUT_SECONDS)
    finally:
        try:
            swtpm.wait(timeout=10)
        except subprocess.TimeoutExpired:
            swtpm.kill()
            swtpm.wait()
    assert qemu.returncode == 0, qemu.stdout.decode(errors="replace")
    return serial.read_text(errors="replace")


def test_ovmf_boots_shim_then_the_uki_named_by_our_entry(capture, tmp_path):
    work = tmp_path
    uki = capture.build_uki(capture.UKI_A, work, None)
    files = {capture.SHIM_ESP_PATH: capture.SHIM_SIGNED, capture.UKI_A.esp_path: uki.path}
    disk = work / "disk.img"
    capture.make_esp_disk(disk, files)  # no grubx64.efi: shim must take the optional data
    esp = host_esp(work, files)
    efivars = work / "efivars"
    efivars.mkdir()
    manager = BootManager(EfiVarFs(str(efivars)), Esp(str(esp)), "redhat",
                          str(esp / "EFI" / "Linux"), esp_from_disk(str(disk)))
    number, changes = manager.plan_add(manager.uki(str(esp / "EFI" / "Linux" / "uki-a.efi")),
                                       once=False)
    manager.apply(changes)
    ours = EfiVarFs(str(efivars)).get(f"Boot{number:04X}", EFI_GLOBAL_VARIABLE).data

    serial = boot(capture, work, disk, vars_with(capture, work, efivars,
                                                 [f"Boot{number:04X}", "BootOrder"]))
    _pcrs, captured = capture.parse_serial(serial)
    boot_current = captured[f"efivars/BootCurrent-{EFI_GLOBAL_VARIABLE}"][4:]
    assert parse_boot_next(boot_current) == number
    assert captured[f"efivars/Boot{number:04X}-{EFI_GLOBAL_VARIABLE}"][4:] == ours

    log = parse_event_log(captured["eventlog"], source="guest event log")
    loads = [decode_event_data(e) for e in log.events
             if e.pcr == 4 and e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION]
    assert all(isinstance(load, ImageLoadEvent) for load in loads)
    shim_path, uki_path = loads[0].device_path, loads[1].device_path
    option = LoadOption.from_bytes(ours)
    hd_nodes = [n for n in shim_path if isinstance(n, HardDriveNode)]
    assert hd_nodes == [option.device_path[0]]
    assert [n.path for n in shim_path if isinstance(n, FilePathNode)] == ["\\EFI\\redhat\\shimx64.efi"]
    assert [n.path for n in uki_path if isinstance(n, FilePathNode)] == ["\\EFI\\Linux\\uki-a.efi"]


def test_shim_fallback_turns_our_csv_into_our_entry(capture, tmp_path, small_uki):
    if not FBX64.exists():
        pytest.skip(f"{FBX64} is not installed (shim-signed)")
    work = tmp_path
    files = {"\\EFI\\BOOT\\BOOTX64.EFI": capture.SHIM_SIGNED, "\\EFI\\BOOT\\fbx64.efi": FBX64,
             capture.SHIM_ESP_PATH: capture.SHIM_SIGNED, "\\EFI\\Linux\\k.efi": small_uki}
    esp = host_esp(work, files)
    disk = work / "disk.img"
    efivars = work / "efivars"
    efivars.mkdir()
    # The partition GUID make_esp_disk uses is fixed, so the HD node is known before the image.
    capture.make_esp_disk(disk, files)
    manager = BootManager(EfiVarFs(str(efivars)), Esp(str(esp)), "redhat",
                          str(esp / "EFI" / "Linux"), esp_from_disk(str(disk)))
    _, changes = manager.plan_add(manager.uki(str(esp / "EFI" / "Linux" / "k.efi")), once=False)
    manager.apply(changes)
    ours = EfiVarFs(str(efivars)).get("Boot0000", EFI_GLOBAL_VARIABLE).data
    csv = (esp / "EFI" / "redhat" / "BOOTX64.CSV")
    files["\\EFI\\redhat\\BOOTX64.CSV"] = csv
    capture.make_esp_disk(disk, files)  # the same disk, now with our CSV on it

    vars_file = work / "OVMF_VARS.fd"
    shutil.copy(capture.OVMF_DIR / "OVMF_VARS_4M.fd", vars_file)
    serial = boot(capture, work, disk, vars_file)  # fallback creates the entry, then resets

    from virt.firmware.varstore import edk2
    variables = edk2.Edk2VarStore(str(vars_file)).get_varlist()
    boot_entries = {name: var.data for name, var in variables.items()
                    if name.startswith("Boot") and len(name) == 8 and name != "BootNext"}
    created = [name for name, data in boot_entries.items() if data == ours]
    assert len(created) == 1, (serial[-2000:], {n: d.hex() for n, d in boot_entries.items()})
    order = parse_boot_order(variables["BootOrder"].data)
    assert order[0] == int(created[0][4:], 16)
