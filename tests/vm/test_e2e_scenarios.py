"""e2e scenarios of issue 7 in a real VM: OVMF + swtpm + shim + UKI + Debian 12 + systemd 252.

Each machine starts from the cached, freshly enrolled snapshot of the guest image
(tests/vm/guest/).  The product runs as the RPM installs it: rhel-cvm-update.path fires on the
ESP, rhel-cvm-update.service runs `update --settle 10`, rhel-cvm-update-confirm.service runs
`confirm` at every boot.  Every fact is read inside the guest with an outside program
(systemctl, efibootmgr, /proc/cmdline, cryptsetup luksDump) and the product's `status --json`
is checked against them.

5 Secure Boot on.  Scenarios 1 (kernel update), 2 (failed kernel), 3 (power cuts) and 4 (kernel
removal) run on the root guest instead (tests/vm/test_e2e_root.py).  The module prints a table
of scenarios with firmware boots and seconds.
"""

import base64
import subprocess

import pytest

from tests.vm.guest.scenario import (CONFIRM_SERVICE, Machine, e2e_table, staged_uki,  # noqa: F401
                                     entry_for, image_and_snapshot, require_prerequisites)

pytestmark = [pytest.mark.vm, pytest.mark.root]

def csv_names(machine: Machine) -> str:
    """BOOTX64.CSV as text (UCS-2 with BOM), decoded in the guest."""
    return machine.vm.check(["python3", "-c", "print(open('/boot/efi/EFI/redhat/BOOTX64.CSV', 'rb')"
                                              ".read().decode('utf-16'))"]).stdout


def kernel_update(machine: Machine, old: str, new: str) -> str:
    """A kernel update on a running machine booted from ``old``; returns the new UKI's Boot####."""
    old_entry = machine.efibootmgr()["BootCurrent"]
    path = machine.install_uki(new)
    machine.wait_update("the path unit to stage %s" % path, lambda: staged_uki(machine) == path)
    status = machine.status()
    assert status["exit_code"] == 0, status["attention"]
    assert status["next_boot"]["will_unlock"] and status["next_boot"]["uki"].endswith("uki-%s.efi" % new)
    facts = machine.efibootmgr()
    new_entry = entry_for(facts, new)
    assert new_entry is not None, facts
    assert facts["BootNext"] == new_entry and facts["BootCurrent"] == old_entry
    assert facts["BootOrder"][0] == old_entry, "BootOrder changed before the new kernel was confirmed"
    assert len(machine.luks_tokens()) == 2

    machine.vm.reboot()
    machine.assert_unlocked(new)
    facts = machine.efibootmgr()
    assert facts["BootCurrent"] == new_entry and facts.get("BootNext") is None
    confirm = machine.unit_state(CONFIRM_SERVICE)
    assert confirm["Result"] == "success" and confirm["ExecMainStatus"] == "0", confirm
    machine.wait_update_idle()  # confirm's BOOTX64.CSV write starts one update run
    facts = machine.efibootmgr()
    assert facts["BootOrder"][0] == new_entry, facts
    assert "uki-%s.efi" % new in csv_names(machine)
    status = machine.status()
    assert status["exit_code"] == 0, status["attention"]
    assert status["booted"]["uki"].endswith("uki-%s.efi" % new)
    chains = {c["uki"].rsplit("/", 1)[-1]: c["status"] for c in status["chains"]}
    # keep_previous = 1 (the default): the old chain stays as the fallback, its entry and token too.
    assert chains == {"uki-%s.efi" % new: "booted", "uki-%s.efi" % old: "previous"}, chains
    return new_entry


def test_5_secure_boot_kernel_update(tmp_path, e2e_table):  # noqa: F811
    require_prerequisites()
    image, snapshot = image_and_snapshot(secure_boot=True)
    machine = Machine(image, snapshot, tmp_path / "vm")
    try:
        with e2e_table.scenario(machine, "5 kernel update (SB on, own db key)"):
            machine.vm.start()
            machine.assert_unlocked("a")
            log = base64.b64decode(machine.vm.check(
                ["base64", "-w0", "/sys/kernel/security/tpm0/binary_bios_measurements"]).stdout)
            (tmp_path / "eventlog.bin").write_bytes(log)
            parsed = subprocess.run(["tpm2_eventlog", str(tmp_path / "eventlog.bin")], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, check=True).stdout.decode()
            authorities = [e for e in parsed.split("- EventNum:")[1:]
                           if "EV_EFI_VARIABLE_AUTHORITY" in e and "PCRIndex: 7" in e]
            assert len(authorities) >= 2, "PCR7 lacks the db authority events of shim and the UKI"
            kernel_update(machine, "a", "b")
    finally:
        machine.close()
