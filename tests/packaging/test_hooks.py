"""The hook runner shared by the RPM file triggers, the dnf actions and kernel-install,
and the dnf 4 / dnf 5 action files."""

import shlex
import subprocess
from pathlib import Path
from typing import List

from tests.packaging.hookenv import HOOK, HOOKS, Recorder

INSTALLED_HOOK = "/usr/libexec/rhel-cvm-update/rhel-cvm-update-hook"
# What rpm writes to a %transfiletriggerin's stdin when kernel-uki-virt and shim-x64 are in
# one transaction: every installed path under the trigger prefixes.
TRANSACTION_PATHS = [
    "/usr/lib/modules/5.14.0-999.el9.x86_64/vmlinuz-virt.efi",
    "/usr/lib/modules/5.14.0-999.el9.x86_64/modules.dep",
    "/usr/lib/modules/5.14.0-999.el9.x86_64/kernel/fs/xfs/xfs.ko.xz",
    "/usr/lib/modules/5.14.0-999.el9.x86_64",
    "/boot/efi/EFI/Linux/a.efi",
    "/boot/efi/EFI/Linux/b.efi",
    "/boot/efi/EFI/Linux/c.EFI",
    "/boot/efi/EFI/redhat/shimx64.efi",
    "/boot/efi/EFI/redhat/BOOTX64.CSV",
    "/boot/efi/EFI/redhat/mmx64.efi",
]


def run_hook(recorder: Recorder, args: List[str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([str(HOOK)] + args, input=stdin, env=recorder.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300)


def test_one_update_for_a_transaction_of_many_files(tmp_path):
    recorder = Recorder(tmp_path / "bin")
    result = run_hook(recorder, ["rpm-filetrigger-in", "--paths-from-stdin"], "\n".join(TRANSACTION_PATHS) + "\n")
    assert result.returncode == 0, result.stderr
    assert recorder.calls() == ["update"]
    assert "(rpm-filetrigger-in): 5 boot file(s) changed" in result.stderr
    assert result.stdout == "recorded: update\n"


def test_no_update_without_boot_files(tmp_path):
    recorder = Recorder(tmp_path / "bin")
    modules = [p for p in TRANSACTION_PATHS if p.startswith("/usr/lib/modules") and "vmlinuz" not in p]
    modules += ["/boot/efi/EFI/redhat/BOOTX64.CSV", "/boot/efi/EFI/Linux/notes.txt",
                "/boot/efi/EFI/Linux/sub/dir.efi", "/usr/lib/modules/x/vmlinuz-virt.efi.hmac"]
    result = run_hook(recorder, ["rpm-filetrigger-in", "--paths-from-stdin"], "\n".join(modules) + "\n")
    assert result.returncode == 0
    assert recorder.calls() == []
    assert result.stderr == ""


def test_postun_and_dnf_sources_update_without_a_list(tmp_path):
    recorder = Recorder(tmp_path / "bin")
    for source in ("rpm-filetrigger-postun", "dnf4", "dnf5", "kernel-install"):
        assert run_hook(recorder, [source]).returncode == 0
    assert recorder.calls() == ["update"] * 4


def test_failure_is_reported_with_the_exit_code(tmp_path):
    recorder = Recorder(tmp_path / "bin", exit_code=2)
    result = run_hook(recorder, ["dnf4"])
    assert result.returncode == 2
    assert recorder.calls() == ["update"]
    assert "'rhel-cvm-update update' failed (exit 2)" in result.stderr
    assert result.stdout == "recorded: update\n"


def test_update_output_goes_to_stderr_for_dnf5_only(tmp_path):
    """libdnf5 parses stdout; dnf 4 logs stderr as errors; rpm and kernel-install show both."""
    recorder = Recorder(tmp_path / "bin")
    for source in ("dnf4", "dnf5", "rpm-filetrigger-postun", "kernel-install"):
        result = run_hook(recorder, [source])
        assert result.returncode == 0
        shown = result.stderr if source == "dnf5" else result.stdout
        hidden = result.stdout if source == "dnf5" else result.stderr
        assert shown == "recorded: update\n", source
        assert hidden == "", source


def test_dnf5_reads_only_a_log_line_from_stdout(tmp_path):
    """libdnf5 parses an action's stdout as tmp./conf./var. assignments and log. lines."""
    recorder = Recorder(tmp_path / "bin", exit_code=3)
    result = run_hook(recorder, ["dnf5"])
    assert result.returncode == 3
    assert result.stdout.splitlines() == [
        "log.WARNING=rhel-cvm-update update failed (exit 3): run 'rhel-cvm-update status' before rebooting"]


def test_usage_errors(tmp_path):
    recorder = Recorder(tmp_path / "bin")
    assert run_hook(recorder, []).returncode != 0
    assert run_hook(recorder, ["dnf4", "--bogus"]).returncode == 2
    assert recorder.calls() == []


def _action_lines(path: Path) -> List[str]:
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _dnf5_argv(command: str) -> List[str]:
    """libdnf5 actions: arguments split at spaces, a backslash escapes the next character."""
    argv, current, escaped = [], "", False
    for char in command:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == " ":
            if current:
                argv.append(current)
            current = ""
        else:
            current += char
    if current:
        argv.append(current)
    return argv


def test_dnf5_actions_file_format():
    lines = _action_lines(HOOKS / "dnf" / "rhel-cvm-update.actions")
    commands = set()
    seen = set()
    for line in lines:
        callback, package_filter, direction, options, command = line.split(":", 4)
        assert callback == "post_transaction"
        assert direction in ("in", "out")
        assert sorted(options.split(" ")) == ["enabled=host-only", "raise_error=0"]
        seen.add((package_filter, direction))
        commands.add(command)
    assert {("kernel-uki-virt", "in"), ("kernel-uki-virt", "out"), ("shim-x64", "in")} <= seen
    # One command after substitution (none to substitute): one run per transaction.
    assert len(commands) == 1
    assert _dnf5_argv(commands.pop()) == [INSTALLED_HOOK, "dnf5"]


def test_dnf4_action_file_format():
    lines = _action_lines(HOOKS / "dnf" / "rhel-cvm-update.action")
    seen = set()
    commands = set()
    for line in lines:
        package_filter, state, command = line.split(":", 2)
        assert state in ("in", "out", "any")
        seen.add((package_filter, state))
        commands.add(command)
    assert {("kernel-uki-virt", "in"), ("kernel-uki-virt", "out"), ("shim-x64", "in")} <= seen
    assert len(commands) == 1
    assert "$" not in next(iter(commands))
    assert shlex.split(commands.pop()) == [INSTALLED_HOOK, "dnf4"]
