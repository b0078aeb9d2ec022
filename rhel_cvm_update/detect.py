"""Step 1 of both transactions: what is on the ESP against what the journal knows.

The booted chain (BootCurrent's entry, the digests in the current event log), the UKIs in
uki_dir and which of them are new (no chain yet, for the shim on the ESP), chains whose UKI
is gone, a changed shim, and the VM's first token adopted as the booted chain's.

A shim is changed when its Authenticode digest (PCR4) or its signatures (PCR7's authority
events) are not the booted shim's: a shim re-signed in place, as the move from Microsoft's
2011 CA to its 2023 CA does, keeps its digest and still changes PCR7.
"""

import dataclasses
import os
from typing import Any, Dict, List, Optional, Set, Tuple

from rhel_cvm_update.errors import CvmUpdateError, MachineError
from rhel_cvm_update.journal import Chain, Journal, LiveReading, now
from rhel_cvm_update.machine import Machine, crash_point, file_signature_digest

SHIM_STORE = "booted-shim"


def chain_key(shim_digest: str, uki_digest: str, shim_signature: Optional[str] = None) -> str:
    """A chain's journal key: the shim's digest (with the start of its signature digest when
    it is signed: one shim signed two ways is two chains) and the UKI's digest."""
    shim = f"{shim_digest}+{shim_signature[:16]}" if shim_signature else shim_digest
    return f"{shim}:{uki_digest}"


@dataclasses.dataclass
class Detected:
    live: Dict[int, bytes]
    live_banks: Dict[str, Dict[int, bytes]]
    shim: str
    shim_digest: str
    shim_signature: str                 # signature digest of the shim on the ESP ("" unsigned)
    shim_changed: bool
    booted_key: Optional[str]
    booted_uki: Optional[str]
    booted_shim: Optional[str]          # a copy of the shim that booted now
    boot_current: Optional[int]
    new: List[Dict[str, Any]]           # {"uki", "esp_path", "digest", "mtime"}
    doomed: List[str]                   # chain keys whose UKI is gone
    notes: List[str]


def live_policy(config, pcrs: Dict[int, bytes]) -> bytes:
    """The PolicyPCR digest of the configured PCRs at these values (what a token sealed to
    them carries)."""
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


def _likely_predicted(journal: Journal, mtimes: Dict[str, float], limit: int) -> Set[str]:
    """The UKIs the prediction will probably measure: the ``limit`` newest that no live chain
    records with this mtime.  Only their digests are computed in every live bank now (and
    kept for the prediction); the others only in sha256, which is all detect needs.  A
    wrong guess costs a second pass over one file, never a wrong digest."""
    known = {(c.uki, c.mtime) for c in journal.live_chains().values()}
    unknown = sorted(((mtime, path) for path, mtime in mtimes.items() if (path, mtime) not in known), reverse=True)
    return {path for _, path in unknown[:limit]}


def _booted_shim_signature(journal: Journal, state_dir: str, policy: bytes, logged: List[str],
                           shim_digest: str, shim_signature: str) -> Tuple[Optional[str], Optional[str]]:
    """(journal key, signature digest) of the shim booted now.  The proof is the journal's
    chain that the live PCRs give (its policy; of two such chains, one sealed for the ESP's
    shim, since their PCRs are the same); without one that recorded it, the copy of the
    booted shim kept in state_dir, or the ESP's shim if it is the one in the log."""
    matching = [(key, chain) for key, chain in journal.live_chains().items()
                if chain.policy_hash == policy.hex() and [chain.shim_digest, chain.uki_digest] == logged[:2]]
    matching.sort(key=lambda item: (item[1].shim_signature != shim_signature, item[1].shim_signature is None))
    if matching and matching[0][1].shim_signature is not None:
        return matching[0][0], matching[0][1].shim_signature
    key = matching[0][0] if matching else None
    kept = os.path.join(state_dir, SHIM_STORE, f"{logged[0]}.efi")
    if os.path.exists(kept):
        return key, file_signature_digest(kept)
    if shim_digest == logged[0]:
        return key, shim_signature
    return key, None


def detect(machine: Machine, journal: Journal) -> Detected:
    from rhel_cvm_update.formats.efi import EFI_GLOBAL_VARIABLE
    from rhel_cvm_update.predict import booted_chain, prediction_banks, read_live_pcrs, shim_path

    config = machine.config
    notes: List[str] = []
    live_banks = read_live_pcrs(machine.tpm, config.pcrs)
    live = live_banks["sha256"]
    machine.banks = tuple(prediction_banks(live_banks))
    crash_point("detect", "inside")
    journal.live = LiveReading(pcrs={str(p): v.hex() for p, v in sorted(live.items())}, read=now())
    applications = _log_application_digests(config)
    shim = shim_path(config)
    shim_digest = machine.digest(shim)
    shim_signature = file_signature_digest(shim)
    policy = live_policy(config, live)
    booted_key, booted_signature = (_booted_shim_signature(journal, config.state_dir, policy, applications,
                                                           shim_digest, shim_signature)
                                    if len(applications) >= 2 else (None, None))
    shim_changed = shim_digest not in applications or booted_signature not in (None, shim_signature)
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
    mtimes = {u.path: os.stat(u.path).st_mtime for u in ukis if not u.problem}
    likely_new = _likely_predicted(journal, mtimes, config.keep_previous + 1)
    digests: Dict[str, str] = {}
    for uki in ukis:
        if uki.problem:
            notes.append(f"{uki.path} skipped: {uki.problem}")
            continue
        digests[uki.path] = machine.digest(uki.path, all_banks=uki.path in likely_new)
        if booted_uki is None and digests[uki.path] in applications[1:2]:
            booted_uki = uki.path
    if booted_key is None and len(applications) >= 2:
        booted_key = chain_key(applications[0], applications[1], booted_signature)

    # The VM's first token (systemd-cryptenroll, or converted from Azure's import token) is
    # the booted chain's: its policy digest is the one the live PCRs give.
    if booted_key and not any(c.policy_hash == policy.hex() for c in journal.live_chains().values()):
        tokens = machine.luks.metadata().systemd_tpm2_tokens()
        owned = {c.token for c in journal.live_chains().values()}
        for token_id, token in sorted(tokens.items()):
            if token_id not in owned and _token_accounts(config, token, policy):
                journal.chains[booted_key] = Chain(
                    uki=booted_uki, esp_path=machine.esp.efi_path(booted_uki) if booted_uki else None,
                    uki_digest=applications[1], shim_digest=applications[0], shim_signature=booted_signature,
                    pcrs={str(p): v.hex() for p, v in sorted(live.items())}, policy_hash=policy.hex(),
                    source="live", token=token_id, keyslot=token.keyslot, entry=boot_current,
                    status="booted", adopted=True, created=now(), confirmed=now(), serial=journal.next_serial())
                notes.append(f"adopted token {token_id} (keyslot {token.keyslot}): sealed to the booted chain")
                break

    new = []
    for uki in ukis:
        if uki.path not in digests:
            continue
        key = chain_key(shim_digest, digests[uki.path], shim_signature)
        known = journal.chains.get(key) or (None if shim_changed else _unsigned_record(journal, shim_digest,
                                                                                          digests[uki.path]))
        if key == booted_key or (known and known.status != "sealed"):
            continue
        new.append({"uki": uki.path, "esp_path": uki.esp_path, "digest": digests[uki.path], "key": key,
                    "mtime": mtimes[uki.path]})
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
    booted_shim = keep_booted_shim(config.state_dir, shim, (shim_digest, shim_signature),
                                   (applications[0], booted_signature) if applications else None)
    if shim_changed and booted_shim is None:
        notes.append("no copy of the shim that booted now was kept (it was replaced before this tool ran): "
                     "prediction can only use the model")
    return Detected(live, live_banks, shim, shim_digest, shim_signature, shim_changed, booted_key, booted_uki,
                    booted_shim, boot_current, new, doomed, notes)


def _unsigned_record(journal: Journal, shim_digest: str, uki_digest: str) -> Optional[Chain]:
    """A chain journaled before shim signatures were recorded (its key has none) for this pair."""
    return next((c for c in journal.chains.values() if c.shim_signature is None and c.shim_digest == shim_digest
                 and c.uki_digest == uki_digest), None)


def keep_booted_shim(state_dir: str, shim: str, on_esp: Tuple[str, str],
                     booted: Optional[Tuple[str, Optional[str]]]) -> Optional[str]:
    """A copy of the booted shim in state_dir, made while the ESP still has it: a shim update
    replaces the file in place, and predicting the boot after it needs the old one's
    measurements (its SBAT level, its signers, its digest in the log).  ``on_esp`` and
    ``booted`` are (digest, signature digest) pairs.  Returns the copy's path."""
    import shutil

    store = os.path.join(state_dir, SHIM_STORE)
    if booted is None:
        return None
    wanted = os.path.join(store, f"{booted[0]}.efi")
    try:
        os.makedirs(store, mode=0o700, exist_ok=True)
        stale = os.path.exists(wanted) and booted[1] is not None and file_signature_digest(wanted) != booted[1]
        if on_esp == booted and (stale or not os.path.exists(wanted)):
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
