"""`ray job submit` through the job server of a real local cluster, as users run the jobs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from support.jobs import PYTHON, RAY, ROOT

pytestmark = pytest.mark.timeout(300)


def submit_and_wait(ray_cluster, *job_args: str) -> tuple[str, str]:
    """Submit ``python jobs/...`` through the cluster's job server; wait for it; return (status, logs)."""
    # The job's workers get the code from the uploaded working dir and the cxr package shipped by
    # the driver (py_modules), not from this test process's PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["RAY_ADDRESS"] = ray_cluster.dashboard_url
    for _ in range(20):  # the head's job agent takes a while to come up after `ray start`
        submit = subprocess.run(
            # PYTHON: the cluster's interpreter (this test cluster runs from the project's virtualenv)
            [RAY, "job", "submit", "--no-wait", "--working-dir", str(ROOT), "--", PYTHON, *job_args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        if "No available agent" not in submit.stderr:
            break
        time.sleep(3)
    assert submit.returncode == 0, submit.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout).group(0)
    deadline = time.time() + 240
    status = ""
    while time.time() < deadline:
        proc = subprocess.run([RAY, "job", "status", job_id], capture_output=True, text=True, env=env, timeout=60)
        status = (proc.stdout + proc.stderr).lower()
        if any(s in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    proc = subprocess.run([RAY, "job", "logs", job_id], capture_output=True, text=True, env=env, timeout=60)
    return status, proc.stdout + proc.stderr


def test_score_job_via_ray_job_submit(ray_cluster, mixed_folder, tiny_model, tmp_path):
    folder, files = mixed_folder
    out = tmp_path / "scores"
    status, logs = submit_and_wait(
        ray_cluster, "jobs/score.py", "--input", str(folder), "--output", str(out), "--model", tiny_model
    )
    assert "succeeded" in status, status + logs[-3000:]
    summary = json.loads(next(line for line in logs.splitlines() if line.startswith('{"summary"')))["summary"]
    assert summary["files"] == len(files) and summary["errors"] == sum(1 for _, e, _ in files.values() if e)
    assert (out / "_summary.json").exists()


def test_nightly_job_via_ray_job_submit_then_nothing_to_do(ray_cluster, mixed_folder, tiny_model, tmp_path):
    from cxr.incremental import read_table

    folder, files = mixed_folder
    table = tmp_path / "table"
    args = ("jobs/nightly.py", "--input", str(folder), "--table", str(table), "--model", tiny_model)
    reports = []
    for _ in range(2):
        status, logs = submit_and_wait(ray_cluster, *args)
        assert "succeeded" in status, status + logs[-3000:]
        reports.append(json.loads(next(line for line in logs.splitlines() if line.startswith('{"report"')))["report"])
    assert reports[0]["new"] == len(files) and reports[0]["scored"] == len(files)
    assert reports[1]["skipped"] + reports[1]["retried"] == len(files) and reports[1]["new"] == 0
    rows = read_table(str(table))
    paths = rows["path"].to_pylist()
    assert len(paths) == len(files) and {p.split("/images/", 1)[1] for p in paths} == set(files)
