"""Validate a labelled chest X-ray dataset: integrity, duplicates and leakage, class balance, and a
metadata-only baseline (can file properties alone predict the label?).

    python jobs/validate.py --data DATA --output reports/validation [--strict]

DATA: a folder or s3:// prefix laid out as {train,test}/{covid,non}/ or {covid,non}/ (every split
present is checked). Writes validation.json, report.html, plots and files.parquet (one row per file).
--strict: exit 6 when corrupt files, leakage (duplicates or patients across splits) or label
conflicts are found (a CI gate on data). --source-column COLUMN (a labelled manifest's column): how well
file properties and image thumbnails tell the sources apart, and whether the source goes with the label.
"""

from __future__ import annotations

import argparse

from .. import cli


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="URI", help="labelled images: " + cli.LABELLED_DATA_HELP)
    cli.add_label_map(data)
    checks = p.add_argument_group("checks")
    checks.add_argument(
        "--strict",
        action="store_true",
        help="exit 6 when error findings (corrupt files, leakage, label conflicts) exist",
    )
    checks.add_argument(
        "--near-distance",
        type=cli.int_in(0, 32),
        default=4,
        help="hash bits (of 64, perceptual and difference hash) within which two images are near duplicates",
    )
    checks.add_argument(
        "--min-side", type=cli.positive_int, default=128, help="images with a shorter side are flagged as tiny"
    )
    checks.add_argument(
        "--max-pixels", type=cli.positive_int, default=40_000_000, help="images with more pixels are flagged as huge"
    )
    checks.add_argument(
        "--source-column",
        metavar="COLUMN",
        help="a labelled manifest's column naming each image's source (hospital, archive): report how well file "
        "properties and image thumbnails predict it, over all images and within each class (default: off)",
    )
    checks.add_argument("--seed", type=int, default=0, help="seed of the metadata baseline's cross-validation")
    cli.add_output_options(p, help="local directory for validation.json, report.html, plots")
    cli.add_general_options(p)
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    cli.setup_logging(args.verbose)
    from ..validate import validate

    result = validate(
        args.data,
        args.output,
        near_distance=args.near_distance,
        min_side=args.min_side,
        max_pixels=args.max_pixels,
        seed=args.seed,
        overwrite=args.overwrite,
        label_map=args.label_map,
        source_column=args.source_column,
    )
    print(result.line())
    if result.summary.get("source_control"):
        from ..shortcut import signal_lines

        print("\n".join(signal_lines(result.summary["source_control"])))
    for f in result.findings:
        print(f"{f.severity}: {f.check}: {f.message}")
    if args.strict and result.errors:
        raise cli.CheckFailed(f"--strict: {len(result.errors)} error finding(s)")
    return cli.OK


def run() -> None:
    """The console command ``cxr-validate``: ``main`` with the jobs' exit codes."""
    cli.run(main)
