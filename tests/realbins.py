"""Real binaries for tests: Debian kernels, reproducible UKIs, test signing keys, busybox initramfs.

Everything here drives outside tools (apt-get, dpkg-deb, objcopy, sbsign, openssl) so that test
fixtures come from the same programs a distribution uses, not from the code under test.

Library use: ``from tests import realbins``.  Command line, from the repository root:

    python -m tests.realbins kernel [--package linux-image-cloud-amd64] [--version 6.1.192-2]
    python -m tests.realbins uki --kernel K --initrd I --cmdline "..." --out X.efi
    python -m tests.realbins keys DIR
    python -m tests.realbins sign --key K --cert C --out OUT PE
    python -m tests.realbins initramfs --script INIT --out initrd.img [--kernel-module PATH ...]
"""

import argparse
import array
import zlib
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEMD_STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
BUSYBOX = Path("/bin/busybox")

# The kernel build the committed boot fixtures were captured with.  The Debian security archive
# only keeps the newest build, so when this one is gone the current candidate is used instead and
# the caller must record (and compare) the version it got.
PINNED_KERNELS = {
    "linux-image-cloud-amd64": ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2"),
    "linux-image-amd64": ("linux-image-6.1.0-56-amd64", "6.1.192-2"),
}

# Placement of the UKI sections.  systemd-stub 252 finds sections by name, the firmware loads them
# at their RVA: they must sit above the stub's own image and must not overlap each other.
UKI_SECTION_ALIGNMENT = 0x1000


class RealBinsError(RuntimeError):
    """A tool needed to build a test binary failed or is missing."""


def cache_dir() -> Path:
    """Directory for downloaded packages and built binaries (gitignored ``cache/`` by default)."""
    path = Path(os.environ.get("RHEL_CVM_UPDATE_CACHE", str(REPO_ROOT / "cache")))
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a tool from an argv list; a non-zero exit raises with its stderr."""
    argv = [str(a) for a in argv]
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    except FileNotFoundError as e:
        raise RealBinsError("tool not found: %r" % argv[0]) from e
    if proc.returncode != 0:
        raise RealBinsError("%r failed (rc=%d): %s" % (argv, proc.returncode,
                                                       proc.stderr.decode(errors="replace").strip()))
    return proc


# ---------------------------------------------------------------------------------------------
# Debian kernels


@dataclass(frozen=True)
class KernelPackage:
    """An unpacked (never installed) Debian kernel image package."""

    name: str        # binary package, e.g. linux-image-6.1.0-56-cloud-amd64
    version: str     # Debian version, e.g. 6.1.192-2
    root: Path       # extraction root (holds boot/ and lib/modules/)

    @property
    def release(self) -> str:
        """The kernel release (uname -r), e.g. 6.1.0-56-cloud-amd64."""
        return self.name[len("linux-image-"):]

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / ("vmlinuz-" + self.release)

    @property
    def config(self) -> Path:
        return self.root / "boot" / ("config-" + self.release)

    def module(self, relpath: str) -> Path:
        """A module below lib/modules/<release>/kernel/, e.g. ``fs/efivarfs/efivarfs.ko``."""
        return self.root / "lib" / "modules" / self.release / "kernel" / relpath

    def as_record(self) -> Dict[str, str]:
        return {"package": self.name, "version": self.version, "release": self.release}


# Only these members are unpacked: the full generic image package is ~400 MB of modules.
KERNEL_MEMBERS = re.compile(r"^\./(boot/(vmlinuz|config)-[^/]+|lib/modules/[^/]+/kernel/fs/efivarfs/efivarfs\.ko)$")


def resolve_kernel_package(metapackage: str) -> str:
    """The versioned image package a metapackage depends on, from ``apt-cache depends``."""
    out = run(["apt-cache", "depends", metapackage]).stdout.decode()
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise RealBinsError("apt-cache depends %s names no linux-image package" % metapackage)


def candidate_version(package: str) -> str:
    out = run(["apt-cache", "policy", package]).stdout.decode()
    match = re.search(r"Candidate:\s*(\S+)", out)
    if not match or match.group(1) == "(none)":
        raise RealBinsError("apt-cache policy %s shows no candidate" % package)
    return match.group(1)


def _download_deb(name: str, version: str) -> Optional[Path]:
    debs = cache_dir() / "debs"
    debs.mkdir(exist_ok=True)
    # Debian file names escape ':' of an epoch as %3a; kernel images have no epoch.
    deb = debs / ("%s_%s_amd64.deb" % (name, version))
    if deb.exists():
        return deb
    proc = subprocess.run(["apt-get", "download", "%s=%s" % (name, version)], cwd=str(debs),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return deb if proc.returncode == 0 and deb.exists() else None


def _unpack_kernel(deb: Path, dest: Path) -> None:
    partial = dest.with_name(dest.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            if member.isfile() and KERNEL_MEMBERS.match(member.name):
                target = partial / member.name[2:]
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    dst.write(src.read())
    if proc.wait() != 0:
        raise RealBinsError("dpkg-deb --fsys-tarfile %s failed" % deb)
    partial.rename(dest)


def fetch_kernel_package(metapackage: str = "linux-image-cloud-amd64",
                         version: Optional[str] = None) -> KernelPackage:
    """Download (once) and unpack a Debian kernel image package into the cache.

    ``version`` pins a Debian version of the versioned image package; without it the pin in
    PINNED_KERNELS is tried first.  When the pinned build is neither cached nor downloadable the
    current candidate of the metapackage is used: check ``.version`` against what you expected.
    """
    attempts: List[Tuple[str, str]] = []
    pinned = PINNED_KERNELS.get(metapackage)
    if pinned and version in (None, pinned[1]):
        attempts.append(pinned)
    elif version:
        attempts.append((resolve_kernel_package(metapackage), version))
    for name, ver in attempts:
        root = cache_dir() / "kernels" / ("%s_%s" % (name, ver))
        if root.exists():
            return KernelPackage(name, ver, root)
    for name, ver in attempts:
        deb = _download_deb(name, ver)
        if deb:
            break
    else:
        name = resolve_kernel_package(metapackage)
        ver = candidate_version(name)
        deb = _download_deb(name, ver)
        if not deb:
            raise RealBinsError("apt-get download %s=%s failed" % (name, ver))
    root = cache_dir() / "kernels" / ("%s_%s" % (name, ver))
    if not root.exists():
        _unpack_kernel(deb, root)
    kernel = KernelPackage(name, ver, root)
    if not kernel.vmlinuz.exists():
        raise RealBinsError("%s has no %s" % (deb, kernel.vmlinuz.name))
    return kernel


def debian_kernel(package: str = "linux-image-cloud-amd64", version: Optional[str] = None) -> Path:
    """Path to the vmlinuz of a Debian kernel package (see fetch_kernel_package)."""
    return fetch_kernel_package(package, version).vmlinuz


# ---------------------------------------------------------------------------------------------
# PE header fix-ups that make objcopy output reproducible


def _pe_offsets(image: bytes) -> Tuple[int, int]:
    """(offset of COFF TimeDateStamp, offset of optional-header CheckSum)."""
    if image[:2] != b"MZ":
        raise RealBinsError("not a PE image (no MZ)")
    (lfanew,) = struct.unpack_from("<I", image, 0x3C)
    if image[lfanew:lfanew + 4] != b"PE\0\0":
        raise RealBinsError("not a PE image (no PE signature at %#x)" % lfanew)
    coff = lfanew + 4
    optional = coff + 20
    return coff + 4, optional + 64


def pe_checksum(image: bytes) -> int:
    """The PE CheckSum as ImageHlp computes it: 16-bit end-around-carry sum plus file length.

    The CheckSum field itself counts as zero.
    """
    _, checksum_at = _pe_offsets(image)
    buf = bytearray(image)
    buf[checksum_at:checksum_at + 4] = b"\0\0\0\0"
    if len(buf) % 2:
        buf.append(0)
    words = array.array("H")
    words.frombytes(bytes(buf))
    if sys.byteorder == "big":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (total + len(image)) & 0xFFFFFFFF


def make_pe_reproducible(path: Path) -> None:
    """Zero the COFF TimeDateStamp (binutils 2.40 objcopy stamps the build time) and recompute
    the CheckSum, in place."""
    image = bytearray(path.read_bytes())
    stamp_at, checksum_at = _pe_offsets(bytes(image))
    image[stamp_at:stamp_at + 4] = b"\0\0\0\0"
    struct.pack_into("<I", image, checksum_at, pe_checksum(bytes(image)))
    path.write_bytes(bytes(image))


def _pe_image_end(path: Path) -> int:
    """ImageBase + SizeOfImage of a PE32+ file: the first address free for new sections."""
    image = path.read_bytes()[:4096]
    _, checksum_at = _pe_offsets(image)
    optional = checksum_at - 64
    (magic,) = struct.unpack_from("<H", image, optional)
    if magic != 0x20B:
        raise RealBinsError("%s is not PE32+" % path)
    (image_base,) = struct.unpack_from("<Q", image, optional + 24)
    (size_of_image,) = struct.unpack_from("<I", image, optional + 56)
    return image_base + size_of_image


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


# ---------------------------------------------------------------------------------------------
# UKI


def build_uki(out: Path, kernel: Path, initrd: Path, cmdline: str,
              osrel: str = 'NAME="rhel-cvm-update test"\nID=rhel-cvm-update-test\n',
              uname: Optional[str] = None, stub: Path = SYSTEMD_STUB) -> Path:
    """Build a Unified Kernel Image with objcopy, the way systemd 252's documentation does it.

    Sections are laid out in stub order (.osrel .cmdline [.uname] .linux .initrd), each at the
    next 4 KiB boundary above the previous one, starting above the stub's image.  The output is
    byte-for-byte reproducible from its inputs.
    """
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="uki-") as tmp:
        tmpdir = Path(tmp)
        sections: List[Tuple[str, Path]] = []
        (tmpdir / "osrel").write_text(osrel)
        sections.append((".osrel", tmpdir / "osrel"))
        # systemd-stub passes .cmdline to the kernel verbatim: no trailing newline or NUL.
        (tmpdir / "cmdline").write_bytes(cmdline.encode())
        sections.append((".cmdline", tmpdir / "cmdline"))
        if uname is not None:
            (tmpdir / "uname").write_text(uname)
            sections.append((".uname", tmpdir / "uname"))
        sections.append((".linux", Path(kernel)))
        sections.append((".initrd", Path(initrd)))

        argv: List[str] = ["objcopy"]
        vma = _align(_pe_image_end(Path(stub)), UKI_SECTION_ALIGNMENT)
        for name, content in sections:
            argv += ["--add-section", "%s=%s" % (name, content),
                     "--change-section-vma", "%s=%#x" % (name, vma)]
            vma = _align(vma + content.stat().st_size, UKI_SECTION_ALIGNMENT)
        partial = out.with_name(out.name + ".partial")
        run(argv + [str(stub), str(partial)])
        make_pe_reproducible(partial)
        partial.rename(out)
    return out


def extract_section(pe: Path, section: str, out: Path) -> Path:
    """Raw file bytes of one section (objcopy -O binary --only-section)."""
    run(["objcopy", "-O", "binary", "--only-section=" + section, str(pe), str(out)])
    return out


# ---------------------------------------------------------------------------------------------
# Keys and signing


def make_test_keys(directory: Path, common_name: str = "rhel-cvm-update test db") -> Tuple[Path, Path]:
    """A fresh RSA-2048 key and self-signed X.509 certificate for db; returns (key, cert PEM).

    A DER copy of the certificate is written beside it as ``db.der``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key, cert, der = directory / "db.key", directory / "db.crt", directory / "db.der"
    run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
         "-days", "3650", "-subj", "/CN=" + common_name,
         "-keyout", str(key), "-out", str(cert)])
    run(["openssl", "x509", "-in", str(cert), "-outform", "DER", "-out", str(der)])
    return key, cert


def cert_sha256_fingerprint(cert: Path) -> str:
    """SHA-256 fingerprint of a PEM certificate, from openssl, as lowercase hex."""
    out = run(["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256"]).stdout.decode()
    return out.strip().split("=", 1)[1].replace(":", "").lower()


def sign(pe: Path, key: Path, cert: Path, out: Path) -> Path:
    """Authenticode-sign a PE image with sbsign."""
    run(["sbsign", "--key", str(key), "--cert", str(cert), "--output", str(out), str(pe)])
    return Path(out)


def pesign_digest(pe: Path) -> str:
    """Authenticode SHA-256 of a PE file as pesign computes it (``pesign -h``), lowercase hex."""
    out = run(["pesign", "-h", "-d", "sha256", "-i", str(pe)]).stdout.decode()
    # pesign 116 prints "hash: <hex>"
    match = re.fullmatch(r"hash: ([0-9a-fA-F]{64})\s*", out)
    if not match:
        raise RealBinsError("unexpected pesign -h output: %r" % out)
    return match.group(1).lower()


# ---------------------------------------------------------------------------------------------
# initramfs


def _newc_entry(name: str, mode: int, data: bytes = b"", ino: int = 0, rdev: Tuple[int, int] = (0, 0)) -> bytes:
    encoded = name.encode() + b"\0"
    header = "070701" + "".join("%08X" % v for v in (
        ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0))
    entry = header.encode() + encoded
    entry += b"\0" * (-len(entry) % 4)
    entry += data + b"\0" * (-len(data) % 4)
    return entry


def reproducible_gzip(data: bytes) -> bytes:
    """gzip of ``data`` with a fixed header (mtime 0, OS byte 3 as zlib writes it), the same
    on every Python: 3.9's gzip.compress writes OS byte 255 where 3.11's writes 3."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = deflate.compress(data) + deflate.flush()
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03" + body
            + struct.pack("<II", zlib.crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF))


def busybox_initramfs(out: Path, script: str, extra_files: Optional[Dict[str, Path]] = None,
                      busybox: Path = BUSYBOX) -> Path:
    """A gzip'ed newc cpio with busybox-static as /bin/busybox and ``script`` as /init.

    Reproducible: entries sorted by name, uid/gid/mtime 0, gzip mtime 0.  ``extra_files`` maps
    archive paths (without a leading slash) to host files, e.g. kernel modules.  /dev/console is
    included as a device node because the kernel opens it for init before anything is mounted.
    """
    S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000
    entries: Dict[str, Tuple[int, bytes, Tuple[int, int]]] = {}

    def add_dirs(path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            entries.setdefault("/".join(parts[:i]), (S_IFDIR | 0o755, b"", (0, 0)))

    files = {"bin/busybox": Path(busybox)}
    files.update(extra_files or {})
    for name in ("dev", "proc", "sys", "tmp"):
        entries[name] = (S_IFDIR | 0o755, b"", (0, 0))
    entries["dev/console"] = (S_IFCHR | 0o600, b"", (5, 1))
    entries["bin/sh"] = (S_IFLNK | 0o777, b"busybox", (0, 0))
    entries["init"] = (S_IFREG | 0o755, script.encode(), (0, 0))
    for name, source in files.items():
        add_dirs(name)
        entries[name] = (S_IFREG | 0o755, Path(source).read_bytes(), (0, 0))
    archive = io.BytesIO()
    for ino, name in enumerate(sorted(entries), start=1):
        mode, data, rdev = entries[name]
        archive.write(_newc_entry(name, mode, data, ino, rdev))
    archive.write(_newc_entry("TRAILER!!!", 0))
    out = Path(out)
    out.write_bytes(reproducible_gzip(archive.getvalue()))
    return out


# ---------------------------------------------------------------------------------------------
# command line


def _main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.realbins", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("kernel", help="download and unpack a Debian kernel; print its record")
    p.add_argument("--package", default="linux-image-cloud-amd64")
    p.add_argument("--version")
    p = sub.add_parser("uki", help="build a reproducible UKI")
    p.add_argument("--kernel", required=True, type=Path)
    p.add_argument("--initrd", required=True, type=Path)
    p.add_argument("--cmdline", required=True)
    p.add_argument("--uname")
    p.add_argument("--stub", type=Path, default=SYSTEMD_STUB)
    p.add_argument("--out", required=True, type=Path)
    p = sub.add_parser("keys", help="make a db key and self-signed certificate")
    p.add_argument("directory", type=Path)
    p = sub.add_parser("sign", help="sbsign a PE image")
    p.add_argument("--key", required=True, type=Path)
    p.add_argument("--cert", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("pe", type=Path)
    p = sub.add_parser("initramfs", help="busybox initramfs with the given /init script")
    p.add_argument("--script", required=True, type=Path)
    p.add_argument("--kernel-module", action="append", default=[], type=Path,
                   help="host module file, stored as lib/modules/<file name>")
    p.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    if args.command == "kernel":
        kernel = fetch_kernel_package(args.package, args.version)
        record = dict(kernel.as_record(), vmlinuz=str(kernel.vmlinuz))
        print(json.dumps(record, indent=2))
    elif args.command == "uki":
        build_uki(args.out, args.kernel, args.initrd, args.cmdline, uname=args.uname, stub=args.stub)
        print(args.out, hashlib.sha256(args.out.read_bytes()).hexdigest())
    elif args.command == "keys":
        key, cert = make_test_keys(args.directory)
        print(key, cert, cert_sha256_fingerprint(cert))
    elif args.command == "sign":
        print(sign(args.pe, args.key, args.cert, args.out))
    elif args.command == "initramfs":
        modules = {"lib/modules/" + m.name: m for m in args.kernel_module}
        busybox_initramfs(args.out, args.script.read_text(), modules)
        print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
