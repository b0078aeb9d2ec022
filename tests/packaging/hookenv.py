"""Run the hooks as their callers do, with a recording `rhel-cvm-update` first on PATH.

The recorder stands in for the tool only where a test is about the hook (how often and
with what it calls `update`, what it does with the exit code); it can pass each call on
to the real tool (``real=True``) so that a sandbox CVM sees the real update.  Other
commands (`config show`) always go to the real tool and are not recorded.
"""

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from tests.packaging.rpmtools import REPO

HOOKS = REPO / "hooks"
HOOK = HOOKS / "rhel-cvm-update-hook"
KERNEL_INSTALL_PLUGIN = HOOKS / "kernel-install" / "95-rhel-cvm-update.install"

# RECORD_EXITS: the exit code of the first, second, ... call (the last one repeats).
RECORDER = """#!/bin/sh
if [ "$1" != update ]; then
    exec "$REAL_PYTHON" -m rhel_cvm_update "$@"
fi
echo "$*" >> "$RECORD_FILE"
if [ -n "${REAL_UPDATE:-}" ]; then
    exec "$REAL_PYTHON" -m rhel_cvm_update "$@"
fi
echo "recorded: $*"
calls=$(wc -l < "$RECORD_FILE")
set -- $RECORD_EXITS
while [ "$calls" -gt 1 ] && [ $# -gt 1 ]; do shift; calls=$((calls - 1)); done
exit "$1"
"""


class Recorder:
    """A directory holding the recording ``rhel-cvm-update`` and the hook runner, as the
    kernel-install plugin finds it on PATH."""

    def __init__(self, directory: Path, exit_code: int = 0, real: bool = False, exit_codes=()):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.record = directory / "calls"
        tool = directory / "rhel-cvm-update"
        tool.write_text(RECORDER)
        tool.chmod(0o755)
        os.symlink(HOOK, directory / "rhel-cvm-update-hook")
        self.exit_codes = list(exit_codes) or [exit_code]
        self.real = real

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = "%s:%s" % (self.directory, env.get("PATH", "/usr/bin:/bin"))
        env["RECORD_FILE"] = str(self.record)
        env["RECORD_EXITS"] = " ".join(str(code) for code in self.exit_codes)
        env["REAL_PYTHON"] = sys.executable
        env["PYTHONPATH"] = str(REPO)
        if self.real:
            env["REAL_UPDATE"] = "1"
        env.update(extra or {})
        return env

    def calls(self) -> List[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []
