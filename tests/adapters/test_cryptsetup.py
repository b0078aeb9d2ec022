"""rhel_cvm_update.adapters.cryptsetup against the real cryptsetup CLI on image files."""

import base64
import os
import stat
import subprocess

import pytest

from rhel_cvm_update.adapters.cryptsetup import Cryptsetup
from rhel_cvm_update.errors import ExternalToolError, FormatError, MachineError, UnsupportedError
from rhel_cvm_update.secrets import Secret
from tests.swtpm_fixtures import (TEST_PASSPHRASE, cryptsetup, header_bytes, luks2_image,  # noqa: F401
                                  luks2_template, make_luks2_image, missing_tools)

pytestmark = pytest.mark.root


def test_metadata_of_fresh_image(luks2_image):
    meta = Cryptsetup(luks2_image).metadata()
    assert sorted(meta.keyslots) == [0]
    assert meta.tokens == {}
    assert meta.free_keyslot() == 1 and meta.free_token_id() == 0


def test_add_keyslot_uses_systemd_pbkdf_and_opens(luks2_image):
    luks = Cryptsetup(luks2_image)
    with Secret(bytearray(TEST_PASSPHRASE)) as old, Secret.random(32) as raw, raw.base64() as new:
        luks.add_keyslot(old, new, 3)
        assert luks.test_key(new, 3)
        assert not luks.test_key(new, 0)
        # Cross-check with the cryptsetup CLI reading the passphrase itself.
        assert cryptsetup("open", "--test-passphrase", "--key-slot", "3", "--key-file=-", luks2_image,
                          input_bytes=bytes(new.data)).returncode == 0
        assert bytes(new.data) == base64.b64encode(bytes(raw.data))
    dump = cryptsetup("luksDump", luks2_image).stdout.decode()
    slot3 = dump[dump.index("  3: luks2"):]
    assert "PBKDF:      pbkdf2" in slot3 and "Hash:       sha512" in slot3 and "Iterations: 1000" in slot3


def test_wrong_key_is_false_not_error(luks2_image):
    with Secret(bytearray(b"wrong")) as key:
        assert Cryptsetup(luks2_image).test_key(key) is False


def test_token_import_export_remove_and_kill_slot(luks2_image):
    luks = Cryptsetup(luks2_image)
    token = {"type": "rhel-cvm-update-test", "keyslots": ["0"], "note": "kept"}
    luks.import_token(token, 5)
    assert luks.export_token(5) == token
    assert luks.metadata().tokens == {5: token}
    luks.remove_token(5)
    assert luks.metadata().tokens == {}
    with Secret(bytearray(TEST_PASSPHRASE)) as old, Secret(bytearray(b"second")) as new:
        luks.add_keyslot(old, new, 1)
    luks.kill_keyslot(1)
    assert sorted(luks.metadata().keyslots) == [0]


def test_secrets_never_in_argv_or_environment(luks2_image, tmp_path):
    """A wrapper named cryptsetup first on PATH records argv and environment of every call."""
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "bin" / "cryptsetup"
    wrapper.parent.mkdir()
    real = "/usr/sbin/cryptsetup" if os.path.exists("/usr/sbin/cryptsetup") else "/sbin/cryptsetup"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\nenv >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{wrapper.parent}:{old_path}"
    try:
        luks = Cryptsetup(luks2_image)
        with Secret(bytearray(TEST_PASSPHRASE)) as old, Secret.random(32) as raw, raw.base64() as new:
            luks.add_keyslot(old, new, 2)
            assert luks.test_key(new, 2)
            new_text = bytes(new.data)
    finally:
        os.environ["PATH"] = old_path
    recorded = log.read_bytes()
    assert b"luksAddKey" in recorded
    assert TEST_PASSPHRASE not in recorded and new_text not in recorded


def test_luks1_header_is_refused_unchanged(tmp_path):
    image = make_luks2_image(str(tmp_path / "luks1.img"), luks_type="luks1")
    before = open(image, "rb").read(1 << 20)
    with pytest.raises(UnsupportedError, match="LUKS1"):
        Cryptsetup(image).metadata()
    assert open(image, "rb").read(1 << 20) == before


def test_non_luks_file_is_a_format_error(tmp_path):
    image = tmp_path / "plain.img"
    image.write_bytes(b"\x00" * 4096)
    with pytest.raises(FormatError, match="not a LUKS device"):
        Cryptsetup(str(image)).metadata()
    assert image.read_bytes() == b"\x00" * 4096


def test_full_keyslot_area_fails_cleanly(tmp_path):
    # 256 KiB of keyslot area holds exactly one 512-bit-key keyslot (4000 AF stripes).
    image = make_luks2_image(str(tmp_path / "small.img"), "--luks2-keyslots-size", "256k")
    before = header_bytes(image)
    luks = Cryptsetup(image)
    with Secret(bytearray(TEST_PASSPHRASE)) as old, Secret(bytearray(b"new")) as new:
        with pytest.raises(ExternalToolError) as err:
            luks.add_keyslot(old, new, 1)
    assert "luksAddKey" in str(err.value) and "No space for new keyslot" in str(err.value)
    assert header_bytes(image) == before


def _loop_disk(tmp_path, *sgdisk_args):
    image = tmp_path / "gpt.img"
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    subprocess.run(["sgdisk", *sgdisk_args, str(image)], check=True, capture_output=True)
    return subprocess.run(["losetup", "-fP", "--show", str(image)], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.mark.parametrize("sgdisk_args,expect", [
    (("-n", "1:2048:+4M", "-t", "1:ef00", "-n", "2:0:0", "-t", "2:8304"), "p2"),
    (("-n", "1:2048:+4M", "-t", "1:8304", "-n", "2:0:0", "-t", "2:8304"), "several"),
])
def test_auto_finds_the_x86_64_root_partition(tmp_path, sgdisk_args, expect):
    if missing_tools(["sgdisk", "losetup"]):
        pytest.skip("sgdisk/losetup not installed")
    if not os.path.isdir("/run/udev/data"):
        pytest.skip("udev is not running here: no ID_PART_ENTRY_TYPE for pyudev to read")
    from rhel_cvm_update.adapters.cryptsetup import resolve_device
    try:
        disk = _loop_disk(tmp_path, *sgdisk_args)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"no loop device: {e.stderr}")
    try:
        subprocess.run(["udevadm", "settle"], check=False, timeout=30)
        if not os.path.exists(disk + "p1"):
            pytest.skip("the kernel did not scan the loop device's partitions")
        if expect == "several":
            with pytest.raises(MachineError, match=f"several x86-64 root partitions.*{disk}p1"):
                resolve_device("auto")
        else:
            assert resolve_device("auto") == disk + expect
    finally:
        subprocess.run(["losetup", "-d", disk], check=True)
