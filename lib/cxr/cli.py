"""What every job shares: logging set-up, exit codes (``cxr.errors``), one-line failure messages, argparse types
that check values, and the option groups several jobs have in common."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Callable

# Exit codes of every job (documented in README), and the exceptions that carry them: see cxr.errors.
from .errors import (  # noqa: F401 (the jobs use them as cli.OK, cli.DRIFT, ...)
    BAD_INPUT,
    BAD_MODEL,
    BAD_OUTPUT,
    CHECK_FAILED,
    DRIFT,
    FAILED,
    OK,
    USAGE,
    CheckFailed,
    CxrError,
    JobFailed,
    UsageError,
)


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
    """Call ``main`` and exit with its code; a :class:`~cxr.errors.CxrError` becomes one line on stderr and its
    class's exit code."""
    try:
        code = main()
    except CxrError as exc:  # a failure the user can act on: its class carries the exit code
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception:
        logging.getLogger("cxr").exception("job failed")
        code = FAILED
    sys.exit(code)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with every option's default, ``(default: 8)``, and the description's own line breaks; flags
    (``store_true``) and options without a default (``None``, or an empty list for a repeatable option) print
    none: their help says what happens."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] or action.nargs == 0:
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
        raise argparse.ArgumentTypeError(
            f"must be {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
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


def label_map(text: str) -> dict[str, str]:
    """argparse ``type=``: ``--label-map VALUE=CLASS,...`` (``data.parse_label_map``)."""
    from .data import parse_label_map

    try:
        return parse_label_map(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


LABELLED_DATA_HELP = (
    "a folder or s3:// prefix with {train,test}/{covid,non}/ or {covid,non}/, or a labelled manifest: a .csv or "
    ".parquet table with columns path (or uri; relative to the table) and label, optional patient (the group a "
    "split keeps together) and any other columns (source, view, ...) as metadata"
)


def add_label_map(group) -> None:
    """``--label-map``: how a labelled manifest's ``label`` values map to the classes (every job that reads labelled
    data)."""
    group.add_argument(
        "--label-map",
        type=label_map,
        metavar="VALUE=CLASS,...",
        help="labelled manifests: which label values mean covid and which non, case-insensitive, e.g. "
        "'COVID-19=covid,pneumonia=non,normal=non' (default: covid=covid,non=non); a row with another value or "
        "none is an error (exit 3)",
    )


def add_scoring_resources(p: argparse.ArgumentParser) -> None:
    """The predictor pool's options, shared by the jobs that score an archive (score, nightly), in a group
    'predictor pool'."""
    p = p.add_argument_group("predictor pool")
    p.add_argument("--batch-size", type=positive_int, help="images per model batch (default 32 on CPU, 256 on GPU)")
    p.add_argument(
        "--actors",
        type=positive_int,
        help="maximum predictor actors (default: what fits on the nodes up now, leaving CPU for "
        "decoding; more lets the pool grow as an autoscaling cluster adds nodes)",
    )
    p.add_argument(
        "--cpus-per-actor",
        type=positive_float,
        help="logical CPUs each predictor actor reserves (default on CPU: "
        "the model's share of a node, measured on a sample of the inputs)",
    )
    p.add_argument(
        "--gpus-per-actor",
        type=non_negative_float,
        help="GPUs per predictor actor (default 1 when the cluster has GPUs, else 0)",
    )
    p.add_argument(
        "--threads-per-actor", type=positive_int, help="torch threads per actor (default: ceil(cpus-per-actor))"
    )


# --------------------------------------------------------------------------- shared option groups
# Each option the jobs share is defined here once; each job's --help lists its options by topic
# (argparse argument groups). Defaults of the training and search options come from the config dataclasses
# (cxr.configs), so that the command line and the library cannot disagree.

OVERWRITE_HELP = "delete what the output holds before writing (default: refuse a non-empty output, exit 5)"
MODEL_HELP = "checkpoint directory or s3:// prefix; 'default' = the shipped model"


def add_general_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--verbose``, in a group of its own at the end of --help."""
    group = p.add_argument_group("general")
    group.add_argument("--verbose", action="store_true", help="debug logging")
    return group


def add_output_options(
    p: argparse.ArgumentParser, *, help: str, metavar: str = "DIR", overwrite_help: str | None = OVERWRITE_HELP
) -> argparse._ArgumentGroup:
    """``--output`` (required; ``help`` says what is written there) and ``--overwrite`` (none where
    ``overwrite_help`` is None: a search resumes in its output instead)."""
    group = p.add_argument_group("output")
    group.add_argument("--output", required=True, metavar=metavar, help=help)
    if overwrite_help is not None:
        group.add_argument("--overwrite", action="store_true", help=overwrite_help)
    return group


def add_model_option(group, help: str = MODEL_HELP) -> None:
    """``--model URI`` (default: the shipped model)."""
    group.add_argument("--model", default="default", metavar="URI", help=help)


def add_batch_size(group, *, default: int | None = None, help: str = "images per model batch") -> None:
    """``--batch-size``: one definition; its ``help`` says what a batch is in that job (a model batch when scoring,
    a training step when training)."""
    group.add_argument("--batch-size", type=positive_int, default=default, help=help)


def add_actor_options(group, *, gpus: bool = False) -> None:
    """``--actors`` (and ``--gpus-per-actor``) of the jobs that score through a predictor pool without the full
    set of :func:`add_scoring_resources`."""
    group.add_argument("--actors", type=positive_int, help="maximum predictor actors (default: what fits the cluster)")
    if gpus:
        group.add_argument(
            "--gpus-per-actor",
            type=non_negative_float,
            help="GPUs per predictor actor (default 1 when the cluster has GPUs, else 0)",
        )


def add_training_options(p: argparse.ArgumentParser, config: type, *, what: str) -> dict[str, argparse._ArgumentGroup]:
    """The options train and tune share, in groups 'data', 'preprocessing' and 'training', with the defaults of
    ``config`` (``TrainConfig`` or ``SearchConfig``); ``what`` names what the job trains ("the model", "every
    trial's model"). Returns the groups, for the job's own options."""
    from .configs import default_of
    from .preprocess import TTA_CHOICES

    def default(name):
        return default_of(config, name)

    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        metavar="URI",
        help="labelled images: " + LABELLED_DATA_HELP + " (of a {train,test}/ folder only train/ is used)",
    )
    add_label_map(data)
    data.add_argument(
        "--val-fraction",
        type=val_fraction,
        default=default("val_fraction"),
        help="share of the images (patient-grouped) held out for validation",
    )
    data.add_argument(
        "--balance-by",
        metavar="COLUMN",
        help="a labelled manifest's column (e.g. source): weight the training images so that every value of it "
        "contributes the same share of each class; a value holding one class only gets a tenth of a share (its "
        "images can only teach 'this source means this class')",
    )
    prep = p.add_argument_group("preprocessing (recorded in the checkpoint: scoring does the same)")
    prep.add_argument(
        "--image-size", type=positive_int, default=default("image_size"), help=f"{what}'s input, in pixels (square)"
    )
    prep.add_argument(
        "--crop",
        default="none" if default("crop") is None else ",".join(map(str, default("crop"))),
        metavar="lung|none|T,B,L,R",
        help="keep only this box of each image (fractions top,bottom,left,right) before resizing; 'lung' = "
        "0.10,0.85,0.15,0.85, which cuts away the borders where side markers and text identify the source",
    )
    prep.add_argument(
        "--equalize",
        action="store_true",
        default=default("equalize"),
        help="histogram-equalise each image instead of the percentile contrast stretch "
        "(erases each source's exposure and tone curve)",
    )
    prep.add_argument(
        "--tta",
        choices=TTA_CHOICES,
        default=default("tta"),
        help=f"test-time augmentation of {what}: 'hflip' scores each image and its mirror image and averages the "
        "logits (twice the model's work). Used for validation, the threshold and every later scoring",
    )
    train = p.add_argument_group("training")
    train.add_argument(
        "--oversample",
        type=positive_int,
        default=default("oversample"),
        help="repeat each COVID training image this often, augmented differently",
    )
    add_batch_size(train, default=default("batch_size"), help="images per training step of each worker")
    return {"data": data, "preprocessing": prep, "training": train}


def add_catalog(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Where an Iceberg table's catalog is (jobs that take --table namespace.table): cxr.table.CatalogConfig."""
    group = p.add_argument_group("Iceberg catalog (with --table namespace.table)")
    group.add_argument(
        "--warehouse",
        metavar="URI",
        help="folder or s3:// prefix of the table data; with a folder and no --catalog-uri the catalog is the "
        "SQLite file <warehouse>/catalog.db (nothing to run)",
    )
    group.add_argument(
        "--catalog-uri",
        metavar="URI",
        help="sqlite:////path/catalog.db or a REST catalog's https:// URL (default: <warehouse>/catalog.db; needed "
        "for an s3:// warehouse)",
    )
    group.add_argument(
        "--catalog",
        default="cxr",
        metavar="NAME",
        help="catalog name; without --warehouse/--catalog-uri its settings come from PyIceberg's configuration "
        "(.pyiceberg.yaml, PYICEBERG_CATALOG__<NAME>__*: REST, Glue, ...)",
    )
    return group
