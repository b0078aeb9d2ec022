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
OWNER = uuid.UUID("77fa9abd-0359-4d32-bd60-28f4e78f784b")


def fake_digests(seed: bytes):
    return {b: hashlib.new(b, seed).digest() for b in BANKS}


def image(name: str, seed: bytes, kernel_seed=None, certs=(), levels=None, vendor_cert=None, signatures=None):
    """``certs``: one signature carrying them; ``signatures``: several, in table order."""
    if signatures is None:
        signatures = (tuple(certs),) if certs else ()
    return ImageMeasurement(path=name, authenticode=fake_digests(seed),
                            linux_authenticode=fake_digests(kernel_seed) if kernel_seed else None,
                            signatures=tuple(tuple(s) for s in signatures),
                            sbat_levels=levels if levels is not None else {"previous": SBAT.decode(), "latest": SBAT.decode()},
                            vendor_cert=vendor_cert)


def esl(*entries, signature_type=uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072"), owner=OWNER):
    """EFI_SIGNATURE_LISTs, one per entry (a DER certificate or a 32-byte hash)."""
    import struct

    out = b""
    for data in entries:
        kind = signature_type if len(data) != 32 else uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")
        size = 16 + len(data)
        out += struct.pack("<16sIII", kind.bytes_le, 28 + size, 0, size) + owner.bytes_le + data
    return out


class Boot:
    """A shim -> UKI boot: the records of the log and the digests per PCR."""

    def __init__(self, shim, uki, kernel=True, secure_boot=False, uki_authority=None,
                 shim_authority=None, db=b"db-contents", dbx=b"dbx-contents", extra_pcr4=(), sbat=SBAT,
                 uki_db_authority=None):
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
        self.add(7, lb.EV_EFI_VARIABLE_AUTHORITY, lb.variable_data(SHIM_LOCK, "SbatLevel", sbat))
        if uki_db_authority:
            self.add(7, lb.EV_EFI_VARIABLE_AUTHORITY, lb.variable_data(DB_GUID, "db", uki_db_authority))
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


SHIM = image("shim", b"shim")
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
    new_shim = image("shim-new", b"shim-new")
    current = Boot(SHIM, UKI_A)
    prediction = predict_from_log(current.log(), current.pcrs(), new_shim, UKI_A, booted_shim=SHIM)
    assert prediction.pcrs[4] == Boot(new_shim, UKI_A).pcrs()["sha256"][4]
    assert prediction.pcrs[7] == current.pcrs()["sha256"][7]


def test_secure_boot_off_resets_the_sbat_level_whatever_the_new_shim_embeds():
    newer = "sbat,1,2025021800\nshim,4\ngrub,5\n"
    new_shim = image("shim-new", b"shim-new", levels={"previous": newer, "latest": newer})
    current = Boot(SHIM, UKI_A)
    prediction = predict_from_log(current.log(), current.pcrs(), new_shim, UKI_A)
    assert prediction.pcrs[7] == current.pcrs()["sha256"][7]


def test_new_shim_without_sbatlevel_is_refused(pki):
    current = SecureBootBoot(pki)
    new_shim = image("shim-new", b"shim-new", certs=[der(pki["leaf1"][0])], levels={})
    with pytest.raises(PredictionError, match="no .sbatlevel"):
        current.predict(new_shim, current.uki)


@pytest.fixture(scope="module")
def pki():
    ca1, ca2 = make_cert("Test UEFI CA 2011"), make_cert("Test UEFI CA 2023")
    return {"ca1": ca1, "ca2": ca2,
            "leaf1": make_cert("Shim signer 2011", issuer=ca1), "leaf2": make_cert("Shim signer 2023", issuer=ca2),
            "other": make_cert("Someone Else")}


class SecureBootBoot:
    """A Secure Boot log whose authority events are computed here from db = [CA1, CA2] (by
    the firmware's and shim's documented order), not by the code under test."""

    def __init__(self, pki, shim_signatures=(("leaf1",),), uki_signer="leaf1", db=("ca1", "ca2"),
                 dbx=b"", sbat=SBAT):
        self.pki = pki
        certs = lambda names: tuple(der(pki[n][0]) for n in names)  # noqa: E731
        self.db = esl(*[der(pki[n][0]) for n in db])
        self.dbx = dbx
        self.shim = image("shim", b"shim", signatures=[certs(s) for s in shim_signatures])
        self.uki = image("uki-a", b"uki-a", b"kernel-a", certs=certs([uki_signer]))
        self.sbat = sbat
        self.boot = Boot(self.shim, self.uki, secure_boot=True, db=self.db, dbx=dbx,
                         shim_authority=self.entry(self.anchor_of(shim_signatures[0][0])),
                         uki_authority=None, sbat=sbat,
                         uki_db_authority=self.entry(self.anchor_of(uki_signer)))

    def anchor_of(self, leaf):
        return {"leaf1": "ca1", "leaf2": "ca2"}[leaf]

    def entry(self, ca):
        return OWNER.bytes_le + der(self.pki[ca][0])

    def efivars(self, db=None, dbx=None):
        return {("SecureBoot", str(EFI_GLOBAL)): b"\x01", ("PK", str(EFI_GLOBAL)): b"pk",
                ("KEK", str(EFI_GLOBAL)): b"kek", ("db", str(DB_GUID)): self.db if db is None else db,
                ("dbx", str(DB_GUID)): self.dbx if dbx is None else dbx,
                ("SbatLevelRT", str(SHIM_LOCK)): self.sbat}

    def predict(self, shim, uki, **kw):
        kw.setdefault("efivars_now", self.efivars())
        return predict_from_log(self.boot.log(), self.boot.pcrs(), shim, uki, booted_shim=self.shim,
                                booted_uki=self.uki, **kw)


def test_secure_boot_uki_signed_under_same_certificate_keeps_pcr7(pki):
    current = SecureBootBoot(pki)
    uki_b = image("uki-b", b"uki-b", b"kernel-b", certs=[der(pki["leaf1"][0])])
    prediction = current.predict(current.shim, uki_b)
    assert prediction.pcrs[7] == current.boot.pcrs()["sha256"][7]
    assert prediction.pcrs[4] != current.boot.pcrs()["sha256"][4]


def test_shim_re_signed_by_the_other_ca_changes_pcr7_to_the_real_event(pki):
    """The bug of issue 13: same Authenticode digest, other signer, other PCR7."""
    current = SecureBootBoot(pki)
    resigned = image("shim", b"shim", certs=[der(pki["leaf2"][0])])
    prediction = current.predict(resigned, current.uki)
    expected = SecureBootBoot(pki, shim_signatures=(("leaf2",),))
    assert prediction.pcrs[7] == expected.boot.pcrs()["sha256"][7] != current.boot.pcrs()["sha256"][7]
    assert prediction.pcrs[4] == current.boot.pcrs()["sha256"][4]
    assert any("changes from db certificate 'CN=Test UEFI CA 2011'" in n for n in prediction.notes)


def test_dual_signed_shim_is_verified_by_its_first_signature_not_the_first_db_entry(pki):
    current = SecureBootBoot(pki)
    dual = image("shim", b"shim", signatures=[[der(pki["leaf2"][0])], [der(pki["leaf1"][0])]])
    prediction = current.predict(dual, current.uki)
    expected = SecureBootBoot(pki, shim_signatures=(("leaf2",), ("leaf1",)))
    assert prediction.pcrs[7] == expected.boot.pcrs()["sha256"][7]


def test_uki_re_signed_changes_shims_authority_event(pki):
    current = SecureBootBoot(pki)
    uki_b = image("uki-b", b"uki-b", b"kernel-b", certs=[der(pki["leaf2"][0])])
    prediction = current.predict(current.shim, uki_b)
    assert prediction.pcrs[7] == SecureBootBoot(pki, uki_signer="leaf2").boot.pcrs()["sha256"][7]


@pytest.mark.parametrize("certs", ["other", "unsigned"])
def test_secure_boot_uki_nobody_admits_is_refused(pki, certs):
    current = SecureBootBoot(pki)
    uki_b = image("uki-b", b"uki-b", b"kernel-b", certs=[der(pki["other"][0])] if certs == "other" else [])
    with pytest.raises(PredictionError, match="shim would refuse"):
        current.predict(current.shim, uki_b)


def test_dbx_revoking_the_new_signer_refuses_the_shim(pki):
    current = SecureBootBoot(pki)
    dual = image("shim", b"shim", signatures=[[der(pki["leaf2"][0])], [der(pki["leaf1"][0])]])
    dbx = esl(der(pki["ca1"][0]))
    with pytest.raises(PredictionError, match="dbx revokes its signature 2"):
        current.predict(dual, current.uki, efivars_now=current.efivars(dbx=dbx))


def test_dbx_revoking_the_old_signer_with_a_re_signed_shim_is_predicted(pki):
    current = SecureBootBoot(pki)
    resigned = image("shim", b"shim", certs=[der(pki["leaf2"][0])])
    uki_b = image("uki-b", b"uki-b", b"kernel-b", certs=[der(pki["leaf2"][0])])
    dbx = esl(der(pki["ca1"][0]))
    prediction = current.predict(resigned, uki_b, efivars_now=current.efivars(dbx=dbx))
    expected = SecureBootBoot(pki, shim_signatures=(("leaf2",),), uki_signer="leaf2", dbx=dbx)
    assert prediction.pcrs[7] == expected.boot.pcrs()["sha256"][7]


def test_newer_sbatlevel_of_the_new_shim_is_predicted(pki):
    current = SecureBootBoot(pki)
    newer = "sbat,1,2025021800\nshim,4\ngrub,5\n"
    new_shim = image("shim-new", b"shim-new", certs=[der(pki["leaf1"][0])],
                     levels={"previous": newer, "latest": newer})
    prediction = current.predict(new_shim, current.uki)
    expected = SecureBootBoot(pki, sbat=newer.encode())
    assert prediction.pcrs[7] == expected.boot.pcrs()["sha256"][7]
    assert any("raises SbatLevel" in n for n in prediction.notes)


def test_older_sbatlevel_of_the_new_shim_keeps_the_current_level(pki):
    newer = b"sbat,1,2025021800\nshim,4\ngrub,5\n"
    current = SecureBootBoot(pki, sbat=newer)
    old_shim = image("shim-old", b"shim-old", certs=[der(pki["leaf1"][0])])
    prediction = current.predict(old_shim, current.uki)
    assert prediction.pcrs[7] == current.boot.pcrs()["sha256"][7]


def test_logged_authority_the_rule_does_not_reproduce_is_refused(pki):
    """The log says CA1 verified the booted shim, but the booted shim given is signed under
    CA2 only: the rule does not reproduce this boot, so it is not trusted for the next."""
    current = SecureBootBoot(pki)
    liar = image("shim", b"shim", certs=[der(pki["leaf2"][0])])
    with pytest.raises(PredictionError, match="authority rule gives"):
        predict_from_log(current.boot.log(), current.boot.pcrs(), current.shim, current.uki,
                         booted_shim=liar, efivars_now=current.efivars())


def test_changed_dbx_is_predicted_from_efivarfs():
    current = Boot(SHIM, UKI_A)
    now = {("dbx", str(DB_GUID)): b"new-dbx", ("db", str(DB_GUID)): b"db-contents",
           ("SecureBoot", str(EFI_GLOBAL)): b"\x00", ("PK", str(EFI_GLOBAL)): b"pk",
           ("KEK", str(EFI_GLOBAL)): b"kek"}
    prediction = predict_from_log(current.log(), current.pcrs(), SHIM, UKI_A, efivars_now=now)
    assert prediction.pcrs[7] == Boot(SHIM, UKI_A, dbx=b"new-dbx").pcrs()["sha256"][7]
    assert any("dbx changed" in n for n in prediction.notes)
