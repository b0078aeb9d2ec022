"""The model source: variants are chosen by the live PCRs of the booted chain, then carried
forward.  Expected values are built here from logbuild records, not by the model."""

import hashlib
import uuid

import pytest

from rhel_cvm_update.errors import PredictionError
from rhel_cvm_update.predict_model import predict_from_model
from tests import logbuild as lb
from tests.certs import der, make_cert
from tests.test_predict_log import BANKS, DB_GUID, EFI_GLOBAL, SHIM_LOCK, image

SBAT = b"sbat,1,2021030218\n"
X509 = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
OWNER = uuid.UUID("77fa9abd-0359-4d32-bd60-28f4e78f784b")


def esl(cert_der: bytes) -> bytes:
    """One EFI_SIGNATURE_LIST with one X.509 entry."""
    import struct

    size = 16 + len(cert_der)
    return struct.pack("<16sIII", X509.bytes_le, 28 + size, 0, size) + OWNER.bytes_le + cert_der


def efivars(secure_boot=False, db=b"", sbat=SBAT):
    out = {("SecureBoot", str(EFI_GLOBAL)): b"\x01" if secure_boot else b"\x00",
           ("PK", str(EFI_GLOBAL)): b"pk", ("KEK", str(EFI_GLOBAL)): b"kek",
           ("db", str(DB_GUID)): db, ("dbx", str(DB_GUID)): b""}
    if sbat is not None:
        out[("SbatLevelRT", str(SHIM_LOCK))] = sbat
    return out


def h(bank, data):
    return hashlib.new(bank, data).digest()


def expected_pcrs(variables, shim, uki, kernel, authorities=()):
    """authorities: (guid, name, data) records after the PCR7 separator, in order."""
    out = {}
    for bank in BANKS:
        pcr4 = [h(bank, lb.CALLING), h(bank, b"\0" * 4), shim.authenticode[bank], uki.authenticode[bank]]
        if kernel:
            pcr4.append(uki.linux_authenticode[bank])
        pcr7 = [h(bank, lb.variable_data(g, n, variables[(n, str(g))]))
                for n, g in (("SecureBoot", EFI_GLOBAL), ("PK", EFI_GLOBAL), ("KEK", EFI_GLOBAL),
                             ("db", DB_GUID), ("dbx", DB_GUID))]
        pcr7.append(h(bank, b"\0" * 4))
        pcr7 += [h(bank, lb.variable_data(g, n, d)) for g, n, d in authorities]
        out[bank] = {4: lb.extend_chain(bank, pcr4), 7: lb.extend_chain(bank, pcr7)}
    return out


SHIM = image("shim", b"shim")
UKI_A = image("uki-a", b"uki-a", b"kernel-a")
UKI_B = image("uki-b", b"uki-b", b"kernel-b")


@pytest.mark.parametrize("kernel", [True, False])
def test_secure_boot_off_variant_is_found_and_carried_forward(kernel):
    variables = efivars()
    sbat = [(SHIM_LOCK, "SbatLevel", SBAT)]
    live = expected_pcrs(variables, SHIM, UKI_A, kernel, sbat)
    prediction = predict_from_model(variables, live, SHIM, UKI_A, SHIM, UKI_B)
    assert prediction.source == "model"
    assert prediction.banks == expected_pcrs(variables, SHIM, UKI_B, kernel, sbat)
    assert any(("kernel measured" if kernel else "kernel not measured") in n for n in prediction.notes)


def test_model_refuses_when_no_variant_reproduces_live():
    variables = efivars()
    live = expected_pcrs(variables, SHIM, UKI_A, True, [(SHIM_LOCK, "SbatLevel", b"other")])
    with pytest.raises(PredictionError, match="does not reproduce live PCR7") as err:
        predict_from_model(variables, live, SHIM, UKI_A, SHIM, UKI_B)
    assert len(err.value.details) >= 4  # every variant tried is listed


def test_secure_boot_on_with_db_and_vendor_authorities():
    ms_ca, ms_key = make_cert("Firmware CA")
    vendor_ca = make_cert("Distribution Secure Boot CA")
    signer = make_cert("Distribution signing", issuer=vendor_ca)
    shim = image("shim", b"shim", certs=[der(make_cert("Shim signer", issuer=(ms_ca, ms_key))[0])],
                 vendor_cert=der(vendor_ca[0]))
    uki_a = image("uki-a", b"uki-a", b"kernel-a", certs=[der(signer[0])])
    uki_b = image("uki-b", b"uki-b", b"kernel-b", certs=[der(signer[0])])
    variables = efivars(secure_boot=True, db=esl(der(ms_ca)))
    authorities = [(DB_GUID, "db", OWNER.bytes_le + der(ms_ca)), (SHIM_LOCK, "SbatLevel", SBAT),
                   (SHIM_LOCK, "Shim", der(vendor_ca[0]))]
    live = expected_pcrs(variables, shim, uki_a, False, authorities)
    prediction = predict_from_model(variables, live, shim, uki_a, shim, uki_b)
    assert prediction.banks == expected_pcrs(variables, shim, uki_b, False, authorities)
    unsigned = image("uki-c", b"uki-c", b"kernel-c")
    with pytest.raises(PredictionError, match="shim would refuse"):
        predict_from_model(variables, live, shim, uki_a, shim, unsigned)


def test_model_predicts_a_re_signed_and_a_dual_signed_shim():
    """Same Authenticode digest, other signer(s): the authority event follows the signatures."""
    ca1, ca2 = make_cert("CA 2011"), make_cert("CA 2023")
    leaf1, leaf2 = der(make_cert("signer 2011", issuer=ca1)[0]), der(make_cert("signer 2023", issuer=ca2)[0])
    levels = {"previous": SBAT.decode(), "latest": SBAT.decode()}
    shim_a = image("shim", b"shim", certs=[leaf1], levels=levels)
    resigned = image("shim", b"shim", certs=[leaf2], levels=levels)
    dual = image("shim", b"shim", signatures=[[leaf2], [leaf1]], levels=levels)
    uki = image("uki-a", b"uki-a", b"kernel-a", certs=[leaf1])
    db = esl(der(ca1[0])) + esl(der(ca2[0]))
    variables = efivars(secure_boot=True, db=db)

    def authorities(shim_ca):
        return [(DB_GUID, "db", OWNER.bytes_le + der(shim_ca[0])), (SHIM_LOCK, "SbatLevel", SBAT),
                (DB_GUID, "db", OWNER.bytes_le + der(ca1[0]))]

    live = expected_pcrs(variables, shim_a, uki, False, authorities(ca1))
    for new_shim in (resigned, dual):
        prediction = predict_from_model(variables, live, shim_a, uki, new_shim, uki)
        assert prediction.banks == expected_pcrs(variables, new_shim, uki, False, authorities(ca2))
        assert prediction.banks["sha256"][7] != live["sha256"][7]
