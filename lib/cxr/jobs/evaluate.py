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
    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="URI",
        help="labelled images; repeatable: " + cli.LABELLED_DATA_HELP,
    )
    cli.add_label_map(data)
    data.add_argument(
        "--split", default="test", help="train | test | all (ignored for manifests and folders without a split level)"
    )
    report = p.add_argument_group("report")
    report.add_argument(
        "--threshold", type=cli.fraction, help="override the model's threshold (default: the one chosen on validation)"
    )
    report.add_argument(
        "--group-by",
        metavar="source|TABLE.csv|REGEX",
        help="also report the rates per subgroup: 'source' (the --data each image came from), a .csv/.tsv with "
        "columns file,group (e.g. the view from a metadata export), or a regular expression searched in each "
        "file name whose first group names the subgroup, e.g. '^(.+?)-patient' for the finding that starts "
        "CheXpert-derived names",
    )
    report.add_argument(
        "--by",
        action="append",
        default=[],
        metavar="COLUMN",
        help="also report n, sensitivity, specificity and ROC AUC (with intervals) per value of this column of a "
        "labelled manifest (source, view, site, ...); repeatable",
    )
    report.add_argument(
        "--bootstrap", type=cli.non_negative_int, default=1000, help="bootstrap resamples for the AUC intervals"
    )
    model = p.add_argument_group("model and resources")
    cli.add_model_option(model)
    cli.add_batch_size(model, help="images per model batch (default 32 on CPU, 256 on GPU)")
    cli.add_actor_options(model, gpus=True)
    cli.add_output_options(p, help="local directory for report.html, report.json, plots, predictions.parquet")
    cli.add_general_options(p)
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
        label_map=args.label_map,
        by=args.by,
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
