"""Score chest X-rays (folders, s3:// prefixes, manifests) into a Parquet result table.

python jobs/score.py --input data/ --output out/scores --model default
python jobs/score.py --input data/ --table nightly.scores --warehouse /data/cxr-tables   # into an Iceberg table

With --table namespace.table the rows are upserted into that Iceberg table (one row per image and model, see
docs/tables.md) instead of a new Parquet folder: every input is scored again, in one run id.
"""

from __future__ import annotations

import argparse
import json

from .. import cli


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="URI",
        help="folder (recursive), s3://bucket/prefix, single image, or .parquet/.csv manifest with a 'path' column; "
        "repeatable",
    )
    out = p.add_argument_group("output (one of --output, --table)")
    target = out.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--output", metavar="URI", help="directory or s3:// prefix for the Parquet table (must be empty)"
    )
    target.add_argument(
        "--table", metavar="NAME", help="Iceberg table namespace.table to upsert the rows into (created if missing)"
    )
    out.add_argument("--overwrite", action="store_true", help=cli.OVERWRITE_HELP)
    cli.add_model_option(p)
    cli.add_catalog(p)
    cli.add_scoring_resources(p)
    p.add_argument("--run-id", help="identifier written to every row (default: UTC time + random suffix)")
    p.add_argument(
        "--all-views",
        action="store_true",
        help="also score lateral and oblique DICOM views (ViewPosition LL, RL, ...); by default they are error rows "
        "'not a frontal view': the models read PA/AP chest X-rays",
    )
    cli.add_general_options(p)
    # --- explain post-step (cxr.explain): Grad-CAM heatmaps for the images predicted positive ---
    p.add_argument(
        "--explain-positive",
        action="store_true",
        help="after scoring, write Grad-CAM heatmaps, a gallery and focus scores for the images predicted covid to "
        "OUTPUT/_heatmaps/",
    )
    p.add_argument(
        "--explain-limit",
        type=cli.positive_int,
        metavar="N",
        help="with --explain-positive: only the N most probable positives",
    )
    args = p.parse_args(argv)
    if args.table and (args.explain_positive or args.overwrite):
        p.error("--explain-positive and --overwrite go with --output, not --table")
    return args


def main() -> int:
    args = parse_args()
    cli.setup_logging(args.verbose)
    if args.table:
        from ..table import CatalogConfig, run_nightly

        report = run_nightly(
            args.input,
            args.table,
            args.model,
            catalog=CatalogConfig(args.catalog, args.warehouse, args.catalog_uri),
            batch_size=args.batch_size,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
            threads_per_actor=args.threads_per_actor,
            run_id=args.run_id,
            all_views=args.all_views,
            everything=True,
        )
        print(report.line())
        print(json.dumps({"report": report.__dict__}))
        return cli.OK
    from ..score import score

    summary = score(
        args.input,
        args.output,
        args.model,
        batch_size=args.batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        threads_per_actor=args.threads_per_actor,
        overwrite=args.overwrite,
        run_id=args.run_id,
        all_views=args.all_views,
    )
    print(summary.line())
    print(json.dumps({"summary": summary.__dict__}))
    if args.explain_positive:  # post-step on the finished table; the score output above is already complete
        from ..explain import explain_positives

        explained = explain_positives(
            args.output, args.model, limit=args.explain_limit, batch_size=16, actors=args.actors
        )
        print(explained.line() if explained else "no image predicted covid: no heatmaps")
    return cli.OK


def run() -> None:
    """The console command ``cxr-score``: ``main`` with the jobs' exit codes."""
    cli.run(main)
