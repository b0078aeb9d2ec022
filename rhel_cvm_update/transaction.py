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

Test hook (fault injection, machine.py): ``RHEL_CVM_UPDATE_CRASH_AT=<step>:<before|inside|after>``
makes the process SIGKILL itself at that point; ``inside`` is after the first write of the step.
"""

import contextlib
import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from rhel_cvm_update.errors import PredictionError
from rhel_cvm_update.detect import Detected, detect, live_policy
from rhel_cvm_update.journal import Chain, Journal, Reservation, TrialFailure, now, writing_command
from rhel_cvm_update.machine import Machine, crash_point
from rhel_cvm_update.trust import check_trusted_path, require_live_checked

UPDATE_STEPS = ("detect", "predict", "seal", "stage", "remove")  # the crash points' step names
CONFIRM_STEPS = ("detect", "confirm", "remove")


class NullHooks:
    """What run_update/run_confirm call when no daemon listens."""

    def step(self, name: str, detail: Any = "") -> None:
        pass

    def critical(self):
        return contextlib.nullcontext()


def _run_step(journal: Journal, hooks, name: str, detail: str, work: Callable[[], Any]) -> Any:
    hooks.step(name, detail)
    journal.mark(name, "before")
    crash_point(name, "before")
    result = work()
    journal.mark(name, "after")
    crash_point(name, "after")
    return result


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
                                       booted_shim=detected.booted_shim if detected.shim_changed else None,
                                       digest_cache=machine.digest_cache)
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
            shim_digest=detected.shim_digest, shim_signature=detected.shim_signature, pcrs=pcrs,
            policy_hash=result["policy_hash"],
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
    """BootNext to the newest sealed chain of a new UKI: not the booted one, and none that a
    confirmed boot already ran (a shim change seals every kept UKI again, and an older kernel
    must not become the next boot; BootOrder's head, the booted UKI, stays next)."""
    confirmed = {c.uki_digest for c in journal.chains.values() if c.confirmed is not None}
    candidates = [(c.mtime or 0, key) for key, c in journal.chains.items()
                  if c.status == "sealed" and c.uki != detected.booted_uki and c.uki_digest not in confirmed
                  and c.has_shim(detected.shim_digest, detected.shim_signature) and c.uki and os.path.isfile(c.uki)]
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
        kept = [c for k, c in journal.live_chains().items() if k != key and k not in pending.doomed]
        kept_paths = {(c.esp_path or "").lower() for c in kept}
        done: Dict[str, Any] = {"uki": chain.uki, "token": None, "keyslot": None, "entries": []}
        if chain.esp_path and chain.esp_path.lower() not in kept_paths:
            manager = machine.boot_manager("remove")
            changes = manager.plan_remove(chain.esp_path)
            manager.apply(changes)
            done["entries"] = [c.target for c in changes if c.target.startswith("Boot") and c.new is None]
        meta = machine.luks.metadata()
        token = meta.systemd_tpm2_tokens().get(chain.token)
        # A kept chain can share the token: sealing reuses one whose PCRs are the prediction
        # (a shim re-signed while Secure Boot is off measures as before).
        shared = any(c.token == chain.token and c.keyslot == chain.keyslot for c in kept)
        if (token is not None and not shared and token.policy_hash.hex() == chain.policy_hash
                and token.keyslot == chain.keyslot):
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


def _retire_candidates(config, journal: Journal, booted_key: str, detected: Detected) -> Tuple[List[str], List[str]]:
    """(kept, doomed): the booted chain plus the keep_previous most recently sealed or
    confirmed others that can still boot (same shim as on the ESP now) are kept."""
    others = [(c.serial, key) for key, c in journal.live_chains().items() if key != booted_key]
    others.sort(reverse=True)
    bootable = [key for _, key in others if journal.chains[key].has_shim(detected.shim_digest, detected.shim_signature)]
    kept = bootable[:config.keep_previous]
    doomed = [key for _, key in others if key not in kept]
    return [booted_key] + kept, doomed


def confirm(machine: Machine, journal: Journal, detected: Detected) -> Tuple[str, Optional[str], List[str], Optional[str]]:
    """(outcome, promoted entry, doomed chain keys, reason)."""
    config = machine.config
    policy = live_policy(config, detected.live).hex()
    # Two chains can have the live PCRs (a shim re-signed with Secure Boot off measures the
    # same): the booted one is detect's, sealed for the shim on the ESP.
    chains = sorted(journal.live_chains().items(), key=lambda item: item[0] != detected.booted_key)
    booted = next((k for k, c in chains if c.policy_hash == policy), None)
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
    _, doomed = _retire_candidates(config, journal, booted, detected)
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
