"""The SbatLevel shim will hold (and measure into PCR7) at the next boot.

shim (sbat.c ``set_sbat_uefi_variable``) starts from the SbatLevel variable it finds, which
is the value this boot measured (shim mirrors it into SbatLevelRT).  Its candidate is one of
the two levels embedded in its own ``.sbatlevel`` section, chosen by the one-shot SbatPolicy
variable (mokutil --set-sbat-policy) and the Secure Boot state:

  SbatPolicy absent, Secure Boot on   -> "automatic" (the section's first level)
  SbatPolicy absent, Secure Boot off  -> reset to the original level sbat,1,2021030218
  latest (1) / automatic (2)          -> that level
  reset (3)                           -> the original level when Secure Boot is off, else automatic

It keeps the current variable when it is well formed and at least as new as the candidate
(a higher version field, or a date stamp that is not older); otherwise it writes the
candidate.  A candidate that would revoke shim itself (a component of shim's own ``.sbat``
with a lower generation) is not applied, and with Secure Boot on shim then stops: no boot.
"""

from typing import Dict, Mapping, Optional

from rhel_cvm_update.errors import PredictionError

ORIGINAL_LEVEL = b"sbat,1,2021030218\n"
POLICY_LATEST, POLICY_AUTOMATIC, POLICY_RESET = 1, 2, 3


def _fields(level: bytes) -> list:
    return level.split(b"\n", 1)[0].split(b",")


def _is_at_least(current: bytes, candidate: bytes) -> bool:
    """shim's preserve_sbat_uefi_variable: keep ``current`` rather than write ``candidate``."""
    if len(current) < len(ORIGINAL_LEVEL) or not current.startswith(b"sbat,"):
        return False
    cur, new = _fields(current), _fields(candidate)
    cur_version, new_version = (cur[1] if len(cur) > 1 else b""), (new[1] if len(new) > 1 else b"")
    if len(cur_version) > len(new_version) or (len(cur_version) == len(new_version)
                                               and cur_version > new_version):
        return True
    cur_date, new_date = (cur[2] if len(cur) > 2 else b""), (new[2] if len(new) > 2 else b"")
    width = len(ORIGINAL_LEVEL.split(b",")[2].strip())
    return cur_date[:width] >= new_date[:width]


def revocations(level: bytes) -> Dict[str, int]:
    """component -> lowest allowed generation, from the lines after the header."""
    out: Dict[str, int] = {}
    for line in level.decode("ascii", "replace").splitlines()[1:]:
        parts = line.split(",")
        if len(parts) >= 2 and parts[0]:
            out[parts[0]] = _generation(parts[1])
    return out


def _generation(text: str) -> int:
    # shim uses atoi(): a field that does not parse counts as generation 0.
    digits = ""
    for ch in text.strip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else 0


def revoked_components(level: bytes, sbat_csv: Optional[str]) -> Dict[str, int]:
    """Components of an image's .sbat that ``level`` revokes (name -> their generation)."""
    limits = revocations(level)
    revoked: Dict[str, int] = {}
    for line in (sbat_csv or "").splitlines():
        parts = line.split(",")
        if len(parts) >= 2 and parts[0] in limits and _generation(parts[1]) < limits[parts[0]]:
            revoked[parts[0]] = _generation(parts[1])
    return revoked


def next_sbat_level(current: bytes, shim_levels: Mapping[str, str], shim_sbat: Optional[str],
                    secure_boot: bool, policy: Optional[bytes], shim_path: str,
                    same_shim: bool = False) -> bytes:
    """The SbatLevel value shim ``shim_path`` measures at the next boot.  ``same_shim``: it
    is the shim that booted now, whose rule (whatever its version) already gave ``current``."""
    policy_value = policy[0] if policy else None
    if policy_value == POLICY_LATEST:
        wanted = "latest"
    elif policy_value == POLICY_AUTOMATIC or secure_boot:
        wanted = "previous"  # shim 16 calls the first level "automatic", 15.7-15.8 "previous"
    else:
        return ORIGINAL_LEVEL  # no policy (or reset) with Secure Boot off: shim resets the level
    if wanted not in shim_levels:
        if same_shim and policy_value is None:
            return current
        raise PredictionError(
            f"{shim_path} has no .sbatlevel section (shim older than 15.7, or not a shim): "
            f"the SbatLevel it applies at the next boot cannot be decided")
    candidate = shim_levels[wanted].encode("ascii")
    if _is_at_least(current, candidate):
        return current
    revoked = revoked_components(candidate, shim_sbat)
    if revoked and secure_boot:
        raise PredictionError(
            f"{shim_path} embeds an SBAT level that revokes its own components "
            f"({', '.join(f'{k} generation {v}' for k, v in sorted(revoked.items()))}): shim would not "
            f"apply it and would stop the boot; refusing to predict")
    return current if revoked else candidate
