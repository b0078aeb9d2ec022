"""Build and cache the e2e guest: a Debian 12 disk with shim, UKIs, this package and a LUKS2 volume.

Nothing is mounted on the host except inside debootstrap's own private mount namespace:
debootstrap fills a directory, ``mkfs.ext4 -d`` turns it into the root partition image,
``mkfs.vfat`` + mtools make the ESP, ``cryptsetup luksFormat`` formats the data partition as a
plain file, ``sgdisk`` writes the GPT and the partition images are copied into their byte ranges.

Disk (GPT, fixed GUIDs so device paths and PCR4's shim event are stable):

    1 ESP      \\EFI\\redhat\\shimx64.efi (Debian shim-signed), BOOTX64.CSV, \\EFI\\Linux\\uki-a.efi
    2 root     ext4: Debian bookworm minbase + systemd, cryptsetup, python3, libtss2, this package
    3 cvmdata  LUKS2 (recovery passphrase only; the first boot enrols the TPM)

UKIs (systemd-stub 252 + Debian kernel + a busybox initramfs that mounts /dev/vda2), all signed
with a db key made for the image, so the same files boot with Secure Boot on and off:

    a    linux-image-cloud-amd64 (the installed kernel)
    b    linux-image-amd64 (the "new kernel" of the update scenarios), in /root/ukis/ in the guest
    bad  the cloud kernel with root= naming a partition that does not exist: the initramfs gives
         up, the kernel panics and panic=5 resets the VM; in /root/ukis/ in the guest

Everything lands in ``cache/guest/image-<key>/``, the key being a hash of every input (package
list, kernels, shim, stub, busybox, this package's sources and units, these files).  The
debootstrap tree is cached separately (``cache/guest/rootfs-<key>``) so that a change to the
product only repeats the cheap steps.

Run ``python -m tests.vm.guest.image`` from the repository root to build (or find) the image.
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

KERNELS = {"a": "linux-image-cloud-amd64", "b": "linux-image-amd64", "bad": "linux-image-cloud-amd64"}
# Module directories the guest needs (virtio, device-mapper, file systems, ciphers); the generic
# kernel's whole tree would triple the image.
MODULE_DIRS = ("drivers/block", "drivers/char", "drivers/md", "drivers/virtio", "fs", "crypto",
               "arch/x86/crypto", "lib")
# crc32c: ext4 needs it (a soft dependency, not in modules.dep); built in in the cloud kernel.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")

ROOT_DEVICE = "/dev/vda2"
MISSING_ROOT_DEVICE = "/dev/vda9"
LUKS_PARTLABEL = "cvmdata"
LUKS_DEVICE = "/dev/disk/by-partlabel/" + LUKS_PARTLABEL
DATA_MAPPING = "data"
DATA_MOUNT = "/data"
RECOVERY_KEY_FILE = "/root/recovery.key"
# A test image's recovery passphrase: the guest and the host both need it, nothing else does.
RECOVERY_PASSPHRASE = "rhel-cvm-update e2e recovery passphrase"
GUEST_UKI_DIR = "/root/ukis"
AGENT_PORT = "org.rhelcvm.agent"
CMDLINE = "console=ttyS0,115200 root=%s ro panic=5 rhel_cvm_update.uki=%s"

ESP_MIB = 100
DATA_MIB = 64
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


def module_load_order(tree: Path, release: str, names: Sequence[str]) -> List[str]:
    """Module files (relative to lib/modules/<release>/) to insmod, dependencies first.

    Built-in drivers are skipped: they are not in modules.dep.
    """
    deps: Dict[str, List[str]] = {}
    for line in (tree / "usr/lib/modules" / release / "modules.dep").read_text().splitlines():
        module, _, rest = line.partition(":")
        deps[module] = rest.split()
    by_name = {Path(m).name[:-len(".ko")].replace("-", "_"): m for m in deps}
    builtin = {Path(m).name[:-len(".ko")].replace("-", "_")
               for m in (tree / "usr/lib/modules" / release / "modules.builtin").read_text().split()}
    order: List[str] = []

    def visit(module: str) -> None:
        for dep in deps[module]:
            visit(dep)
        if module not in order:
            order.append(module)

    for name in names:
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin:
            raise ImageError("kernel %s has no module or built-in %s" % (release, name))
    return order


def initramfs(tree: Path, kernel: realbins.KernelPackage, work: Path) -> Path:
    modules_dir = tree / "usr/lib/modules" / kernel.release
    order = module_load_order(tree, kernel.release, INITRD_MODULES)
    load_order = work / ("load-order-" + kernel.release)
    load_order.write_text("".join(Path(m).name + "\n" for m in order))
    files = {"lib/modules/" + Path(m).name: modules_dir / m for m in order}
    files["lib/modules/load-order"] = load_order
    return realbins.busybox_initramfs(work / ("initrd-%s.img" % kernel.release),
                                      (HERE / "init.sh").read_text(), files)


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


# What the RPM's preset (80-rhel-cvm-update.preset) enables; the other units are started by these.
PRESET_ENABLED = ("rhel-cvm-update.path", "rhel-cvm-update-confirm.service")


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

CLI_SCRIPT = """#!/usr/bin/python3
import sys
from rhel_cvm_update.cli import main
sys.exit(main())
"""

# Units a minimal VM does not need; each costs seconds of TCG time per boot.
MASKED_UNITS = ("serial-getty@.service", "getty@.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                "dpkg-db-backup.timer", "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer",
                "systemd-timesyncd.service")


def populate(tree: Path, ukis: Dict[str, Path]) -> None:
    """Add to a copy of the debootstrap tree what the RPM and Azure's image would put there."""
    # The package, as the RPM installs it: sources in site-packages, the CLI, units enabled.
    site = tree / "usr/lib/python3/dist-packages"
    for source in product_sources():
        target = site / source.relative_to(REPO_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    cli = tree / "usr/bin/rhel-cvm-update"
    cli.write_text(CLI_SCRIPT)
    cli.chmod(0o755)
    for unit in product_units():
        shutil.copyfile(unit, tree / "usr/lib/systemd/system" / unit.name)
        if unit.name in PRESET_ENABLED:
            enable_unit(tree, unit.name, unit.read_text())
    (tree / "var/lib/rhel-cvm-update").mkdir(mode=0o755, parents=True, exist_ok=True)
    config = tree / "etc/rhel-cvm-update/config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("# e2e guest: the LUKS2 volume is the data partition, not the root\n"
                      "luks_device: %s\nvendor: %s\n" % (LUKS_DEVICE, VENDOR))
    install_harness(tree, ukis)
    configure_data_volume(tree)


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


def configure_data_volume(tree: Path) -> None:
    # Mounts and the LUKS volume.  headless: never wait for a passphrase nobody types; nofail:
    # a volume that does not unlock leaves a running system the harness can inspect.
    (tree / "etc/fstab").write_text(
        "%s / ext4 rw,errors=remount-ro 0 0\n"
        "/dev/vda1 /boot/efi vfat umask=0077 0 0\n"
        "/dev/mapper/%s %s ext4 nofail,x-systemd.device-timeout=60s 0 0\n"
        % (ROOT_DEVICE, DATA_MAPPING, DATA_MOUNT))
    (tree / "etc/crypttab").write_text("%s PARTLABEL=%s none tpm2-device=auto,headless=true,nofail\n"
                                       % (DATA_MAPPING, LUKS_PARTLABEL))
    (tree / DATA_MOUNT.strip("/")).mkdir(parents=True, exist_ok=True)


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


def make_disk(work: Path, tree: Path, esp_files: Dict[str, Path]) -> Path:
    disk = work / "disk.raw"
    root_mib = tree_mib(tree) * 5 // 4 + 384
    with open(disk, "wb") as f:
        f.truncate((1 + ESP_MIB + root_mib + DATA_MIB + 1) << 20)
    run(["sgdisk", "-U", capture.DISK_GUID,
         "-n", "1:%d:+%dM" % (capture.ESP_FIRST_LBA, ESP_MIB), "-t", "1:ef00", "-u", "1:" + capture.ESP_PARTITION_GUID,
         "-c", "1:ESP",
         "-n", "2:0:+%dM" % root_mib, "-t", "2:8304", "-c", "2:root",
         "-n", "3:0:+%dM" % DATA_MIB, "-t", "3:8309", "-c", "3:" + LUKS_PARTLABEL, str(disk)])

    esp = work / "esp.img"
    make_esp(esp, len(partition_range(disk, 1)), esp_files)
    copy_into(esp, disk, partition_range(disk, 1).start)
    esp.unlink()

    root = work / "root.img"
    root_range = partition_range(disk, 2)
    run(["mkfs.ext4", "-q", "-F", "-L", "root", "-E", "root_owner=0:0", "-d", str(tree),
         str(root), str(len(root_range) // 1024)])
    copy_into(root, disk, root_range.start)
    root.unlink()

    data = work / "data.img"
    data_range = partition_range(disk, 3)
    with open(data, "wb") as f:
        f.truncate(len(data_range))
    key = work / "recovery.key"
    key.write_text(RECOVERY_PASSPHRASE)
    # pbkdf2 at 1000 iterations: argon2id's memory cost would make every recovery unlock in a
    # 1 GiB TCG guest take minutes.  Test image only.
    run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--label", LUKS_PARTLABEL, "--key-file", str(key), str(data)])
    copy_into(data, disk, data_range.start)
    data.unlink()
    return disk


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


def image_key(kernels: Dict[str, realbins.KernelPackage], base: Path) -> str:
    inputs: List[object] = [base.name, sorted((n, k.name, k.version) for n, k in kernels.items()),
                            PRESET_ENABLED, GUEST_PACKAGES, VENV_PACKAGES, MODULE_DIRS, INITRD_MODULES, CMDLINE, MASKED_UNITS,
                            Path(__file__), HERE / "agent.py", HERE / "init.sh",
                            capture.SHIM_SIGNED, realbins.SYSTEMD_STUB, realbins.BUSYBOX]
    inputs += [str(p.relative_to(REPO_ROOT)) for p in product_sources() + product_units()]
    inputs += product_sources() + product_units()
    inputs += sorted(p.name for p in venv_package_paths())
    return digest(*inputs)


def build_image() -> GuestImage:
    """The cached guest image, built first if its inputs changed."""
    base = base_rootfs()
    kernels = {name: realbins.fetch_kernel_package(package) for name, package in KERNELS.items()}
    key = image_key(kernels, base)
    directory = guest_cache() / ("image-" + key)
    with locked(directory):
        if not (directory / "image.json").exists():
            shutil.rmtree(directory, ignore_errors=True)
            _build(directory, base, kernels)
            prune_stale_images(directory)
    record = json.loads((directory / "image.json").read_text())
    return GuestImage(directory=directory, key=key, disk=directory / "disk.raw",
                      ukis={n: directory / ("uki-%s.efi" % n) for n in KERNELS},
                      releases={n: k.release for n, k in kernels.items()},
                      db_key=directory / "keys/db.key", db_cert=directory / "keys/db.crt",
                      vars_sb_off=directory / "vars-sb-off.fd", vars_sb_on=directory / "vars-sb-on.fd",
                      boot_entry=record["boot_entry"])


# Every change to the product makes a new image (about 0.7 GB with its snapshots); images nobody
# built or enrolled for this long belong to old checkouts.
STALE_IMAGE_SECONDS = 6 * 3600


def prune_stale_images(current: Path) -> None:
    for other in guest_cache().glob("image-*"):
        if other.is_dir() and other != current and time.time() - other.stat().st_mtime > STALE_IMAGE_SECONDS:
            shutil.rmtree(other, ignore_errors=True)
            Path(str(other) + ".lock").unlink(missing_ok=True)


def finish_image(directory: Path, work: Path, tree: Path, base: Path, kernels: Dict[str, realbins.KernelPackage],
                 ukis: Dict[str, Path], db_cert: Path,
                 make: Callable[[Path, Path, Dict[str, Path]], Path]) -> None:
    """The steps after the tree is complete, shared by both guests: the ESP's files (shim,
    BOOTX64.CSV, uki-a), the disk ``make`` lays out, Boot0007 and both OVMF variable stores,
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


def _build(directory: Path, base: Path, kernels: Dict[str, realbins.KernelPackage]) -> None:
    work = directory / "work"
    work.mkdir(parents=True)
    tree = work / "tree"
    run(["cp", "-a", str(base), str(tree)])
    try:
        db_key, db_cert = realbins.make_test_keys(directory / "keys", "rhel-cvm-update e2e db")
        # Modules first: the initramfs takes its drivers from the guest's module tree.
        for kernel in {k.name: k for k in kernels.values()}.values():
            install_kernel_modules(tree, kernel)
        ukis: Dict[str, Path] = {}
        for name, kernel in kernels.items():
            root = MISSING_ROOT_DEVICE if name == "bad" else ROOT_DEVICE
            unsigned = realbins.build_uki(work / ("uki-%s.unsigned.efi" % name), kernel.vmlinuz,
                                          initramfs(tree, kernel, work), CMDLINE % (root, name),
                                          uname=kernel.release)
            ukis[name] = realbins.sign(unsigned, db_key, db_cert, directory / ("uki-%s.efi" % name))
        populate(tree, ukis)
        finish_image(directory, work, tree, base, kernels, ukis, db_cert, make_disk)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    image = build_image()
    print(json.dumps({"directory": str(image.directory), "disk": str(image.disk),
                      "ukis": {n: str(p) for n, p in image.ukis.items()}}, indent=2))
