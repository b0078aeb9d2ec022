"""enroll --from-tpm2-import: Azure's first-boot token converted on swtpm.

The import-form token is built here with tpm2-pytss the way Azure builds it: a sealing
parent duplicated to the TPM's RSA primary (made as tpm2-luks-import.sh makes it with
tpm2_createprimary; the test checks the Names agree), and a sealed object under that
parent.  The converted token is then unsealed by systemd-cryptsetup itself.
"""

import base64
import hashlib
import json
import os
import struct
import subprocess

import pytest

from rhel_cvm_update.adapters.cryptsetup import Cryptsetup
from rhel_cvm_update.errors import ConfigError
from rhel_cvm_update.reseal import enroll_from_tpm2_import
from tests.swtpm_fixtures import (TEST_PASSPHRASE, cryptsetup, fresh_swtpm, luks2_image,  # noqa: F401
                                  luks2_template, swtpm)

tpm_adapter = pytest.importorskip("rhel_cvm_update.adapters.tpm")
tss = pytest.importorskip("tpm2_pytss")

pytestmark = [pytest.mark.swtpm, pytest.mark.root]

SYSTEMD_CRYPTSETUP = "/lib/systemd/systemd-cryptsetup"
AZURE_PRIMARY_ATTRS = "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda"
TPM_CC_PolicyCommandCode = 0x16C
TPM_CC_Duplicate = 0x14B


def _pcr_policy(values):
    """PolicyPCR digest written out independently of rhel_cvm_update (TPM 2.0 Part 3 23.7)."""
    select = bytearray(3)
    for pcr in values:
        select[pcr // 8] |= 1 << (pcr % 8)
    selection = struct.pack(">IHB", 1, 0x000B, 3) + bytes(select)
    digest = hashlib.sha256(b"".join(values[p] for p in sorted(values))).digest()
    return hashlib.sha256(bytes(32) + struct.pack(">I", 0x17F) + selection + digest).digest()


def _azure_token(swtpm, tmp_path, secret, pcr_values, keyslot, unique):
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CC, TPM2_SE
    from tpm2_pytss.types import (TPM2B_DATA, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMS_SENSITIVE_CREATE,
                                  TPMT_PUBLIC, TPMT_SYM_DEF, TPMT_SYM_DEF_OBJECT)

    policy = _pcr_policy(pcr_values)
    unique_dat = struct.pack("<H", len(unique)) + unique
    (tmp_path / "unique.dat").write_bytes(unique_dat)
    swtpm.tool("tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "rsa", "-a", AZURE_PRIMARY_ATTRS,
               "-u", str(tmp_path / "unique.dat"), "-c", str(tmp_path / "azure.ctx"))
    swtpm.tool("tpm2_readpublic", "-c", str(tmp_path / "azure.ctx"), "-n", str(tmp_path / "azure.name"))
    swtpm.flush_all()
    with ESAPI(swtpm.tcti) as esapi:
        template = TPM2B_PUBLIC.parse("rsa2048:null:aes128cfb", objectAttributes=AZURE_PRIMARY_ATTRS)
        template.publicArea.unique.rsa = unique
        azure = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)[0]
        assert bytes(esapi.tr_get_name(azure)) == (tmp_path / "azure.name").read_bytes()
        source_template = TPM2B_PUBLIC.parse(
            "ecc256:null:aes128cfb", objectAttributes="restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin"
                                                      "|userwithauth")
        source = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), source_template, ESYS_TR.OWNER)[0]
        duplicate_policy = hashlib.sha256(bytes(32) + struct.pack(">II", TPM_CC_PolicyCommandCode,
                                                                  TPM_CC_Duplicate)).digest()
        parent_template = TPM2B_PUBLIC.parse("ecc256:null:aes128cfb",
                                             objectAttributes="restricted|decrypt|userwithauth|sensitivedataorigin",
                                             authPolicy=duplicate_policy)
        parent_priv, parent_pub = esapi.create(source, TPM2B_SENSITIVE_CREATE(), parent_template)[:2]
        parent = esapi.load(source, parent_priv, parent_pub)
        esapi.flush_context(source)  # swtpm has 3 object slots and TPM2_Create needs a free one
        sealed_area = TPMT_PUBLIC(type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256, objectAttributes=0x10,
                                  authPolicy=policy)
        sealed_area.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
        seal_priv, seal_pub = esapi.create(
            parent, TPM2B_SENSITIVE_CREATE(sensitive=TPMS_SENSITIVE_CREATE(data=secret)),
            TPM2B_PUBLIC(publicArea=sealed_area))[:2]
        session = esapi.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                                           TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
        esapi.policy_command_code(session, TPM2_CC.Duplicate)
        _, duplicate, seed = esapi.duplicate(parent, azure, TPM2B_DATA(),
                                             TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL), session1=session)
        for handle in (session, parent, azure):
            esapi.flush_context(handle)

    def b64(obj):
        return base64.b64encode(obj if isinstance(obj, bytes) else obj.marshal()).decode()
    return {"type": "tpm2-import", "keyslots": [str(keyslot)], "parent_pub": b64(parent_pub),
            "parent_prv": b64(duplicate), "parent_seed": b64(seed), "seal_pub": b64(seal_pub),
            "seal_prv": b64(seal_priv), "pcrpolicy_dat": b64(policy), "unique_dat": b64(unique_dat),
            "tpm2-pcrs": sorted(pcr_values), "tpm2-pcr-bank": "sha256"}


def test_convert_azure_import_token(fresh_swtpm, luks2_image, tmp_path):
    fresh_swtpm.extend(7, hashlib.sha256(b"azure secure boot").digest())
    current = fresh_swtpm.read_sha256([4, 7])
    secret = os.urandom(32)
    passphrase = base64.b64encode(secret)
    _add_key(luks2_image, passphrase, 1)
    token = _azure_token(fresh_swtpm, tmp_path, secret, current, 1, os.urandom(16))
    cryptsetup("token", "import", "--json-file", "-", "--token-id", "2", luks2_image,
               input_bytes=json.dumps(token).encode())

    luks = Cryptsetup(luks2_image)
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        plan = enroll_from_tpm2_import(luks, tpm, dry_run=True)
        assert [e["action"] for e in plan["converted"]] == ["would-convert"]
        result = enroll_from_tpm2_import(luks, tpm)
    assert [(e["action"], e["keyslot"]) for e in result["converted"]] == [("converted", 1)]
    meta = luks.metadata()
    assert meta.tokens_of_type("tpm2-import") == []
    converted_id = result["converted"][0]["token"]
    converted = meta.systemd_tpm2_tokens()[converted_id]
    assert converted.keyslot == 1 and converted.policy_hash == _pcr_policy(current)
    assert converted.tool_record["converted_from"] == "tpm2-import"
    with pytest.raises(ConfigError, match="no tpm2-import token"):
        with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
            enroll_from_tpm2_import(luks, tpm)
    # A run interrupted after importing the new token but before removing the old one:
    # the next run only removes the import token.
    cryptsetup("token", "import", "--json-file", "-", "--token-id", "5", luks2_image,
               input_bytes=json.dumps(token).encode())
    with tpm_adapter.Tpm(fresh_swtpm.tcti) as tpm:
        resumed = enroll_from_tpm2_import(luks, tpm)
    assert [(e["action"], e["token"]) for e in resumed["converted"]] == [("removed-import", converted_id)]
    assert sorted(luks.metadata().tokens) == [converted_id]

    if not os.path.exists(SYSTEMD_CRYPTSETUP):
        pytest.skip(f"{SYSTEMD_CRYPTSETUP} not installed: systemd's own unseal not checked")
    attach = subprocess.run([SYSTEMD_CRYPTSETUP, "attach", "rhel-cvm-update-azure", luks2_image, "-",
                             f"tpm2-device=swtpm:host=127.0.0.1\\,port={fresh_swtpm.port}"],
                            env=dict(os.environ, SYSTEMD_LOG_LEVEL="debug"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    fresh_swtpm.flush_all()
    assert "Completed TPM2 key unsealing" in attach.stderr, attach.stderr[-3000:]
    assert "Activating volume rhel-cvm-update-azure [keyslot 1] using passphrase." in attach.stderr


def _add_key(image, passphrase, slot):
    read_fd, write_fd = os.pipe()
    os.write(write_fd, passphrase)
    os.close(write_fd)
    try:
        subprocess.run(["cryptsetup", "luksAddKey", "-q", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                        "--new-key-slot", str(slot), "--key-file=-", image, f"/dev/fd/{read_fd}"],
                       input=TEST_PASSPHRASE, pass_fds=(read_fd,), check=True, capture_output=True, timeout=60)
    finally:
        os.close(read_fd)
