"""The update transaction: the one place that changes the machine on a kernel update.

``run_update`` reads as its steps:

1. detect  - the UKIs in uki_dir against the journal: new ones, removed ones, the booted
             chain (BootCurrent's entry and the digests in the current event log), and a
             changed shim (every UKI then needs a new chain);
2. predict - next boot's PCRs for each new chain (refused, with the reason recorded, when
             neither the event log nor the model reproduces the live PCRs);
3. seal    - a keyslot + systemd-tpm2 token per prediction (reseal.py; a matching token is
             reused);
4. stage   - the newest new UKI's Boot entry, and BootNext to it (bootmgr.py): a trial boot,
             the firmware falls back to the unchanged BootOrder if it never comes up;
5. remove  - chains whose UKI was deleted lose their entry, token and keyslot, unless booted
             or about to boot.

``run_confirm`` (after the next boot) runs detect, then:

5. confirm - booted the staged chain with its predicted PCRs: its entry goes first in
             BootOrder and in BOOTX64.CSV; booted the old one: the failed trial is recorded
             and nothing changes;
6. remove  - retire chains beyond the booted one and ``keep_previous`` older ones.

Crash safety: the journal (journal.py: ``state_dir/journal.json``, written atomically)
records each step before and after it runs, the keyslot a seal is about to take, and the
chains a removal is about to delete.  Every step is safe to repeat: a rerun undoes
an interrupted seal (kills the keyslot it reserved unless a token already names it), finishes
an interrupted removal, and otherwise runs the steps again, which find their work done.  The
order of writes keeps a working way in at every instant: a keyslot before its token, a token
before the entry that boots it, BootNext only to an entry whose token exists; removals take
the entry first, then the token, then the keyslot; the booted chain and the chain of the next
boot are never removed, nor any token or keyslot the journal does not account for.

Both run under the state lock (``journal.writing_command``), as every command that writes does.

Test hook (fault injection): ``RHEL_CVM_UPDATE_CRASH_AT=<step>:<before|inside|after>`` makes
the process SIGKILL itself at that point; ``inside`` is after the first write of the step.
"""

import contextlib
import dataclasses
import os
import signal
from typing import Any, Callable, Dict, List, Optional, Tuple

from rhel_cvm_update.errors import CvmUpdateError, MachineError, PredictionError
from rhel_cvm_update.journal import Chain, Journal, LiveReading, Reservation, TrialFailure, now, writing_command
from rhel_cvm_update.trust import check_trusted_path, require_live_checked

SHIM_STORE = "booted-shim"
CRASH_ENV = "RHEL_CVM_UPDATE_CRASH_AT"
UPDATE_STEPS = ("detect", "predict", "seal", "stage", "remove")  # the crash points' step names
CONFIRM_STEPS = ("detect", "confirm", "remove")


def crash_point(step: str, where: str) -> None:
    """Test hook: SIGKILL this process at ``step:where`` when RHEL_CVM_UPDATE_CRASH_AT says so."""
    if os.environ.get(CRASH_ENV) == f"{step}:{where}":
        os.kill(os.getpid(), signal.SIGKILL)


class NullHooks:
    """What run_update/run_confirm call when no daemon listens."""

    def step(self, name: str, detail: Any = "") -> None:
        pass

    def critical(self):
        return contextlib.nullcontext()


class _CrashAfterWrites:
    """Passes every call through to ``target``; after each call of a writing method, the
    ``<step>:inside`` crash point."""

    def __init__(self, target: Any, step: str, writers: Tuple[str, ...]):
        self._target, self._step, self._writers = target, step, writers

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if name not in self._writers:
            return attribute

        def write(*args, **kwargs):
            result = attribute(*args, **kwargs)
            crash_point(self._step, "inside")
            return result
        return write


def _run_step(journal: Journal, hooks, name: str, detail: str, work: Callable[[], Any]) -> Any:
    hooks.step(name, detail)
    journal.mark(name, "before")
    crash_point(name, "before")
    result = work()
    journal.mark(name, "after")
    crash_point(name, "after")
    return result


# --- the machine ----------------------------------------------------------------------------

def chain_key(shim_digest: str, uki_digest: str) -> str:
    return f"{shim_digest}:{uki_digest}"


class Machine:
    """The adapters one transaction uses, opened lazily."""

    def __init__(self, config, tpm):
        from rhel_cvm_update.adapters.cryptsetup import Cryptsetup, resolve_device
        from rhel_cvm_update.adapters.efivarfs import EfiVarFs
        from rhel_cvm_update.adapters.esp import Esp

        self.config = config
        self.tpm = tpm
        self.luks = Cryptsetup(resolve_device(config.luks_device))
        self.efivarfs = EfiVarFs(config.efivars)
        self.esp = Esp(config.esp)
        self._partition = None

    def boot_manager(self, step: Optional[str] = None, need_partition: bool = False):
        from rhel_cvm_update.adapters.esp import locate_esp
        from rhel_cvm_update.bootmgr import BootManager

        if need_partition and self._partition is None:
            self._partition = locate_esp(self.config.esp_device, self.config.esp)
        efivarfs = self.efivarfs if step is None else _CrashAfterWrites(self.efivarfs, step, ("set", "delete"))
        return BootManager(efivarfs, self.esp, self.config.vendor, self.config.uki_dir, self._partition)

    def luks_for(self, step: str):
        return _CrashAfterWrites(self.luks, step, ("add_keyslot", "import_token", "remove_token", "kill_keyslot"))

    def digest(self, path: str) -> str:
        # The image digest only: measure_image would also hash the UKI's kernel and parse the
        # signature, which detect does not need, for every UKI on every update.
        from rhel_cvm_update.formats.authenticode import authenticode_digest
        from rhel_cvm_update.measure import mapped_file

        with mapped_file(path) as buf:
            return authenticode_digest(buf, "sha256", path).hex()


@dataclasses.dataclass
class Detected:
    live: Dict[int, bytes]
    live_banks: Dict[str, Dict[int, bytes]]
    shim: str
    shim_digest: str
    shim_changed: bool
    booted_key: Optional[str]
    booted_uki: Optional[str]
    booted_shim: Optional[str]          # a copy of the shim that booted now
    boot_current: Optional[int]
    new: List[Dict[str, Any]]           # {"uki", "esp_path", "digest", "mtime"}
    doomed: List[str]                   # chain keys whose UKI is gone
    notes: List[str]



def _policy(config, pcrs: Dict[int, bytes]) -> bytes:
    from rhel_cvm_update.formats.tpm_policy import policy_pcr

    return policy_pcr({p: pcrs[p] for p in config.pcrs}, "sha256")


def _log_application_digests(config) -> List[str]:
    """sha256 digests of the PCR4 EV_EFI_BOOT_SERVICES_APPLICATION events, in log order:
    shim, the UKI, and the kernel systemd-stub started."""
    from rhel_cvm_update.formats import tcglog
    from rhel_cvm_update.predict import read_event_log

    log = read_event_log(config.event_log)
    return [bytes(e.digests["sha256"]).hex() for e in log.events
            if e.pcr == 4 and e.event_type == tcglog.EV_EFI_BOOT_SERVICES_APPLICATION and "sha256" in e.digests]


def _token_accounts(config, token, policy: bytes) -> bool:
    import hmac

    return (hmac.compare_digest(token.policy_hash, policy) and list(token.pcrs) == list(config.pcrs)
            and token.bank == "sha256" and not token.pin)


def detect(machine: Machine, journal: Journal) -> Detected:
    from rhel_cvm_update.formats.efi import EFI_GLOBAL_VARIABLE
    from rhel_cvm_update.predict import booted_chain, read_live_pcrs, shim_path

    config = machine.config
    notes: List[str] = []
    live_banks = read_live_pcrs(machine.tpm, config.pcrs)
    live = live_banks["sha256"]
    crash_point("detect", "inside")
    journal.live = LiveReading(pcrs={str(p): v.hex() for p, v in sorted(live.items())}, read=now())
    applications = _log_application_digests(config)
    shim = shim_path(config)
    shim_digest = machine.digest(shim)
    shim_changed = shim_digest not in applications
    current = machine.efivarfs.get("BootCurrent", EFI_GLOBAL_VARIABLE)
    boot_current = int.from_bytes(current.data, "little") if current and len(current.data) == 2 else None

    booted_uki: Optional[str] = None
    try:
        _, candidate = booted_chain(machine.efivarfs, config.esp)
        if machine.digest(candidate) in applications:
            booted_uki = candidate
    except CvmUpdateError as e:
        notes.append(f"BootCurrent does not name a readable chain: {e}")
    ukis = [u for u in machine.esp.list_ukis(config.uki_dir)]
    digests: Dict[str, str] = {}
    for uki in ukis:
        if uki.problem:
            notes.append(f"{uki.path} skipped: {uki.problem}")
            continue
        digests[uki.path] = machine.digest(uki.path)
        if booted_uki is None and digests[uki.path] in applications[1:2]:
            booted_uki = uki.path
    booted_key = chain_key(applications[0], applications[1]) if len(applications) >= 2 else None

    # The VM's first token (systemd-cryptenroll, or converted from Azure's import token) is
    # the booted chain's: its policy digest is the one the live PCRs give.
    policy = _policy(config, live)
    if booted_key and not any(c.policy_hash == policy.hex() for c in journal.live_chains().values()):
        tokens = machine.luks.metadata().systemd_tpm2_tokens()
        owned = {c.token for c in journal.live_chains().values()}
        for token_id, token in sorted(tokens.items()):
            if token_id not in owned and _token_accounts(config, token, policy):
                journal.chains[booted_key] = Chain(
                    uki=booted_uki, esp_path=machine.esp.efi_path(booted_uki) if booted_uki else None,
                    uki_digest=applications[1], shim_digest=applications[0],
                    pcrs={str(p): v.hex() for p, v in sorted(live.items())}, policy_hash=policy.hex(),
                    source="live", token=token_id, keyslot=token.keyslot, entry=boot_current,
                    status="booted", adopted=True, created=now(), confirmed=now(), serial=journal.next_serial())
                notes.append(f"adopted token {token_id} (keyslot {token.keyslot}): sealed to the booted chain")
                break

    new = []
    for uki in ukis:
        if uki.path not in digests:
            continue
        key = chain_key(shim_digest, digests[uki.path])
        known = journal.chains.get(key)
        if key == booted_key or (known and known.status != "sealed"):
            continue
        new.append({"uki": uki.path, "esp_path": uki.esp_path, "digest": digests[uki.path], "key": key,
                    "mtime": os.stat(uki.path).st_mtime})
    # A LUKS2 header holds about ten systemd-tpm2 tokens, and retirement keeps the booted
    # chain plus keep_previous: seal only that many of the newest new UKIs, say so for the rest.
    new.sort(key=lambda item: (item["mtime"], item["uki"]), reverse=True)
    limit = config.keep_previous + 1
    notes.extend(f"{item['uki']} not sealed: only the {limit} newest new UKI(s) get a key "
                 f"(keep_previous is {config.keep_previous})" for item in new[limit:])
    new = new[:limit]
    # Only a UKI whose file is gone (not one that fails to parse: dnf may be writing it) loses
    # its chain; the firmware cannot start a missing file, so no such chain is a next boot.
    doomed = [key for key, c in journal.live_chains().items()
              if c.uki and not os.path.exists(c.uki) and key != booted_key]
    booted_shim = keep_booted_shim(config.state_dir, shim, shim_digest, applications[0] if applications else None)
    if shim_changed and booted_shim is None:
        notes.append("no copy of the shim that booted now was kept (it was replaced before this tool ran): "
                     "prediction can only use the model")
    return Detected(live, live_banks, shim, shim_digest, shim_changed, booted_key, booted_uki, booted_shim,
                    boot_current, new, doomed, notes)


def keep_booted_shim(state_dir: str, shim: str, shim_digest: str, booted_digest: Optional[str]) -> Optional[str]:
    """A copy of the booted shim in state_dir, made while the ESP still has it: a shim update
    replaces the file in place, and predicting the boot after it needs the old one's
    measurements (its SBAT level, its digest in the log).  Returns the copy's path."""
    import shutil

    store = os.path.join(state_dir, SHIM_STORE)
    if booted_digest is None:
        return None
    wanted = os.path.join(store, f"{booted_digest}.efi")
    try:
        os.makedirs(store, mode=0o700, exist_ok=True)
        if shim_digest == booted_digest and not os.path.exists(wanted):
            partial = wanted + ".partial"
            shutil.copyfile(shim, partial)
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
            os.replace(partial, wanted)
        for name in os.listdir(store):
            if os.path.join(store, name) != wanted:
                os.unlink(os.path.join(store, name))
    except OSError as e:
        raise MachineError(f"cannot keep a copy of the booted shim in {store}: {e.strerror}") from None
    return wanted if os.path.exists(wanted) else None


# --- the steps ------------------------------------------------------------------------------

def predict(machine: Machine, detected: Detected) -> List[Dict[str, Any]]:
    from rhel_cvm_update.predict import predict_next_boot

    predictions = []
    # What the key is sealed to comes from these files: none may be writable by another user.
    if os.path.exists(machine.config.event_log):
        check_trusted_path(machine.config.event_log, "event log")
    for item in detected.new:
        check_trusted_path(item["uki"], "UKI")
        prediction = predict_next_boot(machine.config, item["uki"], tpm=machine.tpm, live=detected.live_banks,
                                       booted_shim=detected.booted_shim if detected.shim_changed else None)
        require_live_checked(prediction)
        missing = [p for p in machine.config.pcrs if p not in prediction.pcrs]
        if missing:
            raise PredictionError(f"the prediction for {item['uki']} has no value for PCRs {missing}")
        crash_point("predict", "inside")
        predictions.append(dict(item, pcrs={p: bytes(prediction.pcrs[p]) for p in machine.config.pcrs},
                                source=prediction.source, agreed=prediction.agreed,
                                sources_ran=[n for n, r in prediction.sources.items() if r["ran"]]))
    return predictions


def undo_interrupted_seal(machine: Machine, journal: Journal) -> Optional[str]:
    """A seal killed between luksAddKey and the token import leaves a keyslot no token names."""
    reserved = journal.pending.reserved if journal.pending else None
    if reserved is None:
        return None
    meta = machine.luks.metadata()
    slot = reserved.keyslot
    referenced = {int(s) for t in meta.tokens.values() for s in t.get("keyslots", [])}
    what = None
    if slot in meta.keyslots and slot not in referenced:
        machine.luks.kill_keyslot(slot)
        what = f"undid an interrupted seal: killed keyslot {slot}, which no token names"
    journal.pending.reserved = None
    journal.save()
    return what


def seal(machine: Machine, journal: Journal, detected: Detected,
         predictions: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    from rhel_cvm_update.reseal import reseal

    sealed = []
    for item in predictions:
        meta = machine.luks.metadata()
        journal.pending.reserved = Reservation(keyslot=meta.free_keyslot(), token=meta.free_token_id(),
                                               uki=item["uki"])
        journal.save()
        result = reseal(machine.config, machine.luks_for("seal"), machine.tpm, uki=item["uki"],
                        pcr_values=item["pcrs"])
        pcrs = {str(p): v.hex() for p, v in sorted(item["pcrs"].items())}
        journal.chains[item["key"]] = Chain(
            uki=item["uki"], esp_path=item["esp_path"], uki_digest=item["digest"],
            shim_digest=detected.shim_digest, pcrs=pcrs, policy_hash=result["policy_hash"],
            source=item["source"], agreed=item.get("agreed"), sources_ran=item.get("sources_ran"),
            token=result["token"], keyslot=result["keyslot"],
            entry=detected.boot_current if item["uki"] == detected.booted_uki else None,
            status="sealed", created=now(), serial=journal.next_serial(), mtime=item["mtime"])
        journal.pending.reserved = None
        journal.save()
        sealed.append({"uki": item["uki"], "action": result["action"], "token": result["token"],
                       "keyslot": result["keyslot"], "source": item["source"], "pcrs": pcrs,
                       "policy_hash": result["policy_hash"]})
    return sealed


def stage(machine: Machine, journal: Journal, detected: Detected) -> Optional[Dict[str, Any]]:
    """BootNext to the newest sealed chain that is not the booted UKI."""
    candidates = [(c.mtime or 0, key) for key, c in journal.chains.items()
                  if c.status == "sealed" and c.uki != detected.booted_uki
                  and c.shim_digest == detected.shim_digest and c.uki and os.path.isfile(c.uki)]
    if not candidates:
        return None
    _, key = max(candidates)
    chain = journal.chains[key]
    manager = machine.boot_manager("stage", need_partition=True)
    number, changes = manager.plan_add(manager.uki(chain.uki), once=True)
    manager.apply(changes)
    for other in journal.chains.values():
        if other.status == "staged":
            other.status = "sealed"
    chain.status, chain.entry = "staged", number
    journal.save()
    return {"uki": chain.uki, "entry": f"Boot{number:04X}", "token": chain.token}


def remove(machine: Machine, journal: Journal, keys: List[str]) -> List[Dict[str, Any]]:
    """Entry (if no kept chain boots the same UKI), then token, then keyslot, of each chain;
    each part only if it is still the one the journal recorded."""
    pending = journal.pending
    pending.doomed = sorted(set(pending.doomed) | set(keys))
    journal.save()
    luks = machine.luks_for("remove")
    removed = []
    for key in list(pending.doomed):
        chain = journal.chains[key]
        kept_paths = {(c.esp_path or "").lower() for k, c in journal.live_chains().items()
                      if k != key and k not in pending.doomed}
        done: Dict[str, Any] = {"uki": chain.uki, "token": None, "keyslot": None, "entries": []}
        if chain.esp_path and chain.esp_path.lower() not in kept_paths:
            manager = machine.boot_manager("remove")
            changes = manager.plan_remove(chain.esp_path)
            manager.apply(changes)
            done["entries"] = [c.target for c in changes if c.target.startswith("Boot") and c.new is None]
        meta = machine.luks.metadata()
        token = meta.systemd_tpm2_tokens().get(chain.token)
        if token is not None and token.policy_hash.hex() == chain.policy_hash and token.keyslot == chain.keyslot:
            luks.remove_token(chain.token)
            done["token"] = chain.token
            meta = machine.luks.metadata()
        referenced = {int(s) for t in meta.tokens.values() for s in t.get("keyslots", [])}
        # Unreferenced: its token went just now or in an interrupted earlier run.  A keyslot
        # some other token names (a reused number) is not this chain's any more.
        if chain.keyslot in meta.keyslots and chain.keyslot not in referenced:
            luks.kill_keyslot(chain.keyslot)
            done["keyslot"] = chain.keyslot
        chain.status, chain.retired = "retired", now()
        pending.doomed = [k for k in pending.doomed if k != key]
        journal.save()
        removed.append(done)
    return removed


# --- results ----------------------------------------------------------------------------------

@dataclasses.dataclass
class UpdateResult:
    outcome: str                      # staged | nothing-to-do | refused | removed
    booted_uki: Optional[str]
    shim_changed: bool
    sealed: List[Dict[str, Any]]
    staged: Optional[Dict[str, Any]]
    removed: List[Dict[str, Any]]
    recovered: List[str]
    notes: List[str]
    reason: Optional[str] = None
    refusal: Optional[str] = None     # the error kind of a refusal, e.g. "sources-disagree"

    def to_json(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), command="update")


@dataclasses.dataclass
class ConfirmResult:
    outcome: str                      # confirmed | trial-failed | nothing-to-do
    booted_uki: Optional[str]
    boot_current: Optional[str]
    promoted: Optional[str]
    kept: List[str]
    removed: List[Dict[str, Any]]
    recovered: List[str]
    notes: List[str]
    reason: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), command="confirm")


def _recover(machine: Machine, journal: Journal) -> List[str]:
    recovered = []
    pending = journal.pending
    if pending is None:
        return recovered
    recovered.append(f"resumed an interrupted {pending.kind} (stopped at {pending.step}:{pending.phase})")
    undone = undo_interrupted_seal(machine, journal)
    if undone:
        recovered.append(undone)
    if pending.doomed:
        finished = remove(machine, journal, [])
        recovered.append("finished removing " + ", ".join(str(r["uki"]) for r in finished))
    return recovered


# --- the two transactions ---------------------------------------------------------------------

@contextlib.contextmanager
def _transaction(config, command: str, hooks, lock_timeout: Optional[float]):
    """What both transactions start with, under the lock: the journal, the TPM, recovery of an
    interrupted run, then detect.  Yields (machine, journal, recovered, detected, record); a
    failure is recorded as the last result before it propagates."""
    from rhel_cvm_update.adapters.tpm import Tpm

    with writing_command(config.state_dir, command, lock_timeout) as record:
        journal = Journal(config.state_dir)
        with Tpm(config.tpm) as tpm:
            machine = Machine(config, tpm)
            with hooks.critical():
                recovered = _recover(machine, journal)
            journal.begin(command)
            detected = _run_step(journal, hooks, "detect", config.uki_dir, lambda: detect(machine, journal))
            yield machine, journal, recovered, detected, record


def run_update(config, *, hooks=None, lock_timeout: Optional[float] = None) -> UpdateResult:
    hooks = hooks or NullHooks()
    with _transaction(config, "update", hooks, lock_timeout) as (machine, journal, recovered, detected, record):
        try:
            predictions = _run_step(journal, hooks, "predict", f"{len(detected.new)} new chain(s)",
                                    lambda: predict(machine, detected))
        except PredictionError as e:
            journal.finish()
            result = UpdateResult("refused", detected.booted_uki, detected.shim_changed, [], None, [],
                                  recovered, detected.notes, reason=str(e), refusal=e.kind)
            record(result.to_json())
            return result
        with hooks.critical():
            sealed = _run_step(journal, hooks, "seal", f"{len(predictions)} chain(s)",
                               lambda: seal(machine, journal, detected, predictions))
            staged = _run_step(journal, hooks, "stage", "BootNext",
                               lambda: stage(machine, journal, detected))
            removed = _run_step(journal, hooks, "remove", f"{len(detected.doomed)} chain(s)",
                                lambda: remove(machine, journal, detected.doomed))
        journal.finish()
        # A chain sealed without BootNext (the booted UKI under a new shim) is staged too:
        # BootOrder already starts it.
        outcome = "staged" if staged or sealed else ("removed" if removed else "nothing-to-do")
        result = UpdateResult(outcome, detected.booted_uki, detected.shim_changed, sealed, staged, removed,
                              recovered, detected.notes)
        record(result.to_json())
        return result


def _retire_candidates(config, journal: Journal, booted_key: str, shim_digest: str) -> Tuple[List[str], List[str]]:
    """(kept, doomed): the booted chain plus the keep_previous most recently sealed or
    confirmed others that can still boot (same shim as on the ESP now) are kept."""
    others = [(c.serial, key) for key, c in journal.live_chains().items() if key != booted_key]
    others.sort(reverse=True)
    bootable = [key for _, key in others if journal.chains[key].shim_digest == shim_digest]
    kept = bootable[:config.keep_previous]
    doomed = [key for _, key in others if key not in kept]
    return [booted_key] + kept, doomed


def confirm(machine: Machine, journal: Journal, detected: Detected) -> Tuple[str, Optional[str], List[str], Optional[str]]:
    """(outcome, promoted entry, doomed chain keys, reason)."""
    config = machine.config
    policy = _policy(config, detected.live).hex()
    booted = next((k for k, c in journal.live_chains().items() if c.policy_hash == policy), None)
    staged_key = next((k for k, c in journal.chains.items() if c.status == "staged"), None)
    staged = journal.chains[staged_key] if staged_key is not None else None
    if booted is None:
        return "nothing-to-do", None, [], ("the live PCRs match no chain of this tool; "
                                            "run 'rhel-cvm-update update' to seal for this boot")
    chain = journal.chains[booted]
    if staged is not None and staged_key != booted and machine.boot_manager().state().boot_next == staged.entry:
        # The firmware deletes BootNext when it boots it: still set, the trial is yet to come.
        return "nothing-to-do", None, [], f"{staged.uki} is staged for the next boot"
    if staged is not None and staged_key != booted:
        journal.trial_failed = TrialFailure(staged_uki=staged.uki, staged_entry=staged.entry, booted_uki=chain.uki,
                                            boot_current=detected.boot_current, at=now())
        staged.status = "trial-failed"
        journal.save()
        return "trial-failed", None, [], (f"the staged {staged.uki} did not come up: this "
                                          f"boot is {chain.uki}; everything is left in place")
    if staged is None and chain.status != "sealed":
        # Already confirmed, or an older chain chosen by hand: BootOrder stays as it is.
        return "nothing-to-do", None, [], None
    promoted = None
    manager = machine.boot_manager("confirm", need_partition=True)
    if chain.uki and os.path.isfile(chain.uki):
        number, changes = manager.plan_add(manager.uki(chain.uki), once=False)
        manager.apply(changes)
        promoted = f"Boot{number:04X}"
        chain.entry = number
    for other in journal.chains.values():
        if other.status == "booted":
            other.status = "previous"
    chain.status, chain.confirmed, chain.serial = "booted", now(), journal.next_serial()
    journal.trial_failed = None
    _, doomed = _retire_candidates(config, journal, booted, detected.shim_digest)
    journal.pending.doomed = sorted(set(journal.pending.doomed) | set(doomed))
    journal.save()
    return "confirmed", promoted, doomed, None


def run_confirm(config, *, hooks=None, lock_timeout: Optional[float] = None) -> ConfirmResult:
    hooks = hooks or NullHooks()
    with _transaction(config, "confirm", hooks, lock_timeout) as (machine, journal, recovered, detected, record):
        with hooks.critical():
            outcome, promoted, doomed, reason = _run_step(
                journal, hooks, "confirm", f"BootCurrent {detected.boot_current}",
                lambda: confirm(machine, journal, detected))
            removed = _run_step(journal, hooks, "remove", f"{len(doomed)} chain(s)",
                                lambda: remove(machine, journal, doomed))
        journal.finish()
        kept = [c.uki for c in journal.live_chains().values()]
        current = None if detected.boot_current is None else f"Boot{detected.boot_current:04X}"
        result = ConfirmResult(outcome, detected.booted_uki, current, promoted, kept, removed, recovered,
                               detected.notes, reason)
        record(result.to_json())
        return result
