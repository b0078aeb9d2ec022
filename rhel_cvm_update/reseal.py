"""Reseal: add a keyslot + systemd-tpm2 token sealed to the PCRs predicted for the next boot.

Order of operations, chosen so that a failure at any step leaves the header as it was
or with one extra, working keyslot and token (never fewer ways in):

1. read the LUKS2 metadata and parse every systemd-tpm2 token (malformed: stop);
2. work out the target PCR values (prediction, or explicit ``--pcr`` values) and their
   PolicyPCR digest, offline;
3. a token already sealed to that digest is reused: nothing is written;
4. find the unlock: the key from stdin, or a token whose policy digest equals the one the
   live PCRs give (checked before unsealing: a doomed unseal would cost a DA try);
5. seal a fresh 32-byte secret, add its base64 as a new keyslot (pbkdf2/sha512/1000),
   import the token; if the import fails the new keyslot is killed again;
6. verify: export the token, parse it as systemd would, check its policy digest and the
   sealed object's authPolicy against the target, and test the passphrase on the keyslot.

``enroll_from_tpm2_import`` converts Azure's tpm2-import token the same way, keeping
the secret and keyslot and re-sealing to the same policy (reference 5.1).
"""

import contextlib
import dataclasses
import datetime
import hmac
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from rhel_cvm_update.errors import ConfigError, MachineError, UnsupportedError
from rhel_cvm_update.formats import tpm_policy
from rhel_cvm_update.formats.luks_token import SystemdTpm2Token
from rhel_cvm_update.secrets import Secret
from rhel_cvm_update.trust import check_trusted_path, require_live_checked

PCR_BANK = "sha256"
SECRET_SIZE = 32  # systemd seals 256 random bits (reference 4.2)
_PCR_OPTION_RE = re.compile(r"^([0-9]{1,2})=([0-9a-fA-F]{64})$")
_UNSUPPORTED_POLICY_FIELDS = ("tpm2_pubkey", "tpm2_pubkey_pcrs", "tpm2_pcrlock")


@dataclasses.dataclass(frozen=True)
class Target:
    """The PCR values a new token is sealed to, and where they came from."""

    pcrs: Dict[int, bytes]
    source: str          # "log" or "model" (prediction) or "explicit" (--pcr)
    uki: Optional[str]

    @property
    def policy_digest(self) -> bytes:
        return tpm_policy.policy_pcr(self.pcrs, PCR_BANK)

    def record(self) -> Dict[str, Any]:
        """The tool's own field in the token (systemd ignores it)."""
        return {"uki": self.uki, "source": self.source,
                "pcrs": {str(p): v.hex() for p, v in sorted(self.pcrs.items())},
                "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def parse_pcr_options(options: Sequence[str], pcrs: Sequence[int]) -> Dict[int, bytes]:
    """``--pcr N=HEX`` values; they must give exactly the configured PCRs."""
    values: Dict[int, bytes] = {}
    for option in options:
        match = _PCR_OPTION_RE.match(option)
        if not match or int(match.group(1)) >= tpm_policy.PCR_COUNT:
            raise ConfigError(f"--pcr {option!r}: expected N=HEX with N 0-23 and 64 hex digits (sha256)")
        pcr = int(match.group(1))
        if pcr in values:
            raise ConfigError(f"--pcr {pcr} given twice")
        values[pcr] = bytes.fromhex(match.group(2))
    if sorted(values) != sorted(pcrs):
        raise ConfigError(f"--pcr values cover PCRs {sorted(values)}, the configuration seals to {sorted(pcrs)}")
    return values


def newest_uki(uki_dir: str) -> str:
    try:
        names = [n for n in os.listdir(uki_dir) if n.lower().endswith(".efi")]
    except OSError as e:
        raise ConfigError(f"uki_dir {uki_dir}: {e.strerror}") from None
    paths = [os.path.join(uki_dir, n) for n in names if os.path.isfile(os.path.join(uki_dir, n))]
    if not paths:
        raise ConfigError(f"no UKI (*.efi) in {uki_dir}; give --uki")
    return max(paths, key=lambda p: (os.stat(p).st_mtime, p))


def predict_target(config, tpm, uki: Optional[str]) -> Target:
    # Imported here: prediction pulls in the PE and event-log code, which `--pcr` avoids.
    from rhel_cvm_update.predict import predict_next_boot

    uki_path = uki or newest_uki(config.uki_dir)
    # What the key is sealed to comes from these files: none may be writable by another user.
    check_trusted_path(uki_path, "UKI")
    if os.path.exists(config.event_log):
        check_trusted_path(config.event_log, "event log")
    prediction = predict_next_boot(config, uki_path, tpm=tpm)
    require_live_checked(prediction)
    missing = [p for p in config.pcrs if p not in prediction.pcrs]
    if missing:
        raise UnsupportedError(f"the prediction for {uki_path} has no value for PCRs {missing}")
    return Target(pcrs={p: bytes(prediction.pcrs[p]) for p in config.pcrs}, source=prediction.source,
                  uki=uki_path)


def _usable_for_unlock(token: SystemdTpm2Token) -> bool:
    return not token.pin and not any(k in token.extra for k in _UNSUPPORTED_POLICY_FIELDS)


def find_unlock_token(tpm, tokens: Mapping[int, SystemdTpm2Token]) -> Optional[int]:
    """The lowest-numbered token whose policy digest the live PCRs satisfy (no unseal)."""
    live: Dict[Tuple[Tuple[int, ...], str], bytes] = {}
    for token_id in sorted(tokens):
        token = tokens[token_id]
        if not _usable_for_unlock(token):
            continue
        key = (token.pcrs, token.bank)
        if key not in live:
            try:
                live[key] = tpm.live_policy_digest(token.pcrs, token.bank)
            except MachineError:
                # The TPM has no such bank allocated: this token cannot unseal here.
                live[key] = b""
        if live[key] and hmac.compare_digest(live[key], token.policy_hash):
            return token_id
    return None


def verify_token(luks, token_id: int, keyslot: int, policy_digest: bytes) -> SystemdTpm2Token:
    """Read the token back and check it the way systemd and the TPM will see it."""
    exported = SystemdTpm2Token.from_json(luks.export_token(token_id), token_id, luks.device)
    problems: List[str] = []
    if exported.keyslot != keyslot:
        problems.append(f"names keyslot {exported.keyslot}, expected {keyslot}")
    if not hmac.compare_digest(exported.policy_hash, policy_digest):
        problems.append(f"tpm2-policy-hash {exported.policy_hash.hex()} != predicted {policy_digest.hex()}")
    _, public = tpm_policy.split_sealed_blob(exported.blob, source=f"token {token_id} tpm2-blob")
    area = tpm_policy.parse_public_area(public[2:], source=f"token {token_id} TPMT_PUBLIC")
    if not hmac.compare_digest(area.auth_policy, policy_digest):
        problems.append(f"sealed object's authPolicy {area.auth_policy.hex()} != predicted {policy_digest.hex()}")
    if area.obj_type != tpm_policy.TPM_ALG_KEYEDHASH or area.attributes & tpm_policy.TPMA_OBJECT_USERWITHAUTH:
        problems.append(f"sealed object type {area.obj_type:#x} attributes {area.attributes:#x} "
                        "(want a keyed-hash object only the policy can open)")
    if problems:
        raise MachineError(f"{luks.device}: new token {token_id} failed verification: " + "; ".join(problems))
    return exported


def _make_token(tpm, secret: Secret, policy_digest: bytes, keyslot: int, pcrs: Sequence[int], bank: str,
                record: Dict[str, Any]) -> SystemdTpm2Token:
    blob, alg = tpm.seal(secret, policy_digest)
    return SystemdTpm2Token(keyslot=keyslot, blob=blob, pcrs=tuple(sorted(pcrs)), pcr_bank=bank,
                            primary_alg=alg, policy_hash=policy_digest, pin=False, tool_record=record)


def _import_verified(luks, token: SystemdTpm2Token, token_id: int, passphrase: Secret) -> None:
    """Import the token, read it back, test its passphrase; on any failure remove it again."""
    try:
        luks.import_token(token.to_json(), token_id)
        verify_token(luks, token_id, token.keyslot, token.policy_hash)
        if not luks.test_key(passphrase, token.keyslot):
            raise MachineError(f"{luks.device}: keyslot {token.keyslot} does not open with the sealed secret")
    except BaseException:
        if token_id in luks.metadata().tokens:
            luks.remove_token(token_id)
        raise


def reseal(config, luks, tpm, *, uki: Optional[str] = None, pcr_values: Optional[Dict[int, bytes]] = None,
           key: Optional[Secret] = None, dry_run: bool = False) -> Dict[str, Any]:
    """See the module docstring.  ``luks`` is a Cryptsetup, ``tpm`` an open Tpm."""
    meta = luks.metadata()
    tokens = meta.systemd_tpm2_tokens()
    pcrs = list(config.pcrs)
    if pcr_values is not None:
        if sorted(pcr_values) != sorted(pcrs):
            raise ConfigError(f"explicit values cover PCRs {sorted(pcr_values)}, the configuration seals to {pcrs}")
        target = Target(pcrs=dict(pcr_values), source="explicit", uki=uki)
    else:
        target = predict_target(config, tpm, uki)
    digest = target.policy_digest
    result: Dict[str, Any] = {"device": luks.device, "uki": target.uki, "source": target.source,
                              "pcr_bank": PCR_BANK,
                              "pcrs": {str(p): v.hex() for p, v in sorted(target.pcrs.items())},
                              "policy_hash": digest.hex(), "dry_run": dry_run}

    for token_id, token in sorted(tokens.items()):
        if (hmac.compare_digest(token.policy_hash, digest) and list(token.pcrs) == sorted(pcrs)
                and token.bank == PCR_BANK and not token.pin):
            result.update(action="reused", token=token_id, keyslot=token.keyslot)
            return result

    if key is not None:
        if not luks.test_key(key):
            raise MachineError(f"{luks.device}: the key given on stdin opens no keyslot")
        unlock_id = None
        result["unlocked_with"] = "key-file"
    else:
        unlock_id = find_unlock_token(tpm, tokens)
        if unlock_id is None:
            raise MachineError(f"{luks.device}: no systemd-tpm2 token is sealed to the current PCRs "
                               f"(tokens: {sorted(tokens) or 'none'}); for a first enrolment give the "
                               "passphrase with --key-file -")
        result["unlocked_with"] = f"token {unlock_id}"
    if meta.free_keyslot() is None or meta.free_token_id() is None:
        raise MachineError(f"{luks.device}: no free keyslot or token id")
    if dry_run:
        result.update(action="would-add", keyslot=meta.free_keyslot(), token=meta.free_token_id())
        return result

    slot, token_id = meta.free_keyslot(), meta.free_token_id()
    with contextlib.ExitStack() as stack:
        if key is not None:
            existing = key
        else:
            unsealed = stack.enter_context(tpm.unseal(tokens[unlock_id], unlock_id))
            existing = stack.enter_context(unsealed.base64())
        with Secret.random(SECRET_SIZE) as secret, secret.base64() as passphrase:
            token = _make_token(tpm, secret, digest, slot, pcrs, PCR_BANK, target.record())
            luks.add_keyslot(existing, passphrase, slot)
            try:
                _import_verified(luks, token, token_id, passphrase)
            except BaseException:
                luks.kill_keyslot(slot)
                raise
    result.update(action="added", token=token_id, keyslot=slot)
    return result


def enroll_from_tpm2_import(luks, tpm, *, dry_run: bool = False) -> Dict[str, Any]:
    """Convert every tpm2-import token into a systemd-tpm2 token on the same keyslot,
    sealed to the same policy, then remove the import token."""
    meta = luks.metadata()
    imports = meta.tpm2_import_tokens()
    existing = meta.systemd_tpm2_tokens()
    if not imports:
        raise ConfigError(f"{luks.device}: no tpm2-import token to convert")
    converted: List[Dict[str, Any]] = []
    for import_id, imported in sorted(imports.items()):
        entry: Dict[str, Any] = {"import_token": import_id, "keyslot": imported.keyslot,
                                 "pcrs": list(imported.pcrs), "pcr_bank": imported.pcr_bank,
                                 "policy_hash": imported.policy_digest.hex()}
        done = [t for t, tok in existing.items()
                if tok.keyslot == imported.keyslot and hmac.compare_digest(tok.policy_hash, imported.policy_digest)]
        if dry_run:
            entry["action"] = "would-remove-import" if done else "would-convert"
            converted.append(entry)
            continue
        if done:
            # A previous run stopped between importing the new token and removing this one.
            luks.remove_token(import_id)
            entry.update(action="removed-import", token=done[0])
            converted.append(entry)
            continue
        record = {"converted_from": "tpm2-import", "import_token": import_id,
                  "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        token_id = luks.metadata().free_token_id()
        if token_id is None:
            raise MachineError(f"{luks.device}: all 32 LUKS2 token ids are in use")
        with tpm.unseal_tpm2_import(imported, import_id) as secret, secret.base64() as passphrase:
            if not luks.test_key(passphrase, imported.keyslot):
                raise UnsupportedError(f"{luks.device}: keyslot {imported.keyslot} does not open with base64 "
                                       f"of the secret of tpm2-import token {import_id}; not converting")
            token = _make_token(tpm, secret, imported.policy_digest, imported.keyslot, imported.pcrs,
                                imported.pcr_bank, record)
            _import_verified(luks, token, token_id, passphrase)
        luks.remove_token(import_id)
        entry.update(action="converted", token=token_id)
        converted.append(entry)
    return {"device": luks.device, "dry_run": dry_run, "converted": converted}


def _checked_luks(config):
    """The configured LUKS2 device, its header checked before the TPM is opened: a device that
    is not LUKS2 is the admin's to fix (exit 2), not a failure of the machine."""
    from rhel_cvm_update.adapters.cryptsetup import Cryptsetup, resolve_device

    luks = Cryptsetup(resolve_device(config.luks_device))
    luks.check_header()
    return luks


def run_reseal(config, *, uki: Optional[str] = None, pcr_values: Optional[Dict[int, bytes]] = None,
               key_fd: Optional[int] = None, dry_run: bool = False) -> Dict[str, Any]:
    """``reseal`` as the CLI runs it: the device checked, then under the state lock (a dry run
    takes none) the TPM opened and ``reseal`` run, its result recorded.  ``key_fd``: read the
    existing passphrase from it (first enrolment), only after the device was checked."""
    from rhel_cvm_update.adapters.tpm import Tpm
    from rhel_cvm_update.journal import writing_command

    luks = _checked_luks(config)
    key = Secret.read_from_fd(key_fd) if key_fd is not None else None
    try:
        with writing_command(config.state_dir, "reseal", dry_run=dry_run) as record, Tpm(config.tpm) as tpm:
            result = reseal(config, luks, tpm, uki=uki, pcr_values=pcr_values, key=key, dry_run=dry_run)
            record(result)
    finally:
        if key is not None:
            key.wipe()
    return result


def run_enroll(config, *, dry_run: bool = False) -> Dict[str, Any]:
    """``enroll --from-tpm2-import`` as the CLI runs it (see ``run_reseal``)."""
    from rhel_cvm_update.adapters.tpm import Tpm
    from rhel_cvm_update.journal import writing_command

    luks = _checked_luks(config)
    with writing_command(config.state_dir, "enroll", dry_run=dry_run) as record, Tpm(config.tpm) as tpm:
        result = enroll_from_tpm2_import(luks, tpm, dry_run=dry_run)
        record(result)
    return result
