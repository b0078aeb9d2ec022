"""The units in systemd/ as systemd 252 itself reads them: `systemd-analyze verify` in a
scratch root (the host's unit tree, our units, an executable /usr/bin/rhel-cvm-update and
the man page), and `systemd-analyze security --offline=yes` exposure <= 4.0."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS_DIR = REPO / "systemd"
UNITS = ("rhel-cvm-update.path", "rhel-cvm-update.service", "rhel-cvm-update-confirm.service",
         "rhel-cvm-update-grow-root.service")
SERVICES = ("rhel-cvm-update.service", "rhel-cvm-update-confirm.service", "rhel-cvm-update-grow-root.service")
HOST_UNITS = Path("/lib/systemd/system")
MAX_EXPOSURE = 4.0


def _analyze():
    if shutil.which("systemd-analyze") is None or not HOST_UNITS.is_dir():
        pytest.skip("systemd-analyze or the host's unit directory is not available")
    return "systemd-analyze"


def scratch_root(tmp_path: Path, units=None) -> Path:
    """A root where the units' ExecStart= binary exists (the console script of this
    checkout's venv) beside the host's own units (sysinit.target, ...)."""
    root = tmp_path / "root"
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree(HOST_UNITS, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    system = root / "etc" / "systemd" / "system"
    system.mkdir(parents=True)
    for name, text in (units or {n: (UNITS_DIR / n).read_text() for n in UNITS}).items():
        (system / name).write_text(text)
    (root / "usr" / "bin").mkdir(parents=True)
    script = Path(sys.executable).parent / "rhel-cvm-update"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    shutil.copy2(script, root / "usr" / "bin" / "rhel-cvm-update")
    man = root / "usr" / "share" / "man" / "man8"
    man.mkdir(parents=True)
    shutil.copy2(REPO / "man" / "rhel-cvm-update.8", man)
    return root


def verify(root: Path, names) -> subprocess.CompletedProcess:
    # --root makes ExecStart= and the unit search path resolve inside the scratch root;
    # MANPATH lets Documentation=man:rhel-cvm-update(8) be checked against our page.
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MANPATH": str(root / "usr" / "share" / "man")}
    return subprocess.run([_analyze(), "verify", f"--root={root}", *names], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=env, timeout=120)


def test_units_verify_cleanly(tmp_path):
    result = verify(scratch_root(tmp_path), UNITS)
    assert result.returncode == 0 and result.stdout.decode() == "", result.stdout.decode()


@pytest.mark.parametrize("broken,expected", [
    (("rhel-cvm-update.path", "PathChanged=/boot/efi/EFI/Linux", "PathChangd=/boot/efi/EFI/Linux"),
     "Unknown key 'PathChangd'"),
    (("rhel-cvm-update.service", "ExecStart=/usr/bin/rhel-cvm-update", "ExecStart=/usr/bin/rhel-cvm-updat"),
     "is not executable"),
])
def test_verify_catches_a_broken_unit(tmp_path, broken, expected):
    """The check above can fail: one typo in a copy of our units is reported."""
    name, old, new = broken
    units = {n: (UNITS_DIR / n).read_text() for n in UNITS}
    assert old in units[name]
    units[name] = units[name].replace(old, new)
    result = verify(scratch_root(tmp_path, units), UNITS)
    assert expected in result.stdout.decode()


def exposure(unit_path: Path) -> float:
    result = subprocess.run([_analyze(), "security", "--offline=yes", "--no-pager", str(unit_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    text = result.stdout.decode()
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) ", text)
    if match is None:
        pytest.skip("this systemd-analyze has no offline security review: " + text[-300:])
    return float(match.group(1))


@pytest.mark.parametrize("name", SERVICES)
def test_service_exposure_is_at_most_4(name, tmp_path):
    unit = tmp_path / name
    unit.write_text((UNITS_DIR / name).read_text())
    assert exposure(unit) <= MAX_EXPOSURE


def test_exposure_check_sees_a_weaker_unit(tmp_path):
    """Without the sandbox lines the same service is rated far above 4.0."""
    text = (UNITS_DIR / "rhel-cvm-update.service").read_text()
    kept = [line for line in text.splitlines()
            if not re.match(r"(Protect|Private|Restrict|Capability|SystemCall|Device|ReadWrite|NoNew|Lock|"
                            r"Remove|Keyring|IPAddress|SecureBits|UMask)", line)]
    unit = tmp_path / "weak.service"
    unit.write_text("\n".join(kept) + "\n")
    assert exposure(unit) > 8.0


def test_service_reads_exactly_the_documented_exposure(tmp_path):
    """The comment in the unit quotes the score; keep it true."""
    text = (UNITS_DIR / "rhel-cvm-update.service").read_text()
    quoted = re.search(r"rates it (\d+\.\d+)", text)
    unit = tmp_path / "rhel-cvm-update.service"
    unit.write_text(text)
    assert quoted and float(quoted.group(1)) == exposure(unit)


def test_path_unit_watches_uki_and_shim_directories_with_a_trigger_limit():
    text = (UNITS_DIR / "rhel-cvm-update.path").read_text()
    watched = re.findall(r"^PathChanged=(\S+)$", text, re.M)
    assert watched == ["/boot/efi/EFI/Linux", "/boot/efi/EFI/redhat"]
    assert re.search(r"^TriggerLimitBurst=\d+$", text, re.M) and re.search(r"^TriggerLimitIntervalSec=", text, re.M)
    service = (UNITS_DIR / "rhel-cvm-update.service").read_text()
    assert re.search(r"^StartLimitIntervalSec=0$", service, re.M)
    assert re.search(r"^ExecStart=/usr/bin/rhel-cvm-update update --settle 10$", service, re.M)
    assert re.search(r"^Type=notify$", service, re.M)


def test_confirm_unit_has_the_same_sandbox_as_the_update_service():
    def sandbox_lines(name):
        text = (UNITS_DIR / name).read_text()
        service = text[text.index("StateDirectory="):]
        return service.split("\n[Install]")[0].strip().splitlines()
    assert sandbox_lines("rhel-cvm-update-confirm.service") == sandbox_lines("rhel-cvm-update.service")


def test_grow_root_unit_runs_early_only_when_there_is_work():
    text = (UNITS_DIR / "rhel-cvm-update-grow-root.service").read_text()
    assert re.search(r"^ExecCondition=/usr/bin/rhel-cvm-update grow-root --check$", text, re.M)
    assert re.search(r"^ExecStart=/usr/bin/rhel-cvm-update grow-root$", text, re.M)
    assert re.search(r"^Before=.*\bcloud-init\.service\b", text, re.M)
    assert re.search(r"^DefaultDependencies=no$", text, re.M) and re.search(r"^Conflicts=shutdown.target$", text, re.M)
