"""What `rhel-cvm-update status` knows, without the TPM, in well under a second.

Sources: the journal and last result in state_dir (journal.py), efivarfs (BootCurrent,
BootNext, BootOrder, the Boot#### entries), the LUKS2 header's JSON (read from the header
bytes, formats/luks2_header.py, without starting cryptsetup), the ESP (uki_dir, shim), and the live PCRs -- from
``/sys/class/tpm/tpm0/pcr-sha256/N`` where the kernel offers them, else replayed from the
event log, else as the last transaction recorded them (the JSON says which).

Exit codes: 0 the next boot will unlock; 1 attention is needed (``attention`` says what to
run); 2 error (something could not be read).
"""

import hmac
import os
from typing import Any, Dict, List, Optional, Tuple

from rhel_cvm_update.errors import CvmUpdateError
from rhel_cvm_update.journal import Journal, LiveReading, read_last_result

SYSFS_PCRS = "/sys/class/tpm/tpm0/pcr-sha256"
EXIT_OK, EXIT_ATTENTION, EXIT_ERROR = 0, 1, 2


def live_pcrs(config, recorded: Optional[LiveReading], sysfs: str = SYSFS_PCRS) -> Tuple[Optional[Dict[int, bytes]], str]:
    try:
        return {p: bytes.fromhex(open(os.path.join(sysfs, str(p))).read().strip()) for p in config.pcrs}, "sysfs"
    except (OSError, ValueError):
        pass
    try:
        from rhel_cvm_update.formats import tcglog
        from rhel_cvm_update.predict import read_event_log

        replayed = tcglog.replay(read_event_log(config.event_log), ["sha256"], config.pcrs).get("sha256", {})
        if all(p in replayed for p in config.pcrs):
            return {p: replayed[p] for p in config.pcrs}, "event-log"
    except CvmUpdateError:
        pass
    if recorded is not None and recorded.pcrs:
        return {int(p): bytes.fromhex(v) for p, v in recorded.pcrs.items()}, "recorded " + recorded.read
    return None, "unknown"


def _boot_state(config) -> Dict[str, Any]:
    from rhel_cvm_update.bootmgr import open_boot_manager

    state = open_boot_manager(config).state()
    entries = [{"entry": e.name, "description": e.option.description if e.option else None,
                "uki": e.option.optional_data_path() if e.option else None, "managed": e.managed,
                "error": e.error} for e in state.entries]
    name = lambda n: None if n is None else f"Boot{n:04X}"  # noqa: E731
    return {"boot_current": name(state.boot_current), "boot_next": name(state.boot_next),
            "boot_order": [name(n) for n in state.boot_order], "entries": entries}


def _luks_header(config):
    """The header's keyslots and tokens, from its bytes and checked by the same parser the
    transaction uses (a hostile header is a FormatError naming the field, not a crash)."""
    from rhel_cvm_update.adapters.cryptsetup import Cryptsetup, resolve_device

    return Cryptsetup(resolve_device(config.luks_device)).header_metadata()


def _host_path(config, efi_path: Optional[str]) -> Optional[str]:
    if not efi_path:
        return None
    return os.path.realpath(os.path.join(config.esp, *[p for p in efi_path.split("\\") if p]))


def _esp_shim(config) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(sha256 Authenticode of the shim on the ESP, its signature digest, None) or (None,
    None, why it cannot be read)."""
    # Only the digests: measure_image would also parse the signature (PKCS#7 through the
    # `cryptography` package, a third of status's start-up) for nothing.
    from rhel_cvm_update.formats.authenticode import authenticode_digests, signature_digest
    from rhel_cvm_update.formats.pe import PEImage
    from rhel_cvm_update.mapped import mapped_file
    from rhel_cvm_update.predict import shim_path

    path = shim_path(config)
    try:
        with mapped_file(path) as buf:
            image = PEImage.parse(buf, path)
            digest = authenticode_digests(buf, ("sha256",), path, image)["sha256"]
            return digest.hex(), signature_digest(buf, path, image), None
    except (CvmUpdateError, OSError) as e:
        return None, None, f"cannot read the shim {path}: {e}"


def _log_digests(config) -> List[str]:
    from rhel_cvm_update.predict import read_event_log

    try:
        log = read_event_log(config.event_log)
    except CvmUpdateError:
        return []
    return [bytes(e.digests["sha256"]).hex() for e in log.events if e.pcr == 4 and "sha256" in e.digests]


def collect_status(config) -> Dict[str, Any]:
    """The status document; ``exit_code`` and ``attention`` say what the admin should do."""
    from rhel_cvm_update.formats.tpm_policy import policy_pcr

    attention: List[str] = []
    errors: List[str] = []
    journal: Optional[Journal] = None
    try:
        journal = Journal(config.state_dir)
    except CvmUpdateError as e:
        errors.append(str(e))
    try:
        last = read_last_result(config.state_dir)
    except CvmUpdateError as e:
        last = None
        errors.append(str(e))
    chains = journal.chains if journal is not None else {}
    live_chains = {k: c for k, c in chains.items() if c.live}
    live, live_source = live_pcrs(config, journal.live if journal is not None else None)
    live_policy = policy_pcr(live, "sha256").hex() if live and sorted(live) == list(config.pcrs) else None

    try:
        boot = _boot_state(config)
    except CvmUpdateError as e:
        boot = {"boot_current": None, "boot_next": None, "boot_order": [], "entries": []}
        errors.append(str(e))
    entry_uki = {e["entry"]: e["uki"] for e in boot["entries"]}
    booted_uki = entry_uki.get(boot["boot_current"])
    staged = next((c for c in chains.values() if c.status == "staged"), None)

    tokens: List[Dict[str, Any]] = []
    keyslots: List[Dict[str, Any]] = []
    unaccounted: List[str] = []
    header_tokens: Dict[int, Dict[str, Any]] = {}
    try:
        header = _luks_header(config)
        header_tokens = header.tokens
    except (CvmUpdateError, OSError) as e:
        header = None
        errors.append(str(e))
    by_token = {c.token: c for c in live_chains.values()}
    for token_id, token in sorted(header_tokens.items()):
        slots = [int(s) for s in token["keyslots"]]
        chain = by_token.get(token_id)
        policy = token.get("tpm2-policy-hash")
        accounted = chain is not None and chain.policy_hash == policy
        tokens.append({"token": token_id, "type": token.get("type"), "keyslots": slots,
                       "pcrs": token.get("tpm2-pcrs"), "pcr_bank": token.get("tpm2-pcr-bank"),
                       "pin": bool(token.get("tpm2-pin")), "policy_hash": policy,
                       "matches_current_boot": bool(live_policy and policy
                                                    and hmac.compare_digest(policy, live_policy)),
                       "matches_staged_boot": bool(staged and policy == staged.policy_hash),
                       "uki": chain.uki if accounted else None,
                       "chain_status": chain.status if accounted else None})
        if not accounted:
            unaccounted.append(f"token {token_id} ({token.get('type')}, keyslots {slots}): not this tool's, kept")
    if header is not None:
        for slot in sorted(header.keyslots):
            owner = next((t["token"] for t in tokens if slot in t["keyslots"]), None)
            keyslots.append({"keyslot": slot, "token": owner})
            if owner is None:
                unaccounted.append(f"keyslot {slot}: no token (a passphrase or recovery key), kept")

    # The entry the firmware starts next, and whether a token opens the disk there.
    next_entry = boot["boot_next"] or (boot["boot_order"][0] if boot["boot_order"] else None)
    next_uki = entry_uki.get(next_entry)
    shim_digest, shim_signature, shim_error = _esp_shim(config)
    if shim_error:
        errors.append(shim_error)
    # A UKI can have several chains (before and after a shim update): the next boot is the
    # one with the shim on the ESP now.
    next_chain = next((c for c in live_chains.values()
                       if (c.esp_path or "").lower() == (next_uki or "").lower()
                       and c.has_shim(shim_digest, shim_signature)),
                      None)
    will_unlock, why = False, "no Boot entry to start"
    live_tokens = [t for t in tokens if t["matches_current_boot"]]
    if next_chain is not None:
        token = header_tokens.get(next_chain.token)
        will_unlock = bool(token and token.get("tpm2-policy-hash") == next_chain.policy_hash)
        why = (f"token {next_chain.token} is sealed to its predicted PCRs" if will_unlock
               else f"its token {next_chain.token} is missing from the header")
        uki_file = next_chain.uki
        if will_unlock and uki_file and not os.path.exists(uki_file):
            will_unlock, why = False, f"{uki_file} is gone: the firmware will skip the entry"
        if will_unlock and next_chain.mtime and uki_file and os.path.exists(uki_file) \
                and os.stat(uki_file).st_mtime != next_chain.mtime:
            will_unlock, why = False, f"{uki_file} changed since it was sealed"
    elif next_entry and next_entry == boot["boot_current"] and live_tokens:
        will_unlock, why = True, (f"it is the chain booted now and token {live_tokens[0]['token']} is sealed "
                                  "to the live PCRs")
        booted_chain = next((c for c in live_chains.values() if c.policy_hash == live_policy), None)
        if shim_digest not in _log_digests(config):
            will_unlock, why = False, "the shim on the ESP is not the one that booted now"
        elif booted_chain is not None and not booted_chain.has_shim(shim_digest, shim_signature):
            will_unlock, why = False, ("the shim on the ESP was re-signed since this boot "
                                       "(its signers are measured into PCR7)")
    elif next_entry:
        why = f"{next_entry} ({next_uki}) has no token of this tool"
    notes: List[str] = []
    if next_chain is not None and next_chain.sources_ran is not None and next_chain.agreed is None:
        notes.append(f"the next boot's PCRs were predicted by the {' and '.join(next_chain.sources_ran)} "
                     f"source only: the other could not run, so nothing cross-checked them")
    if not will_unlock:
        attention.append(f"the next boot ({next_entry or 'none'}) may not unlock: {why}; run 'rhel-cvm-update update'")

    known_paths = {c.uki for c in chains.values()}
    try:
        ukis = sorted(os.path.join(config.uki_dir, n) for n in os.listdir(config.uki_dir) if n.lower().endswith(".efi"))
    except OSError:
        ukis = []
    booted_file = _host_path(config, booted_uki)
    new = [u for u in ukis if u not in known_paths and os.path.realpath(u) != booted_file]
    if new:
        attention.append("UKIs not sealed yet: " + ", ".join(new) + "; run 'rhel-cvm-update update'")
    pending = journal.pending if journal is not None else None
    trial_failed = journal.trial_failed if journal is not None else None
    if pending is not None:
        attention.append(f"an interrupted {pending.kind} (at {pending.step}:{pending.phase}); "
                         f"run 'rhel-cvm-update {pending.kind}' to finish it")
    if trial_failed is not None:
        attention.append(f"the trial boot of {trial_failed.staged_uki} failed (the VM came up with "
                         f"{trial_failed.booted_uki}); "
                         "check that kernel, then remove it or run 'rhel-cvm-update update' after fixing it")
    if last and last.get("outcome") in ("refused", "failed"):
        attention.append(f"the last {last.get('command')} {last['outcome']}: {last.get('reason')}")
    if staged and staged.entry is not None and boot["boot_next"] != f"Boot{staged.entry:04X}":
        attention.append(f"{staged.uki} is staged but BootNext does not name it; run 'rhel-cvm-update update'")

    from rhel_cvm_update.growroot import attention as grow_root_attention

    attention.extend(grow_root_attention(config, header.keyslots if header is not None else None))
    exit_code = EXIT_ERROR if errors else (EXIT_ATTENTION if attention else EXIT_OK)
    return {
        "exit_code": exit_code,
        "booted": {"entry": boot["boot_current"], "uki": booted_uki},
        "live_pcrs": {"source": live_source,
                      "sha256": {str(p): v.hex() for p, v in sorted(live.items())} if live else None},
        "next_boot": {"entry": next_entry, "uki": next_uki, "will_unlock": will_unlock, "why": why,
                      "prediction_sources": next_chain.sources_ran if next_chain else None,
                      "sources_agreed": next_chain.agreed if next_chain else None},
        "staged": {"uki": staged.uki, "entry": f"Boot{staged.entry:04X}" if staged.entry is not None
                   else None, "token": staged.token} if staged else None,
        "tokens": tokens,
        "keyslots": keyslots,
        "unaccounted": unaccounted,
        "boot_entries": boot["entries"],
        "boot_order": boot["boot_order"],
        "boot_next": boot["boot_next"],
        "chains": [dict(c.to_json(), key=k) for k, c in sorted(chains.items()) if c.status != "retired"],
        "pending": pending.to_json() if pending is not None else None,
        "trial_failed": trial_failed.to_json() if trial_failed is not None else None,
        "last_result": last,
        "attention": attention,
        "notes": notes,
        "errors": errors,
    }
