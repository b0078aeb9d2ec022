"""rhel_cvm_update.bootmgr and the `boot` command over an efivarfs-like directory, a fake ESP
directory and a GPT image made by sgdisk (the HD node's numbers come from sgdisk, not from us).

Entries efibootmgr writes and reads are compared in tests/interop/test_efibootmgr.py; here:
which entries are ours, numbering, ordering, undo on failure, and that other entries and
variables are never changed.
"""

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from rhel_cvm_update import cli
from rhel_cvm_update.adapters.efivarfs import EfiVarFs
from rhel_cvm_update.adapters.esp import Esp, EspPartition
from rhel_cvm_update.bootmgr import DESCRIPTION_PREFIX, BootManager
from rhel_cvm_update.formats.bootcsv import parse_boot_csv
from rhel_cvm_update.formats.devpath import END_ENTIRE_NODE, FilePathNode, HardDriveNode
from rhel_cvm_update.formats.efi import EFI_GLOBAL_VARIABLE
from rhel_cvm_update.formats.loadopt import LoadOption
from tests.bootfixtures import UKI_VERSION, boot_env, small_uki  # noqa: F401

GLOBAL = EFI_GLOBAL_VARIABLE
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def var_path(env, name):
    return env.efivars / f"{name}-{GLOBAL}"


def write_var(env, name, data, attributes=7):
    var_path(env, name).write_bytes(attributes.to_bytes(4, "little") + data)


def read_var(env, name):
    path = var_path(env, name)
    return path.read_bytes()[4:] if path.exists() else None


def snapshot(env):
    return {p.name: p.read_bytes() for p in env.efivars.iterdir()}


def manager(env):
    partition = EspPartition(str(env.disk), env.partition_number, env.partition_start,
                             env.partition_size, env.partition_guid)
    return BootManager(EfiVarFs(str(env.efivars)), Esp(str(env.esp)), "redhat", str(env.uki_dir),
                       partition)


def expected_option(env, uki_name, version=UKI_VERSION):
    return LoadOption(1, DESCRIPTION_PREFIX + version,
                      (HardDriveNode.gpt(1, 2048, 65536, env.partition_guid),
                       FilePathNode.from_path("\\EFI\\redhat\\shimx64.efi"), END_ENTIRE_NODE),
                      f"\\EFI\\Linux\\{uki_name}\0".encode("utf-16-le"))


def foreign_option(description="Foreign OS", path="\\EFI\\other\\grubx64.efi", data=b""):
    return LoadOption(1, description, (HardDriveNode.gpt(1, 2048, 65536, uuid.uuid4()),
                                       FilePathNode.from_path(path), END_ENTIRE_NODE), data)


def run_cli(env, *argv):
    return cli.main(["--config", str(env.config), "boot", *argv])


def test_add_creates_lowest_free_entry_promotes_it_and_writes_csv(boot_env, capsys):
    env = boot_env
    uki = env.add_uki("k1.efi")
    write_var(env, "Boot0000", foreign_option().to_bytes())
    write_var(env, "Boot0002", foreign_option("Other").to_bytes())
    write_var(env, "BootOrder", b"\x02\x00\x00\x00")
    assert run_cli(env, "add", "--uki", str(uki)) == 0
    assert read_var(env, "Boot0001") == expected_option(env, "k1.efi").to_bytes()
    assert var_path(env, "Boot0001").read_bytes()[:4] == b"\x07\0\0\0"
    assert read_var(env, "BootOrder") == b"\x01\x00\x02\x00\x00\x00"
    assert read_var(env, "BootNext") is None
    csv = parse_boot_csv((env.esp / "EFI" / "redhat" / "BOOTX64.CSV").read_bytes())
    assert [(c.filename, c.label, c.arguments) for c in csv] == [
        ("shimx64.efi", DESCRIPTION_PREFIX + UKI_VERSION, "\\EFI\\Linux\\k1.efi")]
    assert "Boot0001 starts \\EFI\\Linux\\k1.efi" in capsys.readouterr().out


def test_add_again_reuses_identical_entry_and_changes_nothing(boot_env):
    env = boot_env
    uki = env.add_uki("k1.efi")
    assert run_cli(env, "add", "--uki", str(uki)) == 0
    before = snapshot(env)
    csv_before = (env.esp / "EFI" / "redhat" / "BOOTX64.CSV").read_bytes()
    number, changes = manager(env).plan_add(manager(env).uki(str(uki)), once=False)
    assert number == 0 and changes == []
    assert run_cli(env, "add", "--uki", str(uki)) == 0
    assert snapshot(env) == before
    assert (env.esp / "EFI" / "redhat" / "BOOTX64.CSV").read_bytes() == csv_before


def test_add_once_sets_boot_next_and_keeps_boot_order_head(boot_env):
    env = boot_env
    old = env.add_uki("old.efi")
    new = env.add_uki("new.efi")
    assert run_cli(env, "add", "--uki", str(old)) == 0
    csv_before = (env.esp / "EFI" / "redhat" / "BOOTX64.CSV").read_bytes()
    assert run_cli(env, "add", "--uki", str(new), "--once") == 0
    assert read_var(env, "Boot0001") == expected_option(env, "new.efi").to_bytes()
    assert read_var(env, "BootNext") == b"\x01\x00"
    assert read_var(env, "BootOrder") == b"\x00\x00\x01\x00"
    assert (env.esp / "EFI" / "redhat" / "BOOTX64.CSV").read_bytes() == csv_before
    # Promotion after a good trial boot: to the front, CSV follows.
    mgr = manager(env)
    mgr.apply(mgr.plan_promote(1))
    assert read_var(env, "BootOrder") == b"\x01\x00\x00\x00"


def test_dry_run_changes_nothing_and_names_the_variables(boot_env, capsys):
    env = boot_env
    uki = env.add_uki("k1.efi")
    write_var(env, "BootOrder", b"")
    before = snapshot(env)
    assert run_cli(env, "add", "--uki", str(uki), "--once", "--dry-run") == 0
    out = capsys.readouterr().out
    assert snapshot(env) == before
    assert not (env.esp / "EFI" / "redhat" / "BOOTX64.CSV").exists()
    assert "would create Boot0000" in out and "would replace BootOrder" in out
    assert "would create BootNext" in out


def test_remove_drops_only_our_entries_of_that_uki(boot_env):
    env = boot_env
    keep = env.add_uki("keep.efi")
    gone = env.add_uki("gone.efi")
    assert run_cli(env, "add", "--uki", str(keep)) == 0
    assert run_cli(env, "add", "--uki", str(gone), "--once") == 0
    # Same shim and UKI path but not our description: not ours.
    lookalike = foreign_option("My own entry", "\\EFI\\redhat\\shimx64.efi",
                               "\\EFI\\Linux\\gone.efi\0".encode("utf-16-le"))
    write_var(env, "Boot0005", lookalike.to_bytes())
    write_var(env, "BootOrder", b"\x00\x00\x01\x00\x05\x00")
    os.unlink(gone)
    assert run_cli(env, "remove", "--uki", str(gone)) == 0
    assert read_var(env, "Boot0001") is None
    assert read_var(env, "BootNext") is None
    assert read_var(env, "BootOrder") == b"\x00\x00\x05\x00"
    assert read_var(env, "Boot0005") == lookalike.to_bytes()
    assert read_var(env, "Boot0000") == expected_option(env, "keep.efi").to_bytes()


def test_prune_removes_entries_of_deleted_ukis_only(boot_env):
    env = boot_env
    a = env.add_uki("a.efi")
    b = env.add_uki("b.efi")
    assert run_cli(env, "add", "--uki", str(a)) == 0
    assert run_cli(env, "add", "--uki", str(b)) == 0
    foreign = foreign_option().to_bytes()
    write_var(env, "Boot0007", foreign)
    os.unlink(b)
    mgr = manager(env)
    mgr.apply(mgr.plan_prune())
    assert read_var(env, "Boot0001") is None and read_var(env, "Boot0000") is not None
    assert read_var(env, "BootOrder") == b"\x00\x00"
    assert read_var(env, "Boot0007") == foreign
    # The CSV named b.efi (the last promoted); it now names a.efi, first in BootOrder.
    csv = parse_boot_csv((env.esp / "EFI" / "redhat" / "BOOTX64.CSV").read_bytes())
    assert [c.arguments for c in csv] == ["\\EFI\\Linux\\a.efi"]


def test_unreadable_and_foreign_entries_are_listed_and_kept(boot_env, capsys):
    env = boot_env
    uki = env.add_uki("k.efi")
    write_var(env, "Boot0000", b"\x01\x00\x00\x00\xff\x00A\x00\x00\x00")  # path length past end
    write_var(env, "Boot0001", foreign_option().to_bytes())
    before = {k: v for k, v in snapshot(env).items()}
    assert run_cli(env, "add", "--uki", str(uki)) == 0
    after = snapshot(env)
    for name in (f"Boot0000-{GLOBAL}", f"Boot0001-{GLOBAL}"):
        assert after[name] == before[name]
    assert read_var(env, "Boot0002") == expected_option(env, "k.efi").to_bytes()
    capsys.readouterr()
    assert run_cli(env, "list") == 0
    out = capsys.readouterr().out
    assert "Boot0000  (unreadable:" in out and "FilePathListLength" in out
    assert "Managed by rhel-cvm-update: Boot0002" in out
    assert "  \\EFI\\Linux\\k.efi  5.14.0-362.8.1.el9_3.x86_64  entries: Boot0002" in out


def test_odd_boot_order_is_refused_and_nothing_changes(boot_env, capsys):
    env = boot_env
    uki = env.add_uki("k.efi")
    write_var(env, "BootOrder", b"\x01\x00\x02")
    before = snapshot(env)
    assert run_cli(env, "add", "--uki", str(uki)) == 2
    assert "odd length" in capsys.readouterr().err
    assert snapshot(env) == before


def test_uki_outside_uki_dir_or_not_a_uki_is_refused(boot_env, capsys):
    env = boot_env
    outside = env.root / "x.efi"
    shutil.copy(env.uki_source, outside)
    (env.uki_dir / "junk.efi").write_bytes(b"MZjunk")
    assert run_cli(env, "add", "--uki", str(outside)) == 2
    assert run_cli(env, "add", "--uki", str(env.uki_dir / "junk.efi")) == 2
    assert os.listdir(env.efivars) == []


def test_list_json(boot_env, capsys):
    import json

    env = boot_env
    uki = env.add_uki("k.efi")
    assert run_cli(env, "add", "--uki", str(uki), "--once") == 0
    capsys.readouterr()
    assert run_cli(env, "list", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["boot_next"] == 0 and data["boot_order"] == [0]
    (entry,) = data["entries"]
    assert entry["managed"] and entry["uki"] == "\\EFI\\Linux\\k.efi"
    assert entry["device_path"] == (f"HD(1,GPT,{env.partition_guid},0x800,0x10000)/"
                                    "File(\\EFI\\redhat\\shimx64.efi)")
    assert data["ukis"] == [{"path": str(uki), "esp_path": "\\EFI\\Linux\\k.efi",
                             "kernel_version": UKI_VERSION, "problem": None}]


def test_plan_then_apply_undoes_everything_when_a_later_step_fails(boot_env):
    """BootOrder cannot be written (immutable, and the process lacks CAP_LINUX_IMMUTABLE):
    the Boot#### created before it must be deleted again, BootOrder and BootNext untouched."""
    env = boot_env
    if shutil.which("setpriv") is None or shutil.which("chattr") is None or os.geteuid() != 0:
        pytest.skip("needs root, setpriv and chattr")
    uki = env.add_uki("k.efi")
    write_var(env, "BootOrder", b"\x07\x00")
    write_var(env, "Boot0007", foreign_option().to_bytes())
    if subprocess.run(["chattr", "+i", str(var_path(env, "BootOrder"))]).returncode != 0:
        pytest.skip("inode flags unsupported here")
    try:
        before = snapshot(env)
        proc = subprocess.run(
            ["setpriv", "--bounding-set", "-linux_immutable", "--inh-caps", "-linux_immutable",
             sys.executable, "-m", "rhel_cvm_update", "--config", str(env.config), "boot", "add",
             "--uki", str(uki)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
            timeout=120)
        assert proc.returncode == 3, proc.stderr
        assert "BootOrder" in proc.stderr and "EPERM" in proc.stderr
        assert snapshot(env) == before
        assert not (env.esp / "EFI" / "redhat" / "BOOTX64.CSV").exists()
    finally:
        subprocess.run(["chattr", "-i", str(var_path(env, "BootOrder"))], check=True)


def test_boot_order_never_names_a_missing_entry_in_any_applied_prefix(boot_env):
    env = boot_env
    a = env.add_uki("a.efi")
    b = env.add_uki("b.efi")
    mgr = manager(env)
    for changes in (mgr.plan_add(mgr.uki(str(a)), once=False)[1],):
        check_prefixes(env, mgr, changes)
    mgr = manager(env)
    _, changes = mgr.plan_add(mgr.uki(str(b)), once=True)
    check_prefixes(env, mgr, changes)
    mgr = manager(env)
    check_prefixes(env, mgr, mgr.plan_remove("\\EFI\\Linux\\a.efi"))
    check_prefixes(env, mgr, manager(env).plan_remove("\\EFI\\Linux\\b.efi"))


def check_prefixes(env, mgr, changes):
    """Apply the changes one by one; after each, every number BootOrder/BootNext names exists."""
    for change in changes:
        mgr.apply([change])
        state = mgr.state()
        numbers = {e.number for e in state.entries}
        assert set(state.boot_order) <= numbers
        assert state.boot_next is None or state.boot_next in numbers


def test_boot_add_and_remove_exit_4_while_the_lock_is_held(boot_env):
    """An admin's boot add during a path-unit update must not race its efivarfs writes."""
    from rhel_cvm_update.journal import state_lock

    env = boot_env
    uki = env.add_uki("k.efi")
    before = snapshot(env)
    with state_lock(str(env.root / "state")):
        for verb in ("add", "remove"):
            proc = subprocess.run([sys.executable, "-m", "rhel_cvm_update", "--config", str(env.config), "boot",
                                   verb, "--uki", str(uki)], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
            assert proc.returncode == 4, proc.stderr
            assert "another rhel-cvm-update transaction holds" in proc.stderr
    assert snapshot(env) == before
    # Free again: it runs and records what it did.
    assert cli.main(["--config", str(env.config), "boot", "add", "--uki", str(uki)]) == 0
    recorded = json.loads((env.root / "state" / "last-boot.json").read_text())
    assert recorded["command"] == "boot add" and recorded["entry"].startswith("Boot")
    assert any(c["target"] == "BootOrder" for c in recorded["changes"])
