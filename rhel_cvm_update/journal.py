"""The state directory: the lock, the journal of chains, and the last results.

Every command that writes the LUKS2 header or efivarfs (``update``, ``confirm``, ``reseal``,
``enroll``, ``boot add``, ``boot remove``) runs under one ``flock`` on ``state_dir/lock``
(``writing_command``): a path-unit update and an admin's command never interleave their
writes.  A command that finds the lock held exits 4 at once; the daemon waits for it.

Files (all written by ``write_json_atomically``: temp file, fsync, rename, fsync of the
directory, so a power cut leaves the old or the new file, never a torn one):

- ``journal.json``: the chains this tool sealed (``Chain``), the pending transaction
  (``Pending``, with the keyslot a seal reserved and the chains a removal is deleting), the
  last failed trial boot, and the live PCRs the last transaction read;
- ``last-result.json``: the last ``update``/``confirm`` (what ``status`` reports);
  ``last-<command>.json`` for the other writing commands.

The journal decides which tokens and keyslots are retired, so it is read field by field and
only from a directory and files no other user can write.
"""

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

from rhel_cvm_update.errors import CvmUpdateError, MachineError, TransactionError
from rhel_cvm_update.trust import check_trusted_stat, ensure_trusted_dir

JOURNAL_FILE = "journal.json"
LOCK_FILE = "lock"
RESULT_FILE = "last-result.json"
JOURNAL_VERSION = 1
TRANSACTIONS = ("update", "confirm")

# A chain's life: sealed (token made) -> staged (BootNext names it) -> booted (confirmed) ->
# previous (a newer one was confirmed) -> retired (entry, token and keyslot removed).
# trial-failed: staged, but the VM came up with another chain.
LIVE_CHAIN_STATUSES = ("sealed", "staged", "booted", "previous", "trial-failed")
CHAIN_STATUSES = LIVE_CHAIN_STATUSES + ("retired",)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- files ------------------------------------------------------------------------------------

@contextlib.contextmanager
def state_lock(state_dir: str, timeout: Optional[float] = None) -> Iterator[None]:
    """Exclusive flock on state_dir/lock.  ``timeout`` None: fail at once if held."""
    ensure_trusted_dir(state_dir, "state directory")
    path = os.path.join(state_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise MachineError(f"cannot open the lock {path}: {e.strerror}") from None
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise MachineError(f"cannot lock {path}: {e.strerror}") from None
                if deadline is None or time.monotonic() >= deadline:
                    raise TransactionError(
                        f"another rhel-cvm-update transaction holds {path}"
                        + ("" if timeout is None else f" (waited {timeout:g} s)")
                        + "; try again when it has finished ('rhel-cvm-update status' shows a pending one)"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def write_json_atomically(path: str, obj: Any) -> None:
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise MachineError(f"cannot write {path}: {e.strerror}") from None


def read_json(path: str) -> Optional[Dict[str, Any]]:
    """A JSON object from a state file; None if absent.  Damage is a TransactionError."""
    try:
        with open(path, "rb") as f:
            check_trusted_stat(os.fstat(f.fileno()), path, "state file")
            data = json.loads(f.read(1 << 22).decode("utf-8"))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MachineError(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TransactionError(f"{path} is damaged (not JSON: {e}); move it aside to start afresh") from None
    if not isinstance(data, dict):
        raise TransactionError(f"{path} is damaged (not a JSON object)")
    return data


# --- records ----------------------------------------------------------------------------------

_OPTIONAL_STR = (str, type(None))
_OPTIONAL_INT = (int, type(None))


def _checked(cls, obj: Any, where: str):
    """An instance of the record dataclass ``cls`` from its JSON object, every field's type
    checked (``bool`` is not an ``int`` here); unknown keys are dropped."""
    if not isinstance(obj, dict):
        raise TransactionError(f"{where} is damaged (not a JSON object); move the journal aside to start afresh")
    values, bad = {}, []
    for field in dataclasses.fields(cls):
        kinds = field.metadata["kinds"]
        if field.name not in obj:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                bad.append(field.name)
            continue
        value = obj[field.name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            bad.append(field.name)
        values[field.name] = value
    if bad:
        raise TransactionError(f"{where} is damaged (fields {', '.join(bad)}); move the journal aside to start afresh")
    return cls(**values)


def _field(kinds, **kwargs):
    return dataclasses.field(metadata={"kinds": kinds if isinstance(kinds, tuple) else (kinds,)}, **kwargs)


class _Record:
    """A journal record: written back as the JSON object it was read from."""

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Chain(_Record):
    """One shim + UKI pair this tool sealed a token to (or adopted the booted one's)."""

    uki: Optional[str] = _field(_OPTIONAL_STR)
    esp_path: Optional[str] = _field(_OPTIONAL_STR)    # the UKI as the firmware names it
    uki_digest: str = _field(str)
    shim_digest: str = _field(str)
    pcrs: Dict[str, str] = _field(dict)                # PCR -> sha256 hex it is sealed to
    policy_hash: str = _field(str)
    token: int = _field(int)
    keyslot: int = _field(int)
    entry: Optional[int] = _field(_OPTIONAL_INT)       # Boot#### number
    status: str = _field(str)
    serial: int = _field(int)                          # orders seals and confirmations
    source: Optional[str] = _field(_OPTIONAL_STR, default=None)    # log | model | live
    agreed: Optional[bool] = _field((bool, type(None)), default=None)
    sources_ran: Optional[List[str]] = _field((list, type(None)), default=None)
    adopted: bool = _field(bool, default=False)
    created: Optional[str] = _field(_OPTIONAL_STR, default=None)
    confirmed: Optional[str] = _field(_OPTIONAL_STR, default=None)
    retired: Optional[str] = _field(_OPTIONAL_STR, default=None)
    mtime: Optional[float] = _field((float, int, type(None)), default=None)   # the UKI's when sealed
    # The shim's signature digest (formats.authenticode.signature_digest); None in chains
    # journaled before it was recorded.
    shim_signature: Optional[str] = _field(_OPTIONAL_STR, default=None)

    @property
    def live(self) -> bool:
        return self.status in LIVE_CHAIN_STATUSES

    def has_shim(self, digest: Optional[str], signature: Optional[str]) -> bool:
        """Sealed for this shim: the same Authenticode digest (its PCR4 event) and, where both
        are known, the same signatures (a re-signed shim changes PCR7's authority events)."""
        return self.shim_digest == digest and (self.shim_signature is None or signature is None
                                               or self.shim_signature == signature)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "Chain":
        chain = _checked(cls, obj, where)
        if chain.status not in CHAIN_STATUSES:
            raise TransactionError(f"{where} is damaged (status {chain.status!r}); "
                                   "move the journal aside to start afresh")
        return chain


@dataclasses.dataclass
class Reservation(_Record):
    """The keyslot and token id a seal is about to take (undone if it is interrupted)."""

    keyslot: Optional[int] = _field(_OPTIONAL_INT)
    token: Optional[int] = _field(_OPTIONAL_INT, default=None)
    uki: Optional[str] = _field(_OPTIONAL_STR, default=None)


@dataclasses.dataclass
class Pending(_Record):
    """The transaction under way (None in the journal when the last one finished)."""

    kind: str = _field(str)
    started: Optional[str] = _field(_OPTIONAL_STR, default=None)
    step: Optional[str] = _field(_OPTIONAL_STR, default=None)
    phase: Optional[str] = _field(_OPTIONAL_STR, default=None)
    reserved: Optional[Reservation] = _field((dict, Reservation, type(None)), default=None)
    doomed: List[str] = _field(list, default_factory=list)   # chain keys a removal is deleting

    @classmethod
    def from_json(cls, obj: Any, where: str, chains: Dict[str, Chain]) -> "Pending":
        pending = _checked(cls, obj, where)
        if pending.reserved is not None:
            pending.reserved = _checked(Reservation, pending.reserved, f"{where} reservation")
        if pending.kind not in TRANSACTIONS or not all(k in chains for k in pending.doomed):
            raise TransactionError(f"{where} is damaged; move the journal aside to start afresh")
        return pending


@dataclasses.dataclass
class TrialFailure(_Record):
    """A staged chain the VM did not come up with."""

    staged_uki: Optional[str] = _field(_OPTIONAL_STR)
    staged_entry: Optional[int] = _field(_OPTIONAL_INT)
    booted_uki: Optional[str] = _field(_OPTIONAL_STR)
    boot_current: Optional[int] = _field(_OPTIONAL_INT)
    at: Optional[str] = _field(_OPTIONAL_STR)


@dataclasses.dataclass
class LiveReading(_Record):
    """The live PCRs the last transaction read from the TPM (status's last resort)."""

    pcrs: Dict[str, str] = _field(dict)
    read: str = _field(str)


class Journal:
    """``state_dir/journal.json`` as typed records; ``save`` writes it atomically."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, JOURNAL_FILE)
        self.chains: Dict[str, Chain] = {}
        self.pending: Optional[Pending] = None
        self.trial_failed: Optional[TrialFailure] = None
        self.live: Optional[LiveReading] = None
        self.serial = 0
        self._load()

    def _load(self) -> None:
        data = read_json(self.path)
        if data is None:
            return
        if data.get("version") != JOURNAL_VERSION or not isinstance(data.get("chains"), dict):
            raise TransactionError(f"{self.path}: unknown journal version {data.get('version')!r}")
        self.chains = {key: Chain.from_json(chain, f"{self.path}: chain {key!r}")
                       for key, chain in data["chains"].items()}
        if data.get("pending") is not None:
            self.pending = Pending.from_json(data["pending"], f"{self.path}: the pending transaction", self.chains)
        if data.get("trial_failed") is not None:
            self.trial_failed = _checked(TrialFailure, data["trial_failed"], f"{self.path}: the failed trial")
        if data.get("live") is not None:
            self.live = _checked(LiveReading, data["live"], f"{self.path}: the live PCRs")
        serial = data.get("serial", 0)
        self.serial = serial if isinstance(serial, int) and not isinstance(serial, bool) else 0

    def to_json(self) -> Dict[str, Any]:
        record = lambda r: None if r is None else r.to_json()  # noqa: E731
        return {"version": JOURNAL_VERSION, "chains": {k: c.to_json() for k, c in self.chains.items()},
                "pending": record(self.pending), "trial_failed": record(self.trial_failed),
                "live": record(self.live), "serial": self.serial}

    def live_chains(self) -> Dict[str, Chain]:
        return {k: c for k, c in self.chains.items() if c.live}

    def next_serial(self) -> int:
        """Orders chains by when they were sealed or last confirmed (timestamps tie)."""
        self.serial += 1
        return self.serial

    def save(self) -> None:
        write_json_atomically(self.path, self.to_json())

    def begin(self, kind: str) -> None:
        """A new pending transaction; an interrupted one's reservation and removals carry over."""
        previous = self.pending
        self.pending = Pending(kind=kind, started=now(), reserved=previous.reserved if previous else None,
                               doomed=list(previous.doomed) if previous else [])
        self.save()

    def mark(self, step: str, phase: str) -> None:
        self.pending.step, self.pending.phase = step, phase
        self.save()

    def finish(self) -> None:
        self.pending = None
        self.save()


# --- results ----------------------------------------------------------------------------------

def result_path(state_dir: str, command: str) -> str:
    name = RESULT_FILE if command in TRANSACTIONS else f"last-{command.split()[0]}.json"
    return os.path.join(state_dir, name)


def record_result(state_dir: str, command: str, result: Dict[str, Any]) -> None:
    """The last result of ``command`` (never a secret), stamped with when it finished."""
    write_json_atomically(result_path(state_dir, command), dict(result, command=command, finished=now()))


def record_failure(state_dir: str, command: str, error: BaseException) -> None:
    """The last result of a command that stopped on an error (a transaction's journal keeps
    its pending step).  Failing to record it must not hide the error itself."""
    try:
        record_result(state_dir, command, {"outcome": "failed", "kind": getattr(error, "kind", "error"),
                                           "reason": str(error)})
    except CvmUpdateError:
        pass


def read_last_result(state_dir: str) -> Optional[Dict[str, Any]]:
    return read_json(os.path.join(state_dir, RESULT_FILE))


@contextlib.contextmanager
def writing_command(state_dir: str, command: str, lock_timeout: Optional[float] = None, *,
                    dry_run: bool = False) -> Iterator[Callable[[Dict[str, Any]], None]]:
    """Run a command that writes the machine: under the state lock (TransactionError, exit 4,
    when it is held), its failure recorded.  Yields ``record(result)`` for its success.  A
    dry run writes nothing, so it takes no lock and records nothing."""
    if dry_run:
        yield lambda result: None
        return
    with state_lock(state_dir, lock_timeout):
        try:
            yield lambda result: record_result(state_dir, command, result)
        except CvmUpdateError as e:
            record_failure(state_dir, command, e)
            raise
