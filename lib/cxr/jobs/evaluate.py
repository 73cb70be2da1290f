"""Evaluate a model on labelled chest X-rays: the classification report, sensitivity and specificity
with 95% confidence intervals, ROC/PR curves, in report.html + report.json.

    python jobs/evaluate.py --data DATA --model default --output reports/test

DATA: {train,test}/{covid,non}/ (--split picks one; default test), {covid,non}/, or a folder that is
itself named covid or non (an external single-class set: sensitivity or false-positive rate only).
"""

from __future__ import annotations

import argparse
import json

from .. import cli


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", action="append", required=True, metavar="URI", help="labelled folder or s3:// prefix; repeatable"
    )
    p.add_argument("--model", default="default", metavar="URI")
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="local directory for report.html, report.json, plots, predictions.parquet",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete what the output holds before writing (default: refuse a non-empty output, exit 5)",
    )
    p.add_argument("--split", default="test", help="train | test | all (ignored for folders without a split level)")
    p.add_argument(
        "--threshold", type=cli.fraction, help="override the model's threshold (default: the one chosen on validation)"
    )
    p.add_argument(
        "--group-by",
        metavar="source|TABLE.csv|REGEX",
        help="also report the rates per subgroup: 'source' (the --data each image came from), a .csv/.tsv with "
        "columns file,group (e.g. the view from a metadata export), or a regular expression searched in each "
        "file name whose first group names the subgroup, e.g. '^(.+?)-patient' for the finding that starts "
        "CheXpert-derived names",
    )
    p.add_argument(
        "--bootstrap", type=cli.non_negative_int, default=1000, help="bootstrap resamples for the AUC intervals"
    )
    p.add_argument("--batch-size", type=cli.positive_int)
    p.add_argument("--actors", type=cli.positive_int)
    p.add_argument("--gpus-per-actor", type=cli.non_negative_float)
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    cli.setup_logging(args.verbose)
    from ..evaluate import evaluate

    result = evaluate(
        args.data,
        args.model,
        args.output,
        split=None if args.split == "all" else args.split,
        threshold=args.threshold,
        n_bootstrap=args.bootstrap,
        group_by=args.group_by,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
    )
    print(result.line())
    for line in result.subgroup_lines():
        print(line)
    r = result.report
    print(
        json.dumps(
            {
                "evaluate": {
                    "n": r["n"],
                    "threshold": r["threshold"],
                    "sensitivity": r["sensitivity"],
                    "specificity": r["specificity"],
                    "roc_auc": r.get("roc_auc"),
                    "errors": result.errors,
                    "not_frontal": result.not_frontal,
                    "report": result.files["report_html"],
                }
            }
        )
    )
    return cli.OK


def run() -> None:
    """The console command ``cxr-evaluate``: ``main`` with the jobs' exit codes."""
    cli.run(main)
