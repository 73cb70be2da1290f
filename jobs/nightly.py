"""Nightly incremental scoring: score only new or changed images into a table that grows run after run.

    python jobs/nightly.py --input s3://pacs-export/archive/ --table s3://results/cxr-scores/ --model default

Each run is one partition run_date=YYYY-MM-DD/run_id=... of the table, committed atomically (readers use
cxr.incremental.read_table); a run that died is resumed by the next one. The run's report is printed and
written to <table>/_reports/<run_id>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from cxr import cli


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
    p.add_argument(
        "--table",
        required=True,
        metavar="URI",
        help="directory or s3:// prefix of the incremental table (created if missing)",
    )
    cli.add_model_option(p)
    cli.add_scoring_resources(p)
    p.add_argument(
        "--rows-per-file",
        type=cli.positive_int,
        help="rows per Parquet file, the unit of work a resumed run keeps (default: ~1/20 of the run)",
    )
    p.add_argument(
        "--drift-threshold",
        type=cli.fraction,
        default=0.1,
        help="flag a change of the share predicted positive of at least this much (absolute; also tested for "
        "significance)",
    )
    p.add_argument(
        "--fail-on-drift",
        action="store_true",
        help="exit with code 7 when the drift flag is raised (the run is committed)",
    )
    p.add_argument(
        "--all-views",
        action="store_true",
        help="also score lateral and oblique DICOM views (ViewPosition LL, RL, ...); by default they are error rows "
        "'not a frontal view': the models read PA/AP chest X-rays",
    )
    cli.add_general_options(p)
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    cli.setup_logging(args.verbose)
    from cxr.incremental import run_incremental

    report = run_incremental(
        args.input,
        args.table,
        args.model,
        batch_size=args.batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        threads_per_actor=args.threads_per_actor,
        rows_per_file=args.rows_per_file,
        drift_threshold=args.drift_threshold,
        all_views=args.all_views,
    )
    print(report.line())
    print(json.dumps({"report": report.__dict__}))
    return cli.DRIFT if args.fail_on_drift and report.drift else cli.OK


if __name__ == "__main__":
    cli.run(main)
