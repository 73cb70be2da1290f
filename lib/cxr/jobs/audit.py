"""Shortcut audit of a model: sensitivity and false-positive rate on the internal set versus external
sets (same threshold), the metadata-only baseline, and Grad-CAM focus per set and class, in one report
with a plain-language verdict.

    python jobs/audit.py --model default --internal DATA --external EXT1 --external EXT2 --output reports/audit

Each set is a labelled folder or s3:// prefix ({train,test}/{covid,non}/, {covid,non}/, or a folder
named covid or non). Writes report.html, report.json, rates.png, focus.png, predictions.parquet and
heatmaps/ (a few overlays per set and class). --by COLUMN: evaluate's figures per value of a manifest
column, per set; --source-column COLUMN: how well the model's own embeddings tell the internal set's sources apart.
"""

from __future__ import annotations

import argparse

from .. import cli


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument(
        "--internal",
        required=True,
        metavar="URI",
        help="labelled data like the model's training data (folder or manifest)",
    )
    data.add_argument(
        "--external",
        action="append",
        default=[],
        metavar="URI",
        help="labelled data from elsewhere (folder or manifest); repeatable",
    )
    cli.add_label_map(data)
    data.add_argument("--internal-split", default="test", help="split folder of the internal set: train | test | all")
    data.add_argument(
        "--limit", type=cli.positive_int, help="at most N images per set and class, drawn at random (fixed --seed)"
    )
    data.add_argument("--seed", type=int, default=0, help="seed of the --limit draw")
    data.add_argument(
        "--by",
        action="append",
        metavar="COLUMN",
        help="a labelled manifest's column: n, sensitivity, specificity and ROC AUC per value, per set that has it; "
        "repeatable",
    )
    data.add_argument(
        "--source-column",
        metavar="COLUMN",
        help="the internal manifest's column naming each image's source: how well the model's own embeddings "
        "predict it, over all images and within each class (default: off)",
    )
    report = p.add_argument_group("report")
    report.add_argument(
        "--heatmaps-per-class",
        type=cli.non_negative_int,
        default=2,
        help="overlay PNGs kept per set and class",
    )
    report.add_argument(
        "--bootstrap", type=cli.non_negative_int, default=500, help="bootstrap resamples for the AUC intervals"
    )
    model = p.add_argument_group("model and resources")
    cli.add_model_option(model)
    model.add_argument("--layer", help="module Grad-CAM hooks (default: the backbone's last convolutional block)")
    cli.add_batch_size(model, default=16)
    cli.add_actor_options(model)
    cli.add_output_options(p, help="local directory for the report")
    cli.add_general_options(p)
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    cli.setup_logging(args.verbose)
    from ..audit import audit

    result = audit(
        args.model,
        args.internal,
        args.external,
        args.output,
        internal_split=None if args.internal_split == "all" else args.internal_split,
        limit=args.limit,
        seed=args.seed,
        heatmaps_per_class=args.heatmaps_per_class,
        n_bootstrap=args.bootstrap,
        batch_size=args.batch_size,
        actors=args.actors,
        layer=args.layer,
        overwrite=args.overwrite,
        label_map=args.label_map,
        by=args.by,
        source_column=args.source_column,
    )
    print(result.line())
    for problem in result.report["verdict"]["problems"]:
        print(f"- {problem}")
    if result.report.get("source_control"):
        from ..shortcut import signal_lines

        print("\n".join(signal_lines(result.report["source_control"])))
    for line in result.by_lines():
        print(line)
    return cli.OK


def run() -> None:
    """The console command ``cxr-audit``: ``main`` with the jobs' exit codes."""
    cli.run(main)
