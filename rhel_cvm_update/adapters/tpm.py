"""The TPM, through tpm2-pytss (ESAPI).  The only module that imports tpm2_pytss.

A ``Tpm`` is a context manager over a TCTI string (config key ``tpm``, e.g.
``device:/dev/tpmrm0`` or ``swtpm:host=127.0.0.1,port=2321``).  Every transient handle
it creates is flushed on every path: swtpm and a TPM without resource manager have
only three object and three session slots, and a leaked handle makes the next
operation fail.
"""

from typing import Dict, List, Sequence

from rhel_cvm_update.errors import ConfigError, MachineError

try:
    from tpm2_pytss import ESAPI, TSS2_Exception
    from tpm2_pytss.constants import TPM2_ALG
    from tpm2_pytss.types import TPML_PCR_SELECTION, TPMS_PCR_SELECTION
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MachineError(f"tpm2-pytss is not installed: {e}") from None

# Bank names as systemd writes them in tpm2-pcr-bank, mapped to TPM_ALG_ID.
PCR_BANKS: Dict[str, int] = {
    "sha1": TPM2_ALG.SHA1,
    "sha256": TPM2_ALG.SHA256,
    "sha384": TPM2_ALG.SHA384,
    "sha512": TPM2_ALG.SHA512,
}

PCR_COUNT = 24


def _pcr_selection(alg: int, pcrs: Sequence[int]) -> "TPML_PCR_SELECTION":
    select = bytearray(3)
    for pcr in pcrs:
        select[pcr // 8] |= 1 << (pcr % 8)
    return TPML_PCR_SELECTION([TPMS_PCR_SELECTION(hash=alg, sizeofSelect=3, pcrSelect=bytes(select))])


def _selected_pcrs(selection: "TPML_PCR_SELECTION", alg: int) -> List[int]:
    """PCR indices a TPM reports in a TPML_PCR_SELECTION for one bank, ascending."""
    found: List[int] = []
    for i in range(selection.count):
        entry = selection.pcrSelections[i]
        if entry.hash != alg:
            continue
        bits = bytes(entry.pcrSelect)[:entry.sizeofSelect]
        found.extend(byte_index * 8 + bit for byte_index, byte in enumerate(bits)
                     for bit in range(8) if byte & (1 << bit))
    return sorted(found)


class Tpm:
    """One ESAPI connection.  Use as ``with Tpm(config.tpm) as tpm: ...``."""

    def __init__(self, tcti: str):
        self.tcti = tcti
        self._esapi = None

    def __enter__(self) -> "Tpm":
        try:
            self._esapi = ESAPI(self.tcti)
        except TSS2_Exception as e:
            raise MachineError(f"cannot open TPM {self.tcti!r}: {e}") from None
        return self

    def __exit__(self, *exc_info) -> None:
        if self._esapi is not None:
            self._esapi.close()
            self._esapi = None

    @property
    def esapi(self) -> "ESAPI":
        if self._esapi is None:
            raise MachineError(f"TPM {self.tcti!r} is not open (use 'with Tpm(...)')")
        return self._esapi

    def read_pcrs(self, pcrs: Sequence[int], bank: str = "sha256") -> Dict[int, bytes]:
        """TPM2_PCR_Read of ``pcrs`` in ``bank``.  A TPM returns at most eight digests per
        call (TPML_DIGEST holds eight), so ask again for whatever it left out."""
        if bank not in PCR_BANKS:
            raise ConfigError(f"unknown PCR bank {bank!r}; known banks: {', '.join(PCR_BANKS)}")
        bad = [p for p in pcrs if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < PCR_COUNT]
        if bad:
            raise ConfigError(f"PCR numbers must be integers 0-{PCR_COUNT - 1}, got {bad!r}")
        alg = PCR_BANKS[bank]
        wanted = sorted(set(pcrs))
        values: Dict[int, bytes] = {}
        while wanted:
            try:
                _, selection_out, digests = self.esapi.pcr_read(_pcr_selection(alg, wanted))
            except TSS2_Exception as e:
                raise MachineError(f"TPM2_PCR_Read of {bank} PCRs {wanted} failed: {e}") from None
            returned = [p for p in _selected_pcrs(selection_out, alg) if p in wanted]
            if not returned or len(returned) != digests.count:
                raise MachineError(f"TPM {self.tcti!r} returned no {bank} value for PCRs {wanted} "
                                   f"(is the {bank} bank allocated?)")
            for pcr, index in zip(returned, range(digests.count)):
                values[pcr] = bytes(digests.digests[index])
            wanted = [p for p in wanted if p not in values]
        return values
