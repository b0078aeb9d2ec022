"""One TCG event as ``eventlog --json`` and ``predict --explain`` show it: its header, its
digests, and its data decoded (tcg_event_data.py) into JSON plus a one-line summary.  Data
that fails to decode is shown as hex with the reason, so one odd event never hides the rest
of a log."""

import uuid
from typing import Any, Dict, Tuple

from rhel_cvm_update.errors import FormatError
from rhel_cvm_update.formats.efi import UefiVariableData
from rhel_cvm_update.formats.tcg_event_data import decode_event_data
from rhel_cvm_update.formats.tcglog import ALGORITHMS, SpecIdEvent, TcgEvent


def _variable_json(var: UefiVariableData) -> Dict[str, Any]:
    return {"guid": str(var.guid), "name": var.name, "data_hex": var.data.hex()}


def _variable_summary(var: UefiVariableData) -> str:
    if len(var.data) <= 4:
        return f"{var.name} = {var.data.hex() or '(empty)'}"
    if var.name == "SbatLevel":
        return f"{var.name} = {var.data.decode('ascii', 'replace').strip()!r}"
    return f"{var.name} ({len(var.data)} bytes)"


def _json_and_summary(decoded: object) -> Tuple[Any, str]:
    if isinstance(decoded, str):
        return decoded, decoded or "(empty text)"
    if isinstance(decoded, int):
        return decoded, f"{decoded:#010x}"
    if isinstance(decoded, uuid.UUID):
        return str(decoded), str(decoded)
    if isinstance(decoded, UefiVariableData):
        return _variable_json(decoded), _variable_summary(decoded)
    if isinstance(decoded, SpecIdEvent):
        algs = {ALGORITHMS.get(a, (f"{a:#06x}", 0))[0]: s for a, s in decoded.algorithms.items()}
        return ({"signature": "Spec ID Event03", "uintn_size": decoded.uintn_size,
                 "algorithms": algs, "vendor_info_hex": decoded.vendor_info.hex()},
                "Spec ID Event03 " + ",".join(algs))
    return decoded.to_json(), decoded.summary()  # type: ignore[attr-defined]


def describe_event(event: TcgEvent, uintn_size: int = 8, source: str = "<bytes>") -> Dict[str, Any]:
    """A JSON-able description of ``event`` (see the module docstring)."""
    out: Dict[str, Any] = {
        "index": event.index, "offset": event.offset, "pcr": event.pcr,
        "type": event.type_name, "type_value": event.event_type,
        "digests": {bank: digest.hex() for bank, digest in event.digests.items()},
    }
    try:
        decoded = decode_event_data(event, uintn_size, source)
    except FormatError as e:
        out.update(data=None, data_hex=event.data.hex(), data_error=str(e),
                   summary=f"({len(event.data)} bytes, undecodable: {e})")
        return out
    if decoded is None:
        out.update(data=None, data_hex=event.data.hex(), summary=f"({len(event.data)} bytes)")
    else:
        out["data"], out["summary"] = _json_and_summary(decoded)
    return out
