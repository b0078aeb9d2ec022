"""Boot OVMF + swtpm + shim + a UKI under QEMU (TCG) and record what the firmware measured.

Run from the repository root (as root: the boot entry is made by efibootmgr over a loop device):

    .venv/bin/python tests/vm/capture.py                      # every scenario
    .venv/bin/python tests/vm/capture.py sb-off-uki-a         # one scenario
    .venv/bin/python tests/vm/capture.py --out /tmp/boots --work /tmp/work sb-off-uki-a

Each scenario writes ``<out>/<name>/``: eventlog.bin, pcrs.txt, efivars/, boot.json (and db.crt
when Secure Boot is on).  See tests/vm/README.md.
"""

import argparse
import base64
import datetime
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests import realbins  # noqa: E402
from tests.vm import signing  # noqa: E402
from tests.vm.signing import Signing  # noqa: E402

OVMF_DIR = Path("/usr/share/OVMF")
SHIM_SIGNED = Path("/usr/lib/shim/shimx64.efi.signed")
SHIM_UNSIGNED = Path("/usr/lib/shim/shimx64.efi")
INIT_SCRIPT = Path(__file__).resolve().parent / "init.sh"
DEFAULT_OUT = REPO_ROOT / "tests" / "data" / "boots"

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
# Fixed GUIDs keep the HD() device-path node, and with it shim's PCR4 event, the same on every capture.
DISK_GUID = "5f1c2a9e-3b4d-4e6f-8a7b-9c0d1e2f3a4b"
ESP_PARTITION_GUID = "0b5e0e5a-f81f-11d2-ba4b-00a0c93ec93b"
ESP_VOLUME_ID = "52484356"  # "RHCV"
# Owner GUID of the test certificate's EFI_SIGNATURE_DATA in db (recorded in boot.json).
DB_CERT_OWNER_GUID = "7f3c6f4a-2d1e-4b8a-9e5c-1a2b3c4d5e6f"
DISK_MIB = 48
ESP_FIRST_LBA = 2048
BOOT_ENTRY_NUMBER = "0007"
SHIM_ESP_PATH = "\\EFI\\redhat\\shimx64.efi"
SHIM_DEFAULT_SECOND_STAGE = "\\EFI\\redhat\\grubx64.efi"
QEMU_TIMEOUT_SECONDS = 420


@dataclass(frozen=True)
class UkiSpec:
    name: str
    kernel_package: str   # Debian metapackage; the pinned build is in realbins.PINNED_KERNELS
    cmdline: str

    @property
    def esp_path(self) -> str:
        return "\\EFI\\Linux\\uki-%s.efi" % self.name


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    secure_boot: bool
    shim: Path
    shim_origin: str
    uki: UkiSpec
    # True: optional data = UCS-2 path + NUL (efibootmgr -@).  False: `efibootmgr -u PATH`, which
    # stores the UCS-2 path without a NUL; shim then ignores it and loads grubx64.efi from its own
    # directory, so the UKI is also put there and the scenario records which path shim measured.
    optional_data_nul: bool = True
    # Signer-change boots (tests/vm/signing.py): shim's signature table, the UKI's signer, the
    # variables they start from.  None: shim as installed, UKI signed by this run's db key.
    signing: Optional[Signing] = None

    @property
    def shim_loads(self) -> str:
        """The second-stage path shim is expected to load (and log in PCR4)."""
        return self.uki.esp_path if self.optional_data_nul else SHIM_DEFAULT_SECOND_STAGE


# `quiet loglevel=0` keeps kernel messages out of the serial blocks; panic=-1 with -no-reboot ends
# QEMU at once if the guest fails instead of waiting for the timeout.
GUEST_CMDLINE = "console=ttyS0 quiet loglevel=0 panic=-1"
UKI_A = UkiSpec("a", "linux-image-cloud-amd64", GUEST_CMDLINE + " rhel_cvm_update.uki=a")
UKI_B = UkiSpec("b", "linux-image-amd64", GUEST_CMDLINE + " rhel_cvm_update.uki=b")
SHIM_SIGNED_ORIGIN = "Debian shim-signed: /usr/lib/shim/shimx64.efi.signed (Microsoft UEFI CA signature)"
SHIM_UNSIGNED_ORIGIN = ("Debian shim-unsigned: /usr/lib/shim/shimx64.efi (a separate build of the same shim "
                        "version; its Authenticode differs from the signed one's per pesign -h)")

# The signer-change chain (issue 13): one machine whose shim and UKI are re-signed between boots,
# each boot starting from the variables the one before left.  db = Microsoft's template db (UEFI
# CA 2011) + Microsoft UEFI CA 2023 + two test CAs; shims carry Debian's real Microsoft signatures.
SIGNER_SCENARIOS = tuple(
    Scenario(name, "Secure Boot on, signer chain: " + text, True, SHIM_SIGNED,
             "Debian shim-signed with its certificate table rebuilt: " + ", ".join(plan.shim_signatures),
             UKI_A, signing=plan)
    for name, text, plan in (
        ("sb2-shim-ms2011", "shim signed by the Microsoft UEFI CA 2011 only; UKI A by test CA 1",
         Signing(("ms-2011",), "ca1")),
        ("sb2-shim-ms2023", "the same shim re-signed: Microsoft UEFI CA 2023 only (same Authenticode)",
         Signing(("ms-2023",), "ca1", after="sb2-shim-ms2011")),
        ("sb2-shim-dual", "shim as Debian ships it: CA 2011 signature first, CA 2023 second",
         Signing(("ms-2011", "ms-2023"), "ca1", after="sb2-shim-ms2023")),
        ("sb2-shim-dual-2023-first", "dual-signed shim with the CA 2023 signature first",
         Signing(("ms-2023", "ms-2011"), "ca1", after="sb2-shim-dual")),
        ("sb2-uki-ca2", "dual-signed shim; UKI A re-signed by test CA 2 (shim logs the other db entry)",
         Signing(("ms-2011", "ms-2023"), "ca2", after="sb2-shim-dual-2023-first")),
        ("sb2-shim-sbat", "a newer shim: .sbatlevel dated 2026050100 (applied by shim), signed by test CA 1",
         Signing(("ca1",), "ca1", after="sb2-uki-ca2", sbat_date="2026050100")),
        ("sb2-dbx-ms2011", "dbx += Microsoft UEFI CA 2011 at runtime; shim signed by CA 2023 only "
         "(SbatLevel stays at the newer level the previous boot applied)",
         Signing(("ms-2023",), "ca1", after="sb2-shim-sbat", dbx_certs=("ms-2011",))),
        ("sb2-shim-ca2", "Debian's shim re-signed by test CA 2 alone (the vendor's own 2023 CA)",
         Signing(("ca2",), "ca1", after="sb2-dbx-ms2011")),
        ("sb2-shim-ca-dual", "the same shim signed by test CA 1 and test CA 2, in that order",
         Signing(("ca1", "ca2"), "ca1", after="sb2-shim-ca2")),
        ("sb2-mok-enrolled", "a MOK CA enrolled in MokList (shim mirrors it to MokListRT); shim signed by "
         "the Microsoft UEFI CA 2023, UKI A still by test CA 1",
         Signing(("ms-2023",), "ca1", after="sb2-shim-ca-dual", mok_certs=("mok",))),
        ("sb2-uki-mok", "UKI A re-signed by a leaf of the MOK CA: shim verifies it through MokListRT",
         Signing(("ms-2023",), "mok", after="sb2-mok-enrolled")),
    ))

SCENARIOS = {s.name: s for s in (
    Scenario("sb-off-uki-a", "Secure Boot off; Debian's Microsoft-signed shim -> unsigned UKI A (cloud kernel)",
             False, SHIM_SIGNED, SHIM_SIGNED_ORIGIN, UKI_A),
    Scenario("sb-off-uki-b", "Secure Boot off; same shim -> unsigned UKI B (generic kernel, other cmdline)",
             False, SHIM_SIGNED, SHIM_SIGNED_ORIGIN, UKI_B),
    Scenario("sb-on-uki-a", "Secure Boot on (Microsoft keys + test db cert); signed shim -> UKI A signed by the test key",
             True, SHIM_SIGNED, SHIM_SIGNED_ORIGIN, UKI_A),
    Scenario("sb-on-uki-b", "Secure Boot on (same vars and key as sb-on-uki-a); signed shim -> UKI B signed by the test key",
             True, SHIM_SIGNED, SHIM_SIGNED_ORIGIN, UKI_B),
    Scenario("sb-off-shim-b-uki-a", "Secure Boot off; a different shim build (shim-unsigned) -> unsigned UKI A",
             False, SHIM_UNSIGNED, SHIM_UNSIGNED_ORIGIN, UKI_A),
    Scenario("sb-off-uki-a-entry-no-nul",
             "Secure Boot off; as sb-off-uki-a but the boot entry was made with `efibootmgr -u \\EFI\\Linux\\uki-a.efi` "
             "(optional data without a terminating NUL): shim ignores it and loads \\EFI\\redhat\\grubx64.efi, "
             "a copy of UKI A",
             False, SHIM_SIGNED, SHIM_SIGNED_ORIGIN, UKI_A, optional_data_nul=False),
) + SIGNER_SCENARIOS}


class CaptureError(RuntimeError):
    """The guest did not produce a complete, verified capture."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dpkg_version(package: str) -> str:
    return realbins.run(["dpkg-query", "-W", "-f", "${Version}", package]).stdout.decode()


def tool_version(argv: List[str]) -> str:
    return realbins.run(argv).stdout.decode().splitlines()[0].strip()


# ---------------------------------------------------------------------------------------------
# inputs


def pe_section(pe: Path, name: str) -> Tuple[int, int]:
    """(VirtualSize, SizeOfRawData) of a named section, read from the section table."""
    data = pe.read_bytes()[:8192]
    (lfanew,) = struct.unpack_from("<I", data, 0x3C)
    nsections, optional_size = struct.unpack_from("<H12xH", data, lfanew + 6)
    table = lfanew + 24 + optional_size
    for i in range(nsections):
        entry = table + 40 * i
        if data[entry:entry + 8].rstrip(b"\0").decode() == name:
            virtual_size, _, raw_size = struct.unpack_from("<III", data, entry + 8)
            return virtual_size, raw_size
    raise CaptureError("%s has no %s section" % (pe, name))


def linux_payload(uki: Path, out: Path) -> Dict[str, object]:
    """The .linux section as systemd-stub hands it to LoadImage: VirtualSize bytes, zero filled.

    Returns its description for boot.json, with the Authenticode digest from pesign.
    """
    virtual_size, raw_size = pe_section(uki, ".linux")
    realbins.extract_section(uki, ".linux", out)
    data = out.read_bytes()[:min(virtual_size, raw_size)]
    data += b"\0" * (virtual_size - len(data))
    out.write_bytes(data)
    return {"virtual_size": virtual_size, "size_of_raw_data": raw_size,
            "sha256": hashlib.sha256(data).hexdigest(),
            "authenticode_sha256": realbins.pesign_digest(out)}


@dataclass
class BuiltUki:
    path: Path
    record: Dict[str, object]


def build_uki(spec: UkiSpec, work: Path, keys: Optional[Tuple[Path, Path]]) -> BuiltUki:
    kernel = realbins.fetch_kernel_package(spec.kernel_package)
    initrd = realbins.busybox_initramfs(
        work / ("initrd-%s.img" % spec.name), INIT_SCRIPT.read_text(),
        {"lib/modules/efivarfs.ko": kernel.module("fs/efivarfs/efivarfs.ko")})
    unsigned = realbins.build_uki(work / ("uki-%s.unsigned.efi" % spec.name), kernel.vmlinuz, initrd,
                                  spec.cmdline, uname=kernel.release)
    record: Dict[str, object] = {
        "esp_path": spec.esp_path,
        "cmdline": spec.cmdline,
        "uname": kernel.release,
        "kernel": dict(kernel.as_record(), metapackage=spec.kernel_package,
                       vmlinuz_sha256=sha256_file(kernel.vmlinuz),
                       vmlinuz_authenticode_sha256=realbins.pesign_digest(kernel.vmlinuz)),
        "initrd_sha256": sha256_file(initrd),
        "init_script_sha256": sha256_file(INIT_SCRIPT),
        "stub": {"path": str(realbins.SYSTEMD_STUB), "sha256": sha256_file(realbins.SYSTEMD_STUB),
                 "package": "systemd-boot-efi " + dpkg_version("systemd-boot-efi")},
        "unsigned_sha256": sha256_file(unsigned),
        "unsigned_authenticode_sha256": realbins.pesign_digest(unsigned),
        "linux_section": linux_payload(unsigned, work / ("linux-%s.bin" % spec.name)),
    }
    final = unsigned
    if keys:
        final = realbins.sign(unsigned, keys[0], keys[1], work / ("uki-%s.signed.efi" % spec.name))
    record.update(signed=bool(keys), sha256=sha256_file(final), size=final.stat().st_size,
                  authenticode_sha256=realbins.pesign_digest(final))
    return BuiltUki(final, record)


def make_esp_disk(disk: Path, files: Dict[str, Path]) -> Dict[str, object]:
    """A GPT disk with one FAT ESP holding ``files`` (ESP path with backslashes -> host file).

    Nothing is mounted: sgdisk writes the GPT, mkfs.vfat formats a separate image of the
    partition's size, mtools fills it, and the bytes are copied into the partition's range.
    """
    with open(disk, "wb") as f:
        f.truncate(DISK_MIB << 20)
    realbins.run(["sgdisk", "-U", DISK_GUID, "-n", "1:%d:0" % ESP_FIRST_LBA, "-t", "1:ef00",
                  "-u", "1:" + ESP_PARTITION_GUID, "-c", "1:ESP", str(disk)])
    info = realbins.run(["sgdisk", "-i", "1", str(disk)]).stdout.decode()
    first = int(re.search(r"First sector: (\d+)", info).group(1))
    last = int(re.search(r"Last sector: (\d+)", info).group(1))
    sectors = last - first + 1
    fat = disk.with_suffix(".esp")
    fat.unlink(missing_ok=True)
    realbins.run(["mkfs.vfat", "-F", "32", "-S", "512", "-i", ESP_VOLUME_ID, "-n", "ESP",
                  "-C", str(fat), str(sectors * 512 // 1024)])
    for esp_path, source in sorted(files.items()):
        parts = esp_path.strip("\\").split("\\")
        for depth in range(1, len(parts)):
            directory = "::/" + "/".join(parts[:depth])
            subprocess.run(["mmd", "-i", str(fat), directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        realbins.run(["mcopy", "-o", "-i", str(fat), str(source), "::/" + "/".join(parts)])
    with open(fat, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(first * 512)
        shutil.copyfileobj(src, dst)
    fat.unlink()
    return {"disk_guid": DISK_GUID, "esp_partition_guid": ESP_PARTITION_GUID,
            "esp_first_lba": first, "esp_sectors": sectors, "files": sorted(files)}


def make_boot_entry(disk: Path, work: Path, second_stage: str, nul_terminated: bool = True) -> Dict[str, object]:
    """Boot#### + BootOrder for shim with the UKI path as optional data, written by efibootmgr.

    efibootmgr reads the GPT through a loop device and writes into a directory laid out like
    efivarfs.  With ``nul_terminated`` the optional data is the UCS-2 path with a terminating NUL
    (passed raw with -@): shim's split_load_options only finds a path that ends in L' ' or L'\\0'.
    Without it the entry is what `efibootmgr -u PATH` writes (no NUL).
    """
    efivars = work / "efibootmgr-vars"
    shutil.rmtree(efivars, ignore_errors=True)
    efivars.mkdir()
    if nul_terminated:
        optional = work / "optional-data.bin"
        optional.write_bytes(second_stage.encode("utf-16-le") + b"\0\0")
        optional_args = ["-@", str(optional)]
    else:
        optional_args = ["-u", second_stage]
    loop = realbins.run(["losetup", "-f", "--show", str(disk)]).stdout.decode().strip()
    try:
        env = dict(os.environ, EFIVARFS_PATH=str(efivars) + "/", LIBEFIVAR_OPS="efivarfs")
        realbins.run(["efibootmgr", "-q", "-b", BOOT_ENTRY_NUMBER, "-c", "-d", loop, "-p", "1",
                      "-l", SHIM_ESP_PATH, "-L", "rhel-cvm-update capture"] + optional_args, env=env)
        listing = realbins.run(["efibootmgr", "-v"], env=env).stdout.decode()
    finally:
        realbins.run(["losetup", "-d", loop])
    entry_name = "Boot%s-%s" % (BOOT_ENTRY_NUMBER, EFI_GLOBAL)
    order_name = "BootOrder-" + EFI_GLOBAL
    entry = (efivars / entry_name).read_bytes()
    order = (efivars / order_name).read_bytes()
    (line,) = [l for l in listing.splitlines() if l.startswith("Boot" + BOOT_ENTRY_NUMBER)]
    return {
        "number": BOOT_ENTRY_NUMBER,
        "loader": SHIM_ESP_PATH,
        "optional_data": second_stage,
        "optional_data_encoding": ("UCS-2LE with terminating NUL (efibootmgr -@ FILE)" if nul_terminated
                                   else "UCS-2LE without NUL (efibootmgr -u PATH)"),
        "efibootmgr_v": line,
        "variables": {
            entry_name: {"attr": struct.unpack_from("<I", entry)[0], "data": entry[4:].hex()},
            order_name: {"attr": struct.unpack_from("<I", order)[0], "data": order[4:].hex()},
        },
    }


def boot_entry_json(work: Path, boot_entry: Dict[str, object]) -> Path:
    """The boot entry's variables as a virt-fw-vars --set-json file."""
    entries = {"version": 2, "variables": [
        {"name": full.split("-", 1)[0], "guid": full.split("-", 1)[1], "attr": var["attr"], "data": var["data"]}
        for full, var in boot_entry["variables"].items()]}
    entries_json = work / "boot-entry-vars.json"
    entries_json.write_text(json.dumps(entries))
    return entries_json


def make_vars(template: Path, out: Path, work: Path, boot_entry: Dict[str, object],
              db_cert: Optional[Path]) -> List[str]:
    """Copy an OVMF vars template with virt-fw-vars: add the boot entry (and the test db cert)."""
    argv = [sys.executable, "-m", "virt.firmware.vars", "-i", str(template), "-o", str(out),
            "--set-json", str(boot_entry_json(work, boot_entry))]
    changes = ["Boot%s and BootOrder from efibootmgr (virt-fw-vars --set-json)" % BOOT_ENTRY_NUMBER]
    if db_cert:
        argv += ["--add-db", DB_CERT_OWNER_GUID, str(db_cert)]
        changes.append("db += test certificate db.crt, owner %s (virt-fw-vars --add-db)" % DB_CERT_OWNER_GUID)
    realbins.run(argv)
    return changes


# ---------------------------------------------------------------------------------------------
# the boot


def start_swtpm(state: Path, sock: Path) -> subprocess.Popen:
    state.mkdir(parents=True, exist_ok=True)
    realbins.run(["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--pcr-banks", "sha1,sha256",
                  "--overwrite"])
    proc = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", "dir=" + str(state),
                             "--ctrl", "type=unixio,path=" + str(sock), "--terminate",
                             "--log", "file=%s,level=1" % (state / "swtpm.log")])
    for _ in range(100):
        if sock.exists():
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise CaptureError("swtpm did not create %s" % sock)


def qemu_argv(code: Path, vars_file: Path, disk: Path, sock: Path, serial: Path, secure_boot: bool) -> List[str]:
    machine = "q35,smm=on" if secure_boot else "q35"
    argv = ["qemu-system-x86_64", "-machine", machine, "-accel", "tcg", "-m", "512", "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot", "-net", "none",
            "-serial", "file:" + str(serial),
            "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=" + str(code),
            "-drive", "if=pflash,format=raw,unit=1,file=" + str(vars_file),
            "-drive", "if=none,id=esp,format=raw,file=" + str(disk),
            "-device", "virtio-blk-pci,drive=esp,addr=04.0",
            "-chardev", "socket,id=chrtpm,path=" + str(sock),
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-crb,tpmdev=tpm0"]
    if secure_boot:
        argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return argv


BLOCK = re.compile(r"==== BEGIN FILE (\S+) (\d+) ([0-9a-f]{64}) ====\r?\n(.*?)==== END FILE \1 ====", re.S)
PCR_BLOCK = re.compile(r"==== BEGIN PCRS ====\r?\n(.*?)==== END PCRS ====", re.S)


def parse_serial(text: str) -> Tuple[List[Tuple[str, int, str]], Dict[str, bytes]]:
    """PCR lines and verified files from the guest's serial output."""
    if "==== CAPTURE DONE ====" not in text:
        raise CaptureError("the guest did not finish (no CAPTURE DONE marker)")
    pcr_match = PCR_BLOCK.search(text)
    if not pcr_match:
        raise CaptureError("no PCR block in the serial output")
    pcrs = []
    for line in pcr_match.group(1).splitlines():
        fields = line.split()
        if len(fields) != 3 or not re.fullmatch(r"[0-9a-fA-F]+", fields[2]):
            raise CaptureError("bad PCR line %r" % line)
        pcrs.append((fields[0], int(fields[1]), fields[2].lower()))
    files: Dict[str, bytes] = {}
    for match in BLOCK.finditer(text):
        name, length, digest, body = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        data = base64.b64decode("".join(body.split()), validate=True)
        if len(data) != length or hashlib.sha256(data).hexdigest() != digest:
            raise CaptureError("%s arrived corrupted on the serial console (length %d/%d)" % (name, len(data), length))
        files[name] = data
    if "eventlog" not in files:
        raise CaptureError("no event log in the serial output")
    return pcrs, files


def capture(scenario: Scenario, out_root: Path, work: Path,
            keys: Optional[Tuple[Path, Path]] = None,
            cas: Optional[Dict[str, signing.TestCa]] = None) -> Path:
    """Build, boot and record one scenario into ``out_root/<name>/``; returns that directory.

    ``keys`` is the db key pair of plain Secure Boot scenarios, ``cas`` the test CAs of the
    signer-change chain (whose boots must run in order, in one ``work`` directory)."""
    chain_root = work
    work = work / scenario.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    plan = scenario.signing
    if plan:
        if not cas:
            raise CaptureError("%s needs the test CAs" % scenario.name)
        keys = (cas[plan.uki_signer].leaf_key, cas[plan.uki_signer].leaf_cert)
        shim = signing.build_shim(scenario.shim, plan, cas, work / "shimx64.efi")
    else:
        shim = scenario.shim
    if scenario.secure_boot and not keys:
        raise CaptureError("%s needs a db key pair" % scenario.name)
    uki = build_uki(scenario.uki, work, keys if scenario.secure_boot else None)
    disk = work / "disk.img"
    esp_files = {SHIM_ESP_PATH: shim, scenario.uki.esp_path: uki.path, scenario.shim_loads: uki.path}
    esp = make_esp_disk(disk, esp_files)
    boot_entry = make_boot_entry(disk, work, scenario.uki.esp_path, scenario.optional_data_nul)

    code = OVMF_DIR / ("OVMF_CODE_4M.secboot.fd" if scenario.secure_boot else "OVMF_CODE_4M.fd")
    template = OVMF_DIR / ("OVMF_VARS_4M.ms.fd" if scenario.secure_boot else "OVMF_VARS_4M.fd")
    vars_file = work / "OVMF_VARS.fd"
    if plan:
        previous = chain_root / plan.after / "OVMF_VARS.fd" if plan.after else None
        if previous and not previous.exists():
            raise CaptureError("%s starts from the variables %s left: capture %s first, in the same --work"
                               % (scenario.name, plan.after, plan.after))
        var_changes = signing.make_signing_vars(template, previous, vars_file, boot_entry_json(work, boot_entry),
                                                plan, cas)
    else:
        var_changes = make_vars(template, vars_file, work, boot_entry, keys[1] if scenario.secure_boot else None)

    sock = work / "swtpm.sock"
    serial = work / "serial.log"
    swtpm = start_swtpm(work / "tpmstate", sock)
    argv = qemu_argv(code, vars_file, disk, sock, serial, scenario.secure_boot)
    started = time.monotonic()
    try:
        qemu = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=QEMU_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as e:
        raise CaptureError("QEMU did not power off within %d s; see %s" % (QEMU_TIMEOUT_SECONDS, serial)) from e
    finally:
        try:
            swtpm.wait(timeout=10)
        except subprocess.TimeoutExpired:
            swtpm.kill()
            swtpm.wait()
    seconds = time.monotonic() - started
    if qemu.returncode != 0:
        raise CaptureError("QEMU exited %d: %s" % (qemu.returncode, qemu.stdout.decode(errors="replace")))
    pcrs, files = parse_serial(serial.read_text(errors="replace"))

    target = out_root / scenario.name
    shutil.rmtree(target, ignore_errors=True)
    (target / "efivars").mkdir(parents=True)
    (target / "eventlog.bin").write_bytes(files["eventlog"])
    for name, data in sorted(files.items()):
        if name.startswith("efivars/"):
            (target / name).write_bytes(data)
    captured_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(target / "pcrs.txt", "w") as f:
        f.write("# %s: read by the guest kernel from /sys/class/tpm/tpm0/pcr-<alg>/<n>, captured %s\n"
                % (scenario.name, captured_at))
        f.write("# kind: TPM-read (swtpm), same boot as eventlog.bin\n")
        for alg, index, value in pcrs:
            f.write("%s %d %s\n" % (alg, index, value))

    record = {
        "scenario": scenario.name,
        "description": scenario.description,
        "captured_at": captured_at,
        "boot_seconds": round(seconds, 1),
        "secure_boot": scenario.secure_boot,
        "files": {
            "eventlog.bin": {"sha256": hashlib.sha256(files["eventlog"]).hexdigest(),
                             "size": len(files["eventlog"]),
                             "source": "/sys/kernel/security/tpm0/binary_bios_measurements"},
            "pcrs.txt": "sha1 and sha256 PCRs 0-23 from /sys/class/tpm/tpm0/pcr-*/N, same boot",
            "efivars": sorted(n[len("efivars/"):] for n in files if n.startswith("efivars/")),
        },
        "firmware": {
            "package": "ovmf " + dpkg_version("ovmf"),
            "code": {"file": str(code), "sha256": sha256_file(code)},
            "vars_template": {"file": str(template), "sha256": sha256_file(template)},
            "vars_changes": var_changes,
        },
        "tpm": {"swtpm": tool_version(["swtpm", "--version"]), "pcr_banks": ["sha1", "sha256"],
                "interface": "tpm-crb, fresh swtpm_setup state per capture"},
        "qemu": {"version": tool_version(["qemu-system-x86_64", "--version"]),
                 "argv": [a.replace(str(work), "$WORK") for a in argv]},
        "disk": esp,
        "boot_entry": boot_entry,
        "shim": {
            "origin": scenario.shim_origin,
            "package": ("shim-signed " + dpkg_version("shim-signed")) if scenario.shim == SHIM_SIGNED
            else ("shim-unsigned " + dpkg_version("shim-unsigned")),
            "esp_path": SHIM_ESP_PATH,
            "sha256": sha256_file(shim),
            "size": shim.stat().st_size,
            "authenticode_sha256": realbins.pesign_digest(shim),
            "authenticode_tool": "pesign -h -d sha256 (pesign %s)" % dpkg_version("pesign"),
        },
        "uki": dict(uki.record, shim_loads=scenario.shim_loads),
        "tools": {"objcopy": tool_version(["objcopy", "--version"]),
                  "sbsign": "sbsigntool " + dpkg_version("sbsigntool"),
                  "efibootmgr": "efibootmgr " + dpkg_version("efibootmgr"),
                  "virt-firmware": _virt_firmware_version()},
        "rebuild": ("From the repository root, as root: .venv/bin/python tests/vm/capture.py %s "
                    "(needs the Debian packages in the Makefile and the pinned kernel %s). "
                    "UKIs are rebuilt byte-identically by tests/realbins.build_uki from the same kernel, "
                    "initramfs (tests/vm/init.sh + busybox-static + the kernel's efivarfs.ko) and cmdline%s."
                    % (scenario.name, uki.record["kernel"]["version"],
                       "; the signer chain (sb2-*) is re-captured together, in order, with the committed "
                       "test CAs (tests/data/boots/sb2-test-cas)" if plan else
                       "; Secure Boot scenarios use a freshly generated test key, so re-capture "
                       "sb-on-uki-a and sb-on-uki-b together (one key) and expect new PCR7/UKI digests"
                       if scenario.secure_boot else "")),
    }
    if plan:
        record["signing"] = signing.describe(plan, shim, uki.path, target, cas)
        db_cert, owner = cas[plan.uki_signer].ca_cert, signing.TEST_CA_OWNER_GUIDS[plan.uki_signer]
        note = ("the test CA (tests/data/boots/sb2-test-cas) that anchors the UKI's signer, in db or, "
                "for the MOK, in MokList")
    else:
        db_cert, owner = (keys[1] if keys else None), DB_CERT_OWNER_GUID
        note = "self-signed test db certificate; its private key is not kept"
    if scenario.secure_boot:
        shutil.copyfile(db_cert, target / "db.crt")
        record["db_cert"] = {"file": "db.crt", "owner_guid": owner,
                             "sha256_fingerprint": realbins.cert_sha256_fingerprint(db_cert),
                             "subject": realbins.run(["openssl", "x509", "-in", str(db_cert), "-noout", "-subject"])
                             .stdout.decode().strip(),
                             "note": note}
    (target / "boot.json").write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return target


def _virt_firmware_version() -> str:
    try:
        from importlib.metadata import version
        return "virt-firmware " + version("virt-firmware")
    except Exception:  # metadata missing in an odd install: the version is informational
        return "virt-firmware (version unknown)"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help="scenario names (default: all): " + ", ".join(SCENARIOS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture root (default: tests/data/boots)")
    parser.add_argument("--work", type=Path, help="work directory kept for inspection (default: a temporary one)")
    parser.add_argument("--new-test-cas", action="store_true",
                        help="generate new test CAs into %s (then every sb2-* PCR7 changes: re-capture "
                             "the whole chain)" % signing.TEST_CAS_DIR.relative_to(REPO_ROOT))
    args = parser.parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error("unknown scenario(s): %s" % ", ".join(unknown))
    for name in names:
        after = SCENARIOS[name].signing and SCENARIOS[name].signing.after
        if after and after not in names:
            parser.error("%s starts from the variables %s leaves: capture them together" % (name, after))
    with tempfile.TemporaryDirectory(prefix="capture-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        keys = cas = None
        if any(SCENARIOS[n].secure_boot and not SCENARIOS[n].signing for n in names):
            keys = realbins.make_test_keys(work / "keys")
        if any(SCENARIOS[n].signing for n in names):
            cas = (signing.make_test_cas(signing.TEST_CAS_DIR) if args.new_test_cas
                   else signing.load_test_cas())
        for name in sorted(names, key=list(SCENARIOS).index):  # a signer chain in its order
            target = capture(SCENARIOS[name], args.out, work, keys, cas)
            record = json.loads((target / "boot.json").read_text())
            print("%s: %.1f s, event log %d bytes -> %s" % (name, record["boot_seconds"],
                                                            record["files"]["eventlog.bin"]["size"], target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
