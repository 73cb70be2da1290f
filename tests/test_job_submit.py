"""`ray job submit` through the job server of a real local cluster, as users run the jobs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
from conftest import PYTHON, RAY, ROOT

pytestmark = pytest.mark.timeout(300)


def test_score_job_via_ray_job_submit(ray_cluster, mixed_folder, tiny_model, tmp_path):
    folder, files = mixed_folder
    out = tmp_path / "scores"
    # The job's workers get the code from the uploaded working dir and the cxr package shipped by
    # the driver (py_modules), not from this test process's PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["RAY_ADDRESS"] = ray_cluster.dashboard_url
    for _ in range(20):  # the head's job agent takes a while to come up after `ray start`
        submit = subprocess.run(
            # PYTHON: the cluster's interpreter (this test cluster runs from the project's virtualenv)
            [RAY, "job", "submit", "--no-wait", "--working-dir", str(ROOT), "--", PYTHON, "jobs/score.py",
             "--input", str(folder), "--output", str(out), "--model", tiny_model],
            capture_output=True, text=True, timeout=120, env=env,
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
    logs = proc.stdout + proc.stderr
    assert "succeeded" in status, status + logs[-3000:]
    summary = json.loads(next(line for line in logs.splitlines() if line.startswith('{"summary"')))["summary"]
    assert summary["files"] == len(files) and summary["errors"] == sum(1 for _, e, _ in files.values() if e)
    assert (out / "_summary.json").exists()
