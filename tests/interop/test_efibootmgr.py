"""efibootmgr (libefivar 37) as the peer encoder and decoder of Boot#### variables.

efibootmgr works on a plain directory with ``EFIVARFS_PATH=DIR/ LIBEFIVAR_OPS=efivarfs`` and
builds HD() nodes from a loop device over a GPT image made by sgdisk.
"""

import os
import re
import shutil
import struct
import subprocess
import uuid

import pytest

from rhel_cvm_update import cli
from rhel_cvm_update.adapters.efivarfs import EfiVarFs
from rhel_cvm_update.adapters.esp import esp_from_disk
from rhel_cvm_update.formats.devpath import (END_ENTIRE_NODE, DevicePathNode, FilePathNode,
                                             VendorNode, device_path_bytes, device_path_text)
from rhel_cvm_update.formats.efi import EFI_GLOBAL_VARIABLE
from rhel_cvm_update.formats.loadopt import LoadOption, parse_boot_order
from tests.bootfixtures import boot_env, small_uki  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.root
GLOBAL = EFI_GLOBAL_VARIABLE


def efibootmgr(efivars, *argv):
    if shutil.which("efibootmgr") is None:
        pytest.skip("efibootmgr is not installed")
    env = dict(os.environ, EFIVARFS_PATH=str(efivars) + "/", LIBEFIVAR_OPS="efivarfs")
    proc = subprocess.run(["efibootmgr", *argv], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def boot_lines(text):
    """{'Boot0001': 'Boot0001* desc\\tpath...'} from efibootmgr -v or `boot list`."""
    return {line[:8]: line for line in text.splitlines() if re.match(r"^Boot[0-9A-F]{4}[* ]", line)}


@pytest.fixture
def loop_disk(boot_env):
    if shutil.which("losetup") is None or os.geteuid() != 0:
        pytest.skip("needs root and losetup")
    proc = subprocess.run(["losetup", "-f", "--show", str(boot_env.disk)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    if proc.returncode != 0:
        pytest.skip(f"no loop device available: {proc.stderr.strip()}")
    yield proc.stdout.strip()
    subprocess.run(["losetup", "-d", proc.stdout.strip()])


def test_efibootmgr_entry_decodes_and_reencodes_byte_exact(boot_env, loop_disk):
    env = boot_env
    efibootmgr(env.efivars, "-c", "-d", loop_disk, "-p", "1", "-l", "\\EFI\\redhat\\shimx64.efi",
               "-u", "-L", "Made by efibootmgr", "\\EFI\\Linux\\x.efi")
    efibootmgr(env.efivars, "-c", "-d", loop_disk, "-p", "1", "-l", "\\EFI\\BOOT\\BOOTX64.EFI",
               "-L", "Second")  # no optional data
    efibootmgr(env.efivars, "-b", "0001", "-A")  # inactive
    store = EfiVarFs(str(env.efivars))
    names = [n for n, g in store.list() if re.match(r"^Boot[0-9A-F]{4}$", n)]
    assert len(names) == 2
    for name in names:
        variable = store.get(name, GLOBAL)
        option = LoadOption.from_bytes(variable.data, source=name)
        assert option.to_bytes() == variable.data
    first = LoadOption.from_bytes(store.get("Boot0000", GLOBAL).data)
    assert first.description == "Made by efibootmgr" and first.active
    # efibootmgr -u writes UCS-2 without a NUL (reference 6.3).
    assert first.optional_data == "\\EFI\\Linux\\x.efi".encode("utf-16-le")
    second = LoadOption.from_bytes(store.get("Boot0001", GLOBAL).data)
    assert not second.active and second.optional_data == b""
    assert parse_boot_order(store.get("BootOrder", GLOBAL).data) == (1, 0)


def test_our_hd_and_file_nodes_equal_efibootmgrs(boot_env, loop_disk):
    env = boot_env
    efibootmgr(env.efivars, "-c", "-d", loop_disk, "-p", "1", "-l", "\\EFI\\redhat\\shimx64.efi",
               "-L", "peer")
    theirs = LoadOption.from_bytes(EfiVarFs(str(env.efivars)).get("Boot0000", GLOBAL).data)
    ours = (esp_from_disk(str(env.disk)).hard_drive_node(),
            FilePathNode.from_path("\\EFI\\redhat\\shimx64.efi"), END_ENTIRE_NODE)
    assert device_path_bytes(ours) == device_path_bytes(theirs.device_path)


def test_entries_we_write_are_listed_by_efibootmgr_identically(boot_env, capsys):
    env = boot_env
    first = env.add_uki("first.efi")
    second = env.add_uki("second.efi")
    assert cli.main(["--config", str(env.config), "boot", "add", "--uki", str(first)]) == 0
    assert cli.main(["--config", str(env.config), "boot", "add", "--uki", str(second),
                     "--once"]) == 0
    capsys.readouterr()
    assert cli.main(["--config", str(env.config), "boot", "list"]) == 0
    ours = capsys.readouterr().out
    theirs = efibootmgr(env.efivars, "-v")
    assert boot_lines(ours) == boot_lines(theirs) and len(boot_lines(ours)) == 2
    assert "BootNext: 0001" in theirs and "BootOrder: 0000,0001" in theirs
    line = boot_lines(theirs)["Boot0001"]
    assert line.startswith("Boot0001* RHEL CVM UKI 5.14.0-362.8.1.el9_3.x86_64\t")
    assert f"HD(1,GPT,{env.partition_guid},0x800,0x10000)/File(\\EFI\\redhat\\shimx64.efi)" in line
    # Our optional data: the UKI path in UCS-2 *with* its NUL, shown byte-wise by efibootmgr.
    assert line.endswith("\\.E.F.I.\\.L.i.n.u.x.\\.s.e.c.o.n.d...e.f.i...")


def test_boot_order_and_next_written_by_efibootmgr_are_read_and_kept(boot_env, capsys):
    env = boot_env
    uki = env.add_uki("k.efi")
    assert cli.main(["--config", str(env.config), "boot", "add", "--uki", str(uki)]) == 0
    store = EfiVarFs(str(env.efivars))
    store.set("Boot0009", GLOBAL, LoadOption(1, "other", (END_ENTIRE_NODE,)).to_bytes())
    efibootmgr(env.efivars, "-o", "0009,0000")
    efibootmgr(env.efivars, "-n", "0009")
    capsys.readouterr()
    assert cli.main(["--config", str(env.config), "boot", "list"]) == 0
    out = capsys.readouterr().out
    assert "BootNext: 0009" in out and "BootOrder: 0009,0000" in out
    # Removing our entry: efibootmgr sees BootOrder without it and the other entry intact.
    assert cli.main(["--config", str(env.config), "boot", "remove", "--uki", str(uki)]) == 0
    listing = efibootmgr(env.efivars, "-v")
    assert "BootOrder: 0009" in listing and "Boot0000" not in listing
    assert "BootNext: 0009" in listing


def _acpi(hid, uid):
    return DevicePathNode(0x02, 0x01, struct.pack("<II", hid, uid))


# Nodes firmware writes into its own entries (OVMF, Hyper-V, AWS, GCP, iPXE...).
NODE_SAMPLES = [
    [_acpi(0x0A0341D0, 0), DevicePathNode(0x01, 0x01, bytes([0, 0x1F])),
     DevicePathNode(0x03, 0x12, struct.pack("<HhH", 2, -1, 0))],
    [_acpi(0x0A0341D0, 1), DevicePathNode(0x01, 0x01, bytes([3, 2])),
     DevicePathNode(0x03, 0x02, struct.pack("<HH", 1, 5))],
    [_acpi(0x0A0841D0, 0), DevicePathNode(0x01, 0x01, bytes([0, 4])),
     DevicePathNode(0x03, 0x17, struct.pack("<I", 1) + bytes(range(1, 9)))],
    [_acpi(0x0A0341D0, 0), DevicePathNode(0x01, 0x01, bytes([0, 3])),
     DevicePathNode(0x03, 0x0B, bytes.fromhex("525400123456") + bytes(26) + b"\x01"),
     DevicePathNode(0x03, 0x0C, bytes([10, 0, 2, 15]) + bytes([10, 0, 2, 2])
                    + struct.pack("<HHHB", 0, 0, 6, 0) + bytes(8)),
     DevicePathNode(0x03, 0x18, b"http://example.com/boot.efi")],
    [DevicePathNode(0x04, 0x07, uuid.UUID("7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1").bytes_le),
     DevicePathNode(0x04, 0x06, uuid.UUID("462caa21-7614-4503-836e-8ab6f4662331").bytes_le)],
    [DevicePathNode(0x04, 0x09, struct.pack("<QQ", 0x1000, 0x1fff)
                    + uuid.UUID("77ab535a-45fc-624b-5560-f7b281d1f96e").bytes_le
                    + struct.pack("<H", 0))],
    [_acpi(0x0A0341D0, 0), DevicePathNode(0x01, 0x01, bytes([1, 1])),
     DevicePathNode(0x03, 0x01, struct.pack("<BBH", 1, 0, 0)),
     DevicePathNode(0x04, 0x02, struct.pack("<IQQ", 0, 0x1000, 0x800))],
    [DevicePathNode(0x01, 0x04, uuid.UUID("5cf32e68-7660-449b-80e6-7ea36e03f6a8").bytes_le
                    + b"\x01\x02"),
     DevicePathNode(0x03, 0x0A, uuid.UUID("e0c14753-f9be-11d2-9a0c-0090273fc14d").bytes_le),
     DevicePathNode(0x03, 0x05, bytes([2, 0])),
     VendorNode.media(uuid.UUID("55c5d1f8-04cd-46b5-8a20-e56cbb3052d0"))],
    [_acpi(0x0A0341D0, 0), DevicePathNode(0x01, 0x01, bytes([0, 2])),
     DevicePathNode(0x03, 0x0E, struct.pack("<IQBBB", 0, 115200, 8, 1, 1))],
    [DevicePathNode(0x05, 0x01, struct.pack("<HH", 2, 0) + b"Hard disk\0")],
]


@pytest.mark.parametrize("nodes", NODE_SAMPLES, ids=lambda ns: "-".join(
    f"{n.type:02x}{n.subtype:02x}" for n in ns))
def test_device_path_text_matches_efibootmgr(tmp_path, nodes):
    efivars = tmp_path / "efivars"
    efivars.mkdir()
    option = LoadOption(1, "sample", tuple(nodes) + (END_ENTIRE_NODE,))
    EfiVarFs(str(efivars)).set("Boot0001", GLOBAL, option.to_bytes())
    decoded = LoadOption.from_bytes(option.to_bytes())
    line = boot_lines(efibootmgr(efivars, "-v"))["Boot0001"]
    assert line == "Boot0001* sample\t" + device_path_text(decoded.device_path)


def test_real_firmware_entries_are_printed_like_efibootmgr(tmp_path):
    """Every load option from real firmware (event-log corpus, VM captures) that has one device
    path, no IPv6 node and ASCII optional data prints exactly as efibootmgr -v prints it.

    The exclusions are efibootmgr quirks this tool does not copy: it prints only the first
    device path of a FilePathList, its IPv6() text is byte-swapped, and it writes optional data
    bytes >= 0x80 raw, so the terminal's locale decides what they look like."""
    from rhel_cvm_update.bootmgr import BootEntry
    from rhel_cvm_update.commands.boot import entry_line
    from tests.bootfixtures import real_boot_variables

    simple = []
    for origin, data in real_boot_variables():
        option = LoadOption.from_bytes(data, source=origin)
        if (sum(n.type == 0x7F for n in option.device_path) == 1
                and not any((n.type, n.subtype) == (0x03, 0x0D) for n in option.device_path)
                and all(b < 0x80 for b in option.optional_data)):
            simple.append((origin, data, option))
    if not simple:
        pytest.skip("no real firmware load options available")
    efivars = tmp_path / "efivars"
    efivars.mkdir()
    store = EfiVarFs(str(efivars))
    for number, (_, data, _) in enumerate(simple):
        store.set(f"Boot{number:04X}", GLOBAL, data)
    theirs = boot_lines(efibootmgr(efivars, "-v"))
    for number, (origin, data, option) in enumerate(simple):
        ours = entry_line(BootEntry(number, 7, data, option, None, False))
        assert ours == theirs[f"Boot{number:04X}"], origin
