"""The Iceberg nightly table under faults, for real: the driver killed mid-run, a worker node killed mid-run, two runs
on one table at once, and an S3 endpoint answering 503. What the table holds is read with PyIceberg directly (SQLite
catalog, no project code).

As in test_faults, the images are read from S3 through a proxy (tests/s3_proxy.py) that holds the GETs of the last
input block, so a run is certainly mid-way (some chunks committed, some images not even read) when the fault comes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import NoSuchTableError

from cxr.checkpoint import load_checkpoint
from support.jobs import PYTHON, ROOT
from support.s3_proxy import FaultyS3Proxy
from test_faults import HELD, ExtraNode, N, report_of, upload_images, wait_for, wait_for_alive_nodes

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]

TABLE = "nightly.scores"
CHUNK = 8  # --commit-every in these tests


def open_table(catalog_db: Path, warehouse: str):
    catalog = SqlCatalog(
        "cxr",
        uri=f"sqlite:///{catalog_db}",
        warehouse=warehouse,
        **{"s3.endpoint": os.environ["AWS_ENDPOINT_URL"], "s3.region": "us-east-1"},
    )
    return catalog.load_table(TABLE)


def committed_rows(catalog_db: Path, warehouse: str) -> int:
    try:
        tbl = open_table(catalog_db, warehouse)
    except NoSuchTableError:
        return 0
    return 0 if tbl.current_snapshot() is None else tbl.scan(selected_fields=("path",)).to_arrow().num_rows


def history(tbl) -> list[dict]:
    return [s.summary.additional_properties for s in sorted(tbl.snapshots(), key=lambda s: s.sequence_number)]


def assert_exactly_once(tbl, uris: list[str], model_id: str) -> None:
    """One current row per image, every image scored, and over the whole history each image committed once."""
    rows = tbl.scan().to_arrow()
    paths = rows["path"].to_pylist()
    assert len(paths) == len(set(paths)) == len(uris), (len(paths), len(set(paths)), len(uris))
    assert set(paths) == set(uris) and set(rows["model"].to_pylist()) == {model_id}
    assert rows["error"].null_count == len(uris)
    assert sum(int(s.get("cxr.rows", 0)) for s in history(tbl)) == len(uris)  # no image committed twice


def nightly_cmd(prefix: str, warehouse: str, catalog_db: Path, model: str, *extra: str) -> list[str]:
    return [
        str(ROOT / "jobs" / "nightly.py"),
        "--input",
        prefix,
        "--table",
        TABLE,
        "--warehouse",
        warehouse,
        "--catalog-uri",
        f"sqlite:///{catalog_db}",
        "--model",
        model,
        "--batch-size",
        "4",
        "--commit-every",
        str(CHUNK),
        "--actors",
        "1",
        "--cpus-per-actor",
        "0.5",
        *extra,
    ]


def start(ray_cluster, proxy, cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "AWS_ENDPOINT_URL": proxy.url}
    return subprocess.Popen([PYTHON, *cmd], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))


def test_killed_driver_leaves_whole_chunks_and_the_next_run_resumes_exactly_once_through_s3_503s(
    ray_cluster, s3_bucket, tiny_model, tmp_path
):
    bucket, client = s3_bucket
    uris = upload_images(client, bucket, "incoming", N)
    # the table on S3 too; every distinct request (list, head, get, put) to the images and the warehouse fails once
    # with 503 SlowDown and is retried, and the GETs of the last input block wait for release()
    proxy = FaultyS3Proxy(
        os.environ["AWS_ENDPOINT_URL"], fail_first=1, hold=tuple(f"/{bucket}/incoming/{i:03d}.png" for i in HELD)
    )
    warehouse, db = f"s3://{bucket}/warehouse", tmp_path / "catalog.db"
    cmd = nightly_cmd(f"s3://{bucket}/incoming", warehouse, db, tiny_model)
    try:
        job = start(ray_cluster, proxy, cmd, tmp_path / "job1.log")
        try:
            wait_for(
                lambda: proxy.held > 0 and committed_rows(db, warehouse) >= CHUNK,
                "a chunk committed while the last block is held",
                proc=job,
            )
        finally:
            job.send_signal(signal.SIGKILL)  # the driver dies, mid-run
            job.wait(30)
        tbl = open_table(db, warehouse)
        before = tbl.scan().to_arrow()
        # only whole chunks are visible, each image once; the run is marked unfinished in every snapshot
        assert CHUNK <= before.num_rows < N and before.num_rows % CHUNK == 0
        assert len(set(before["path"].to_pylist())) == before.num_rows
        dead = history(tbl)
        assert {s["cxr.run-complete"] for s in dead} == {"false"} and len({s["cxr.run-id"] for s in dead}) == 1
        proxy.release()

        env = {"RAY_ADDRESS": ray_cluster.address, "AWS_ENDPOINT_URL": proxy.url}
        rerun = subprocess.run(
            [PYTHON, *cmd], capture_output=True, text=True, timeout=300, env={**os.environ, **env}, cwd=str(ROOT)
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    finally:
        proxy.close()
    report = report_of(rerun.stdout)
    assert report["resumed"] and report["run_id"] == dead[0]["cxr.run-id"]
    assert report["new"] == N and report["scored"] == N and report["reused"] == before.num_rows
    tbl = open_table(db, warehouse)
    assert_exactly_once(tbl, uris, load_checkpoint(tiny_model).info.model_id)
    last = history(tbl)[-1]
    assert last["cxr.run-complete"] == "true" and json.loads(last["cxr.report"])["reused"] == before.num_rows
    assert proxy.injected["PUT"] + proxy.injected["POST"] > 0 and proxy.injected["GET"] >= N
    assert all(f.file.file_path.startswith(f"s3://{bucket}/warehouse/") for f in tbl.scan().plan_files())


def test_two_runs_on_one_table_one_wins_the_other_fails_cleanly(ray_cluster, s3_bucket, tiny_model, tmp_path):
    bucket, client = s3_bucket
    uris = upload_images(client, bucket, "both", N)
    proxy = FaultyS3Proxy(os.environ["AWS_ENDPOINT_URL"], hold=tuple(f"/{bucket}/both/{i:03d}.png" for i in HELD))
    warehouse, db = str(tmp_path / "wh"), tmp_path / "catalog.db"
    cmd = nightly_cmd(f"s3://{bucket}/both", warehouse, db, tiny_model)
    jobs = []
    try:
        jobs.append(start(ray_cluster, proxy, cmd, tmp_path / "a.log"))
        wait_for(
            lambda: proxy.held > 0 and committed_rows(db, warehouse) >= CHUNK, "run A committed a chunk", proc=jobs[0]
        )
        jobs.append(start(ray_cluster, proxy, cmd, tmp_path / "b.log"))  # B starts while A is mid-run
        wait_for(lambda: "to score" in (tmp_path / "b.log").read_text(), "run B planned its work", proc=jobs[1])
        proxy.release()
        for job in jobs:
            job.wait(300)
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
        proxy.close()
    logs = [(tmp_path / n).read_text() for n in ("a.log", "b.log")]
    codes = [job.returncode for job in jobs]
    assert sorted(codes) == [0, 5], (codes, logs[0][-3000:], logs[1][-3000:])
    loser = logs[codes.index(5)]
    assert "error: table nightly.scores" in loser and "this run's uncommitted work was dropped" in loser, loser[-3000:]
    tbl = open_table(db, warehouse)  # never corrupt: reads whole, each image once, one run complete
    assert_exactly_once(tbl, uris, load_checkpoint(tiny_model).info.model_id)
    assert [s["cxr.run-complete"] for s in history(tbl)].count("true") == 1


def test_worker_node_killed_mid_run_the_job_completes_exactly_once(ray_cluster, s3_bucket, tiny_model, tmp_path):
    bucket, client = s3_bucket
    uris = upload_images(client, bucket, "archive", N)
    # A 3-CPU node: the only one where a 2.5-CPU predictor actor fits (head 2 CPUs, worker 1), so killing it certainly
    # kills the actor and its in-flight batches. The replacement node plays the autoscaler's part.
    nodes = [ExtraNode(ray_cluster, 3)]
    proxy = FaultyS3Proxy(os.environ["AWS_ENDPOINT_URL"], hold=tuple(f"/{bucket}/archive/{i:03d}.png" for i in HELD))
    warehouse, db = str(tmp_path / "wh"), tmp_path / "catalog.db"
    cmd = nightly_cmd(f"s3://{bucket}/archive", warehouse, db, tiny_model, "--cpus-per-actor", "2.5")
    try:
        ray_cluster.wait_for_nodes(3)
        job = start(ray_cluster, proxy, cmd, tmp_path / "job.log")
        try:
            wait_for(
                lambda: proxy.held > 0 and committed_rows(db, warehouse) >= CHUNK,
                "a chunk committed while the last block is held",
                proc=job,
            )
            nodes[0].kill_raylet()
            nodes.append(ExtraNode(ray_cluster, 3))
            proxy.release()
            job.wait(300)
        finally:
            if job.poll() is None:
                job.kill()
        log = (tmp_path / "job.log").read_text()
        assert job.returncode == 0, log[-4000:]
    finally:
        proxy.close()
        for node in nodes:
            node.stop()
        wait_for_alive_nodes(ray_cluster, 2)  # as the other tests expect it
    report = report_of(log)
    assert report["new"] == N and report["scored"] == N and not report["resumed"]
    tbl = open_table(db, warehouse)
    assert_exactly_once(tbl, uris, load_checkpoint(tiny_model).info.model_id)
    assert [s["cxr.run-complete"] for s in history(tbl)].count("true") == 1
