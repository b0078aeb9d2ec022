"""The TPM, through tpm2-pytss (ESAPI).  The only module that imports tpm2_pytss.

A ``Tpm`` is a context manager over a TCTI string (config key ``tpm``, e.g.
``device:/dev/tpmrm0`` or ``swtpm:host=127.0.0.1,port=2321``).  Every transient handle
it creates is flushed on every path: swtpm and a TPM without resource manager have
only three object and three session slots, and a leaked handle makes the next
operation fail.
"""

import contextlib
import hmac
import os
from typing import Dict, Iterator, List, Sequence, Tuple

from rhel_cvm_update.errors import ConfigError, FormatError, MachineError, UnsupportedError
from rhel_cvm_update.formats import tpm_policy
from rhel_cvm_update.formats.luks_token import SystemdTpm2Token, Tpm2ImportToken
from rhel_cvm_update.secrets import Secret

try:
    from tpm2_pytss import ESAPI, TSS2_Exception
    from tpm2_pytss._libtpm2_pytss import ffi
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_ECC, TPM2_SE, TPMA_SESSION
    from tpm2_pytss.types import (TPM2B_DATA, TPM2B_DIGEST, TPM2B_ENCRYPTED_SECRET, TPM2B_PRIVATE,
                                  TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPM2B_SENSITIVE_DATA,
                                  TPML_PCR_SELECTION, TPMS_PCR_SELECTION, TPMS_SENSITIVE_CREATE,
                                  TPMT_PUBLIC, TPMT_SYM_DEF, TPMT_SYM_DEF_OBJECT)
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MachineError(f"tpm2-pytss is not installed: {e}") from None

# systemd 252 legacy primary (tpm2_make_primary; reference 4.3): restricted | decrypt |
# fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth, no noDA.
LEGACY_PRIMARY_ATTRIBUTES = 0x00030072
# TCG provisioning-guidance SRK (systemd >= 254, at 0x81000001) and Azure's import
# primary (tpm2-luks-import.sh): the same plus noDA.
SRK_ATTRIBUTES = 0x00030472
SRK_HANDLE = 0x81000001
# Sealed object (reference 4.4): fixedTPM | fixedParent, nothing else, so only the
# policy can authorise an unseal.
SEALED_OBJECT_ATTRIBUTES = 0x00000012

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


def _sym_aes128cfb() -> "TPMT_SYM_DEF":
    sym = TPMT_SYM_DEF(algorithm=TPM2_ALG.AES)
    sym.keyBits.aes = 128
    sym.mode.aes = TPM2_ALG.CFB
    return sym


def primary_template(alg: str, attributes: int = LEGACY_PRIMARY_ATTRIBUTES,
                     unique: bytes = b"") -> "TPM2B_PUBLIC":
    """systemd's legacy primary (ECC P-256 or RSA-2048, AES-128-CFB, empty unique);
    with other attributes and a unique value it is Azure's import primary."""
    if alg == "ecc":
        area = TPMT_PUBLIC(type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
        detail = area.parameters.eccDetail
        detail.curveID = TPM2_ECC.NIST_P256
        detail.kdf.scheme = TPM2_ALG.NULL
        if unique:
            raise UnsupportedError("a unique value is only supported for RSA primaries")
    elif alg == "rsa":
        area = TPMT_PUBLIC(type=TPM2_ALG.RSA, nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
        detail = area.parameters.rsaDetail
        detail.keyBits = 2048
        detail.exponent = 0
        if unique:
            area.unique.rsa = unique
    else:
        raise ConfigError(f"unknown primary algorithm {alg!r} (expected 'ecc' or 'rsa')")
    detail.symmetric.algorithm = TPM2_ALG.AES
    detail.symmetric.keyBits.aes = 128
    detail.symmetric.mode.aes = TPM2_ALG.CFB
    detail.scheme.scheme = TPM2_ALG.NULL
    return TPM2B_PUBLIC(publicArea=area)


def sealed_object_template(policy_digest: bytes) -> "TPM2B_PUBLIC":
    area = TPMT_PUBLIC(type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256,
                       objectAttributes=SEALED_OBJECT_ATTRIBUTES, authPolicy=policy_digest)
    area.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
    return TPM2B_PUBLIC(publicArea=area)


def _sensitive_from(secret: Secret) -> "TPM2B_SENSITIVE_CREATE":
    """Copy the secret into C memory directly (no immutable Python copy); the
    intermediate copy is zeroed at once, the returned one by _wipe_sensitive."""
    data = TPM2B_SENSITIVE_DATA()
    ffi.memmove(data._cdata.buffer, secret.data, len(secret))
    data._cdata.size = len(secret)
    try:
        return TPM2B_SENSITIVE_CREATE(sensitive=TPMS_SENSITIVE_CREATE(data=data))
    finally:
        ffi.memmove(data._cdata.buffer, bytes(len(secret)), len(secret))


def _wipe_sensitive(sensitive: "TPM2B_SENSITIVE_CREATE") -> None:
    data = sensitive._cdata.sensitive.data
    ffi.memmove(data.buffer, bytes(data.size), data.size)
    data.size = 0


def _secret_from(data: "TPM2B_SENSITIVE_DATA") -> Secret:
    size = data._cdata.size
    out = bytearray(size)
    ffi.memmove(out, data._cdata.buffer, size)
    ffi.memmove(data._cdata.buffer, bytes(size), size)
    data._cdata.size = 0
    return Secret(out)


def _unmarshal(cls, raw: bytes, *, source: str, field: str):
    try:
        obj, used = cls.unmarshal(raw)
    except TSS2_Exception as e:
        raise FormatError(f"does not unmarshal as {cls.__name__}: {e}", source=source, field=field) from None
    if used != len(raw):
        raise FormatError(f"{len(raw) - used} bytes after the {cls.__name__}", source=source, offset=used,
                          field=field)
    return obj


def _open_hint(tcti: str) -> str:
    """What an admin checks when a TCTI does not open (libtss2's own messages are silenced)."""
    name, _, conf = tcti.partition(":")
    if name == "device":
        path = conf or "/dev/tpmrm0"
        problem = "does not exist" if not os.path.exists(path) else "exists; is it a TPM, and may root open it?"
        where = f"{path} {problem}"
    elif name in ("swtpm", "mssim"):
        where = f"is a TPM simulator listening at {conf or 'the default port'}?"
    else:
        where = "check the 'tpm' key in the configuration"
    return f"{where} (TSS2_LOG=all+WARNING shows libtss2's own messages)"


class Tpm:
    """One ESAPI connection.  Use as ``with Tpm(config.tpm) as tpm: ...``."""

    def __init__(self, tcti: str):
        self.tcti = tcti
        self._esapi = None

    def __enter__(self) -> "Tpm":
        try:
            self._esapi = ESAPI(self.tcti)
        except TSS2_Exception as e:
            raise MachineError(f"cannot open TPM {self.tcti!r}: {e}; {_open_hint(self.tcti)}") from None
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

    @contextlib.contextmanager
    def _tss(self, what: str) -> Iterator[None]:
        try:
            yield
        except TSS2_Exception as e:
            raise MachineError(f"TPM {self.tcti!r}: {what} failed: {e}") from None

    @contextlib.contextmanager
    def _flushing(self, handle) -> Iterator:
        """Yield a transient handle and flush it however the block ends."""
        try:
            yield handle
        finally:
            try:
                self.esapi.flush_context(handle)
            except TSS2_Exception:
                # Nothing more can be done; the original error (if any) matters more.
                pass

    @contextlib.contextmanager
    def primary(self, alg: str, attributes: int = LEGACY_PRIMARY_ATTRIBUTES,
                unique: bytes = b"") -> Iterator:
        """A transient primary under the owner hierarchy (empty owner auth), flushed after."""
        with self._tss(f"TPM2_CreatePrimary ({alg})"):
            handle = self.esapi.create_primary(TPM2B_SENSITIVE_CREATE(),
                                               primary_template(alg, attributes, unique),
                                               ESYS_TR.OWNER)[0]
        with self._flushing(handle):
            yield handle

    def object_name(self, handle) -> bytes:
        with self._tss("reading an object name"):
            return bytes(self.esapi.tr_get_name(handle))

    @contextlib.contextmanager
    def _srk(self, serialized: bytes) -> Iterator:
        """The persistent SRK named by a token's tpm2_srk (systemd >= 254), checked by Name:
        a different key at 0x81000001 could not load the blob anyway, and saying so
        beats a TPM error code."""
        handle, recorded_name = tpm_policy.serialized_handle_name(serialized, source="tpm2_srk")
        if handle != SRK_HANDLE:
            raise UnsupportedError(f"tpm2_srk names handle {handle:#x}; only the SRK at {SRK_HANDLE:#x} is supported")
        with self._tss(f"reading the SRK at {SRK_HANDLE:#x}"):
            live = self.esapi.tr_from_tpmpublic(SRK_HANDLE)
        try:
            if not hmac.compare_digest(self.object_name(live), recorded_name):
                raise MachineError(f"the SRK at {SRK_HANDLE:#x} is not the key the token was sealed under")
            yield live
        finally:
            self.esapi.tr_close(live)

    @contextlib.contextmanager
    def _session(self, tpm_key, session_type, attributes) -> Iterator:
        """A session salted with ``tpm_key`` whose parameters travel AES-128-CFB encrypted."""
        with self._tss("TPM2_StartAuthSession"):
            session = self.esapi.start_auth_session(tpm_key=tpm_key, bind=ESYS_TR.NONE,
                                                    session_type=session_type, symmetric=_sym_aes128cfb(),
                                                    auth_hash=TPM2_ALG.SHA256)
        with self._flushing(session):
            with self._tss("setting session attributes"):
                self.esapi.trsess_set_attributes(session, attributes)
            yield session

    def seal(self, secret: Secret, policy_digest: bytes) -> Tuple[bytes, str]:
        """Seal ``secret`` under systemd 252's legacy primary with authPolicy
        ``policy_digest``.  Returns (tpm2-blob, primary algorithm).  Like systemd, ECC
        first and RSA when the TPM cannot make the ECC primary."""
        if len(policy_digest) != 32:
            raise ConfigError(f"a sha256 policy digest has 32 bytes, got {len(policy_digest)}")
        algs = ["ecc", "rsa"]
        with contextlib.ExitStack() as stack:
            for alg in algs:
                try:
                    parent = stack.enter_context(self.primary(alg))
                    break
                except MachineError:
                    if alg == algs[-1]:
                        raise
            attrs = TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT
            sensitive = _sensitive_from(secret)
            try:
                with self._session(parent, TPM2_SE.HMAC, attrs) as session:
                    with self._tss("TPM2_Create (sealed object)"):
                        private, public = self.esapi.create(parent, sensitive, sealed_object_template(policy_digest),
                                                            session1=session)[:2]
            finally:
                _wipe_sensitive(sensitive)
        return private.marshal() + public.marshal(), alg

    def live_policy_digest(self, pcrs: Sequence[int], bank: str) -> bytes:
        return tpm_policy.policy_pcr(self.read_pcrs(pcrs, bank), bank)

    def _check_live_policy(self, pcrs: Sequence[int], bank: str, expected: bytes, what: str) -> None:
        live = self.live_policy_digest(pcrs, bank)
        if not hmac.compare_digest(live, expected):
            raise MachineError(f"{what}: sealed to policy {expected.hex()}, but the current {bank} PCRs "
                               f"{list(pcrs)} give {live.hex()}; not attempting an unseal that would fail "
                               "(and count as a dictionary-attack failure)")

    def _policy_unseal(self, salt_key, sealed, pcrs: Sequence[int], bank: str, expected: bytes) -> Secret:
        attrs = TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.ENCRYPT
        with self._session(salt_key, TPM2_SE.POLICY, attrs) as session:
            with self._tss("TPM2_PolicyPCR"):
                self.esapi.policy_pcr(session, TPM2B_DIGEST(), _pcr_selection(PCR_BANKS[bank], pcrs))
            with self._tss("TPM2_PolicyGetDigest"):
                digest = bytes(self.esapi.policy_get_digest(session))
            if not hmac.compare_digest(digest, expected):
                raise MachineError(f"policy session digest {digest.hex()} differs from {expected.hex()} "
                                   "(PCRs changed during the unseal?)")
            with self._tss("TPM2_Unseal"):
                data = self.esapi.unseal(sealed, session1=session)
        return _secret_from(data)

    def unseal(self, token: SystemdTpm2Token, token_id: int) -> Secret:
        """Unseal a systemd-tpm2 token as systemd does, after checking that the live PCRs
        produce the token's policy digest."""
        what = f"token {token_id}"
        if token.pin:
            raise UnsupportedError(f"{what}: sealed with a PIN (tpm2-pin); not supported")
        unsupported = sorted(k for k in ("tpm2_pubkey", "tpm2_pubkey_pcrs", "tpm2_pcrlock") if k in token.extra)
        if unsupported:
            raise UnsupportedError(f"{what}: uses {', '.join(unsupported)} (signed or pcrlock policy); not supported")
        self._check_live_policy(token.pcrs, token.bank, token.policy_hash, what)
        private_raw, public_raw = tpm_policy.split_sealed_blob(token.blob, source=f"{what} tpm2-blob")
        private = _unmarshal(TPM2B_PRIVATE, private_raw, source=f"{what} tpm2-blob", field="TPM2B_PRIVATE")
        public = _unmarshal(TPM2B_PUBLIC, public_raw, source=f"{what} tpm2-blob", field="TPM2B_PUBLIC")
        parent_cm = self._srk(token.srk) if token.srk else self.primary(token.primary_alg or "ecc")
        with parent_cm as parent:
            with self._tss(f"TPM2_Load ({what})"):
                sealed = self.esapi.load(parent, private, public)
            with self._flushing(sealed):
                return self._policy_unseal(parent, sealed, token.pcrs, token.bank, token.policy_hash)

    def unseal_tpm2_import(self, token: Tpm2ImportToken, token_id: int) -> Secret:
        """Azure's tpm2-import token (reference 5.1): import the duplicated parent under an
        RSA primary with noDA, load the sealed object under it and unseal with PolicyPCR."""
        what = f"tpm2-import token {token_id}"
        self._check_live_policy(token.pcrs, token.pcr_bank, token.policy_digest, what)
        parent_pub = _unmarshal(TPM2B_PUBLIC, token.parent_pub, source=what, field="parent_pub")
        duplicate = _unmarshal(TPM2B_PRIVATE, token.parent_prv, source=what, field="parent_prv")
        seed = _unmarshal(TPM2B_ENCRYPTED_SECRET, token.parent_seed, source=what, field="parent_seed")
        seal_pub = _unmarshal(TPM2B_PUBLIC, token.seal_pub, source=what, field="seal_pub")
        seal_prv = _unmarshal(TPM2B_PRIVATE, token.seal_prv, source=what, field="seal_prv")
        unique = tpm_policy.rsa_unique_from_tpm2_tools(token.unique, source=what) if token.unique else b""
        with self.primary("rsa", SRK_ATTRIBUTES, unique) as primary:
            with self._tss(f"TPM2_Import ({what} parent)"):
                parent_private = self.esapi.import_(primary, TPM2B_DATA(), parent_pub, duplicate, seed,
                                                    TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL))
            with self._tss(f"TPM2_Load ({what} parent)"):
                parent = self.esapi.load(primary, parent_private, parent_pub)
            with self._flushing(parent):
                with self._tss(f"TPM2_Load ({what} sealed object)"):
                    sealed = self.esapi.load(parent, seal_prv, seal_pub)
                with self._flushing(sealed):
                    return self._policy_unseal(primary, sealed, token.pcrs, token.pcr_bank, token.policy_digest)
