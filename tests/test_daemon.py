"""daemon.py without a service manager: settle on real directories, sd_notify datagrams on
a real AF_UNIX socket (the protocol systemd reads), stderr logging, hooks and deferred
signals in a child process.  journald and logind themselves: tests/interop/test_daemon_*.py."""

import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from rhel_cvm_update.adapters import systemd as systemd_adapter
from rhel_cvm_update import daemon


# --- settle ---------------------------------------------------------------------------

class ScriptedClock:
    """Virtual time: sleep() advances it and runs the writes scheduled up to then."""

    def __init__(self, writes):
        self.now = 0.0
        self.writes = sorted(writes, key=lambda w: w[0])
        self.sleeps = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds
        while self.writes and self.writes[0][0] <= self.now:
            self.writes.pop(0)[1]()


def test_settle_returns_after_one_quiet_period(tmp_path):
    (tmp_path / "uki-a.efi").write_bytes(b"a")
    clock = ScriptedClock([])
    result = daemon.settle([str(tmp_path)], 10, clock=clock.clock, sleep=clock.sleep)
    assert result == daemon.SettleResult(quiet=True, waited=10.0, changes=0)


def test_settle_waits_for_the_last_of_several_writes(tmp_path):
    """dnf's pattern: a temp file grows, is renamed into place, then shim's CSV follows."""
    esp_linux, shim_dir = tmp_path / "Linux", tmp_path / "redhat"
    esp_linux.mkdir()
    shim_dir.mkdir()
    partial = esp_linux / "uki-b.efi;6543"

    def grow():
        with open(partial, "ab") as f:
            f.write(b"x" * 4096)

    writes = [(1.0, grow), (2.0, grow), (3.5, lambda: os.replace(partial, esp_linux / "uki-b.efi")),
              (6.0, lambda: (shim_dir / "BOOTX64.CSV").write_bytes(b"\xff\xfe"))]
    clock = ScriptedClock(writes)
    result = daemon.settle([str(esp_linux), str(shim_dir)], 4, clock=clock.clock, sleep=clock.sleep)
    assert result.quiet and result.changes == 4
    assert 10.0 <= result.waited <= 11.0  # the last write at 6 s, then 4 quiet seconds (1 s polls)


def test_settle_gives_up_after_max_wait_when_writes_never_stop(tmp_path):
    target = tmp_path / "busy"
    counter = iter(range(10 ** 6))
    writes = [(t / 2, lambda: target.write_bytes(b"x" * (next(counter) % 50 + 1))) for t in range(1, 400)]
    clock = ScriptedClock(writes)
    result = daemon.settle([str(tmp_path)], 5, max_wait=30, clock=clock.clock, sleep=clock.sleep)
    assert not result.quiet and result.waited == 30.0 and result.changes > 10


def test_default_max_wait_is_bounded(tmp_path):
    target = tmp_path / "busy"
    counter = iter(range(10 ** 6))
    writes = [(t / 4, lambda: target.write_bytes(b"x" * (next(counter) % 50 + 1))) for t in range(1, 2000)]
    clock = ScriptedClock(writes)
    result = daemon.settle([str(tmp_path)], 10, clock=clock.clock, sleep=clock.sleep)
    assert not result.quiet and result.waited == 60.0


def test_settle_zero_seconds_does_not_wait(tmp_path):
    def forbidden(_):
        raise AssertionError("slept")
    assert daemon.settle([str(tmp_path)], 0, sleep=forbidden).quiet


def test_directory_state_sees_renames_growth_creation_and_absence(tmp_path):
    d = tmp_path / "Linux"
    absent = daemon.directory_state(str(d))
    d.mkdir()
    empty = daemon.directory_state(str(d))
    assert absent != empty
    (d / "x.efi").write_bytes(b"1234")
    one = daemon.directory_state(str(d))
    (d / "x.efi.new").write_bytes(b"5678")
    os.replace(d / "x.efi.new", d / "x.efi")  # same name and size, new inode
    assert daemon.directory_state(str(d)) != one
    replaced = daemon.directory_state(str(d))
    with open(d / "x.efi", "ab") as f:
        f.write(b"9")
    assert daemon.directory_state(str(d)) != replaced
    (tmp_path / "file").write_bytes(b"")
    assert daemon.directory_state(str(tmp_path / "file")) == ("not-a-directory",)


def test_settle_in_real_time_with_a_writer_thread(tmp_path):
    stop = threading.Event()

    def writer():
        for i in range(6):
            (tmp_path / ("f%d" % i)).write_bytes(b"x")
            time.sleep(0.1)
        stop.set()

    thread = threading.Thread(target=writer)
    started = time.monotonic()
    thread.start()
    result = daemon.settle([str(tmp_path)], 1.0, max_wait=20)
    thread.join()
    assert stop.is_set() and result.quiet and result.changes >= 1
    # cannot be quiet before the writer's last file plus the quiet period
    assert time.monotonic() - started >= 0.5 + 1.0


# --- sd_notify over a real datagram socket --------------------------------------------

@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        yield sock
    finally:
        sock.close()


def test_notifier_sends_the_sd_notify_protocol(notify_socket):
    notifier = systemd_adapter.Notifier()
    notifier.ready("waiting for /boot/efi/EFI/Linux to settle")
    notifier.status("seal: token 2\nkeyslot 3")
    notifier.stopping("update staged")
    messages = [notify_socket.recv(4096).decode() for _ in range(3)]
    assert messages == ["READY=1\nSTATUS=waiting for /boot/efi/EFI/Linux to settle",
                        "STATUS=seal: token 2 keyslot 3",
                        "STOPPING=1\nSTATUS=update staged"]


def test_notifier_is_a_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = systemd_adapter.Notifier()
    notifier.ready("x")
    notifier.stopping("y")


# --- logging --------------------------------------------------------------------------

def test_stderr_sink_prints_notice_and_above():
    stream = io.StringIO()
    log = systemd_adapter.JournalLog(sink="stderr", stream=stream)
    log.send("step detail", priority=systemd_adapter.LOG_INFO, STEP="seal")
    log.outcome("staged", "update staged: uki-b.efi", UKI="/boot/efi/EFI/Linux/uki-b.efi", TOKEN_ID=2)
    log.outcome("nothing-to-do", "nothing to do")
    log.outcome("failed", "cannot seal: TPM busy")
    assert stream.getvalue() == ("rhel-cvm-update: update staged: uki-b.efi\n"
                                 "rhel-cvm-update: cannot seal: TPM busy\n")


def test_journal_fields_are_upper_case_text():
    fields = systemd_adapter.journal_fields({"uki": "/x.efi", "pcr4": bytes(range(4)), "token_id": 3,
                                    "pcrs": [4, 7], "keyslot": None})
    assert fields == {"UKI": "/x.efi", "PCR4": "00010203", "TOKEN_ID": "3", "PCRS": "4,7"}
    for bad in ("_PID", "token-id", "x" * 65, ""):
        with pytest.raises(ValueError):
            systemd_adapter.journal_fields({bad: 1})


def test_message_ids_are_distinct_128_bit_ids():
    ids = [o.message_id for o in systemd_adapter.OUTCOMES.values()]
    assert len(set(ids)) == len(ids) == 8
    for i in ids:
        assert len(i) == 32 and int(i, 16) >= 0 and i == i.lower()
    assert set(systemd_adapter.OUTCOMES) == {"staged", "nothing-to-do", "refused", "disagreed", "confirmed", "trial-failed",
                                    "removed", "failed"}
    # every ID is documented in the module docstring
    for o in systemd_adapter.OUTCOMES.values():
        assert f"{o.message_id}  {o.name}" in systemd_adapter.__doc__


def test_stderr_is_journal_compares_device_and_inode(tmp_path):
    """$JOURNAL_STREAM only counts when it names our stderr (a child inherits the variable
    with a different stderr)."""
    code = "from rhel_cvm_update.adapters import systemd; print(systemd.stderr_is_journal())"
    target = tmp_path / "stderr"
    with open(target, "wb") as err:
        st = os.fstat(err.fileno())
        for value, expected in ((f"{st.st_dev}:{st.st_ino}", "True"), (f"{st.st_dev}:{st.st_ino + 1}", "False"),
                                ("garbage", "False"), ("", "False")):
            env = dict(os.environ, JOURNAL_STREAM=value)
            out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, env=env,
                                 timeout=60, check=True).stdout.decode().strip()
            assert out == expected, value


# --- hooks ----------------------------------------------------------------------------

class RecordingInhibitor:
    events = []
    available = True

    def __init__(self, log):
        self.log = log

    def acquire(self):
        self.events.append("inhibit")
        return self.available

    def release(self):
        self.events.append("release")


def test_hooks_step_updates_status_and_logs_fields():
    sent = []
    stream = io.StringIO()
    hooks = daemon.DaemonHooks(log=systemd_adapter.JournalLog(sink="stderr", stream=stream, stderr_priority=systemd_adapter.LOG_INFO),
                               notifier=systemd_adapter.Notifier(notify=sent.append),
                               inhibitor_factory=RecordingInhibitor)
    hooks.step("predict", "uki-b.efi")
    hooks.step("seal", {"token_id": 2, "keyslot": 3})
    hooks.step("detect")
    assert sent == ["STATUS=predict: uki-b.efi", "STATUS=seal: token_id=2, keyslot=3", "STATUS=detect"]
    assert stream.getvalue().splitlines() == ["rhel-cvm-update: predict: uki-b.efi",
                                              "rhel-cvm-update: seal: token_id=2, keyslot=3",
                                              "rhel-cvm-update: detect"]


def test_critical_sections_nest_under_one_inhibitor():
    RecordingInhibitor.events = []
    hooks = daemon.DaemonHooks(log=systemd_adapter.JournalLog(sink="stderr", stream=io.StringIO()),
                               notifier=systemd_adapter.Notifier(notify=lambda s: None), inhibitor_factory=RecordingInhibitor)
    with hooks.critical():
        with hooks.critical():
            RecordingInhibitor.events.append("seal")
        RecordingInhibitor.events.append("write")
    with pytest.raises(RuntimeError):
        with hooks.critical():
            raise RuntimeError("boom")
    assert RecordingInhibitor.events == ["inhibit", "seal", "write", "release", "inhibit", "release"]


def test_an_unavailable_inhibitor_is_tried_once_per_run():
    RecordingInhibitor.events = []
    RecordingInhibitor.available = False
    try:
        hooks = daemon.DaemonHooks(log=systemd_adapter.JournalLog(sink="stderr", stream=io.StringIO()),
                                   notifier=systemd_adapter.Notifier(notify=lambda s: None),
                                   inhibitor_factory=RecordingInhibitor)
        for _ in range(3):
            with hooks.critical():
                RecordingInhibitor.events.append("seal")
    finally:
        RecordingInhibitor.available = True
    assert RecordingInhibitor.events == ["inhibit", "seal", "release", "seal", "seal"]


def test_sigterm_inside_a_critical_section_waits_for_its_end(tmp_path):
    """A child process gets SIGTERM in the middle of a critical section: it finishes the
    section (writes 'sealed'), then dies of SIGTERM before doing anything else."""
    marker = tmp_path / "progress"
    code = textwrap.dedent(f"""
        import os, signal, time
        from rhel_cvm_update.adapters import systemd as systemd_adapter
        from rhel_cvm_update import daemon
        hooks = daemon.DaemonHooks(log=systemd_adapter.JournalLog(sink="stderr"), notifier=systemd_adapter.Notifier(notify=lambda s: None),
                                   inhibitor_factory=lambda log: systemd_adapter.ShutdownInhibitor(log, bus_address="unix:path=/nonexistent"))
        with hooks.critical():
            pass
        with hooks.critical():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            open({str(marker)!r}, "w").write("sealed")
        open({str(marker)!r}, "a").write(" after")
    """)
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr.decode()
    assert marker.read_text() == "sealed"
    assert proc.stderr.decode().count("shutdown not inhibited") == 1


def test_sigterm_outside_critical_sections_is_immediate(tmp_path):
    code = textwrap.dedent("""
        import os, signal, time
        from rhel_cvm_update.adapters import systemd as systemd_adapter
        from rhel_cvm_update import daemon
        with daemon.signals_deferred():
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise SystemExit(7)
    """)
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGTERM


def test_changes_after_the_settle_ask_for_another_round_a_bounded_number_of_times(tmp_path):
    hooks = daemon.DaemonHooks(log=systemd_adapter.JournalLog(sink="stderr", stream=io.StringIO()),
                               notifier=systemd_adapter.Notifier(notify=lambda s: None), inhibitor_factory=RecordingInhibitor)
    assert not hooks.changed_since_settle()  # never settled: nothing to compare
    hooks.wait_for_quiet([str(tmp_path)], 0.05)
    assert not hooks.changed_since_settle()
    (tmp_path / "shimx64.efi").write_bytes(b"new shim")
    assert hooks.changed_since_settle()
    for round_number in range(2, daemon.MAX_ROUNDS + 1):
        hooks.wait_for_quiet([str(tmp_path)], 0.05)
        (tmp_path / ("f%d" % round_number)).write_bytes(b"x")
        # the last allowed round ends the run even though the directory changed again
        assert hooks.changed_since_settle() == (round_number < daemon.MAX_ROUNDS)
