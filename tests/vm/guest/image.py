"""The parts of the e2e guest image that do not depend on its layout (tests/vm/guest/rootimage.py
builds the root guest from them).

Nothing is mounted on the host except inside debootstrap's own private mount namespace:
debootstrap fills a directory (cached as ``cache/guest/rootfs-<key>`` by its package list), the
kernel packages' module trees go into it, the test harness (agent, tpm2-pytss, masked units,
recovery passphrase, the UKIs the scenarios install), ``mkfs.vfat`` + mtools make the ESP,
partition images are copied into their byte ranges of the disk, efibootmgr writes Boot0007 over
a loop device and both OVMF variable stores get it (``finish_image``).
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence

REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests import realbins  # noqa: E402
from tests.vm import capture  # noqa: E402

HERE = Path(__file__).resolve().parent
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
GUEST_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "kmod", "e2fsprogs",
    "cryptsetup-bin", "libcryptsetup12",
    # systemd-cryptsetup and its token plugin dlopen() these; tpm2-pytss links the FAPI too.
    "libtss2-esys-3.0.2-0", "libtss2-mu0", "libtss2-rc0", "libtss2-sys1", "libtss2-tctildr0",
    "libtss2-tcti-device0", "libtss2-fapi1",
    "python3", "python3-yaml", "python3-pyudev", "python3-systemd", "python3-pydbus", "python3-gi",
    "efibootmgr",
)
# Debian's python3-tpm2-pytss is 1.2.0, too old for this package: the host venv's tpm2-pytss
# (built against the same libtss2 3.2.1 as Debian 12's) and the packages it needs are copied
# into the guest's /usr/local/lib/python3.11/dist-packages instead.
VENV_PACKAGES = ("tpm2_pytss", "cffi", "pycparser", "cryptography", "packaging")

# Module directories the guest needs (virtio, device-mapper, file systems, ciphers); the generic
# kernel's whole tree would triple the image.
MODULE_DIRS = ("drivers/block", "drivers/char", "drivers/md", "drivers/virtio", "fs", "crypto",
               "arch/x86/crypto", "lib")
RECOVERY_KEY_FILE = "/root/recovery.key"
# A test image's recovery passphrase: the guest and the host both need it, nothing else does.
RECOVERY_PASSPHRASE = "rhel-cvm-update e2e recovery passphrase"
GUEST_UKI_DIR = "/root/ukis"
AGENT_PORT = "org.rhelcvm.agent"
VENDOR = "redhat"


class ImageError(RuntimeError):
    """The guest image could not be built."""


@dataclass(frozen=True)
class GuestImage:
    directory: Path
    key: str
    disk: Path                  # raw GPT disk
    ukis: Dict[str, Path]       # signed UKIs on the host, by name (a, b, bad)
    releases: Dict[str, str]    # uname -r of each UKI's kernel
    db_key: Path
    db_cert: Path
    vars_sb_off: Path           # OVMF vars with Boot0007 -> shim -> uki-a
    vars_sb_on: Path            # the same on OVMF_VARS_4M.ms.fd plus db_cert in db
    boot_entry: Dict[str, object]

    @staticmethod
    def esp_path(name: str) -> str:
        return "\\EFI\\Linux\\uki-%s.efi" % name

    @staticmethod
    def guest_uki(name: str) -> str:
        return "%s/uki-%s.efi" % (GUEST_UKI_DIR, name)


def run(argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    return realbins.run(argv, **kwargs)


def guest_cache() -> Path:
    path = realbins.cache_dir() / "guest"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """One builder at a time per cache entry (pytest sessions may run side by side)."""
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes() if part.is_file() else str(part).encode())
        else:
            h.update(json.dumps(part, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# root file system


def base_rootfs(packages: Sequence[str] = GUEST_PACKAGES) -> Path:
    """debootstrap --variant=minbase of ``packages``, cached by the package list."""
    key = digest(SUITE, MIRROR, tuple(packages))
    tree = guest_cache() / ("rootfs-" + key)
    with locked(tree):
        if tree.is_dir():
            return tree
        partial = tree.with_name(tree.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        # debootstrap mounts /proc and /sys inside the target; a private mount namespace keeps
        # those mounts away from the host.
        run(["unshare", "-m", "--propagation", "private", "debootstrap", "--variant=minbase",
             "--include=" + ",".join(packages), SUITE, str(partial), MIRROR])
        for leftover in ("proc", "sys"):
            if os.path.ismount(partial / leftover):
                raise ImageError("debootstrap left %s mounted" % (partial / leftover))
        partial.rename(tree)
    return tree


def kernel_deb(kernel: realbins.KernelPackage) -> Path:
    deb = realbins.cache_dir() / "debs" / ("%s_%s_amd64.deb" % (kernel.name, kernel.version))
    if not deb.exists():
        deb.parent.mkdir(exist_ok=True)
        run(["apt-get", "download", "%s=%s" % (kernel.name, kernel.version)], cwd=str(deb.parent))
    return deb


def install_kernel_modules(tree: Path, kernel: realbins.KernelPackage) -> None:
    """The MODULE_DIRS part of a kernel package's module tree, then depmod in the guest."""
    prefix = "./lib/modules/%s/" % kernel.release
    wanted = tuple(prefix + "kernel/" + d + "/" for d in MODULE_DIRS)
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(kernel_deb(kernel))], stdout=subprocess.PIPE)
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            keep = member.name.startswith(wanted) or (
                member.name.startswith(prefix) and member.isfile() and member.name.count("/") == 4)
            if keep and member.isfile():
                target = tree / "usr" / member.name[2:]
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    if proc.wait() != 0:
        raise ImageError("dpkg-deb --fsys-tarfile %s failed" % kernel_deb(kernel))
    run(["chroot", str(tree), "/sbin/depmod", "-a", kernel.release])


def unit_install_targets(unit_text: str) -> List[str]:
    """WantedBy=/RequiredBy= targets of a unit's [Install] section, as `systemctl enable` reads them."""
    targets: List[str] = []
    section = None
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Install" and "=" in line:
            key, value = (s.strip() for s in line.split("=", 1))
            if key in ("WantedBy", "RequiredBy"):
                suffix = ".wants" if key == "WantedBy" else ".requires"
                targets += [t + suffix for t in value.split()]
    return targets


def enable_unit(tree: Path, unit: str, unit_text: str) -> None:
    for wants in unit_install_targets(unit_text):
        link = tree / "etc/systemd/system" / wants / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to("/usr/lib/systemd/system/" + unit)


def product_units() -> List[Path]:
    return sorted(p for p in (REPO_ROOT / "systemd").glob("*")
                  if p.suffix in (".service", ".path", ".timer", ".socket", ".target"))


def product_sources() -> List[Path]:
    return sorted(p for p in (REPO_ROOT / "rhel_cvm_update").rglob("*.py") if "__pycache__" not in p.parts)


def venv_site_packages() -> Path:
    import tpm2_pytss
    return Path(tpm2_pytss.__file__).resolve().parent.parent


def venv_package_paths() -> List[Path]:
    site = venv_site_packages()
    paths: List[Path] = []
    for name in VENV_PACKAGES:
        paths += [site / name]
        paths += sorted(site.glob("%s-*.dist-info" % name))
        paths += sorted(site.glob("_%s_backend*.so" % name))
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise ImageError("the venv lacks %s" % missing)
    return paths


AGENT_UNIT = """[Unit]
Description=rhel-cvm-update e2e test agent on virtio-serial
After=local-fs.target

[Service]
ExecStartPre=-/sbin/modprobe virtio_console
ExecStart=/usr/local/sbin/e2e-agent
Restart=always

[Install]
WantedBy=multi-user.target
"""

# Units a minimal VM does not need; each costs seconds of TCG time per boot.
MASKED_UNITS = ("serial-getty@.service", "getty@.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                "dpkg-db-backup.timer", "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer",
                "systemd-timesyncd.service")


def install_harness(tree: Path, ukis: Dict[str, Path]) -> None:
    """What every e2e guest has besides the product: tpm2-pytss and its dependencies (the
    product's Python dependencies Debian 12 lacks), the test agent, fewer units, the recovery
    passphrase and the UKIs the scenarios install."""
    local_site = tree / "usr/local/lib/python3.11/dist-packages"
    local_site.mkdir(parents=True, exist_ok=True)
    for path in venv_package_paths():
        if path.is_dir():
            shutil.copytree(path, local_site / path.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(path, local_site / path.name)
    agent = tree / "usr/local/sbin/e2e-agent"
    agent.parent.mkdir(parents=True, exist_ok=True)
    agent.write_text("#!/usr/bin/python3\n" + (HERE / "agent.py").read_text())
    agent.chmod(0o755)
    (tree / "usr/lib/systemd/system/e2e-agent.service").write_text(AGENT_UNIT)
    enable_unit(tree, "e2e-agent.service", AGENT_UNIT)
    for unit in MASKED_UNITS:
        mask = tree / "etc/systemd/system" / unit
        if not mask.is_symlink():
            mask.symlink_to("/dev/null")
    (tree / "boot/efi").mkdir(parents=True, exist_ok=True)
    (tree / "etc/hostname").write_text("e2e-guest\n")
    key = tree / RECOVERY_KEY_FILE.lstrip("/")
    key.write_text(RECOVERY_PASSPHRASE)
    key.chmod(0o600)
    uki_dir = tree / GUEST_UKI_DIR.lstrip("/")
    uki_dir.mkdir(parents=True, exist_ok=True)
    for name, uki in ukis.items():
        shutil.copyfile(uki, uki_dir / ("uki-%s.efi" % name))


# ---------------------------------------------------------------------------------------------
# partitions and disk


def copy_into(image: Path, disk: Path, offset: int) -> None:
    """Copy a partition image into the disk at ``offset``, leaving zero blocks as holes."""
    block = 1 << 20
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        position = offset
        for chunk in iter(lambda: src.read(block), b""):
            if chunk.count(0) != len(chunk):
                dst.seek(position)
                dst.write(chunk)
            position += len(chunk)


def partition_range(disk: Path, number: int) -> range:
    info = run(["sgdisk", "-i", str(number), str(disk)]).stdout.decode()
    first = int(re.search(r"First sector: (\d+)", info).group(1))
    last = int(re.search(r"Last sector: (\d+)", info).group(1))
    return range(first * 512, (last + 1) * 512)


def tree_mib(tree: Path) -> int:
    out = run(["du", "-s", "-m", "--apparent-size", str(tree)]).stdout.decode()
    return int(out.split()[0])


def make_esp(path: Path, size: int, files: Dict[str, Path]) -> None:
    run(["mkfs.vfat", "-F", "32", "-S", "512", "-i", capture.ESP_VOLUME_ID, "-n", "ESP",
         "-C", str(path), str(size // 1024)])
    for esp_path, source in sorted(files.items()):
        parts = esp_path.strip("\\").split("\\")
        for depth in range(1, len(parts)):
            subprocess.run(["mmd", "-i", str(path), "::/" + "/".join(parts[:depth])],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run(["mcopy", "-o", "-i", str(path), str(source), "::/" + "/".join(parts)])


# The installed kernel's entry is the one the product itself makes for a UKI (bootmgr.py: its
# "managed" marker is this description prefix, shim in EFI/<vendor>, the UKI path as NUL-terminated
# UCS-2 optional data), as if the first-boot conversion had run `rhel-cvm-update boot add` or shim's
# fallback had read the product's BOOTX64.CSV line.  It is written by efibootmgr, not by our code.
ENTRY_DESCRIPTION = "RHEL CVM UKI %s"
ENTRY_NUMBER = "0007"


def csv_text(description: str, uki_esp_path: str) -> bytes:
    """BOOTX64.CSV (UCS-2LE with BOM, as shim's fallback reads it) naming the installed UKI."""
    line = "shimx64.efi,%s,%s,boot entry of rhel-cvm-update\n" % (description, uki_esp_path)
    return b"\xff\xfe" + line.encode("utf-16-le")


def make_boot_entry(disk: Path, work: Path, description: str, uki_esp_path: str) -> Dict[str, object]:
    """Boot#### + BootOrder written by efibootmgr over a loop device into an efivarfs-like directory."""
    efivars = work / "efibootmgr-vars"
    efivars.mkdir()
    optional = work / "optional-data.bin"
    optional.write_bytes(uki_esp_path.encode("utf-16-le") + b"\0\0")
    loop = run(["losetup", "-f", "--show", str(disk)]).stdout.decode().strip()
    try:
        run(["efibootmgr", "-q", "-b", ENTRY_NUMBER, "-c", "-d", loop, "-p", "1", "-l", capture.SHIM_ESP_PATH,
             "-L", description, "-@", str(optional)],
            env=dict(os.environ, EFIVARFS_PATH=str(efivars) + "/", LIBEFIVAR_OPS="efivarfs"))
    finally:
        run(["losetup", "-d", loop])
    variables = {}
    for name in ("Boot" + ENTRY_NUMBER, "BootOrder"):
        raw = (efivars / ("%s-%s" % (name, capture.EFI_GLOBAL))).read_bytes()
        variables["%s-%s" % (name, capture.EFI_GLOBAL)] = {"attr": int.from_bytes(raw[:4], "little"),
                                                          "data": raw[4:].hex()}
    return {"number": ENTRY_NUMBER, "description": description, "optional_data": uki_esp_path,
            "variables": variables}


# Every change to the product makes a new image (about 0.7 GB with its snapshots); images nobody
# built or enrolled for this long belong to old checkouts.
STALE_IMAGE_SECONDS = 6 * 3600


def prune_stale_images(current: Path) -> None:
    """Remove stale images of the same kind as ``current`` (its name up to the key)."""
    for other in guest_cache().glob(current.name.rsplit("-", 1)[0] + "-*"):
        if other.is_dir() and other != current and time.time() - other.stat().st_mtime > STALE_IMAGE_SECONDS:
            shutil.rmtree(other, ignore_errors=True)
            Path(str(other) + ".lock").unlink(missing_ok=True)


def finish_image(directory: Path, work: Path, tree: Path, base: Path, kernels: Dict[str, realbins.KernelPackage],
                 ukis: Dict[str, Path], db_cert: Path,
                 make: Callable[[Path, Path, Dict[str, Path]], Path]) -> None:
    """The steps after the tree is complete: the ESP's files (shim, BOOTX64.CSV, uki-a), the
    disk ``make`` lays out, Boot0007 and both OVMF variable stores,
    then image.json (its presence marks the image complete)."""
    description = ENTRY_DESCRIPTION % kernels["a"].release
    csv = work / "BOOTX64.CSV"
    csv.write_bytes(csv_text(description, GuestImage.esp_path("a")))
    esp_files = {capture.SHIM_ESP_PATH: capture.SHIM_SIGNED,
                 "\\EFI\\%s\\BOOTX64.CSV" % VENDOR: csv,
                 GuestImage.esp_path("a"): ukis["a"]}
    disk = make(work, tree, esp_files)
    boot_entry = make_boot_entry(disk, work, description, GuestImage.esp_path("a"))
    capture.make_vars(capture.OVMF_DIR / "OVMF_VARS_4M.fd", directory / "vars-sb-off.fd", work, boot_entry, None)
    capture.make_vars(capture.OVMF_DIR / "OVMF_VARS_4M.ms.fd", directory / "vars-sb-on.fd", work, boot_entry, db_cert)
    disk.rename(directory / "disk.raw")
    (directory / "image.json").write_text(json.dumps({
        "kernels": {n: k.as_record() for n, k in kernels.items()},
        "boot_entry": boot_entry, "base": base.name}, indent=2))
