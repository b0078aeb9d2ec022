"""LUKS2 metadata as `cryptsetup luksDump --dump-json-metadata` prints it, and the token
kinds this tool reads and writes (pure: JSON values in, JSON values out).

* ``systemd-tpm2`` tokens, read and written as systemd 252-257 do (reference 4.1).  Unknown
  fields are kept verbatim and written back; tokens this tool writes carry one more
  field, ``rhel-cvm-update``, recording the UKI and the PCR values they were sealed to
  (systemd ignores unknown keys).
* Azure's ``tpm2-import`` tokens (reference 5.1), which are converted once and removed.
"""

import base64
import binascii
import dataclasses
import json
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from rhel_cvm_update.errors import FormatError, UnsupportedError
from rhel_cvm_update.formats.tpm_policy import PCR_BANK_ALGS, PCR_COUNT, split_sealed_blob

SYSTEMD_TPM2 = "systemd-tpm2"
TPM2_IMPORT = "tpm2-import"
TOOL_FIELD = "rhel-cvm-update"

LUKS2_MAX_KEYSLOTS = 32
LUKS2_MAX_TOKENS = 32


_HEX_RE = re.compile(r"^[0-9a-fA-F]*$")
_DECIMAL_RE = re.compile(r"^(0|[1-9][0-9]*)$")

# Field order of a token written by systemd 252 (tpm2_make_luks2_json); written in this
# order so a luksDump of our token looks like one of cryptenroll's.
_SYSTEMD_FIELD_ORDER = ("type", "keyslots", "tpm2-blob", "tpm2-pcrs", "tpm2-pcr-bank",
                        "tpm2-primary-alg", "tpm2-policy-hash", "tpm2-pin")
_KNOWN_FIELDS = frozenset(_SYSTEMD_FIELD_ORDER) | {"tpm2_srk", TOOL_FIELD}


def _token_error(token_id: Any, field: str, message: str, source: str) -> FormatError:
    return FormatError(f"token {token_id}: {message}", source=source, field=field)


def _b64decode(value: Any, token_id: Any, field: str, source: str) -> bytes:
    if not isinstance(value, str):
        raise _token_error(token_id, field, f"must be a base64 string, got {type(value).__name__}", source)
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _token_error(token_id, field, "is not valid base64", source) from None


def _typed_token_keyslot(obj: Any, token_type: str, token_id: Any, source: str) -> int:
    """Check that ``obj`` is a token object of ``token_type``; its one keyslot."""
    if not isinstance(obj, dict):
        raise _token_error(token_id, "token", "must be a JSON object", source)
    if obj.get("type") != token_type:
        raise _token_error(token_id, "type", f"expected {token_type!r}, got {obj.get('type')!r}", source)
    return _single_keyslot(obj, token_id, source)


def _single_keyslot(obj: Mapping[str, Any], token_id: Any, source: str) -> int:
    slots = obj.get("keyslots")
    if not isinstance(slots, list) or len(slots) != 1:
        raise _token_error(token_id, "keyslots", f"must list exactly one keyslot, got {slots!r}", source)
    slot = slots[0]
    if not isinstance(slot, str) or not _DECIMAL_RE.match(slot) or int(slot) >= LUKS2_MAX_KEYSLOTS:
        raise _token_error(token_id, "keyslots", f"keyslot must be a decimal string 0-31, got {slot!r}", source)
    return int(slot)


def _pcr_list(value: Any, token_id: Any, field: str, source: str) -> Tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _token_error(token_id, field, f"must be a non-empty array of PCR numbers, got {value!r}", source)
    for pcr in value:
        if isinstance(pcr, bool) or not isinstance(pcr, int) or not 0 <= pcr < PCR_COUNT:
            raise _token_error(token_id, field, f"PCR numbers must be integers 0-23, got {pcr!r}", source)
    if len(set(value)) != len(value):
        raise _token_error(token_id, field, f"duplicate PCR numbers in {value!r}", source)
    return tuple(sorted(value))


def _bank(value: Any, token_id: Any, source: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or value not in PCR_BANK_ALGS:
        raise _token_error(token_id, "tpm2-pcr-bank", f"unknown PCR bank {value!r}", source)
    return value


@dataclasses.dataclass(frozen=True)
class SystemdTpm2Token:
    keyslot: int
    blob: bytes
    pcrs: Tuple[int, ...]
    pcr_bank: Optional[str]
    primary_alg: Optional[str]
    policy_hash: bytes
    pin: bool
    srk: Optional[bytes] = None
    tool_record: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def bank(self) -> str:
        """The bank unseal uses.  A token without tpm2-pcr-bank makes systemd pick the best
        bank the TPM has; every TPM this tool targets (vTPMs of SEV-SNP CVMs) has sha256."""
        return self.pcr_bank or "sha256"

    @classmethod
    def from_json(cls, obj: Any, token_id: Any, source: str = "LUKS2 token") -> "SystemdTpm2Token":
        keyslot = _typed_token_keyslot(obj, SYSTEMD_TPM2, token_id, source)
        if "tpm2-blob" not in obj:
            raise _token_error(token_id, "tpm2-blob", "missing", source)
        if isinstance(obj["tpm2-blob"], list):
            raise UnsupportedError(f"{source}: token {token_id}: tpm2-blob is an array of shards "
                                   "(systemd 257 multi-TPM token); not supported")
        blob = _b64decode(obj["tpm2-blob"], token_id, "tpm2-blob", source)
        split_sealed_blob(blob, source=f"{source}: token {token_id} tpm2-blob")
        if "tpm2-pcrs" not in obj:
            raise _token_error(token_id, "tpm2-pcrs", "missing", source)
        pcrs = _pcr_list(obj["tpm2-pcrs"], token_id, "tpm2-pcrs", source)
        bank = _bank(obj.get("tpm2-pcr-bank"), token_id, source)
        alg = obj.get("tpm2-primary-alg")
        if alg is not None and alg not in ("ecc", "rsa"):
            raise _token_error(token_id, "tpm2-primary-alg", f"must be 'ecc' or 'rsa', got {alg!r}", source)
        policy = obj.get("tpm2-policy-hash")
        if isinstance(policy, list):
            raise UnsupportedError(f"{source}: token {token_id}: tpm2-policy-hash is an array "
                                   "(systemd 257 multi-TPM token); not supported")
        if not isinstance(policy, str) or not _HEX_RE.match(policy) or len(policy) != 64:
            raise _token_error(token_id, "tpm2-policy-hash", f"must be 64 hex digits, got {policy!r}", source)
        pin = obj.get("tpm2-pin", False)
        if not isinstance(pin, bool):
            raise _token_error(token_id, "tpm2-pin", f"must be a boolean, got {pin!r}", source)
        srk = _b64decode(obj["tpm2_srk"], token_id, "tpm2_srk", source) if "tpm2_srk" in obj else None
        record = obj.get(TOOL_FIELD)
        if record is not None and not isinstance(record, dict):
            raise _token_error(token_id, TOOL_FIELD, "must be a JSON object", source)
        extra = {k: v for k, v in obj.items() if k not in _KNOWN_FIELDS}
        return cls(keyslot=keyslot, blob=blob, pcrs=pcrs, pcr_bank=bank, primary_alg=alg,
                   policy_hash=bytes.fromhex(policy), pin=pin, srk=srk, tool_record=record, extra=extra)

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "type": SYSTEMD_TPM2,
            "keyslots": [str(self.keyslot)],
            "tpm2-blob": base64.b64encode(self.blob).decode("ascii"),
            "tpm2-pcrs": list(self.pcrs),
        }
        if self.pcr_bank is not None:
            out["tpm2-pcr-bank"] = self.pcr_bank
        if self.primary_alg is not None:
            out["tpm2-primary-alg"] = self.primary_alg
        out["tpm2-policy-hash"] = self.policy_hash.hex()
        out["tpm2-pin"] = self.pin
        if self.srk is not None:
            out["tpm2_srk"] = base64.b64encode(self.srk).decode("ascii")
        out.update(self.extra)
        if self.tool_record is not None:
            out[TOOL_FIELD] = self.tool_record
        return out


@dataclasses.dataclass(frozen=True)
class Tpm2ImportToken:
    """Azure's tpm2-import token (RHEL 9.2 WALinuxAgent-cvm tpm2-luks-import.sh)."""

    keyslot: int
    parent_pub: bytes   # TPM2B_PUBLIC of the duplicated parent
    parent_prv: bytes   # TPM2B_PRIVATE: the duplicate
    parent_seed: bytes  # TPM2B_ENCRYPTED_SECRET: seed encrypted to the RSA primary
    seal_pub: bytes     # TPM2B_PUBLIC of the sealed object
    seal_prv: bytes     # TPM2B_PRIVATE of the sealed object under the parent
    policy_digest: bytes  # pcrpolicy_dat: the raw PolicyPCR digest
    unique: Optional[bytes]  # unique_dat: the RSA primary's unique field
    pcrs: Tuple[int, ...]
    pcr_bank: str

    _FILE_FIELDS = ("parent_pub", "parent_prv", "parent_seed", "seal_pub", "seal_prv", "pcrpolicy_dat")

    @classmethod
    def from_json(cls, obj: Any, token_id: Any, source: str = "LUKS2 token") -> "Tpm2ImportToken":
        keyslot = _typed_token_keyslot(obj, TPM2_IMPORT, token_id, source)
        fields: Dict[str, bytes] = {}
        for name in cls._FILE_FIELDS:
            if name not in obj:
                raise _token_error(token_id, name, "missing", source)
            fields[name] = _b64decode(obj[name], token_id, name, source)
            if not fields[name]:
                raise _token_error(token_id, name, "is empty", source)
        if len(fields["pcrpolicy_dat"]) != 32:
            raise _token_error(token_id, "pcrpolicy_dat",
                               f"must be a 32-byte sha256 policy digest, got {len(fields['pcrpolicy_dat'])} bytes",
                               source)
        unique = _b64decode(obj["unique_dat"], token_id, "unique_dat", source) if "unique_dat" in obj else None
        pcrs = _pcr_list(obj.get("tpm2-pcrs"), token_id, "tpm2-pcrs", source)
        bank = _bank(obj.get("tpm2-pcr-bank", "sha256"), token_id, source)
        return cls(keyslot=keyslot, parent_pub=fields["parent_pub"], parent_prv=fields["parent_prv"],
                   parent_seed=fields["parent_seed"], seal_pub=fields["seal_pub"], seal_prv=fields["seal_prv"],
                   policy_digest=fields["pcrpolicy_dat"], unique=unique, pcrs=pcrs, pcr_bank=bank or "sha256")

    def to_json(self) -> Dict[str, Any]:
        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode("ascii")
        out: Dict[str, Any] = {
            "type": TPM2_IMPORT, "keyslots": [str(self.keyslot)],
            "parent_pub": b64(self.parent_pub), "parent_prv": b64(self.parent_prv),
            "parent_seed": b64(self.parent_seed), "seal_pub": b64(self.seal_pub),
            "seal_prv": b64(self.seal_prv), "pcrpolicy_dat": b64(self.policy_digest),
            "tpm2-pcrs": list(self.pcrs), "tpm2-pcr-bank": self.pcr_bank,
        }
        if self.unique is not None:
            out["unique_dat"] = b64(self.unique)
        return out


@dataclasses.dataclass(frozen=True)
class LuksMetadata:
    """The LUKS2 JSON area: keyslot ids and raw tokens by id."""

    keyslots: Dict[int, Dict[str, Any]]
    tokens: Dict[int, Dict[str, Any]]
    source: str

    @classmethod
    def from_json_bytes(cls, data: bytes, source: str) -> "LuksMetadata":
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            # RecursionError: json nests one Python call per level ("[[[[..." thousands deep).
            raise FormatError(f"LUKS2 metadata is not JSON: {e}", source=source, field="json") from None
        if not isinstance(obj, dict):
            raise FormatError("LUKS2 metadata is not a JSON object", source=source, field="json")
        keyslots = cls._id_table(obj, "keyslots", LUKS2_MAX_KEYSLOTS, source)
        tokens = cls._id_table(obj, "tokens", LUKS2_MAX_TOKENS, source)
        for token_id, token in tokens.items():
            if not isinstance(token.get("type"), str):
                raise _token_error(token_id, "type", "missing or not a string", source)
            slots = token.get("keyslots")
            if not isinstance(slots, list) or not all(isinstance(s, str) and _DECIMAL_RE.match(s) for s in slots):
                raise _token_error(token_id, "keyslots", f"must be an array of decimal strings, got {slots!r}", source)
            if len(set(slots)) != len(slots):
                raise _token_error(token_id, "keyslots", f"lists a keyslot twice: {slots!r}", source)
            for slot in slots:
                if int(slot) not in keyslots:
                    raise _token_error(token_id, "keyslots", f"names keyslot {slot}, which does not exist", source)
        # Two tokens of one type on one keyslot make "which token unlocks what" ambiguous,
        # and retiring one would kill the other's keyslot.  A systemd-tpm2 token beside a
        # tpm2-import token on the same keyslot is the state between the two steps of
        # `enroll --from-tpm2-import` and is allowed.
        owners: Dict[Tuple[str, int], int] = {}
        for token_id in sorted(tokens):
            for slot in tokens[token_id]["keyslots"]:
                key = (tokens[token_id]["type"], int(slot))
                if key in owners:
                    raise FormatError(f"keyslot {slot} is referenced by {key[0]} tokens {owners[key]} and "
                                      f"{token_id}; refusing to touch an ambiguous header",
                                      source=source, field="tokens")
                owners[key] = token_id
        return cls(keyslots=keyslots, tokens=tokens, source=source)

    @staticmethod
    def _id_table(obj: Mapping[str, Any], name: str, limit: int, source: str) -> Dict[int, Dict[str, Any]]:
        table = obj.get(name)
        if not isinstance(table, dict):
            raise FormatError(f"'{name}' is missing or not an object", source=source, field=name)
        out: Dict[int, Dict[str, Any]] = {}
        for key, value in table.items():
            if not _DECIMAL_RE.match(key) or int(key) >= limit:
                raise FormatError(f"id {key!r} is not a decimal number below {limit}", source=source, field=name)
            if not isinstance(value, dict):
                raise FormatError(f"entry {key} is not an object", source=source, field=name)
            out[int(key)] = value
        return out

    def tokens_of_type(self, token_type: str) -> List[int]:
        return sorted(t for t, obj in self.tokens.items() if obj.get("type") == token_type)

    def systemd_tpm2_tokens(self) -> Dict[int, SystemdTpm2Token]:
        return {t: SystemdTpm2Token.from_json(self.tokens[t], t, self.source)
                for t in self.tokens_of_type(SYSTEMD_TPM2)}

    def tpm2_import_tokens(self) -> Dict[int, Tpm2ImportToken]:
        return {t: Tpm2ImportToken.from_json(self.tokens[t], t, self.source)
                for t in self.tokens_of_type(TPM2_IMPORT)}

    def free_keyslot(self) -> Optional[int]:
        return next((s for s in range(LUKS2_MAX_KEYSLOTS) if s not in self.keyslots), None)

    def free_token_id(self) -> Optional[int]:
        return next((t for t in range(LUKS2_MAX_TOKENS) if t not in self.tokens), None)
