"""The vocabulary shared by both prediction sources: what was measured, what will be.

A prediction is a list of ``PlannedEvent``s, each saying where its digest comes from
(``origin``), replayed per bank.  Nothing here does I/O.
"""

import dataclasses
import hashlib
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from rhel_cvm_update.formats import tcglog

SEPARATOR_DIGEST_DATA = b"\0\0\0\0"
CALLING_EFI_APPLICATION = b"Calling EFI Application from Boot Option"
RETURNING_FROM_EFI_APPLICATION = b"Returning from EFI Application from Boot Option"


def bank_hash(bank: str, data: bytes) -> bytes:
    return hashlib.new(bank.replace("_", "-") if bank == "sm3_256" else bank, data).digest()


def digests_of(data: bytes, banks: Sequence[str]) -> Dict[str, bytes]:
    return {bank: bank_hash(bank, data) for bank in banks}


@dataclasses.dataclass(frozen=True)
class ImageMeasurement:
    """What a boot image contributes to the measurements, computed from the file."""

    path: str
    authenticode: Mapping[str, bytes]  # bank -> edk2 Authenticode (the PCR4 digest)
    linux_authenticode: Optional[Mapping[str, bytes]] = None  # UKI: the .linux payload
    # One entry per PKCS#7 signature, in certificate-table order: the DER certificates it
    # carries.  The verifiers try signatures in this order (authority.py).
    signatures: Tuple[Tuple[bytes, ...], ...] = ()
    sbat_levels: Mapping[str, str] = dataclasses.field(default_factory=dict)  # shim: .sbatlevel
    sbat: Optional[str] = None  # the .sbat CSV (shim checks its own against a new level)
    vendor_cert: Optional[bytes] = None  # shim: built-in vendor certificate (DER)
    kernel_version: Optional[str] = None

    @property
    def signed(self) -> bool:
        return bool(self.signatures)


@dataclasses.dataclass(frozen=True)
class PlannedEvent:
    pcr: int
    event_type: int
    digests: Mapping[str, bytes]
    origin: str  # e.g. "log #14, unchanged" or "authenticode of /boot/efi/EFI/Linux/new.efi"
    summary: str = ""
    log_index: Optional[int] = None  # the event of the current log this one stands for

    def to_json(self) -> dict:
        return {"pcr": self.pcr, "type": tcglog.EVENT_TYPES.get(self.event_type, hex(self.event_type)),
                "digests": {b: d.hex() for b, d in self.digests.items()},
                "origin": self.origin, "summary": self.summary}


def replay_planned(events: Sequence[PlannedEvent], banks: Sequence[str], pcrs: Sequence[int],
                   startup_locality: int = 0) -> Dict[str, Dict[int, bytes]]:
    out: Dict[str, Dict[int, bytes]] = {}
    for bank in banks:
        values = {pcr: tcglog.initial_pcr(pcr, bank, startup_locality) for pcr in pcrs}
        for ev in events:
            if ev.pcr in values and bank in ev.digests:
                values[ev.pcr] = tcglog.extend(bank, values[ev.pcr], ev.digests[bank])
        out[bank] = values
    return out


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Next boot's PCR values and the event-by-event justification."""

    source: str  # "log" or "model"
    uki: str
    shim: str
    banks: Mapping[str, Mapping[int, bytes]]  # bank -> pcr -> value
    events: Tuple[PlannedEvent, ...]
    notes: Tuple[str, ...] = ()
    checked_against: str = "tpm"  # where the current chain's values were confirmed
    # Every source asked: name -> {"ran", "pcr4", "pcr7", "error"}; and whether the sources
    # that ran agree (None when only one ran).  Filled in by predict.predict_next_boot.
    sources: Mapping[str, Mapping[str, object]] = dataclasses.field(default_factory=dict)
    agreed: Optional[bool] = None

    @property
    def pcrs(self) -> Dict[int, bytes]:
        """The sha256 bank, which is what the token is sealed to."""
        return dict(self.banks["sha256"])

    def to_json(self) -> dict:
        sha256 = self.banks.get("sha256", {})
        return {
            "source": self.source,
            "uki": self.uki,
            "shim": self.shim,
            "pcr4": sha256[4].hex() if 4 in sha256 else None,
            "pcr7": sha256[7].hex() if 7 in sha256 else None,
            "banks": {b: {str(p): v.hex() for p, v in vals.items()} for b, vals in self.banks.items()},
            "checked_against": self.checked_against,
            "sources": {name: dict(run) for name, run in self.sources.items()},
            "agreed": self.agreed,
            "notes": list(self.notes),
            "events": [e.to_json() for e in self.events],
        }


def compare_with_live(computed: Mapping[str, Mapping[int, bytes]],
                      live: Mapping[str, Mapping[int, bytes]]) -> List[Tuple[str, int, bytes, bytes]]:
    """Mismatches (bank, pcr, computed, live) over every bank and PCR both sides have."""
    bad = []
    for bank, values in computed.items():
        for pcr, value in values.items():
            have = live.get(bank, {}).get(pcr)
            if have is not None and have != value:
                bad.append((bank, pcr, value, have))
    return bad


def common_banks(computed: Mapping[str, object], live: Mapping[str, object]) -> List[str]:
    return [b for b in computed if b in live]
