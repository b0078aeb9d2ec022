"""The logind shutdown inhibitor against a real dbus-daemon started per test: the real
systemd-logind (252) in a private mount namespace, and a fake login1 that misbehaves on
purpose (fault injection only: tests/interop/fake_login1.py)."""

import json
import os
import select
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rhel_cvm_update.adapters import systemd as systemd_adapter

pytestmark = [pytest.mark.root]

LOGIND = "/lib/systemd/systemd-logind"
FAKE_LOGIN1 = Path(__file__).resolve().parent / "fake_login1.py"

# A bus that lets anyone own and call anything: the test bus has no other tenants.
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


def _read_line(proc, timeout=10.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError("no output within %s s" % timeout)
    return proc.stdout.readline().decode().strip()


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def bus(tmp_path):
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon is not installed")
    config = tmp_path / "bus.conf"
    config.write_text(BUS_CONFIG.format(socket=tmp_path / "bus.sock"))
    proc = subprocess.Popen(["dbus-daemon", "--config-file", str(config), "--nofork", "--print-address=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        address = _read_line(proc)
        yield address
    finally:
        _stop(proc)


@pytest.fixture
def fake_login1(bus, tmp_path):
    procs = []

    def start(mode):
        record = tmp_path / ("calls-%s.txt" % mode)
        record.write_text("")
        proc = subprocess.Popen([sys.executable, str(FAKE_LOGIN1), bus, mode, str(record)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        assert _read_line(proc) == "ready"
        return record

    yield start
    for proc in procs:
        _stop(proc)


class Lines:
    """A JournalLog stand-in that keeps the lines (sink "stderr" into a list)."""

    def __init__(self):
        self.lines = []

    def write(self, text):
        self.lines.extend(text.splitlines())

    def flush(self):
        pass


def _log():
    lines = Lines()
    return systemd_adapter.JournalLog(sink="stderr", stream=lines, stderr_priority=systemd_adapter.LOG_DEBUG), lines


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_inhibitor_holds_the_fd_until_release(fake_login1, bus):
    record = fake_login1("ok")
    log, lines = _log()
    inhibitor = systemd_adapter.ShutdownInhibitor(log, bus_address=bus)
    with inhibitor:
        assert inhibitor.fd is not None and os.fstat(inhibitor.fd)
        assert record.read_text().splitlines() == [
            "inhibit shutdown|rhel-cvm-update|sealing the disk key for the new kernel|block"]
        time.sleep(0.3)
        assert "released" not in record.read_text()
    assert inhibitor.fd is None
    assert _wait_for(lambda: "released" in record.read_text())
    assert lines.lines == ["rhel-cvm-update: shutdown inhibited while sealing"]


@pytest.mark.parametrize("mode,expected", [
    ("deny", "fake logind says no"),
    ("nofd", "logind returned no file descriptor"),
])
def test_inhibitor_refused_degrades_to_a_warning(fake_login1, bus, mode, expected):
    fake_login1(mode)
    log, lines = _log()
    with systemd_adapter.ShutdownInhibitor(log, bus_address=bus) as inhibitor:
        assert inhibitor.fd is None
    assert len(lines.lines) == 1 and lines.lines[0].startswith("rhel-cvm-update: shutdown not inhibited: ")
    assert expected in lines.lines[0]


def test_hung_logind_costs_at_most_the_timeout(fake_login1, bus):
    fake_login1("hang")
    log, lines = _log()
    started = time.monotonic()
    with systemd_adapter.ShutdownInhibitor(log, bus_address=bus, timeout_ms=500) as inhibitor:
        assert inhibitor.fd is None
    assert time.monotonic() - started < 5
    assert "shutdown not inhibited" in lines.lines[0] and "imeout" in lines.lines[0]


def test_no_logind_on_the_bus(bus):
    log, lines = _log()
    with systemd_adapter.ShutdownInhibitor(log, bus_address=bus) as inhibitor:
        assert inhibitor.fd is None
    assert "shutdown not inhibited" in lines.lines[0] and "org.freedesktop.login1" in lines.lines[0]


def test_no_bus_at_all(tmp_path):
    log, lines = _log()
    with systemd_adapter.ShutdownInhibitor(log, bus_address="unix:path=%s" % (tmp_path / "absent")) as inhibitor:
        assert inhibitor.fd is None
    assert lines.lines[0].startswith("rhel-cvm-update: shutdown not inhibited: ")


# --- the real systemd-logind ------------------------------------------------------------

# logind keeps its state under /run/systemd: give it a private tmpfs there.
LOGIND_NAMESPACE = r'''
set -eu
mount -t tmpfs none /run/systemd
exec "$@"
'''


@pytest.fixture
def real_logind(bus, tmp_path):
    if not os.path.exists(LOGIND) or shutil.which("unshare") is None or shutil.which("busctl") is None:
        pytest.skip("systemd-logind, unshare or busctl is not available")
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus)
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", LOGIND_NAMESPACE, "sh", LOGIND],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def owned():
        out = subprocess.run(["busctl", "--address=" + bus, "list", "--json=short"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=10).stdout
        return any(n.get("name") == "org.freedesktop.login1" for n in json.loads(out or b"[]"))

    try:
        if not _wait_for(owned, timeout=15):
            _stop(proc)
            pytest.fail("systemd-logind did not come up: " + proc.stderr.read().decode())
        yield bus
    finally:
        _stop(proc)


def _list_inhibitors(bus):
    out = subprocess.run(["busctl", "--address=" + bus, "call", "--json=short", "org.freedesktop.login1",
                          "/org/freedesktop/login1", "org.freedesktop.login1.Manager", "ListInhibitors"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=10, check=True).stdout
    return json.loads(out)["data"][0]


def test_real_logind_lists_our_block_inhibitor_only_during_the_critical_section(real_logind, tmp_path):
    """DaemonHooks in a child process whose *system* bus is the test bus
    ($DBUS_SYSTEM_BUS_ADDRESS), as the service would reach logind; busctl (systemd's own
    client) asks logind for its inhibitors."""
    code = textwrap.dedent("""
        import sys
        from rhel_cvm_update.adapters import systemd as systemd_adapter
        from rhel_cvm_update import daemon
        hooks = daemon.DaemonHooks(log=systemd_adapter.JournalLog(sink="stderr"), notifier=systemd_adapter.Notifier(notify=lambda s: None))
        with hooks.critical():
            print("inside", flush=True)
            sys.stdin.readline()
        print("outside", flush=True)
        sys.stdin.readline()
    """)
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=real_logind)
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
    try:
        assert _read_line(child, timeout=30) == "inside"
        inhibitors = _list_inhibitors(real_logind)
        assert inhibitors == [["shutdown", "rhel-cvm-update", "sealing the disk key for the new kernel", "block",
                               os.getuid(), child.pid]]
        child.stdin.write(b"\n")
        child.stdin.flush()
        assert _read_line(child, timeout=30) == "outside"
        assert _wait_for(lambda: _list_inhibitors(real_logind) == [])
        child.stdin.write(b"\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
        assert child.stderr.read() == b""
    finally:
        _stop(child)
