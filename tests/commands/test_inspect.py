"""`rhel-cvm-update inspect` through the real CLI entry point, checked against pesign."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rhel_cvm_update.cli import main
from tests import realbins
from tests.pebuild import CODE, Section, build_pe, pesign_hash

REPO = Path(__file__).resolve().parent.parent.parent
SHIM_SIGNED = Path("/usr/lib/shim/shimx64.efi.signed")


def need_tools(*names):
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


@pytest.fixture(autouse=True)
def default_config(monkeypatch, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    monkeypatch.setenv("RHEL_CVM_UPDATE_CONFIG", str(config))


def run_json(capsys, *argv):
    assert main(["inspect", "--json", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def real_uki(tmp_path_factory):
    need_tools("apt-get", "dpkg-deb", "objcopy", "pesign")
    if not realbins.SYSTEMD_STUB.exists():
        pytest.skip("systemd-boot-efi (linuxx64.efi.stub) is not installed")
    kernel = realbins.fetch_kernel_package("linux-image-cloud-amd64")
    work = tmp_path_factory.mktemp("inspect")
    initrd = work / "initrd"
    initrd.write_bytes(b"initrd" * 100)
    uki = realbins.build_uki(work / "uki.efi", kernel.vmlinuz, initrd, "console=ttyS0 ro")
    return uki, kernel


def test_uki_json_keys_and_values(capsys, real_uki):
    uki, kernel = real_uki
    [info] = run_json(capsys, uki)
    assert info["authenticode_sha256"] == pesign_hash(uki).hex()
    assert info["linux_authenticode_sha256"] == pesign_hash(kernel.vmlinuz).hex()
    assert info["kernel_version"] == kernel.release
    assert info["cmdline"] == "console=ttyS0 ro"
    assert info["uki"] is True and info["signed"] is False
    names = [s["name"] for s in info["sections"]]
    assert names[-4:] == [".osrel", ".cmdline", ".linux", ".initrd"]
    linux = info["sections"][names.index(".linux")]
    assert linux["virtual_size"] == kernel.vmlinuz.stat().st_size
    assert set(linux) >= {"name", "virtual_size", "virtual_address", "size_of_raw_data",
                          "pointer_to_raw_data", "characteristics"}


def test_plain_pe_and_several_files(capsys, tmp_path):
    need_tools("pesign")
    if not SHIM_SIGNED.exists():
        pytest.skip("shim-signed is not installed")
    synthetic = tmp_path / "app.efi"
    synthetic.write_bytes(build_pe([Section(b".text", b"\x90" * 300, characteristics=CODE)], trailing=b"abc"))
    infos = run_json(capsys, SHIM_SIGNED, synthetic, "--hash", "sha1", "--hash", "sha256")
    assert [i["file"] for i in infos] == [str(SHIM_SIGNED), str(synthetic)]
    for info, path in zip(infos, (SHIM_SIGNED, synthetic)):
        assert info["authenticode_sha256"] == pesign_hash(path).hex()
        assert info["authenticode_sha1"] == pesign_hash(path, "sha1").hex()
        assert info["uki"] is False and "linux_authenticode_sha256" not in info
    assert infos[0]["signed"] is True
    assert infos[0]["sbat"].startswith("sbat,1,")


def test_text_output(capsys):
    if not SHIM_SIGNED.exists():
        pytest.skip("shim-signed is not installed")
    assert main(["inspect", str(SHIM_SIGNED)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{SHIM_SIGNED}:\n")
    assert "  authenticode_sha256: " in out and "  sections:\n" in out


@pytest.mark.parametrize("content,where", [
    (b"", "at offset 0x0"),
    (b"not a PE file at all" * 10, "at offset 0x0"),
    (b"MZ" + bytes(0x3A) + b"\xff\xff\xff\x7f" + bytes(300), "at offset 0x3c"),
])
def test_bad_file_exits_2_naming_file_and_offset(tmp_path, content, where):
    bad = tmp_path / "bad.efi"
    bad.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "rhel_cvm_update", "inspect", str(bad)], cwd=str(REPO),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.decode()
    assert f"{bad} {where}" in err
    assert "Traceback" not in err


def test_missing_file_exits_2(capsys, tmp_path):
    assert main(["inspect", str(tmp_path / "nope.efi")]) == 2
    assert "nope.efi" in capsys.readouterr().err
