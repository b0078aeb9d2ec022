"""The RPM: builds from the sdist, rpmlint-clean, lists and lays out every file where
systemd, dnf 4, dnf 5 and kernel-install look, and rpm itself runs the file triggers
once per transaction with the changed paths on stdin."""

import os
import re
import stat
from pathlib import Path

import pytest
import yaml

from rhel_cvm_update.config import config_from_mapping
from tests.packaging.rpmtools import NAME, RPMLINT_CONFIG, REPO, build_payload_rpm, require, run

SITELIB = "/usr/lib/python3.9/site-packages"
HOOK = "/usr/libexec/rhel-cvm-update/rhel-cvm-update-hook"
# Where each consumer looks (reference 8; systemd.unit(5); man pages of the plugins).
DESIGN_FILES = {
    "/usr/bin/rhel-cvm-update": 0o755,
    SITELIB + "/rhel_cvm_update/cli.py": 0o644,
    SITELIB + "/rhel_cvm_update/commands/__init__.py": 0o644,
    "/etc/rhel-cvm-update/config.yaml": 0o644,
    "/usr/lib/systemd/system/rhel-cvm-update.path": 0o644,
    "/usr/lib/systemd/system/rhel-cvm-update.service": 0o644,
    "/usr/lib/systemd/system/rhel-cvm-update-confirm.service": 0o644,
    "/usr/lib/systemd/system/rhel-cvm-update-grow-root.service": 0o644,
    "/usr/lib/systemd/system-preset/80-rhel-cvm-update.preset": 0o644,
    "/usr/lib/systemd/catalog/rhel-cvm-update.catalog": 0o644,
    HOOK: 0o755,
    "/usr/lib/kernel/install.d/95-rhel-cvm-update.install": 0o755,
    "/etc/dnf/plugins/post-transaction-actions.d/rhel-cvm-update.action": 0o644,
    "/etc/dnf/libdnf5-plugins/actions.d/rhel-cvm-update.actions": 0o644,
    "/usr/share/man/man8/rhel-cvm-update.8": 0o644,
    "/usr/share/bash-completion/completions/rhel-cvm-update": 0o644,
}
TRIGGER_PATHS = "/boot/efi/EFI/Linux, /boot/efi/EFI/redhat, /usr/lib/modules"


def test_rpmlint_reports_no_errors(project_rpm):
    require("rpmlint")
    result = run(["rpmlint", "-c", str(RPMLINT_CONFIG), str(project_rpm["binary"]),
                  str(project_rpm["source"]), str(REPO / "rpm" / (NAME + ".spec"))])
    summary = re.search(r"(\d+) errors, (\d+) warnings", result.stdout)
    assert summary, result.stdout + result.stderr
    assert summary.group(1) == "0", result.stdout
    assert " E: " not in result.stdout


def test_package_lists_every_file_of_the_design(project_rpm):
    listed = set(run(["rpm", "-qlp", str(project_rpm["binary"])]).stdout.split())
    missing = [path for path in DESIGN_FILES if path not in listed]
    assert not missing
    assert "/var/lib/rhel-cvm-update" in listed
    query = run(["rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\\n]", str(project_rpm["binary"])])
    modes = dict(line.split(" ", 1)[::-1] for line in query.stdout.splitlines())
    assert modes["/var/lib/rhel-cvm-update"] == "drwx------"
    config_files = set(run(["rpm", "-qcp", str(project_rpm["binary"])]).stdout.split())
    assert "/etc/rhel-cvm-update/config.yaml" in config_files


def test_noarch_requires_under_rhel_names(project_rpm):
    info = run(["rpm", "-qp", "--qf", "%{ARCH}\n", str(project_rpm["binary"])]).stdout.strip()
    assert info == "noarch"
    requires = set(run(["rpm", "-qpR", str(project_rpm["binary"])]).stdout.split("\n"))
    for name in ("python3-pyyaml", "python3-pyudev", "python3-systemd", "python3-tpm2-pytss",
                 "python3-pydbus", "python3-cryptography", "cryptsetup", "systemd"):
        assert name in requires
    assert "efibootmgr" not in requires


def test_file_triggers_watch_esp_shim_and_modules(project_rpm):
    triggers = run(["rpm", "-qp", "--filetriggers", str(project_rpm["binary"])]).stdout
    assert "transfiletriggerin scriptlet (using /bin/sh) -- " + TRIGGER_PATHS in triggers
    assert "transfiletriggerpostun scriptlet (using /bin/sh) -- " + TRIGGER_PATHS in triggers
    assert HOOK + " rpm-filetrigger-in --paths-from-stdin" in triggers
    assert HOOK + " rpm-filetrigger-postun" in triggers


def test_install_lays_out_files_where_consumers_look(project_rpm, tmp_path):
    root = tmp_path / "root"
    result = run(["rpm", "-i", "--root", str(root), "--dbpath", "/var/lib/rpm", "--nodeps", "--noscripts",
                  str(project_rpm["binary"])])
    assert result.returncode == 0, result.stderr
    for path, mode in DESIGN_FILES.items():
        st = os.stat(root / path.lstrip("/"))
        assert stat.S_ISREG(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == mode, path
    # The shipped config is the commented example: every key at its default.
    with open(root / "etc/rhel-cvm-update/config.yaml") as f:
        shipped = yaml.safe_load(f)
    assert config_from_mapping(shipped).as_dict() == config_from_mapping({}).as_dict()
    preset = (root / "usr/lib/systemd/system-preset/80-rhel-cvm-update.preset").read_text()
    assert "enable rhel-cvm-update.path" in preset.split("\n")
    # The launcher runs the installed package (its --version needs no dependency).
    version = run(["/usr/bin/python3", "-s", str(root / "usr/bin/rhel-cvm-update"), "--version"],
                  env=dict(os.environ, PYTHONPATH=str(root / SITELIB.lstrip("/"))))
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == "rhel-cvm-update 0.1.0"
    assert (root / "usr/bin/rhel-cvm-update").read_text().startswith("#!/usr/bin/python3 -s\n")


BUSYBOX_APPLETS = ("sh", "cat", "grep", "stat", "date", "sleep", "echo", "rm", "mkdir")
# Stands in for the interpreter of /usr/bin/rhel-cvm-update inside the scratch root (no
# Python there): it records each run of the tool.
RECORDING_PYTHON = '#!/bin/sh\necho "$*" >> /var/log/rhel-cvm-update-runs\n'


def _busybox_root(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "var/log").mkdir(parents=True)
    with open("/bin/busybox", "rb") as src, open(root / "bin/busybox", "wb") as dst:
        dst.write(src.read())
    os.chmod(root / "bin/busybox", 0o755)
    for applet in BUSYBOX_APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    python = root / "usr/bin/python3"
    python.write_text(RECORDING_PYTHON)
    python.chmod(0o755)


def _runs(root: Path):
    log = root / "var/log/rhel-cvm-update-runs"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.root
def test_rpm_runs_one_update_per_transaction(project_rpm, tmp_path):
    """Real rpm, real trigger declarations, real hook script (under busybox in a scratch
    root): a transaction of two packages with five boot files and kernel modules runs the
    update once; a transaction without boot files runs none; an erase runs one."""
    require("busybox")
    if os.geteuid() != 0:
        pytest.skip("needs root: rpm chroots into the scratch root to run scriptlets")
    root = tmp_path / "root"
    _busybox_root(root)
    rpm = ["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm", "--nodeps"]
    installed = run(rpm + ["-i", str(project_rpm["binary"])])
    assert installed.returncode == 0, installed.stderr
    assert _runs(root) == []

    kernel = build_payload_rpm(tmp_path / "k", "kernel-uki-virt", {
        "/usr/lib/modules/6.99.0-1.el9.x86_64/vmlinuz-virt.efi": b"uki",
        "/usr/lib/modules/6.99.0-1.el9.x86_64/modules.dep": b"",
        "/usr/lib/modules/6.99.0-1.el9.x86_64/kernel/fs/ext4.ko": b"",
    })
    boot_files = build_payload_rpm(tmp_path / "e", "esp-files", {
        "/boot/efi/EFI/Linux/one.efi": b"1",
        "/boot/efi/EFI/Linux/two.efi": b"2",
        "/boot/efi/EFI/Linux/three.efi": b"3",
        "/boot/efi/EFI/redhat/shimx64.efi": b"shim",
        "/boot/efi/EFI/redhat/BOOTX64.CSV": b"",
    })
    modules_only = build_payload_rpm(tmp_path / "m", "kernel-modules-extra", {
        "/usr/lib/modules/6.99.0-1.el9.x86_64/extra/a.ko": b"",
    })

    transaction = run(rpm + ["-i", str(kernel), str(boot_files)])
    assert transaction.returncode == 0, transaction.stderr
    assert _runs(root) == ["-s /usr/bin/rhel-cvm-update update"]
    assert transaction.stderr.count("(rpm-filetrigger-in): 5 boot file(s) changed") == 1

    no_boot_files = run(rpm + ["-i", str(modules_only)])
    assert no_boot_files.returncode == 0, no_boot_files.stderr
    assert len(_runs(root)) == 1

    erase = run(rpm + ["-e", "kernel-uki-virt", "esp-files", "kernel-modules-extra"])
    assert erase.returncode == 0, erase.stderr
    assert _runs(root) == ["-s /usr/bin/rhel-cvm-update update"] * 2

    # Erasing the tool with a kernel: rpm runs no trigger of an erased package.
    assert run(rpm + ["-i", str(kernel)]).returncode == 0
    assert len(_runs(root)) == 3
    both = run(rpm + ["-e", NAME, "kernel-uki-virt"])
    assert both.returncode == 0, both.stderr
    assert "scriptlet failed" not in both.stderr and "not found" not in both.stderr, both.stderr
    assert not (root / HOOK.lstrip("/")).exists()


@pytest.mark.root
def test_rpm_in_an_installroot_does_not_update(project_rpm, tmp_path):
    """rpm --root chroots into the installroot; with /proc and /dev there (as image
    builders and mock provide them) the hook sees that PID 1's root is not its own and leaves the TPM and
    boot variables alone.  A private PID namespace makes PID 1 ours, so its root is
    readable even where ptrace of the real init is restricted."""
    require("busybox", "unshare", "mount")
    if os.geteuid() != 0:
        pytest.skip("needs root for PID and mount namespaces")
    root = tmp_path / "root"
    _busybox_root(root)
    (root / "proc").mkdir()
    (root / "dev").mkdir()
    kernel = build_payload_rpm(tmp_path / "k", "kernel-uki-virt", {
        "/usr/lib/modules/6.99.0-1.el9.x86_64/vmlinuz-virt.efi": b"uki"})
    # The shell stays PID 1 (like systemd outside the installroot); rpm chroots itself.
    script = 'mount --bind /proc "$1/proc" && mount --bind /dev "$1/dev" && shift && "$@"; exit $?'
    result = run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script, "sh", str(root),
                  "rpm", "--root", str(root), "--dbpath", "/var/lib/rpm", "--nodeps", "-i",
                  str(project_rpm["binary"]), str(kernel)])
    assert result.returncode == 0, result.stderr
    assert "(rpm-filetrigger-in): 1 boot file(s) changed" in result.stderr
    assert "not updating: running chrooted" in result.stderr
    assert _runs(root) == []


def test_preset_enables_the_path_confirm_and_grow_root_units(project_rpm, tmp_path):
    """What %systemd_post does on a first install (systemctl preset), offline on the
    installed tree with systemd's own systemctl: the path unit, the confirm service and the
    grow-root service are enabled where their [Install] sections say; the update service is
    only started by the path unit."""
    require("systemctl")
    root = tmp_path / "root"
    installed = run(["rpm", "-i", "--root", str(root), "--dbpath", "/var/lib/rpm", "--nodeps", "--noscripts",
                     str(project_rpm["binary"])])
    assert installed.returncode == 0, installed.stderr
    # Everything not named by a preset stays disabled, as on RHEL (90-default.preset).
    (root / "usr/lib/systemd/system-preset/99-default-disable.preset").write_text("disable *\n")
    units = ["rhel-cvm-update.path", "rhel-cvm-update.service", "rhel-cvm-update-confirm.service",
             "rhel-cvm-update-grow-root.service"]
    preset = run(["systemctl", "--root", str(root), "preset"] + units)
    assert preset.returncode == 0, preset.stderr
    wants = root / "etc/systemd/system"
    assert (wants / "paths.target.wants" / "rhel-cvm-update.path").is_symlink()
    assert (wants / "multi-user.target.wants" / "rhel-cvm-update-confirm.service").is_symlink()
    assert (wants / "multi-user.target.wants" / "rhel-cvm-update-grow-root.service").is_symlink()
    enabled = {p.name for p in wants.rglob("*") if p.is_symlink()}
    assert enabled == {"rhel-cvm-update.path", "rhel-cvm-update-confirm.service", "rhel-cvm-update-grow-root.service"}
