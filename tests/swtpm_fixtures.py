"""A real software TPM (swtpm) per test session, driven by tpm2-tools.

The fixtures deliberately use tpm2-tools (not the code under test) for set-up, PCR
extension and reads, so that tests compare the project's TPM code with an independent
implementation.  Import the fixtures into a test module (``from tests.swtpm_fixtures
import swtpm, fresh_swtpm``) or let ``tests/interop/conftest.py`` provide them.

Facts this relies on (docs/testing-with-real-components.md): swtpm has no resource
manager and serves one TCP client at a time; libtpms counts every unclean stop as a
dictionary-attack failure, so shut down with TPM2_Shutdown(CLEAR) and relax the DA
parameters at start; a power cycle over the control channel resets the PCRs but keeps
the seeds, so tokens sealed earlier stay valid.
"""

import os
import shutil
import socket
import subprocess
import time
from typing import Dict, Iterator, List, Sequence

import pytest

REQUIRED_TOOLS = ("swtpm", "swtpm_ioctl", "tpm2_startup", "tpm2_dictionarylockout", "tpm2_shutdown",
                  "tpm2_pcrextend", "tpm2_pcrread", "tpm2_flushcontext")


def missing_tools(tools: Sequence[str]) -> List[str]:
    return [t for t in tools if shutil.which(t) is None]


def free_port_pair() -> int:
    """A free loopback port P with P+1 also free: libtss2's swtpm TCTI always talks to
    the control channel on P+1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free pair of loopback ports")


class Swtpm:
    """One swtpm process over a state directory; PCRs can be reset, seeds persist."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.port = 0
        self.ctrl_port = 0
        self.process = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def tool(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([argv[0], "-T", self.tcti, *argv[1:]], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, timeout=60)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(result.args)} exited {result.returncode}: {result.stderr}")
        return result

    def start(self) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        for _ in range(5):
            self.port = free_port_pair()
            self.ctrl_port = self.port + 1
            self.process = subprocess.Popen(
                ["swtpm", "socket", "--tpm2",
                 "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={self.ctrl_port},bindaddr=127.0.0.1",
                 "--tpmstate", f"dir={self.state_dir}", "--flags", "not-need-init,startup-clear"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._wait_listening():
                break
            self.process.kill()
            self.process.wait()
        else:
            raise RuntimeError("swtpm did not start on any free port")
        self.tool("tpm2_dictionarylockout", "--clear-lockout")
        self.tool("tpm2_dictionarylockout", "--setup-parameters", "--max-tries=1000",
                  "--recovery-time=0", "--lockout-recovery-time=0")

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def power_cycle(self) -> None:
        """Reset all PCRs (a reboot) while keeping the seeds."""
        self.tool("tpm2_shutdown", "-c")
        subprocess.run(["swtpm_ioctl", "--tcp", f"127.0.0.1:{self.ctrl_port}", "-i"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
        self.tool("tpm2_startup", "-c")

    def flush_all(self) -> None:
        """Flush leftover transient objects and sessions (systemd 252 leaks a session per unseal)."""
        for kind in ("-t", "-l", "-s"):
            self.tool("tpm2_flushcontext", kind, check=False)

    def extend(self, pcr: int, sha256_digest: bytes) -> None:
        self.tool("tpm2_pcrextend", f"{pcr}:sha256={sha256_digest.hex()}")

    def extend_banks(self, pcr: int, digests: Dict[str, bytes]) -> None:
        """One event into several banks at once (as firmware does)."""
        self.tool("tpm2_pcrextend", f"{pcr}:" + ",".join(f"{bank}={d.hex()}" for bank, d in sorted(digests.items())))

    def read_sha256(self, pcrs: Sequence[int]) -> Dict[int, bytes]:
        out = self.tool("tpm2_pcrread", "sha256:" + ",".join(str(p) for p in pcrs)).stdout
        values: Dict[int, bytes] = {}
        for line in out.splitlines():
            name, _, value = line.strip().partition(":")
            if value.strip().startswith("0x"):
                values[int(name)] = bytes.fromhex(value.strip()[2:])
        return values

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.tool("tpm2_shutdown", "-c", check=False)
            subprocess.run(["swtpm_ioctl", "--tcp", f"127.0.0.1:{self.ctrl_port}", "-s"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory) -> Iterator[Swtpm]:
    """One swtpm for the whole session.  Tests that need known PCRs use fresh_swtpm."""
    missing = missing_tools(REQUIRED_TOOLS)
    if missing:
        pytest.skip(f"swtpm/tpm2-tools not installed: {', '.join(missing)}")
    tpm = Swtpm(str(tmp_path_factory.mktemp("swtpm-state")))
    tpm.start()
    try:
        yield tpm
    finally:
        tpm.stop()


@pytest.fixture
def fresh_swtpm(swtpm: Swtpm) -> Swtpm:
    """The session swtpm after a power cycle: all PCRs at their reset value, no handles."""
    swtpm.power_cycle()
    return swtpm


# --- LUKS2 image files (no device-mapper needed for header work) ---

TEST_PASSPHRASE = b"rhel-cvm-update test passphrase"


def cryptsetup(*argv: str, input_bytes: bytes = b"", check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["cryptsetup", *argv], input=input_bytes, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=120)
    if check and result.returncode:
        raise RuntimeError(f"cryptsetup {' '.join(argv)} exited {result.returncode}: {result.stderr.decode()}")
    return result


def make_luks2_image(path: str, *extra: str, luks_type: str = "luks2") -> str:
    """A 20 MiB LUKS image with TEST_PASSPHRASE in keyslot 0 and a fast PBKDF."""
    with open(path, "wb") as f:
        f.truncate(20 * 1024 * 1024)
    pbkdf = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"] if luks_type == "luks2" else \
        ["--iter-time", "1"]
    cryptsetup("luksFormat", "-q", "--type", luks_type, *pbkdf, *extra, "--key-file=-", path,
               input_bytes=TEST_PASSPHRASE)
    return path


def header_bytes(path: str) -> bytes:
    """The whole LUKS2 header (both JSON copies + keyslot area) via luksHeaderBackup,
    for byte-identical comparisons before and after a refused operation."""
    backup = path + ".hdr"
    if os.path.exists(backup):
        os.unlink(backup)
    cryptsetup("luksHeaderBackup", "--header-backup-file", backup, path)
    with open(backup, "rb") as f:
        data = f.read()
    os.unlink(backup)
    return data


def import_token_raw(image: str, token: dict, token_id: int) -> None:
    """Import a token bypassing the systemd plugin's validator, as a hostile header would."""
    import json
    cryptsetup("token", "import", "--disable-external-tokens", "--json-file", "-", "--token-id", str(token_id),
               image, input_bytes=json.dumps(token).encode())


@pytest.fixture(scope="session")
def luks2_template(tmp_path_factory) -> str:
    if missing_tools(["cryptsetup"]):
        pytest.skip("cryptsetup not installed")
    return make_luks2_image(str(tmp_path_factory.mktemp("luks") / "template.img"))


@pytest.fixture
def luks2_image(luks2_template, tmp_path) -> str:
    """A private copy of a fresh LUKS2 image (copying is much cheaper than luksFormat)."""
    path = str(tmp_path / "disk.img")
    shutil.copyfile(luks2_template, path)
    return path


# --- Letting systemd's cryptsetup token plugin reach swtpm ---
#
# libcryptsetup-token-systemd-tpm2.so ignores TCTI strings and environment variables: it
# only uses a TPM found under /sys/class/tpmrm and /dev/tpmrm0.  A raw pseudo-terminal
# relayed to swtpm's TCP port stands in for /dev/tpmrm0 inside a private mount namespace
# (`unshare -m`), where a tmpfs copy of /sys/class gains a tpmrm/tpmrm0 directory and a
# tmpfs copy of /dev gains tpmrm0 bind-mounted from the pty.  Nothing changes outside it.

TPM_HEADER_SIZE = 10  # tag u16, size u32, code u32 (big-endian)

_NAMESPACE_SCRIPT = r'''
set -eu
pty=$1; work=$2; shift 2
mkdir -p "$work/class" "$work/dev"
mount -t tmpfs none "$work/class"
for e in /sys/class/*; do n=${e##*/}; mkdir "$work/class/$n"; mount --rbind "$e" "$work/class/$n"; done
mkdir -p "$work/class/tpmrm/tpmrm0"
mount --rbind "$work/class" /sys/class
mount -t tmpfs none "$work/dev"
for e in /dev/*; do
  n=${e##*/}
  if [ -L "$e" ]; then cp -P "$e" "$work/dev/$n"
  elif [ -d "$e" ]; then mkdir "$work/dev/$n"; mount --rbind "$e" "$work/dev/$n"
  else touch "$work/dev/$n"; mount --bind "$e" "$work/dev/$n"; fi
done
touch "$work/dev/tpmrm0"
mount --bind "$pty" "$work/dev/tpmrm0"
mount --rbind "$work/dev" /dev
exec "$@"
'''


class PtyTpmRelay:
    """Relays TPM commands written to a raw pty to swtpm's TCP port, one command at a time."""

    def __init__(self, swtpm: Swtpm):
        self.swtpm = swtpm
        self.master = self.slave = -1
        self.path = ""
        self._stop = False
        self._thread = None
        self.commands = 0

    def __enter__(self) -> "PtyTpmRelay":
        import pty
        import threading
        import tty
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self._thread = threading.Thread(target=self._loop, name="pty-tpm-relay", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1

    def _read_exact(self, read, size: int) -> bytes:
        data = b""
        while len(data) < size and not self._stop:
            chunk = read(size - len(data))
            if chunk is None:
                continue
            if not chunk:
                raise EOFError("relay peer closed")
            data += chunk
        return data

    def _read_master(self, size: int):
        import select
        ready, _, _ = select.select([self.master], [], [], 0.1)
        return os.read(self.master, size) if ready else None

    def _loop(self) -> None:
        import struct
        while not self._stop:
            try:
                header = self._read_exact(self._read_master, TPM_HEADER_SIZE)
                if self._stop:
                    return
                (size,) = struct.unpack_from(">I", header, 2)
                command = header + self._read_exact(self._read_master, size - TPM_HEADER_SIZE)
                with socket.create_connection(("127.0.0.1", self.swtpm.port), timeout=30) as conn:
                    conn.sendall(command)
                    reply_header = self._read_exact(conn.recv, TPM_HEADER_SIZE)
                    (reply_size,) = struct.unpack_from(">I", reply_header, 2)
                    reply = reply_header + self._read_exact(conn.recv, reply_size - TPM_HEADER_SIZE)
                os.write(self.master, reply)
                self.commands += 1
            except (OSError, EOFError):
                if self._stop:
                    return
                time.sleep(0.05)

    def run(self, argv: Sequence[str], work_dir: str, input_bytes: bytes = b"") -> subprocess.CompletedProcess:
        """Run argv in a private mount namespace where /dev/tpmrm0 is this relay."""
        return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", _NAMESPACE_SCRIPT,
                               "sh", self.path, work_dir, *argv], input=input_bytes,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
