"""Nightly incremental scoring (cxr.incremental, jobs/nightly.py) on the real local cluster."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray.data

from cxr.checkpoint import load_checkpoint
from cxr.incremental import COMMIT_FILE, TABLE_SCHEMA, drift_check, read_table, run_incremental
from support.images import dicom_bytes, png_bytes, xray_like
from support.jobs import run_job

pytestmark = pytest.mark.timeout(400)


def write_images(root: Path, names, seed: int = 0) -> None:
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(xray_like(48, 48, seed=seed * 1000 + i, blob=i % 2 == 0)))


def check_exactly_once(table_uri: str, expected_paths: set[str], model_id: str) -> pa.Table:
    """The committed table holds every expected image once (current view), and nothing else."""
    current = read_table(table_uri)
    paths = current["path"].to_pylist()
    assert len(paths) == len(set(paths)), "duplicate rows"
    assert set(paths) == expected_paths
    assert set(current["model"].to_pylist()) == {model_id}
    return current


def test_runs_score_only_new_and_changed_images(ray_driver, tiny_model, tmp_path):
    images, table = tmp_path / "archive", str(tmp_path / "table")
    model_id = load_checkpoint(tiny_model).info.model_id
    write_images(images, [f"day1/{i:02d}.png" for i in range(10)])
    write_images(images, ["day1/broken.png"])
    (images / "day1" / "broken.png").write_bytes(b"not a png at all")

    first = run_incremental([str(images)], table, tiny_model, batch_size=4, rows_per_file=4)
    assert (first.inputs, first.new, first.changed, first.skipped, first.scored, first.errors) == (11, 11, 0, 0, 11, 1)
    assert not first.resumed and first.previous_positive_share is None and not first.drift
    day1 = check_exactly_once(table, {str(p) for p in images.rglob("*.png")}, model_id)
    assert set(day1["run_id"].to_pylist()) == {first.run_id} and set(day1["run_date"].to_pylist()) == {first.run_date}

    # night 2: two new images, one replaced (new content: other size and mtime), one only touched
    write_images(images, ["day2/a.png", "day2/b.png"], seed=7)
    write_images(images, ["day1/03.png"], seed=99)
    os.utime(images / "day1" / "05.png", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    # ... and a manifest naming one of them again and a file that does not exist
    manifest = tmp_path / "extra.csv"
    manifest.write_text(f"path\n{images}/day2/a.png\n{images}/gone.png\n")
    second = run_incremental([str(images), str(manifest)], table, tiny_model, batch_size=4, rows_per_file=4)
    assert (second.inputs, second.new, second.changed, second.skipped, second.scored, second.errors) == (
        14,
        3,
        2,
        9,
        5,
        1,
    )
    assert second.previous_positive_share == pytest.approx(first.positive_share)
    assert (
        0 < second.plan["decode_share"] < 1 and second.plan["batch_size"] == 4
    )  # sized by the costs of tonight's images
    current = check_exactly_once(table, {str(p) for p in images.rglob("*.png")} | {f"{images}/gone.png"}, model_id)
    by_path = {r["path"]: r for r in current.to_pylist()}
    assert by_path[str(images / "day1/03.png")]["run_id"] == second.run_id
    assert by_path[str(images / "day1/03.png")]["source_size"] == (images / "day1/03.png").stat().st_size
    assert by_path[str(images / "day1/00.png")]["run_id"] == first.run_id
    assert by_path[str(images / "day1/broken.png")]["error"].startswith("not an image")  # content errors are final
    gone = by_path[f"{images}/gone.png"]
    assert gone["error"].startswith("read failed") and gone["source_size"] is None and gone["source_mtime"] is None
    # the history keeps both versions of the changed images, each once
    history = read_table(table, all_versions=True)
    assert history.num_rows == 11 + 5
    # plain Parquet readers of the root see the same committed partitions (staging is hidden)
    plain = pads.dataset(table, format="parquet", partitioning="hive").to_table()
    assert plain.num_rows == history.num_rows
    assert {(r["run_date"], r["run_id"]) for r in plain.select(["run_date", "run_id"]).to_pylist()} == {
        (first.run_date, first.run_id),
        (second.run_date, second.run_id),
    }
    assert not any(Path(table, "_staging").iterdir())
    # staged files (here a stray copy of a committed one) stay invisible to plain readers, Ray Data's too
    stray = Path(table, "_staging", "stray")
    stray.mkdir()
    shutil.copy(next(Path(table).glob("run_date=*/run_id=*/*.parquet")), stray / "copy.parquet")
    assert pads.dataset(table, format="parquet", partitioning="hive").count_rows() == history.num_rows
    assert ray.data.read_parquet(table).count() == history.num_rows

    # night 3: nothing changed -> nothing scored, an empty run is still committed and reported
    third = run_incremental([str(images)], table, tiny_model, batch_size=4)
    assert (third.new, third.changed, third.retried, third.skipped, third.scored) == (0, 0, 0, 13, 0)
    report = json.loads(Path(table, "_reports", f"{third.run_id}.json").read_text())
    assert report["skipped"] == 13 and report["scored"] == 0 and report["plan"] is None
    assert read_table(table, all_versions=True).num_rows == 16


def test_lateral_views_are_left_out_each_night_until_all_views_scores_them(ray_driver, tiny_model, tmp_path):
    images, table = tmp_path / "archive", str(tmp_path / "table")
    images.mkdir()
    px = xray_like(48, 48, seed=3).astype(np.uint16) * 16
    (images / "pa.dcm").write_bytes(dicom_bytes(px, view="PA"))
    (images / "lat.dcm").write_bytes(dicom_bytes(px, view="LL"))
    first = run_incremental([str(images)], table, tiny_model, batch_size=4)
    assert (first.scored, first.errors, first.not_frontal) == (
        2,
        1,
        1,
    ) and "(1 of them not frontal views)" in first.line()
    again = run_incremental([str(images)], table, tiny_model, batch_size=4)
    assert (again.retried, again.skipped, again.scored) == (0, 2, 0)  # a left-out view is final, not retried nightly
    every = run_incremental([str(images)], table, tiny_model, batch_size=4, all_views=True)
    assert (every.retried, every.skipped, every.scored, every.errors, every.not_frontal) == (1, 1, 1, 0, 0)
    rows = {Path(r["path"]).name: r for r in read_table(table).to_pylist()}
    assert (
        rows["lat.dcm"]["error"] is None
        and rows["lat.dcm"]["view"] == "LL"
        and rows["lat.dcm"]["run_id"] == every.run_id
    )
    assert rows["lat.dcm"]["prob_covid"] == pytest.approx(rows["pa.dcm"]["prob_covid"])  # the same pixels
    assert rows["pa.dcm"]["view"] == "PA" and rows["pa.dcm"]["run_id"] == first.run_id


def test_read_table_ignores_uncommitted_partitions(tmp_path):
    table = tmp_path / "table"
    part = table / "run_date=2026-11-26" / "run_id=dead"
    part.mkdir(parents=True)
    rows = TABLE_SCHEMA.empty_table()
    pq.write_table(rows, part / "x.parquet")
    assert read_table(str(table)).num_rows == 0
    good = table / "run_date=2026-11-27" / "run_id=ok"
    good.mkdir(parents=True)
    one = pa.table({n: pa.array([None], t.type) for n, t in zip(TABLE_SCHEMA.names, TABLE_SCHEMA)}, schema=TABLE_SCHEMA)
    one = one.set_column(0, "path", pa.array(["/img/a.png"])).set_column(4, "model", pa.array(["m@1"]))
    pq.write_table(one.drop_columns(["view"]), good / "y.parquet")  # as written before the column existed
    assert read_table(str(table)).num_rows == 0  # no manifest yet
    (good / COMMIT_FILE).write_text(
        json.dumps(
            {
                "run_id": "ok",
                "run_date": "2026-11-27",
                "model": "m@1",
                "committed_at": "2026-11-27T02:00:00+00:00",
                "files": ["run_date=2026-11-27/run_id=ok/y.parquet"],
                "counts": {"rows": 1, "ok": 0, "errors": 0, "predicted_positive": 0},
            }
        )
    )
    got = read_table(str(table))
    assert got["path"].to_pylist() == ["/img/a.png"] and got["run_id"].to_pylist() == ["ok"]
    assert got["view"].to_pylist() == [None] and got.schema.field("view").type == pa.string()


def test_drift_flag_needs_a_large_and_significant_shift():
    assert drift_check(70, 200, 400, 2000, 0.1)[0]  # 35% vs 20% over many images: flagged
    assert not drift_check(3, 10, 200, 1000, 0.1)[0]  # 30% vs 20% over 10 images: chance
    assert not drift_check(230, 1000, 2000, 10000, 0.1)[0]  # significant but only 3 points
    assert not drift_check(5, 10, 0, 0, 0.1)[0]  # no history


@pytest.mark.cluster  # runs the job, which starts a local Ray instance
def test_nightly_job_exit_codes(tiny_model, tmp_path):
    write_images(tmp_path / "in", ["a.png"])
    missing = run_job(
        "nightly.py", "--input", str(tmp_path / "nope"), "--table", str(tmp_path / "t"), "--model", tiny_model
    )
    assert missing.returncode == 3 and "input not found" in missing.stderr
    bad_model = run_job(
        "nightly.py",
        "--input",
        str(tmp_path / "in"),
        "--table",
        str(tmp_path / "t"),
        "--model",
        str(tmp_path / "nomodel"),
    )
    assert bad_model.returncode == 4, bad_model.stderr[-2000:]
    (tmp_path / "afile").write_text("x")
    bad_table = run_job(
        "nightly.py", "--input", str(tmp_path / "in"), "--table", str(tmp_path / "afile"), "--model", tiny_model
    )
    assert bad_table.returncode == 5 and "is a file" in bad_table.stderr
    assert run_job("nightly.py", "--table", str(tmp_path / "t")).returncode == 2
