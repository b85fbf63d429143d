"""The one exception family of the library.

Library code raises these; only the CLI layer turns them into a red one-line message and an exit code.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UpcycleError(Exception):
    """A problem the user can act on. The message is one line, phrased for the user."""

    exit_code = 1


class UsageError(UpcycleError):
    """Options that are invalid or contradict each other."""

    exit_code = 2


class InputError(UpcycleError):
    """A missing, unreadable, truncated or otherwise bad input file or folder."""


class UnsupportedError(UpcycleError):
    """An architecture, format or combination this tool does not handle; the message says what would work."""


class OutputError(UpcycleError):
    """The output location cannot be written (exists, not empty, no space, ...)."""


class VerificationError(UpcycleError):
    """A recipe that claims to be function-preserving did not reproduce the parent."""


class TrainingError(UpcycleError):
    """Training had to stop (non-finite loss, nothing to resume, ...)."""
