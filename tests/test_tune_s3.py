"""Ray Tune search with data and output on S3 (moto server) on a real local 2-node cluster: the interrupted search
resumes from Tune's experiment state on S3, and the leaderboard, exported checkpoints and summary land in the bucket.
Its two trials of one backbone also show that the best-ranked trial of a backbone is the one exported (test_tune's
search has one trial per backbone)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from cxr.checkpoint import load_checkpoint
from cxr.storage import s3_settings
from cxr.tune import SearchConfig, rank_key, run_search
from support.images import make_labelled_tree
from support.jobs import ROOT, crash_hook, run_job
from support.s3 import upload_tree

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

BACKBONE = "mobilenet_v2"


def test_search_on_s3_resumes_and_exports_to_the_bucket(ray_driver, s3_bucket, tmp_path):
    bucket, client = s3_bucket
    upload_tree(client, bucket, make_labelled_tree(tmp_path / "data", n=12, size=48), "data")
    output = f"s3://{bucket}/tune"
    common = dict(
        data=f"s3://{bucket}/data",
        output=output,
        backbones=[BACKBONE],
        num_samples=2,
        epochs=2,
        image_size=32,
        weights="none",
        oversample=1,
        batch_size=8,
        val_fraction=0.25,
        grace_period=2,
        max_failures=0,
        trial_max_failures=0,
        cpus_per_trial=0.9,
    )
    ray_results = Path("~/ray_results").expanduser()  # Ray's default storage_path: nothing of this search goes there

    def ours_in_ray_results() -> set[str]:
        return (
            {p.name for p in ray_results.glob("*") if p.name == "search" or p.name.startswith("train-")}
            if ray_results.exists()
            else set()
        )

    before = ours_in_ray_results()
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a storage path taken for a local one would land here (relative "<bucket>/tune/...")
    try:
        with crash_hook(epoch=1):
            interrupted = run_search(SearchConfig(**common))
    finally:
        os.chdir(cwd)
    assert interrupted.errors == 1 and not interrupted.resumed  # the crash hook failed the first trial in epoch 1
    failed = [r for r in interrupted.leaderboard if r.get("error")]
    assert len(failed) == 1 and failed[0]["status"] == "ERROR" and failed[0]["epochs_run"] == 1
    # a failed trial's checkpoint is not exported, however it ranks: the other trial's is
    assert set(interrupted.exported) == {BACKBONE} and interrupted.ensemble is None
    exported_trial = load_checkpoint(interrupted.exported[BACKBONE], settings=s3_settings(), optimize=False)
    assert exported_trial.info.provenance["tune"]["trial_id"] != failed[0]["trial_id"]

    # The same command again, through the job: it resumes the search from Tune's experiment state on S3.
    job = run_job(
        "tune.py",
        "--data",
        common["data"],
        "--output",
        output,
        "--backbones",
        BACKBONE,
        "--num-samples",
        "2",
        "--epochs",
        "2",
        "--image-size",
        "32",
        "--weights",
        "none",
        "--oversample",
        "1",
        "--batch-size",
        "8",
        "--val-fraction",
        "0.25",
        "--grace-period",
        "2",
        "--cpus-per-trial",
        "0.9",
        env={"RAY_ADDRESS": ray_driver.address},
        timeout=600,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert "resumed 2 trials (0 failed, 0 unfinished)" in job.stdout, job.stdout[-2000:]
    resumed = json.loads(job.stdout.strip().splitlines()[-1])["tune"]
    assert resumed["errors"] == 0 and resumed["trials"] == 2
    for where in (tmp_path, ROOT):
        assert not (where / bucket).exists(), f"S3 output written to a local path under {where}"
    assert ours_in_ray_results() == before

    def keys(prefix: str) -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    # Tune's experiment state and the trial's Train run are in the bucket; the restored trial went on from the
    # checkpoint of epoch 0 its crashed first attempt left there.
    tune_keys = keys("tune/_tune/")
    assert any(
        k.startswith("tune/_tune/search/") and os.path.basename(k).startswith("experiment_state") for k in tune_keys
    ), tune_keys
    histories = [
        json.loads(read(k)) for k in tune_keys if k.startswith("tune/_tune/runs/train-") and k.endswith("/history.json")
    ]
    assert any(len(h) == 2 and h[-1]["resumed"] for h in histories), histories

    with io.StringIO(read("tune/leaderboard.csv").decode()) as f:
        board = list(csv.DictReader(f))
    assert [(r["kind"], r["backbone"]) for r in board] == [("trial", BACKBONE)] * 2  # one backbone: no ensemble
    assert [r["rank"] for r in board] == ["1", "2"] and [r["epochs_run"] for r in board] == ["2", "2"]
    ranked = [rank_key({k: float(r[k] or "nan") for k in ("val_spec_at_target", "val_auc")}) for r in board]
    assert ranked == sorted(ranked, reverse=True)
    # the backbone's best-ranked trial is the one exported
    assert board[0]["exported_to"] == f"{output}/models/{BACKBONE}" and not board[1]["exported_to"]
    assert read("tune/leaderboard.png")[:4] == b"\x89PNG"
    assert {
        f"tune/models/{BACKBONE}/{n}" for n in ("model.json", "model.safetensors", "metrics.csv", "val_scores.npy")
    } <= set(keys("tune/models/"))
    assert keys("tune/ensemble/") == [] and "no ensemble exported: an ensemble needs two or more" in job.stderr

    settings = s3_settings()
    assert resumed["models"] == {BACKBONE: f"{output}/models/{BACKBONE}"} and resumed["ensemble"] is None
    model = load_checkpoint(resumed["models"][BACKBONE], settings=settings, optimize=False)
    assert model.info.backbone == BACKBONE and model.info.preprocess.input_size == 32
    assert model.info.provenance["tune"]["trial_id"] == board[0]["trial_id"] != board[1]["trial_id"]
    assert "calibration" in model.info.provenance
    summary = json.loads(read("tune/summary.json"))
    assert summary["resumed"] and summary["errors"] == 0 and set(summary["models"]) == {BACKBONE}
    assert summary["ensemble"]["exported_to"] is None and "two or more" in summary["ensemble"]["reason"]
    # the job's console line gives the exported checkpoint's own (calibrated) figures, and says if it learned nothing
    m = summary["models"][BACKBONE]
    line = next(ln for ln in job.stdout.splitlines() if ln.strip().startswith(BACKBONE))
    assert f"validation AUC {m['val_auc']:.3f}  specificity {m['val_spec_at_target']:.3f}" in line, (line, m)
    assert ("LEARNED NOTHING" in line) == (m["separates"] is False)
    assert json.loads(read("tune/search_config.json"))["output"] == output

    # Tune pickles the trainable's parameters (the S3 filesystem among them) into the bucket: no credential goes along.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    assert secret not in (job.stdout + job.stderr).encode()
    assert not [k for k in keys("tune/") if secret in read(k)]
