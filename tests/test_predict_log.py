"""The log source of the prediction, on logs built byte by byte.  Expected values are
computed here by extending digests directly, not through the code under test."""

import hashlib
import uuid

import pytest

from rhel_cvm_update.boot_events import ImageMeasurement
from rhel_cvm_update.errors import PredictionError
from rhel_cvm_update.formats.tcglog import parse_event_log
from rhel_cvm_update.predict_log import predict_from_log
from tests import logbuild as lb
from tests.certs import der, make_cert

BANKS = ("sha1", "sha256")
EFI_GLOBAL = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
DB_GUID = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
SHIM_LOCK = uuid.UUID("605dab50-e046-4300-abb6-3dd810dd8b23")
SBAT = b"sbat,1,2021030218\n"


def fake_digests(seed: bytes):
    return {b: hashlib.new(b, seed).digest() for b in BANKS}


def image(name: str, seed: bytes, kernel_seed=None, certs=(), sbat_level=None, vendor_cert=None):
    return ImageMeasurement(path=name, authenticode=fake_digests(seed),
                            linux_authenticode=fake_digests(kernel_seed) if kernel_seed else None,
                            signer_certs=tuple(certs), sbat_level=sbat_level, vendor_cert=vendor_cert)


class Boot:
    """A shim -> UKI boot: the records of the log and the digests per PCR."""

    def __init__(self, shim, uki, kernel=True, secure_boot=False, uki_authority=None,
                 shim_authority=None, db=b"db-contents", dbx=b"dbx-contents", extra_pcr4=()):
        self.records = []
        self.pcr = {4: [], 7: []}
        sb = b"\x01" if secure_boot else b"\x00"
        for name, guid, data in (("SecureBoot", EFI_GLOBAL, sb), ("PK", EFI_GLOBAL, b"pk"),
                                 ("KEK", EFI_GLOBAL, b"kek"), ("db", DB_GUID, db), ("dbx", DB_GUID, dbx)):
            self.add(7, lb.EV_EFI_VARIABLE_DRIVER_CONFIG, lb.variable_data(guid, name, data))
        self.add(7, lb.EV_SEPARATOR, b"\0\0\0\0")
        self.add(4, lb.EV_EFI_ACTION, lb.CALLING)
        self.add(4, lb.EV_SEPARATOR, b"\0\0\0\0")
        if shim_authority:
            self.add(7, lb.EV_EFI_VARIABLE_AUTHORITY, lb.variable_data(DB_GUID, "db", shim_authority))
        self.add(4, lb.EV_EFI_BOOT_SERVICES_APPLICATION,
                 lb.image_load_data(lb.hd_node() + lb.file_node("\\EFI\\redhat\\shimx64.efi") + lb.END),
                 shim.authenticode)
        self.add(7, lb.EV_EFI_VARIABLE_AUTHORITY, lb.variable_data(SHIM_LOCK, "SbatLevel", SBAT))
        if uki_authority:
            self.add(7, lb.EV_EFI_VARIABLE_AUTHORITY, lb.variable_data(SHIM_LOCK, "Shim", uki_authority))
        self.add(4, lb.EV_EFI_BOOT_SERVICES_APPLICATION,
                 lb.image_load_data(lb.file_node("\\EFI\\Linux\\uki.efi") + lb.END), uki.authenticode)
        if kernel:
            self.add(4, lb.EV_EFI_BOOT_SERVICES_APPLICATION,
                     lb.image_load_data(lb.vendor_media_node(lb.STUB_VENDOR_GUID) + lb.END),
                     uki.linux_authenticode)
        for etype, data in extra_pcr4:
            self.add(4, etype, data)

    def add(self, pcr, etype, data, digests=None):
        digests = digests or {b: hashlib.new(b, data).digest() for b in BANKS}
        self.records.append(lb.event2(pcr, etype, data, BANKS, digests))
        self.pcr[pcr].append(digests)

    def log(self):
        return parse_event_log(lb.build_log(self.records, BANKS), source="test.log")

    def pcrs(self):
        return {b: {p: lb.extend_chain(b, [d[b] for d in ds]) for p, ds in self.pcr.items()} for b in BANKS}


SHIM = image("shim", b"shim", sbat_level=b"level-a")
UKI_A = image("uki-a", b"uki-a", b"kernel-a")
UKI_B = image("uki-b", b"uki-b", b"kernel-b")


def test_new_uki_and_kernel_are_substituted_and_pcr7_kept():
    current = Boot(SHIM, UKI_A)
    expected = Boot(SHIM, UKI_B).pcrs()
    prediction = predict_from_log(current.log(), current.pcrs(), SHIM, UKI_B)
    assert prediction.source == "log" and prediction.checked_against == "tpm"
    for bank in BANKS:
        assert prediction.banks[bank][4] == expected[bank][4]
        assert prediction.banks[bank][7] == current.pcrs()[bank][7]
    assert prediction.pcrs[4] != current.pcrs()["sha256"][4]


def test_shape_without_kernel_event_is_carried_forward():
    current = Boot(SHIM, UKI_A, kernel=False)
    prediction = predict_from_log(current.log(), current.pcrs(), SHIM, UKI_B)
    assert prediction.pcrs[4] == Boot(SHIM, UKI_B, kernel=False).pcrs()["sha256"][4]
    assert any("did not measure the kernel" in n for n in prediction.notes)


def test_same_uki_predicts_the_live_values():
    current = Boot(SHIM, UKI_A)
    prediction = predict_from_log(current.log(), current.pcrs(), SHIM, UKI_A)
    assert prediction.banks == current.pcrs()


def test_live_mismatch_names_pcr_and_events():
    current = Boot(SHIM, UKI_A)
    live = current.pcrs()
    # The TPM saw everything but the kernel event: the log claims one extend too many.
    live["sha256"][4] = lb.extend_chain("sha256", [d["sha256"] for d in current.pcr[4][:-1]])
    with pytest.raises(PredictionError) as err:
        predict_from_log(current.log(), live, SHIM, UKI_B)
    text = str(err.value)
    assert "PCR4 sha256" in text and "logged but never extended" in text and "event #" in text


def test_unexplained_extend_is_refused():
    current = Boot(SHIM, UKI_A)
    live = current.pcrs()
    live["sha1"][7] = hashlib.sha1(b"other").digest()
    with pytest.raises(PredictionError, match="PCR7 sha1.*no prefix"):
        predict_from_log(current.log(), live, SHIM, UKI_B)


def test_offline_skips_live_check():
    current = Boot(SHIM, UKI_A)
    prediction = predict_from_log(current.log(), None, SHIM, UKI_B)
    assert prediction.checked_against == "offline"
    assert prediction.pcrs[4] == Boot(SHIM, UKI_B).pcrs()["sha256"][4]


def test_retried_boot_option_is_refused():
    current = Boot(SHIM, UKI_A, extra_pcr4=[(lb.EV_EFI_ACTION, lb.RETURNING)])
    with pytest.raises(PredictionError, match="more than one boot option"):
        predict_from_log(current.log(), current.pcrs(), SHIM, UKI_B)


def test_unknown_boot_application_after_uki_is_refused():
    extra = lb.image_load_data(lb.file_node("\\EFI\\redhat\\other.efi") + lb.END)
    current = Boot(SHIM, UKI_A, extra_pcr4=[(lb.EV_EFI_BOOT_SERVICES_APPLICATION, extra)])
    with pytest.raises(PredictionError, match="shim -> UKI"):
        predict_from_log(current.log(), current.pcrs(), SHIM, UKI_B)


def test_new_shim_with_same_sbat_level_keeps_pcr7_and_changes_pcr4():
    new_shim = image("shim-new", b"shim-new", sbat_level=b"level-a")
    current = Boot(SHIM, UKI_A)
    prediction = predict_from_log(current.log(), current.pcrs(), new_shim, UKI_A, booted_shim=SHIM)
    assert prediction.pcrs[4] == Boot(new_shim, UKI_A).pcrs()["sha256"][4]
    assert prediction.pcrs[7] == current.pcrs()["sha256"][7]


@pytest.mark.parametrize("booted", [None, image("shim", b"not-the-booted-one", sbat_level=b"level-a")])
def test_new_shim_without_known_booted_shim_is_refused(booted):
    new_shim = image("shim-new", b"shim-new", sbat_level=b"level-a")
    current = Boot(SHIM, UKI_A)
    with pytest.raises(PredictionError, match="SBAT level"):
        predict_from_log(current.log(), current.pcrs(), new_shim, UKI_A, booted_shim=booted)


def test_new_shim_with_other_sbat_level_is_refused():
    new_shim = image("shim-new", b"shim-new", sbat_level=b"level-b")
    current = Boot(SHIM, UKI_A)
    with pytest.raises(PredictionError, match="SBAT level"):
        predict_from_log(current.log(), current.pcrs(), new_shim, UKI_A, booted_shim=SHIM)


@pytest.fixture(scope="module")
def pki():
    ca = make_cert("Vendor Secure Boot CA")
    return {"ca": ca, "signer": make_cert("Vendor Secure Boot Signing", issuer=ca),
            "other": make_cert("Someone Else")}


def test_secure_boot_uki_signed_under_same_certificate_keeps_pcr7(pki):
    ca, signer = der(pki["ca"][0]), der(pki["signer"][0])
    uki_a = image("uki-a", b"uki-a", b"kernel-a", certs=[signer])
    uki_b = image("uki-b", b"uki-b", b"kernel-b", certs=[signer])
    current = Boot(SHIM, uki_a, kernel=False, secure_boot=True, uki_authority=ca)
    prediction = predict_from_log(current.log(), current.pcrs(), SHIM, uki_b)
    assert prediction.pcrs[7] == current.pcrs()["sha256"][7]
    assert prediction.pcrs[4] == Boot(SHIM, uki_b, kernel=False).pcrs()["sha256"][4]
    assert any("same Shim certificate" in e.origin for e in prediction.events)


@pytest.mark.parametrize("certs", ["other", "unsigned"])
def test_secure_boot_uki_with_other_signer_is_refused(pki, certs):
    ca, signer = der(pki["ca"][0]), der(pki["signer"][0])
    uki_a = image("uki-a", b"uki-a", b"kernel-a", certs=[signer])
    uki_b = image("uki-b", b"uki-b", b"kernel-b",
                  certs=[der(pki["other"][0])] if certs == "other" else [])
    current = Boot(SHIM, uki_a, kernel=False, secure_boot=True, uki_authority=ca)
    with pytest.raises(PredictionError, match="PCR7 would change"):
        predict_from_log(current.log(), current.pcrs(), SHIM, uki_b)


def test_new_shim_must_be_verified_by_the_same_db_entry(pki):
    ca = der(pki["ca"][0])
    owner = uuid.UUID("77fa9abd-0359-4d32-bd60-28f4e78f784b").bytes_le
    shim_a = image("shim", b"shim", sbat_level=b"l", certs=[der(pki["signer"][0])])
    shim_b = image("shim-b", b"shim-b", sbat_level=b"l", certs=[der(pki["other"][0])])
    current = Boot(shim_a, UKI_A, secure_boot=True, shim_authority=owner + ca)
    with pytest.raises(PredictionError, match="does not verify"):
        predict_from_log(current.log(), current.pcrs(), shim_b, UKI_A, booted_shim=shim_a)


def test_changed_dbx_is_predicted_from_efivarfs():
    current = Boot(SHIM, UKI_A)
    now = {("dbx", str(DB_GUID)): b"new-dbx", ("db", str(DB_GUID)): b"db-contents",
           ("SecureBoot", str(EFI_GLOBAL)): b"\x00", ("PK", str(EFI_GLOBAL)): b"pk",
           ("KEK", str(EFI_GLOBAL)): b"kek"}
    prediction = predict_from_log(current.log(), current.pcrs(), SHIM, UKI_A, efivars_now=now)
    assert prediction.pcrs[7] == Boot(SHIM, UKI_A, dbx=b"new-dbx").pcrs()["sha256"][7]
    assert any("dbx changed" in n for n in prediction.notes)
