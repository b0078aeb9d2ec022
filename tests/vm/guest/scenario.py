"""What the e2e scenarios ask of the root guest, and the table of boots and seconds they print.

Every check asks an outside program inside the guest: the console (a passphrase prompt means
no token unlocked the root), findmnt and cryptsetup status for the root's mapping, the marker
file for the right root, efibootmgr for the firmware's variables, /proc/cmdline for the kernel
that runs, cryptsetup luksDump for tokens and keyslots.  The product's own ``status --json``
is checked against those, never taken alone.
"""

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from tests.vm.guest.firstboot import ROOT_MARKER_FILE, Snapshot
from tests.vm.guest.image import GUEST_UKI_DIR, GuestImage, guest_cache
from tests.vm.guest.rootimage import ROOT_LUKS_DEVICE, ROOT_MAPPING, ROOT_PARTITION
from tests.vm.guest.vm import PASSPHRASE_PROMPT, GuestError, GuestVm

TOOLS = ("qemu-system-x86_64", "qemu-img", "swtpm", "swtpm_setup", "swtpm_ioctl", "tpm2_dictionarylockout",
         "tpm2_shutdown", "debootstrap", "unshare", "chroot", "sgdisk", "mkfs.vfat", "mkfs.ext4", "mcopy", "mmd",
         "cryptsetup", "objcopy", "sbsign", "openssl", "efibootmgr", "losetup", "dpkg-deb", "apt-get")
ESP_LINUX = "/boot/efi/EFI/Linux"
UPDATE_SERVICE = "rhel-cvm-update.service"
CONFIRM_SERVICE = "rhel-cvm-update-confirm.service"
PATH_UNIT = "rhel-cvm-update.path"
SERVICE_WAIT_SECONDS = 300


def require_prerequisites() -> None:
    """Skip only when a real prerequisite of the machine is missing."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip("not installed: " + ", ".join(missing))
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, losetup for efibootmgr)")
    from tests.vm import capture
    for needed in (capture.SHIM_SIGNED, capture.OVMF_DIR / "OVMF_CODE_4M.fd", capture.OVMF_DIR / "OVMF_VARS_4M.fd",
                   capture.OVMF_DIR / "OVMF_CODE_4M.secboot.fd", capture.OVMF_DIR / "OVMF_VARS_4M.ms.fd"):
        if not needed.exists():
            pytest.skip("%s is not installed" % needed)
    try:
        import virt.firmware  # noqa: F401
    except ImportError:
        pytest.skip("virt-firmware (test extra) is not installed")


@dataclass
class TableRow:
    scenario: str
    boots: int
    seconds: float
    outcome: str


@dataclass
class Table:
    rows: List[TableRow] = field(default_factory=list)

    @contextmanager
    def scenario(self, machine: "Machine", name: str) -> Iterator[None]:
        """Adds the scenario's row, passed or failed, when the block ends."""
        outcome = "failed"
        try:
            yield
            outcome = "passed"
        finally:
            self.rows.append(machine.row(name, outcome))

    def render(self) -> str:
        lines = ["%-56s %5s %8s  %s" % ("e2e scenario", "boots", "seconds", "outcome")]
        lines += ["%-56s %5d %8.1f  %s" % (r.scenario, r.boots, r.seconds, r.outcome) for r in self.rows]
        return "\n".join(lines)


class Machine:
    """A GuestVm started from an enrolled snapshot, with the checks the scenarios share."""

    def __init__(self, image: GuestImage, snapshot: Snapshot, work: Path):
        self.image = image
        self.snapshot = snapshot
        self.vm = GuestVm.create(image, work, snapshot.secure_boot, disk=snapshot.disk,
                                 vars_file=snapshot.vars_file, tpm_state=snapshot.tpm_state)
        self.started = time.monotonic()

    # -- facts, each from an outside program ----------------------------------------------

    def booted_uki(self) -> str:
        """The UKI name the running kernel's command line carries (rhel_cvm_update.uki=)."""
        for arg in self.vm.check(["cat", "/proc/cmdline"]).stdout.split():
            if arg.startswith("rhel_cvm_update.uki="):
                return arg.split("=", 1)[1]
        raise GuestError("no rhel_cvm_update.uki= on the kernel command line")

    def efibootmgr(self) -> Dict[str, object]:
        """BootCurrent, BootNext, BootOrder and entry -> UKI path, from `efibootmgr -v`."""
        out = self.vm.check(["efibootmgr", "-v"]).stdout
        facts: Dict[str, object] = {"BootNext": None, "entries": {}}
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key in ("BootCurrent", "BootNext"):
                facts[key] = value.strip()
            elif key == "BootOrder":
                facts[key] = value.strip().split(",")
            elif line.startswith("Boot") and line[8:9] in ("*", " "):
                # efibootmgr -v prints optional data it cannot decode as text, one character
                # per byte and '.' for the rest: a UCS-2 path reads \.E.F.I.\. ... and its NUL "..".
                data = line.rsplit(")", 1)[-1] if "File(" in line else ""
                facts["entries"][line[4:8]] = data[0::2].rstrip(".").replace("\\", "/")
        return facts

    luks_device = ROOT_LUKS_DEVICE

    def luks_metadata(self) -> Dict[str, object]:
        return json.loads(self.vm.check(["cryptsetup", "luksDump", "--dump-json-metadata", self.luks_device]).stdout)

    def luks_tokens(self) -> Dict[str, Dict[str, object]]:
        return {k: v for k, v in self.luks_metadata()["tokens"].items() if v.get("type") == "systemd-tpm2"}

    def luks_keyslots(self) -> List[str]:
        return sorted(self.luks_metadata()["keyslots"])

    def status(self) -> Dict[str, object]:
        result = self.vm.run(["rhel-cvm-update", "status", "--json"])
        if result.rc == 2 or not result.stdout.strip():
            raise GuestError("status failed: rc=%d %s" % (result.rc, result.stderr))
        status = result.json()
        if status["exit_code"] != result.rc:
            raise GuestError("status exit %d but its JSON says %r" % (result.rc, status["exit_code"]))
        return status

    def unit_state(self, unit: str) -> Dict[str, str]:
        out = self.vm.check(["systemctl", "show", "-p", "ActiveState,Result,ExecMainStatus,LoadState", unit]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    # -- assertions --------------------------------------------------------------------------

    def assert_unlocked(self, uki: str) -> None:
        """This boot runs ``uki``, its root is the LUKS2 mapping the initrd opened, nobody typed a
        passphrase (wait_boot fails at a prompt) and the root is the snapshot's."""
        booted = self.booted_uki()
        assert booted == uki, "booted UKI %s, expected %s" % (booted, uki)
        assert PASSPHRASE_PROMPT not in self.vm.console_since_boot()
        source = self.vm.check(["findmnt", "-n", "-o", "SOURCE", "/"]).stdout.strip()
        assert source == "/dev/mapper/" + ROOT_MAPPING, "the root is %s, not the LUKS2 mapping" % source
        status = self.vm.check(["cryptsetup", "status", ROOT_MAPPING]).stdout
        assert "type:    LUKS2" in status and ROOT_PARTITION in status, status
        assert self.vm.check(["cat", ROOT_MARKER_FILE]).stdout == self.snapshot.marker

    def fallback_csv(self) -> str:
        """shim's BOOTX64.CSV as text (UCS-2 with BOM), decoded in the guest."""
        return self.vm.check(["python3", "-c", "print(open('/boot/efi/EFI/redhat/BOOTX64.CSV', 'rb')"
                                               ".read().decode('utf-16'))"]).stdout

    def install_uki(self, name: str) -> str:
        """Copy a UKI into the ESP as a finished package transaction leaves it: complete and on
        disk (without the sync a power cut soon after can leave the FAT file empty, and the
        power-cut scenario is about cuts during `update`, not during the copy)."""
        target = "%s/uki-%s.efi" % (ESP_LINUX, name)
        self.vm.check(["cp", "%s/uki-%s.efi" % (GUEST_UKI_DIR, name), target + ".tmp"])
        self.vm.check(["mv", target + ".tmp", target])
        self.vm.check(["sync"])
        return target

    def wait_for(self, what: str, predicate: Callable[[], bool], seconds: float = SERVICE_WAIT_SECONDS) -> None:
        deadline = time.monotonic() + seconds
        while not predicate():
            if time.monotonic() > deadline:
                journal = self.vm.run(["journalctl", "-b", "-u", UPDATE_SERVICE, "-u", PATH_UNIT,
                                       "-u", CONFIRM_SERVICE, "--no-pager"]).stdout[-4000:]
                raise GuestError("timed out after %d s waiting for %s\n%s" % (seconds, what, journal))
            time.sleep(3)

    def wait_update(self, what: str, predicate: Callable[[], bool]) -> None:
        """Wait until the path unit's service has made ``predicate`` true; a failed run of the
        service fails at once (with its journal) instead of at the timeout."""
        def done() -> bool:
            if self.unit_state(UPDATE_SERVICE)["ActiveState"] == "failed":
                journal = self.vm.run(["journalctl", "-b", "-u", UPDATE_SERVICE, "--no-pager"]).stdout[-4000:]
                raise GuestError("%s failed while waiting for %s\n%s" % (UPDATE_SERVICE, what, journal))
            return predicate()
        self.wait_for(what, done)
        self.wait_update_idle()

    def wait_update_idle(self) -> None:
        """The path unit's service has run and finished (it may have been started more than once)."""
        def idle() -> bool:
            state = self.unit_state(UPDATE_SERVICE)
            return state["ActiveState"] in ("inactive", "failed") and self.unit_state(PATH_UNIT)["ActiveState"] == "active"
        self.wait_for("%s to finish" % UPDATE_SERVICE, idle)

    def row(self, scenario: str, outcome: str = "passed") -> TableRow:
        return TableRow(scenario, self.vm.firmware_boots(), round(time.monotonic() - self.started, 1), outcome)

    def close(self) -> None:
        self.vm.close()


@pytest.fixture(scope="module")
def e2e_table(request):
    """Rows added by a module's scenarios, printed (and kept in cache/guest/) when it ends."""
    table = Table()
    yield table
    if not table.rows:
        return
    text = table.render()
    (guest_cache() / ("table-%s.txt" % request.module.__name__.rsplit(".", 1)[-1])).write_text(text + "\n")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + text)


def staged_uki(machine: Machine) -> Optional[str]:
    """The UKI the product staged for the next boot, by its own status."""
    return (machine.status().get("staged") or {}).get("uki")


def entry_for(facts: Dict[str, object], uki: str) -> Optional[str]:
    """The Boot#### number whose optional data names /EFI/Linux/uki-<uki>.efi."""
    for number, path in facts["entries"].items():
        if path.endswith("/EFI/Linux/uki-%s.efi" % uki):
            return number
    return None
