"""What a kernel-update transaction pays for rhel-cvm-update's hooks.

rpm hands the %transfiletriggerin the path of every file under /usr/lib/modules in the
transaction (a RHEL kernel has about 6000); the hook filters them in the shell and runs
the update only for a UKI, a shim or vmlinuz-virt.efi.  The RPM trigger, the dnf action
and the path unit may each run `update` for one transaction: the first does the work, the
others find nothing to do.  Measured here:

* the filter alone, 6000 module paths without a boot file (the tool stands in as `true`);
* the hook running the real `update` on a sandbox CVM (tests/sandbox.py) that stages UKI B
  (predict, seal a keyslot + token with cryptsetup and swtpm, write the Boot entry), once;
* the same hook again with nothing left to do, what every redundant run costs.

Run: ``python -m benchmarks.hooks``.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
HOOK = REPO / "hooks" / "rhel-cvm-update-hook"
MODULE_PATHS = ["/usr/lib/modules/5.14.0-999.el9.x86_64/kernel/drivers/m%05d.ko.xz" % i for i in range(6000)]
BOOT_PATHS = ["/usr/lib/modules/5.14.0-999.el9.x86_64/vmlinuz-virt.efi", "/boot/efi/EFI/Linux/b.efi"]
REPEATS = 5


def _run_hook(stdin: str, env: Dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run([str(HOOK), "rpm-filetrigger-in", "--paths-from-stdin"], input=stdin, text=True,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"hook exited {result.returncode}: {result.stderr}")
    return elapsed


def _report(label: str, seconds: List[float]) -> None:
    print(f"{label}: median {statistics.median(seconds) * 1000:.1f} ms, min {min(seconds) * 1000:.1f} ms "
          f"({len(seconds)} runs)")


def main() -> int:
    from tests.sandbox import SandboxUnavailable, sandbox_cvm

    work = Path(tempfile.mkdtemp(prefix="bench-hooks-"))
    try:
        stand_in = work / "bin"
        stand_in.mkdir()
        os.symlink(shutil.which("true"), stand_in / "rhel-cvm-update")
        env = dict(os.environ, PATH=f"{stand_in}:{os.environ['PATH']}")
        stdin = "\n".join(MODULE_PATHS) + "\n"
        _report("filter, 6000 module paths, no boot file", [_run_hook(stdin, env) for _ in range(REPEATS)])

        tool = work / "tool"
        tool.mkdir()
        (tool / "rhel-cvm-update").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m rhel_cvm_update "$@"\n')
        (tool / "rhel-cvm-update").chmod(0o755)
        try:
            with sandbox_cvm(work / "cvm") as cvm:
                env = dict(os.environ, PATH=f"{tool}:{os.environ['PATH']}", PYTHONPATH=str(REPO),
                           RHEL_CVM_UPDATE_CONFIG=str(cvm.config_path))
                cvm.install_uki("b")
                stdin = "\n".join(MODULE_PATHS + BOOT_PATHS) + "\n"
                _report("real update staging UKI B (sandbox CVM)", [_run_hook(stdin, env)])
                _report("real update, nothing left to do", [_run_hook(stdin, env) for _ in range(REPEATS)])
        except SandboxUnavailable as e:
            print(f"sandbox part skipped: {e}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
