"""The authority rule (authority.py) on certificates made here: which entry each verifier
logs, per signature in table order, and when it refuses the image."""

import pytest

from rhel_cvm_update.authority import (ImageRefusedError, SecureBootDatabases, firmware_authorities,
                                       shim_authorities)
from rhel_cvm_update.formats.efi import EFI_CERT_SHA256_GUID, EFI_CERT_X509_GUID, EFI_CERT_X509_SHA256_GUID, SignatureData
from tests.certs import der, make_cert
from tests.test_predict_log import OWNER, image


@pytest.fixture(scope="module")
def pki():
    ca1, ca2 = make_cert("CA 2011"), make_cert("CA 2023")
    return {"ca1": der(ca1[0]), "ca2": der(ca2[0]),
            "leaf1": der(make_cert("signer 2011", issuer=ca1)[0]),
            "leaf2": der(make_cert("signer 2023", issuer=ca2)[0]), "other": der(make_cert("other")[0])}


def x509(data):
    return SignatureData(EFI_CERT_X509_GUID, OWNER, data)


def names(found):
    return [(a.record.name, a.record.data) for a in found]


def test_firmware_logs_the_first_db_certificate_for_a_single_signature(pki):
    dbs = SecureBootDatabases(db=(x509(pki["ca1"]), x509(pki["ca2"])))
    shim = image("shim", b"s", certs=[pki["leaf2"]])
    assert names(firmware_authorities(shim, dbs)) == [("db", OWNER.bytes_le + pki["ca2"])]


@pytest.mark.parametrize("db_order", [("ca1", "ca2"), ("ca2", "ca1")])
def test_firmware_takes_signatures_in_table_order_whatever_the_db_order(pki, db_order):
    dbs = SecureBootDatabases(db=tuple(x509(pki[n]) for n in db_order))
    dual = image("shim", b"s", signatures=[[pki["leaf2"]], [pki["leaf1"]]])
    assert names(firmware_authorities(dual, dbs)) == [("db", OWNER.bytes_le + pki["ca2"])]


def test_firmware_skips_a_signature_db_does_not_know(pki):
    dbs = SecureBootDatabases(db=(x509(pki["ca1"]),))
    dual = image("shim", b"s", signatures=[[pki["leaf2"]], [pki["leaf1"]]])
    assert names(firmware_authorities(dual, dbs)) == [("db", OWNER.bytes_le + pki["ca1"])]


def test_firmware_refuses_when_dbx_revokes_any_signature(pki):
    dbs = SecureBootDatabases(db=(x509(pki["ca1"]), x509(pki["ca2"])), dbx=(x509(pki["ca1"]),))
    dual = image("shim", b"s", signatures=[[pki["leaf2"]], [pki["leaf1"]]])
    with pytest.raises(ImageRefusedError, match="dbx revokes its signature 2"):
        firmware_authorities(dual, dbs)


def test_firmware_refuses_a_certificate_hash_in_dbx(pki):
    from rhel_cvm_update.signers import tbs_sha256

    revoked = SignatureData(EFI_CERT_X509_SHA256_GUID, OWNER, tbs_sha256(pki["leaf1"]) + bytes(16))
    dbs = SecureBootDatabases(db=(x509(pki["ca1"]),), dbx=(revoked,))
    with pytest.raises(ImageRefusedError, match="dbx revokes"):
        firmware_authorities(image("shim", b"s", certs=[pki["leaf1"]]), dbs)


def test_firmware_logs_a_hash_entry_for_an_unsigned_image():
    shim = image("shim", b"s")
    entry = SignatureData(EFI_CERT_SHA256_GUID, OWNER, shim.authenticode["sha256"])
    assert names(firmware_authorities(shim, SecureBootDatabases(db=(entry,)))) == \
        [("db", OWNER.bytes_le + shim.authenticode["sha256"])]
    with pytest.raises(ImageRefusedError, match="dbx lists its hash"):
        firmware_authorities(shim, SecureBootDatabases(db=(entry,), dbx=(entry,)))
    with pytest.raises(ImageRefusedError, match="it is unsigned"):
        firmware_authorities(shim, SecureBootDatabases())


def test_shim_order_db_then_moklist_then_vendor_certificate(pki):
    uki = image("uki", b"u", certs=[pki["leaf1"]])
    vendor = pki["ca1"]
    assert names(shim_authorities(uki, SecureBootDatabases(db=(x509(pki["ca1"]),)), vendor)) == \
        [("db", OWNER.bytes_le + pki["ca1"])]
    # MokListRT carries shim's vendor certificate as an addend: shim logs it as "Shim".
    assert names(shim_authorities(uki, SecureBootDatabases(mok=(x509(vendor),)), vendor)) == [("Shim", vendor)]
    assert names(shim_authorities(uki, SecureBootDatabases(mok=(x509(pki["ca1"]),)), None)) == \
        [("MokListRT", OWNER.bytes_le + pki["ca1"])]


def test_shim_logs_each_verifying_signature_and_skips_revoked_ones(pki):
    dual = image("uki", b"u", signatures=[[pki["leaf1"]], [pki["leaf2"]]])
    dbs = SecureBootDatabases(db=(x509(pki["ca1"]), x509(pki["ca2"])))
    assert names(shim_authorities(dual, dbs, None)) == [("db", OWNER.bytes_le + pki["ca1"]),
                                                        ("db", OWNER.bytes_le + pki["ca2"])]
    revoked = SecureBootDatabases(db=dbs.db, dbx=(x509(pki["ca1"]),))
    assert names(shim_authorities(dual, revoked, None)) == [("db", OWNER.bytes_le + pki["ca2"])]
    with pytest.raises(ImageRefusedError, match="shim would refuse"):
        shim_authorities(image("uki", b"u", certs=[pki["other"]]), dbs, None)
