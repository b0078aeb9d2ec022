"""systemd's services for the daemon: sd_notify, the journal, the logind shutdown inhibitor.

The one module that imports systemd-python (``systemd.daemon``, ``systemd.journal``) and
pydbus.  Outside systemd each degrades to something useful: sd_notify is a no-op without
``$NOTIFY_SOCKET``, log lines go to stderr, and without a system bus (or logind) the
inhibitor says in one line that the update runs uninhibited.

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

import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, TextIO

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

FIELD_NAME = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")


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
        if not FIELD_NAME.match(key) or len(key) > 64:
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
        except GLib.Error as e:
            # A container or a sandbox without systemd has no system bus, hence no logind.
            where = f"at {self.bus_address}" if self.bus_address else "system bus here"
            what = (f"no D-Bus {where}, hence no logind" if "No such file" in e.message
                    else f"cannot connect to the D-Bus {where} ({e.message})")
            self.log.send(f"shutdown not inhibited: {what}; the update is crash-safe without it", priority=LOG_NOTICE)
            return False
        try:
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
