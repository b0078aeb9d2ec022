"""First boot of the e2e guest: enrol the LUKS2 volume to this boot's PCRs, as Azure leaves it.

The image's data volume has only a recovery passphrase.  On the first boot the harness, through
the agent, runs what a first-boot conversion runs inside the VM:

    systemd-cryptenroll --tpm2-device=auto --tpm2-pcrs=4+7 /dev/disk/by-partlabel/cvmdata

then lets systemd-cryptsetup unlock the volume with that token (crypttab: tpm2-device=auto,
headless), makes a file system on it and leaves a marker file whose content only this
snapshot knows.  The powered-off machine (disk overlay, UEFI variables, TPM state, marker) is
cached per image and firmware mode, so every scenario starts from a freshly enrolled machine
without paying for the first boot again.
"""

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

from tests.vm.guest.image import (DATA_MAPPING, DATA_MOUNT, LUKS_DEVICE, RECOVERY_KEY_FILE, GuestImage,
                                  locked, run)
from tests.vm.guest.vm import GuestVm

MARKER_FILE = DATA_MOUNT + "/marker"
CRYPTSETUP_UNIT = "systemd-cryptsetup@%s.service" % DATA_MAPPING
DATA_MOUNT_UNIT = DATA_MOUNT.strip("/").replace("/", "-") + ".mount"


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


def enrolled_snapshot(image: GuestImage, secure_boot: bool) -> Snapshot:
    directory = image.directory / ("enrolled-%s" % ("sb-on" if secure_boot else "sb-off"))
    with locked(directory):
        if not snapshot_complete(directory):
            shutil.rmtree(directory, ignore_errors=True)
            _first_boot(image, secure_boot, directory)
    record = json.loads((directory / "snapshot.json").read_text())
    return Snapshot(directory, secure_boot, record["marker"], record["first_boot_seconds"])


def _first_boot(image: GuestImage, secure_boot: bool, directory: Path) -> None:
    work = directory.with_name(directory.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    vm = GuestVm.create(image, work, secure_boot)
    try:
        vm.start()
        # Before enrolment the volume has no token: headless systemd-cryptsetup must have failed.
        state = vm.run(["systemctl", "is-active", CRYPTSETUP_UNIT]).stdout.strip()
        if state == "active":
            raise AssertionError("the data volume unlocked before any TPM enrolment")
        vm.check(["systemd-cryptenroll", "--tpm2-device=auto", "--tpm2-pcrs=4+7", LUKS_DEVICE],
                 env={"PASSWORD": _guest_passphrase(vm)})
        vm.check(["systemctl", "reset-failed", CRYPTSETUP_UNIT])
        vm.check(["systemctl", "start", CRYPTSETUP_UNIT], timeout=180)
        vm.check(["mkfs.ext4", "-q", "-L", "data", "/dev/mapper/" + DATA_MAPPING], timeout=180)
        vm.check(["systemctl", "start", DATA_MOUNT_UNIT])
        marker = secrets.token_hex(16)
        vm.check(["sh", "-c", 'printf %s "$1" > "$2" && sync', "sh", marker, MARKER_FILE])
        seconds = vm.boots[0].seconds
        vm.poweroff()
    except BaseException:
        vm.close()
        raise
    save_snapshot(work, directory, {"marker": marker, "first_boot_seconds": seconds})


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


def _guest_passphrase(vm: GuestVm) -> str:
    """The recovery passphrase from the key file the image put into the guest."""
    return vm.check(["cat", RECOVERY_KEY_FILE]).stdout
