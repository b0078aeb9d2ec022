"""Run the e2e guest: QEMU (TCG) + OVMF + swtpm, a qcow2 overlay over the cached image, the agent.

One ``GuestVm`` is one machine: its disk overlay, its UEFI variable store and its TPM state
persist across boots.  Reboots inside the guest are real resets of the same QEMU process (QEMU
resets the TPM with it); ``power_cut`` kills QEMU and ``start`` powers the machine on again with
the same disk, variables and TPM state.  Every boot is counted and timed for the scenario table.
"""

import json
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tests import realbins
from tests.vm import capture
from tests.vm.guest.image import AGENT_PORT, GuestImage

BOOT_TIMEOUT_SECONDS = 420
MEMORY_MIB = 1024
# What systemd-cryptsetup's console agent prints when no token unlocks a volume (systemd 252).
PASSPHRASE_PROMPT = "Please enter passphrase for disk"


class GuestError(AssertionError):
    """The guest did not do what the scenario needs (an assertion, so pytest shows it as a failure)."""


class PassphraseAsked(GuestError):
    """The boot stopped at a passphrase prompt on the console: no token unlocked the volume."""


@dataclass
class RunResult:
    argv: List[str]
    rc: int
    stdout: str
    stderr: str

    def check(self) -> "RunResult":
        if self.rc != 0:
            raise GuestError("guest: %r exited %d\nstdout: %s\nstderr: %s"
                             % (self.argv, self.rc, self.stdout[-4000:], self.stderr[-4000:]))
        return self

    def json(self):
        return json.loads(self.stdout)


@dataclass
class BootRecord:
    boot_id: str
    seconds: float       # from reset or power-on to the agent's first reply


@dataclass
class GuestVm:
    image: GuestImage
    work: Path
    secure_boot: bool
    boots: List[BootRecord] = field(default_factory=list)
    serial_logs: List[Path] = field(default_factory=list)
    _qemu: Optional[subprocess.Popen] = None
    _swtpm: Optional[subprocess.Popen] = None
    _agent: Optional[socket.socket] = None
    _pending: bytes = b""
    _next_id: int = 1
    _serial_mark: Tuple[Path, int] = (Path("/nonexistent"), 0)   # console log and offset where this boot began
    _sockets: Optional[Path] = None   # a short directory for the UNIX sockets (see _socket)

    # -- machine --------------------------------------------------------------------------

    @classmethod
    def create(cls, image: GuestImage, work: Path, secure_boot: bool,
               disk: Optional[Path] = None, vars_file: Optional[Path] = None,
               tpm_state: Optional[Path] = None) -> "GuestVm":
        """A new machine over the image (or over a saved machine's disk, vars and TPM state)."""
        work.mkdir(parents=True, exist_ok=True)
        realbins.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw" if disk is None else "qcow2",
                      "-b", str(disk or image.disk), str(work / "disk.qcow2")])
        shutil.copyfile(vars_file or (image.vars_sb_on if secure_boot else image.vars_sb_off), work / "vars.fd")
        if tpm_state is not None:
            shutil.copytree(tpm_state, work / "tpm")
        else:
            init_tpm(work / "tpm")
        return cls(image=image, work=work, secure_boot=secure_boot)

    def start(self, wait: bool = True) -> None:
        """Power on: swtpm, QEMU, agent connection; waits for the first boot unless ``wait`` is False."""
        if self._qemu is not None:
            raise GuestError("already running")
        sock = self._socket("swtpm.sock")
        sock.unlink(missing_ok=True)
        self._swtpm = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", "dir=" + str(self.work / "tpm"),
             "--ctrl", "type=unixio,path=" + str(sock), "--terminate",
             "--log", "file=%s,level=1" % (self.work / "swtpm.log")])
        wait_for(sock.exists, 10, "swtpm did not create its socket")
        agent_sock = self._socket("agent.sock")
        agent_sock.unlink(missing_ok=True)
        self._console_socket.unlink(missing_ok=True)
        serial = self.work / ("serial-%d.log" % (len(self.serial_logs) + 1))
        self.serial_logs.append(serial)
        code = capture.OVMF_DIR / ("OVMF_CODE_4M.secboot.fd" if self.secure_boot else "OVMF_CODE_4M.fd")
        argv = ["qemu-system-x86_64", "-machine", "q35,smm=on" if self.secure_boot else "q35",
                "-accel", "tcg", "-m", str(MEMORY_MIB), "-smp", "1", "-nodefaults", "-display", "none",
                "-net", "none",
                # The console is a socket (to answer a passphrase prompt) logged to a file.
                "-chardev", "socket,id=console,path=%s,server=on,wait=off,logfile=%s" % (self._console_socket, serial),
                "-serial", "chardev:console",
                "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=" + str(code),
                "-drive", "if=pflash,format=raw,unit=1,file=" + str(self.work / "vars.fd"),
                "-drive", "if=none,id=disk,format=qcow2,file=" + str(self.work / "disk.qcow2"),
                "-device", "virtio-blk-pci,drive=disk,addr=04.0",
                "-chardev", "socket,id=chrtpm,path=" + str(sock),
                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0",
                "-device", "virtio-serial-pci,addr=05.0",
                "-chardev", "socket,id=agent,path=%s,server=on,wait=off" % agent_sock,
                "-device", "virtserialport,chardev=agent,name=" + AGENT_PORT]
        if self.secure_boot:
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
        self._qemu = subprocess.Popen(argv, stdout=open(self.work / "qemu.log", "ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: agent_sock.exists() or not self.running(), 30, "QEMU did not create the agent socket")
        if not agent_sock.exists():
            raise GuestError("QEMU exited at start: %s" % (self.work / "qemu.log").read_text(errors="replace")[-2000:])
        self._agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._agent.connect(str(agent_sock))
        self._pending = b""
        self._serial_mark = (serial, 0)
        if wait:
            self.wait_boot(None)

    @property
    def _console_socket(self) -> Path:
        return self._socket("console.sock")

    def _socket(self, name: str) -> Path:
        """A UNIX socket's path.  Not under ``work``: sun_path holds 107 bytes, and a cache
        directory in a deep checkout (CI's /check/work/main/cache/guest/...) exceeds it."""
        if self._sockets is None:
            self._sockets = Path(tempfile.mkdtemp(prefix="guestvm-", dir="/tmp"))
        return self._sockets / name

    def console_since_boot(self) -> str:
        """What the console printed since this boot began (power-on, reboot) or was last answered."""
        log, offset = self._serial_mark
        if not log.exists():
            return ""
        with open(log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def _mark_boot(self) -> None:
        log = self.serial_logs[-1]
        self._serial_mark = (log, log.stat().st_size if log.exists() else 0)

    def wait_console(self, text: str, timeout: float = BOOT_TIMEOUT_SECONDS) -> None:
        """Wait until the console of this boot shows ``text``."""
        wait_for(lambda: text in self.console_since_boot() or not self.running(), timeout,
                 "the console did not show %r within %d s; serial: %s" % (text, timeout, self.serial_tail()))
        if text not in self.console_since_boot():
            raise GuestError("QEMU exited before the console showed %r; serial: %s" % (text, self.serial_tail()))

    def type_on_console(self, line: str) -> None:
        """Type a line on the serial console (as an admin answering a prompt), then hang up, so
        that QEMU never blocks on console output nobody reads."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as console:
            console.connect(str(self._console_socket))
            # One character at a time: the emulated 16550 has a 16-byte FIFO and no flow
            # control, so a TCG guest busy elsewhere drops what arrives faster.
            for char in line.encode() + b"\n":
                console.sendall(bytes([char]))
                time.sleep(0.05)
        # The prompt is answered: a later one means this answer was refused.
        self._mark_boot()

    def running(self) -> bool:
        return self._qemu is not None and self._qemu.poll() is None

    def power_cut(self) -> None:
        """Pull the plug: SIGKILL QEMU (no shutdown of the guest, its page cache or the TPM)."""
        if self._qemu is not None:
            self._qemu.kill()
            self._qemu.wait()
        self._stopped()

    def poweroff(self) -> None:
        self.send({"op": "run", "argv": ["systemctl", "poweroff"], "timeout": 30})
        try:
            self._qemu.wait(timeout=BOOT_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._qemu.kill()
            self._qemu.wait()
            raise GuestError("the guest did not power off within %d s" % BOOT_TIMEOUT_SECONDS)
        finally:
            self._stopped()

    def _stopped(self) -> None:
        self._qemu = None
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._swtpm is not None:
            try:
                self._swtpm.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._swtpm.kill()
                self._swtpm.wait()
            self._swtpm = None

    def close(self) -> None:
        if self.running():
            self.power_cut()
        self._stopped()
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)
            self._sockets = None

    # -- boots ----------------------------------------------------------------------------

    @property
    def boot_id(self) -> str:
        return self.boots[-1].boot_id

    def wait_boot(self, previous: Optional[str], timeout: float = BOOT_TIMEOUT_SECONDS) -> BootRecord:
        """Ping until a boot other than ``previous`` answers, then until systemd finished booting."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if not self.running():
                raise GuestError("QEMU exited while waiting for a boot; serial: %s" % self.serial_tail())
            if time.monotonic() > deadline:
                raise GuestError("no new boot within %d s; serial: %s" % (timeout, self.serial_tail()))
            if PASSPHRASE_PROMPT in self.console_since_boot():
                raise PassphraseAsked("the boot asks for a passphrase: no token unlocked the volume; serial: %s"
                                      % self.serial_tail())
            reply = self.request({"op": "ping"}, timeout=3, expect_boot=None)
            if reply is not None and reply["boot_id"] != previous:
                break
        record = BootRecord(reply["boot_id"], 0.0)
        self.boots.append(record)
        # is-system-running --wait returns once the boot transaction is done (running or degraded).
        self.run(["systemctl", "is-system-running", "--wait"], timeout=max(30, deadline - time.monotonic()))
        record.seconds = round(time.monotonic() - started, 1)
        return record

    def reboot(self, wait: bool = True) -> Optional[BootRecord]:
        previous = self.boot_id
        self._mark_boot()
        self.send({"op": "run", "argv": ["systemctl", "reboot"], "timeout": 30})
        return self.wait_boot(previous) if wait else None

    def expect_reset(self, previous: str, timeout: float = BOOT_TIMEOUT_SECONDS) -> BootRecord:
        """Wait for the machine to come back by itself (a panicking kernel resets it)."""
        return self.wait_boot(previous, timeout)

    # -- agent ----------------------------------------------------------------------------

    def send(self, request: Dict[str, object]) -> int:
        request = dict(request, id=self._next_id)
        self._next_id += 1
        self._agent.sendall(json.dumps(request).encode() + b"\n")
        return request["id"]

    def request(self, request: Dict[str, object], timeout: float,
                expect_boot: Optional[str]) -> Optional[Dict[str, object]]:
        """Send and wait for the reply with the same id (None on timeout)."""
        wanted = self.send(request)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\n" in self._pending:
                line, self._pending = self._pending.split(b"\n", 1)
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue
                if isinstance(reply, dict) and reply.get("id") == wanted:
                    if expect_boot is not None and reply.get("boot_id") != expect_boot:
                        raise GuestError("the guest rebooted during %r" % (request,))
                    return reply
            self._agent.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = self._agent.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                raise GuestError("QEMU closed the agent channel; serial: %s" % self.serial_tail())
            self._pending += chunk
        return None

    def run(self, argv: Sequence[str], timeout: float = 120, env: Optional[Dict[str, str]] = None,
            stdin: str = "") -> RunResult:
        argv = [str(a) for a in argv]
        reply = self.request({"op": "run", "argv": argv, "env": env or {}, "timeout": timeout, "stdin": stdin},
                             timeout=timeout + 15, expect_boot=self.boots[-1].boot_id if self.boots else None)
        if reply is None:
            raise GuestError("no reply to %r within %d s; serial: %s" % (argv, timeout + 15, self.serial_tail()))
        if "error" in reply:
            raise GuestError("agent: %s" % reply["error"])
        return RunResult(argv, reply["rc"], reply["stdout"], reply["stderr"])

    def check(self, argv: Sequence[str], **kwargs) -> RunResult:
        return self.run(argv, **kwargs).check()

    def firmware_boots(self) -> int:
        """How many times the firmware started a boot option, counted in the serial logs
        (a kernel that panics and resets never talks to the agent but is counted here)."""
        return sum(log.read_text(errors="replace").count("BdsDxe: starting Boot")
                   for log in self.serial_logs if log.exists())

    def serial_text(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.serial_logs if log.exists())

    def serial_tail(self, lines: int = 40) -> str:
        if not self.serial_logs or not self.serial_logs[-1].exists():
            return "(no serial log)"
        text = self.serial_logs[-1].read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def wait_for(predicate, seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise GuestError(message)
        time.sleep(0.05)


def init_tpm(state: Path) -> None:
    """A fresh swtpm state with sha1+sha256 banks and a lenient dictionary-attack policy.

    Power cuts and panics are unorderly TPM shutdowns; libtpms counts each as a failed try and
    locks DA-protected objects (systemd 252's sealed key is one) after three.  A real vTPM's
    policy is the platform's business; the scenarios need the same TPM through many power cuts.
    """
    state.mkdir(parents=True)
    realbins.run(["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--pcr-banks", "sha1,sha256", "--overwrite"])
    for _ in range(5):
        port = random.randrange(20000, 32000, 2)
        proc = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", "dir=" + str(state),
                                 "--server", "type=tcp,port=%d,bindaddr=127.0.0.1" % port,
                                 "--ctrl", "type=tcp,port=%d,bindaddr=127.0.0.1" % (port + 1),
                                 "--flags", "not-need-init,startup-clear"], stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: proc.poll() is not None or port_open(port), 10, "swtpm did not listen on %d" % port)
            if proc.poll() is not None:
                continue  # the port was taken: try another
            tcti = "swtpm:host=127.0.0.1,port=%d" % port
            realbins.run(["tpm2_dictionarylockout", "-T", tcti, "--setup-parameters", "--max-tries=1000",
                          "--recovery-time=0", "--lockout-recovery-time=0"])
            realbins.run(["tpm2_dictionarylockout", "-T", tcti, "--clear-lockout"])
            realbins.run(["tpm2_shutdown", "-T", tcti])
            return
        finally:
            subprocess.run(["swtpm_ioctl", "--tcp", "127.0.0.1:%d" % (port + 1), "-s"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    raise GuestError("swtpm found no free TCP port pair")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
