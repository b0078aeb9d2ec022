"""dnf 4 runs the packaged post-transaction action once per transaction.

Real dnf 4.14 and its post-transaction-actions plugin (Debian's dnf, dnf-plugins-core)
install stand-in kernel-uki-virt and shim-x64 packages into an installroot.  The plugin
runs commands on the host, so the packaged hook path /usr/libexec/rhel-cvm-update/ is
made to exist through an overlay of the RPM's files on /usr/libexec, inside a private
mount namespace; a recording rhel-cvm-update first on PATH counts the updates.
"""

import os
import shutil
import subprocess

import pytest

from tests.packaging.hookenv import Recorder
from tests.packaging.rpmtools import build_payload_rpm, require, run

# Debian's python3-libdnf is built with a SWIG that no longer emits the flat alias
# ConfigParser_substitute that dnf-plugins-core 4.3.1 calls; restore it to the same
# libdnf function before starting dnf's own main.
DNF_MAIN = ("import sys, libdnf.conf as conf; conf.ConfigParser_substitute = conf.ConfigParser.substitute; "
            "from dnf.cli import main; main.user_main(sys.argv[1:], exit_code=True)")
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.root


@pytest.fixture
def dnf_host(project_rpm, tmp_path):
    require("unshare", "mount")
    if not os.path.exists("/usr/lib/python3/dist-packages/dnf-plugins/post-transaction-actions.py"):
        pytest.skip("dnf-plugins-core (post-transaction-actions) is not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace")
    if shutil.which(SYSTEM_PYTHON) is None:
        pytest.skip("no system python3 for dnf")
    package_root = tmp_path / "package"
    installed = run(["rpm", "-i", "--root", str(package_root), "--dbpath", "/var/lib/rpm", "--nodeps",
                     "--noscripts", str(project_rpm["binary"])])
    assert installed.returncode == 0, installed.stderr
    plugin_conf = tmp_path / "plugin-conf"
    plugin_conf.mkdir()
    (plugin_conf / "post-transaction-actions.conf").write_text(
        "[main]\nenabled=1\nactiondir=%s/\n" % (package_root / "etc/dnf/plugins/post-transaction-actions.d"))
    recorder = Recorder(tmp_path / "bin")
    packages = {
        "kernel": build_payload_rpm(tmp_path / "k", "kernel-uki-virt", {
            "/usr/lib/modules/5.14.0-999.el9.x86_64/vmlinuz-virt.efi": b"uki",
            "/usr/lib/modules/5.14.0-999.el9.x86_64/modules.dep": b""}),
        "shim": build_payload_rpm(tmp_path / "s", "shim-x64", {"/boot/efi/EFI/redhat/shimx64.efi": b"shim"}),
        "other": build_payload_rpm(tmp_path / "o", "unrelated", {"/usr/share/unrelated/file": b""}),
    }

    def dnf(*args: str) -> subprocess.CompletedProcess:
        script = ('mount -t overlay overlay -o "lowerdir=$1:/usr/libexec" /usr/libexec && shift && exec "$@"')
        argv = ["unshare", "-m", "sh", "-c", script, "sh", str(package_root / "usr/libexec"),
                SYSTEM_PYTHON, "-c", DNF_MAIN, "-y", "--installroot", str(tmp_path / "installroot"),
                "--releasever=9", "--setopt=reposdir=%s" % (tmp_path / "no-repos"),
                "--setopt=pluginconfpath=%s" % plugin_conf, "--disableplugin=*",
                "--enableplugin=post-transaction-actions", "--nogpgcheck"] + list(args)
        result = run(argv, env=recorder.env())
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "Traceback" not in result.stderr, result.stderr
        return result

    return dnf, packages, recorder


def test_dnf4_runs_one_update_per_transaction(dnf_host):
    dnf, packages, recorder = dnf_host
    dnf("install", str(packages["kernel"]), str(packages["shim"]))
    assert recorder.calls() == ["update"]
    dnf("install", str(packages["other"]))
    assert recorder.calls() == ["update"]
    dnf("remove", "kernel-uki-virt", "unrelated")
    assert recorder.calls() == ["update", "update"]
