"""Training on Ray Train (a real local cluster): it learns, records what it did, and survives a crash."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxr.checkpoint import load_checkpoint
from cxr.data import balance_weights
from cxr.decode import decode
from cxr.preprocess import LUNG_BOX, preprocess
from cxr.train import (
    CRASH_AT_EPOCH_ENV,
    TrainConfig,
    _val_scores,
    epoch_batches,
    member_data,
    prepare_data,
    train,
    transfer_threshold,
    validation_metrics,
)
from support.images import make_labelled_tree, png_bytes, xray_like

pytestmark = pytest.mark.timeout(600)


def test_validation_metrics_pick_the_highest_threshold_keeping_sensitivity():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.4, 0.6, 0.3, 0.2, 0.1])
    m = validation_metrics(y, p, target=1.0)
    assert m["val_threshold"] == 0.4 and m["val_sens_at_threshold"] == 1.0
    assert m["val_spec_at_target"] == 0.75  # 0.6 is the one negative at or above 0.4
    assert m["val_auc"] == pytest.approx(15 / 16)
    m = validation_metrics(y, p, target=0.75)
    assert m["val_threshold"] == 0.7 and m["val_spec_at_target"] == 1.0


def test_threshold_transfer_pools_folds_by_operating_point_not_by_probability():
    # Two fold models ranking alike but calibrated differently: fold B's probabilities are fold A's squared.
    neg_a = np.arange(100) / 100  # 100 non-COVID per fold: 0.00, 0.01, ..., 0.99
    pos_a = np.array([0.605, 0.992, 0.994, 0.996, 0.998])  # 0.605 sits above 61 of the 100 negatives
    fold_a = (np.r_[pos_a, neg_a], np.r_[np.ones(5), np.zeros(100)].astype(int))
    fold_b = (fold_a[0] ** 2, fold_a[1])
    t = transfer_threshold([fold_a, fold_b], fold_a, target=0.8)
    # 8 of the 10 positives must be caught: every positive but the two lowest sits above all negatives.
    assert t["operating_specificity"] == 1.0 and t["pooled_sensitivity"] == {"k": 8, "n": 10, "value": 0.8}
    assert t["threshold_at_operating_point"] == pytest.approx(0.99)  # the top negative of the shipped fold
    assert t["threshold_single_split"] == pytest.approx(0.992) and t["threshold"] == pytest.approx(0.99)
    # Every positive: the operating point drops to where the lowest ones sit (61 negatives below them) on
    # either calibration, and lands on the shipped model's own scale: its 61st negative, 0.60 ** 2.
    t = transfer_threshold([fold_a, fold_b], fold_b, target=1.0)
    assert t["operating_specificity"] == pytest.approx(0.61) and t["pooled_sensitivity"]["k"] == 10
    assert t["threshold"] == pytest.approx(0.60**2) and t["threshold_single_split"] == pytest.approx(0.605**2)
    with pytest.raises(ValueError, match="every fold"):
        transfer_threshold([(np.array([0.5]), np.array([1]))], fold_a, target=0.9)


class _Shard:
    """Stands in for a Ray Train dataset shard: numpy batches of preprocessed images and labels."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def iter_batches(self, batch_size, batch_format):
        for i in range(0, len(self.images), batch_size):
            yield {"image": self.images[i : i + batch_size], "label": self.labels[i : i + batch_size]}


def test_validation_scores_use_the_checkpoints_tta():
    # The workers' validation scores choose the threshold: they must be what the checkpoint will score.
    import torch

    from cxr.checkpoint import LoadedModel, ModelInfo
    from cxr.models import create_model
    from cxr.preprocess import PreprocessSpec

    torch.manual_seed(0)  # ImageNet features (a random-weight net scores every image alike) and a random head
    loaded = LoadedModel(
        create_model("mobilenet_v2", weights="imagenet"),
        ModelInfo("mobilenet_v2", PreprocessSpec(input_size=64)),
        optimize=False,
    )
    rng = np.random.default_rng(0)
    images, labels = rng.random((6, 64, 64), dtype=np.float32), np.array([0, 1, 0, 1, 0, 1])
    shard = _Shard(images, labels)
    plain, y, _ = _val_scores(loaded.model, shard, loaded.info.preprocess, "cpu", 4)
    mirrored, _, _ = _val_scores(loaded.model, shard, loaded.info.preprocess, "cpu", 4, tta="hflip")
    assert list(y) == list(labels)
    np.testing.assert_allclose(plain, loaded.predict_proba(images), atol=1e-5)
    loaded.info.tta = "hflip"
    np.testing.assert_allclose(mirrored, loaded.predict_proba(images), atol=1e-5)
    assert np.abs(mirrored - plain).max() > 1e-4


def test_training_learns_a_separable_task_and_leaves_its_record(trained_model, tmp_path):
    result = trained_model
    out = Path(result.output)
    assert result.metrics["val_auc"] >= 0.9, result.metrics
    info = json.loads((out / "model.json").read_text())
    assert info["threshold"] == pytest.approx(result.threshold) == pytest.approx(result.metrics["val_threshold"])
    prov = info["provenance"]
    assert prov["data"]["counts"] == {"non": 30, "covid": 30} and len(prov["data"]["fingerprint"]) == 64
    assert prov["training"]["backbone"] == "mobilenet_v2" and {"torch", "ray", "cxr"} <= set(prov["versions"])
    assert info["preprocess"]["input_size"] == 64
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    # It learned, in the record too: the training loss falls well below a guess's (ln 2 = 0.69). Not "the last
    # epoch below the first": on a few dozen images the batches' order (Ray Data's) moves the epoch means (0.27,
    # then 0.42 once).
    losses = [float(r["train_loss"]) for r in rows]
    assert all(0 < v < 5 for v in losses) and min(losses) < 0.5, losses
    assert json.loads((out / "config.json").read_text())["epochs"] == 3

    # It generalises to new images drawn the same way, through the scoring code path.
    fresh = make_labelled_tree(tmp_path / "fresh", n=20, seed=7, layout="")
    loaded = load_checkpoint(result.output)
    y, images = [], []
    for label, cls in ((1, "covid"), (0, "non")):
        for f in sorted((fresh / cls).iterdir()):
            images.append(preprocess(decode(f.read_bytes(), f.name).image, loaded.info.preprocess))
            y.append(label)
    assert roc_auc_score(y, loaded.predict_proba(np.stack(images))) >= 0.9


def test_a_crashed_worker_resumes_from_the_last_checkpoint(ray_driver, tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_AT_EPOCH_ENV, "1")  # the test-only hook: rank 0 dies once in epoch 1
    data = make_labelled_tree(tmp_path / "data", n=12)
    cfg = TrainConfig(
        data=str(data),
        output=str(tmp_path / "run"),
        weights="none",
        epochs=3,
        image_size=32,
        batch_size=8,
        oversample=1,
        val_fraction=0.25,
    )
    result = train(cfg)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # every epoch once: none lost, none repeated
    assert [r["resumed"] for r in rows] == ["False", "True", "False"]  # epoch 1 ran after the restart
    assert load_checkpoint(result.output).info.backbone == "mobilenet_v2"


def test_threshold_from_pooled_out_of_fold_scores_and_lung_crop_and_tta_recorded(ray_driver, tmp_path):
    data = make_labelled_tree(tmp_path / "data", n=12)
    cfg = TrainConfig(
        data=str(data),
        output=str(tmp_path / "run"),
        weights="none",
        epochs=1,
        image_size=32,
        batch_size=8,
        oversample=1,
        val_fraction=1 / 3,  # = 1/K: the shipped model is one of the K folds' models
        threshold_folds=3,
        target_sensitivity=0.9,
        crop=LUNG_BOX,
        equalize=True,
        tta="hflip",
    )
    result = train(cfg)
    cv = result.cross_validation
    assert (cv["folds"], cv["n"], cv["positives"]) == (3, 24, 12)  # every image scored once, out of fold
    assert len(cv["per_fold"]) == 3 and sum(f["shipped"] for f in cv["per_fold"]) == 1
    assert sum(f["n"] for f in cv["per_fold"]) == 24
    shipped = next(f["fold"] for f in cv["per_fold"] if f["shipped"])
    extra = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("_ray_fold"))
    assert extra == [f"_ray_fold{k}" for k in range(3) if k != shipped]  # one extra run per other fold
    rows = np.loadtxt(tmp_path / "run" / "cv_scores.csv", delimiter=",", skiprows=1)  # fold, label, prob
    assert rows.shape == (24, 3) and rows[:, 1].sum() == 12 and sorted(set(rows[:, 0])) == [0, 1, 2]
    folds = [(rows[rows[:, 0] == k, 2], rows[rows[:, 0] == k, 1].astype(int)) for k in range(3)]
    again = transfer_threshold(folds, folds[shipped], 0.9)
    assert cv["threshold"] == pytest.approx(again["threshold"], abs=1e-5)
    assert cv["pooled_sensitivity"]["n"] == 12 and cv["pooled_sensitivity"]["k"] >= 11
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert info["threshold"] == pytest.approx(cv["threshold"]) == pytest.approx(result.threshold)
    assert (
        "pooled by operating point" in info["provenance"]["threshold_rule"]
        and info["provenance"]["cross_validation"]["n"] == 24
    )
    assert info["preprocess"]["crop"] == list(LUNG_BOX) and info["preprocess"]["equalize"] is True
    loaded = load_checkpoint(result.output)
    assert loaded.info.preprocess.crop == LUNG_BOX  # scoring preprocesses as training did
    # ... and augments as validation did: the workers' validation scores (threshold, metrics) are the checkpoint's
    # own mirror-averaged probabilities, not the plain model's.
    assert info["tta"] == "hflip" and info["format_version"] == 2 and info["provenance"]["training"]["tta"] == "hflip"
    from cxr.data import labelled_files, split_train_val

    _, val = split_train_val(labelled_files(str(data), "train"), cfg.val_fraction, 0)
    images = np.stack(
        [preprocess(decode(open(f.path, "rb").read(), f.path).image, loaded.info.preprocess) for f in val]
    )
    scores = np.load(tmp_path / "run" / "val_scores.npy")
    assert np.allclose(np.sort(scores[0]), np.sort(loaded.predict_proba(images)), atol=1e-5)  # (that TTA changes a
    # model's scores at all: test_validation_scores_use_the_checkpoints_tta; this one-epoch model is nearly constant)


def test_a_timm_backbone_trains_from_its_offline_imagenet_weights_with_its_own_normalisation(ray_driver, tmp_path):
    """timm/tf_efficientnet_lite0 with --weights imagenet on a machine without network: the worker starts from the
    offline package's ImageNet weights (with a vanishing learning rate its stem is still theirs), feeds them the
    input normalisation they were trained with (TensorFlow's 0.5/0.5, not ImageNet's), and the checkpoint records
    it: the validation scores of training are the scoring path's own."""
    from cxr.models import TIMM_OFFLINE, offline_copy, read_state_dict

    data = make_labelled_tree(tmp_path / "data", n=8)
    cfg = TrainConfig(
        data=str(data),
        output=str(tmp_path / "run"),
        backbone="timm/tf_efficientnet_lite0",
        weights="imagenet",
        epochs=1,
        lr=1e-12,
        image_size=32,
        batch_size=8,
        oversample=1,
        val_fraction=0.25,
    )
    result = train(cfg)
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert info["backbone"] == "timm/tf_efficientnet_lite0"
    assert info["preprocess"]["mean"] == [0.5, 0.5, 0.5] and info["preprocess"]["std"] == [0.5, 0.5, 0.5]
    stem = read_state_dict(offline_copy(TIMM_OFFLINE["tf_efficientnet_lite0"]))["_conv_stem.weight"]
    assert np.allclose(
        read_state_dict(tmp_path / "run" / "model.safetensors")["conv_stem.weight"].float().numpy(),
        stem.numpy(),
        atol=1e-6,
    )
    loaded = load_checkpoint(result.output)
    from cxr.data import labelled_files, split_train_val

    _, val = split_train_val(labelled_files(str(data), "train"), 0.25, 0)
    images = np.stack(
        [preprocess(decode(open(f.path, "rb").read(), f.path).image, loaded.info.preprocess) for f in val]
    )
    scores = np.load(tmp_path / "run" / "val_scores.npy")
    assert np.allclose(np.sort(scores[0]), np.sort(loaded.predict_proba(images)), atol=1e-5)


def test_a_seed_ensemble_scores_every_split_with_the_mean_of_its_members(ray_driver, tmp_path):
    data = make_labelled_tree(tmp_path / "data", n=12)
    out = tmp_path / "run"
    cfg = TrainConfig(
        data=str(data),
        output=str(out),
        weights="none",
        epochs=1,
        image_size=32,
        batch_size=8,
        oversample=1,
        val_fraction=0.5,
        threshold_folds=2,
        target_sensitivity=0.9,
        seeds=2,
    )
    result = train(cfg)
    info = json.loads((out / "model.json").read_text())
    assert info["kind"] == "ensemble" and info["members"] == ["members/seed0", "members/seed1"]
    assert result.model_id.startswith("ensemble@") and info["threshold"] == pytest.approx(result.threshold)
    ens = load_checkpoint(str(out))
    a, b = (dict(m.model.named_parameters())["classifier.1.weight"].detach().numpy() for m in ens.members)
    assert not np.allclose(a, b)  # two models, not one twice
    assert [m["seed"] for m in info["provenance"]["members"]] == [0, 1]
    # two runs per split: the shipped split's and the other fold's, each with a second seed
    shipped = next(f["fold"] for f in result.cross_validation["per_fold"] if f["shipped"])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("_ray")) == sorted(
        ["_ray", "_ray_seed1", f"_ray_fold{1 - shipped}", f"_ray_fold{1 - shipped}_seed1"]
    )
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [(r["member"], r["epoch"]) for r in rows] == [("seed0", "0"), ("seed1", "0")]

    # The validation scores are the ensemble's own: its mean probability on the validation images.
    from cxr.data import labelled_files, split_train_val

    _, val = split_train_val(labelled_files(str(data), "train"), 0.5, 0)
    images = np.stack([preprocess(decode(open(f.path, "rb").read(), f.path).image, ens.info.preprocess) for f in val])
    mine = ens.predict_proba(images)
    scores = np.load(out / "val_scores.npy")
    assert scores.shape == (2, len(val)) and scores[1].sum() == sum(f.label for f in val)
    assert np.allclose(np.sort(scores[0]), np.sort(mine), atol=1e-5)
    m = validation_metrics(scores[1].astype(int), scores[0], 0.9)
    assert result.metrics["val_auc"] == pytest.approx(m["val_auc"])
    # and the threshold comes from both folds' ensembles, pooled as for one model
    cv = np.loadtxt(out / "cv_scores.csv", delimiter=",", skiprows=1)
    assert cv.shape == (24, 3)
    folds = [(cv[cv[:, 0] == k, 2], cv[cv[:, 0] == k, 1].astype(int)) for k in range(2)]
    assert np.allclose(np.sort(folds[shipped][0]), np.sort(mine), atol=1e-5)
    assert result.threshold == pytest.approx(transfer_threshold(folds, folds[shipped], 0.9)["threshold"], abs=1e-5)


def test_every_part_of_an_epoch_sees_both_classes(ray_driver, tmp_path):
    # Files arrive sorted by path (covid/ before non/) and the oversampled COVID copies are appended: unless
    # the rows are shuffled globally, the workers' few-batch shuffle buffer leaves long one-class runs (an
    # epoch that ends with COVID-only batches).
    data = tmp_path / "data"
    make_labelled_tree(data, n=12, size=32, seed=1)
    for f in sorted((data / "train" / "non").glob("*.png"))[:2]:
        f.unlink()  # 10 non for 12 covid would be balanced: add more non below
    for i in range(98):
        (data / "train" / "non" / f"extra{i}.png").write_bytes((data / "train" / "non" / "non1-5.png").read_bytes())
    cfg = TrainConfig(
        data=str(data),
        output=str(tmp_path / "run"),
        weights="none",
        image_size=32,
        batch_size=8,
        oversample=4,
        val_fraction=0.2,
    )
    prepared = prepare_data(cfg)
    labels = prepared.train_ds.to_pandas()["label"].to_numpy()
    n_covid = int(labels.sum())
    assert n_covid == 4 * sum(f.label for f in prepared.train_files)  # oversampled x4
    share = n_covid / labels.size
    orders = []
    for epoch in range(2):
        rng = np.random.default_rng([cfg.seed, epoch, 0])
        seq = np.concatenate([b["label"] for b in epoch_batches(prepared.train_ds, cfg.batch_size, rng)])
        assert seq.size == labels.size and seq.sum() == n_covid
        quarters = [q.mean() for q in np.array_split(seq, 4)]
        assert all(abs(q - share) < 0.2 for q in quarters), (share, quarters)
        orders.append(seq)
    assert not np.array_equal(orders[0], orders[1])  # the batches differ from epoch to epoch
    # a seed ensemble's second member trains on the same rows in an order of its own
    assert member_data(prepared, cfg, 0) is prepared
    other = member_data(prepared, cfg, 1).train_ds.to_pandas()
    assert len(other) == labels.size and int(other["label"].sum()) == n_covid
    assert not np.array_equal(other["label"].to_numpy(), labels)
    assert np.array_equal(
        np.sort(other["image"].map(lambda a: a.tobytes()).to_numpy()),
        np.sort(prepared.train_ds.to_pandas()["image"].map(lambda a: a.tobytes()).to_numpy()),
    )


def test_undecodable_training_files_are_left_out_named_and_counted(ray_driver, tmp_path, caplog):
    data = make_labelled_tree(tmp_path / "data", n=6, size=32, seed=2)
    (data / "train" / "covid" / "zz-cut.png").write_bytes(png_bytes(xray_like(32, 32))[:60])
    (data / "train" / "non" / "zz-empty.png").write_bytes(b"")
    cfg = TrainConfig(
        data=str(data),
        output=str(tmp_path / "run"),
        weights="none",
        image_size=32,
        batch_size=8,
        oversample=1,
        val_fraction=0.25,
    )
    with caplog.at_level(logging.WARNING, logger="cxr.train"):
        prepared = prepare_data(cfg)
    assert prepared.undecodable == 2
    rows = pd.concat([prepared.train_ds.to_pandas(), prepared.val_ds.to_pandas()])
    assert len(rows) == 12 and rows["label"].sum() == 6  # every decodable image, once, with its label
    assert "zz-cut.png: truncated" in caplog.text and "zz-empty.png: empty file" in caplog.text
    left_out = [r.getMessage() for r in caplog.records if "could not be decoded" in r.getMessage()]
    assert left_out and sum(int(m.split()[0]) for m in left_out) == 2  # per split: "N of M training files ..."
    assert all(" training files " in m or " validation files " in m for m in left_out), left_out


@pytest.mark.cluster  # runs the job, which starts a local Ray instance
def test_train_job_rejects_bad_input(tmp_path):
    from support.jobs import run_job

    missing = run_job("train.py", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), timeout=120)
    assert missing.returncode == 3 and "error:" in missing.stderr
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    layout = run_job("train.py", "--data", str(tmp_path / "flat"), "--output", str(tmp_path / "o"), timeout=120)
    assert layout.returncode == 3 and "covid" in layout.stderr
    bad = run_job(
        "train.py", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--backbone", "vgg99", timeout=120
    )
    assert bad.returncode == 2 and "unknown backbone" in bad.stderr
    crop = run_job(
        "train.py", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--crop", "0.1,0.9", timeout=120
    )
    assert crop.returncode == 2 and "--crop" in crop.stderr
    crop = run_job(
        "train.py", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--crop", "0.5,0.4,0,1", timeout=120
    )
    assert crop.returncode == 2 and "crop must satisfy" in crop.stderr
    seeds = run_job("train.py", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--seeds", "0", timeout=120)
    assert (
        seeds.returncode == 2 and seeds.stderr.strip() == "error: --seeds must be at least 1"
    )  # at parse time: one line
    groups = run_job(
        "train.py",
        "--data",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
        "--groups",
        str(tmp_path / "none.csv"),
        timeout=120,
    )
    assert groups.returncode == 3 and "--groups" in groups.stderr and "cannot read it" in groups.stderr


@pytest.mark.cluster  # runs the job, which starts a local Ray instance
def test_train_job_checks_its_starting_weights_before_anything(tmp_path):
    """Weights that are not there, or do not fit, end the job at once (exit 4, one line), before Ray starts and
    before the output is written (it used to fail in every worker, with tracebacks, and leave a run behind that the
    next command with --weights none was refused for)."""
    from cxr.models import TIMM_OFFLINE, offline_copy
    from support.jobs import offline_env, run_job

    data = make_labelled_tree(tmp_path / "data", n=4, size=32)
    out = tmp_path / "o"
    cases = [
        (["--backbone", "efficientnet_b0"], "error: ImageNet weights of efficientnet_b0 not available (not in "),
        (
            ["--backbone", "timm/resnet18"],
            "error: ImageNet weights of timm/resnet18 not available (not in the Hugging Face cache",
        ),
        (
            ["--weights", str(tmp_path / "nope.pth")],
            f"error: --weights: weights file not found: {tmp_path / 'nope.pth'}",
        ),
        (
            ["--weights", str(offline_copy(TIMM_OFFLINE["tf_efficientnet_lite0"]))],
            "error: --weights: /",
        ),  # the path once
        (
            ["--weights", str(offline_copy(TIMM_OFFLINE["tf_efficientnet_lite0"]))],
            ": does not fit this backbone (247 tensors",
        ),
    ]
    for args, expected in cases:
        r = run_job(
            "train.py", "--data", str(data), "--output", str(out), *args, env=offline_env(tmp_path), timeout=120
        )
        line = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert r.returncode == 4 and expected in line, (args, r.returncode, r.stderr[-2000:])
        assert not out.exists()
    assert (
        "--weights none"
        in run_job(
            "train.py",
            "--data",
            str(data),
            "--output",
            str(out),
            "--backbone",
            "resnet50",
            env=offline_env(tmp_path),
            timeout=120,
        ).stderr
    )


def _old_run(out: Path, data: Path, **settings) -> dict[str, bytes]:
    """An output as a finished run with ``settings`` leaves it (config.json, model files, Ray Train's ``_ray/``);
    returns every file's bytes."""
    from dataclasses import asdict

    (out / "_ray" / "checkpoint_000000").mkdir(parents=True)
    (out / "_ray" / "checkpoint_000000" / "model.safetensors").write_bytes(b"old weights")
    cfg = TrainConfig(
        data=str(data), output="runs/elsewhere", **settings
    )  # copied from another output: its path differs
    (out / "config.json").write_text(
        json.dumps({**asdict(cfg), "covid_weight_used": 1.0, "threads_per_worker_used": 2})
    )
    (out / "model.json").write_text('{"old": true}')
    (out / "metrics.csv").write_text("epoch\n0\n1\n")
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_train_job_refuses_an_output_holding_a_run_with_other_settings_before_starting_ray(tmp_path):
    from support.jobs import run_job

    data = make_labelled_tree(tmp_path / "data", n=12, size=32)
    out = tmp_path / "run"
    before = _old_run(out, data, weights="none", epochs=2, image_size=32)
    no_ray = {"RAY_ADDRESS": "127.0.0.1:1"}  # nothing listens there: a job that went on to Ray would fail otherwise
    job = run_job(
        "train.py",
        "--data",
        str(data),
        "--output",
        str(out),
        "--weights",
        "none",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--lr",
        "0.01",
        "--workers",
        "2",
        env=no_ray,
        timeout=120,
    )
    assert job.returncode == 5, job.stderr[-2000:]
    assert job.stderr.strip().splitlines()[-1] == (
        f"error: {out} holds a training run with other settings (epochs 2 -> 1, lr 0.0003 -> 0.01): "
        "choose a new --output, or pass --overwrite to replace it"
    )  # --workers may change on resume: not named
    after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before

    from cxr import storage
    from cxr.errors import OutputError
    from cxr.train import check_output

    (out / "config.json").unlink()  # a run folder whose settings nothing records (an older version's, interrupted)
    same = TrainConfig(data=str(data), output=str(out), weights="none", epochs=2, image_size=32)
    with pytest.raises(
        OutputError, match=r"holds a training run \(_ray\) whose settings are unknown \(no readable config.json\)"
    ):
        check_output(same, False, storage.s3_settings())


def test_output_check_on_s3_names_changes_resumes_the_same_and_overwrite_empties(s3_bucket, tmp_path):
    from dataclasses import asdict

    from cxr import storage
    from cxr.errors import OutputError
    from cxr.train import check_output

    bucket, client = s3_bucket
    old = TrainConfig(
        data="s3://data/x/", output=f"s3://{bucket}/run", image_size=64, crop=LUNG_BOX, groups={"a.png": "g1"}
    )
    client.put_object(
        Bucket=bucket, Key="run/config.json", Body=json.dumps({**asdict(old), "covid_weight_used": 2.0}).encode()
    )
    client.put_object(Bucket=bucket, Key="run/_ray/checkpoint_000001/model.safetensors", Body=b"w")
    settings = storage.s3_settings()
    same = TrainConfig(**{**asdict(old), "data": "s3://data/x", "workers": 4, "gpu": True, "max_failures": 0})
    check_output(same, False, settings)  # the same run (JSON's lists for tuples; a trailing slash): it resumes
    other = TrainConfig(
        **{**asdict(old), "image_size": 96, "groups": {"a.png": "g2"}, "augment": {**old.augment, "hflip_p": 0.0}}
    )
    with pytest.raises(
        OutputError,
        match=r"^s3://.*/run holds a training run with other settings \(image_size 64 -> 96, groups "
        r"\{\"a.png\": \"g1\"\} -> \{\"a.png\": \"g2\"\}, augment <\d+ entries> -> <\d+ entries>\): "
        r"choose a new --output, or pass --overwrite",
    ):
        check_output(other, False, settings)
    check_output(other, True, settings)
    left = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="run/").get("Contents", [])]
    assert set(left) <= {"run/"}, left  # at most the empty directory marker pyarrow leaves
    check_output(other, False, settings)  # nothing there to refuse now


def test_train_job_overwrite_replaces_a_run_and_prints_its_epochs(ray_driver, tmp_path):
    from support.jobs import run_job

    data = make_labelled_tree(tmp_path / "data", n=12, size=32)
    out = tmp_path / "run"
    _old_run(out, data, weights="none", epochs=2, image_size=64)
    args = [
        "--data",
        str(data),
        "--output",
        str(out),
        "--weights",
        "none",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--lr",
        "0.01",
        "--batch-size",
        "8",
        "--oversample",
        "1",
        "--val-fraction",
        "0.25",
    ]
    env = {"RAY_ADDRESS": ray_driver.address, "CXR_PROGRESS_EVERY_S": "0"}  # a progress line after every batch
    job = run_job("train.py", *args, "--overwrite", env=env, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    shown = re.sub(r"\x1b\[[0-9;]*m", "", job.stdout + job.stderr)  # Ray colours the worker's prefix
    m = re.search(
        r"^(?:\(RayTrainWorker pid=(\d+)\) )?(epoch 1/1: train loss \d+\.\d{3}, val loss \d+\.\d{3}, val AUC \S+, "
        r"specificity \S+ at sensitivity >= 0\.98, \d+ images/s, \d+ s)$",
        shown,
        re.M,
    )
    assert m, shown[-3000:]
    assert "will hang" not in shown  # Ray's warning of a cluster without free CPUs: none here (a false alarm it was)
    # The worker wrote it once (Train V2's patched print() wrote every line to stdout and to its logger: twice on
    # the console). Counted in the worker's own log files: this test cluster's two nodes share one log folder, so
    # both nodes' log monitors forward each line, and the job's output shows it twice either way.
    assert m.group(1), m.group(0)  # Ray names the worker whose line it forwards
    logs = Path(ray_driver.temp_dir, "session_latest", "logs")
    written = "".join(
        f.read_text(errors="replace") for f in logs.rglob(f"*-{m.group(1)}.*") if f.suffix in (".out", ".err")
    )
    assert written.count(m.group(2)) == 1, written[-2000:]
    # within the epoch: how far, of how many (18 training images: 24 less the validation quarter), in batches of 8
    within = re.findall(
        r"^(?:\(RayTrainWorker pid=\d+\) )?epoch 1/1: (\d+) of (\d+) training images, train loss so far "
        r"\d+\.\d{3}, \d+ images/s, about \d+ s to go$",
        shown,
        re.M,
    )
    assert sorted({(int(a), int(b)) for a, b in within}) == [(8, 18), (16, 18), (18, 18)], shown[-3000:]
    info = json.loads((out / "model.json").read_text())
    assert info["preprocess"]["input_size"] == 32
    assert {k: info["provenance"]["training"][k] for k in ("epochs", "lr", "image_size")} == {
        "epochs": 1,
        "lr": 0.01,
        "image_size": 32,
    }
    assert json.loads((out / "config.json").read_text())["epochs"] == 1
    assert [r["epoch"] for r in csv.DictReader((out / "metrics.csv").open())] == ["0"]
    assert b"old weights" not in {p.read_bytes() for p in out.rglob("*") if p.is_file()}  # the old run's files are gone

    # The same command again is let through to resume the run (Ray Train returns its finished result; a second
    # job would take another minute here), however it runs (--workers, --max-failures); another --lr is not.
    from cxr import storage
    from cxr.errors import OutputError
    from cxr.train import check_output

    same = TrainConfig(
        data=str(data),
        output=str(out),
        weights="none",
        epochs=1,
        image_size=32,
        lr=0.01,
        batch_size=8,
        oversample=1,
        val_fraction=0.25,
        workers=2,
        max_failures=0,
    )
    check_output(same, False, storage.s3_settings())
    with pytest.raises(OutputError, match=r"other settings \(lr 0.01 -> 0.02\)"):
        check_output(TrainConfig(**{**same.__dict__, "lr": 0.02}), False, storage.s3_settings())


def test_train_and_tune_help_show_every_default_but_none_for_flags(capsys, monkeypatch):
    import importlib.util

    from support.jobs import ROOT

    monkeypatch.setenv("COLUMNS", "200")
    for script, expected in (
        (
            "train",
            [
                "--epochs EPOCHS passes over the training images; the checkpoint is the best epoch's (default: 8)",
                "(default: 0.0003)",
                "--image-size IMAGE_SIZE the model's input, in pixels (square) (default: 224)",
                "(default: imagenet)",
                "--data URI labelled images",
                "--overwrite delete what the output holds",
            ],
        ),
        (
            "tune",
            [
                "--num-samples NUM_SAMPLES trials per backbone (learning rate and class weight drawn at random) "
                "(default: 4)",
                "(default: 6)",
                "--data URI labelled images",
            ],
        ),
    ):
        spec = importlib.util.spec_from_file_location(f"job_{script}", ROOT / "jobs" / f"{script}.py")
        job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)
        with pytest.raises(SystemExit) as exited:
            job.parse_args(["--help"])
        assert exited.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert all(e in text for e in expected), text
        assert "(default: False)" not in text and "(default: None)" not in text  # flags and options without a default
        assert text.count("(default:") >= 12


def test_epoch_lines_name_the_fold_or_seed_of_their_run():
    from cxr.train import run_label

    one = TrainConfig(data="d", output="o")
    assert run_label("_ray", one) == ""
    folds = TrainConfig(data="d", output="o", threshold_folds=5, seeds=2, seed=3)
    assert run_label("_ray", folds) == "shipped model, seed 3"
    assert run_label("_ray_fold1_seed1", folds) == "fold 2/5, seed 3"  # a member's config carries its own seed
    assert run_label("train-resnet50-0123456789ab", one) == "train-resnet50-0123456789ab"  # a Tune trial's run


def test_training_data_from_a_labelled_manifest_keeps_patients_together(ray_driver, tmp_path):
    # images in a PACS-like tree (no class folders), labels and patients in a table one folder away
    make_labelled_tree(tmp_path / "pacs", n=8, size=32, seed=3, layout="")
    rows = ["path,label,patient,source"]
    for cls, value in (("covid", "COVID-19"), ("non", "normal")):
        for i in range(8):
            rows.append(f"../pacs/{cls}/{cls}3-{i}.png,{value},{cls}-{i // 2},site{int(i >= 6)}")
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = TrainConfig(
        data=str(tmp_path / "tables" / "labels.csv"),
        output=str(tmp_path / "run"),
        weights="none",
        image_size=32,
        oversample=1,
        val_fraction=0.25,
        label_map={"covid-19": "covid", "normal": "non"},
        groups={"covid3-0.png": "one-case", "non3-7.png": "one-case"},  # the patient column wins
        balance_by="source",  # site0 holds 6 images of each class, site1 2
    )
    prepared = prepare_data(cfg)
    assert prepared.counts == {"non": 8, "covid": 8} and prepared.undecodable == 0
    files = prepared.train_files + prepared.val_files
    assert sorted(f.path for f in files) == sorted(str(p) for p in (tmp_path / "pacs").rglob("*.png"))
    assert all(f.label == (f.path.split("/")[-2] == "covid") for f in files)
    patient = {f.path: f.meta["patient"] for f in files}
    train_patients = {patient[f.path] for f in prepared.train_files}
    assert train_patients.isdisjoint(patient[f.path] for f in prepared.val_files)
    assert len(set(patient.values())) == 8 and prepared.val_files  # 8 patients of 2 images, 2 of them held out
    assert prepared.train_ds.count() == len(prepared.train_files) and prepared.val_ds.count() == len(prepared.val_files)
    # the balancing weights ride in the training rows the workers read (validation rows weigh 1)
    weights = balance_weights(prepared.train_files, "source")
    assert len(set(np.round(weights, 6))) > 1
    assert sorted(prepared.train_ds.to_pandas()["weight"]) == pytest.approx(sorted(weights))
    assert set(prepared.val_ds.to_pandas()["weight"]) == {1.0}
