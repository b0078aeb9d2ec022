"""The kernel-install plugin under the real kernel-install of systemd 252 (Debian's; its
install.conf passes layout=uki through as RHEL 9.4's backport does) and with the
environment of systemd 254+ (KERNEL_INSTALL_IMAGE_TYPE), reference 8."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.packaging.hookenv import KERNEL_INSTALL_PLUGIN, Recorder
from tests.packaging.rpmtools import require

KVER = "5.14.0-999.el9.x86_64"
TOKEN = "0123456789abcdef0123456789abcdef"


class Host:
    def __init__(self, tmp_path: Path, layout: str = "uki", exit_code: int = 0):
        self.boot_root = tmp_path / "efi"
        self.boot_root.mkdir()
        self.conf_root = tmp_path / "kernel-conf"
        self.conf_root.mkdir()
        (self.conf_root / "install.conf").write_text("layout=%s\n" % layout)
        (self.conf_root / "entry-token").write_text(TOKEN + "\n")
        self.uki = tmp_path / "vmlinuz-virt.efi"
        self.uki.write_bytes(b"MZ stand-in UKI " + os.urandom(64))
        self.uki_dir = self.boot_root / "EFI" / "Linux"
        self.placed = self.uki_dir / ("%s-%s.efi" % (TOKEN, KVER))
        self.recorder = Recorder(tmp_path / "bin", exit_code=exit_code)
        self.config = tmp_path / "config.yaml"
        self.configure(self.uki_dir)

    def configure(self, uki_dir: Path) -> None:
        self.config.write_text("uki_dir: %s\n" % json.dumps(str(uki_dir)))

    def kernel_install(self, *args: str) -> subprocess.CompletedProcess:
        env = self.recorder.env({
            "RHEL_CVM_UPDATE_CONFIG": str(self.config),
            "KERNEL_INSTALL_CONF_ROOT": str(self.conf_root),
            "KERNEL_INSTALL_PLUGINS": str(KERNEL_INSTALL_PLUGIN),
            "BOOT_ROOT": str(self.boot_root),
            "MACHINE_ID": TOKEN,
        })
        return subprocess.run(["kernel-install", "--verbose"] + list(args), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=120)


@pytest.fixture
def host(tmp_path):
    require("kernel-install")
    return Host(tmp_path)


def test_add_places_the_uki_and_updates_once(host):
    result = host.kernel_install("add", KVER, str(host.uki))
    assert result.returncode == 0, result.stdout + result.stderr
    assert host.placed.read_bytes() == host.uki.read_bytes()
    assert sorted(p.name for p in host.uki_dir.iterdir()) == [host.placed.name]
    assert host.recorder.calls() == ["update"]
    assert "installing %s as %s" % (host.uki, host.placed) in result.stdout


def test_add_keeps_a_copy_an_earlier_plugin_made(host):
    """90-uki-copy (253+) installs the same bytes under the same name, or with +tries."""
    host.uki_dir.mkdir(parents=True)
    earlier = host.uki_dir / ("%s-%s+3.efi" % (TOKEN, KVER))
    earlier.write_bytes(host.uki.read_bytes())
    result = host.kernel_install("add", KVER, str(host.uki))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in host.uki_dir.iterdir()) == [earlier.name]
    assert host.recorder.calls() == ["update"]


def test_add_replaces_a_stale_uki_of_the_same_name(host):
    host.uki_dir.mkdir(parents=True)
    host.placed.write_bytes(b"an older build")
    assert host.kernel_install("add", KVER, str(host.uki)).returncode == 0
    assert host.placed.read_bytes() == host.uki.read_bytes()
    assert not any(p.name.endswith(".tmp") for p in host.uki_dir.iterdir())


def test_remove_deletes_the_uki_and_updates(host):
    assert host.kernel_install("add", KVER, str(host.uki)).returncode == 0
    hand_placed = host.uki_dir / "custom.efi"
    hand_placed.write_bytes(b"admin's own")
    result = host.kernel_install("remove", KVER)
    assert result.returncode == 0, result.stderr
    assert not host.placed.exists()
    assert hand_placed.exists()
    assert host.recorder.calls() == ["update", "update"]


def test_failed_update_fails_kernel_install_with_its_exit_code(tmp_path):
    require("kernel-install")
    host = Host(tmp_path, exit_code=3)
    result = host.kernel_install("add", KVER, str(host.uki))
    assert result.returncode == 3
    assert "rhel-cvm-update: kernel-install add %s: 'rhel-cvm-update update' failed" % KVER in result.stderr
    assert "exit 3" in result.stderr


def test_other_layouts_are_left_alone(tmp_path):
    require("kernel-install")
    host = Host(tmp_path, layout="bls")
    result = host.kernel_install("add", KVER, str(host.uki))
    assert result.returncode == 0, result.stderr
    assert not host.uki_dir.exists()
    assert host.recorder.calls() == []


def _plugin(host: Host, env_extra, *args):
    env = host.recorder.env(dict({"RHEL_CVM_UPDATE_CONFIG": str(host.config)}, **env_extra))
    return subprocess.run([str(KERNEL_INSTALL_PLUGIN)] + list(args), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=120)


def test_systemd_254_environment_with_a_generated_uki(tmp_path):
    """254+: KERNEL_INSTALL_IMAGE_TYPE=uki, and a UKI generator's product in the staging area
    wins over the kernel image argument."""
    host = Host(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "uki.efi").write_bytes(b"generated UKI")
    env = {"KERNEL_INSTALL_LAYOUT": "other", "KERNEL_INSTALL_IMAGE_TYPE": "uki",
           "KERNEL_INSTALL_BOOT_ROOT": str(host.boot_root), "KERNEL_INSTALL_ENTRY_TOKEN": TOKEN,
           "KERNEL_INSTALL_MACHINE_ID": TOKEN, "KERNEL_INSTALL_STAGING_AREA": str(staging),
           "KERNEL_INSTALL_VERBOSE": "0", "KERNEL_INSTALL_INITRD_GENERATOR": "",
           "KERNEL_INSTALL_UKI_GENERATOR": "ukify"}
    entry_dir = str(host.boot_root / TOKEN / KVER)
    result = _plugin(host, env, "add", KVER, entry_dir, str(host.uki))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "recorded: update\n"  # nothing of its own without KERNEL_INSTALL_VERBOSE
    assert host.placed.read_bytes() == b"generated UKI"
    assert host.recorder.calls() == ["update"]


def test_missing_environment_is_an_error_with_a_message(tmp_path):
    host = Host(tmp_path)
    result = _plugin(host, {"KERNEL_INSTALL_LAYOUT": "uki", "KERNEL_INSTALL_ENTRY_TOKEN": ""},
                     "add", KVER, "/x", str(host.uki))
    assert result.returncode == 1
    assert "KERNEL_INSTALL_ENTRY_TOKEN is not set" in result.stderr
    assert host.recorder.calls() == []
    missing_image = _plugin(host, {"KERNEL_INSTALL_LAYOUT": "uki", "KERNEL_INSTALL_ENTRY_TOKEN": TOKEN},
                            "add", KVER, "/x", str(tmp_path / "absent.efi"))
    assert missing_image.returncode == 1
    assert "is not a file" in missing_image.stderr
    assert host.recorder.calls() == []


def test_configured_uki_dir_gets_its_own_copy(tmp_path):
    """uki_dir set elsewhere than $BOOT_ROOT/EFI/Linux: 90-uki-copy's file there is not
    where rhel-cvm-update looks, so the plugin copies the UKI into uki_dir."""
    require("kernel-install")
    host = Host(tmp_path)
    host.uki_dir.mkdir(parents=True)
    (host.uki_dir / host.placed.name).write_bytes(host.uki.read_bytes())
    elsewhere = tmp_path / "ukis"
    host.configure(elsewhere)
    result = host.kernel_install("add", KVER, str(host.uki))
    assert result.returncode == 0, result.stderr
    assert (elsewhere / host.placed.name).read_bytes() == host.uki.read_bytes()
    assert host.recorder.calls() == ["update"]
    assert host.kernel_install("remove", KVER).returncode == 0
    assert not (elsewhere / host.placed.name).exists()
    assert host.placed.exists()  # 90-uki-copy's own file is 90-uki-copy's to remove


def test_unreadable_configuration_fails_before_touching_anything(tmp_path):
    require("kernel-install")
    host = Host(tmp_path)
    host.config.write_text("uki_dirr: /typo\n")
    result = host.kernel_install("add", KVER, str(host.uki))
    assert result.returncode == 1
    assert "unknown key(s) uki_dirr" in result.stderr
    assert "cannot read the configuration of rhel-cvm-update" in result.stderr
    assert not host.uki_dir.exists()
    assert host.recorder.calls() == []


def test_unknown_commands_are_ignored(tmp_path):
    host = Host(tmp_path)
    result = _plugin(host, {"KERNEL_INSTALL_LAYOUT": "uki"}, "inspect", KVER)
    assert result.returncode == 0
    assert host.recorder.calls() == []
