"""`rhel-cvm-update eventlog` through the real CLI entry point.

PCR values printed for the project's golden OVMF boots are checked against the values the
guest kernel read from the TPM in the same boot (tests/data/boots/*/pcrs.txt)."""

import hashlib
import json
import struct
from pathlib import Path

import pytest

from rhel_cvm_update import cli

REPO = Path(__file__).resolve().parents[2]
BOOTS = sorted(p.parent for p in (REPO / "tests" / "data" / "boots").glob("*/eventlog.bin")
               if (p.parent / "pcrs.txt").is_file())

SHA256 = 0x000B
ACTION = b"Calling EFI Application from Boot Option"


def small_log() -> bytes:
    body = (b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 1)
            + struct.pack("<HH", SHA256, 32) + b"\0")
    records = b""
    for pcr, event_type, data in ((4, 0x80000007, ACTION), (4, 4, bytes(4)), (7, 4, bytes(4))):
        records += (struct.pack("<IIIH", pcr, event_type, 1, SHA256) + hashlib.sha256(data).digest()
                    + struct.pack("<I", len(data)) + data)
    return struct.pack("<II20sI", 0, 3, bytes(20), len(body)) + body + records


def run_cli(tmp_path, capsys, *args, event_log=None):
    config = tmp_path / "config.yaml"
    config.write_text(f"event_log: {json.dumps(str(event_log))}\n" if event_log else "")
    code = cli.main(["--config", str(config), "eventlog", *args])
    out, err = capsys.readouterr()
    return code, out, err


def recorded(boot: Path):
    values = {}
    for line in (boot / "pcrs.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            bank, pcr, value = line.split()
            values[(bank, int(pcr))] = value
    return values


def test_text_output(tmp_path, capsys):
    path = tmp_path / "log.bin"
    path.write_bytes(small_log())
    code, out, err = run_cli(tmp_path, capsys, str(path))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"{path}: crypto-agile log, banks sha256, 3 events, startup locality 0"
    assert lines[1].split()[:3] == ["0", "4", "EV_EFI_ACTION"]
    assert lines[1].endswith("Calling EFI Application from Boot Option")
    assert lines[1].split()[3] == hashlib.sha256(ACTION).hexdigest()[:16]
    assert lines[2].split()[:3] == ["1", "4", "EV_SEPARATOR"]
    separator = hashlib.sha256(bytes(4)).digest()
    pcr4 = hashlib.sha256(hashlib.sha256(bytes(32) + hashlib.sha256(ACTION).digest()).digest()
                          + separator).hexdigest()
    pcr7 = hashlib.sha256(bytes(32) + separator).hexdigest()
    assert lines[4:] == ["sha256:", f"   4 {pcr4}", f"   7 {pcr7}"]


def test_file_defaults_to_the_configured_event_log(tmp_path, capsys):
    path = tmp_path / "binary_bios_measurements"
    path.write_bytes(small_log())
    code, out, _ = run_cli(tmp_path, capsys, "--json", event_log=path)
    assert code == 0
    assert json.loads(out)["source"] == str(path)


def test_json_output(tmp_path, capsys):
    path = tmp_path / "log.bin"
    path.write_bytes(small_log())
    code, out, _ = run_cli(tmp_path, capsys, str(path), "--json")
    doc = json.loads(out)
    assert code == 0
    assert set(doc) == {"source", "format", "banks", "startup_locality", "events", "pcrs"}
    assert (doc["format"], doc["banks"], doc["startup_locality"]) == ("crypto-agile", ["sha256"], 0)
    assert [e["type"] for e in doc["events"]] == ["EV_EFI_ACTION", "EV_SEPARATOR", "EV_SEPARATOR"]
    assert doc["events"][0]["data"] == ACTION.decode()
    assert doc["events"][0]["digests"] == {"sha256": hashlib.sha256(ACTION).hexdigest()}
    assert set(doc["pcrs"]["sha256"]) == {"4", "7"}


@pytest.mark.parametrize("boot", BOOTS, ids=[b.name for b in BOOTS])
def test_golden_boot_pcrs(tmp_path, capsys, boot):
    code, out, _ = run_cli(tmp_path, capsys, str(boot / "eventlog.bin"), "--json")
    assert code == 0
    doc = json.loads(out)
    truth = recorded(boot)
    assert doc["pcrs"]["sha256"].keys() >= {"4", "7"}
    for bank, values in doc["pcrs"].items():
        for pcr, value in values.items():
            assert value == truth[(bank, int(pcr))]
    code, text, _ = run_cli(tmp_path, capsys, str(boot / "eventlog.bin"))
    assert f"   4 {truth[('sha256', 4)]}" in text.splitlines()


def test_truncated_log_exits_2_naming_file_and_offset(tmp_path, capsys):
    path = tmp_path / "cut.bin"
    path.write_bytes(small_log()[:-3])
    code, out, err = run_cli(tmp_path, capsys, str(path))
    assert code == 2 and out == ""
    assert str(path) in err and "at offset 0x" in err


def test_not_a_log_exits_2(tmp_path, capsys):
    path = tmp_path / "elf"
    path.write_bytes(b"\x7fELF" + bytes(100))
    code, _, err = run_cli(tmp_path, capsys, str(path))
    assert code == 2 and str(path) in err


def test_missing_file_exits_2(tmp_path, capsys):
    code, _, err = run_cli(tmp_path, capsys, str(tmp_path / "absent"))
    assert code == 2 and "absent" in err


def test_oversized_file_is_refused(tmp_path, capsys):
    path = tmp_path / "huge"
    with open(path, "wb") as f:
        f.truncate(16 * 1024 * 1024 + 1)  # sparse: nothing is written
    code, _, err = run_cli(tmp_path, capsys, str(path))
    assert code == 2 and "larger than" in err
