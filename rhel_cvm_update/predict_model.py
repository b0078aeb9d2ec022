"""Source 2: next boot's PCR4/PCR7 from a model of the boot, for when the log is missing,
empty or inconsistent (as reported on some Azure VMs).

The model rebuilds what edk2 and shim measure (reference 2.2-2.4):

PCR4: EV_EFI_ACTION "Calling EFI Application from Boot Option", EV_SEPARATOR, shim,
      the UKI, and the kernel inside the UKI when the platform measures it.
PCR7: SecureBoot, PK, KEK, db, dbx (and dbt when present) as EV_EFI_VARIABLE_DRIVER_CONFIG,
      EV_SEPARATOR, then with Secure Boot on the db entry that verified shim (firmware),
      then shim's own events: SbatLevel, MokSBState, and with Secure Boot on the allowlist
      entry that verified the UKI (db, MokListRT or shim's built-in certificate).

Where platforms differ (kernel event or not, whether shim logs SbatLevel/MokSBState) the
model tries each variant on the chain booted NOW and carries forward only the one that
reproduces the live PCRs.  If none does, it refuses.
"""

import dataclasses
import itertools
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from rhel_cvm_update.authority import Authority, SecureBootDatabases, firmware_authorities, shim_authorities
from rhel_cvm_update.boot_events import (CALLING_EFI_APPLICATION, SEPARATOR_DIGEST_DATA,
                                         ImageMeasurement, PlannedEvent, Prediction, digests_of,
                                         replay_planned)
from rhel_cvm_update.errors import PredictionError
from rhel_cvm_update.formats import tcglog
from rhel_cvm_update.formats.efi import (EFI_GLOBAL_VARIABLE, EFI_IMAGE_SECURITY_DATABASE_GUID, SHIM_LOCK_GUID,
                                         UefiVariableData)
from rhel_cvm_update.sbat_rule import next_sbat_level

# Variables as efivarfs shows them now: (name, guid) -> data.  Next boot measures these.
EfiVars = Mapping[Tuple[str, str], bytes]
SECURE_BOOT_POLICY_VARIABLES = (("SecureBoot", EFI_GLOBAL_VARIABLE), ("PK", EFI_GLOBAL_VARIABLE),
                                ("KEK", EFI_GLOBAL_VARIABLE), ("db", EFI_IMAGE_SECURITY_DATABASE_GUID),
                                ("dbx", EFI_IMAGE_SECURITY_DATABASE_GUID))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way a platform may measure the same chain."""

    kernel_event: bool
    sbat_level_event: bool
    moksbstate_event: bool

    def describe(self) -> str:
        return ", ".join(f"{name} {'measured' if on else 'not measured'}" for name, on in (
            ("kernel", self.kernel_event), ("SbatLevel", self.sbat_level_event),
            ("MokSBState", self.moksbstate_event)))


def _var(efivars: EfiVars, name: str, guid) -> Optional[bytes]:
    return efivars.get((name, str(guid)))


def secure_boot_enabled(efivars: EfiVars) -> bool:
    value = _var(efivars, "SecureBoot", EFI_GLOBAL_VARIABLE)
    return bool(value) and value[0] == 1


def _event(pcr: int, event_type: int, data: bytes, banks: Sequence[str], origin: str,
           summary: str) -> PlannedEvent:
    return PlannedEvent(pcr, event_type, digests_of(data, banks), origin, summary)


def _authority(found: Authority, banks: Sequence[str]) -> PlannedEvent:
    return _event(7, tcglog.EV_EFI_VARIABLE_AUTHORITY, found.record.to_bytes(), banks,
                  f"model: {found.reason}", f"{found.record.name} authority")


def pcr4_events(shim: ImageMeasurement, uki: ImageMeasurement, variant: Variant,
                banks: Sequence[str]) -> List[PlannedEvent]:
    events = [
        _event(4, tcglog.EV_EFI_ACTION, CALLING_EFI_APPLICATION, banks,
               "model: edk2 ReadyToBoot action", CALLING_EFI_APPLICATION.decode()),
        _event(4, tcglog.EV_SEPARATOR, SEPARATOR_DIGEST_DATA, banks, "model: separator", "separator"),
        PlannedEvent(4, tcglog.EV_EFI_BOOT_SERVICES_APPLICATION, {b: shim.authenticode[b] for b in banks},
                     f"model: Authenticode of {shim.path}", "shim"),
        PlannedEvent(4, tcglog.EV_EFI_BOOT_SERVICES_APPLICATION, {b: uki.authenticode[b] for b in banks},
                     f"model: Authenticode of {uki.path}", "UKI"),
    ]
    if variant.kernel_event:
        if uki.linux_authenticode is None:
            raise PredictionError(f"{uki.path} has no .linux section")
        events.append(PlannedEvent(4, tcglog.EV_EFI_BOOT_SERVICES_APPLICATION,
                                   {b: uki.linux_authenticode[b] for b in banks},
                                   f"model: Authenticode of the .linux payload of {uki.path}",
                                   "kernel loaded by systemd-stub"))
    return events


def pcr7_events(efivars: EfiVars, shim: ImageMeasurement, uki: ImageMeasurement, variant: Variant,
                banks: Sequence[str], booted_shim: Optional[ImageMeasurement] = None) -> List[PlannedEvent]:
    events = []
    variables = list(SECURE_BOOT_POLICY_VARIABLES)
    if _var(efivars, "dbt", EFI_IMAGE_SECURITY_DATABASE_GUID) is not None:
        variables.append(("dbt", EFI_IMAGE_SECURITY_DATABASE_GUID))
    for name, guid in variables:
        # edk2 measures an absent variable with no data (e.g. PK in setup mode).
        record = UefiVariableData(guid, name, _var(efivars, name, guid) or b"")
        events.append(_event(7, tcglog.EV_EFI_VARIABLE_DRIVER_CONFIG, record.to_bytes(), banks,
                             f"model: {name} from efivarfs", name))
    events.append(_event(7, tcglog.EV_SEPARATOR, SEPARATOR_DIGEST_DATA, banks, "model: separator",
                         "separator"))
    secure_boot = secure_boot_enabled(efivars)
    dbs = SecureBootDatabases.from_efivars(efivars) if secure_boot else SecureBootDatabases()
    if secure_boot:
        events += [_authority(a, banks) for a in firmware_authorities(shim, dbs)]
    # shim measures its own variables from the values it mirrors to the RT copies.
    if variant.sbat_level_event:
        same_shim = booted_shim is not None and booted_shim.authenticode == shim.authenticode
        events.append(_sbat_level(efivars, shim, secure_boot, banks, same_shim))
    if variant.moksbstate_event:
        events.append(_shim_variable(efivars, "MokSBState", banks))
    if secure_boot:
        events += [_authority(a, banks) for a in shim_authorities(uki, dbs, shim.vendor_cert, shim.path)]
    return events


def _shim_variable(efivars: EfiVars, name: str, banks: Sequence[str]) -> PlannedEvent:
    value = _var(efivars, f"{name}RT", SHIM_LOCK_GUID)
    if value is None:
        raise PredictionError(f"shim measures {name}, but {name}RT is not in efivarfs")
    return _authority(Authority(UefiVariableData(SHIM_LOCK_GUID, name, value), f"shim's {name} ({name}RT)"),
                      banks)


def _sbat_level(efivars: EfiVars, shim: ImageMeasurement, secure_boot: bool,
                banks: Sequence[str], same_shim: bool) -> PlannedEvent:
    """SbatLevelRT is the level this boot holds; shim may raise it (sbat_rule)."""
    current = _var(efivars, "SbatLevelRT", SHIM_LOCK_GUID)
    if current is None:
        raise PredictionError("shim measures SbatLevel, but SbatLevelRT is not in efivarfs")
    value = next_sbat_level(current, shim.sbat_levels, shim.sbat, secure_boot,
                            _var(efivars, "SbatPolicy", SHIM_LOCK_GUID), shim.path, same_shim=same_shim)
    why = "SbatLevelRT, kept" if value == current else f"the level {shim.path} applies"
    return _authority(Authority(UefiVariableData(SHIM_LOCK_GUID, "SbatLevel", value), f"shim's SbatLevel: {why}"),
                      banks)


def _variants(efivars: EfiVars) -> List[Variant]:
    sbat = [True, False] if _var(efivars, "SbatLevelRT", SHIM_LOCK_GUID) is not None else [False]
    mok = [True, False] if _var(efivars, "MokSBStateRT", SHIM_LOCK_GUID) is not None else [False]
    return [Variant(k, s, m) for k, s, m in itertools.product([True, False], sbat, mok)]


def predict_from_model(efivars: EfiVars, live: Mapping[str, Mapping[int, bytes]],
                       booted_shim: ImageMeasurement, booted_uki: ImageMeasurement,
                       shim: ImageMeasurement, uki: ImageMeasurement,
                       checked_against: str = "tpm") -> Prediction:
    banks = [b for b in ("sha256", "sha1", "sha384", "sha512")
             if b in live and all(b in m.authenticode for m in (booted_shim, booted_uki, shim, uki))]
    if "sha256" not in banks:
        raise PredictionError("the model needs the live sha256 PCRs and sha256 digests")
    tried: List[str] = []
    chosen: Dict[int, Variant] = {}
    for variant in _variants(efivars):
        events = pcr4_events(booted_shim, booted_uki, variant, banks) + \
            pcr7_events(efivars, booted_shim, booted_uki, variant, banks, booted_shim)
        values = replay_planned(events, banks, [4, 7])
        for pcr in (4, 7):
            if pcr not in chosen and all(values[b][pcr] == live[b].get(pcr) for b in banks):
                chosen[pcr] = variant
        tried.append(f"{variant.describe()}: PCR4 {values['sha256'][4].hex()}, "
                     f"PCR7 {values['sha256'][7].hex()}")
    missing = [pcr for pcr in (4, 7) if pcr not in chosen]
    if missing:
        raise PredictionError(
            f"the boot model does not reproduce live PCR{'/'.join(map(str, missing))} "
            f"(sha256 PCR4 {live['sha256'].get(4, b'').hex()}, PCR7 {live['sha256'].get(7, b'').hex()}) "
            f"for the chain booted now ({booted_shim.path} -> {booted_uki.path}); refusing to predict",
            details=tried)
    events = pcr4_events(shim, uki, chosen[4], banks) + pcr7_events(efivars, shim, uki, chosen[7], banks,
                                                                    booted_shim)
    notes = (f"PCR4 variant reproducing the live value: {chosen[4].describe()}",
             f"PCR7 variant reproducing the live value: {chosen[7].describe()}")
    return Prediction("model", uki.path, shim.path, replay_planned(events, banks, [4, 7]),
                      tuple(events), notes, checked_against)
