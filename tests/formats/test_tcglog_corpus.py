"""The parser and replayer against real TCG event logs from public test fixtures.

Expected values come from outside this project: the corpus manifest (format, sha256,
whether replay must match), SOURCES.md (banks, event count, PCRs extended and notable
features, as a separate reference decoder catalogued them), the `.pcrs.txt` files (PCRs
read from a TPM or replayed by tpm2_eventlog/fwupd/tpm2-tss) and, where installed,
tpm2-tools' own decoder `tpm2_eventlog`.
"""

import functools
import hashlib
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from rhel_cvm_update.formats import tcg_describe, tcg_event_data, tcglog
from rhel_cvm_update.formats.efi import SHIM_LOCK_GUID, UefiVariableData

REPO = Path(__file__).resolve().parents[2]
CORPUS = next((p for p in (REPO.parent / "shared" / "eventlog-corpus",
                           Path("/work/shared/eventlog-corpus")) if (p / "manifest.tsv").is_file()),
              None)
if CORPUS is None:
    pytest.skip("event log corpus (../shared/eventlog-corpus) is not present",
                allow_module_level=True)


def _manifest() -> Dict[str, Dict[str, str]]:
    rows = {}
    for line in (CORPUS / "manifest.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, fmt, kind, compare, sha256 = line.split("\t")
        rows[name] = {"format": fmt, "kind": kind, "compare": compare, "sha256": sha256}
    return rows


def _catalogue() -> Dict[str, Dict[str, object]]:
    """Per log, what SOURCES.md says about it (its '- format:' and '- features:' lines)."""
    entries: Dict[str, Dict[str, object]] = {}
    current = None
    for line in (CORPUS / "SOURCES.md").read_text().splitlines():
        head = re.match(r"- \*\*(\S+\.bin)\*\*", line)
        if head:
            current = entries.setdefault(head.group(1), {"features": []})
            continue
        if current is None:
            continue
        fmt = re.match(r"\s+- format: (\S+); banks (\S+); (\d+) events; PCRs extended: (\S+)", line)
        if fmt:
            current.update(format=fmt.group(1), banks=tuple(fmt.group(2).split("/")),
                           events=int(fmt.group(3)),
                           pcrs={int(p) for p in fmt.group(4).split(",")})
        features = re.match(r"\s+- features: (.*)", line)
        if features:
            current["features"] = [f.strip() for f in features.group(1).split(";")]
    return entries


MANIFEST = _manifest()
CATALOGUE = _catalogue()
LOGS = sorted(MANIFEST)
COMPARED = [name for name in LOGS if MANIFEST[name]["compare"] == "yes"]


@functools.lru_cache(maxsize=None)
def load(name: str) -> tcglog.EventLog:
    return tcglog.parse_event_log((CORPUS / name).read_bytes(), source=name)


def recorded_pcrs(name: str) -> List[Tuple[str, int, bytes]]:
    path = CORPUS / (name[:-len(".bin")] + ".pcrs.txt")
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        bank, pcr, value = line.split()
        out.append((bank, int(pcr), bytes.fromhex(value)))
    return out


def features_of(name: str) -> List[str]:
    return CATALOGUE[name]["features"]  # type: ignore[return-value]


def logs_with_feature(prefix: str) -> List[str]:
    return [n for n in LOGS if any(f.startswith(prefix) for f in features_of(n))]


def test_corpus_is_complete():
    # 58 logs as SOURCES.md says; every manifest row is catalogued.
    assert len(LOGS) == 58 and set(LOGS) == set(CATALOGUE)
    assert sum(MANIFEST[n]["format"] == "sha1-legacy" for n in LOGS) == 10


@pytest.mark.parametrize("name", LOGS)
def test_log_parses_as_catalogued(name):
    raw = (CORPUS / name).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == MANIFEST[name]["sha256"]
    log = load(name)
    entry = CATALOGUE[name]
    assert log.format == {"crypto-agile": "crypto-agile", "sha1-legacy": "sha1"}[entry["format"]]
    assert log.format == {"crypto-agile": "crypto-agile", "sha1-legacy": "sha1"}[MANIFEST[name]["format"]]
    assert log.banks == entry["banks"]
    assert len(log.events) == entry["events"]
    assert [e.index for e in log.events] == list(range(len(log.events)))
    extended = {pcr for values in tcglog.replay(log).values() for pcr in values}
    assert extended == entry["pcrs"]


@pytest.mark.parametrize("name", LOGS)
def test_every_event_of_a_real_log_decodes(name):
    log = load(name)
    for event in log.events:
        described = tcg_describe.describe_event(event, log.uintn_size, name)
        assert "data_error" not in described, described
        assert described["summary"]


@pytest.mark.parametrize("name", COMPARED)
def test_replay_equals_recorded_pcrs(name):
    log = load(name)
    replayed = tcglog.replay(log)
    compared = 0
    for bank, pcr, value in recorded_pcrs(name):
        if pcr in replayed.get(bank, {}):
            assert replayed[bank][pcr].hex() == value.hex(), f"{bank} PCR{pcr}"
            compared += 1
    assert compared > 0


LOCALITY_LOGS = [n for n in LOGS
                 if any(re.fullmatch(r"StartupLocality=[34]", f) for f in features_of(n))]


@pytest.mark.parametrize("name", LOCALITY_LOGS)
def test_startup_locality_as_catalogued(name):
    (feature,) = [f for f in features_of(name) if f.startswith("StartupLocality=")]
    assert load(name).startup_locality == int(feature.split("=")[1])


def test_logs_without_locality_feature_start_at_zero():
    for name in set(LOGS) - set(LOCALITY_LOGS):
        assert load(name).startup_locality == 0, name


PCR0_LOCALITY_CHECKS = [n for n in LOCALITY_LOGS if n in COMPARED
                        and any(pcr == 0 for _, pcr, _ in recorded_pcrs(n))]


@pytest.mark.parametrize("name", PCR0_LOCALITY_CHECKS)
def test_startup_locality_reproduces_recorded_pcr0(name):
    log = load(name)
    for bank, pcr, value in recorded_pcrs(name):
        if pcr != 0 or bank not in log.banks:
            continue
        assert tcglog.replay(log, [bank], [0])[bank][0] == value
        assert tcglog.replay_events(log.events, bank, 0, [0])[0] != value


def test_locality_logs_with_recorded_pcr0_exist():
    # glinux-laptop, gdc-host-dell (locality 3, TPM-read) and hygon (H-CRTM, locality 4).
    assert len(PCR0_LOCALITY_CHECKS) >= 3


def _decoded(log: tcglog.EventLog, event: tcglog.TcgEvent) -> object:
    return tcg_event_data.decode_event_data(event, log.uintn_size, log.source)


@pytest.mark.parametrize("name", logs_with_feature("image load event with empty device path"))
def test_empty_device_path_image_loads(name):
    log = load(name)
    image_loads = (tcglog.EV_EFI_BOOT_SERVICES_APPLICATION, tcglog.EV_EFI_BOOT_SERVICES_DRIVER,
                   tcglog.EV_EFI_RUNTIME_SERVICES_DRIVER)
    empty = [e for e in log.events if e.event_type in image_loads
             and _decoded(log, e).raw_device_path == b""]
    assert empty and all(_decoded(log, e).device_path == () for e in empty)


VARIABLE_FEATURES = [(n, f) for n in LOGS for f in features_of(n) if re.fullmatch(r"pcr\d+:\w+", f)]


@pytest.mark.parametrize("name,feature", VARIABLE_FEATURES)
def test_catalogued_variable_measurements(name, feature):
    pcr, variable = feature[3:].split(":")
    log = load(name)
    found = [d for e in log.events if e.pcr == int(pcr)
             for d in [_decoded(log, e)] if isinstance(d, UefiVariableData) and d.name == variable]
    assert found
    if variable in ("SbatLevel", "Shim", "MokListTrusted", "MokList"):
        assert all(v.guid == SHIM_LOCK_GUID for v in found)
    if variable == "SbatLevel":
        # shim's SBAT revocation level is CSV text: "sbat,1,<date>..." (shim SBAT.md).
        assert all(v.data.startswith(b"sbat,1,") for v in found)
    if variable == "Shim":
        # the built-in vendor certificate: DER, a SEQUENCE with a two-byte length.
        assert all(v.data[:2] == b"\x30\x82" for v in found)


@pytest.mark.parametrize("name", logs_with_feature("shim MokList (EV_IPL)"))
def test_shim_mok_variables_in_pcr14(name):
    log = load(name)
    texts = [_decoded(log, e) for e in log.events if e.pcr == 14 and e.event_type == tcglog.EV_IPL]
    assert "MokList" in texts


@pytest.mark.parametrize("name", logs_with_feature("EV_NO_ACTION:SP800-155 Event3"))
def test_sp800_155_event(name):
    log = load(name)
    events = [_decoded(log, e) for e in log.events if e.event_type == tcglog.EV_NO_ACTION]
    sp = [d for d in events if isinstance(d, tcg_event_data.Sp800155Event)]
    assert sp and sp[0].signature == "SP800-155 Event3"
    assert "firmware_version" in sp[0].strings


@pytest.mark.parametrize("name", logs_with_feature("EV_SEPARATOR data 5742434c"))
def test_windows_wbcl_separators(name):
    log = load(name)
    values = {_decoded(log, e) for e in log.events if e.event_type == tcglog.EV_SEPARATOR}
    assert int.from_bytes(b"WBCL", "little") in values


@pytest.mark.parametrize("name", logs_with_feature("SpecID uintnSize=1"))
def test_spec_id_with_32bit_uintn(name):
    log = load(name)
    assert log.spec_id.uintn_size == 1 and log.uintn_size == 4
    # ...yet its image load events are laid out with 64-bit fields (decoded, not rejected).
    loads = [e for e in log.events if e.event_type == tcglog.EV_EFI_BOOT_SERVICES_APPLICATION]
    assert loads and all(isinstance(_decoded(log, e), tcg_event_data.ImageLoadEvent) for e in loads)


@pytest.mark.parametrize("name", logs_with_feature("events with fewer digests than banks"))
def test_events_with_fewer_digests(name):
    (feature,) = [f for f in features_of(name) if f.startswith("events with fewer digests")]
    log = load(name)
    fewer = [e for e in log.events if len(e.digests) < len(log.banks)]
    assert len(fewer) == int(feature.rsplit(":", 1)[1])


@pytest.mark.parametrize("name", logs_with_feature("unknown event types"))
def test_unknown_event_type_kept_raw(name):
    (feature,) = [f for f in features_of(name) if f.startswith("unknown event types")]
    wanted = {int(t, 16) for t in feature.split()[3:]}
    log = load(name)
    unknown = [e for e in log.events if e.event_type in wanted]
    assert unknown
    for event in unknown:
        assert event.type_name.startswith("EV_UNKNOWN_")
        described = tcg_describe.describe_event(event)
        assert described["data"] is None and described["data_hex"] == event.data.hex()


def test_gce_sev_snp_boot_chain():
    """Derived facts of a GCE SEV-SNP Ubuntu 24.04 boot (SOURCES.md: shim+grub, SB off):
    PCR4 holds the boot-option action, the separator, then shim (full disk path) and grub
    (the single File() node shim gives its second stage)."""
    name = "go-tpm-tools/gce-ubuntu2404-amd-sevsnp.bin"
    log = load(name)
    pcr4 = [e for e in log.events if e.pcr == 4]
    assert [e.event_type for e in pcr4] == [tcglog.EV_EFI_ACTION, tcglog.EV_SEPARATOR,
                                           tcglog.EV_EFI_BOOT_SERVICES_APPLICATION,
                                           tcglog.EV_EFI_BOOT_SERVICES_APPLICATION]
    # The action digest is SHA-256 of the 40 ASCII bytes (reference 2.2: 3d6772b4...).
    assert pcr4[0].digests["sha256"] == hashlib.sha256(
        b"Calling EFI Application from Boot Option").digest()
    assert pcr4[1].digests["sha256"] == hashlib.sha256(bytes(4)).digest()
    shim, grub = (_decoded(log, e) for e in pcr4[2:])
    assert [type(n).__name__ for n in shim.device_path][-3:] == ["HardDriveNode", "FilePathNode",
                                                                 "EndNode"]
    assert shim.device_path[-2].path == "\\EFI\\ubuntu\\shimx64.efi"
    assert [type(n).__name__ for n in grub.device_path] == ["FilePathNode", "EndNode"]
    assert grub.device_path[0].path == "\\EFI\\ubuntu\\grubx64.efi"
    pcr7_authorities = [_decoded(log, e) for e in log.events
                        if e.pcr == 7 and e.event_type == tcglog.EV_EFI_VARIABLE_AUTHORITY]
    assert [v.name for v in pcr7_authorities] == ["SbatLevel"]
    # Each PCR7 digest is SHA-256 of the whole UEFI_VARIABLE_DATA record it describes.
    for event in log.events:
        if event.pcr == 7 and event.event_type != tcglog.EV_SEPARATOR:
            assert event.digests["sha256"] == hashlib.sha256(event.data).digest()


# --- Cross-check with tpm2-tools' decoder ------------------------------------------------

TPM2_EVENTLOG = shutil.which("tpm2_eventlog")
# tpm2_eventlog reads only crypto-agile logs, and refuses records for PCR index -1
# ("PCR Index -1 is out of bounds"), which the Windows logs have.
CRYPTO_AGILE = [n for n in LOGS if MANIFEST[n]["format"] == "crypto-agile"
                and "events for PCR index > 23" not in features_of(n)]


@functools.lru_cache(maxsize=None)
def tpm2_eventlog_events(name: str) -> list:
    import yaml

    out = subprocess.run([TPM2_EVENTLOG, str(CORPUS / name)], check=True, capture_output=True)
    return yaml.safe_load(out.stdout.decode("utf-8", "replace"))["events"]


@pytest.mark.skipif(TPM2_EVENTLOG is None, reason="tpm2_eventlog (tpm2-tools) is not installed")
@pytest.mark.parametrize("name", CRYPTO_AGILE)
def test_records_match_tpm2_eventlog(name):
    log = load(name)
    theirs = tpm2_eventlog_events(name)
    assert theirs[0]["EventType"] == "EV_NO_ACTION" and "SpecID" in theirs[0]
    assert len(theirs) == len(log.events) + 1  # tpm2_eventlog lists the Spec ID header too
    for mine, their in zip(log.events, theirs[1:]):
        assert mine.pcr == their["PCRIndex"]
        if str(their["EventType"]).startswith("EV_"):  # else "Unknown event type"
            assert mine.type_name == their["EventType"]
        their_digests = {d["AlgorithmId"]: d["Digest"] for d in their["Digests"]}
        assert {b: d.hex() for b, d in mine.digests.items()} == {
            b: d for b, d in their_digests.items() if b in tcglog.BANK_DIGEST_SIZES}
        assert len(mine.data) == their["EventSize"]
        if isinstance(their.get("Event"), dict) and "LengthOfDevicePath" in their["Event"]:
            image = tcg_event_data.decode_event_data(mine, log.uintn_size, name)
            assert len(image.raw_device_path) == their["Event"]["LengthOfDevicePath"]
            assert their["Event"]["DevicePath"].startswith(image.raw_device_path.hex())


# --- Golden OVMF + swtpm + shim + UKI boots captured by this project (tests/data/boots) --

BOOTS_DIR = REPO / "tests" / "data" / "boots"
BOOTS = sorted(p.parent.name for p in BOOTS_DIR.glob("*/eventlog.bin")
               if (p.parent / "pcrs.txt").is_file() and (p.parent / "boot.json").is_file())


def load_boot(scenario: str):
    import json

    base = BOOTS_DIR / scenario
    log = tcglog.parse_event_log((base / "eventlog.bin").read_bytes(), source=str(base))
    recorded = {}
    for line in (base / "pcrs.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            bank, pcr, value = line.split()
            recorded[(bank, int(pcr))] = value
    return log, recorded, json.loads((base / "boot.json").read_text())


@pytest.mark.parametrize("scenario", BOOTS)
def test_golden_boot_replays_to_captured_pcrs(scenario):
    log, recorded, _ = load_boot(scenario)
    replayed = tcglog.replay(log)
    assert set(replayed) == set(log.banks)
    for bank, values in replayed.items():
        for pcr, value in values.items():
            assert value.hex() == recorded[(bank, pcr)], f"{bank} PCR{pcr}"
    # PCR4, PCR7 and systemd-stub's PCR11 are among them.
    assert {4, 7, 11} <= set(replayed["sha256"])


@pytest.mark.parametrize("scenario", BOOTS)
def test_golden_boot_pcr4_chain(scenario):
    """PCR4's boot applications carry the Authenticode digests pesign computed for shim and
    the UKI, the device paths efibootmgr wrote, and, with Secure Boot off only, the kernel
    that systemd-stub loads from VenMedia(55c5d1f8-...) (reference 2.3, observed table)."""
    log, _, boot = load_boot(scenario)
    apps = [e for e in log.events
            if e.pcr == 4 and e.event_type == tcglog.EV_EFI_BOOT_SERVICES_APPLICATION]
    expected = [boot["shim"]["authenticode_sha256"], boot["uki"]["authenticode_sha256"]]
    if not boot["secure_boot"]:
        expected.append(boot["uki"]["linux_section"]["authenticode_sha256"])
    assert [e.digests["sha256"].hex() for e in apps] == expected

    shim, uki = (tcg_event_data.decode_event_data(e, log.uintn_size) for e in apps[:2])
    hd, shim_file = shim.device_path[-3], shim.device_path[-2]
    assert hd.partition_guid == uuid.UUID(boot["disk"]["esp_partition_guid"])
    assert (hd.start, hd.size) == (boot["disk"]["esp_first_lba"], boot["disk"]["esp_sectors"])
    assert shim_file.path == boot["shim"]["esp_path"]
    assert [type(n).__name__ for n in uki.device_path] == ["FilePathNode", "EndNode"]
    # The path shim loaded (uki.shim_loads when shim fell back to its default grubx64.efi).
    assert uki.device_path[0].path == boot["uki"].get("shim_loads", boot["uki"]["esp_path"])
    if not boot["secure_boot"]:
        kernel = tcg_event_data.decode_event_data(apps[2], log.uintn_size)
        assert kernel.raw_device_path == bytes.fromhex(
            "04031400f8d1c555cd04b5468a20e56cbb3052d07fff0400")


@pytest.mark.parametrize("scenario", [s for s in BOOTS if (BOOTS_DIR / s / "db.crt").is_file()])
def test_golden_boot_pcr7_authorities(scenario):
    """With Secure Boot on, PCR7 names the allowlist entry that verified the UKI: the test
    certificate enrolled with its owner GUID, as EFI_SIGNATURE_DATA (owner || DER), under
    "db", or "MokListRT" when the certificate is a MOK (in MokListRT, not in db)."""
    import ssl

    log, _, boot = load_boot(scenario)
    der = ssl.PEM_cert_to_DER_cert((BOOTS_DIR / scenario / "db.crt").read_text())
    owner = uuid.UUID(boot["db_cert"]["owner_guid"])
    (db,) = (BOOTS_DIR / scenario / "efivars").glob("db-*")
    allowlist = "db" if der in db.read_bytes() else "MokListRT"
    authorities = [tcg_event_data.decode_event_data(e) for e in log.events
                   if e.pcr == 7 and e.event_type == tcglog.EV_EFI_VARIABLE_AUTHORITY]
    assert any(v.name == allowlist and v.data == owner.bytes_le + der for v in authorities)
    assert any(v.name == "SbatLevel" and v.guid == SHIM_LOCK_GUID for v in authorities)
