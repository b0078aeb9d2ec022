"""Running as a service: settle, deferred signals, and the hooks the transaction calls.

`rhel-cvm-update.path` starts `rhel-cvm-update.service` as soon as dnf touches the ESP;
the service waits for the directories to go quiet (``settle``), tells systemd where it is,
logs each outcome to the journal with structured fields and holds a logind ``shutdown``
block inhibitor while it seals and writes variables (those three through
adapters/systemd.py).  ``DaemonHooks`` bundles all of that behind the two calls the update
transaction makes: ``hooks.step(name, detail)`` at every step boundary and
``with hooks.critical():`` around sealing and variable writes.  The journal MESSAGE_IDs of
each outcome are listed in adapters/systemd.py.
"""

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from rhel_cvm_update.adapters.systemd import (FIELD_NAME, LOG_INFO, LOG_WARNING, JournalLog, Notifier,
                                              ShutdownInhibitor, journal_value)
from rhel_cvm_update.errors import CvmUpdateError


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
            fields = {k: v for k, v in detail.items() if FIELD_NAME.match(str(k).upper())}
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
