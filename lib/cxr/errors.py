"""Every job's exit codes, and the exceptions that carry them.

A failure the user can act on (bad input, an unreadable model, an output in the way) is a :class:`CxrError`
whose class names its exit code; ``cli.run`` prints it as one line, ``error: <message>``, and exits with
``exit_code``. Anything else is a bug or a cluster problem: exit 1, traceback in the log.
"""

from __future__ import annotations

# Exit codes of every job (documented in README).
OK = 0
FAILED = 1  # unexpected failure (a bug or a cluster problem): traceback in the log
USAGE = 2  # bad command line (argparse, or a value checked after parsing)
BAD_INPUT = 3  # input missing, empty or unreadable
BAD_MODEL = 4  # model checkpoint missing or unreadable
BAD_OUTPUT = 5  # output exists (without --overwrite) or cannot be written
CHECK_FAILED = 6  # a data check failed (validate --strict: leakage or corrupt files)
DRIFT = 7  # nightly.py --fail-on-drift: the run committed, and its share predicted positive shifted


class CxrError(Exception):
    """A failure reported as one line, ``error: <message>``, and the exit code of its class."""

    exit_code: int = FAILED


class JobFailed(CxrError):
    """The job ran and failed in a way it has explained (e.g. tune: some trials failed)."""

    exit_code = FAILED


class UsageError(CxrError, ValueError):
    """A command-line value rejected after parsing (an unknown backbone, a bad crop box)."""

    exit_code = USAGE


class InputError(CxrError):
    """An input cannot be used (missing, empty, unreadable manifest)."""

    exit_code = BAD_INPUT


class CheckpointError(CxrError):
    """The checkpoint is missing, unreadable or inconsistent."""

    exit_code = BAD_MODEL


class OutputError(CxrError):
    """The output location cannot be used."""

    exit_code = BAD_OUTPUT


class CheckFailed(CxrError):
    """A data check found errors (validate --strict)."""

    exit_code = CHECK_FAILED
