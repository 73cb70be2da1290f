"""The nightly result table as an Iceberg table (cxr.table, jobs/nightly.py --table ns.table), read back by PyIceberg
and Polars directly: the project's own readers are not used to check what the table holds."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
from pyiceberg.catalog.sql import SqlCatalog

from cxr.checkpoint import load_checkpoint
from cxr.output import OutputError
from cxr.table import CatalogConfig, iceberg_schema, is_identifier, maintain, open_table, run_nightly
from support.images import png_bytes, xray_like
from support.jobs import run_job

pytestmark = pytest.mark.timeout(400)


def write_images(root: Path, names, seed: int = 0) -> None:
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(xray_like(40, 40, seed=seed * 1000 + i, blob=i % 2 == 0)))


def iceberg_table(warehouse: Path, identifier: str = "nightly.scores"):
    """The table as any PyIceberg user opens it: the SQLite catalog (named cxr) beside the warehouse."""
    catalog = SqlCatalog("cxr", uri=f"sqlite:///{warehouse}/catalog.db", warehouse=f"file://{warehouse}")
    return catalog.load_table(identifier)


def summaries(tbl) -> list[dict]:
    snaps = sorted(tbl.snapshots(), key=lambda s: s.sequence_number)
    return [{"id": s.snapshot_id, "parent": s.parent_snapshot_id, **s.summary.additional_properties} for s in snaps]


def assert_one_row_per_image(rows: pa.Table, expected: set[str], model_id: str) -> None:
    paths = rows["path"].to_pylist()
    assert len(paths) == len(set(paths)), "duplicate rows"
    assert set(paths) == expected
    assert set(rows["model"].to_pylist()) == {model_id}


def test_nightly_runs_upsert_into_an_iceberg_table_read_by_pyiceberg_and_polars(ray_driver, tiny_model, tmp_path):
    import polars as pl

    images, warehouse = tmp_path / "archive", tmp_path / "warehouse"
    catalog = CatalogConfig(warehouse=str(warehouse))
    model_id = load_checkpoint(tiny_model).info.model_id
    write_images(images, [f"day1/{i:02d}.png" for i in range(10)])
    (images / "day1" / "broken.png").write_bytes(b"not a png")

    first = run_nightly([str(images)], "nightly.scores", tiny_model, catalog=catalog, batch_size=4, commit_every=4)
    assert (first.inputs, first.new, first.scored, first.errors, first.resumed) == (11, 11, 11, 1, False)
    tbl = iceberg_table(warehouse)
    day1 = tbl.scan().to_arrow()
    assert_one_row_per_image(day1, {str(p) for p in images.rglob("*.png")}, model_id)
    assert set(day1["run_id"].to_pylist()) == {first.run_id} and set(day1["run_date"].to_pylist()) == {first.run_date}
    # committed in chunks of >= 4 images, each a snapshot carrying the run's properties; the last one the report
    runs = summaries(tbl)
    assert len(runs) >= 2 and all(s["cxr.run-id"] == first.run_id and s["cxr.model"] == model_id for s in runs)
    assert [s["cxr.run-complete"] for s in runs] == ["false"] * (len(runs) - 1) + ["true"]
    assert sum(int(s["cxr.rows"]) for s in runs) == 11 and all(int(s["cxr.rows"]) >= 4 for s in runs[:-1])
    report = json.loads(runs[-1]["cxr.report"])
    assert report["scored"] == 11 and report["errors"] == 1 and report["drift"] is False
    first_snapshot = runs[-1]["id"]

    # night 2: two new images, one replaced by new content, one only touched
    write_images(images, ["day2/a.png", "day2/b.png"], seed=7)
    write_images(images, ["day1/03.png"], seed=99)
    os.utime(images / "day1" / "05.png", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    # ... through the job (jobs/nightly.py), as a user runs it: it upserts into the same table and prints its report
    job = run_job(
        "nightly.py",
        "--input",
        str(images),
        "--table",
        "nightly.scores",
        "--warehouse",
        str(warehouse),
        "--model",
        tiny_model,
        "--batch-size",
        "4",
        env={"RAY_ADDRESS": ray_driver.address},
    )
    assert job.returncode == 0, job.stderr[-3000:]
    report = json.loads(next(line for line in job.stdout.splitlines() if line.startswith('{"report"')))["report"]
    assert report["table"] == "nightly.scores"
    second = SimpleNamespace(**report)
    assert (second.new, second.changed, second.skipped, second.scored) == (2, 2, 9, 4)
    assert second.previous_positive_share == pytest.approx(first.positive_share)
    tbl.refresh()
    now = tbl.scan().to_arrow()
    assert_one_row_per_image(now, {str(p) for p in images.rglob("*.png")}, model_id)
    by_path = {r["path"]: r for r in now.to_pylist()}
    assert by_path[str(images / "day1/03.png")]["run_id"] == second.run_id
    assert by_path[str(images / "day1/03.png")]["source_size"] == (images / "day1/03.png").stat().st_size
    assert by_path[str(images / "day1/00.png")]["run_id"] == first.run_id
    # time travel: the first night's snapshot still holds the old score of the replaced image
    then = {r["path"]: r for r in tbl.scan(snapshot_id=first_snapshot).to_arrow().to_pylist()}
    assert len(then) == 11 and then[str(images / "day1/03.png")]["run_id"] == first.run_id

    # Polars reads the same current rows, with no project code
    frame = pl.scan_iceberg(tbl).collect()
    assert frame.height == now.num_rows == 13
    assert frame.filter(pl.col("path") == str(images / "day1/03.png"))["run_id"].to_list() == [second.run_id]

    # night 3: nothing changed -> nothing scored; the empty run is still a snapshot with its report
    third = run_nightly([str(images)], "nightly.scores", tiny_model, catalog=catalog, batch_size=4)
    assert (third.new, third.changed, third.skipped, third.scored, third.plan) == (0, 0, 13, 0, None)
    tbl.refresh()
    last = summaries(tbl)[-1]
    assert last["cxr.run-id"] == third.run_id and last["cxr.run-complete"] == "true" and last["total-records"] == "13"
    assert json.loads(last["cxr.report"])["skipped"] == 13

    # a one-off score run (jobs/score.py --table) into the same table scores every image again, as its own run
    one_off = run_nightly(
        [str(images / "day2")], "nightly.scores", tiny_model, catalog=catalog, batch_size=4, everything=True
    )
    assert (one_off.inputs, one_off.skipped, one_off.scored) == (2, 2, 2)
    tbl.refresh()
    assert summaries(tbl)[-1]["cxr.operation-kind"] == "score" and tbl.scan().to_arrow().num_rows == 13
    assert {r["run_id"] for r in tbl.scan().to_arrow().to_pylist() if "/day2/" in r["path"]} == {one_off.run_id}


def test_nightly_and_score_jobs_refuse_table_options_that_cannot_work(tiny_model, tmp_path):
    """(The nightly job writing a table: night 2 of the upsert test above runs through it.)"""
    write_images(tmp_path / "in", ["a.png", "b.png"])
    s3_no_catalog = run_job(
        "nightly.py",
        "--input",
        str(tmp_path / "in"),
        "--table",
        "nightly.scores",
        "--warehouse",
        "s3://bucket/wh",
        "--model",
        tiny_model,
    )
    assert s3_no_catalog.returncode == 5 and "--catalog-uri" in s3_no_catalog.stderr
    both = run_job(
        "score.py", "--input", str(tmp_path / "in"), "--table", "nightly.scores", "--output", str(tmp_path / "o")
    )
    assert both.returncode == 2 and "not allowed with" in both.stderr
    overwrite = run_job("score.py", "--input", str(tmp_path / "in"), "--table", "nightly.scores", "--overwrite")
    assert overwrite.returncode == 2 and "go with --output" in overwrite.stderr


def test_catalog_settings_that_cannot_work_are_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        CatalogConfig(warehouse=str(tmp_path / "afile")).properties()
    monkeypatch.setenv("PYICEBERG_HOME", str(tmp_path))  # no .pyiceberg.yaml there
    with pytest.raises(OutputError, match="cannot open Iceberg catalog 'nowhere'.*--warehouse"):
        CatalogConfig("nowhere").load()
    assert CatalogConfig(warehouse=str(tmp_path / "wh")).properties()["uri"] == f"sqlite:///{tmp_path}/wh/catalog.db"
    rest = CatalogConfig(warehouse="s3://b/wh", uri="https://catalog.example/api").properties()
    assert (
        rest["type"] == "rest"
        and rest["warehouse"] == "s3://b/wh"
        and rest["s3.endpoint"] == os.environ["AWS_ENDPOINT_URL"]
    )
    assert is_identifier("nightly.scores") and not is_identifier("s3://b/t") and not is_identifier("out/table")


def test_a_table_of_the_parquet_format_migrates_with_its_history_then_maintenance_compacts_and_expires(
    ray_driver, tiny_model, tmp_path
):
    from cxr.incremental import read_table, run_incremental

    images, old, warehouse = tmp_path / "archive", str(tmp_path / "old"), tmp_path / "warehouse"
    write_images(images, [f"{i:02d}.png" for i in range(6)])
    first = run_incremental(
        [str(images)], old, tiny_model, batch_size=4, rows_per_file=2
    )  # today's code, today's format
    write_images(images, ["03.png"], seed=5)  # replaced
    write_images(images, ["new.png"], seed=6)
    second = run_incremental([str(images)], old, tiny_model, batch_size=4)
    assert (second.new, second.changed) == (1, 1)

    out = run_job("table.py", "migrate", "--from", old, "--table", "nightly.scores", "--warehouse", str(warehouse))
    assert out.returncode == 0, out.stderr[-3000:]
    assert [(r["run_id"], r["rows"]) for r in json.loads(out.stdout.splitlines()[-1])["migrated"]] == [
        (first.run_id, 6),
        (second.run_id, 2),
    ]
    tbl = iceberg_table(warehouse)
    columns = ["path", "model", "prob_covid", "prediction", "error", "run_id", "run_date", "source_size"]
    key = [("path", "ascending")]
    assert (
        tbl.scan(selected_fields=tuple(columns)).to_arrow().sort_by(key).to_pylist()
        == read_table(old, columns).sort_by(key).to_pylist()
    )
    # history order kept: the runs' snapshots in commit order, the first one holds the first night as it was
    runs = [s for s in summaries(tbl) if s.get("cxr.run-complete") == "true"]
    assert [s["cxr.run-id"] for s in runs][0] == first.run_id and runs[-1]["cxr.run-id"] == second.run_id
    night1 = tbl.scan(snapshot_id=runs[0]["id"]).to_arrow()
    assert night1.num_rows == 6 and set(night1["run_id"].to_pylist()) == {first.run_id}
    again = run_job("table.py", "migrate", "--from", old, "--table", "nightly.scores", "--warehouse", str(warehouse))
    assert again.returncode == 0 and "already migrated, skipped" in again.stdout
    assert len(iceberg_table(warehouse).snapshots()) == len(tbl.snapshots())  # nothing committed twice

    # maintenance: compact into one file, expire every snapshot but the newest, delete what nothing references
    files_before = {f.file.file_path for f in tbl.scan().plan_files()}
    assert len(files_before) > 1
    current = tbl.scan().to_arrow().sort_by(key)
    done = run_job(
        "table.py",
        "maintain",
        "--table",
        "nightly.scores",
        "--warehouse",
        str(warehouse),
        "--older-than-days",
        "0",
        "--retain-last",
        "1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])["maintenance"]
    tbl = iceberg_table(warehouse)
    assert report["data_files_before"] == len(files_before) and report["data_files_after"] == 1
    assert (
        report["snapshots_after"] == len(tbl.snapshots()) == 1
        and report["snapshots_expired"] >= report["snapshots_before"]
    )
    assert report["files_deleted"] >= len(files_before) and not any(
        os.path.exists(p[len("file://") :]) for p in files_before
    )
    assert tbl.scan().to_arrow().sort_by(key).to_pylist() == current.to_pylist()  # the same rows
    assert (
        f"expired {report['snapshots_expired']} snapshots ({report['snapshots_before']} before, 1 kept)" in done.stdout
    )
    # nothing orphaned (every file is younger than the grace period anyway): said so, and no file list in the JSON
    assert report["orphan_files_deleted"] == 0 and "orphans" not in report
    assert report["orphan_files_too_young"] == 0  # the compaction's expired snapshot left nothing behind either
    assert "nightly.scores: deleted 0 orphan files (0.0 MB) older than 72 h" in done.stdout


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("nightly.py", ["--input", "x", "--table", "a.b", "--commit-every", "0"], "--commit-every must be at least 1"),
        ("table.py", ["maintain", "--table", "a.b", "--retain-last", "0"], "--retain-last must be at least 1"),
        ("table.py", ["maintain", "--table", "a.b", "--older-than-days", "-1"], "--older-than-days must be at least 0"),
        (
            "table.py",
            ["maintain", "--table", "a.b", "--orphans-older-than-hours", "-1"],
            "--orphans-older-than-hours must be at least 0",
        ),
    ],
)
def test_bad_table_options_are_one_line_usage_errors(script, args, message, tmp_path):
    proc = run_job(script, *args, "--warehouse", str(tmp_path / "wh"), timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message}", proc.stderr[-2000:]
    assert not (tmp_path / "wh").exists()  # nothing created


# --------------------------------------------------------------------------- orphan files (no Ray: PyIceberg writes)

DAY = 24 * 3600


def score_rows(paths: list[str], run: str) -> pa.Table:
    return pa.Table.from_pylist(
        [{"path": p, "model": "m", "prob_covid": 0.5, "prediction": "normal", "run_id": run} for p in paths],
        schema=iceberg_schema(),
    )


def write_history(tbl) -> list[tuple[int, list]]:
    """Three commits as a nightly run makes them (append, then upserts replacing rows: PyIceberg's upsert commits a
    delete and an append snapshot); (snapshot, its rows) for each snapshot."""
    tbl.append(score_rows(["a", "b"], "r1"))
    tbl.upsert(score_rows(["b", "c"], "r2"), join_cols=["path", "model"])
    tbl.upsert(score_rows(["c", "d"], "r3"), join_cols=["path", "model"])
    return [(s.snapshot_id, rows_at(tbl, s.snapshot_id)) for s in tbl.snapshots()]


def rows_at(tbl, snapshot_id: int | None = None) -> list:
    return sorted((r["path"], r["run_id"]) for r in tbl.scan(snapshot_id=snapshot_id).to_arrow().to_pylist())


def referenced_files(tbl) -> set[str]:
    """Every file the table's metadata references, read with PyIceberg only."""
    files = {tbl.metadata_location, *(e.metadata_file for e in tbl.metadata.metadata_log)}
    for snap in tbl.snapshots():
        files.add(snap.manifest_list)
        for manifest in snap.manifests(tbl.io):
            files.add(manifest.manifest_path)
            files |= {e.data_file.file_path for e in manifest.fetch_manifest_entry(tbl.io, discard_deleted=True)}
    return files


def test_maintenance_deletes_orphan_files_older_than_the_grace_period_and_keeps_the_table_whole(tmp_path):
    warehouse = tmp_path / "warehouse"
    catalog = CatalogConfig(warehouse=str(warehouse))
    tbl = open_table("nightly.scores", catalog)
    history = write_history(tbl)
    root = Path(tbl.location().removeprefix("file://"))
    a_data_file = next((root / "data").rglob("*.parquet"))
    size = a_data_file.stat().st_size
    four_days_ago = time.time() - 4 * DAY
    for f in root.rglob("*"):  # every file of the table old: only being referenced may keep one
        os.utime(f, (four_days_ago, four_days_ago))
    # what a killed write leaves: data files (real Parquet of the table's schema) and a metadata file, never committed
    old_orphans = [root / "data" / "00000-0-killed-write.parquet", root / "metadata" / "snap-killed-write.avro"]
    shutil.copy(a_data_file, old_orphans[0])
    old_orphans[1].write_bytes(b"avro")
    for f in old_orphans:
        os.utime(f, (four_days_ago, four_days_ago))
    in_flight = root / "data" / "00000-0-write-in-flight.parquet"  # written now: its commit may still come
    shutil.copy(a_data_file, in_flight)
    a_data_file = in_flight  # the first data file expires with the first snapshot

    report = maintain("nightly.scores", catalog, older_than_days=0, retain_last=4)  # the default grace: 3 days

    assert not any(f.exists() for f in old_orphans) and in_flight.exists()
    assert report.orphan_files_deleted == 2 and report.orphan_files_too_young == 1
    assert report.orphan_bytes_deleted == size + 4
    assert sorted(report.orphans) == sorted(f"file://{f}" for f in old_orphans)
    assert "deleted 2 orphan files" in report.orphans_line()
    # the table as any reader opens it: every row, every referenced file, time travel to the kept snapshots
    tbl = iceberg_table(warehouse)
    assert rows_at(tbl) == history[-1][1] == [("a", "r1"), ("b", "r2"), ("c", "r3"), ("d", "r3")]
    assert all(os.path.exists(p.removeprefix("file://")) for p in referenced_files(tbl))
    kept = {s.snapshot_id for s in tbl.snapshots()}
    travel = [(s, rows) for s, rows in history if s in kept]
    assert len(travel) >= 2 and history[0][0] not in kept  # the compaction's and the newest ones kept (retain 4)
    assert all(rows_at(tbl, snapshot_id) == rows for snapshot_id, rows in travel)

    # a dry run lists the orphans and deletes nothing; a grace of 0 takes the young one too
    os.utime(in_flight, (four_days_ago, four_days_ago))
    dry = maintain("nightly.scores", catalog, dry_run=True)
    assert dry.orphans == [f"file://{in_flight}"] and in_flight.exists() and dry.snapshots_after == len(kept)
    shutil.copy(a_data_file, in_flight.with_name("young.parquet"))
    assert maintain("nightly.scores", catalog, orphans_older_than_hours=0).orphan_files_deleted == 2
    assert not in_flight.exists() and rows_at(iceberg_table(warehouse)) == history[-1][1]


def test_orphan_files_on_s3_are_found_and_deleted(s3_bucket, tmp_path):
    bucket, client = s3_bucket
    catalog = CatalogConfig(warehouse=f"s3://{bucket}/tables", uri=f"sqlite:///{tmp_path}/catalog.db")
    tbl = open_table("nightly.scores", catalog)
    history = write_history(tbl)
    prefix = tbl.location().removeprefix(f"s3://{bucket}/")
    stray = f"{prefix}/data/00000-0-killed-write.parquet"
    client.put_object(Bucket=bucket, Key=stray, Body=b"PAR1")
    # S3 cannot backdate a file: with the default grace the fresh orphan stays, with none it goes
    young = maintain("nightly.scores", catalog, compact=False)
    assert (young.orphan_files_deleted, young.orphan_files_too_young) == (0, 1)
    gone = maintain("nightly.scores", catalog, compact=False, orphans_older_than_hours=0)
    assert gone.orphans == [f"s3://{bucket}/{stray}"] and gone.orphan_bytes_deleted == 4
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert stray not in keys
    tbl = open_table("nightly.scores", catalog, create=False)
    assert {p.removeprefix(f"s3://{bucket}/") for p in referenced_files(tbl)} <= keys
    assert rows_at(tbl) == history[-1][1] and all(rows_at(tbl, s) == rows for s, rows in history)


def test_maintain_options_default_to_the_librarys_defaults():
    """jobs/table.py maintain and cxr.table.maintain take their defaults from one place (cxr.configs)."""
    import inspect

    from cxr.jobs.table import parse_args
    from cxr.table import maintain

    args = parse_args(["maintain", "--table", "a.b"])
    params = inspect.signature(maintain).parameters
    assert args.older_than_days == params["older_than_days"].default == 30
    assert args.retain_last == params["retain_last"].default == 10
    assert args.orphans_older_than_hours == params["orphans_older_than_hours"].default == 72
