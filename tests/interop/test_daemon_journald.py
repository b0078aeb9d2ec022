"""Journal entries read back from a real systemd-journald (252), and the update/confirm
commands run the way rhel-cvm-update.service runs them, on the sandbox CVM.

This machine has no systemd as PID 1, so each test starts systemd-journald in a private
mount namespace (tmpfs over /run/systemd and /run/log, volatile storage, no kmsg) and runs
the code under test there.  What PID 1 would do at exec time -- connect stdout/stderr to a
journal stream and set $JOURNAL_STREAM, $INVOCATION_ID and $NOTIFY_SOCKET -- is done by a
small wrapper (EXEC_AS_SERVICE); the datagrams on $NOTIFY_SOCKET are read from a real
AF_UNIX socket.
"""

import json
import re
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rhel_cvm_update.adapters import systemd as systemd_adapter

pytestmark = [pytest.mark.root]

JOURNALD = "/lib/systemd/systemd-journald"
JOURNALD_CONF = """[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToWall=no
ForwardToConsole=no
"""

NAMESPACE_SCRIPT = r'''
set -eu
conf=$1; out=$2; shift 2
mount -t tmpfs none /run/systemd
mkdir -p /run/log
mount -t tmpfs none /run/log
mount --bind "$conf" /etc/systemd/journald.conf
env -u NOTIFY_SOCKET /lib/systemd/systemd-journald &
journald=$!
i=0
while [ ! -S /run/systemd/journal/socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
rc=0
"$@" || rc=$?
journalctl --sync
journalctl -D /run/log/journal -o json --no-pager > "$out"
kill $journald
wait $journald || true
exit $rc
'''

# What systemd does when it starts a service with StandardError=journal: stdout and
# stderr are one journal stream and $JOURNAL_STREAM names it.
EXEC_AS_SERVICE = textwrap.dedent("""
    import os, sys
    from systemd import journal
    stream = journal.stream("rhel-cvm-update")
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    st = os.fstat(2)
    os.environ["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino)
    os.environ["INVOCATION_ID"] = "0123456789abcdef0123456789abcdef"
    os.execv(sys.argv[1], sys.argv[1:])
""")


def run_with_journald(tmp_path: Path, argv, env=None):
    """Run argv beside a fresh journald; returns (exit status, journal entries as dicts)."""
    if not os.path.exists(JOURNALD) or shutil.which("unshare") is None or shutil.which("journalctl") is None:
        pytest.skip("systemd-journald, journalctl or unshare is not available")
    conf = tmp_path / "journald.conf"
    conf.write_text(JOURNALD_CONF)
    out = tmp_path / "journal.json"
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", NAMESPACE_SCRIPT, "sh",
                           str(conf), str(out), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env, timeout=600)
    entries = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return proc, entries


def ours(entries):
    return [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "rhel-cvm-update"]


def test_native_entries_carry_message_id_priority_and_fields(tmp_path):
    code = textwrap.dedent("""
        from rhel_cvm_update.adapters import systemd as systemd_adapter
        log = systemd_adapter.JournalLog()
        assert log.sink == "journal", log.sink
        log.outcome("staged", "sealed token 2 (keyslot 3) for /esp/EFI/Linux/uki-b.efi",
                    UKI="/esp/EFI/Linux/uki-b.efi", TOKEN_ID=2, KEYSLOT=3, BOOT_ENTRY="Boot0001",
                    PCR4=bytes.fromhex("ab" * 32), PCR7="cd" * 32)
        log.send("a step", priority=systemd_adapter.LOG_INFO, STEP="seal")
        print("plain stdout line")
    """)
    proc, entries = run_with_journald(tmp_path, [sys.executable, "-c", EXEC_AS_SERVICE, sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr.decode()
    staged = [e for e in entries if e.get("MESSAGE_ID") == systemd_adapter.OUTCOMES["staged"].message_id]
    assert len(staged) == 1
    entry = staged[0]
    assert entry["MESSAGE"] == "sealed token 2 (keyslot 3) for /esp/EFI/Linux/uki-b.efi"
    assert entry["PRIORITY"] == "5" and entry["_TRANSPORT"] == "journal"
    assert entry["SYSLOG_IDENTIFIER"] == "rhel-cvm-update" and entry["OUTCOME"] == "staged"
    assert (entry["UKI"], entry["TOKEN_ID"], entry["KEYSLOT"], entry["BOOT_ENTRY"]) == \
        ("/esp/EFI/Linux/uki-b.efi", "2", "3", "Boot0001")
    assert entry["PCR4"] == "ab" * 32 and entry["PCR7"] == "cd" * 32
    step = [e for e in entries if e.get("STEP") == "seal"]
    assert step and step[0]["PRIORITY"] == "6" and "MESSAGE_ID" not in step[0]
    plain = [e for e in entries if e.get("MESSAGE") == "plain stdout line"]
    assert plain and plain[0]["_TRANSPORT"] == "stdout"


def test_outside_a_service_lines_go_to_stderr_not_the_journal(tmp_path):
    code = textwrap.dedent("""
        from rhel_cvm_update.adapters import systemd as systemd_adapter
        log = systemd_adapter.JournalLog()
        log.outcome("refused", "prediction refused: PCR7 mismatch", REASON="PCR7")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    proc, entries = run_with_journald(tmp_path, [sys.executable, "-c", code], env=env)
    assert proc.returncode == 0
    assert proc.stderr.decode() == "rhel-cvm-update: prediction refused: PCR7 mismatch\n"
    assert not [e for e in entries if e.get("OUTCOME")]


# --- the service on the sandbox CVM -------------------------------------------------------

@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def drain(sock):
    messages = []
    while True:
        try:
            messages.append(sock.recv(65536).decode())
        except BlockingIOError:
            return messages


def service_argv(config_path, *argv):
    return [sys.executable, "-c", EXEC_AS_SERVICE, sys.executable, "-m", "rhel_cvm_update",
            "--config", str(config_path), *argv]


@pytest.mark.swtpm
def test_update_and_confirm_as_the_units_run_them(tmp_path, notify_socket):
    """Sandbox CVM booted into UKI A; UKI B is installed; `update --settle 1` runs as the
    service would: sd_notify READY first and STOPPING last, a "staged" journal entry whose
    PCR4/PCR7 fields are the PCRs captured when B really booted under OVMF.  After the
    (SIMULATED FIRMWARE) reboot into B, `confirm` logs "confirmed"; a later update logs one "removed" entry
    for the retired chain A when kernel A is erased."""
    sandbox = pytest.importorskip("tests.sandbox")
    sock, sock_path = notify_socket
    cvm = sandbox.Sandbox(tmp_path / "cvm")
    try:
        try:
            cvm.build()
        except sandbox.SandboxUnavailable as e:
            pytest.skip(str(e))
        uki_b = cvm.install_uki("b")
        env = dict(os.environ, NOTIFY_SOCKET=sock_path, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        proc, entries = run_with_journald(tmp_path, service_argv(cvm.config_path, "update", "--settle", "1"), env=env)
        assert proc.returncode == 0, proc.stderr.decode() + json.dumps(ours(entries), indent=1)
        notes = drain(sock)
        assert notes[0] == "READY=1\nSTATUS=update: started"
        assert notes[-1] == "STOPPING=1\nSTATUS=update: staged"
        statuses = [n for n in notes[1:-1]]
        assert statuses[0].startswith("STATUS=waiting until ") and any(s.startswith("STATUS=seal") for s in statuses)

        staged = [e for e in entries if e.get("MESSAGE_ID") == systemd_adapter.OUTCOMES["staged"].message_id]
        assert len(staged) == 1, json.dumps(ours(entries), indent=1)
        expected = sandbox.captured_pcrs("sb-off-uki-b")
        entry = staged[0]
        assert entry["UKI"] == str(uki_b) and entry["BOOT_ENTRY"].startswith("Boot")
        assert (entry["PCR4"], entry["PCR7"]) == (expected[4].hex(), expected[7].hex())
        token = int(entry["TOKEN_ID"])
        assert str(token) in cvm.luks_json()["tokens"]
        assert int(entry["KEYSLOT"]) in [int(s) for s in cvm.luks_json()["tokens"][str(token)]["keyslots"]]
        # the shutdown inhibitor was attempted; there is no system bus in the namespace
        assert any("shutdown not inhibited" in e.get("MESSAGE", "") for e in ours(entries))

        booted = cvm.simulate_reboot()  # SIMULATED FIRMWARE
        assert booted["entry"] == entry["BOOT_ENTRY"]
        assert cvm.plugin_unlocks(token)
        proc, entries = run_with_journald(tmp_path, service_argv(cvm.config_path, "confirm"), env=env)
        assert proc.returncode == 0, proc.stderr.decode() + json.dumps(ours(entries), indent=1)
        notes = drain(sock)
        assert notes[0] == "READY=1\nSTATUS=confirm: started" and notes[-1] == "STOPPING=1\nSTATUS=confirm: confirmed"
        confirmed = [e for e in entries if e.get("MESSAGE_ID") == systemd_adapter.OUTCOMES["confirmed"].message_id]
        assert len(confirmed) == 1 and confirmed[0]["UKI"] == str(uki_b)
        assert confirmed[0]["BOOT_ENTRY"] == entry["BOOT_ENTRY"]
        # keep_previous: 1 keeps chain A
        assert not [e for e in entries if e.get("MESSAGE_ID") == systemd_adapter.OUTCOMES["removed"].message_id]

        # dnf erases kernel A: the next update retires its chain, systemd-cryptenroll's token included
        tokens_before = set(cvm.luks_json()["tokens"])
        cvm.remove_uki("a")
        proc, entries = run_with_journald(tmp_path, service_argv(cvm.config_path, "update"), env=env)
        assert proc.returncode == 0, proc.stderr.decode() + json.dumps(ours(entries), indent=1)
        assert drain(sock)[-1] == "STOPPING=1\nSTATUS=update: removed"
        removed = [e for e in entries if e.get("MESSAGE_ID") == systemd_adapter.OUTCOMES["removed"].message_id]
        assert [e["UKI"] for e in removed] == [str(cvm.uki_dir / "uki-a.efi")]
        assert tokens_before - set(cvm.luks_json()["tokens"]) == {removed[0]["TOKEN_ID"]}
        assert cvm.plugin_unlocks(token)
    finally:
        cvm.close()


@pytest.mark.swtpm
def test_a_failed_update_is_one_failed_entry_and_a_nonzero_exit(tmp_path, notify_socket):
    """A TPM that is not there: exit 3 (machine error), a "failed" entry, STOPPING=1."""
    sock, sock_path = notify_socket
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "Linux").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(f"tpm: 'swtpm:host=127.0.0.1,port=1'\nstate_dir: {state}\nuki_dir: {tmp_path / 'Linux'}\n"
                      f"esp: {tmp_path}\nefivars: {tmp_path / 'efivars'}\nevent_log: {tmp_path / 'log.bin'}\n"
                      f"luks_device: {tmp_path / 'luks.img'}\n")
    env = dict(os.environ, NOTIFY_SOCKET=sock_path, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc, entries = run_with_journald(tmp_path, service_argv(config, "update"), env=env)
    failed = [e for e in entries if e.get("MESSAGE_ID") == systemd_adapter.OUTCOMES["failed"].message_id]
    assert proc.returncode != 0
    assert len(failed) == 1 and failed[0]["PRIORITY"] == "3" and failed[0]["COMMAND"] == "update"
    notes = drain(sock)
    assert notes[0] == "READY=1\nSTATUS=update: started"
    assert notes[-1].startswith("STOPPING=1\nSTATUS=update failed: ")


# Our catalog alone in a private /usr/lib/systemd/catalog; the compiled database in a tmpfs.
CATALOG_SCRIPT = r'''
set -eu
catalog=$1; source_dir=$2; shift 2
mkdir -p "$source_dir"
cp "$catalog" "$source_dir/"
mount --bind "$source_dir" /usr/lib/systemd/catalog
mkdir -p /var/lib/systemd/catalog
mount -t tmpfs none /var/lib/systemd/catalog
journalctl --update-catalog
exec "$@"
'''


def test_catalog_explains_each_outcome_with_the_entry_fields(tmp_path):
    """systemd/rhel-cvm-update.catalog compiled by journalctl --update-catalog: `journalctl -x`
    prints each outcome's explanation with the entry's own fields filled in, and the
    catalog covers exactly the MESSAGE_IDs of systemd_adapter.OUTCOMES."""
    catalog = Path(__file__).resolve().parents[2] / "systemd" / "rhel-cvm-update.catalog"
    ids = set(re.findall(r"^-- ([0-9a-f]{32})$", catalog.read_text(), re.M))
    assert ids == {o.message_id for o in systemd_adapter.OUTCOMES.values()}
    code = textwrap.dedent("""
        from rhel_cvm_update.adapters import systemd as systemd_adapter
        log = systemd_adapter.JournalLog(sink="journal")
        log.outcome("staged", "sealed", UKI="/esp/EFI/Linux/uki-b.efi", TOKEN_ID=2, KEYSLOT=3,
                    BOOT_ENTRY="Boot0001", SOURCE="log")
        log.outcome("failed", "update failed: TPM gone", COMMAND="update", REASON="machine")
    """)
    script = tmp_path / "x.sh"
    script.write_text("set -e\n%s -c '%s'\njournalctl --sync\njournalctl -D /run/log/journal -x -o short "
                      "SYSLOG_IDENTIFIER=rhel-cvm-update > %s\n" % (sys.executable, code.replace("'", "'\\''"),
                                                                   tmp_path / "explained.txt"))
    proc, _ = run_with_journald(tmp_path, ["sh", "-c", CATALOG_SCRIPT, "sh", str(catalog), str(tmp_path / "catalog"),
                                           "sh", str(script)])
    assert proc.returncode == 0, proc.stderr.decode()
    # journalctl -x prefixes explanation lines with "░░"
    flat = " ".join((tmp_path / "explained.txt").read_text().replace("\u2591", " ").split())
    assert "Subject: New kernel sealed and staged: /esp/EFI/Linux/uki-b.efi" in flat
    assert "predicted (from log), a fresh disk key was sealed to them as LUKS2 token 2 (keyslot 3), and boot " \
           "entry Boot0001 was set as BootNext" in flat
    assert "Subject: The update transaction failed (machine)" in flat
