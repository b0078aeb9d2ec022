"""Source 1: next boot's PCR4/PCR7 from the current TCG event log (preferred source).

Steps (each refusal names the PCR and the event it cannot explain):
1. ``check_log_explains_live``: the current log must replay to the live PCR4/PCR7 in every
   bank both sides have.  Until then its contents are untrusted.
2. ``find_boot_chain``: the shape of the current boot's PCR4, read from the log, never
   assumed: EV_EFI_ACTION "Calling EFI Application...", the separator, shim (the image the
   firmware loaded), the UKI (shim's event: a lone File() device path), and, when the
   platform measures it, the kernel systemd-stub loaded from the UKI (Vendor 55c5d1f8...).
3. ``plan_pcr4``: the same events, with the digests of the new shim, UKI and kernel.
4. ``plan_pcr7``: the same events, after checking that each authority event would be
   logged again unchanged (same allowlist anchor verifies the new images, same SBAT level),
   and refreshing Secure Boot variables that changed since boot (pending db/dbx updates).
"""

import dataclasses
from typing import List, Mapping, Optional, Sequence, Tuple

from rhel_cvm_update.boot_events import (CALLING_EFI_APPLICATION, RETURNING_FROM_EFI_APPLICATION,
                                         ImageMeasurement, PlannedEvent, Prediction, bank_hash,
                                         compare_with_live, replay_planned)
from rhel_cvm_update.errors import FormatError, PredictionError
from rhel_cvm_update.formats import tcglog
from rhel_cvm_update.formats.devpath import (SYSTEMD_STUB_LINUX_VENDOR_GUID, EndNode, FilePathNode,
                                             VendorNode)
from rhel_cvm_update.formats.efi import UefiVariableData
from rhel_cvm_update.signers import anchor_verifies

BOOT_MANAGER_CODE_PCR = 4
SECURE_BOOT_POLICY_PCR = 7
EfiVarsNow = Mapping[Tuple[str, str], bytes]  # (name, guid string) -> data, as efivarfs has it now


def _short(digest: bytes) -> str:
    return digest.hex()[:16] + "..."


def _event_label(ev: tcglog.TcgEvent) -> str:
    return f"event #{ev.index} ({ev.type_name}, PCR{ev.pcr}, offset {ev.offset:#x})"


def check_log_explains_live(log: tcglog.EventLog, live: Mapping[str, Mapping[int, bytes]],
                            pcrs: Sequence[int] = (4, 7)) -> List[str]:
    """Raise PredictionError unless the log replays to the live value of every PCR in
    ``pcrs`` in every bank both have; return the banks compared."""
    banks = [b for b in log.banks if b in live]
    if "sha256" not in banks:
        raise PredictionError(f"{log.source}: cannot check the log: it has banks {list(log.banks)}, "
                              f"the TPM gave {sorted(live)}; a sha256 bank is needed on both")
    replayed = tcglog.replay(log, banks=banks, pcrs=list(pcrs))
    details = []
    for bank, pcr, value, have in compare_with_live(
            {b: {p: replayed.get(b, {}).get(p, tcglog.initial_pcr(p, b, log.startup_locality))
                 for p in pcrs} for b in banks}, live):
        details.append(f"PCR{pcr} {bank}: log replays to {value.hex()}, TPM has {have.hex()}; "
                       + _explain_mismatch(log, bank, pcr, have))
    if details:
        raise PredictionError(f"{log.source}: the event log does not explain the live PCRs, "
                              f"so it cannot be used to predict the next boot", details=details)
    return banks


def _explain_mismatch(log: tcglog.EventLog, bank: str, pcr: int, live_value: bytes) -> str:
    events = [e for e in log.events if e.pcr == pcr and e.event_type != tcglog.EV_NO_ACTION]
    value = tcglog.initial_pcr(pcr, bank, log.startup_locality)
    if value == live_value:
        return "the TPM value is the reset value: none of the logged events reached the TPM"
    for i, ev in enumerate(events):
        if bank not in ev.digests:
            return f"{_event_label(ev)} has no {bank} digest"
        value = tcglog.extend(bank, value, ev.digests[bank])
        if value == live_value and i + 1 < len(events):
            return (f"the TPM matches the log up to {_event_label(ev)}; "
                    f"{_event_label(events[i + 1])} and later were logged but never extended")
    last = _event_label(events[-1]) if events else "the start"
    return (f"no prefix of the {len(events)} logged events explains it: an extend after "
            f"{last} was not logged, or the log belongs to another boot")


@dataclasses.dataclass(frozen=True)
class BootChain:
    """The boot-application events of the current boot, found in its log."""

    calling: tcglog.TcgEvent
    shim: tcglog.TcgEvent
    uki: tcglog.TcgEvent
    kernel: Optional[tcglog.TcgEvent]


def _image_path(log: tcglog.EventLog, ev: tcglog.TcgEvent):
    try:
        image = tcglog.decode_event_data(ev, uintn_size=_uintn(log), source=log.source)
    except FormatError as e:
        raise PredictionError(f"{log.source}: cannot decode {_event_label(ev)}: {e}") from None
    return tuple(n for n in image.device_path if not isinstance(n, EndNode))


def _uintn(log: tcglog.EventLog) -> int:
    return 4 if log.spec_id is not None and log.spec_id.uintn_size == 1 else 8


def find_boot_chain(log: tcglog.EventLog) -> BootChain:
    pcr4 = [e for e in log.events if e.pcr == BOOT_MANAGER_CODE_PCR and e.event_type != tcglog.EV_NO_ACTION]
    actions = [e for e in pcr4 if e.event_type == tcglog.EV_EFI_ACTION]
    calling = [e for e in actions if bytes(e.data) == CALLING_EFI_APPLICATION]
    if any(bytes(e.data) == RETURNING_FROM_EFI_APPLICATION for e in actions) or len(calling) != 1:
        raise PredictionError(
            f"{log.source}: this boot tried more than one boot option (PCR4 has {len(calling)} "
            f"'Calling EFI Application' and a 'Returning from EFI Application' event); the next "
            f"boot's attempts cannot be predicted from it. Reboot once normally, then retry.")
    apps = [e for e in pcr4 if e.index > calling[0].index
            and e.event_type == tcglog.EV_EFI_BOOT_SERVICES_APPLICATION]
    roles: List[Tuple[str, tcglog.TcgEvent]] = []
    for ev in apps:
        nodes = _image_path(log, ev)
        if any(isinstance(n, VendorNode) and n.guid == SYSTEMD_STUB_LINUX_VENDOR_GUID for n in nodes):
            roles.append(("kernel", ev))
        elif len(nodes) == 1 and isinstance(nodes[0], FilePathNode):
            roles.append(("uki", ev))  # shim logs its 2nd stage with a lone File() node
        else:
            roles.append(("firmware-loaded", ev))
    shape = [r for r, _ in roles]
    if shape not in (["firmware-loaded", "uki"], ["firmware-loaded", "uki", "kernel"]):
        listing = "; ".join(f"{r}: {_event_label(e)}" for r, e in roles) or "none"
        raise PredictionError(
            f"{log.source}: PCR4 does not show a shim -> UKI boot (boot applications after "
            f"'Calling EFI Application': {listing})")
    events = dict(roles)
    return BootChain(calling[0], events["firmware-loaded"], events["uki"], events.get("kernel"))


def _unchanged(ev: tcglog.TcgEvent, banks: Sequence[str], why: str = "unchanged") -> PlannedEvent:
    return PlannedEvent(ev.pcr, ev.event_type, {b: ev.digests[b] for b in banks},
                        f"log #{ev.index}, {why}", ev.type_name, ev.index)


def _substituted(ev: tcglog.TcgEvent, digests: Mapping[str, bytes], banks: Sequence[str],
                 what: str) -> PlannedEvent:
    missing = [b for b in banks if b not in digests]
    if missing:
        raise PredictionError(f"no {', '.join(missing)} digest computed for {what}")
    return PlannedEvent(ev.pcr, ev.event_type, {b: digests[b] for b in banks},
                        f"log #{ev.index} with the {what}", ev.type_name, ev.index)


def plan_pcr4(log: tcglog.EventLog, chain: BootChain, shim: ImageMeasurement, uki: ImageMeasurement,
              banks: Sequence[str]) -> List[PlannedEvent]:
    planned = []
    for ev in log.events:
        if ev.pcr != BOOT_MANAGER_CODE_PCR or ev.event_type == tcglog.EV_NO_ACTION:
            continue
        if ev is chain.shim:
            planned.append(_substituted(ev, shim.authenticode, banks, f"Authenticode of {shim.path}"))
        elif ev is chain.uki:
            planned.append(_substituted(ev, uki.authenticode, banks, f"Authenticode of {uki.path}"))
        elif ev is chain.kernel:
            if uki.linux_authenticode is None:
                raise PredictionError(f"{uki.path} has no .linux section, but the current boot "
                                      f"measured the kernel inside the UKI")
            planned.append(_substituted(ev, uki.linux_authenticode, banks,
                                        f"Authenticode of the .linux payload of {uki.path}"))
        elif ev.index > chain.uki.index and ev.event_type == tcglog.EV_EFI_BOOT_SERVICES_APPLICATION:
            raise PredictionError(f"{log.source}: {_event_label(ev)} after the UKI is not explained")
        else:
            planned.append(_unchanged(ev, banks))
    return planned


def _certificate_of(var: UefiVariableData) -> Optional[bytes]:
    """The DER certificate an authority event names, or None (a hash allowlist entry).

    shim's vendor certificate ("Shim") is logged as raw DER; db/MokListRT/vendor_db entries
    as EFI_SIGNATURE_DATA (owner GUID + data)."""
    from cryptography import x509

    for der in (var.data, var.data[16:]):
        try:
            x509.load_der_x509_certificate(bytes(der))
            return bytes(der)
        except ValueError:
            continue
    return None


def _subject(der: bytes) -> str:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def plan_pcr7(log: tcglog.EventLog, chain: BootChain, booted_shim: Optional[ImageMeasurement],
              shim: ImageMeasurement, uki: ImageMeasurement, banks: Sequence[str],
              efivars_now: Optional[EfiVarsNow]) -> Tuple[List[PlannedEvent], List[str]]:
    shim_changed = any(shim.authenticode.get(b) != chain.shim.digests.get(b) for b in banks)
    if booted_shim is not None and any(booted_shim.authenticode.get(b) != chain.shim.digests.get(b)
                                       for b in banks):
        booted_shim = None  # the shim file on disk is not the one that booted (updated since)
    planned: List[PlannedEvent] = []
    notes: List[str] = []
    separator_seen = False
    for ev in log.events:
        if ev.pcr != SECURE_BOOT_POLICY_PCR or ev.event_type == tcglog.EV_NO_ACTION:
            continue
        if ev.event_type == tcglog.EV_SEPARATOR:
            separator_seen = True
            planned.append(_unchanged(ev, banks))
        elif not separator_seen and ev.event_type == tcglog.EV_EFI_VARIABLE_DRIVER_CONFIG:
            planned.append(_secure_boot_variable(log, ev, banks, efivars_now, notes))
        elif ev.index < chain.calling.index:
            planned.append(_unchanged(ev, banks, "logged before any boot option ran"))
        elif ev.event_type != tcglog.EV_EFI_VARIABLE_AUTHORITY or ev.index > chain.uki.index:
            raise PredictionError(f"{log.source}: PCR7 {_event_label(ev)} is not explained by a "
                                  f"shim -> UKI boot; refusing to predict PCR7")
        elif ev.index < chain.shim.index:
            planned.append(_firmware_authority(log, ev, banks, shim, shim_changed))
        else:
            planned.append(_shim_authority(log, ev, banks, booted_shim, shim, shim_changed, uki))
    if efivars_now is None:
        notes.append("Secure Boot variables were not compared with efivarfs (none given): "
                     "PCR7 assumes no pending db/dbx/KEK/PK change")
    return planned, notes


def _variable(log: tcglog.EventLog, ev: tcglog.TcgEvent) -> UefiVariableData:
    try:
        var = tcglog.decode_event_data(ev, uintn_size=_uintn(log), source=log.source)
    except FormatError as e:
        raise PredictionError(f"{log.source}: cannot decode {_event_label(ev)}: {e}") from None
    if not isinstance(var, UefiVariableData):
        raise PredictionError(f"{log.source}: {_event_label(ev)} carries no variable")
    return var


def _secure_boot_variable(log: tcglog.EventLog, ev: tcglog.TcgEvent, banks: Sequence[str],
                          efivars_now: Optional[EfiVarsNow], notes: List[str]) -> PlannedEvent:
    var = _variable(log, ev)
    if efivars_now is None:
        return _unchanged(ev, banks)
    now = efivars_now.get((var.name, str(var.guid)), b"")
    if now == var.data:
        return _unchanged(ev, banks, f"{var.name} as efivarfs has it now")
    notes.append(f"{var.name} changed since this boot ({len(var.data)} -> {len(now)} bytes): "
                 f"PCR7 is predicted with its current contents")
    record = UefiVariableData(var.guid, var.name, now).to_bytes()
    return PlannedEvent(ev.pcr, ev.event_type, {b: bank_hash(b, record) for b in banks},
                        f"log #{ev.index} with {var.name} as efivarfs has it now", ev.type_name, ev.index)


def _firmware_authority(log: tcglog.EventLog, ev: tcglog.TcgEvent, banks: Sequence[str],
                        shim: ImageMeasurement, shim_changed: bool) -> PlannedEvent:
    """The allowlist entry with which the firmware verified shim."""
    if not shim_changed:
        return _unchanged(ev, banks, "shim unchanged")
    var = _variable(log, ev)
    cert = _certificate_of(var)
    if cert is None or not anchor_verifies(cert, shim.signer_certs):
        raise PredictionError(
            f"{log.source}: the firmware verified the running shim with {var.name} entry "
            f"{_subject(cert) if cert else '(a hash)'} ({_event_label(ev)}), which does not verify "
            f"{shim.path}: PCR7 would change in a way this tool does not predict")
    return _unchanged(ev, banks, f"{shim.path} is verified by the same {var.name} entry")


def _shim_authority(log: tcglog.EventLog, ev: tcglog.TcgEvent, banks: Sequence[str],
                    booted_shim: Optional[ImageMeasurement], shim: ImageMeasurement,
                    shim_changed: bool, uki: ImageMeasurement) -> PlannedEvent:
    """What shim logged: its SBAT level, MokSBState, and the entry that verified the UKI."""
    var = _variable(log, ev)
    if var.name == "SbatLevel":
        if not shim_changed:
            return _unchanged(ev, banks, "shim unchanged, same SBAT level")
        if booted_shim is None or booted_shim.sbat_level is None or shim.sbat_level is None \
                or booted_shim.sbat_level != shim.sbat_level:
            raise PredictionError(
                f"{log.source}: {shim.path} may apply a different SBAT level than the running shim "
                f"({_event_label(ev)}): PCR7 would change in a way this tool does not predict")
        return _unchanged(ev, banks, f"{shim.path} carries the same .sbatlevel")
    if var.name in ("MokSBState",):
        return _unchanged(ev, banks, "MOK state unchanged")
    cert = _certificate_of(var)
    if cert is None:
        raise PredictionError(f"{log.source}: the running UKI was allowed by a hash in "
                              f"{var.name} ({_event_label(ev)}); {uki.path} cannot match it")
    if not anchor_verifies(cert, uki.signer_certs):
        raise PredictionError(
            f"{log.source}: the running UKI was verified by {var.name} certificate "
            f"'{_subject(cert)}' ({_event_label(ev)}), but {uki.path} is "
            f"{'not signed by it' if uki.signed else 'unsigned'}: PCR7 would change")
    if shim_changed and var.name == "Shim" and shim.vendor_cert != cert:
        raise PredictionError(f"{log.source}: the running UKI was verified by the running shim's "
                              f"built-in certificate, which {shim.path} does not carry")
    return _unchanged(ev, banks, f"{uki.path} is signed under the same {var.name} certificate")


def predict_from_log(log: tcglog.EventLog, live: Optional[Mapping[str, Mapping[int, bytes]]],
                     shim: ImageMeasurement, uki: ImageMeasurement,
                     booted_shim: Optional[ImageMeasurement] = None,
                     efivars_now: Optional[EfiVarsNow] = None,
                     pcrs: Sequence[int] = (4, 7)) -> Prediction:
    """Predict from the log.  ``live`` None means offline: the log is only required to be
    internally consistent (every event carries every bank)."""
    if live is not None:
        check_log_explains_live(log, live, pcrs)
    banks = [b for b in log.banks if b in shim.authenticode and b in uki.authenticode]
    if "sha256" not in banks:
        raise PredictionError(f"{log.source}: the log has no sha256 bank")
    for ev in log.events:
        if ev.pcr in pcrs and ev.event_type != tcglog.EV_NO_ACTION and not all(b in ev.digests for b in banks):
            raise PredictionError(f"{log.source}: {_event_label(ev)} lacks a digest for one of {banks}")
    unsupported = [p for p in pcrs if p not in (BOOT_MANAGER_CODE_PCR, SECURE_BOOT_POLICY_PCR)]
    if unsupported:
        raise PredictionError(f"predicting PCR {unsupported} is not supported; only PCR4 and PCR7")
    chain = find_boot_chain(log)
    events = plan_pcr4(log, chain, shim, uki, banks)
    pcr7, notes = plan_pcr7(log, chain, booted_shim, shim, uki, banks, efivars_now)
    events = sorted(events + pcr7, key=lambda e: e.log_index)
    values = replay_planned(events, banks, [4, 7], log.startup_locality)
    if chain.kernel is None:
        notes.append("this platform did not measure the kernel inside the UKI; neither will the next boot")
    return Prediction("log", uki.path, shim.path, values, tuple(events), tuple(notes),
                      "tpm" if live is not None else "offline")
