"""The hooks drive the real update transaction on the sandbox CVM (tests/sandbox.py: real
shim and UKIs, captured efivars and event log, swtpm, a systemd-cryptenroll'd LUKS2 image).
A recording `rhel-cvm-update` first on PATH passes every call on to the real tool and
counts them."""

import fcntl
import os
import subprocess
import threading
import time

import pytest

from rhel_cvm_update.journal import Journal
from tests.packaging.hookenv import HOOK, KERNEL_INSTALL_PLUGIN, Recorder
from tests.packaging.test_hooks import TRANSACTION_PATHS
from tests.sandbox import read_u16_var, sandbox  # noqa: F401  (fixture)

pytestmark = [pytest.mark.swtpm, pytest.mark.root]


def hook_env(cvm, recorder):
    return recorder.env({"RHEL_CVM_UPDATE_CONFIG": str(cvm.config_path)})


def keyslots(cvm):
    return sorted(int(k) for k in cvm.luks_json()["keyslots"])


def test_rpm_trigger_runs_one_transaction_for_five_boot_files(sandbox, tmp_path):
    cvm = sandbox
    recorder = Recorder(tmp_path / "bin", real=True)
    slots_before = keyslots(cvm)
    cvm.install_uki("b")
    result = subprocess.run([str(HOOK), "rpm-filetrigger-in", "--paths-from-stdin"],
                            input="\n".join(TRANSACTION_PATHS) + "\n", env=hook_env(cvm, recorder),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert recorder.calls() == ["update"]
    assert "update: staged" in result.stdout
    # One new keyslot + token and a trial boot of B; the running boot A's token untouched.
    assert len(keyslots(cvm)) == len(slots_before) + 1
    staged = read_u16_var(cvm.efivars, "BootNext")
    assert staged is not None
    assert read_u16_var(cvm.efivars, "BootOrder")[0] == 0x0007
    # The postun trigger of the same transaction finds nothing left to do.
    again = subprocess.run([str(HOOK), "rpm-filetrigger-postun"], env=hook_env(cvm, recorder),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "update: nothing-to-do" in again.stdout
    assert len(keyslots(cvm)) == len(slots_before) + 1
    assert read_u16_var(cvm.efivars, "BootNext") == staged


def test_trigger_waits_for_the_path_units_transaction(sandbox, tmp_path):
    """While another transaction holds state_dir's flock (as the path unit's would), the
    trigger's update waits, then runs once and stages the new UKI."""
    cvm = sandbox
    recorder = Recorder(tmp_path / "bin", real=True)
    cvm.install_uki("b")
    lock_fd = os.open(os.path.join(str(cvm.state_dir), "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    hold_seconds = 3.0
    releaser = threading.Timer(hold_seconds, lambda: os.close(lock_fd))
    start = time.monotonic()
    releaser.start()
    try:
        result = subprocess.run([str(HOOK), "dnf4"], env=hook_env(cvm, recorder), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, timeout=600)
    finally:
        releaser.join()
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start >= hold_seconds
    assert recorder.calls() == ["update"]
    assert read_u16_var(cvm.efivars, "BootNext") is not None


def test_kernel_install_add_then_remove_on_the_sandbox(sandbox, tmp_path):
    """kernel-install add of two kernels (layout uki, BOOT_ROOT = the sandbox ESP) places
    each in uki_dir and seals it, the newer one staged; remove of the older one deletes
    its UKI and the update drops its token and keyslot."""
    cvm = sandbox
    recorder = Recorder(tmp_path / "bin", real=True)
    images = {}
    for name, kver in (("b", "6.1.0-98-cloud-amd64"), ("v1", "6.1.0-99-cloud-amd64")):
        images[kver] = tmp_path / ("vmlinuz-virt-%s.efi" % name)
        images[kver].write_bytes(cvm.install_uki(name).read_bytes())
        cvm.remove_uki(name)
    token = "0123456789abcdef0123456789abcdef"
    env = hook_env(cvm, recorder)
    env.update({"KERNEL_INSTALL_LAYOUT": "uki", "KERNEL_INSTALL_BOOT_ROOT": str(cvm.esp),
                "KERNEL_INSTALL_ENTRY_TOKEN": token, "KERNEL_INSTALL_MACHINE_ID": token,
                "KERNEL_INSTALL_VERBOSE": "1"})

    def plugin(*args):
        result = subprocess.run([str(KERNEL_INSTALL_PLUGIN)] + list(args), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    slots_before = keyslots(cvm)
    for kver, image in images.items():
        plugin("add", kver, str(cvm.esp / token / kver), str(image))
        placed = cvm.uki_dir / ("%s-%s.efi" % (token, kver))
        assert placed.read_bytes() == image.read_bytes()
    assert len(keyslots(cvm)) == len(slots_before) + 2
    assert read_u16_var(cvm.efivars, "BootNext") is not None

    older = "6.1.0-98-cloud-amd64"
    removed = plugin("remove", older, str(cvm.esp / token / older))
    assert not (cvm.uki_dir / ("%s-%s.efi" % (token, older))).exists()
    assert "update: removed" in removed.stdout
    assert len(keyslots(cvm)) == len(slots_before) + 1
    chains = Journal(str(cvm.state_dir)).chains.values()
    assert not any((c.uki or "").endswith("-%s.efi" % older) and c.status != "retired" for c in chains)
    assert recorder.calls() == ["update"] * 3
