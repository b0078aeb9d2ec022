"""Predict next boot's PCR4/PCR7: gather the inputs from the machine, run a source, and
trust its answer only after it reproduced the live PCRs of the chain booted now.

Sources (``auto`` asks both):
  log   - the current TCG event log with the new digests substituted (predict_log.py);
  model - a model of the boot from the binaries and Secure Boot variables (predict_model.py),
          for when the log is missing, empty or inconsistent.

The agreement rule (``agree``): each source is trusted only after it reproduced the live
PCRs of the chain booted now; when both can run, their PCR4 and PCR7 must be equal or
nothing is predicted (SourcesDisagreeError, naming both values and the first differing
event).  When only one can run, the prediction says so in its notes.
"""

import dataclasses
import os
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple

from rhel_cvm_update.errors import (ConfigError, CvmUpdateError, FormatError, MachineError, PredictionError,
                                    SourcesDisagreeError)
from rhel_cvm_update.formats import tcglog
from rhel_cvm_update.formats.devpath import FilePathNode
from rhel_cvm_update.formats.efi import EFI_GLOBAL_VARIABLE
from rhel_cvm_update.formats.loadopt import LoadOption, boot_variable_name

if TYPE_CHECKING:
    from rhel_cvm_update.boot_events import ImageMeasurement, Prediction

# The prediction sources and the image measurement (PE, PKCS#7 through `cryptography`) are
# imported by the functions that predict: `status` and `update` use the helpers below
# (read_event_log, booted_chain, shim_path) and must start fast.

SOURCES = ("auto", "log", "model")
SUPPORTED_BANKS = ("sha256", "sha1", "sha384", "sha512")
MAX_EVENT_LOG_SIZE = 16 << 20
LivePcrs = Mapping[str, Mapping[int, bytes]]


def shim_path(config) -> str:
    return os.path.join(config.esp, "EFI", config.vendor, "shimx64.efi")


def esp_file(esp: str, efi_path: str) -> str:
    r"""The file an ESP path like ``\EFI\redhat\shimx64.efi`` names.  FAT is case-insensitive,
    so each component is matched without regard to case."""
    current = esp
    for part in [p for p in efi_path.replace("\\", "/").split("/") if p]:
        if part in (".", ".."):
            raise FormatError(f"ESP path {efi_path!r} contains {part!r}", source="boot entry")
        try:
            names = os.listdir(current)
        except OSError as e:
            raise MachineError(f"cannot list {current}: {e.strerror}") from None
        match = [n for n in names if n.lower() == part.lower()]
        if not match:
            raise MachineError(f"{efi_path} (from the boot entry) is not on the ESP {esp}")
        current = os.path.join(current, sorted(match)[0])
    return current


def read_event_log(path: str) -> tcglog.EventLog:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_EVENT_LOG_SIZE + 1)
    except OSError as e:
        raise FormatError(f"cannot read the event log: {e.strerror}", source=path) from None
    if len(data) > MAX_EVENT_LOG_SIZE:
        raise FormatError(f"event log larger than {MAX_EVENT_LOG_SIZE} bytes", source=path)
    if not data:
        raise FormatError("the event log is empty", source=path, offset=0)
    return tcglog.parse_event_log(data, source=path)


def read_live_pcrs(tpm, pcrs=(4, 7)) -> Dict[str, Dict[int, bytes]]:
    """sha256 is required; other banks are read where the TPM has them allocated."""
    live = {"sha256": tpm.read_pcrs(pcrs, "sha256")}
    for bank in ("sha1", "sha384"):
        try:
            live[bank] = tpm.read_pcrs(pcrs, bank)
        except MachineError:
            continue
    return live


def booted_chain(efivarfs, esp: str) -> Tuple[str, str]:
    """(shim, UKI) files of the entry the firmware booted now: BootCurrent's Boot####, its
    loader path and the second stage shim read from its optional data."""
    current = efivarfs.get("BootCurrent", EFI_GLOBAL_VARIABLE)
    if current is None or len(current.data) != 2:
        raise PredictionError("BootCurrent is missing from efivarfs: cannot tell which chain booted")
    name = boot_variable_name(int.from_bytes(current.data, "little"))
    entry = efivarfs.get(name, EFI_GLOBAL_VARIABLE)
    if entry is None:
        raise PredictionError(f"BootCurrent names {name}, which does not exist")
    option = LoadOption.from_bytes(entry.data, source=name)
    files = [n for n in option.device_path if isinstance(n, FilePathNode)]
    if not files:
        raise PredictionError(f"{name} has no file path: not a shim entry")
    loader = esp_file(esp, files[-1].path)
    second = option.optional_data_path()
    if not second:
        # shim with no load options starts grubx64.efi from its own directory.
        second = os.path.join(os.path.dirname(files[-1].path.replace("\\", "/")), "grubx64.efi")
    elif not second.upper().startswith("\\EFI\\"):
        second = os.path.join(os.path.dirname(files[-1].path.replace("\\", "/")), second)
    return loader, esp_file(esp, second)


def prediction_banks(live: Optional[LivePcrs]) -> List[str]:
    """The banks a prediction computes: those of the live PCRs (all supported ones offline)."""
    return [b for b in SUPPORTED_BANKS if live is None or b in live]


def predict_next_boot(config, uki: str, shim: Optional[str] = None, source: str = "auto", tpm=None,
                      event_log: Optional[str] = None, offline: bool = False,
                      live: Optional[LivePcrs] = None, efivarfs=None,
                      booted_shim: Optional[str] = None, digest_cache=None) -> "Prediction":
    """Predict PCR4 and PCR7 of a boot of ``uki`` through ``shim`` (default: the shim on the
    ESP now).  ``tpm``: an open adapters.tpm.Tpm (opened from config.tpm when needed);
    ``live``: already-read live PCRs; ``offline``: no live check (log source only);
    ``booted_shim``: a copy of the shim that booted now, when a shim update has replaced it
    on the ESP (default: the shim on the ESP is the booted one); ``digest_cache``: a
    measure.DigestCache holding digests already computed (the transaction's detect step)."""
    if source not in SOURCES:
        raise ConfigError(f"unknown prediction source {source!r}; use one of {', '.join(SOURCES)}")
    if efivarfs is None and os.path.isdir(config.efivars):
        from rhel_cvm_update.adapters.efivarfs import EfiVarFs

        efivarfs = EfiVarFs(config.efivars)
    current_shim = booted_shim or shim_path(config)
    next_shim = shim or shim_path(config)
    if live is None and not offline:
        if tpm is None:
            from rhel_cvm_update.adapters.tpm import Tpm

            with Tpm(config.tpm) as opened:
                live = read_live_pcrs(opened)
        else:
            live = read_live_pcrs(tpm)
    banks = prediction_banks(live)

    inputs = SourceInputs(config.esp, efivarfs, digest_cache)
    runs: Dict[str, SourceRun] = {}
    if source in ("auto", "log"):
        runs["log"] = run_source(lambda: _from_log(config, event_log or config.event_log, live, banks, uki,
                                                    next_shim, current_shim, inputs))
    if source in ("auto", "model"):
        runs["model"] = run_source(lambda: _from_model(config, live, banks, uki, next_shim, booted_shim, inputs))
    return agree(runs)


class SourceInputs:
    """What both sources read from the machine, read once: a 100 MiB UKI is hashed once per
    prediction, not once per source."""

    def __init__(self, esp: str, efivarfs, digest_cache=None):
        self.esp, self.efivarfs, self.digest_cache = esp, efivarfs, digest_cache
        self._images: Dict[Tuple[str, Tuple[str, ...]], "ImageMeasurement"] = {}
        self._variables: Optional[Dict[Tuple[str, str], bytes]] = None

    def image(self, path: str, banks: List[str]) -> "ImageMeasurement":
        from rhel_cvm_update.measure import measure_image

        key = (path, tuple(banks))
        if key not in self._images:
            self._images[key] = measure_image(path, banks, self.digest_cache)
        return self._images[key]

    def policy_variables(self) -> Optional[Dict[Tuple[str, str], bytes]]:
        from rhel_cvm_update.measure import read_policy_variables

        if self._variables is None and self.efivarfs is not None:
            self._variables = read_policy_variables(self.efivarfs)
        return self._variables

    def booted_chain(self) -> Tuple[str, str]:
        return booted_chain(self.efivarfs, self.esp)


@dataclasses.dataclass(frozen=True)
class SourceRun:
    """One source's answer: a prediction, or the error that stopped it."""

    prediction: Optional["Prediction"] = None
    error: Optional[CvmUpdateError] = None

    def to_json(self) -> Dict[str, object]:
        sha256 = self.prediction.banks["sha256"] if self.prediction else {}
        return {"ran": self.prediction is not None,
                "pcr4": sha256[4].hex() if 4 in sha256 else None,
                "pcr7": sha256[7].hex() if 7 in sha256 else None,
                "error": str(self.error) if self.error else None}


def run_source(work) -> SourceRun:
    try:
        return SourceRun(prediction=work())
    except CvmUpdateError as e:  # it cannot explain this boot, or an input it needs is missing
        return SourceRun(error=e)


def agree(runs: Mapping[str, SourceRun]) -> "Prediction":
    """The agreement rule: every source that can run must give the same PCR4 and PCR7 in every
    bank they share; the preferred one (the log) is returned, with each source's answer."""
    sources = {name: run.to_json() for name, run in runs.items()}
    ran = [(name, run.prediction) for name, run in runs.items() if run.prediction is not None]
    if not ran:
        if len(runs) == 1:
            raise next(iter(runs.values())).error
        raise PredictionError("neither source can predict the next boot",
                              details=[f"{_source_label(n)}: {r.error}" for n, r in runs.items()])
    name, chosen = ran[0]
    notes: List[str] = []
    agreed: Optional[bool] = None
    if len(ran) == 2:
        (first, a), (second, b) = ran
        difference = first_difference(a, b)
        if difference:
            raise SourcesDisagreeError(
                f"the {first} and {second} sources disagree about the next boot, so neither is sealed to: "
                f"{first} PCR4 {a.banks['sha256'][4].hex()} PCR7 {a.banks['sha256'][7].hex()}, "
                f"{second} PCR4 {b.banks['sha256'][4].hex()} PCR7 {b.banks['sha256'][7].hex()}; "
                f"first differing event: {difference}",
                details=[f"{p.source}: {e.summary or e.event_type} {e.digests['sha256'].hex()[:16]} ({e.origin})"
                         for p in (a, b) for e in p.events if e.pcr in (4, 7)])
        agreed = True
        notes.append(f"the {first} and {second} sources agree on PCR4 and PCR7")
    elif len(runs) == 2:
        other = next(n for n in runs if n != name)
        notes.append(f"only the {name} source could run, so nothing cross-checked it; "
                     f"the {_source_label(other)} was not used: {runs[other].error}")
    return dataclasses.replace(chosen, notes=tuple(notes) + chosen.notes, sources=sources, agreed=agreed)


def _source_label(name: str) -> str:
    return "event log" if name == "log" else name


def first_difference(a: "Prediction", b: "Prediction") -> Optional[str]:
    """None when both give the same PCR4/PCR7 in every shared bank, else the first event
    (per PCR, in order) where they part."""
    banks = [bank for bank in a.banks if bank in b.banks]
    if all(a.banks[bank].get(p) == b.banks[bank].get(p) for bank in banks for p in (4, 7)):
        return None
    for pcr in (4, 7):
        if all(a.banks[bank].get(pcr) == b.banks[bank].get(pcr) for bank in banks):
            continue
        ours = [e for e in a.events if e.pcr == pcr]
        theirs = [e for e in b.events if e.pcr == pcr]
        for number, (x, y) in enumerate(zip(ours, theirs), 1):
            if any(x.digests.get(bank) != y.digests.get(bank) for bank in banks):
                return (f"PCR{pcr} event {number}: {a.source} has {x.summary or x.event_type} "
                        f"{x.digests['sha256'].hex()[:16]}... ({x.origin}), {b.source} has "
                        f"{y.summary or y.event_type} {y.digests['sha256'].hex()[:16]}... ({y.origin})")
        return (f"PCR{pcr}: {a.source} has {len(ours)} events, {b.source} {len(theirs)}; the first "
                f"{min(len(ours), len(theirs))} are the same")
    # Same events, other values: the sources start PCRs differently (the log's startup locality).
    return "the same events replay to other values (a different PCR start value)"


def _from_model(config, live: Optional[LivePcrs], banks: List[str], uki: str, next_shim: str,
                booted_shim: Optional[str], inputs: SourceInputs) -> "Prediction":
    from rhel_cvm_update.predict_model import predict_from_model

    if live is None:
        raise PredictionError("the model source needs the live PCRs to check itself against; "
                              "it cannot run offline")
    if inputs.efivarfs is None:
        raise PredictionError(f"the model source needs efivarfs ({config.efivars} is not a directory)")
    booted_shim_file, booted_uki_file = inputs.booted_chain()
    return predict_from_model(inputs.policy_variables(), live, inputs.image(booted_shim or booted_shim_file, banks),
                              inputs.image(booted_uki_file, banks), inputs.image(next_shim, banks),
                              inputs.image(uki, banks))


def _from_log(config, log_path: str, live: Optional[LivePcrs], banks: List[str], uki: str,
              next_shim: str, current_shim: str, inputs: SourceInputs) -> "Prediction":
    from rhel_cvm_update.predict_log import predict_from_log

    log = read_event_log(log_path)
    if live is None:  # offline: only the log's banks matter (and the model does not run)
        banks = [b for b in banks if b in log.banks]
    booted_shim = inputs.image(current_shim, banks) if os.path.exists(current_shim) else None
    booted_uki = None
    if inputs.efivarfs is not None:
        try:  # the booted UKI lets the authority rule be checked against this boot's events
            booted_uki = inputs.image(inputs.booted_chain()[1], banks)
        except CvmUpdateError:
            booted_uki = None
    return predict_from_log(log, live, inputs.image(next_shim, banks), inputs.image(uki, banks), booted_shim,
                            inputs.policy_variables(), pcrs=(4, 7), booted_uki=booted_uki)
