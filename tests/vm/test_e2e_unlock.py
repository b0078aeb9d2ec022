"""e2e: the enrolled guest's unchanged kernel unlocks its LUKS2 volume unattended, and only it.

OVMF + swtpm + Debian's shim + our UKI + Debian 12 with real systemd-cryptsetup 252 (crypttab:
tpm2-device=auto, headless, no key file).  The first boot enrolled the volume with
systemd-cryptenroll to PCRs 4+7 (tests/vm/guest/firstboot.py).  See tests/vm/guest/image.py.
"""

import pytest

from tests.vm.guest.firstboot import CRYPTSETUP_UNIT, DATA_MOUNT_UNIT
from tests.vm.guest.scenario import Machine, e2e_table, image_and_snapshot, require_prerequisites  # noqa: F401

pytestmark = [pytest.mark.vm, pytest.mark.root]


def test_unchanged_kernel_unlocks_and_another_uki_does_not(tmp_path, e2e_table):  # noqa: F811
    require_prerequisites()
    image, snapshot = image_and_snapshot(secure_boot=False)
    machine = Machine(image, snapshot, tmp_path / "vm")
    try:
        with e2e_table.scenario(machine, "unchanged kernel unlocks; other UKI locked out"):
            machine.vm.start()
            machine.assert_unlocked("a")
            facts = machine.efibootmgr()
            assert facts["BootCurrent"] == image.boot_entry["number"]
            tokens = machine.luks_tokens()
            assert [t["tpm2-pcrs"] for t in tokens.values()] == [[4, 7]]

            # Negative control: UKI B booted through a hand-made entry (outside uki_dir, so the
            # product does not react) measures another PCR4: the same token must not unseal.
            vm = machine.vm
            vm.check(["mkdir", "-p", "/boot/efi/EFI/e2e"])
            vm.check(["cp", image.guest_uki("b"), "/boot/efi/EFI/e2e/uki-b.efi"])
            vm.check(["python3", "-c", "import sys; open('/run/optional-data', 'wb').write("
                      "sys.argv[1].encode('utf-16-le') + bytes(2))", "\\EFI\\e2e\\uki-b.efi"])
            made = vm.check(["efibootmgr", "-c", "-d", "/dev/vda", "-p", "1", "-l", "\\EFI\\redhat\\shimx64.efi",
                             "-L", "e2e negative control", "-@", "/run/optional-data"]).stdout
            assert "e2e negative control" in made
            vm.reboot()
            assert machine.booted_uki() == "b"
            assert machine.unit_state(CRYPTSETUP_UNIT)["ActiveState"] != "active"
            assert machine.unit_state(DATA_MOUNT_UNIT)["ActiveState"] != "active"
    finally:
        machine.close()
