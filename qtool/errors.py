"""User-facing failures: one class per thing a user can act on, each with its exit code.

The CLI prints ``error: <message>`` (one line) and exits with ``exit_code``; ``--debug``
shows the traceback. The codes are listed in README.md; keep the two in step.
"""
from __future__ import annotations


class QtoolError(Exception):
    """Base class. ``message`` names the file or argument and what to do next."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadArgument(QtoolError):
    """A command-line argument or option value that cannot be used."""

    exit_code = 2


class NotFound(QtoolError):
    """A file, folder, Hub repo, revision or tensor that does not exist."""

    exit_code = 3


class Unsupported(QtoolError):
    """Valid input that qtool does not handle (architecture, dtype, pickle checkpoint)."""

    exit_code = 4


class CorruptFile(QtoolError):
    """A model file whose bytes do not make sense (bad magic, offsets past the end, ...)."""

    exit_code = 5


class NetworkError(QtoolError):
    """The Hub could not be reached, or offline mode with nothing in the cache."""

    exit_code = 6


class OutputExists(QtoolError):
    """The output path exists and ``--force`` was not given."""

    exit_code = 7


class QualityGateFailed(QtoolError):
    """``--max-ppl-increase`` / ``--max-kld`` exceeded: the run worked, the result is too poor."""

    exit_code = 8


class OutputFailed(QtoolError):
    """Writing the output failed: disk full, read-only filesystem, a parent that is a file, no permission.

    Nothing is left half-written: the staged output is removed before this is reported.
    """

    exit_code = 9


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding like Ctrl-C so staged outputs are removed on the way out (exit 143)."""


# Exit codes that do not come from an exception class (see README.md's table).
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT) before the output was complete: nothing was written."""
EXIT_TERMINATED = 143
"""SIGTERM before the output was complete: nothing was written."""
EXIT_INTERRUPTED_COMPLETE = 10
"""A signal arrived after the output was renamed into place: the output is complete."""

EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (QtoolError, BadArgument, NotFound, Unsupported, CorruptFile, NetworkError,
                OutputExists, QualityGateFailed, OutputFailed)
}
