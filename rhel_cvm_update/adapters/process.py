"""Running an external tool: one place for the debug line, the timeout and the errors an
admin sees (a missing tool, a tool that hung, a tool that failed with its stderr)."""

import logging
import subprocess
from typing import Optional, Sequence

from rhel_cvm_update.errors import ExternalToolError, MachineError

log = logging.getLogger(__name__)


def run_tool(argv: Sequence[str], *, stdin: Optional[int] = None, input_bytes: Optional[bytes] = None,
             pass_fds: Sequence[int] = (), ok_codes: Sequence[int] = (0,),
             timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``argv`` (no shell) with its output captured; an exit code outside ``ok_codes``
    raises ExternalToolError with the tool's stderr."""
    argv = list(argv)
    log.debug("+ %s", " ".join(argv))
    try:
        result = subprocess.run(argv, stdin=stdin if input_bytes is None else None, input=input_bytes,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=tuple(pass_fds),
                                timeout=timeout)
    except FileNotFoundError:
        raise MachineError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ExternalToolError(argv, -1, f"timed out after {timeout} s") from None
    if result.returncode not in ok_codes:
        raise ExternalToolError(argv, result.returncode, result.stderr.decode("utf-8", "replace"))
    return result
