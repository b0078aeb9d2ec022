"""TPM 2.0 wire helpers and the offline PolicyPCR digest (pure functions over bytes).

TPM structures are big-endian.  A TPM2B_* is a u16 size followed by that many bytes.
The policy formula is TPM 2.0 Part 3, TPM2_PolicyPCR: with one sha256 bank,

    policy = SHA256(previous || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || SHA256(PCR values))

where the values are concatenated in ascending PCR order (reference 4.5).  Computing it
here, from predicted values, is the whole point: the TPM can only derive it from the
PCRs of the current boot.
"""

import hashlib
import struct
from typing import Dict, List, Mapping, Sequence, Tuple

from rhel_cvm_update.errors import FormatError

TPM_CC_PolicyPCR = 0x0000017F
TPM_CC_PolicyAuthValue = 0x0000016B

# TPM_ALG_ID of the PCR banks and their digest sizes.
TPM_ALG_SHA1 = 0x0004
TPM_ALG_SHA256 = 0x000B
TPM_ALG_SHA384 = 0x000C
TPM_ALG_SHA512 = 0x000D
TPM_ALG_KEYEDHASH = 0x0008
TPM_ALG_NULL = 0x0010

PCR_BANK_ALGS: Dict[str, int] = {"sha1": TPM_ALG_SHA1, "sha256": TPM_ALG_SHA256,
                                 "sha384": TPM_ALG_SHA384, "sha512": TPM_ALG_SHA512}
DIGEST_SIZES: Dict[int, int] = {TPM_ALG_SHA1: 20, TPM_ALG_SHA256: 32, TPM_ALG_SHA384: 48,
                                TPM_ALG_SHA512: 64}
HASH_NAMES: Dict[int, str] = {TPM_ALG_SHA1: "sha1", TPM_ALG_SHA256: "sha256",
                              TPM_ALG_SHA384: "sha384", TPM_ALG_SHA512: "sha512"}

PCR_COUNT = 24
PCR_SELECT_SIZE = 3  # 24 PCRs, one bit each

# TPMA_OBJECT bits used when checking a sealed object.
TPMA_OBJECT_FIXEDTPM = 0x00000002
TPMA_OBJECT_FIXEDPARENT = 0x00000010
TPMA_OBJECT_USERWITHAUTH = 0x00000040
TPMA_OBJECT_NODA = 0x00000400


def tpm2b(data: bytes) -> bytes:
    """Marshal a TPM2B_*: u16 BE size, then the bytes."""
    if len(data) > 0xFFFF:
        raise FormatError(f"a TPM2B holds at most 65535 bytes, got {len(data)}", source="TPM2B", field="size")
    return struct.pack(">H", len(data)) + bytes(data)


def read_tpm2b(buf: bytes, offset: int, *, source: str, field: str) -> Tuple[bytes, int]:
    """Unmarshal a TPM2B_* at ``offset``; returns (contents, offset after it)."""
    if offset < 0 or offset + 2 > len(buf):
        raise FormatError("truncated: no room for the u16 size", source=source, offset=offset, field=field)
    (size,) = struct.unpack_from(">H", buf, offset)
    end = offset + 2 + size
    if end > len(buf):
        raise FormatError(f"size {size} runs past the end of the {len(buf)}-byte buffer",
                          source=source, offset=offset, field=field)
    return bytes(buf[offset + 2:end]), end


def check_pcrs(pcrs: Sequence[int], *, source: str, field: str = "pcrs") -> List[int]:
    out = []
    for pcr in pcrs:
        if isinstance(pcr, bool) or not isinstance(pcr, int) or not 0 <= pcr < PCR_COUNT:
            raise FormatError(f"PCR index must be an integer 0-{PCR_COUNT - 1}, got {pcr!r}",
                              source=source, field=field)
        out.append(pcr)
    if len(set(out)) != len(out):
        raise FormatError(f"PCR list has duplicates: {list(pcrs)!r}", source=source, field=field)
    return sorted(out)


def pcr_selection(bank: str, pcrs: Sequence[int]) -> bytes:
    """TPML_PCR_SELECTION with a single bank: count=1, hash alg, sizeofSelect=3, bitmap."""
    if bank not in PCR_BANK_ALGS:
        raise FormatError(f"unknown PCR bank {bank!r}", source="pcr selection", field="bank")
    bitmap = bytearray(PCR_SELECT_SIZE)
    for pcr in check_pcrs(pcrs, source="pcr selection"):
        bitmap[pcr // 8] |= 1 << (pcr % 8)
    return struct.pack(">IHB", 1, PCR_BANK_ALGS[bank], PCR_SELECT_SIZE) + bytes(bitmap)


def policy_pcr(pcr_values: Mapping[int, bytes], bank: str = "sha256",
               previous: bytes = bytes(32)) -> bytes:
    """The sha256 policy digest after TPM2_PolicyPCR over ``pcr_values`` (PCR -> value)."""
    if bank not in PCR_BANK_ALGS:
        raise FormatError(f"unknown PCR bank {bank!r}", source="policy", field="bank")
    pcrs = check_pcrs(list(pcr_values), source="policy")
    if not pcrs:
        raise FormatError("no PCRs selected", source="policy", field="pcrs")
    size = DIGEST_SIZES[PCR_BANK_ALGS[bank]]
    for pcr in pcrs:
        if len(pcr_values[pcr]) != size:
            raise FormatError(f"PCR {pcr} value has {len(pcr_values[pcr])} bytes, a {bank} digest has {size}",
                              source="policy", field=f"pcr {pcr}")
    if len(previous) != 32:
        raise FormatError(f"previous policy digest must be 32 bytes, got {len(previous)}",
                          source="policy", field="previous")
    # The PCR digest uses the policy session's hash (sha256), whatever the bank.
    pcr_digest = hashlib.sha256(b"".join(pcr_values[p] for p in pcrs)).digest()
    return hashlib.sha256(bytes(previous) + struct.pack(">I", TPM_CC_PolicyPCR)
                          + pcr_selection(bank, pcrs) + pcr_digest).digest()


def policy_auth_value(previous: bytes) -> bytes:
    """The digest after TPM2_PolicyAuthValue (used by tokens with a PIN)."""
    return hashlib.sha256(bytes(previous) + struct.pack(">I", TPM_CC_PolicyAuthValue)).digest()


class SealedObjectPublic:
    """The parts of a sealed object's TPMT_PUBLIC this tool checks (Part 2, 12.2.4)."""

    def __init__(self, obj_type: int, name_alg: int, attributes: int, auth_policy: bytes,
                 raw: bytes):
        self.obj_type = obj_type
        self.name_alg = name_alg
        self.attributes = attributes
        self.auth_policy = auth_policy
        self.raw = raw

    @property
    def name(self) -> bytes:
        """TPM Name: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        if self.name_alg not in HASH_NAMES:
            raise FormatError(f"nameAlg {self.name_alg:#06x} is not a supported hash",
                              source="TPMT_PUBLIC", field="nameAlg")
        return struct.pack(">H", self.name_alg) + hashlib.new(HASH_NAMES[self.name_alg], self.raw).digest()


def parse_public_area(public: bytes, *, source: str) -> SealedObjectPublic:
    """Read type, nameAlg, objectAttributes and authPolicy from a TPMT_PUBLIC."""
    if len(public) < 10:
        raise FormatError(f"TPMT_PUBLIC of {len(public)} bytes is too short", source=source, offset=0,
                          field="TPMT_PUBLIC")
    obj_type, name_alg, attributes = struct.unpack_from(">HHI", public, 0)
    auth_policy, _ = read_tpm2b(public, 8, source=source, field="authPolicy")
    return SealedObjectPublic(obj_type, name_alg, attributes, auth_policy, bytes(public))


def split_sealed_blob(blob: bytes, *, source: str) -> Tuple[bytes, bytes]:
    """systemd's tpm2-blob: TPM2B_PRIVATE || TPM2B_PUBLIC, exactly.  Returns the two
    marshalled TPM2Bs (size prefixes included), ready for TPM2_Load.

    A trailing TPM2B_ENCRYPTED_SECRET (systemd 255+ import form) or shard arrays are
    refused by the caller's token model; here any trailing byte is an error."""
    private, after_private = read_tpm2b(blob, 0, source=source, field="TPM2B_PRIVATE")
    if not private:
        raise FormatError("empty TPM2B_PRIVATE", source=source, offset=0, field="TPM2B_PRIVATE")
    public, end = read_tpm2b(blob, after_private, source=source, field="TPM2B_PUBLIC")
    if not public:
        raise FormatError("empty TPM2B_PUBLIC", source=source, offset=after_private, field="TPM2B_PUBLIC")
    if end != len(blob):
        raise FormatError(f"{len(blob) - end} unexpected bytes after TPM2B_PUBLIC", source=source,
                          offset=end, field="tpm2-blob")
    return bytes(blob[:after_private]), bytes(blob[after_private:end])


def rsa_unique_from_tpm2_tools(unique_file: bytes, *, source: str) -> bytes:
    """tpm2_createprimary -u FILE reads FILE as a raw TPMU_PUBLIC_ID in host (little-endian)
    order: for RSA a u16 LE size, then that many bytes of the modulus placeholder."""
    if len(unique_file) < 2:
        raise FormatError("too short for a TPMU_PUBLIC_ID", source=source, offset=0, field="unique_dat")
    (size,) = struct.unpack_from("<H", unique_file, 0)
    if size > 512 or 2 + size > len(unique_file):
        raise FormatError(f"size {size} does not fit the {len(unique_file)}-byte file",
                          source=source, offset=0, field="unique_dat")
    return bytes(unique_file[2:2 + size])


def serialized_handle_name(serialized: bytes, *, source: str) -> Tuple[int, bytes]:
    """(TPM handle, Name) from an ESYS_TR serialization (tpm2-tss Esys_TR_Serialize, as in
    systemd's tpm2_srk): u32 handle, TPM2B_NAME, u32 resource type, then the public area."""
    if len(serialized) < 4:
        raise FormatError("too short for an ESYS_TR serialization", source=source, offset=0, field="handle")
    (handle,) = struct.unpack_from(">I", serialized, 0)
    name, _ = read_tpm2b(serialized, 4, source=source, field="name")
    if not name:
        raise FormatError("empty name", source=source, offset=4, field="name")
    return handle, name
