"""Source 1: next boot's PCR4/PCR7 from the current TCG event log (preferred source).

Steps (each refusal names the PCR and the event it cannot explain):
1. ``check_log_explains_live``: the current log must replay to the live PCR4/PCR7 in every
   bank both sides have.  Until then its contents are untrusted.
2. ``find_boot_chain``: the shape of the current boot's PCR4, read from the log, never
   assumed: EV_EFI_ACTION "Calling EFI Application...", the separator, shim (the image the
   firmware loaded), the UKI (shim's event: a lone File() device path), and, when the
   platform measures it, the kernel systemd-stub loaded from the UKI (Vendor 55c5d1f8...).
3. ``plan_pcr4``: the same events, with the digests of the new shim, UKI and kernel.
4. ``plan_pcr7``: the Secure Boot variables as efivarfs has them now (pending db/dbx
   updates), the separator, then the authority events the firmware and shim will log for the
   new images (authority.py, the rule both sources share: a re-signed image with an
   unchanged digest still changes PCR7), and the SbatLevel the new shim applies
   (sbat_rule.py).  The rule is trusted only after it reproduced this boot's authority
   events for the booted images, where those are known.
"""

import dataclasses
from typing import List, Mapping, Optional, Sequence, Tuple

from rhel_cvm_update.authority import (Authority, ImageRefusedError, SecureBootDatabases, describe_record,
                                       firmware_authorities, shim_authorities)
from rhel_cvm_update.boot_events import (CALLING_EFI_APPLICATION, RETURNING_FROM_EFI_APPLICATION,
                                         ImageMeasurement, PlannedEvent, Prediction, bank_hash,
                                         compare_with_live, replay_planned)
from rhel_cvm_update.errors import FormatError, PredictionError
from rhel_cvm_update.formats import tcg_event_data, tcglog
from rhel_cvm_update.formats.devpath import (SYSTEMD_STUB_LINUX_VENDOR_GUID, EndNode, FilePathNode,
                                             VendorNode)
from rhel_cvm_update.formats.efi import EFI_GLOBAL_VARIABLE, SHIM_LOCK_GUID, UefiVariableData
from rhel_cvm_update.sbat_rule import next_sbat_level

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
        image = tcg_event_data.decode_event_data(ev, uintn_size=_uintn(log), source=log.source)
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


def _variable_events(log: tcglog.EventLog, events) -> List[UefiVariableData]:
    return [_variable(log, ev) for ev in events]


class _Pcr7Plan:
    """PCR7 of the next boot, event by event, from the current log (see ``plan_pcr7``)."""

    def __init__(self, log: tcglog.EventLog, chain: BootChain, banks: Sequence[str],
                 efivars_now: Optional[EfiVarsNow]):
        self.log, self.chain, self.banks, self.efivars_now = log, chain, banks, efivars_now
        self.planned: List[PlannedEvent] = []
        self.notes: List[str] = []
        self.boot_vars = {}  # name -> data of the policy variables this boot measured
        for ev in log.events:
            if ev.pcr == SECURE_BOOT_POLICY_PCR and ev.event_type == tcglog.EV_EFI_VARIABLE_DRIVER_CONFIG:
                var = _variable(log, ev)
                self.boot_vars[(var.name, str(var.guid))] = var.data

    def next_vars(self) -> EfiVarsNow:
        """What next boot's verifiers read: efivarfs now, else what this boot measured."""
        return self.efivars_now if self.efivars_now is not None else self.boot_vars

    def secure_boot(self) -> bool:
        logged = self.boot_vars.get(("SecureBoot", str(EFI_GLOBAL_VARIABLE)), b"")[:1] == b"\x01"
        now = self.next_vars().get(("SecureBoot", str(EFI_GLOBAL_VARIABLE)), b"\x01" if logged else b"")
        if logged != (now[:1] == b"\x01"):
            state = {True: "on", False: "off"}
            raise PredictionError(f"{self.log.source}: Secure Boot is {state[logged]} in this boot but "
                                  f"{state[not logged]} in efivarfs: the log cannot predict a boot in "
                                  f"the other mode")
        return logged

    def keep(self, ev: tcglog.TcgEvent, why: str = "unchanged") -> None:
        self.planned.append(_unchanged(ev, self.banks, why))

    def replace_block(self, logged: Sequence[tcglog.TcgEvent], wanted: Sequence[Authority],
                      anchor: int, what: str) -> None:
        """Authority events ``logged`` by one verifier become ``wanted``: kept when they are
        the same records, rebuilt from the records otherwise."""
        records = _variable_events(self.log, logged)
        if records == [a.record for a in wanted]:
            for ev, found in zip(logged, wanted):
                self.keep(ev, f"{what}: the same {found.describe()}")
            return
        old = ", ".join(describe_record(r) for r in records) or "none"
        new = ", ".join(a.describe() for a in wanted) or "none"
        self.notes.append(f"PCR7: {what} changes from {old} to {new}")
        for found in wanted:
            data = found.record.to_bytes()
            self.planned.append(PlannedEvent(SECURE_BOOT_POLICY_PCR, tcglog.EV_EFI_VARIABLE_AUTHORITY,
                                             {b: bank_hash(b, data) for b in self.banks},
                                             f"new authority event: {found.reason}",
                                             f"{found.record.name} authority", anchor))


def plan_pcr7(log: tcglog.EventLog, chain: BootChain, booted_shim: Optional[ImageMeasurement],
              shim: ImageMeasurement, uki: ImageMeasurement, banks: Sequence[str],
              efivars_now: Optional[EfiVarsNow],
              booted_uki: Optional[ImageMeasurement] = None) -> Tuple[List[PlannedEvent], List[str]]:
    """The events of PCR7 for the next boot.  Secure Boot variables are taken as efivarfs has
    them now; the authority events of the firmware (for shim) and of shim (for the UKI) are
    asked of the authority rule for the new images, after the rule reproduced the logged ones
    for the booted images where those are known; SbatLevel follows shim's rule (sbat_rule)."""
    # A file on disk that is not the one that booted (updated since) says nothing of this boot.
    booted_shim = booted_shim if booted_shim and _measured_as(booted_shim, chain.shim, banks) else None
    booted_uki = booted_uki if booted_uki and _measured_as(booted_uki, chain.uki, banks) else None
    plan = _Pcr7Plan(log, chain, banks, efivars_now)
    secure_boot = plan.secure_boot()
    pcr7 = [e for e in log.events if e.pcr == SECURE_BOOT_POLICY_PCR and e.event_type != tcglog.EV_NO_ACTION]
    separator = next((e for e in pcr7 if e.event_type == tcglog.EV_SEPARATOR), None)
    before_boot = [e for e in pcr7 if e.index < chain.calling.index]
    firmware = [e for e in pcr7 if chain.calling.index < e.index < chain.shim.index]
    by_shim = [e for e in pcr7 if chain.shim.index < e.index < chain.uki.index]
    unexplained = [e for e in pcr7 if e.index > chain.uki.index
                   or (e.index > chain.calling.index and e.event_type != tcglog.EV_EFI_VARIABLE_AUTHORITY)]
    if separator is None or separator.index > chain.calling.index or unexplained:
        bad = unexplained[0] if unexplained else separator
        raise PredictionError(f"{log.source}: PCR7 {_event_label(bad) if bad else 'has no separator and'} is "
                              f"not explained by a shim -> UKI boot; refusing to predict PCR7")
    shim_vars = [(e, _variable(log, e)) for e in by_shim]
    state = [(e, var) for e, var in shim_vars if var.name in SHIM_STATE_VARIABLES]
    verified_uki = [e for e, var in shim_vars if var.name not in SHIM_STATE_VARIABLES]
    if not secure_boot and firmware + verified_uki:
        raise PredictionError(f"{log.source}: Secure Boot is off, yet PCR7 has authority events for the boot "
                              f"images; refusing to predict PCR7")
    # Firmware: the policy variables, the separator, what it verified before the boot option.
    for ev in before_boot:
        if ev.event_type == tcglog.EV_EFI_VARIABLE_DRIVER_CONFIG and ev.index < separator.index:
            plan.planned.append(_secure_boot_variable(log, ev, banks, efivars_now, plan.notes))
        else:
            plan.keep(ev, "logged before any boot option ran" if ev is not separator else "unchanged")
    if secure_boot:
        # This boot's lists: db/dbx as logged; MokListRT only efivarfs shows (shim rebuilds it each
        # boot).  Next boot's: as efivarfs has them now.
        at_boot = SecureBootDatabases.from_efivars({**(efivars_now or {}), **plan.boot_vars})
        at_next_boot = SecureBootDatabases.from_efivars(plan.next_vars())
        already = [_variable(log, e) for e in before_boot if e.event_type == tcglog.EV_EFI_VARIABLE_AUTHORITY]
        logged_lists = SecureBootDatabases.from_efivars(plan.boot_vars)  # what the firmware read
        _check_rule(log, firmware, booted_shim, lambda img: firmware_authorities(img, logged_lists),
                    already, "the firmware's authority for the booted shim")
        wanted = _without(firmware_authorities(shim, at_next_boot), already)
        plan.replace_block(firmware, wanted, chain.shim.index, f"the db entry that verifies {shim.path}")
    # shim: its own variables, then what verified the UKI.
    for ev, var in state:
        if var.name == "SbatLevel":
            plan.planned.append(_sbat_level(ev, var, shim, secure_boot, plan))
        else:
            plan.keep(ev, "MOK state unchanged")
    if secure_boot:
        _check_rule(log, verified_uki, booted_uki,
                    lambda img: shim_authorities(img, at_boot, (booted_shim or shim).vendor_cert, "the booted shim"),
                    [], "the booted shim's authority for the booted UKI")
        try:
            wanted = shim_authorities(uki, at_next_boot, shim.vendor_cert, shim.path)
        except ImageRefusedError as e:
            if efivars_now is not None:
                raise
            raise PredictionError(
                f"{log.source}: the running UKI was verified by "
                f"{', '.join(describe_record(r) for r in _variable_events(log, verified_uki)) or 'nothing'}; "
                f"{uki.path} ({e}) may be verified by a MokList entry, which only efivarfs can show") from None
        plan.replace_block(verified_uki, wanted, chain.uki.index, f"the entry that verifies {uki.path}")
    if efivars_now is None:
        plan.notes.append("Secure Boot variables were not compared with efivarfs (none given): "
                          "PCR7 assumes no pending db/dbx/KEK/PK change")
    return plan.planned, plan.notes


SHIM_STATE_VARIABLES = ("SbatLevel", "MokSBState")


def _variable(log: tcglog.EventLog, ev: tcglog.TcgEvent) -> UefiVariableData:
    try:
        var = tcg_event_data.decode_event_data(ev, uintn_size=_uintn(log), source=log.source)
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


def _without(found: Sequence[Authority], already: Sequence[UefiVariableData]) -> List[Authority]:
    """The firmware measures an entry once per boot: one that verified an earlier image
    (an option ROM, a driver) is not logged again for shim."""
    return [a for a in found if a.record not in already]


def _check_rule(log: tcglog.EventLog, logged: Sequence[tcglog.TcgEvent], booted: Optional[ImageMeasurement],
                rule, already: Sequence[UefiVariableData], what: str) -> None:
    """Trust the authority rule for the next boot only if it reproduces this boot's events
    (where the booted image is known)."""
    if booted is None:
        return
    try:
        expected = [a.record for a in _without(rule(booted), already)]
    except PredictionError as e:
        expected_text = f"a refusal ({e})"
        expected = None
    records = _variable_events(log, logged)
    if expected != records:
        if expected is not None:
            expected_text = ", ".join(describe_record(r) for r in expected) or "no event"
        raise PredictionError(
            f"{log.source}: {what} is logged as {', '.join(describe_record(r) for r in records) or 'no event'}, "
            f"but the authority rule gives {expected_text}: this platform verifies images differently, "
            f"so PCR7 cannot be predicted from its log")


def _measured_as(image: ImageMeasurement, ev: tcglog.TcgEvent, banks: Sequence[str]) -> bool:
    """Whether ``image`` is the file this boot measured in ``ev``."""
    return all(image.authenticode.get(b) == ev.digests.get(b) for b in banks)


def _sbat_level(ev: tcglog.TcgEvent, var: UefiVariableData, shim: ImageMeasurement, secure_boot: bool,
                plan: _Pcr7Plan) -> PlannedEvent:
    policy = plan.next_vars().get(("SbatPolicy", str(SHIM_LOCK_GUID)))
    same_shim = _measured_as(shim, plan.chain.shim, plan.banks)
    value = next_sbat_level(var.data, shim.sbat_levels, shim.sbat, secure_boot, policy, shim.path,
                            same_shim=same_shim)
    if value == var.data:
        return _unchanged(ev, plan.banks, f"{shim.path} keeps this SBAT level")
    plan.notes.append(f"PCR7: {shim.path} raises SbatLevel from {var.data.splitlines()[0].decode('ascii', 'replace')} "
                      f"to {value.splitlines()[0].decode('ascii', 'replace')}")
    data = UefiVariableData(var.guid, var.name, value).to_bytes()
    return PlannedEvent(ev.pcr, ev.event_type, {b: bank_hash(b, data) for b in plan.banks},
                        f"log #{ev.index} with the SbatLevel {shim.path} applies", ev.type_name, ev.index)


def predict_from_log(log: tcglog.EventLog, live: Optional[Mapping[str, Mapping[int, bytes]]],
                     shim: ImageMeasurement, uki: ImageMeasurement,
                     booted_shim: Optional[ImageMeasurement] = None,
                     efivars_now: Optional[EfiVarsNow] = None,
                     pcrs: Sequence[int] = (4, 7),
                     booted_uki: Optional[ImageMeasurement] = None) -> Prediction:
    """Predict from the log.  ``live`` None means offline: the log is only required to be
    internally consistent (every event carries every bank).  ``booted_shim``/``booted_uki``:
    the images that booted now, when known: the authority rule must reproduce their events."""
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
    pcr7, notes = plan_pcr7(log, chain, booted_shim, shim, uki, banks, efivars_now, booted_uki)
    events = sorted(events + pcr7, key=lambda e: e.log_index)
    values = replay_planned(events, banks, [4, 7], log.startup_locality)
    if chain.kernel is None:
        notes.append("this platform did not measure the kernel inside the UKI; neither will the next boot")
    return Prediction("log", uki.path, shim.path, values, tuple(events), tuple(notes),
                      "tpm" if live is not None else "offline")
