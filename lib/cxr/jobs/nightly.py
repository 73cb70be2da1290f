"""Nightly incremental scoring: score only new or changed images into a table that grows run after run.

    python jobs/nightly.py --input s3://pacs-export/archive/ --table nightly.scores --warehouse /data/cxr-tables
    python jobs/nightly.py --input s3://pacs-export/archive/ --table nightly.scores --warehouse s3://results/tables \
        --catalog-uri sqlite:////var/lib/cxr/catalog.db

--table namespace.table: an Apache Iceberg table (one current row per image and model, upserted; every run's
snapshots carry its report), committed every --commit-every images; a run that died is resumed by the next one.
--table FOLDER or s3:// prefix: the earlier Parquet table format (_committed.json; migrate it with
jobs/table.py migrate). The run's report is printed.
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
    p.add_argument(
        "--table",
        required=True,
        metavar="NAME|URI",
        help="Iceberg table namespace.table (created if missing); or a folder / s3:// prefix: the earlier Parquet "
        "format",
    )
    cli.add_model_option(p)
    catalog = cli.add_catalog(p)
    catalog.add_argument(
        "--commit-every",
        type=cli.positive_int,
        metavar="N",
        help="images per commit; a killed run scores the one in flight again (default: 1/10 of the run, 1,000 to "
        "20,000)",
    )
    cli.add_scoring_resources(p)
    p.add_argument(
        "--rows-per-file",
        type=cli.positive_int,
        help="folder tables (earlier format): rows per Parquet file, the unit of work a resumed run keeps "
        "(default: ~1/20 of the run)",
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
    from ..table import CatalogConfig, is_identifier, run_nightly

    if is_identifier(args.table):
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
            commit_every=args.commit_every,
            drift_threshold=args.drift_threshold,
            all_views=args.all_views,
        )
        print(report.line())
        print(json.dumps({"report": report.__dict__}))
        return cli.DRIFT if args.fail_on_drift and report.drift else cli.OK
    from ..incremental import run_incremental

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


def run() -> None:
    """The console command ``cxr-nightly``: ``main`` with the jobs' exit codes."""
    cli.run(main)
