"""A sandbox CVM built from real parts, for the transaction tests, the demo, packaging tests
and benchmarks.

What is real: Debian's Microsoft-signed shim and UKIs rebuilt byte for byte from the ones
that really booted under OVMF (tests/vm/capture.py), the efivarfs copy and TCG event log of
that real boot (tests/data/boots/sb-off-uki-a), swtpm as the vTPM with that log replayed into
it, a LUKS2 image enrolled by systemd-cryptenroll against those PCRs (plus a recovery
passphrase in keyslot 0), and a GPT image whose ESP partition has the captured disk's
geometry (what Boot#### Hard Drive nodes name).

What is SIMULATED: the firmware.  ``simulate_reboot`` does what OVMF did in the captures:
take BootNext (deleting it) or else the head of BootOrder, start shim and the UKI that entry
names, and measure them.  When the chain is one that really booted in a capture, that real
log is replayed; for any other UKI (variants built with another command line) the log of
boot A is rebuilt with the new UKI's Authenticode digests (pesign) and device path, record
by record with tests/logbuild.py -- never by asking the code under test.

Use ``with sandbox_cvm(directory) as cvm:`` from scripts, or the ``sandbox`` pytest fixture.
"""

import contextlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from tests import logbuild, realbins
from tests.swtpm_fixtures import (REQUIRED_TOOLS, TEST_PASSPHRASE, PtyTpmRelay, Swtpm,
                                  make_luks2_image, missing_tools)
from tests.vm import capture

BOOTS = Path(__file__).resolve().parent / "data" / "boots"
BOOT_A = "sb-off-uki-a"
# Secure Boot off captures whose real logs the simulated firmware replays when their chain boots.
REAL_BOOTS = ("sb-off-uki-a", "sb-off-uki-b", "sb-off-shim-b-uki-a")
SIGNED_SHIM = Path("/usr/lib/shim/shimx64.efi.signed")
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
PLUGIN = "/usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so"
SANDBOX_TOOLS = REQUIRED_TOOLS + ("cryptsetup", "systemd-cryptenroll", "sgdisk", "pesign", "objcopy")
EV_NO_ACTION = 0x3
ALG_BY_ID = {alg_id: (name, size) for name, (alg_id, size) in logbuild.ALG_IDS.items()}
ALG_BY_ID[0x000D] = ("sha512", 64)
RECOVERY_PASSPHRASE = TEST_PASSPHRASE


class SandboxUnavailable(RuntimeError):
    """A real part cannot be had on this machine (tool, package or captured file missing)."""


# --- UKIs ---------------------------------------------------------------------------------

def _uki_cache() -> Path:
    path = realbins.cache_dir() / "sandbox-ukis"
    path.mkdir(parents=True, exist_ok=True)
    return path


def captured_uki(name: str) -> Path:
    """UKI A or B rebuilt as captured; checked against the Authenticode digest the capture
    recorded with pesign."""
    spec = {"a": capture.UKI_A, "b": capture.UKI_B}[name]
    scenario = {"a": "sb-off-uki-a", "b": "sb-off-uki-b"}[name]
    cached = _uki_cache() / ("uki-%s.efi" % name)
    expected = json.loads((BOOTS / scenario / "boot.json").read_text())["uki"]["authenticode_sha256"]
    if not cached.exists():
        work = _uki_cache() / ("build-%s" % name)
        work.mkdir(exist_ok=True)
        try:
            built = capture.build_uki(spec, work, None)
        except Exception as e:  # kernel package neither cached nor downloadable
            raise SandboxUnavailable("cannot rebuild UKI %s: %s" % (name, e)) from e
        if built.record["authenticode_sha256"] != expected:
            raise SandboxUnavailable("rebuilt UKI %s is not the captured one" % name)
        shutil.copyfile(built.path, str(cached) + ".partial")
        os.replace(str(cached) + ".partial", cached)
        shutil.rmtree(work, ignore_errors=True)
    return cached


def uki_variant(tag: str) -> Path:
    """UKI A's kernel and initramfs with ``rhel_cvm_update.variant=<tag>`` added to the
    command line: a new Authenticode digest with the same .linux payload (built once)."""
    out = _uki_cache() / ("variant-%s.efi" % tag)
    if out.exists():
        return out
    kernel = realbins.fetch_kernel_package(capture.UKI_A.kernel_package)
    initrd = _uki_cache() / "initrd-a.img"
    if not initrd.exists():
        realbins.busybox_initramfs(initrd, capture.INIT_SCRIPT.read_text(),
                                   {"lib/modules/efivarfs.ko": kernel.module("fs/efivarfs/efivarfs.ko")})
    return realbins.build_uki(out, kernel.vmlinuz, initrd,
                              capture.UKI_A.cmdline + " rhel_cvm_update.variant=" + tag, uname=kernel.release)


# --- TCG event logs, parsed and rebuilt independently of the code under test ------------------

def split_log(data: bytes) -> Tuple[bytes, List[Tuple[int, int, Dict[str, bytes], bytes]]]:
    """(Spec ID header record, [(pcr, event type, {bank: digest}, event data)]) of a
    crypto-agile log."""
    _, _, _, size = struct.unpack_from("<II20sI", data, 0)
    offset = 32 + size
    header, records = data[:offset], []
    while offset < len(data):
        pcr, event_type, count = struct.unpack_from("<III", data, offset)
        offset += 12
        digests = {}
        for _ in range(count):
            (alg,) = struct.unpack_from("<H", data, offset)
            name, length = ALG_BY_ID[alg]
            digests[name] = data[offset + 2:offset + 2 + length]
            offset += 2 + length
        (length,) = struct.unpack_from("<I", data, offset)
        records.append((pcr, event_type, digests, data[offset + 4:offset + 4 + length]))
        offset += 4 + length
    return header, records


def join_log(header: bytes, records: List[Tuple[int, int, Dict[str, bytes], bytes]]) -> bytes:
    banks = [b for b in ("sha1", "sha256", "sha384") if b in records[0][2]]
    return header + b"".join(logbuild.event2(pcr, kind, data, banks, digests)
                             for pcr, kind, digests, data in records)


def authenticode(path: Path) -> Dict[str, bytes]:
    """sha1 and sha256 Authenticode digests as pesign computes them."""
    out = {}
    for bank in ("sha1", "sha256"):
        text = realbins.run(["pesign", "-h", "-d", bank, "-i", str(path)]).stdout.decode()
        out[bank] = bytes.fromhex(text.split("hash:", 1)[1].strip())
    return out


def _image_event_path(data: bytes) -> Optional[str]:
    """The File() path in an EFI_IMAGE_LOAD_EVENT's device path, if any."""
    (path_length,) = struct.unpack_from("<Q", data, 24)
    path, offset = data[32:32 + path_length], 0
    while offset + 4 <= len(path):
        node_type, subtype, length = struct.unpack_from("<BBH", path, offset)
        if (node_type, subtype) == (4, 4):
            return path[offset + 4:offset + length].decode("utf-16-le").rstrip("\0")
        if length < 4:
            break
        offset += length
    return None


def _captured(name: str) -> Dict[str, object]:
    return json.loads((BOOTS / name / "boot.json").read_text())


def captured_pcrs(name: str) -> Dict[int, bytes]:
    """sha256 PCR4/PCR7 the guest read from the TPM in a captured boot (pcrs.txt)."""
    values = {}
    for line in (BOOTS / name / "pcrs.txt").read_text().splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "sha256" and fields[1] in ("4", "7"):
            values[int(fields[1])] = bytes.fromhex(fields[2])
    return values


def next_boot_log(shim: Path, uki: Path, uki_esp_path: str) -> Tuple[bytes, str]:
    """The event log firmware + shim + systemd-stub would write booting ``shim`` -> ``uki``:
    a captured real log when that chain really booted, else boot A's log with the shim and
    UKI image-load events carrying the new digests (and the UKI's path and size)."""
    digests = {"shim": authenticode(shim), "uki": authenticode(uki)}
    for name in REAL_BOOTS:
        info = _captured(name)
        if (info["shim"]["authenticode_sha256"] == digests["shim"]["sha256"].hex()
                and info["uki"]["authenticode_sha256"] == digests["uki"]["sha256"].hex()
                and info["uki"]["esp_path"].lower() == uki_esp_path.lower()):
            return (BOOTS / name / "eventlog.bin").read_bytes(), "real log of captured boot " + name
    template = _captured(BOOT_A)
    header, records = split_log((BOOTS / BOOT_A / "eventlog.bin").read_bytes())
    rebuilt = []
    for pcr, kind, event_digests, data in records:
        if pcr == 4 and kind == logbuild.EV_EFI_BOOT_SERVICES_APPLICATION:
            old = event_digests["sha256"].hex()
            if old == template["shim"]["authenticode_sha256"]:
                event_digests = {b: digests["shim"][b] for b in event_digests}
            elif old == template["uki"]["authenticode_sha256"]:
                assert _image_event_path(data) == template["uki"]["esp_path"]
                location, _, base, _ = struct.unpack_from("<QQQQ", data, 0)
                device_path = logbuild.file_node(uki_esp_path) + logbuild.END
                data = struct.pack("<QQQQ", location, uki.stat().st_size, base, len(device_path)) + device_path
                event_digests = {b: digests["uki"][b] for b in event_digests}
        rebuilt.append((pcr, kind, event_digests, data))
    return join_log(header, rebuilt), "boot A's real log rebuilt for this chain (simulated)"


# --- UEFI variables, read the firmware's way ----------------------------------------------------

def _var_path(efivars: Path, name: str) -> Path:
    return efivars / ("%s-%s" % (name, EFI_GLOBAL))


def read_u16_var(efivars: Path, name: str) -> Optional[List[int]]:
    path = _var_path(efivars, name)
    if not path.exists():
        return None
    data = path.read_bytes()[4:]
    return [struct.unpack_from("<H", data, i)[0] for i in range(0, len(data) - 1, 2)]


def load_option_paths(efivars: Path, number: int) -> Optional[Tuple[str, str, str]]:
    """(description, loader File() path, optional-data path) of Boot####, or None."""
    path = _var_path(efivars, "Boot%04X" % number)
    if not path.exists():
        return None
    data = path.read_bytes()[4:]
    _, path_length = struct.unpack_from("<IH", data, 0)
    end = 6
    while data[end:end + 2] != b"\0\0":
        end += 2
    description = data[6:end].decode("utf-16-le")
    device_path = data[end + 2:end + 2 + path_length]
    loader, offset = "", 0
    while offset + 4 <= len(device_path):
        node_type, subtype, length = struct.unpack_from("<BBH", device_path, offset)
        if (node_type, subtype) == (4, 4):
            loader = device_path[offset + 4:offset + length].decode("utf-16-le").rstrip("\0")
        offset += max(length, 4)
    optional = data[end + 2 + path_length:].decode("utf-16-le", "replace").split("\0")[0]
    return description, loader, optional


def write_var(efivars: Path, name: str, data: Optional[bytes], attributes: int = 0x7) -> None:
    path = _var_path(efivars, name)
    if data is None:
        if path.exists():
            path.unlink()
        return
    path.write_bytes(struct.pack("<I", attributes) + data)


# --- the sandbox ----------------------------------------------------------------------------------

class Sandbox:
    """A CVM in a directory: ``esp/``, ``efivars/``, ``disk.img`` (GPT with the ESP partition),
    ``luks.img``, ``eventlog.bin``, ``state/``, ``config.yaml`` and a running swtpm."""

    def __init__(self, root: Path, keep_previous: int = 1):
        self.root = Path(root)
        self.keep_previous = keep_previous
        self.esp = self.root / "esp"
        self.uki_dir = self.esp / "EFI" / "Linux"
        self.shim = self.esp / "EFI" / "redhat" / "shimx64.efi"
        self.efivars = self.root / "efivars"
        self.disk = self.root / "disk.img"
        self.luks = self.root / "luks.img"
        self.event_log = self.root / "eventlog.bin"
        self.state_dir = self.root / "state"
        self.config_path = self.root / "config.yaml"
        self.swtpm = Swtpm(str(self.root / "swtpm-state"))
        self.booted: Dict[str, str] = {}
        self._variants = 0

    # building

    def build(self) -> "Sandbox":
        missing = missing_tools(SANDBOX_TOOLS)
        if missing:
            raise SandboxUnavailable("missing tools: " + ", ".join(missing))
        if not SIGNED_SHIM.exists():
            raise SandboxUnavailable("%s (shim-signed) is not installed" % SIGNED_SHIM)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shim.parent.mkdir(parents=True)
        self.uki_dir.mkdir(parents=True)
        shutil.copyfile(SIGNED_SHIM, self.shim)
        self.install_uki("a")
        shutil.copytree(BOOTS / BOOT_A / "efivars", self.efivars)
        self._make_disk()
        self.state_dir.mkdir(mode=0o700)
        self.swtpm.start()
        log = (BOOTS / BOOT_A / "eventlog.bin").read_bytes()
        self.event_log.write_bytes(log)
        self.replay(log)
        if self.pcrs() != captured_pcrs(BOOT_A):
            raise RuntimeError("replaying boot A's log into swtpm did not give its captured PCR4/PCR7")
        self.booted = {"entry": "Boot0007", "uki": "\\EFI\\Linux\\uki-a.efi",
                       "log": "real log of captured boot " + BOOT_A}
        make_luks2_image(str(self.luks))
        self.cryptenroll()
        self.config_path.write_text("".join("%s: %s\n" % (k, json.dumps(v)) for k, v in self.config_values().items()))
        return self

    def config_values(self) -> Dict[str, object]:
        return {"tpm": self.swtpm.tcti, "event_log": str(self.event_log), "efivars": str(self.efivars),
                "esp": str(self.esp), "esp_device": str(self.disk), "uki_dir": str(self.uki_dir),
                "vendor": "redhat", "luks_device": str(self.luks), "pcrs": [4, 7],
                "state_dir": str(self.state_dir), "keep_previous": self.keep_previous}

    def config(self):
        from rhel_cvm_update.config import config_from_mapping

        return config_from_mapping(self.config_values(), str(self.config_path))

    def _make_disk(self) -> None:
        """The captured disk's GPT: same disk and partition GUIDs, ESP at the same LBAs."""
        with open(self.disk, "wb") as f:
            f.truncate(capture.DISK_MIB << 20)
        realbins.run(["sgdisk", "-U", capture.DISK_GUID, "-n", "1:%d:0" % capture.ESP_FIRST_LBA,
                      "-t", "1:ef00", "-u", "1:" + capture.ESP_PARTITION_GUID, "-c", "1:ESP", str(self.disk)])

    def cryptenroll(self) -> None:
        """systemd's own enrolment against the PCRs in swtpm now (the VM's first token)."""
        env = dict(os.environ, PASSWORD=RECOVERY_PASSPHRASE.decode())
        result = subprocess.run(["systemd-cryptenroll", "--tpm2-device=" + self.swtpm.tcti, "--tpm2-pcrs=4+7",
                                 str(self.luks)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                timeout=120)
        if result.returncode:
            raise RuntimeError("systemd-cryptenroll failed: " + result.stderr.decode())
        self.swtpm.flush_all()

    # the TPM

    def replay(self, log: bytes) -> None:
        """Power-cycle swtpm (PCRs reset, seeds kept) and extend every measured event of
        ``log`` into the sha1 and sha256 banks, in order, with tpm2-tools."""
        self.swtpm.power_cycle()
        _, records = split_log(log)
        specs = ["%d:%s" % (pcr, ",".join("%s=%s" % (b, d.hex()) for b, d in sorted(digests.items())
                                          if b in ("sha1", "sha256")))
                 for pcr, kind, digests, _ in records if kind != EV_NO_ACTION]
        for start in range(0, len(specs), 16):
            self.swtpm.tool("tpm2_pcrextend", *specs[start:start + 16])

    def pcrs(self) -> Dict[int, bytes]:
        return self.swtpm.read_sha256([4, 7])

    # what an admin and dnf do

    def install_uki(self, name: str) -> Path:
        """``a``/``b``: the captured UKIs as ``uki-<name>.efi``; any other name: a variant of
        UKI A (new command line) as ``uki-<name>.efi``."""
        target = self.uki_dir / ("uki-%s.efi" % name)
        partial = self.uki_dir / (".uki-%s.partial" % name)
        shutil.copyfile(captured_uki(name) if name in ("a", "b") else uki_variant(name), partial)
        os.replace(partial, target)
        return target

    def remove_uki(self, name: str) -> None:
        (self.uki_dir / ("uki-%s.efi" % name)).unlink()

    # SIMULATED FIRMWARE

    def simulate_reboot(self, hang: bool = False) -> Dict[str, str]:
        """SIMULATED FIRMWARE: reboot.  BootNext is consumed (deleted) and its entry tried,
        else the entries of BootOrder in turn; an entry whose loader or UKI file is missing is
        skipped.  ``hang``: the BootNext entry's kernel hangs and the VM is reset, so the
        firmware boots from BootOrder (a failed trial boot).  The chosen chain's log is
        replayed into swtpm and written to eventlog.bin; BootCurrent names the entry."""
        boot_next = read_u16_var(self.efivars, "BootNext")
        write_var(self.efivars, "BootNext", None)
        candidates = list(boot_next or []) if not hang else []
        candidates += read_u16_var(self.efivars, "BootOrder") or []
        for number in candidates:
            option = load_option_paths(self.efivars, number)
            if option is None:
                continue
            _, loader, uki_path = option
            shim = self.esp.joinpath(*[p for p in loader.split("\\") if p])
            uki = self.esp.joinpath(*[p for p in uki_path.split("\\") if p]) if uki_path else None
            if not shim.is_file() or uki is None or not uki.is_file():
                continue
            log, origin = next_boot_log(shim, uki, uki_path)
            self.replay(log)
            partial = self.event_log.with_suffix(".partial")
            partial.write_bytes(log)
            os.replace(partial, self.event_log)
            current = _var_path(self.efivars, "BootCurrent")
            attributes = struct.unpack_from("<I", current.read_bytes())[0] if current.exists() else 0x6
            write_var(self.efivars, "BootCurrent", struct.pack("<H", number), attributes)
            self.booted = {"entry": "Boot%04X" % number, "uki": uki_path, "log": origin}
            return self.booted
        raise RuntimeError("SIMULATED FIRMWARE: no bootable entry (BootNext %r, BootOrder %r)"
                           % (boot_next, read_u16_var(self.efivars, "BootOrder")))

    # checking the disk with real systemd

    def luks_json(self) -> dict:
        out = realbins.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(self.luks)]).stdout
        return json.loads(out)

    def plugin_unlocks(self, token_id: int) -> bool:
        """Does systemd 252's cryptsetup token plugin unlock the image with token ``token_id``
        and the TPM as it is now?  Runs through the pty relay in a private mount namespace
        (tests/swtpm_fixtures.py)."""
        if not os.path.exists(PLUGIN):
            raise SandboxUnavailable("systemd's token plugin is not installed (%s)" % PLUGIN)
        argv = ["cryptsetup", "open", "--test-passphrase", "--token-only", "--token-type", "systemd-tpm2",
                "--token-id", str(token_id), str(self.luks)]
        work = self.root / "ns"
        work.mkdir(exist_ok=True)
        self.swtpm.flush_all()
        with PtyTpmRelay(self.swtpm) as relay:
            result = relay.run(argv, str(work))
        self.swtpm.flush_all()
        return result.returncode == 0

    def unlocking_tokens(self) -> List[int]:
        """The systemd-tpm2 tokens the plugin unlocks with now, each tried on its own: after a
        refused token systemd 252 leaves its primary key loaded, and swtpm, unlike a kernel
        /dev/tpmrm0, has no resource manager to flush it before the next token is tried."""
        tokens = self.luks_json()["tokens"]
        return [int(t) for t in sorted(tokens, key=int)
                if tokens[t]["type"] == "systemd-tpm2" and self.plugin_unlocks(int(t))]

    def recovery_unlocks(self) -> bool:
        result = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file=-", str(self.luks)],
                                input=RECOVERY_PASSPHRASE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                timeout=60)
        return result.returncode == 0

    def process_killed(self) -> None:
        """After a TPM client was SIGKILLed: flush what it left loaded, as the kernel's
        resource manager (/dev/tpmrm0) does when the file is closed; swtpm has none."""
        self.swtpm.flush_all()

    def close(self) -> None:
        self.swtpm.stop()


@contextlib.contextmanager
def sandbox_cvm(root: Path, keep_previous: int = 1) -> Iterator[Sandbox]:
    cvm = Sandbox(Path(root), keep_previous)
    try:
        yield cvm.build()
    finally:
        cvm.close()


def built_or_skip(root: Path, keep_previous: int = 1) -> Sandbox:
    """For fixtures: a built sandbox, or pytest.skip naming the missing real part."""
    cvm = Sandbox(root, keep_previous)
    try:
        return cvm.build()
    except SandboxUnavailable as e:
        cvm.close()
        pytest.skip(str(e))


@pytest.fixture
def sandbox(tmp_path) -> Iterator[Sandbox]:
    """A fresh sandbox CVM booted into UKI A (skips when a real part is missing)."""
    cvm = built_or_skip(tmp_path / "cvm")
    try:
        yield cvm
    finally:
        cvm.close()
