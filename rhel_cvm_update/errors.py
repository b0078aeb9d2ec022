"""The one exception hierarchy of rhel-cvm-update.

Every error the tool raises on purpose derives from CvmUpdateError.  The CLI maps
``exit_code`` to the process exit status (documented in rhel-cvm-update(8)):
2 for bad input or a refused operation, 3 for a failure of the machine (TPM,
cryptsetup, efivarfs), 4 when another transaction holds the lock.
"""

from typing import Optional, Sequence


class CvmUpdateError(Exception):
    """Base class.  ``kind`` is a stable slug used in logs and JSON output."""

    kind = "error"
    exit_code = 2


class ConfigError(CvmUpdateError):
    """The configuration file or a command-line option is wrong."""

    kind = "config"


class FormatError(CvmUpdateError):
    """Bytes that do not parse: names the source, the offset and the field."""

    kind = "format"

    def __init__(self, message: str, *, source: str = "<bytes>", offset: Optional[int] = None,
                 field: Optional[str] = None):
        self.source = source
        self.offset = offset
        self.field = field
        where = source if offset is None else f"{source} at offset {offset:#x}"
        what = f"{field}: " if field else ""
        super().__init__(f"{where}: {what}{message}")


class UnsupportedError(CvmUpdateError):
    """A well-formed input that this tool does not know how to handle safely."""

    kind = "unsupported"


class PredictionError(CvmUpdateError):
    """No trustworthy prediction: the log or model cannot explain the live PCRs."""

    kind = "prediction"

    def __init__(self, message: str, *, details: Sequence[str] = ()):
        self.details = list(details)
        text = message if not self.details else message + "\n  " + "\n  ".join(self.details)
        super().__init__(text)


class SourcesDisagreeError(PredictionError):
    """The event log and the boot model both reproduce this boot but predict different
    values for the next one: nothing is sealed (one of them is wrong)."""

    kind = "sources-disagree"


class MachineError(CvmUpdateError):
    """The TPM, efivarfs, the ESP or the LUKS header refused an operation."""

    kind = "machine"
    exit_code = 3


class ExternalToolError(MachineError):
    """An external program (cryptsetup, ...) failed.  Never carries secrets in argv."""

    kind = "external-tool"

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(self.argv)} exited {returncode}: {stderr.strip()}")


class TransactionError(CvmUpdateError):
    """The update transaction cannot proceed (journal damaged, lock held, ...)."""

    kind = "transaction"
    exit_code = 4
