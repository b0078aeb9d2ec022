"""Build and cache the RHEL-like root guest (issue 15): the LUKS2 root unlocked in the initrd.

The layout is a RHEL 9 Azure CVM's, with Debian 12's parts:

    1 ESP   \\EFI\\redhat\\shimx64.efi (Debian shim-signed), BOOTX64.CSV, \\EFI\\Linux\\uki-a.efi
    2 root  GPT type x86-64 root (4f68bce3-...), LUKS2 -> ext4: Debian bookworm minbase with
            systemd 252, cryptsetup, dracut, rpm, python3 and the product's dependencies

The UKIs are systemd-stub 252 + a Debian kernel + an initramfs built by **dracut** in the guest's
own tree (modules systemd, crypt and tpm2-tss, as kernel-uki-virt's), and their command line
has no ``root=`` and no ``rd.luks.*``: systemd-gpt-auto-generator finds the root partition by
its type GUID on the disk systemd-stub booted from (LoaderDevicePartUUID) and
systemd-cryptsetup unlocks it with the LUKS2 token through the systemd-tpm2 token plugin.

    a    linux-image-cloud-amd64 (the installed kernel)
    b    linux-image-amd64 (the update), delivered as the RPM kernel-uki-virt-b
    bad  the cloud kernel told to run an init its initramfs lacks (rdinit=): the kernel finds
         no init in the initramfs, has no root= to fall back to and panics ("VFS: Unable to
         mount root fs"); panic=5 resets the VM; RPM kernel-uki-virt-bad

Two shim updates, as RPMs of ``shim-x64`` that replace ``\\EFI\\redhat\\shimx64.efi`` (for
Secure Boot on, where the image's own db key is enrolled beside Microsoft's CAs):

    resigned  Debian's shim with Microsoft's signatures replaced by the db key's: the same
              Authenticode digest (PCR4 unchanged), another authority in PCR7
    sbat      the same, with a newer .sbatlevel datestamp (which voids Microsoft's
              signatures): a new digest, and shim applies its SbatLevel (PCR7 again)

The root is encrypted offline (``cryptsetup reencrypt --encrypt`` on the partition image: no
device-mapper on the host) with the recovery passphrase only; the first boot
(``firstboot.py``) types that passphrase on the serial console, installs the product from
its RPM and enrols the first token.  The product is not in this image, so a change to it
repeats only the first boot.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests import realbins  # noqa: E402
from tests.vm import capture, signing  # noqa: E402
from tests.vm.guest.image import (GUEST_PACKAGES, HERE, MASKED_UNITS, MODULE_DIRS, RECOVERY_PASSPHRASE,  # noqa: E402
                                  GuestImage, base_rootfs, copy_into, digest, finish_image, guest_cache,
                                  install_harness, install_kernel_modules, locked, make_esp, partition_range,
                                  prune_stale_images, run, tree_mib, venv_package_paths)

ROOT_PACKAGES = GUEST_PACKAGES + ("dracut-core", "rpm", "tpm2-tools")
KERNELS = {"a": "linux-image-cloud-amd64", "b": "linux-image-amd64", "bad": "linux-image-cloud-amd64"}
# kernel-uki-virt's initramfs: systemd in the initrd, systemd-cryptsetup and the TPM libraries
# with the token plugin (dracut's tpm2-tss module installs libcryptsetup-token-systemd-tpm2.so).
DRACUT_MODULES = ("systemd", "systemd-initrd", "systemd-ask-password", "dracut-systemd", "crypt", "tpm2-tss",
                  "rootfs-block", "kernel-modules", "udev-rules", "base", "fs-lib")
DRACUT_DRIVERS = ("virtio_pci", "virtio_blk", "dm_crypt", "ext4", "crc32c_generic")
# No root=: gpt-auto finds the root.  rw: gpt-auto mounts the root read-only otherwise.
CMDLINE = "console=ttyS0,115200 rw panic=5 rhel_cvm_update.uki=%s"
# An init the initramfs does not have: the kernel panics before the initrd's systemd starts.
BAD_CMDLINE_EXTRA = " rdinit=/sbin/no-such-init"
ROOT_PARTLABEL = "root"
ROOT_LUKS_DEVICE = "/dev/disk/by-partlabel/" + ROOT_PARTLABEL
ROOT_PARTITION = "/dev/vda2"        # the same partition, as cryptsetup status names it
# The name systemd-gpt-auto-generator gives the root's mapping (systemd-cryptsetup@root.service).
ROOT_MAPPING = "root"
# Room for the LUKS2 header (16 MiB) that offline encryption puts in front of the data.
LUKS_REDUCE_MIB = 32
ESP_MIB = 160
GUEST_RPM_DIR = "/root/rpms"
SHIM_VENDOR_PATH = "/boot/efi/EFI/redhat/shimx64.efi"
# shim-x64 updates: release and the .sbatlevel datestamp (None: Debian's, unchanged).
SHIM_UPDATES = {"resigned": ("2.e2e", None), "sbat": ("3.e2e", "2026050100")}
SHIM_VERSION = "16.1"   # Debian 12's shim-signed (1.51~1+deb12u1+16.1-2~deb12u1)


class RootImage(GuestImage):
    """The root guest's image; its update RPMs are in the guest's GUEST_RPM_DIR."""

    @staticmethod
    def guest_rpm(name: str) -> str:
        """The kernel-uki-virt RPM of UKI ``name`` in the guest."""
        return "%s/%s" % (GUEST_RPM_DIR, kernel_rpm_name(name))

    @staticmethod
    def guest_shim_rpm(name: str) -> str:
        """The shim-x64 RPM of SHIM_UPDATES[``name``] in the guest."""
        return "%s/%s" % (GUEST_RPM_DIR, shim_rpm_name(name))


def kernel_rpm_name(name: str) -> str:
    return "kernel-uki-virt-%s.rpm" % name


def shim_rpm_name(name: str) -> str:
    return "shim-x64-%s-%s.rpm" % (SHIM_VERSION, SHIM_UPDATES[name][0])


def dracut_initramfs(tree: Path, kernel: realbins.KernelPackage, work: Path) -> Path:
    """dracut run inside the guest's tree (its own systemd, cryptsetup and libraries), in a
    private mount namespace so the bind mounts of /proc, /sys and /dev stay there."""
    inside = "/tmp/initrd-%s.img" % kernel.release
    script = ("mount --bind /proc %(t)s/proc && mount --bind /sys %(t)s/sys && mount --bind /dev %(t)s/dev && "
              "exec chroot %(t)s dracut --quiet --force --no-early-microcode --no-hostonly --no-hostonly-cmdline --reproducible "
              "--kver %(k)s --modules '%(m)s' --add-drivers '%(d)s' --filesystems ext4 --compress gzip %(o)s"
              % {"t": tree, "k": kernel.release, "m": " ".join(DRACUT_MODULES), "d": " ".join(DRACUT_DRIVERS),
                 "o": inside})
    run(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    out = work / ("initrd-%s.img" % kernel.release)
    shutil.move(str(tree / inside.lstrip("/")), out)
    return out


ESP_RPM_SPEC = """Name: %(name)s
Version: %(version)s
Release: %(release)s
Summary: %(summary)s
License: %(license)s
BuildArch: x86_64
%%description
%(summary)s.
%%install
install -D -m 0700 %(source)s %%{buildroot}%(target)s
%%files
%(target)s
"""


def esp_rpm(fields: Dict[str, str], source: Path, out: Path, work: Path) -> Path:
    """A locally built RPM that installs one file (``fields["target"]``) on the ESP, as
    kernel-uki-virt and shim-x64 do."""
    topdir = work / ("rpmbuild-" + out.stem)
    spec = topdir / "package.spec"
    spec.parent.mkdir(parents=True)
    spec.write_text(ESP_RPM_SPEC % dict(fields, source=source))
    run(["rpmbuild", "-bb", "--nodeps", "--define", "_topdir %s" % topdir, "--define", "_build_id_links none",
         str(spec)])
    built, = (topdir / "RPMS/x86_64").glob("*.rpm")
    shutil.move(str(built), out)
    return out


def kernel_rpm(name: str, kernel: realbins.KernelPackage, uki: Path, out_dir: Path, work: Path) -> Path:
    """The UKI as /boot/efi/EFI/Linux/uki-<name>.efi, like kernel-uki-virt."""
    fields = {"name": "kernel-uki-virt-" + name, "version": kernel.version.replace("-", "_"), "release": "1",
              "summary": "Test kernel %s as the UKI uki-%s.efi (systemd-stub, dracut initramfs)" % (kernel.release, name),
              "license": "GPL-2.0-only", "target": "/boot/efi/EFI/Linux/uki-%s.efi" % name}
    return esp_rpm(fields, uki, out_dir / kernel_rpm_name(name), work)


def shim_rpm(name: str, db_key: Path, db_cert: Path, out_dir: Path, work: Path) -> Path:
    """Debian's shim signed by the image's db key instead of Microsoft (SHIM_UPDATES[name])."""
    release, sbat_date = SHIM_UPDATES[name]
    plan = signing.Signing(shim_signatures=("e2e-db",), uki_signer="e2e-db", sbat_date=sbat_date)
    signer = signing.TestCa(ca_cert=db_cert, leaf_key=db_key, leaf_cert=db_cert)
    shim = signing.build_shim(capture.SHIM_SIGNED, plan, {"e2e-db": signer}, work / ("shim-%s.efi" % name))
    fields = {"name": "shim-x64", "version": SHIM_VERSION, "release": release, "license": "BSD-2-Clause",
              "summary": "Debian's shim %s re-signed by the e2e db key" % SHIM_VERSION
                         + (", .sbatlevel dated %s" % sbat_date if sbat_date else ""),
              "target": SHIM_VENDOR_PATH}
    return esp_rpm(fields, shim, out_dir / shim_rpm_name(name), work)


def configure_root(tree: Path, update_rpms: List[Path]) -> None:
    """The root comes from gpt-auto, so fstab names only the ESP (as RHEL's, with its options)."""
    (tree / "etc/fstab").write_text("/dev/vda1 /boot/efi vfat umask=0077,shortname=winnt 0 2\n")
    (tree / "etc/crypttab").write_text("")
    rpm_dir = tree / GUEST_RPM_DIR.lstrip("/")
    rpm_dir.mkdir(parents=True, exist_ok=True)
    for path in update_rpms:
        shutil.copyfile(path, rpm_dir / path.name)


def encrypted_root(work: Path, tree: Path, size: int) -> Path:
    """An ext4 of ``tree`` encrypted in place into LUKS2 (recovery passphrase only), ``size`` bytes."""
    image = work / "root.img"
    run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-E", "root_owner=0:0", "-d", str(tree),
         str(image), str((size >> 10) - (LUKS_REDUCE_MIB << 10))])
    with open(image, "r+b") as f:
        f.truncate(size)
    key = work / "recovery.key"
    key.write_text(RECOVERY_PASSPHRASE)
    # pbkdf2 at 1000 iterations: argon2id's memory cost would make every passphrase unlock in a
    # 1 GiB TCG guest take minutes.  Test image only.
    run(["cryptsetup", "reencrypt", "--encrypt", "--batch-mode", "--type", "luks2",
         "--reduce-device-size", "%dM" % LUKS_REDUCE_MIB, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
         "--label", ROOT_PARTLABEL, "--key-file", str(key), str(image)])
    return image


def make_root_disk(work: Path, tree: Path, esp_files: Dict[str, Path]) -> Path:
    disk = work / "disk.raw"
    root_mib = tree_mib(tree) * 5 // 4 + 384 + LUKS_REDUCE_MIB
    with open(disk, "wb") as f:
        f.truncate((1 + ESP_MIB + root_mib + 1) << 20)
    run(["sgdisk", "-U", capture.DISK_GUID,
         "-n", "1:%d:+%dM" % (capture.ESP_FIRST_LBA, ESP_MIB), "-t", "1:ef00", "-u", "1:" + capture.ESP_PARTITION_GUID,
         "-c", "1:ESP", "-n", "2:0:+%dM" % root_mib, "-t", "2:8304", "-c", "2:" + ROOT_PARTLABEL, str(disk)])
    esp = work / "esp.img"
    make_esp(esp, len(partition_range(disk, 1)), esp_files)
    copy_into(esp, disk, partition_range(disk, 1).start)
    esp.unlink()
    root_range = partition_range(disk, 2)
    root = encrypted_root(work, tree, len(root_range))
    copy_into(root, disk, root_range.start)
    root.unlink()
    return disk


def image_key(kernels: Dict[str, realbins.KernelPackage], base: Path) -> str:
    return digest(base.name, sorted((n, k.name, k.version) for n, k in kernels.items()), DRACUT_MODULES,
                  DRACUT_DRIVERS, CMDLINE, BAD_CMDLINE_EXTRA, MODULE_DIRS, MASKED_UNITS, ESP_RPM_SPEC, SHIM_UPDATES,
                  Path(__file__), HERE / "image.py", HERE / "agent.py", HERE.parent / "signing.py", capture.SHIM_SIGNED, realbins.SYSTEMD_STUB,
                  sorted(p.name for p in venv_package_paths()))


def build_root_image() -> RootImage:
    """The cached root guest image, built first if its inputs changed."""
    base = base_rootfs(ROOT_PACKAGES)
    kernels = {name: realbins.fetch_kernel_package(package) for name, package in KERNELS.items()}
    key = image_key(kernels, base)
    directory = guest_cache() / ("rootimage-" + key)
    with locked(directory):
        if not (directory / "image.json").exists():
            shutil.rmtree(directory, ignore_errors=True)
            _build(directory, base, kernels)
            prune_stale_images(directory)
    record = json.loads((directory / "image.json").read_text())
    return RootImage(directory=directory, key=key, disk=directory / "disk.raw",
                     ukis={n: directory / ("uki-%s.efi" % n) for n in KERNELS},
                     releases={n: k.release for n, k in kernels.items()},
                     db_key=directory / "keys/db.key", db_cert=directory / "keys/db.crt",
                     vars_sb_off=directory / "vars-sb-off.fd", vars_sb_on=directory / "vars-sb-on.fd",
                     boot_entry=record["boot_entry"])


def _build(directory: Path, base: Path, kernels: Dict[str, realbins.KernelPackage]) -> None:
    work = directory / "work"
    work.mkdir(parents=True)
    tree = work / "tree"
    run(["cp", "-a", str(base), str(tree)])
    try:
        db_key, db_cert = realbins.make_test_keys(directory / "keys", "rhel-cvm-update e2e db")
        for kernel in {k.name: k for k in kernels.values()}.values():
            install_kernel_modules(tree, kernel)
        initrds = {k.release: dracut_initramfs(tree, k, work) for k in {k.name: k for k in kernels.values()}.values()}
        ukis: Dict[str, Path] = {}
        update_rpms: List[Path] = [shim_rpm(name, db_key, db_cert, directory, work) for name in SHIM_UPDATES]
        for name, kernel in kernels.items():
            cmdline = CMDLINE % name + (BAD_CMDLINE_EXTRA if name == "bad" else "")
            unsigned = realbins.build_uki(work / ("uki-%s.unsigned.efi" % name), kernel.vmlinuz,
                                          initrds[kernel.release], cmdline, uname=kernel.release)
            ukis[name] = realbins.sign(unsigned, db_key, db_cert, directory / ("uki-%s.efi" % name))
            if name != "a":
                update_rpms.append(kernel_rpm(name, kernel, ukis[name], directory, work))
        install_harness(tree, ukis)
        configure_root(tree, update_rpms)
        finish_image(directory, work, tree, base, kernels, ukis, db_cert, make_root_disk)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def initramfs_listing(image: RootImage, name: str) -> str:
    """lsinitrd-like listing of a UKI's initramfs (cpio -t over the extracted .initrd)."""
    initrd = realbins.extract_section(image.ukis[name], ".initrd", image.directory / ("initrd-%s.img" % name))
    gunzip = subprocess.run(["sh", "-c", "zcat -f '%s' | cpio -t --quiet" % initrd], stdout=subprocess.PIPE,
                            check=True)
    return gunzip.stdout.decode()


if __name__ == "__main__":
    image = build_root_image()
    print(json.dumps({"directory": str(image.directory), "disk": str(image.disk),
                      "ukis": {n: str(p) for n, p in image.ukis.items()}}, indent=2))
