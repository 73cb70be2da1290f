"""What every job in ``jobs/`` shares: logging set-up, exit codes, and one-line failure messages."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

# Exit codes of every job (documented in README).
OK = 0
FAILED = 1  # unexpected failure (a bug or a cluster problem): traceback in the log
USAGE = 2  # bad command line (argparse)
BAD_INPUT = 3  # input missing, empty or unreadable
BAD_MODEL = 4  # model checkpoint missing or unreadable
BAD_OUTPUT = 5  # output exists (without --overwrite) or cannot be written
CHECK_FAILED = 6  # a data check failed (validate --strict: leakage or corrupt files)
DRIFT = 7  # nightly.py --fail-on-drift: the run committed, and its share predicted positive shifted


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def run(main: Callable[[], int]) -> None:
    """Call ``main`` and exit with its code; known failures become one line on stderr."""
    from .checkpoint import CheckpointError
    from .explain import LayerError
    from .score import OutputError
    from .sources import InputError

    codes = {LayerError: USAGE, InputError: BAD_INPUT, CheckpointError: BAD_MODEL, OutputError: BAD_OUTPUT}
    try:
        code = main()
    except tuple(codes) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = codes[type(exc)]
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception:  # noqa: BLE001
        logging.getLogger("cxr").exception("job failed")
        code = FAILED
    sys.exit(code)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with every option's default, ``(default: 8)``, and the description's own line breaks; flags
    (``store_true``) and options without a default (``None``) print none: their help says what happens."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)
