"""Where the sealed secret must never show up, checked on a real reseal (swtpm + cryptsetup).

The secrets are learnt the way an attacker with the TPM would: by unsealing the tokens
afterwards.  Then every place they could have leaked is searched for the raw 32 bytes,
their hex, and their base64 (the LUKS passphrase), and for the recovery passphrase:

* argv and environment of every child: a ``cryptsetup`` wrapper first on PATH records its
  arguments and /proc/self/environ as the kernel sees them, and a poller thread reads
  /proc/PID/cmdline and /proc/PID/environ of every descendant while the reseal runs;
* log records (all loggers at DEBUG, i.e. what the daemon forwards to the journal);
* the state directory, the result dictionaries, stdout and stderr;
* an exception raised after the unseal, formatted with the locals of every frame;
* core dumps: at each cryptsetup call made while a secret is held the process is not
  dumpable (prctl PR_GET_DUMPABLE), and it is dumpable again afterwards.
"""

import base64
import hashlib
import json
import logging
import os
import shutil
import threading
import traceback
from pathlib import Path
from typing import Dict, List

import pytest

from rhel_cvm_update.adapters.cryptsetup import Cryptsetup
from rhel_cvm_update.config import config_from_mapping
from rhel_cvm_update.errors import ExternalToolError
from rhel_cvm_update.reseal import reseal
from rhel_cvm_update.secrets import Secret, is_dumpable
from tests.swtpm_fixtures import (TEST_PASSPHRASE, fresh_swtpm, luks2_image, luks2_template,  # noqa: F401
                                  swtpm)

tpm_adapter = pytest.importorskip("rhel_cvm_update.adapters.tpm")
pytestmark = [pytest.mark.swtpm, pytest.mark.root]

WRAPPER = """#!/bin/sh
# Test wrapper: record how cryptsetup was started, then become the real one.
log="$SECRET_TEST_LOG/$$"
for arg in "$@"; do printf '%s\\n' "$arg"; done > "$log.argv"
cat /proc/$$/environ > "$log.environ"
if [ -n "$SECRET_TEST_FAIL" ] && [ "$1" = "$SECRET_TEST_FAIL" ]; then
    echo "simulated failure of $1" >&2
    exit 5
fi
exec {real} "$@"
"""


class RecordingCryptsetup(Cryptsetup):
    """Cryptsetup that notes, at every call, the argv and whether the process is dumpable."""

    def __init__(self, device: str):
        super().__init__(device)
        self.calls: List[Dict[str, object]] = []

    def _run(self, argv, **kwargs):
        self.calls.append({"argv": list(argv), "dumpable": is_dumpable()})
        return super()._run(argv, **kwargs)


class ProcPoller:
    """Reads cmdline and environ of every descendant of this process, as fast as it can."""

    def __init__(self):
        self.seen: Dict[int, List[bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _parent(pid: str) -> int:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])

    def _loop(self):
        me = os.getpid()
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == me:
                    continue
                try:
                    ancestor, hops = self._parent(pid), 0
                    while ancestor not in (me, 0, 1) and hops < 8:
                        ancestor, hops = self._parent(str(ancestor)), hops + 1
                    if ancestor != me:
                        continue
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read()
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        environ = f.read()
                except (OSError, ValueError, IndexError):
                    continue  # the process ended while being read
                self.seen.setdefault(int(pid), []).extend([cmdline, environ])

    def cryptsetup_seen(self) -> int:
        return sum(1 for blobs in self.seen.values() if any(b"cryptsetup\0" in b for b in blobs))


@pytest.fixture
def recorded_path(tmp_path, monkeypatch):
    real = shutil.which("cryptsetup")
    if real is None:
        pytest.skip("cryptsetup is not installed")
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    log_dir.mkdir()
    wrapper = bin_dir / "cryptsetup"
    wrapper.write_text(WRAPPER.format(real=real))
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SECRET_TEST_LOG", str(log_dir))
    return log_dir


def forms(secret: bytes) -> List[bytes]:
    """The byte strings that would give the secret away."""
    b64 = base64.b64encode(secret)
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), b64, b64.decode().encode("utf-16-le")]


def assert_absent(needles: List[bytes], haystacks: Dict[str, bytes]) -> None:
    for where, data in haystacks.items():
        for needle in needles:
            assert needle not in data, f"secret material found in {where}"


def files_under(root: Path) -> Dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def unseal_token(tcti: str, luks: Cryptsetup, token_id: int) -> bytes:
    tokens = luks.metadata().systemd_tpm2_tokens()
    with tpm_adapter.Tpm(tcti) as tpm, tpm.unseal(tokens[token_id], token_id) as secret:
        return bytes(secret.data)


def next_boot(swtpm) -> None:
    swtpm.extend(4, hashlib.sha256(b"next shim").digest())
    swtpm.extend(4, hashlib.sha256(b"next uki").digest())


def test_reseal_leaves_no_secret_in_argv_environment_logs_state_or_output(
        fresh_swtpm, luks2_image, tmp_path, recorded_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    config = config_from_mapping({"tpm": fresh_swtpm.tcti, "luks_device": luks2_image,
                                  "state_dir": str(tmp_path / "state")})
    luks = RecordingCryptsetup(luks2_image)
    current = fresh_swtpm.read_sha256([4, 7])
    fresh_swtpm.power_cycle()
    next_boot(fresh_swtpm)
    target = fresh_swtpm.read_sha256([4, 7])
    fresh_swtpm.power_cycle()

    with ProcPoller() as poller:
        with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm, Secret(bytearray(TEST_PASSPHRASE)) as key:
            first = reseal(config, luks, tpm, pcr_values=current, key=key)
        assert is_dumpable()
        with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
            second = reseal(config, luks, tpm, pcr_values=target)
        assert is_dumpable()
    assert second["unlocked_with"] == f"token {first['token']}"

    old_secret = unseal_token(fresh_swtpm.tcti, luks, first["token"])
    fresh_swtpm.power_cycle()
    next_boot(fresh_swtpm)
    new_secret = unseal_token(fresh_swtpm.tcti, luks, second["token"])
    assert len(old_secret) == len(new_secret) == 32 and old_secret != new_secret
    needles = forms(old_secret) + forms(new_secret) + [TEST_PASSPHRASE]

    recorded = files_under(recorded_path)
    assert any(b"luksAddKey" in data for data in recorded.values()), "the wrapper saw no luksAddKey"
    assert poller.cryptsetup_seen() >= 1, "the poller saw no cryptsetup process"
    out = capsys.readouterr()
    assert_absent(needles, {
        **recorded,
        **{f"/proc/{pid} (cmdline, environ)": b"\0".join(blobs) for pid, blobs in poller.seen.items()},
        "log records": "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in caplog.records).encode(),
        "results": json.dumps([first, second]).encode(),
        "stdout/stderr": (out.out + out.err).encode(),
        **files_under(tmp_path / "state"),
    })

    # Every cryptsetup call that carried a secret ran while the process was not dumpable.
    secret_calls = [c for c in luks.calls if c["argv"][0] in ("luksAddKey", "open")]
    assert {c["argv"][0] for c in secret_calls} == {"luksAddKey", "open"}
    assert all(c["dumpable"] is False for c in secret_calls), luks.calls


def test_failure_after_unseal_leaks_nothing_into_the_exception(
        fresh_swtpm, luks2_image, tmp_path, recorded_path, monkeypatch):
    config = config_from_mapping({"tpm": fresh_swtpm.tcti, "luks_device": luks2_image,
                                  "state_dir": str(tmp_path / "state")})
    luks = RecordingCryptsetup(luks2_image)
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm, Secret(bytearray(TEST_PASSPHRASE)) as key:
        first = reseal(config, luks, tpm, pcr_values=fresh_swtpm.read_sha256([4, 7]), key=key)
    unsealed = unseal_token(fresh_swtpm.tcti, luks, first["token"])

    # The token unseals, then cryptsetup luksAddKey fails: the secret was in hand.
    monkeypatch.setenv("SECRET_TEST_FAIL", "luksAddKey")
    target = {4: hashlib.sha256(b"another chain").digest(), 7: bytes(32)}
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        with pytest.raises(ExternalToolError) as caught:
            reseal(config, luks, tpm, pcr_values=target)
    assert "simulated failure of luksAddKey" in str(caught.value)
    assert is_dumpable()
    text = "".join(traceback.TracebackException.from_exception(caught.value, capture_locals=True).format())
    assert "Secret" in text  # the locals were captured, and show only the wiped wrappers
    assert_absent(forms(unsealed) + [TEST_PASSPHRASE], {
        "traceback with locals": text.encode(),
        "exception attributes": repr(vars(caught.value)).encode(),
        **files_under(tmp_path / "state"),
    })
    assert [c["argv"][0] for c in luks.calls].count("luksAddKey") == 2


class RecordingJournal:
    """Stands in for systemd.journal.send: every native entry the daemon would write."""

    def __init__(self):
        self.entries: List[bytes] = []

    def send(self, message, **fields):
        self.entries.append(repr((message, fields)).encode())


def test_update_under_the_daemon_hooks_journals_no_secret(tmp_path):
    """A full `update` with the service hooks (journal entries, sd_notify STATUS= lines) on the
    sandbox CVM; after a simulated reboot into the staged chain both secrets are unsealed
    and searched for in everything the service would have emitted and in the state dir."""
    from rhel_cvm_update.adapters.systemd import JournalLog, Notifier
    from rhel_cvm_update.daemon import DaemonHooks
    from rhel_cvm_update.transaction import run_update
    from tests.sandbox import built_or_skip

    cvm = built_or_skip(tmp_path / "cvm")
    try:
        journal = RecordingJournal()
        log = JournalLog(sink="stderr", stream=open(os.devnull, "w"))
        log.sink, log._journal_send = "journal", journal.send
        notified: List[str] = []
        luks = Cryptsetup(str(cvm.luks))
        old_token = min(luks.metadata().systemd_tpm2_tokens())
        old_secret = unseal_token(cvm.swtpm.tcti, luks, old_token)

        cvm.install_uki("b")
        result = run_update(cvm.config(), hooks=DaemonHooks(log=log, notifier=Notifier(notify=notified.append)))
        added = [s for s in result.sealed if s["action"] == "added"]
        assert result.outcome == "staged" and len(added) == 1
        assert journal.entries and notified, "the hooks recorded nothing"
        cvm.simulate_reboot()
        new_secret = unseal_token(cvm.swtpm.tcti, luks, added[0]["token"])
    finally:
        cvm.close()
    assert old_secret != new_secret
    assert_absent(forms(old_secret) + forms(new_secret), {
        "journal entries": b"\n".join(journal.entries),
        "sd_notify messages": "\n".join(notified).encode(),
        "update result": json.dumps(result.to_json()).encode(),
        **files_under(cvm.state_dir),
    })
