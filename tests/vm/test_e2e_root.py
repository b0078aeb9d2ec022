"""e2e on the RHEL-like root guest (issue 15): the LUKS2 **root** unlocked in the initrd.

OVMF + swtpm + Debian's shim + UKIs of systemd-stub 252 and a dracut initramfs, no root= on the
command line: systemd-gpt-auto-generator finds the root by its type GUID and systemd-cryptsetup
252 unlocks it with the systemd-tpm2 token (tests/vm/guest/rootimage.py).  The product was
installed from its RPM in the guest and the first token enrolled by systemd-cryptenroll at the
first boot, with the passphrase typed on the console (tests/vm/guest/firstboot.py).

Every fact comes from outside the product: the console (a passphrase prompt means no token
unlocked the root), findmnt and cryptsetup status for the root's mapping, /proc/cmdline for
the kernel, efibootmgr for the variables, luksDump for tokens.
"""

import base64
import subprocess

import pytest

from tests.vm.guest.firstboot import enrolled_root_snapshot
from tests.vm.guest.image import RECOVERY_KEY_FILE
from tests.vm.guest.rootimage import RootImage, build_root_image, initramfs_listing
from tests.vm.guest.scenario import (CONFIRM_SERVICE, ESP_LINUX, PATH_UNIT, Machine, e2e_table,  # noqa: F401
                                     entry_for, require_prerequisites, staged_uki)
from tests.vm.guest.vm import PASSPHRASE_PROMPT, PassphraseAsked

pytestmark = [pytest.mark.vm, pytest.mark.root]

CRASH_ENV = "RHEL_CVM_UPDATE_CRASH_AT"
SIGKILL_RC = -9


def root_machine(tmp_path, secure_boot: bool = False):
    require_prerequisites()
    image = build_root_image()
    return image, Machine(image, enrolled_root_snapshot(image, secure_boot), tmp_path / "vm")


def test_initramfs_is_dracuts_with_the_token_plugin(tmp_path):
    require_prerequisites()
    image: RootImage = build_root_image()
    listing = initramfs_listing(image, "a")
    for needed in ("usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so",
                   "usr/lib/systemd/system-generators/systemd-gpt-auto-generator",
                   "usr/lib/systemd/systemd-cryptsetup", "usr/bin/dracut-cmdline"):
        assert needed in listing, "%s is not in uki-a's initramfs" % needed


def test_root_unlocks_in_the_initrd_and_an_unsealed_uki_asks(tmp_path, e2e_table):  # noqa: F811
    image, machine = root_machine(tmp_path)
    vm = machine.vm
    try:
        with e2e_table.scenario(machine, "root: unchanged kernel unlocks in the initrd"):
            vm.start()
            machine.assert_unlocked("a")
            assert [t["tpm2-pcrs"] for t in machine.luks_tokens().values()] == [[4, 7]]
            assert vm.check(["rpm", "-q", "rhel-cvm-update"]).stdout.startswith("rhel-cvm-update-")
        with e2e_table.scenario(machine, "root: negative control, unsealed UKI asks for the passphrase"):
            # UKI B through a hand-made entry, the product stopped: no token was sealed for it.
            vm.check(["systemctl", "disable", "--now", PATH_UNIT])
            vm.check(["mkdir", "-p", "/boot/efi/EFI/e2e"])
            vm.check(["cp", image.guest_uki("b"), "/boot/efi/EFI/e2e/uki-b.efi"])
            vm.check(["python3", "-c", "import sys; open('/run/optional-data', 'wb').write("
                      "sys.argv[1].encode('utf-16-le') + bytes(2))", "\\EFI\\e2e\\uki-b.efi"])
            vm.check(["efibootmgr", "-c", "-d", "/dev/vda", "-p", "1", "-l", "\\EFI\\redhat\\shimx64.efi",
                      "-L", "e2e negative control", "-@", "/run/optional-data"])
            vm.check(["sync"])
            vm.reboot(wait=False)
            vm.wait_console(PASSPHRASE_PROMPT)
            assert "rhel_cvm_update.uki=b" in vm.console_since_boot()
            vm.power_cut()
    finally:
        machine.close()


def test_root_kernel_update_from_an_rpm(tmp_path, e2e_table):  # noqa: F811
    image, machine = root_machine(tmp_path)
    vm = machine.vm
    try:
        with e2e_table.scenario(machine, "root: kernel update from an RPM, root unlocks, confirm"):
            vm.start()
            machine.assert_unlocked("a")
            old_entry = machine.efibootmgr()["BootCurrent"]
            # The package's file trigger runs the product's hook (rhel-cvm-update update) in the
            # rpm transaction; the path unit may fire as well and finds nothing left to do.
            installed = vm.check(["rpm", "-i", "--nodeps", image.guest_rpm("b")], timeout=600)
            machine.wait_update_idle()
            status = machine.status()
            assert status["exit_code"] == 0, (status["attention"], installed.stderr)
            assert status["next_boot"]["will_unlock"] and status["next_boot"]["uki"].endswith("uki-b.efi")
            facts = machine.efibootmgr()
            new_entry = entry_for(facts, "b")
            assert new_entry is not None and facts["BootNext"] == new_entry, facts
            assert len(machine.luks_tokens()) == 2
            try:
                vm.reboot()
            except PassphraseAsked:
                pytest.fail("the root did not unlock with the token sealed for uki-b: %s" % vm.serial_tail())
            machine.assert_unlocked("b")
            assert machine.efibootmgr()["BootCurrent"] == new_entry
            confirm = machine.unit_state(CONFIRM_SERVICE)
            assert confirm["Result"] == "success" and confirm["ExecMainStatus"] == "0", confirm
            machine.wait_update_idle()
            facts = machine.efibootmgr()
            assert facts["BootOrder"][0] == new_entry and old_entry in facts["entries"], facts
            chains = {c["uki"].rsplit("/", 1)[-1]: c["status"] for c in machine.status()["chains"]}
            assert chains == {"uki-b.efi": "booted", "uki-a.efi": "previous"}, chains
        with e2e_table.scenario(machine, "root: then the old kernel removed, root still unlocks"):
            tokens_before = machine.luks_tokens()
            vm.check(["rm", ESP_LINUX + "/uki-a.efi"])
            machine.wait_update("the path unit to remove uki-a's chain",
                                lambda: all(not c["uki"].endswith("uki-a.efi") for c in machine.status()["chains"]))
            tokens = machine.luks_tokens()
            assert len(tokens) == len(tokens_before) - 1, "uki-a's token is still there: %r" % tokens
            facts = machine.efibootmgr()
            assert old_entry not in facts["entries"], "Boot%s (uki-a) is still there: %r" % (old_entry, facts)
            status = machine.status()
            assert status["exit_code"] == 0, status["attention"]
            booted_tokens = [t for t in status["tokens"] if t["matches_current_boot"]]
            assert len(booted_tokens) == 1 and str(booted_tokens[0]["token"]) in tokens
            vm.reboot()
            machine.assert_unlocked("b")
            assert machine.efibootmgr()["BootCurrent"] == new_entry
    finally:
        machine.close()


def test_root_failed_kernel_falls_back(tmp_path, e2e_table):  # noqa: F811
    image, machine = root_machine(tmp_path)
    try:
        with e2e_table.scenario(machine, "root: failed kernel (panic in the initrd, old kernel)"):
            machine.vm.start()
            machine.assert_unlocked("a")
            old_entry = machine.efibootmgr()["BootCurrent"]
            path = machine.install_uki("bad")
            machine.wait_update("the path unit to stage %s" % path, lambda: staged_uki(machine) == path)
            bad_entry = entry_for(machine.efibootmgr(), "bad")
            assert machine.efibootmgr()["BootNext"] == bad_entry
            # The bad UKI's kernel finds no init in its initramfs and panics, panic=5 resets the
            # VM and the firmware (BootNext consumed) boots BootOrder's first entry: the old kernel.
            machine.vm.reboot()
            serial = machine.vm.serial_text()
            assert "rhel_cvm_update.uki=bad" in serial and "Kernel panic - not syncing" in serial
            machine.assert_unlocked("a")
            facts = machine.efibootmgr()
            assert facts["BootCurrent"] == old_entry and facts["BootOrder"][0] == old_entry
            status = machine.status()
            assert status["trial_failed"] and "uki-bad.efi" in str(status["trial_failed"]), status["trial_failed"]
            assert any("uki-bad.efi" in a for a in status["attention"]), status["attention"]
            assert status["next_boot"]["will_unlock"] and status["next_boot"]["uki"].endswith("uki-a.efi")
    finally:
        machine.close()


POWER_CUTS = ("seal:inside",   # the keyslot is added, no token names it yet
              "seal:after",    # keyslot + token written
              "stage:inside")  # the Boot#### entry written, BootNext not yet


def test_root_power_cuts(tmp_path, e2e_table):  # noqa: F811
    image, machine = root_machine(tmp_path)
    vm = machine.vm
    try:
        with e2e_table.scenario(machine, "root: power cuts at %s" % ", ".join(POWER_CUTS)):
            vm.start()
            machine.assert_unlocked("a")
            # Here the harness runs update itself (with the fault-injection hook), not the path unit.
            vm.check(["systemctl", "disable", "--now", PATH_UNIT])
            machine.install_uki("b")
            for point in POWER_CUTS:
                killed = vm.run(["rhel-cvm-update", "update"], env={CRASH_ENV: point}, timeout=300)
                assert killed.rc == SIGKILL_RC, "update did not reach %s: rc=%d %s" % (point, killed.rc, killed.stderr)
                vm.power_cut()
                vm.start()
                machine.assert_unlocked("a")
            done = vm.check(["rhel-cvm-update", "update", "--json"], timeout=300).json()
            assert done["staged"] and done["staged"]["uki"].endswith("uki-b.efi"), done
            status = machine.status()
            assert status["exit_code"] == 0 and status["pending"] is None, status
            tokens = machine.luks_tokens()
            assert len(tokens) == 2, tokens
            referenced = {s for t in tokens.values() for s in t["keyslots"]}
            assert set(machine.luks_keyslots()) == referenced | {"0"}, "a keyslot no token names was left behind"
            vm.reboot()
            machine.assert_unlocked("b")
    finally:
        machine.close()


SHIM_LOCK_GUID = "605dab50-e046-4300-abb6-3dd810dd8b23"


def pcr(machine: Machine, index: int) -> str:
    """The TPM's sha256 PCR ``index`` now, as the guest kernel reads it."""
    return machine.vm.check(["cat", "/sys/class/tpm/tpm0/pcr-sha256/%d" % index]).stdout.strip().lower()


def update_from_rpm_and_reboot(machine: Machine, rpm: str, uki: str) -> None:
    """`rpm -U` an update package; its file trigger (or the path unit) runs the update.  Then
    the next boot's root must unlock in the initrd with the token sealed for it, and confirm
    must accept that boot."""
    vm = machine.vm
    installed = vm.check(["rpm", "-U", "--nodeps", rpm], timeout=600)
    machine.wait_update_idle()
    status = machine.status()
    assert status["exit_code"] == 0, (status["attention"], installed.stderr)
    assert status["next_boot"]["will_unlock"] and status["next_boot"]["uki"].endswith("uki-%s.efi" % uki), status
    try:
        vm.reboot()
    except PassphraseAsked:
        pytest.fail("the root did not unlock after %s: %s" % (rpm, vm.serial_tail()))
    machine.assert_unlocked(uki)
    confirm = machine.unit_state(CONFIRM_SERVICE)
    assert confirm["Result"] == "success" and confirm["ExecMainStatus"] == "0", confirm
    machine.wait_update_idle()  # confirm's BOOTX64.CSV write starts one update run
    status = machine.status()
    assert status["exit_code"] == 0, status["attention"]
    assert any(t["matches_current_boot"] for t in status["tokens"]), status["tokens"]
    facts = machine.efibootmgr()
    assert facts["BootOrder"][0] == facts["BootCurrent"] and facts.get("BootNext") is None, facts
    assert "uki-%s.efi" % uki in machine.fallback_csv()


def pcr7_authorities(machine: Machine, work) -> int:
    """EV_EFI_VARIABLE_AUTHORITY events in PCR7 of the guest's event log, by tpm2_eventlog."""
    log = base64.b64decode(machine.vm.check(["base64", "-w0", "/sys/kernel/security/tpm0/binary_bios_measurements"]
                                            ).stdout)
    (work / "eventlog.bin").write_bytes(log)
    parsed = subprocess.run(["tpm2_eventlog", str(work / "eventlog.bin")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, check=True).stdout.decode()
    return len([e for e in parsed.split("- EventNum:")[1:] if "EV_EFI_VARIABLE_AUTHORITY" in e and "PCRIndex: 7" in e])


def test_root_secure_boot_kernel_and_shim_updates(tmp_path, e2e_table):  # noqa: F811
    image, machine = root_machine(tmp_path, secure_boot=True)
    vm = machine.vm
    try:
        with e2e_table.scenario(machine, "root: SB on, kernel update from an RPM, root unlocks"):
            vm.start()
            machine.assert_unlocked("a")
            assert vm.check(["od", "-An", "-tu1", "-j4",
                             "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"]
                            ).stdout.split() == ["1"], "Secure Boot is off"
            assert pcr7_authorities(machine, tmp_path) >= 2, "PCR7 lacks the db authority events of shim and the UKI"
            update_from_rpm_and_reboot(machine, image.guest_rpm("b"), "b")
        with e2e_table.scenario(machine, "root: SB on, shim re-signed by the db key (PCR7 only changes)"):
            before = {i: pcr(machine, i) for i in (4, 7)}
            update_from_rpm_and_reboot(machine, image.guest_shim_rpm("resigned"), "b")
            after = {i: pcr(machine, i) for i in (4, 7)}
            assert after[4] == before[4] and after[7] != before[7], (before, after)
        with e2e_table.scenario(machine, "root: SB on, shim update with a newer SbatLevel"):
            before = {i: pcr(machine, i) for i in (4, 7)}
            update_from_rpm_and_reboot(machine, image.guest_shim_rpm("sbat"), "b")
            after = {i: pcr(machine, i) for i in (4, 7)}
            assert after[4] != before[4], (before, after)
            level = vm.check(["cat", "/sys/firmware/efi/efivars/SbatLevelRT-" + SHIM_LOCK_GUID]).stdout
            assert "2026050100" in level, "shim did not apply its newer SbatLevel: %r" % level
    finally:
        machine.close()


GROW_SERVICE = "rhel-cvm-update-grow-root.service"
GROW_MIB = 256
KEYFILE = "/cc_growpart_keydata"
KEYFILE_SLOT = 5


def root_bytes(machine: Machine) -> int:
    """The root filesystem's size as the kernel reports it (findmnt, bytes)."""
    return int(machine.vm.check(["findmnt", "-b", "-n", "-o", "SIZE", "/"]).stdout)


def test_root_grows_into_an_enlarged_disk_and_retires_the_key_file(tmp_path, e2e_table):  # noqa: F811
    """What Azure does to a CVM image smaller than its disk: cloud-init's key file and its
    keyslot, made at image-encryption time, and a disk enlarged between two boots.  At the next
    boot the grow-root unit grows partition, mapping and ext4 with the TPM token's key, kills
    the key file's keyslot and removes the file; the next boot still unlocks unattended."""
    image, machine = root_machine(tmp_path)
    vm = machine.vm
    try:
        with e2e_table.scenario(machine, "root: grow-root after qemu-img resize, key file gone, unlocks"):
            vm.start()
            machine.assert_unlocked("a")
            # No free space and no key file: the unit's condition skips it.
            grow = machine.unit_state(GROW_SERVICE)
            assert grow["Result"] == "success" and grow["ExecMainStatus"] == "0", grow
            vm.check(["sh", "-c", "head -c 32 /dev/urandom > /run/growpart.key"])
            vm.check(["cryptsetup", "luksAddKey", "--batch-mode", "--key-slot", str(KEYFILE_SLOT),
                      "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", RECOVERY_KEY_FILE,
                      machine.luks_device, "/run/growpart.key"], timeout=300)
            vm.check(["python3", "-c", "import base64, json, sys; key = open('/run/growpart.key', 'rb').read(); "
                      "open(sys.argv[1], 'w').write(json.dumps({'key': base64.b64encode(key).decode(), "
                      "'slot': int(sys.argv[2])}))", KEYFILE, str(KEYFILE_SLOT)])
            vm.check(["sync"])
            before = root_bytes(machine)
            assert str(KEYFILE_SLOT) in machine.luks_keyslots()
            vm.poweroff()
            subprocess.run(["qemu-img", "resize", "-q", str(vm.work / "disk.qcow2"), "+%dM" % GROW_MIB], check=True)
            try:
                vm.start()
            except PassphraseAsked:
                pytest.fail("the root did not unlock on the enlarged disk: %s" % vm.serial_tail())
            machine.assert_unlocked("a")
            grow = machine.unit_state(GROW_SERVICE)
            journal = vm.run(["journalctl", "-b", "-u", GROW_SERVICE, "--no-pager"]).stdout[-3000:]
            assert grow["Result"] == "success" and grow["ExecMainStatus"] == "0", (grow, journal)
            after = root_bytes(machine)
            assert after - before > (GROW_MIB - 8) << 20, (before, after, journal)
            assert vm.run(["test", "-e", KEYFILE]).rc != 0, "%s is still there" % KEYFILE
            assert str(KEYFILE_SLOT) not in machine.luks_keyslots(), machine.luks_keyslots()
            status = machine.status()
            assert status["exit_code"] == 0, status["attention"]
            again = vm.check(["rhel-cvm-update", "grow-root", "--json"]).json()
            assert again["outcome"] == "nothing-to-do", again
            try:
                vm.reboot()
            except PassphraseAsked:
                pytest.fail("the grown root did not unlock at the next boot: %s" % vm.serial_tail())
            machine.assert_unlocked("a")
            assert root_bytes(machine) == after
    finally:
        machine.close()
