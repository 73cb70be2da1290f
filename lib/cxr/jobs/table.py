"""Look after a nightly Iceberg table: convert a table of the earlier Parquet format, compact and expire, show runs.

    python jobs/table.py migrate --from s3://results/cxr-scores/ --table nightly.scores --warehouse /data/cxr-tables
    python jobs/table.py maintain --table nightly.scores --warehouse /data/cxr-tables --older-than-days 30
    python jobs/table.py runs --table nightly.scores --warehouse /data/cxr-tables

migrate: every committed run of the old table (its _committed.json manifests), oldest first, becomes one snapshot of
the Iceberg table, with the run's id, model and counts in the summary; run again after an interruption, it skips the
runs already there. maintain: rewrites the current rows into few files, expires snapshots older than the given age
(keeping the newest --retain-last), deletes files no snapshot needs (also the orphans a killed or lost write left,
once older than --orphans-older-than-hours), and says what it removed. runs: the run reports.
"""

from __future__ import annotations

import argparse
import json

from .. import cli
from ..configs import MAINTAIN_OLDER_THAN_DAYS, MAINTAIN_RETAIN_LAST, ORPHANS_OLDER_THAN_HOURS


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    migrate = sub.add_parser(
        "migrate",
        help="copy a table of the _committed.json format into the Iceberg table",
        formatter_class=cli.HelpFormatter,
    )
    migrate.add_argument(
        "--from", dest="source", required=True, metavar="URI", help="folder or s3:// prefix of the old table"
    )
    maintain = sub.add_parser(
        "maintain",
        help="compact the current rows, expire old snapshots, delete unreferenced files",
        formatter_class=cli.HelpFormatter,
    )
    maintain.add_argument(
        "--older-than-days",
        type=cli.non_negative_float,
        default=MAINTAIN_OLDER_THAN_DAYS,
        metavar="DAYS",
        help="expire snapshots older than this (time travel reaches back this far)",
    )
    maintain.add_argument(
        "--retain-last",
        type=cli.positive_int,
        default=MAINTAIN_RETAIN_LAST,
        metavar="N",
        help="always keep this many newest snapshots",
    )
    maintain.add_argument("--no-compact", action="store_true", help="only expire snapshots and delete files")
    maintain.add_argument(
        "--orphans-older-than-hours",
        type=cli.non_negative_float,
        default=ORPHANS_OLDER_THAN_HOURS,
        metavar="HOURS",
        help="delete files no snapshot references (left by killed or lost writes) once older than this; younger "
        "ones may belong to a write still in flight",
    )
    maintain.add_argument(
        "--dry-run", action="store_true", help="change nothing: list the orphan files that would be deleted"
    )
    runs = sub.add_parser(
        "runs",
        help="print the reports of the runs the table's snapshots keep (JSON lines)",
        formatter_class=cli.HelpFormatter,
    )
    for s in (migrate, maintain, runs):
        s.add_argument("--table", required=True, metavar="NAME", help="Iceberg table namespace.table")
        cli.add_catalog(s)
        cli.add_general_options(s)
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    cli.setup_logging(args.verbose)
    from .. import table

    catalog = table.CatalogConfig(args.catalog, args.warehouse, args.catalog_uri)
    if args.command == "migrate":
        done = table.migrate(args.source, args.table, catalog)
        for run in done:
            print(f"run {run['run_id']}: " + ("already migrated, skipped" if run["skipped"] else f"{run['rows']} rows"))
        print(json.dumps({"migrated": done}))
    elif args.command == "maintain":
        report = table.maintain(
            args.table,
            catalog,
            older_than_days=args.older_than_days,
            retain_last=args.retain_last,
            compact=not args.no_compact,
            orphans_older_than_hours=args.orphans_older_than_hours,
            dry_run=args.dry_run,
        )
        for uri in report.orphans if args.dry_run else ():
            print(f"orphan: {uri}")
        print(report.line())
        print(report.orphans_line())
        listed = report.__dict__ if args.dry_run else {k: v for k, v in report.__dict__.items() if k != "orphans"}
        print(json.dumps({"maintenance": listed}))
    else:
        for report in table.run_reports(table.open_table(args.table, catalog, create=False)):
            print(json.dumps(report))
    return cli.OK


def run() -> None:
    """The console command ``cxr-table``: ``main`` with the jobs' exit codes."""
    cli.run(main)
