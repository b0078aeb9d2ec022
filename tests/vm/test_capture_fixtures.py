"""The committed boot captures (tests/data/boots/) agree with themselves and with outside tools.

Replays use tpm2-tools' tpm2_eventlog, Authenticode digests come from pesign (recorded in
boot.json at capture time), certificates from openssl: none of it from rhel_cvm_update.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tests.vm import capture, signing

BOOTS = Path(__file__).resolve().parents[1] / "data" / "boots"
SCENARIOS = sorted(capture.SCENARIOS)
EV_EFI_BOOT_SERVICES_APPLICATION = "EV_EFI_BOOT_SERVICES_APPLICATION"
SYSTEMD_STUB_KERNEL_VENDOR_NODE = "04031400f8d1c555cd04b5468a20e56cbb3052d07fff0400"


def boot_json(name):
    return json.loads((BOOTS / name / "boot.json").read_text())


def read_pcrs(path):
    pcrs = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        alg, index, value = line.split()
        pcrs[(alg, int(index))] = value
    return pcrs


@lru_cache(maxsize=None)
def tpm2_eventlog(name):
    """tpm2-tools' decoding and replay of a fixture's event log."""
    if shutil.which("tpm2_eventlog") is None:
        pytest.skip("tpm2_eventlog (tpm2-tools) not installed")
    out = subprocess.run(["tpm2_eventlog", str(BOOTS / name / "eventlog.bin")], check=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.decode()
    return yaml.safe_load(out)


def sha256_digest(event):
    (digest,) = [d["Digest"] for d in event["Digests"] if d["AlgorithmId"] == "sha256"]
    return digest


def boot_applications(name):
    return [e for e in tpm2_eventlog(name)["events"]
            if e["PCRIndex"] == 4 and e["EventType"] == EV_EFI_BOOT_SERVICES_APPLICATION]


def ucs2_file_node(path):
    """A media File() device-path node followed by End, as hex (UEFI 2.10 10.3.5.4)."""
    text = path.encode("utf-16-le") + b"\0\0"
    return (bytes([0x04, 0x04]) + (4 + len(text)).to_bytes(2, "little") + text + bytes.fromhex("7fff0400")).hex()


@pytest.mark.parametrize("name", SCENARIOS)
class TestFixtureIntegrity:
    def test_all_files_present(self, name):
        record = boot_json(name)
        directory = BOOTS / name
        assert record["scenario"] == name
        assert (directory / "eventlog.bin").is_file() and (directory / "pcrs.txt").is_file()
        present = sorted(p.name for p in (directory / "efivars").iterdir())
        assert present == record["files"]["efivars"]
        assert (directory / "db.crt").is_file() == record["secure_boot"]

    def test_eventlog_matches_its_recorded_digest(self, name):
        data = (BOOTS / name / "eventlog.bin").read_bytes()
        recorded = boot_json(name)["files"]["eventlog.bin"]
        assert len(data) == recorded["size"]
        assert hashlib.sha256(data).hexdigest() == recorded["sha256"]

    def test_pcrs_txt_has_both_banks_for_all_24_pcrs(self, name):
        pcrs = read_pcrs(BOOTS / name / "pcrs.txt")
        assert sorted(pcrs) == sorted((alg, i) for alg in ("sha1", "sha256") for i in range(24))
        for (alg, _), value in pcrs.items():
            assert re.fullmatch("[0-9a-f]{%d}" % (40 if alg == "sha1" else 64), value)

    def test_efivars_files_are_named_and_prefixed_like_efivarfs(self, name):
        for path in (BOOTS / name / "efivars").iterdir():
            assert re.fullmatch(r"[A-Za-z0-9]+-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", path.name)
            attributes = int.from_bytes(path.read_bytes()[:4], "little")
            # Every variable the guest can read has BOOTSERVICE_ACCESS|RUNTIME_ACCESS.
            assert attributes & 0x6 == 0x6, path.name

    def test_secure_boot_variable_matches_the_scenario(self, name):
        data = (BOOTS / name / "efivars" / ("SecureBoot-" + capture.EFI_GLOBAL)).read_bytes()
        assert data[4:] == (b"\x01" if boot_json(name)["secure_boot"] else b"\x00")

    def test_firmware_booted_the_entry_efibootmgr_wrote(self, name):
        record = boot_json(name)
        entry = record["boot_entry"]
        current = (BOOTS / name / "efivars" / ("BootCurrent-" + capture.EFI_GLOBAL)).read_bytes()[4:]
        assert "%04X" % int.from_bytes(current, "little") == entry["number"]
        variable = "Boot%s-%s" % (entry["number"], capture.EFI_GLOBAL)
        assert (BOOTS / name / "efivars" / variable).read_bytes()[4:].hex() == entry["variables"][variable]["data"]

    def test_replaying_the_log_gives_the_tpm_read_pcrs(self, name):
        pcrs = read_pcrs(BOOTS / name / "pcrs.txt")
        replay = tpm2_eventlog(name)["pcrs"]
        assert set(replay) == {"sha1", "sha256"}
        for alg, values in replay.items():
            width = 40 if alg == "sha1" else 64
            for index, value in values.items():
                assert format(value, "0%dx" % width) == pcrs[(alg, index)], (alg, index)
        assert {4, 7} <= set(replay["sha256"])

    def test_pcr4_boot_applications_are_shim_uki_and_kernel_as_pesign_digests(self, name):
        record = boot_json(name)
        events = boot_applications(name)
        expected = [record["shim"]["authenticode_sha256"], record["uki"]["authenticode_sha256"]]
        # Observed shape (see the reference, 2.3): with Secure Boot on, systemd-stub's security
        # override keeps the firmware from measuring the kernel it loads from .linux.
        if not record["secure_boot"]:
            expected.append(record["uki"]["linux_section"]["authenticode_sha256"])
        assert [sha256_digest(e) for e in events] == expected
        shim_path, uki_path = events[0]["Event"]["DevicePath"], events[1]["Event"]["DevicePath"]
        assert shim_path.endswith(ucs2_file_node(record["shim"]["esp_path"]))
        assert shim_path.startswith("02010c00d041030a")  # PciRoot: the full path BDS loaded from
        assert uki_path == ucs2_file_node(record["uki"]["shim_loads"])  # shim logs one File() node
        if not record["secure_boot"]:
            assert events[2]["Event"]["DevicePath"] == SYSTEMD_STUB_KERNEL_VENDOR_NODE

    def test_pcr7_event_sequence(self, name):
        events = [e for e in tpm2_eventlog(name)["events"] if e["PCRIndex"] == 7]
        names = [e["Event"]["UnicodeName"] if e["EventType"] != "EV_SEPARATOR" else "separator" for e in events]
        firmware_policy = ["SecureBoot", "PK", "KEK", "db", "dbx", "separator"]
        if boot_json(name)["secure_boot"]:
            # OVMF logs the db entry that verified shim; shim logs SbatLevel, then the db (or
            # MokListRT) entry that verified the UKI.
            assert names == firmware_policy + ["db", "SbatLevel", uki_allowlist(name)]
        else:
            assert names == firmware_policy + ["SbatLevel"]

    def test_kernel_payload_digest_equals_the_raw_vmlinuz_digest(self, name):
        uki = boot_json(name)["uki"]
        assert uki["linux_section"]["virtual_size"] <= uki["linux_section"]["size_of_raw_data"]
        assert uki["linux_section"]["authenticode_sha256"] == uki["kernel"]["vmlinuz_authenticode_sha256"]


SB_ON = [n for n in SCENARIOS if capture.SCENARIOS[n].secure_boot]


@pytest.mark.parametrize("name", SB_ON)
class TestSecureBootFixtures:
    def test_db_cert_matches_its_recorded_fingerprint(self, name):
        if shutil.which("openssl") is None:
            pytest.skip("openssl not installed")
        der = pem_to_der(BOOTS / name / "db.crt")
        assert hashlib.sha256(der).hexdigest() == boot_json(name)["db_cert"]["sha256_fingerprint"]

    def test_db_holds_the_test_cert_and_shim_logged_it_as_the_uki_authority(self, name):
        der = pem_to_der(BOOTS / name / "db.crt")
        allowlist = uki_allowlist(name)
        (variable,) = (BOOTS / name / "efivars").glob(allowlist + "-*")
        assert der in variable.read_bytes()
        # The firmware logs the db entry that verified shim; shim logs the one that verified the
        # UKI, last (even when it is the same entry: shim keeps its own list of what it logged).
        last = db_authorities(name, allowlist)[-1]
        assert last["VariableData"] == signature_data(boot_json(name)["db_cert"]["owner_guid"], der).hex()


def uki_allowlist(name):
    """The list whose entry verifies the UKI: MokListRT when a MOK signed it, else db."""
    plan = capture.SCENARIOS[name].signing
    return "MokListRT" if plan and plan.uki_signer == "mok" else "db"


def db_authorities(name, variable="db"):
    return [e["Event"] for e in tpm2_eventlog(name)["events"]
            if e["PCRIndex"] == 7 and e["EventType"] == "EV_EFI_VARIABLE_AUTHORITY"
            and e["Event"]["UnicodeName"] == variable]


def signature_data(owner, der):
    """EFI_SIGNATURE_DATA = owner GUID (mixed endian, as EFI_GUID is laid out) + DER."""
    return uuid.UUID(owner).bytes_le + der


def pem_to_der(path):
    return subprocess.run(["openssl", "x509", "-in", str(path), "-outform", "DER"],
                          check=True, stdout=subprocess.PIPE).stdout


SIGNER_CHAIN = [s.name for s in capture.SIGNER_SCENARIOS]
MICROSOFT_CAS = {"ms-2011": "ms-uefi-2011.pem", "ms-2023": "ms-uefi-2023.pem"}


@pytest.mark.parametrize("name", SIGNER_CHAIN)
class TestSignerChainFixtures:
    """What real OVMF and shim logged when only the signers changed (tests/vm/signing.py)."""

    def test_the_firmware_logs_the_ca_of_the_first_signature_db_anchors(self, name):
        # edk2's DxeImageVerificationLib: signatures in table order, the first one a db entry
        # verifies is logged.  Every shim of the chain is signed only by CAs in db.
        plan = capture.SCENARIOS[name].signing
        first = plan.shim_signatures[0]
        if first in MICROSOFT_CAS:
            expected = signature_data(signing.MICROSOFT_OWNER_GUID,
                                      pem_to_der(signing.microsoft_cert(MICROSOFT_CAS[first])))
        else:
            der = pem_to_der(signing.TEST_CAS_DIR / (first + ".crt"))
            assert hashlib.sha256(der).hexdigest() == boot_json(name)["signing"]["test_cas"][first]["sha256_fingerprint"]
            expected = signature_data(signing.TEST_CA_OWNER_GUIDS[first], der)
        assert db_authorities(name)[0]["VariableData"] == expected.hex()

    def test_recorded_signatures_are_the_ones_sbverify_listed(self, name):
        record = boot_json(name)["signing"]
        for entry in record["shim_signatures"] + record["uki_signatures"]:
            bundle = x509.load_pem_x509_certificates((BOOTS / name / entry["certificates"]).read_bytes())
            issuer_cn = entry["sbverify_issuers"].rsplit("CN=", 1)[1]
            issuers = [c.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value for c in bundle]
            assert issuer_cn in issuers, entry

    def test_the_same_shim_file_keeps_pcr4_whoever_signed_it(self, name):
        record = boot_json(name)
        if capture.SCENARIOS[name].signing.sbat_date:  # the shim file itself changed
            assert _pcr(name, "sha256", 4) != _pcr(SIGNER_CHAIN[0], "sha256", 4)
        else:
            assert record["shim"]["authenticode_sha256"] == boot_json(SIGNER_CHAIN[0])["shim"]["authenticode_sha256"]
            assert _pcr(name, "sha256", 4) == _pcr(SIGNER_CHAIN[0], "sha256", 4)

    def test_shim_logs_the_sbat_level_it_keeps(self, name):
        # shim applies its embedded previous level only when it is newer than SbatLevel; the
        # chain's newer shim raises it, and the older shim booted after it keeps the newer one.
        levels = [boot_json(n)["signing"]["shim_sbatlevel"]["previous"] for n in SIGNER_CHAIN[:SIGNER_CHAIN.index(name) + 1]]
        newest = max(levels, key=lambda level: level.split("\n", 1)[0])
        (event,) = [e for e in tpm2_eventlog(name)["events"]
                    if e["PCRIndex"] == 7 and isinstance(e["Event"], dict)
                  and e["Event"].get("UnicodeName") == "SbatLevel"]
        assert bytes.fromhex(event["Event"]["VariableData"]).decode() == newest
        variable = (BOOTS / name / "efivars" / "SbatLevelRT-605dab50-e046-4300-abb6-3dd810dd8b23").read_bytes()[4:]
        assert variable.decode() == newest


def test_the_runtime_dbx_update_is_measured_at_the_next_boot():
    der = pem_to_der(signing.microsoft_cert("ms-uefi-2011.pem"))
    before = (BOOTS / "sb2-shim-sbat" / "efivars" / "dbx-d719b2cb-3d3a-4596-a3bc-dad00e67656f").read_bytes()
    after = (BOOTS / "sb2-dbx-ms2011" / "efivars" / "dbx-d719b2cb-3d3a-4596-a3bc-dad00e67656f").read_bytes()
    assert der not in before and signature_data(signing.MICROSOFT_OWNER_GUID, der) in after
    assert _pcr("sb2-shim-sbat", "sha256", 7) != _pcr("sb2-dbx-ms2011", "sha256", 7)


def _pcr(name, alg, index):
    return read_pcrs(BOOTS / name / "pcrs.txt")[(alg, index)]


@pytest.mark.parametrize("alg", ["sha1", "sha256"])
class TestAcrossScenarios:
    def test_changing_the_uki_changes_pcr4_not_pcr7(self, alg):
        for a, b in (("sb-off-uki-a", "sb-off-uki-b"), ("sb-on-uki-a", "sb-on-uki-b")):
            assert _pcr(a, alg, 4) != _pcr(b, alg, 4)
            assert _pcr(a, alg, 7) == _pcr(b, alg, 7), (a, b)

    def test_changing_shim_changes_pcr4(self, alg):
        assert _pcr("sb-off-uki-a", alg, 4) != _pcr("sb-off-shim-b-uki-a", alg, 4)
        assert boot_json("sb-off-uki-a")["shim"]["authenticode_sha256"] != \
            boot_json("sb-off-shim-b-uki-a")["shim"]["authenticode_sha256"]

    def test_secure_boot_state_changes_pcr7(self, alg):
        assert _pcr("sb-off-uki-a", alg, 7) != _pcr("sb-on-uki-a", alg, 7)

    def test_an_entry_without_nul_makes_shim_load_grubx64_with_the_same_pcr4(self, alg):
        # PCR4 digests do not cover the logged device path: the same binaries give the same PCR4
        # whichever path shim took; PCR1 (the Boot#### bytes) tells the two entries apart.
        record = boot_json("sb-off-uki-a-entry-no-nul")
        assert record["uki"]["shim_loads"] == capture.SHIM_DEFAULT_SECOND_STAGE != record["boot_entry"]["optional_data"]
        assert _pcr("sb-off-uki-a", alg, 4) == _pcr("sb-off-uki-a-entry-no-nul", alg, 4)
        assert _pcr("sb-off-uki-a", alg, 1) != _pcr("sb-off-uki-a-entry-no-nul", alg, 1)

    def test_the_two_ukis_differ_in_kernel_build_and_cmdline(self, alg):
        a, b = boot_json("sb-off-uki-a")["uki"], boot_json("sb-off-uki-b")["uki"]
        assert a["cmdline"] != b["cmdline"]
        assert a["kernel"]["vmlinuz_authenticode_sha256"] != b["kernel"]["vmlinuz_authenticode_sha256"]


def _missing_for_capture():
    tools = ["qemu-system-x86_64", "swtpm", "swtpm_setup", "sgdisk", "mkfs.vfat", "mcopy", "efibootmgr",
             "losetup", "objcopy", "pesign", "sbsign", "apt-get", "dpkg-deb"]
    missing = [t for t in tools if shutil.which(t) is None]
    for path in (capture.OVMF_DIR / "OVMF_CODE_4M.fd", capture.SHIM_SIGNED, capture.realbins.SYSTEMD_STUB,
                 capture.realbins.BUSYBOX):
        if not path.exists():
            missing.append(str(path))
    if os.geteuid() != 0:
        missing.append("root (losetup)")
    return missing


@pytest.mark.vm
@pytest.mark.swtpm
@pytest.mark.root
def test_recapture_sb_off_uki_a_reproduces_pcr4_and_pcr7(tmp_path):
    missing = _missing_for_capture()
    if missing:
        pytest.skip("cannot boot a capture here, missing: " + ", ".join(missing))
    committed = boot_json("sb-off-uki-a")
    kernel = committed["uki"]["kernel"]
    try:
        got = capture.realbins.fetch_kernel_package(kernel["metapackage"], kernel["version"])
    except capture.realbins.RealBinsError as e:
        pytest.skip("pinned kernel %s %s neither cached nor downloadable: %s" % (kernel["package"], kernel["version"], e))
    if (got.name, got.version) != (kernel["package"], kernel["version"]):
        pytest.skip("pinned kernel %s %s is gone; the archive offers %s %s"
                    % (kernel["package"], kernel["version"], got.name, got.version))

    target = capture.capture(capture.SCENARIOS["sb-off-uki-a"], tmp_path / "out", tmp_path / "work")

    fresh = json.loads((target / "boot.json").read_text())
    assert fresh["uki"]["sha256"] == committed["uki"]["sha256"]  # the UKI rebuilt byte for byte
    fresh_pcrs = read_pcrs(target / "pcrs.txt")
    committed_pcrs = read_pcrs(BOOTS / "sb-off-uki-a" / "pcrs.txt")
    for alg in ("sha1", "sha256"):
        for index in (4, 7):
            assert fresh_pcrs[(alg, index)] == committed_pcrs[(alg, index)], (alg, index)
