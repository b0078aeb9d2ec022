"""Running as a service: settle, sd_notify, journald, the logind shutdown inhibitor.

`rhel-cvm-update.path` starts `rhel-cvm-update.service` as soon as dnf touches the ESP;
the service waits for the directories to go quiet (``settle``), tells systemd where it is
(``Notifier``), logs each outcome to the journal with structured fields (``JournalLog``)
and holds a logind ``shutdown`` block inhibitor while it seals and writes variables
(``ShutdownInhibitor``).  ``DaemonHooks`` bundles all of that behind the two calls the
update transaction makes: ``hooks.step(name, detail)`` at every step boundary and
``with hooks.critical():`` around sealing and variable writes.

Outside systemd everything degrades to something useful: sd_notify is a no-op without
``$NOTIFY_SOCKET``, log lines go to stderr, and without a system bus (or logind) the
update runs uninhibited after saying so.

Journal MESSAGE_IDs, one per outcome (``journalctl MESSAGE_ID=...`` finds them; the IDs
never change once released):

================================  =============  ==========================================
MESSAGE_ID                        outcome        meaning
================================  =============  ==========================================
ff14a9457c47412bbffb575b7197b38b  staged         new UKI sealed (keyslot+token), entry and
                                                 BootNext written: reboot when convenient
d06d675ed45c42acbedc19f37c64088a  nothing-to-do  the ESP changed but no chain is new
ecace3dc1e394cf1a5b7a1dfddb9b93a  refused        no trustworthy prediction: nothing sealed
33358ec199a24d8a8b360e5397715235  disagreed      the event log and the boot model predict
                                                 different PCRs: nothing sealed
2c8641cc7eba49a29dac7abc1ca54fd2  confirmed      the trial boot came up with the predicted
                                                 PCRs; its entry is now first in BootOrder
46f146e909524beeb0acbac64ca554a0  trial-failed   the VM booted the old chain, not the staged
                                                 one: left in place for the admin
a84bd4574226443dba8ee0f494078959  removed        a retired chain lost its entry/token/keyslot
592848afecfe4809b0ad41482483a88b  failed         an error stopped the transaction
================================  =============  ==========================================

systemd/rhel-cvm-update.catalog explains each of them in ``journalctl -x``.
Structured fields carry what an admin greps for: UKI, SHIM, PCR4/PCR7 (hex), TOKEN_ID,
KEYSLOT, BOOT_ENTRY (``Boot0003``), STEP, SOURCE, REASON.
"""

import contextlib
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, TextIO, Tuple

from rhel_cvm_update.errors import CvmUpdateError

IDENTIFIER = "rhel-cvm-update"

# syslog priorities (journal PRIORITY=)
LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG = 3, 4, 5, 6, 7


@dataclass(frozen=True)
class Outcome:
    name: str
    message_id: str
    priority: int


OUTCOMES: Dict[str, Outcome] = {o.name: o for o in (
    Outcome("staged", "ff14a9457c47412bbffb575b7197b38b", LOG_NOTICE),
    Outcome("nothing-to-do", "d06d675ed45c42acbedc19f37c64088a", LOG_INFO),
    Outcome("refused", "ecace3dc1e394cf1a5b7a1dfddb9b93a", LOG_WARNING),
    Outcome("disagreed", "33358ec199a24d8a8b360e5397715235", LOG_ERR),
    Outcome("confirmed", "2c8641cc7eba49a29dac7abc1ca54fd2", LOG_NOTICE),
    Outcome("trial-failed", "46f146e909524beeb0acbac64ca554a0", LOG_WARNING),
    Outcome("removed", "a84bd4574226443dba8ee0f494078959", LOG_NOTICE),
    Outcome("failed", "592848afecfe4809b0ad41482483a88b", LOG_ERR),
)}


# --- settle ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SettleResult:
    quiet: bool        # False: max_wait ran out while the directories kept changing
    waited: float      # seconds
    changes: int       # how many times a directory was seen changing


DirectoryState = Tuple[Any, ...]


def directory_state(path: str) -> DirectoryState:
    """What a writer changes in a directory: names, inodes (rename-over), sizes and
    mtimes of the entries.  A missing directory is a state too (dnf may create it)."""
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except FileNotFoundError:
        return ("absent",)
    except NotADirectoryError:
        return ("not-a-directory",)
    state: List[Tuple[Any, ...]] = []
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # deleted between scandir and stat: a change in progress
            state.append((entry.name, "vanished"))
            continue
        state.append((entry.name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(sorted(state))


def settle(paths: Sequence[str], seconds: float, *, max_wait: Optional[float] = None,
           clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> SettleResult:
    """Wait until none of ``paths`` has changed for ``seconds``.

    dnf installs a kernel as several files (the UKI, then perhaps shim and BOOTX64.CSV),
    each renamed into place; the path unit fires on the first.  Polling the directory
    listings is enough to see those renames and the growth of a file being written.
    The wait is bounded by ``max_wait`` (default: six quiet periods, at least a minute)
    so that a directory that never settles cannot hold the service forever; the caller
    then proceeds anyway, because a path unit does not fire again for writes it saw
    while the service was running.
    """
    if seconds <= 0:
        return SettleResult(quiet=True, waited=0.0, changes=0)
    if max_wait is None:
        max_wait = max(6 * seconds, 60.0)
    interval = min(1.0, seconds / 4)
    start = clock()
    last_state = [directory_state(p) for p in paths]
    quiet_since = start
    changes = 0
    while True:
        now = clock()
        if now - quiet_since >= seconds:
            return SettleResult(quiet=True, waited=now - start, changes=changes)
        if now - start >= max_wait:
            return SettleResult(quiet=False, waited=now - start, changes=changes)
        sleep(min(interval, seconds - (now - quiet_since), max_wait - (now - start)))
        state = [directory_state(p) for p in paths]
        if state != last_state:
            changes += 1
            last_state = state
            quiet_since = clock()


# --- sd_notify ------------------------------------------------------------------------

class Notifier:
    """sd_notify(3) through systemd-python.  sd_notify does nothing when
    $NOTIFY_SOCKET is unset, which makes this a no-op outside a Type=notify unit."""

    def __init__(self, notify: Optional[Callable[[str], Any]] = None):
        if notify is None:
            from systemd import daemon
            notify = daemon.notify
        self._notify = notify

    def _send(self, *assignments: str) -> None:
        # STATUS= is a single line: a newline would start a new assignment.
        self._notify("\n".join(a.replace("\n", " ") for a in assignments))

    def ready(self, status: str) -> None:
        self._send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self._send("STOPPING=1", f"STATUS={status}")


# --- journald -------------------------------------------------------------------------

_FIELD_NAME = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")


def journal_value(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (list, tuple)):
        return ",".join(journal_value(v) for v in value)
    return str(value)


def journal_fields(fields: Mapping[str, Any]) -> Dict[str, str]:
    """Upper-case journal field names (journald drops names with other characters) with
    text values; None values are left out."""
    out: Dict[str, str] = {}
    for name, value in fields.items():
        if value is None:
            continue
        key = name.upper()
        if not _FIELD_NAME.match(key) or len(key) > 64:
            raise ValueError(f"not a journal field name: {name!r}")
        out[key] = journal_value(value)
    return out


def stderr_is_journal(environ: Mapping[str, str] = os.environ) -> bool:
    """systemd.exec(5): $JOURNAL_STREAM is "DEV:INODE" of the stream connected to the
    journal; when it is our stderr, native journal messages reach the same place with
    their fields intact."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalLog:
    """Structured log lines: native journal entries under systemd, plain stderr lines
    (priority notice and above) elsewhere."""

    def __init__(self, sink: Optional[str] = None, stream: Optional[TextIO] = None,
                 stderr_priority: int = LOG_NOTICE):
        if sink is None:
            sink = "journal" if stderr_is_journal() else "stderr"
        if sink not in ("journal", "stderr"):
            raise ValueError(f"unknown log sink {sink!r}")
        self.sink = sink
        self.stream = stream
        self.stderr_priority = stderr_priority
        if sink == "journal":
            from systemd import journal
            self._journal_send = journal.send

    def send(self, message: str, *, priority: int = LOG_INFO, message_id: Optional[str] = None,
             **fields: Any) -> None:
        extra = journal_fields(fields)
        if self.sink == "journal":
            if message_id is not None:
                extra["MESSAGE_ID"] = message_id
            self._journal_send(message, PRIORITY=str(priority), SYSLOG_IDENTIFIER=IDENTIFIER, **extra)
            return
        if priority > self.stderr_priority:
            return
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(f"{IDENTIFIER}: {message}\n")
        stream.flush()

    def outcome(self, name: str, message: str, **fields: Any) -> None:
        outcome = OUTCOMES[name]
        self.send(message, priority=outcome.priority, message_id=outcome.message_id,
                  OUTCOME=name, **fields)


# --- logind shutdown inhibitor --------------------------------------------------------

LOGIND_NAME = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_MANAGER = "org.freedesktop.login1.Manager"


class ShutdownInhibitor:
    """A logind "shutdown" block inhibitor, held from __enter__ to __exit__.

    org.freedesktop.login1.Manager.Inhibit returns a pipe fd; the inhibitor lasts as long
    as that fd is open.  pydbus 0.6 drops fds returned by methods (LEW21/pydbus#42), so
    the call goes through the Gio connection pydbus wraps (``bus.con``), which hands back
    the fd list.  Without a bus, without logind, or when logind refuses, the update runs
    uninhibited: the transaction is crash-safe, the inhibitor only spares the next boot a
    recovery.
    """

    WHAT = "shutdown"
    WHO = IDENTIFIER
    WHY = "sealing the disk key for the new kernel"
    MODE = "block"

    def __init__(self, log: JournalLog, bus_address: Optional[str] = None, timeout_ms: int = 5000):
        self.log = log
        self.bus_address = bus_address
        self.timeout_ms = timeout_ms
        self.fd: Optional[int] = None

    def _connect(self):
        import pydbus
        if self.bus_address:
            return pydbus.connect(self.bus_address)
        return pydbus.SystemBus()

    def acquire(self) -> bool:
        try:
            from gi.repository import Gio, GLib
        except ImportError as e:
            self.log.send(f"shutdown not inhibited: no GObject introspection ({e})", priority=LOG_WARNING)
            return False
        try:
            bus = self._connect()
            reply, fd_list = bus.con.call_with_unix_fd_list_sync(
                LOGIND_NAME, LOGIND_PATH, LOGIND_MANAGER, "Inhibit",
                GLib.Variant("(ssss)", (self.WHAT, self.WHO, self.WHY, self.MODE)),
                GLib.VariantType.new("(h)"), Gio.DBusCallFlags.NONE, self.timeout_ms, None, None)
        except GLib.Error as e:
            self.log.send(f"shutdown not inhibited: {e.message}", priority=LOG_WARNING)
            return False
        (index,) = reply.unpack()
        fds = fd_list.steal_fds() if fd_list is not None else []
        for i, fd in enumerate(fds):
            if i != index:
                os.close(fd)
        if not 0 <= index < len(fds):
            self.log.send("shutdown not inhibited: logind returned no file descriptor", priority=LOG_WARNING)
            return False
        self.fd = fds[index]
        self.log.send("shutdown inhibited while sealing", priority=LOG_DEBUG)
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "ShutdownInhibitor":
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


# --- signals during a critical section ------------------------------------------------

DEFERRED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT/SIGHUP until the block ends, then die of the first one as if
    it had arrived then.  systemd stops the service with SIGTERM (then SIGKILL after
    TimeoutStopSec); finishing a TPM seal or a variable write first leaves no step for
    the next run to undo.  Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []

    def remember(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, remember) for s in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            os.kill(os.getpid(), received[0])


# --- the transaction's hooks ----------------------------------------------------------

MAX_ROUNDS = 3


class DaemonHooks:
    """What the update transaction calls at step boundaries and around critical work."""

    def __init__(self, log: Optional[JournalLog] = None, notifier: Optional[Notifier] = None,
                 inhibitor_factory: Optional[Callable[[JournalLog], ShutdownInhibitor]] = None):
        self.log = log if log is not None else JournalLog()
        self.notifier = notifier if notifier is not None else Notifier()
        self._inhibitor_factory = inhibitor_factory if inhibitor_factory is not None else ShutdownInhibitor
        self._depth = 0
        self._inhibitor_unavailable = False
        self._settled: Optional[Tuple[List[str], List[DirectoryState]]] = None
        self._rounds = 0
        self.final_status = ""

    def step(self, name: str, detail: Any = "") -> None:
        fields: Dict[str, Any] = {}
        if isinstance(detail, Mapping):
            fields = {k: v for k, v in detail.items() if _FIELD_NAME.match(str(k).upper())}
            text = ", ".join(f"{k}={journal_value(v)}" for k, v in detail.items())
        else:
            text = str(detail)
        status = f"{name}: {text}" if text else name
        self.notifier.status(status)
        self.log.send(status, priority=LOG_INFO, STEP=name, **fields)

    def wait_for_quiet(self, paths: Sequence[str], seconds: float) -> SettleResult:
        where = " and ".join(paths)
        self.notifier.status(f"waiting until {where} stay quiet for {seconds:g} s")
        result = settle(paths, seconds)
        if not result.quiet:
            self.log.send(f"{where} kept changing for {result.waited:.0f} s; going ahead anyway",
                          priority=LOG_WARNING, SETTLE_CHANGES=result.changes)
        self._settled = (list(paths), [directory_state(p) for p in paths])
        self._rounds += 1
        return result

    def changed_since_settle(self) -> bool:
        """Did the settled directories change while the update ran?  The path unit does not
        watch while its service is active, so a file dnf writes then (a shim after the UKI)
        would wait for the next change; the service runs another round instead, at most
        MAX_ROUNDS per start (its own BOOTX64.CSV write costs one idle round)."""
        if self._settled is None or self._rounds >= MAX_ROUNDS:
            return False
        paths, state = self._settled
        if [directory_state(p) for p in paths] == state:
            return False
        self.log.send(f"{' and '.join(paths)} changed during the update; running it again", priority=LOG_INFO)
        return True

    @contextlib.contextmanager
    def service(self, command: str) -> Iterator[None]:
        """One run of a unit: READY=1 at once (the unit's start job is done; progress is
        in STATUS=), a "failed" journal entry for an error, STOPPING=1 at the end."""
        self.notifier.ready(f"{command}: started")
        self.final_status = f"{command}: done"
        try:
            yield
        except CvmUpdateError as e:
            self.final_status = f"{command} failed: {e}"
            self.log.outcome("failed", self.final_status, COMMAND=command, REASON=e.kind)
            raise
        finally:
            self.notifier.stopping(self.final_status)

    def report_update(self, result: Any) -> None:
        """Journal entries for an UpdateResult (rhel_cvm_update.transaction)."""
        self._report_outcome("update", result)
        staged = result.staged or {}
        for chain in result.sealed:
            entry = staged.get("entry") if chain["uki"] == staged.get("uki") else None
            next_boot = f" as {entry} (BootNext); reboot when convenient" if entry else ""
            self.log.outcome("staged", f"sealed token {chain['token']} (keyslot {chain['keyslot']}) for "
                             f"{chain['uki']}{next_boot}", UKI=chain["uki"], TOKEN_ID=chain["token"],
                             KEYSLOT=chain["keyslot"], BOOT_ENTRY=entry, SOURCE=chain["source"],
                             **{f"PCR{p}": v for p, v in chain["pcrs"].items()})
        self._report_removed(result.removed)

    def report_confirm(self, result: Any) -> None:
        """Journal entries for a ConfirmResult (rhel_cvm_update.transaction)."""
        self._report_outcome("confirm", result, UKI=result.booted_uki, BOOT_ENTRY=result.boot_current)
        self._report_removed(result.removed)

    def _report_outcome(self, command: str, result: Any, **fields: Any) -> None:
        self.final_status = f"{command}: {result.outcome}" + (f" ({result.reason})" if result.reason else "")
        # staged and removed chains get one entry each below
        if result.outcome not in ("staged", "removed"):
            outcome = "disagreed" if getattr(result, "refusal", None) == "sources-disagree" else result.outcome
            self.log.outcome(outcome, self.final_status, COMMAND=command, REASON=result.reason, **fields)

    def _report_removed(self, removed: Sequence[Mapping[str, Any]]) -> None:
        for chain in removed:
            entries = chain.get("entries") or []
            self.log.outcome("removed", f"removed {chain['uki']}: token {chain.get('token')}, keyslot "
                             f"{chain.get('keyslot')}, entries {', '.join(entries) or 'none'}",
                             UKI=chain["uki"], TOKEN_ID=chain.get("token"), KEYSLOT=chain.get("keyslot"),
                             BOOT_ENTRY=entries or None)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            with signals_deferred():
                if self._inhibitor_unavailable:
                    yield
                    return
                inhibitor = self._inhibitor_factory(self.log)
                # One warning per run is enough: a bus or logind that is missing now will
                # still be missing at the next critical section.
                self._inhibitor_unavailable = not inhibitor.acquire()
                try:
                    yield
                finally:
                    inhibitor.release()
        finally:
            self._depth = 0


@contextlib.contextmanager
def service_session(hooks: Optional["DaemonHooks"], command: str) -> Iterator[None]:
    """``hooks.service(command)`` when running as a service, nothing otherwise."""
    if hooks is None:
        yield
        return
    with hooks.service(command):
        yield
