"""First boot of the root guest: what an admin (or Azure's conversion) does once.

1. The root has only its recovery passphrase: the initrd's systemd-cryptsetup asks for it on
   the serial console, and the harness types it there.
2. The product is installed from its RPM (``make rpm`` with Debian's Python path), with
   ``rpm -i --nodeps`` inside the guest: its own scriptlets, preset, file triggers and units run.
3. ``systemd-cryptenroll --tpm2-device=auto --tpm2-pcrs=4+7`` enrols the root's first token
   against this boot's PCRs; a marker file only this snapshot knows goes on the root.

The powered-off machine (disk overlay, UEFI variables, swtpm state) is cached per root image,
product and firmware mode.
"""

import base64
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

from tests.vm.guest.image import (REPO_ROOT, RECOVERY_PASSPHRASE, digest, guest_cache, locked, product_sources,
                                  product_units, run)
from tests.vm.guest.rootimage import ROOT_LUKS_DEVICE, RootImage
from tests.vm.guest.vm import PASSPHRASE_PROMPT, GuestVm

ROOT_MARKER_FILE = "/var/lib/e2e-marker"
# Debian's python3 looks in dist-packages; RHEL's python3-rpm-macros would give site-packages.
GUEST_RPM_DEFINES = '--define "python3_sitelib /usr/lib/python3/dist-packages"'
PRODUCT_INPUTS = ("rpm", "hooks", "man", "completion")


@dataclass(frozen=True)
class Snapshot:
    directory: Path
    secure_boot: bool
    marker: str
    first_boot_seconds: float

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def vars_file(self) -> Path:
        return self.directory / "vars.fd"

    @property
    def tpm_state(self) -> Path:
        return self.directory / "tpm"


def product_key() -> str:
    extra = sorted(p for d in PRODUCT_INPUTS for p in (REPO_ROOT / d).rglob("*") if p.is_file())
    paths = product_sources() + product_units() + extra + [REPO_ROOT / "pyproject.toml", REPO_ROOT / "Makefile"]
    return digest(*[str(p.relative_to(REPO_ROOT)) for p in paths], *paths)


def product_rpm() -> Path:
    """The product's RPM, built by ``make rpm`` for the guest's Python; cached by its inputs."""
    topdir = guest_cache() / ("product-rpm-" + product_key())
    with locked(topdir):
        built = sorted((topdir / "RPMS/noarch").glob("rhel-cvm-update-*.rpm")) if topdir.is_dir() else []
        if not built:
            subprocess.run(["make", "-s", "rpm", "RPM_TOPDIR=%s" % topdir, "RPM_DEFINES=%s" % GUEST_RPM_DEFINES],
                           cwd=str(REPO_ROOT), check=True, stdout=subprocess.DEVNULL)
            built = sorted((topdir / "RPMS/noarch").glob("rhel-cvm-update-*.rpm"))
    return built[-1]


def copy_to_guest(vm: GuestVm, source: Path, target: str) -> None:
    vm.check(["sh", "-c", 'base64 -d > "$1"', "sh", target], stdin=base64.b64encode(source.read_bytes()).decode())


def enrolled_root_snapshot(image: RootImage, secure_boot: bool) -> Snapshot:
    rpm = product_rpm()
    directory = image.directory / ("enrolled-%s-%s" % ("sb-on" if secure_boot else "sb-off", product_key()))
    with locked(directory):
        if not snapshot_complete(directory):
            shutil.rmtree(directory, ignore_errors=True)
            _first_boot(image, secure_boot, rpm, directory)
    record = json.loads((directory / "snapshot.json").read_text())
    return Snapshot(directory, secure_boot, record["marker"], record["first_boot_seconds"])


def _first_boot(image: RootImage, secure_boot: bool, rpm: Path, directory: Path) -> None:
    work = directory.with_name(directory.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    vm = GuestVm.create(image, work, secure_boot)
    try:
        vm.start(wait=False)
        vm.wait_console(PASSPHRASE_PROMPT)
        vm.type_on_console(RECOVERY_PASSPHRASE)
        vm.wait_boot(None)
        copy_to_guest(vm, rpm, "/root/" + rpm.name)
        vm.check(["rpm", "-i", "--nodeps", "/root/" + rpm.name], timeout=300)
        vm.check(["systemd-cryptenroll", "--tpm2-device=auto", "--tpm2-pcrs=4+7", ROOT_LUKS_DEVICE],
                 env={"PASSWORD": RECOVERY_PASSPHRASE}, timeout=300)
        marker = secrets.token_hex(16)
        vm.check(["sh", "-c", 'printf %s "$1" > "$2" && sync', "sh", marker, ROOT_MARKER_FILE])
        seconds = vm.boots[0].seconds
        vm.poweroff()
    except BaseException:
        vm.close()
        raise
    save_snapshot(work, directory, {"marker": marker, "first_boot_seconds": seconds, "product_rpm": rpm.name})


def snapshot_complete(directory: Path) -> bool:
    """snapshot.json is there and the disk overlay's backing image opens (a cache copied or
    linked from another checkout may hold an overlay whose backing path is gone)."""
    if not (directory / "snapshot.json").exists():
        return False
    return subprocess.run(["qemu-img", "info", "--backing-chain", str(directory / "disk.qcow2")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def save_snapshot(work: Path, directory: Path, record: Dict[str, object]) -> None:
    """Keep the powered-off machine of ``work`` (disk overlay, UEFI variables, TPM state) as a
    snapshot; snapshot.json, written last, marks it complete.  The overlay names its backing
    image relative to itself, so that the cache still works when the checkout moves."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    for name in ("disk.qcow2", "vars.fd", "tpm"):
        shutil.move(str(work / name), directory / name)
    overlay = directory / "disk.qcow2"
    info = json.loads(run(["qemu-img", "info", "--output=json", overlay]).stdout)
    backing = os.path.relpath(info["full-backing-filename"], str(directory))
    run(["qemu-img", "rebase", "-u", "-F", info["backing-filename-format"], "-b", backing, overlay])
    (directory / "snapshot.json").write_text(json.dumps(record))
    shutil.rmtree(work, ignore_errors=True)
