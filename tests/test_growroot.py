"""grow-root (rhel_cvm_update/growroot.py) on real images with fakes where this host has no
device-mapper: the GPT is a real sgdisk image checked by `sgdisk -v`; the LUKS2 header is a
real image (keyslots tested and killed by cryptsetup itself); the kernel's partition view,
the dm-crypt mapping, the filesystem and the TPM are fakes that record what they were given.
Power cuts are exceptions thrown from inside a step; the rerun must end where an
uninterrupted run ends, byte for byte.
"""

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rhel_cvm_update.adapters.blockdev import Disk, RootLayout
from rhel_cvm_update.adapters.cryptsetup import Cryptsetup
from rhel_cvm_update.config import config_from_mapping
from rhel_cvm_update.errors import FormatError, MachineError, UnsupportedError
from rhel_cvm_update.formats import gpt
from rhel_cvm_update.growroot import GrowMachine, GrowState, attention, grow_root
from rhel_cvm_update.growroot_keyfile import read_keyfile
from rhel_cvm_update.secrets import Secret
from tests.formats.test_gpt_grow import make_disk, partition_info, sgdisk_verify
from tests.swtpm_fixtures import TEST_PASSPHRASE, cryptsetup, import_token_raw, luks2_image, luks2_template  # noqa: F401

pytestmark = pytest.mark.skipif(shutil.which("sgdisk") is None or shutil.which("cryptsetup") is None,
                                reason="needs sgdisk and cryptsetup")

REPO = Path(__file__).resolve().parent.parent
POLICY = bytes(range(32))
SEALED = b"the sealed secret, 32 bytes long"
FILE_KEY = b"cloud-init's growpart key \x00\xff\x10"
OFFSET = 32768   # a LUKS2 data offset of 16 MiB, in sectors


class PowerCut(BaseException):
    pass


class FakeTpm:
    def __init__(self, live):
        self.live, self.unsealed = live, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def live_policy_digest(self, pcrs, bank):
        return self.live

    def unseal(self, token, token_id):
        self.unsealed.append(token_id)
        return Secret(bytearray(SEALED))


class FakeMachine(GrowMachine):
    """Real LUKS2 image and GPT image; fake kernel, mapping, filesystem and TPM."""

    def __init__(self, rig, live=POLICY, fail=None):
        self.luks = Cryptsetup(rig.luks)
        self.rig, self.fail = rig, fail
        self.tpm_live = live
        self.tpms = []

    def _maybe_fail(self, where):
        if self.fail == where:
            self.fail = None
            raise PowerCut(where)

    def layout(self):
        return RootLayout(self.rig.luks, str(self.rig.disk), 2, 34816, "root", "/dev/dm-0", "/", "ext4")

    def open_disk(self, path):
        machine = self

        class CutDisk(Disk):
            def write(self, offset, data):
                if machine.fail == "torn-write":
                    machine.fail = None
                    super().write(offset, data[:512])
                    raise PowerCut("torn")
                super().write(offset, data)
                machine._maybe_fail("after-first-write")
        return CutDisk(path)

    def partition_sectors(self, layout):
        return self.rig.kernel

    def tell_kernel(self, layout):
        self._maybe_fail("kernel")
        first, last, _ = partition_info(self.rig.disk, 2)
        self.rig.kernel = last - first + 1

    def mapping_sectors(self, layout):
        return OFFSET, self.rig.mapped

    def resize_mapping(self, layout, key):
        self._maybe_fail("mapping")
        self.rig.keys.append(bytes(key.data))
        self.rig.mapped = self.rig.kernel - OFFSET

    def device_bytes(self, layout):
        return self.rig.mapped * 512

    def filesystem_bytes(self, layout):
        return self.rig.fs

    def grow_filesystem(self, layout):
        self._maybe_fail("filesystem")
        self.rig.fs = self.rig.mapped * 512 // 4096 * 4096

    def tpm(self):
        if self.tpm_live is None:
            raise AssertionError("the TPM must not be opened here")
        tpm = FakeTpm(self.tpm_live)
        self.tpms.append(tpm)
        return tpm


class Rig:
    def __init__(self, tmp_path, luks, keyfile=True, token=True):
        self.tmp = tmp_path
        self.disk = make_disk(tmp_path / "root-disk.img")
        first, last, _ = partition_info(self.disk, 2)
        self.kernel = last - first + 1
        self.mapped = self.kernel - OFFSET
        self.fs = self.mapped * 512
        self.keys = []
        self.luks = luks
        if token:   # keyslot 1: the sealed secret's base64, as systemd-cryptenroll makes it
            self._add_key(base64.b64encode(SEALED), 1)
            import_token_raw(luks, {"type": "systemd-tpm2", "keyslots": ["1"],
                                    "tpm2-blob": base64.b64encode(b"\x00\x04priv\x00\x0cpublic area.").decode(),
                                    "tpm2-pcrs": [4, 7], "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc",
                                    "tpm2-policy-hash": POLICY.hex(), "tpm2-pin": False}, 0)
        self.keyfile = tmp_path / "cc_growpart_keydata"
        if keyfile:
            self._add_key(FILE_KEY, 5)
            self.keyfile.write_text(json.dumps({"key": base64.b64encode(FILE_KEY).decode(), "slot": 5}))
            self.keyfile.chmod(0o600)
        self.config = config_from_mapping({"luks_device": luks, "state_dir": str(tmp_path / "state")})

    def _add_key(self, key, slot):
        new = self.tmp / f"new-{slot}"
        new.write_bytes(key)
        cryptsetup("luksAddKey", "-q", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-slot",
                   str(slot), "--key-file=-", self.luks, str(new), input_bytes=TEST_PASSPHRASE)
        new.unlink()

    def run(self, machine=None, **kwargs):
        return grow_root(self.config, machine or FakeMachine(self), keyfile_path=str(self.keyfile), **kwargs)

    def keyslots(self):
        dump = json.loads(cryptsetup("luksDump", "--dump-json-metadata", self.luks).stdout)
        return sorted(int(k) for k in dump["keyslots"])

    def snapshot(self):
        return (hashlib.sha256(self.disk.read_bytes()).hexdigest(), hashlib.sha256(Path(self.luks).read_bytes()).hexdigest(),
                self.keyfile.exists(), self.kernel, self.mapped, self.fs)


def opens(luks, key, slot):
    return cryptsetup("open", "--test-passphrase", "--key-slot", str(slot), "--key-file=-", luks,
                      input_bytes=key, check=False).returncode == 0


def test_grows_with_the_tpm_token_then_a_rerun_changes_nothing(tmp_path, luks2_image):
    rig = Rig(tmp_path, luks2_image, keyfile=False)
    result = rig.run()
    assert result["outcome"] == "grown" and result["key"] == "token 0"
    assert [s["action"] for s in result["steps"]] == ["done", "done", "done", "done", "nothing-to-do"]
    assert "No problems found" in sgdisk_verify(rig.disk)
    first, last, _ = partition_info(rig.disk, 2)
    assert rig.kernel == last - first + 1 and rig.mapped == rig.kernel - OFFSET and rig.fs == rig.mapped * 512
    assert rig.keys == [base64.b64encode(SEALED)]        # the mapping got the token's passphrase
    before = rig.snapshot()
    again = rig.run()
    assert again["outcome"] == "nothing-to-do" and all(s["action"] == "nothing-to-do" for s in again["steps"])
    assert "no free space after partition 2" in again["steps"][0]["detail"]
    assert rig.snapshot() == before and rig.keys == [base64.b64encode(SEALED)]
    assert GrowState(rig.config.state_dir).pending is None


def test_the_key_file_is_retired_and_not_used_when_a_token_matches(tmp_path, luks2_image):
    rig = Rig(tmp_path, luks2_image)
    assert rig.keyslots() == [0, 1, 5]
    assert any("cc_growpart_keydata" in a for a in attention(rig.config, {0, 1, 5}, str(rig.keyfile)))
    result = rig.run()
    assert result["key"] == "token 0" and rig.keys == [base64.b64encode(SEALED)]
    assert result["steps"][-1] == {"step": "keyfile", "action": "done",
                                   "detail": f"{rig.keyfile} and keyslot 5"}
    assert not rig.keyfile.exists() and rig.keyslots() == [0, 1]
    assert opens(luks2_image, TEST_PASSPHRASE, 0) and opens(luks2_image, base64.b64encode(SEALED), 1)
    assert attention(rig.config, set(rig.keyslots()), str(rig.keyfile)) == []


def test_the_key_file_opens_the_mapping_when_no_token_matches(tmp_path, luks2_image):
    rig = Rig(tmp_path, luks2_image)
    machine = FakeMachine(rig, live=b"\x99" * 32)
    result = rig.run(machine)
    assert result["key"] == f"key file {rig.keyfile} (keyslot 5)" and rig.keys == [FILE_KEY]
    assert machine.tpms[0].unsealed == []
    assert not rig.keyfile.exists() and rig.keyslots() == [0, 1]


def test_no_matching_token_and_no_key_file_changes_nothing(tmp_path, luks2_image):
    rig = Rig(tmp_path, luks2_image, keyfile=False)
    before = rig.snapshot()
    with pytest.raises(MachineError, match="no systemd-tpm2 token is sealed to the booted chain's PCRs"):
        rig.run(FakeMachine(rig, live=b"\x99" * 32))
    assert rig.snapshot() == before


def test_a_key_file_that_does_not_open_its_keyslot_changes_nothing(tmp_path, luks2_image):
    rig = Rig(tmp_path, luks2_image)
    rig.keyfile.write_text(json.dumps({"key": base64.b64encode(b"wrong").decode(), "slot": 5}))
    before = rig.snapshot()
    with pytest.raises(UnsupportedError, match="does not open keyslot 5"):
        rig.run()
    assert rig.snapshot() == before


def test_a_root_that_is_not_luks_changes_nothing(tmp_path, luks2_image):
    rig = Rig(tmp_path, luks2_image, keyfile=False)
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(1 << 20))
    rig.luks = str(plain)
    before = rig.snapshot()
    with pytest.raises(FormatError, match="plain.img"):
        rig.run()
    assert rig.snapshot() == before


def test_a_partition_after_the_root_or_an_mbr_disk_changes_nothing(tmp_path, luks2_image):
    rig = Rig(tmp_path, luks2_image, keyfile=False)
    subprocess.run(["sgdisk", "-d", "2", "-n", "2:34816:+20M", "-n", "3:0:+8M", str(rig.disk)], check=True,
                   capture_output=True)
    before = rig.snapshot()
    with pytest.raises(UnsupportedError, match="partition 3 .* follows partition 2"):
        rig.run()
    assert rig.snapshot() == before
    mbr = bytearray(512)
    mbr[446 + 4], mbr[510:512] = 0x83, b"\x55\xaa"
    rig.disk.write_bytes(bytes(mbr) + bytes(64 << 20))
    before = rig.snapshot()
    with pytest.raises(FormatError, match="an MBR"):
        rig.run()
    assert rig.snapshot() == before


def test_dry_run_and_probe_change_nothing(tmp_path, luks2_image):
    rig = Rig(tmp_path, luks2_image)
    before = rig.snapshot()
    dry = rig.run(dry_run=True)
    assert dry["outcome"] == "would-change" and {s["action"] for s in dry["steps"]} == {"would-do"}
    probe = rig.run(FakeMachine(rig, live=None), probe=True)     # no TPM for the unit's ExecCondition
    assert probe["outcome"] == "would-change"
    assert rig.snapshot() == before and rig.keys == [] and not os.path.exists(rig.config.state_dir + "/grow-root.json")
    rig.run()
    assert rig.run(FakeMachine(rig, live=None), probe=True)["outcome"] == "nothing-to-do"


@pytest.mark.parametrize("cut", ["after-first-write", "torn-write", "kernel", "mapping", "filesystem"])
def test_a_power_cut_in_any_step_resumes_to_the_same_end(tmp_path, luks2_template, cut):
    images = {}
    for name in ("golden", "cut"):
        (tmp_path / name).mkdir()
        images[name] = str(tmp_path / name / "luks.img")
        shutil.copyfile(luks2_template, images[name])
    golden = Rig(tmp_path / "golden", images["golden"])
    rig = Rig(tmp_path / "cut", images["cut"])
    shutil.copyfile(golden.disk, rig.disk)             # the same disk GUIDs
    golden.run()
    with pytest.raises(PowerCut):
        rig.run(FakeMachine(rig, fail=cut))
    pending = GrowState(rig.config.state_dir).pending
    assert pending in ("partition", "kernel", "mapping", "filesystem")
    assert any(f"interrupted grow-root (at {pending})" in a for a in attention(rig.config, {0, 1, 5}, str(rig.keyfile)))
    resumed = rig.run()
    assert resumed["resumed"] == pending
    assert "No problems found" in sgdisk_verify(rig.disk)
    assert rig.disk.read_bytes() == golden.disk.read_bytes()
    assert (rig.kernel, rig.mapped, rig.fs) == (golden.kernel, golden.mapped, golden.fs)
    assert not rig.keyfile.exists() and rig.keyslots() == golden.keyslots() == [0, 1]
    assert rig.run()["outcome"] == "nothing-to-do"


def test_a_cut_between_killing_the_keyslot_and_removing_the_file(tmp_path, luks2_image, monkeypatch):
    rig = Rig(tmp_path, luks2_image)
    import rhel_cvm_update.growroot_keyfile as keyfile_module

    monkeypatch.setattr(keyfile_module, "remove_keyfile", lambda path: (_ for _ in ()).throw(PowerCut("rm")))
    with pytest.raises(PowerCut):
        rig.run()
    assert rig.keyslots() == [0, 1] and rig.keyfile.exists()
    assert any("interrupted grow-root (at keyfile)" in a for a in attention(rig.config, {0, 1}, str(rig.keyfile)))
    monkeypatch.undo()
    result = rig.run()
    assert result["outcome"] == "retired-keyfile"
    assert result["steps"][-1]["detail"].endswith("(its keyslot is gone already)")
    assert not rig.keyfile.exists() and attention(rig.config, {0, 1}, str(rig.keyfile)) == []


def test_status_names_a_keyslot_the_journal_says_was_the_key_files(tmp_path):
    config = config_from_mapping({"state_dir": str(tmp_path)})
    state = GrowState(str(tmp_path))
    state.keyfile_slot = 5
    state.save()
    assert attention(config, {0, 5}, str(tmp_path / "absent")) == [
        "keyslot 5 (of cloud-init's key file) still exists; run 'rhel-cvm-update grow-root' or kill it with "
        "cryptsetup luksKillSlot"]
    assert attention(config, {0}, str(tmp_path / "absent")) == []


@pytest.mark.parametrize("content,message", [
    (b"not json", 'no "key"'),
    (b'{"key": "QUJD", "slot": 5, "extra": 1}', "expected exactly"),
    (b'{"key": "QUJD", "slot": true}', "slot True is not a LUKS2 keyslot"),
    (b'{"key": "QUJD", "slot": 32}', "slot 32"),
    (b'{"key": "QUJDR", "slot": 1}', "not base64"),
    (b'{"key": "", "slot": 1}', "empty"),
    (b'{"key": "QUJD", "slot": 1', "not JSON"),
])
def test_hostile_key_files_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "cc_growpart_keydata"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=message) as info:
        read_keyfile(str(path))
    assert str(path) in str(info.value)


def test_a_key_file_others_could_write_is_refused(tmp_path):
    path = tmp_path / "cc_growpart_keydata"
    path.write_bytes(b'{"key": "QUJD", "slot": 1}')
    path.chmod(0o666)
    with pytest.raises(Exception, match="cc_growpart_keydata"):
        read_keyfile(str(path))
    path.chmod(0o600)
    keyfile = read_keyfile(str(path))
    assert keyfile.slot == 1 and bytes(keyfile.key.data) == b"ABC"
    keyfile.wipe()


def test_cryptsetup_resize_gets_the_key_on_stdin_never_in_argv(tmp_path, monkeypatch):
    import rhel_cvm_update.adapters.cryptsetup as adapter

    log = tmp_path / "log"
    fake = tmp_path / "cryptsetup"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\ncat >> {log}.stdin\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(adapter, "CRYPTSETUP", str(fake))
    with Secret(bytearray(b"s3cret-key")) as key:
        Cryptsetup("/dev/sdz4").resize("root", key)
    assert log.read_text() == "resize --key-file=- root\n" and (tmp_path / "log.stdin").read_bytes() == b"s3cret-key"


def test_grow_root_help_exits_0():
    result = subprocess.run([sys.executable, "-m", "rhel_cvm_update", "grow-root", "--help"], cwd=str(REPO),
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--dry-run" in result.stdout and "--json" in result.stdout


def test_the_plan_is_journaled_in_json():
    """The plan's JSON names its writes (what a resumed run and the result show)."""
    plan = gpt.GrowPlan(2, 10, 20, 30, 40, 512, (gpt.GptWrite("backup GPT", 0, b""),), "grown")
    assert plan.to_json()["writes"] == ["backup GPT"]
