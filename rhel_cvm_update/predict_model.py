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

from rhel_cvm_update.boot_events import (CALLING_EFI_APPLICATION, SEPARATOR_DIGEST_DATA,
                                         ImageMeasurement, PlannedEvent, Prediction, digests_of,
                                         replay_planned)
from rhel_cvm_update.errors import FormatError, PredictionError
from rhel_cvm_update.formats import tcglog
from rhel_cvm_update.formats.efi import (EFI_CERT_SHA256_GUID, EFI_CERT_X509_GUID,
                                         EFI_GLOBAL_VARIABLE, EFI_IMAGE_SECURITY_DATABASE_GUID,
                                         SHIM_LOCK_GUID, SignatureData, UefiVariableData,
                                         parse_signature_lists)
from rhel_cvm_update.signers import anchor_verifies

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


def _signature_entries(efivars: EfiVars, name: str, guid) -> List[SignatureData]:
    raw = _var(efivars, name, guid)
    if not raw:
        return []
    try:
        return parse_signature_lists(raw, source=f"efivar {name}")
    except FormatError as e:
        raise PredictionError(f"cannot read {name}: {e}") from None


def _allowed_by(entries: Sequence[SignatureData], image: ImageMeasurement) -> Optional[SignatureData]:
    """The first allowlist entry (in list order) that admits the image: a certificate that
    anchors its signature, or its SHA-256 Authenticode hash."""
    for entry in entries:
        if entry.signature_type == EFI_CERT_X509_GUID and anchor_verifies(entry.data, image.signer_certs):
            return entry
        if entry.signature_type == EFI_CERT_SHA256_GUID and entry.data == image.authenticode.get("sha256"):
            return entry
    return None


def _event(pcr: int, event_type: int, data: bytes, banks: Sequence[str], origin: str,
           summary: str) -> PlannedEvent:
    return PlannedEvent(pcr, event_type, digests_of(data, banks), origin, summary)


def _authority(record: UefiVariableData, banks: Sequence[str], why: str) -> PlannedEvent:
    return _event(7, tcglog.EV_EFI_VARIABLE_AUTHORITY, record.to_bytes(), banks,
                  f"model: {why}", f"{record.name} authority")


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
                banks: Sequence[str]) -> List[PlannedEvent]:
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
    db = _signature_entries(efivars, "db", EFI_IMAGE_SECURITY_DATABASE_GUID)
    if secure_boot:
        entry = _allowed_by(db, shim)
        if entry is None:
            raise PredictionError(f"Secure Boot is on, but no db entry admits {shim.path}: "
                                  f"the firmware would refuse it")
        events.append(_authority(UefiVariableData(EFI_IMAGE_SECURITY_DATABASE_GUID, "db", entry.to_bytes()),
                                 banks, f"the db entry that verifies {shim.path}"))
    # shim measures its own variables from the values it mirrors to the RT copies.
    for measured, name in ((variant.sbat_level_event, "SbatLevel"), (variant.moksbstate_event, "MokSBState")):
        if measured:
            events.append(_shim_variable(efivars, name, banks))
    if secure_boot:
        events.append(_uki_authority(efivars, db, shim, uki, banks))
    return events


def _shim_variable(efivars: EfiVars, name: str, banks: Sequence[str]) -> PlannedEvent:
    value = _var(efivars, f"{name}RT", SHIM_LOCK_GUID)
    if value is None:
        raise PredictionError(f"shim measures {name}, but {name}RT is not in efivarfs")
    return _authority(UefiVariableData(SHIM_LOCK_GUID, name, value), banks, f"shim's {name} ({name}RT)")


def _uki_authority(efivars: EfiVars, db: Sequence[SignatureData], shim: ImageMeasurement,
                   uki: ImageMeasurement, banks: Sequence[str]) -> PlannedEvent:
    """shim's check_allowlist order: db, MokList, then its built-in vendor certificate."""
    entry = _allowed_by(db, uki)
    if entry is not None:
        return _authority(UefiVariableData(EFI_IMAGE_SECURITY_DATABASE_GUID, "db", entry.to_bytes()),
                          banks, f"the db entry that verifies {uki.path}")
    # MokListRT mirrors MokList plus shim's vendor certificate appended: skip that addend,
    # shim checks MokList itself, then the vendor certificate as "Shim".
    mok = [e for e in _signature_entries(efivars, "MokListRT", SHIM_LOCK_GUID)
           if shim.vendor_cert is None or e.data != shim.vendor_cert]
    entry = _allowed_by(mok, uki)
    if entry is not None:
        return _authority(UefiVariableData(SHIM_LOCK_GUID, "MokListRT", entry.to_bytes()), banks,
                          f"the MokList entry that verifies {uki.path}")
    if shim.vendor_cert is not None and anchor_verifies(shim.vendor_cert, uki.signer_certs):
        return _authority(UefiVariableData(SHIM_LOCK_GUID, "Shim", shim.vendor_cert), banks,
                          f"{shim.path}'s built-in certificate verifies {uki.path}")
    raise PredictionError(f"Secure Boot is on, but neither db, MokList nor {shim.path}'s built-in "
                          f"certificate admits {uki.path}: shim would refuse to boot it")


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
            pcr7_events(efivars, booted_shim, booted_uki, variant, banks)
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
    events = pcr4_events(shim, uki, chosen[4], banks) + pcr7_events(efivars, shim, uki, chosen[7], banks)
    notes = (f"PCR4 variant reproducing the live value: {chosen[4].describe()}",
             f"PCR7 variant reproducing the live value: {chosen[7].describe()}")
    return Prediction("model", uki.path, shim.path, replay_planned(events, banks, [4, 7]),
                      tuple(events), notes, checked_against)
