"""What every job in ``jobs/`` shares: logging set-up, exit codes, and one-line failure messages."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
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
        code = next(c for t, c in codes.items() if isinstance(exc, t))  # subclasses too (table.ConcurrentRunError)
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


# --------------------------------------------------------------------------- command line


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the jobs' error format: one line ``error: --batch-size must be at least 1`` on stderr, exit 2,
    before anything (Ray, the model) starts."""

    def error(self, message: str):  # type: ignore[override]
        message = re.sub(r"^argument (\S+): ", r"\1 ", message)
        self.exit(USAGE, f"error: {message}\n")


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse ``type=``: an integer >= ``low``."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value

    return parse


def int_in(low: int, high: int) -> Callable[[str], int]:
    """argparse ``type=``: an integer in ``low..high``."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """argparse ``type=``: a number > 0."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def non_negative_float(text: str) -> float:
    """argparse ``type=``: a number >= 0."""
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


def fraction(text: str) -> float:
    """argparse ``type=``: a number in [0, 1] (a probability, a threshold, a share)."""
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def val_fraction(text: str) -> float:
    """argparse ``type=``: the share held out for validation, in (0, 0.5] (``data.split_train_val``'s bound)."""
    from .data import MAX_VAL_FRACTION

    value = _number(float, text)
    if not 0 < value <= MAX_VAL_FRACTION:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most {MAX_VAL_FRACTION}")
    return value


def add_scoring_resources(p: argparse.ArgumentParser) -> None:
    """The predictor pool's options, shared by the jobs that score an archive (score, nightly)."""
    p.add_argument("--batch-size", type=positive_int, help="images per model batch (default 32 on CPU, 256 on GPU)")
    p.add_argument("--actors", type=positive_int, help="maximum predictor actors (default: what fits on the nodes up now, leaving CPU for "
                   "decoding; more lets the pool grow as an autoscaling cluster adds nodes)")
    p.add_argument("--cpus-per-actor", type=positive_float, help="logical CPUs each predictor actor reserves (default on CPU: "
                   "the model's share of a node, measured on a sample of the inputs)")
    p.add_argument("--gpus-per-actor", type=non_negative_float, help="GPUs per predictor actor (default 1 when the cluster has GPUs, else 0)")
    p.add_argument("--threads-per-actor", type=positive_int, help="torch threads per actor (default: ceil(cpus-per-actor))")


def add_catalog(p: argparse.ArgumentParser) -> None:
    """Where an Iceberg table's catalog is (jobs that take --table namespace.table): cxr.table.CatalogConfig."""
    p.add_argument("--warehouse", metavar="URI", help="Iceberg: folder or s3:// prefix of the table data; with a folder and no "
                   "--catalog-uri the catalog is the SQLite file <warehouse>/catalog.db (nothing to run)")
    p.add_argument("--catalog-uri", metavar="URI", help="Iceberg: sqlite:////path/catalog.db or a REST catalog's https:// URL "
                   "(default: <warehouse>/catalog.db; needed for an s3:// warehouse)")
    p.add_argument("--catalog", default="cxr", metavar="NAME", help="Iceberg: catalog name; without --warehouse/--catalog-uri "
                   "its settings come from PyIceberg's configuration (.pyiceberg.yaml, PYICEBERG_CATALOG__<NAME>__*: REST, Glue, ...)")
