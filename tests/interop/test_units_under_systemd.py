"""Our units under a real systemd 252 service manager, on the sandbox CVM.

This machine's PID 1 is not systemd, but systemd 252 runs here as a *user* manager
(``systemd --user``, as root) inside a private mount namespace that has its own /run (a
tmpfs, as on any systemd machine: MountAPIVFS=, implied by ProtectProc= and
ProtectControlGroups=, would otherwise put an empty tmpfs over a /run that is not a mount
point and hide the journal socket), the system/ marker directory the manager looks for,
and its own systemd-journald.  The manager starts services exactly as PID 1 would: it sets
$NOTIFY_SOCKET, $INVOCATION_ID and $JOURNAL_STREAM, connects stdout/stderr to the journal,
applies the sandboxing it can, follows PathChanged= and the trigger limits.  The first
test also runs the system's dbus-daemon (its own configuration, on the namespace's
/run/dbus/system_bus_socket) and systemd-logind, so the service's shutdown inhibitor is
taken from the real logind over the system bus.

The units are the shipped files with only these substitutions (UNIT_SUBSTITUTIONS):
/boot/efi and the state directory become the sandbox's; ExecStart= runs this checkout
with the sandbox's config; the network lines go because the sandbox's vTPM is swtpm on a
TCP port (a real VM has /dev/tpmrm0); PrivateTmp= goes because the sandbox lives under
/tmp; the device lines go because the sandbox's "devices" are files and a user manager
has no device cgroup to enforce them; ConditionPathIsDirectory= names the sandbox's
efivars copy; ProtectKernelTunables=, ProtectKernelLogs= and ProtectHome= go because this
container refuses the mounts they need (each alone fails the start with 226/NAMESPACE; the
Python here also lives under /root).  Everything else in the sandbox -- ProtectSystem=strict
with ReadWritePaths=, the capability bounding set, NoNewPrivileges=, the system-call filter,
the namespace and personality restrictions -- is applied by the manager during the run.  What is checked: a UKI dropped into the ESP starts the service once; its
sd_notify READY/STATUS/STOPPING are accepted (Type=notify ends "success"); its journal
entries carry the MESSAGE_IDs and fields; and the confirm unit's BOOTX64.CSV rewrite wakes
the path unit for exactly one more, idle, update run -- no loop, and the path unit is
still waiting (not failed) at the end.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rhel_cvm_update.adapters import systemd as systemd_adapter

pytestmark = [pytest.mark.swtpm, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = "/lib/systemd/systemd"
JOURNALD = "/lib/systemd/systemd-journald"
LOGIND = "/lib/systemd/systemd-logind"
CGROUP_ROOTS = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")
JOURNALD_CONF = "[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToSyslog=no\nForwardToWall=no\n"

MANAGER_SCRIPT = r'''
set -eu
conf=$1; with_logind=$2; shift 2
mount -t tmpfs none /run
mkdir -p /run/systemd/system /run/log
mount --bind "$conf" /etc/systemd/journald.conf
env -u NOTIFY_SOCKET /lib/systemd/systemd-journald &
i=0
while [ ! -S /run/systemd/journal/socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if [ "$with_logind" = yes ]; then
  mkdir -p /run/dbus
  dbus-daemon --system --nofork --nopidfile --nosyslog &
  i=0
  while [ ! -S /run/dbus/system_bus_socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  env -u NOTIFY_SOCKET SYSTEMD_LOG_LEVEL=debug SYSTEMD_LOG_TARGET=journal /lib/systemd/systemd-logind &
fi
for cg in "$@"; do mkdir -p "$cg"; echo $$ > "$cg/cgroup.procs"; done
exec /lib/systemd/systemd --user --log-level=info --log-target=journal
'''

DROPPED = re.compile(r"^(PrivateNetwork|IPAddressDeny|RestrictAddressFamilies|PrivateTmp|PrivateDevices|"
                     r"DevicePolicy|DeviceAllow|ConditionPathIsDirectory|StateDirectory\w*|"
                     r"ProtectKernelTunables|ProtectKernelLogs|ProtectHome)=")


def unit_substitutions(unit_text: str, cvm, python: str) -> str:
    """The shipped unit with the sandbox's paths (see the module docstring)."""
    lines = []
    for line in unit_text.splitlines():
        if DROPPED.match(line):
            continue
        line = line.replace("/boot/efi", str(cvm.esp)).replace("/var/lib/rhel-cvm-update", str(cvm.state_dir))
        line = line.replace("/sys/firmware/efi/efivars", str(cvm.efivars))
        if line.startswith("ReadWritePaths="):
            line += f" {cvm.root}"
        line = re.sub(r"^ExecStart=/usr/bin/rhel-cvm-update ",
                      f"ExecStart={python} -m rhel_cvm_update --config {cvm.config_path} ", line)
        lines.append(line)
        if line == "[Service]":
            lines.append(f"Environment=PYTHONPATH={REPO}")
            lines.append(f"WorkingDirectory={REPO}")
    return "\n".join(lines) + "\n"


class ScratchManager:
    def __init__(self, work: Path, with_logind: bool = False):
        self.work = work
        self.with_logind = with_logind
        self.runtime = work / "runtime"
        self.config_home = work / "config"
        self.units = self.config_home / "systemd" / "user"
        self.cgroups = [f"{root}/rhel-cvm-update-test-{uuid.uuid4().hex[:8]}" for root in CGROUP_ROOTS
                        if os.path.isdir(root)]
        self.proc = None
        self.log = None

    def env(self):
        return dict(os.environ, XDG_RUNTIME_DIR=str(self.runtime), XDG_CONFIG_HOME=str(self.config_home),
                    HOME=str(self.work), SYSTEMD_LOG_TARGET="console")

    def start(self):
        self.work.mkdir(parents=True, exist_ok=True)
        self.runtime.mkdir(mode=0o700)
        self.units.mkdir(parents=True)
        conf = self.work / "journald.conf"
        conf.write_text(JOURNALD_CONF)
        env = {k: v for k, v in self.env().items() if k not in ("NOTIFY_SOCKET", "INVOCATION_ID", "JOURNAL_STREAM")}
        self.log = open(self.work / "manager.log", "wb")
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", MANAGER_SCRIPT, "sh",
                                      str(conf), "yes" if self.with_logind else "no", *self.cgroups], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not (self.runtime / "systemd" / "private").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("systemd --user did not start: " + (self.work / "manager.log").read_text())
            time.sleep(0.1)

    def systemctl(self, *argv, check=True):
        result = subprocess.run(["systemctl", "--user", "--no-pager", *argv], env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=120)
        if check and result.returncode:
            raise RuntimeError(f"systemctl {' '.join(argv)}: {result.stderr.decode()}")
        return result.stdout.decode()

    def show(self, unit, *props):
        out = self.systemctl("show", unit, "-p", ",".join(props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self):
        out = subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "journalctl", "-D", "/run/log/journal",
                              "-o", "json", "--no-pager"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             timeout=60).stdout.decode()
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.systemctl("exit", check=False)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
        for cgroup in self.cgroups:
            for dirpath, _, _ in sorted(os.walk(cgroup), key=lambda w: -w[0].count("/")):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass


def require_scratch_manager(tools):
    """Skip unless systemd, journald, ``tools`` and a cgroup hierarchy are here."""
    for tool in (SYSTEMD, JOURNALD):
        if not os.path.exists(tool):
            pytest.skip(f"{tool} is not installed")
    if not all(shutil.which(t) for t in tools) or not any(os.path.isdir(r) for r in CGROUP_ROOTS):
        pytest.skip(f"{', '.join(tools)} or a cgroup hierarchy is missing")


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_path_unit_starts_the_service_once_per_change_and_never_loops(tmp_path):
    require_scratch_manager(("unshare", "nsenter", "systemctl"))
    if not os.path.exists(LOGIND) or shutil.which("dbus-daemon") is None:
        pytest.skip("systemd-logind or dbus-daemon is not installed")
    sandbox = pytest.importorskip("tests.sandbox")
    cvm = sandbox.Sandbox(tmp_path / "cvm")
    manager = ScratchManager(tmp_path / "manager", with_logind=True)
    try:
        try:
            cvm.build()
        except sandbox.SandboxUnavailable as e:
            pytest.skip(str(e))
        manager.start()
        for name in ("rhel-cvm-update.path", "rhel-cvm-update.service", "rhel-cvm-update-confirm.service"):
            text = unit_substitutions((REPO / "systemd" / name).read_text(), cvm, sys.executable)
            (manager.units / name).write_text(text.replace("--settle 10", "--settle 1"))
        manager.systemctl("daemon-reload")
        manager.systemctl("start", "rhel-cvm-update.path")
        assert manager.show("rhel-cvm-update.path", "SubState")["SubState"] == "waiting"

        uki_b = cvm.install_uki("b")  # dnf drops the new kernel
        service = "rhel-cvm-update.service"
        wait_until(lambda: manager.show(service, "ActiveState")["ActiveState"] == "active", 30, "the service to start")
        wait_until(lambda: manager.show(service, "ActiveState")["ActiveState"] == "inactive", 120, "the update to end")
        first = manager.show(service, "Result", "ExecMainStatus", "InvocationID", "ExecMainPID")
        assert (first["Result"], first["ExecMainStatus"]) == ("success", "0"), (manager.work / "manager.log").read_text()
        time.sleep(3)  # long enough for a retrigger to show
        assert manager.show(service, "InvocationID")["InvocationID"] == first["InvocationID"], "update retriggered itself"
        assert manager.show("rhel-cvm-update.path", "SubState")["SubState"] == "waiting"

        entries = [e for e in manager.journal() if e.get("SYSLOG_IDENTIFIER") == "rhel-cvm-update"]
        staged = [e for e in entries if e.get("MESSAGE_ID") == systemd_adapter.OUTCOMES["staged"].message_id]
        assert len(staged) == 1, json.dumps(entries, indent=1)
        assert staged[0]["UKI"] == str(uki_b) and staged[0]["_TRANSPORT"] == "journal"
        # journald cannot name the unit (the scratch manager's cgroup is not under user.slice);
        # the entry's sender is the service's main process
        assert staged[0]["_PID"] == first["ExecMainPID"]
        # the real logind on the namespace's system bus held our block inhibitor while sealing
        # (logind logs inhibitors at debug level)
        logind = [e.get("MESSAGE") for e in manager.journal() if e.get("SYSLOG_IDENTIFIER") == "systemd-logind"]
        held = (f"Inhibitor rhel-cvm-update (sealing the disk key for the new kernel) pid={first['ExecMainPID']} "
                "uid=0 mode=block ")
        assert held + "started." in logind and held + "stopped." in logind, logind
        assert not [e for e in entries if "shutdown not inhibited" in e.get("MESSAGE", "")]
        assert [e for e in entries if e.get("MESSAGE") == "shutdown inhibited while sealing"]
        expected = sandbox.captured_pcrs("sb-off-uki-b")
        assert (staged[0]["PCR4"], staged[0]["PCR7"]) == (expected[4].hex(), expected[7].hex())

        # SIMULATED FIRMWARE reboot into B, then the confirm unit (which rewrites BOOTX64.CSV
        # in the watched shim directory)
        cvm.simulate_reboot()
        manager.systemctl("start", "rhel-cvm-update-confirm.service")
        confirm = manager.show("rhel-cvm-update-confirm.service", "Result", "ExecMainStatus")
        assert (confirm["Result"], confirm["ExecMainStatus"]) == ("success", "0")
        wait_until(lambda: manager.show(service, "InvocationID")["InvocationID"] != first["InvocationID"], 30,
                   "the CSV rewrite to wake the path unit")
        wait_until(lambda: manager.show(service, "ActiveState")["ActiveState"] == "inactive", 120, "the idle update")
        second = manager.show(service, "Result", "InvocationID")
        assert second["Result"] == "success"
        time.sleep(4)
        assert manager.show(service, "InvocationID")["InvocationID"] == second["InvocationID"], "update loops"
        assert manager.show("rhel-cvm-update.path", "SubState", "Result") == {"SubState": "waiting", "Result": "success"}

        entries = [e for e in manager.journal() if e.get("SYSLOG_IDENTIFIER") == "rhel-cvm-update"]
        outcomes = [(e["OUTCOME"], e.get("COMMAND")) for e in entries if "OUTCOME" in e]
        assert outcomes == [("staged", None), ("confirmed", "confirm"), ("nothing-to-do", "update")], outcomes
    finally:
        manager.stop()
        cvm.close()


@pytest.mark.parametrize("back_off", [True, False])
def test_a_failing_service_under_a_storm_of_changes_does_not_wedge_the_path_unit(tmp_path, back_off):
    """A broken config makes every run fail at once while files keep changing in the watched
    shim directory.  As shipped (the service's ExecStopPost= back-off holds a failed run for
    10 s) the path unit keeps waiting and, once the config is fixed, the next kernel drop is
    handled.  The control run without the back-off shows what it prevents: the path unit's
    trigger limit trips and it fails and stops watching."""
    require_scratch_manager(("unshare", "nsenter", "systemctl"))
    sandbox = pytest.importorskip("tests.sandbox")
    cvm = sandbox.Sandbox(tmp_path / "cvm")
    manager = ScratchManager(tmp_path / "manager")
    try:
        try:
            cvm.build()
        except sandbox.SandboxUnavailable as e:
            pytest.skip(str(e))
        live_config = cvm.root / "live-config.yaml"
        live_config.write_text("bogus_key: 1\n")
        manager.start()
        for name in ("rhel-cvm-update.path", "rhel-cvm-update.service"):
            text = unit_substitutions((REPO / "systemd" / name).read_text(), cvm, sys.executable)
            text = text.replace(str(cvm.config_path), str(live_config)).replace("--settle 10", "--settle 1")
            if not back_off:
                text = re.sub(r"^ExecStopPost=.*\n", "", text, flags=re.M)
            (manager.units / name).write_text(text)
        manager.systemctl("daemon-reload")
        manager.systemctl("start", "rhel-cvm-update.path")
        service = "rhel-cvm-update.service"
        shim_dir = cvm.shim.parent
        for i in range(40):
            (shim_dir / f"storm-{i}.txt").write_text("x")
            time.sleep(0.35)
        time.sleep(2)
        failed = manager.show(service, "Result")["Result"]
        path_state = manager.show("rhel-cvm-update.path", "ActiveState", "Result")
        failures = sum("unknown key" in (e.get("MESSAGE") or "") for e in manager.journal())
        if not back_off:
            assert path_state == {"ActiveState": "failed", "Result": "trigger-limit-hit"}, (path_state, failures)
            return
        assert failed == "exit-code" and 1 <= failures <= 3, failures
        assert path_state == {"ActiveState": "active", "Result": "success"}, path_state
        # changes made while a run (or its back-off) is active are not seen: wait it out
        wait_until(lambda: manager.show(service, "ActiveState")["ActiveState"] in ("inactive", "failed"), 60,
                   "the back-off to end")
        before = manager.show(service, "InvocationID")["InvocationID"]
        shutil.copyfile(cvm.config_path, live_config)
        cvm.install_uki("b")
        wait_until(lambda: manager.show(service, "InvocationID")["InvocationID"] != before, 30, "a new run")
        wait_until(lambda: manager.show(service, "ActiveState")["ActiveState"] in ("inactive", "failed"), 120,
                   "the update to end")
        assert manager.show(service, "Result", "StatusText")["Result"] == "success"
        assert "staged" in json.loads((cvm.state_dir / "last-result.json").read_text())["outcome"]
    finally:
        manager.stop()
        cvm.close()


def test_stopping_the_service_is_not_delayed_by_the_failure_back_off(tmp_path):
    """`systemctl stop` (as at shutdown) while the service settles: SIGTERM ends it at once
    (it is outside any critical section) and the back-off does not run."""
    require_scratch_manager(("unshare", "nsenter", "systemctl"))
    sandbox = pytest.importorskip("tests.sandbox")
    cvm = sandbox.Sandbox(tmp_path / "cvm")
    manager = ScratchManager(tmp_path / "manager")
    try:
        try:
            cvm.build()
        except sandbox.SandboxUnavailable as e:
            pytest.skip(str(e))
        manager.start()
        for name in ("rhel-cvm-update.path", "rhel-cvm-update.service"):
            text = unit_substitutions((REPO / "systemd" / name).read_text(), cvm, sys.executable)
            (manager.units / name).write_text(text.replace("--settle 10", "--settle 60"))
        manager.systemctl("daemon-reload")
        manager.systemctl("start", "rhel-cvm-update.path")
        service = "rhel-cvm-update.service"
        cvm.install_uki("b")
        wait_until(lambda: manager.show(service, "StatusText")["StatusText"].startswith("waiting until"), 30,
                   "the service to settle")
        started = time.monotonic()
        manager.systemctl("stop", service)
        assert time.monotonic() - started < 8
        assert manager.show(service, "ActiveState")["ActiveState"] == "inactive"
        assert manager.show("rhel-cvm-update.path", "ActiveState")["ActiveState"] == "active"
        # nothing was sealed: the run was stopped before its transaction began
        assert set(cvm.luks_json()["tokens"]) == {"0"}
    finally:
        manager.stop()
        cvm.close()


@pytest.mark.parametrize("name", ["rhel-cvm-update.service", "rhel-cvm-update-confirm.service"])
def test_the_sandbox_leaves_exactly_the_capabilities_the_tool_needs(tmp_path, name):
    """The shipped sandbox lines, run by systemd 252: the process keeps CAP_LINUX_IMMUTABLE
    (efivarfs) and CAP_IPC_LOCK (cryptsetup) effective, and nothing else."""
    require_scratch_manager(("unshare", "systemctl"))
    manager = ScratchManager(tmp_path / "manager")
    out = tmp_path / "caps.txt"
    try:
        manager.start()
        text = (REPO / "systemd" / name).read_text()
        text = "\n".join(line for line in text.splitlines() if not DROPPED.match(line)
                         and not line.startswith(("ReadWritePaths=", "RequiresMountsFor=", "ExecStopPost=")))
        text = re.sub(r"^ExecStart=.*$", f"ExecStart=/bin/sh -c 'grep ^Cap /proc/self/status > {out}'", text,
                      flags=re.M).replace("Type=notify", "Type=oneshot")
        text = text.replace("[Service]\n", f"[Service]\nReadWritePaths={tmp_path}\n")
        (manager.units / "caps.service").write_text(text + "\n")
        manager.systemctl("daemon-reload")
        manager.systemctl("start", "caps.service")
        caps = dict(line.split(":\t") for line in out.read_text().splitlines())
        immutable_and_ipc_lock = (1 << 9) | (1 << 14)  # CAP_LINUX_IMMUTABLE, CAP_IPC_LOCK
        assert int(caps["CapEff"], 16) == immutable_and_ipc_lock
        assert int(caps["CapBnd"], 16) == immutable_and_ipc_lock
        assert int(caps["CapAmb"], 16) == 0
    finally:
        manager.stop()
