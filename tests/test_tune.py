"""Ray Tune search on a real local 2-node cluster: it finishes, ranks, exports calibrated models and an ensemble,
and an interrupted search resumes; calibration lowers ECE; the ensemble checkpoint works wherever a model does."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from cxr.checkpoint import CheckpointError, LoadedEnsemble, load_checkpoint, load_info, save_ensemble
from cxr.decode import decode
from cxr.metrics import expected_calibration_error
from cxr.preprocess import LUNG_BOX, preprocess
from cxr.tune import (
    TEMPERATURE_BOUNDS,
    SearchConfig,
    calibrate,
    choose_members,
    export_calibrated,
    plan_trials,
    rank_key,
    run_search,
    usable_members,
    validation_figures,
)
from support.images import make_labelled_tree
from support.jobs import crash_hook

pytestmark = pytest.mark.timeout(900)

BACKBONES = ["mobilenet_v2", "mobilenet_v3_large"]


def _images(folder: Path, spec) -> tuple[np.ndarray, np.ndarray]:
    images, y = [], []
    for label, cls in ((1, "covid"), (0, "non")):
        for f in sorted((folder / cls).iterdir()):
            images.append(preprocess(decode(f.read_bytes(), f.name).image, spec))
            y.append(label)
    return np.stack(images), np.array(y)


@pytest.fixture(scope="module")
def search(ray_driver, tmp_path_factory):
    """A 2 backbones x 1 sample search, 2 epochs at 32 px, whose first trial crashes once in epoch 1 and is then
    resumed. (The choice of the best of several trials of one backbone: test_tune_s3, whose search has two.)"""
    root = tmp_path_factory.mktemp("tune")
    data = make_labelled_tree(root / "data", n=16, size=48)
    common = dict(
        data=str(data),
        output=str(root / "out"),
        backbones=BACKBONES,
        num_samples=1,
        epochs=2,
        image_size=32,
        weights="none",
        oversample=1,
        batch_size=8,
        val_fraction=0.25,
        grace_period=2,
        lr_range=(3e-4, 3e-3),
        max_failures=0,
        trial_max_failures=0,
        cpus_per_trial=0.9,
        crop=LUNG_BOX,
    )
    with crash_hook(epoch=1):
        interrupted = run_search(SearchConfig(**common))
    resumed = run_search(SearchConfig(**common))
    return interrupted, resumed, root


def test_plan_trials_leaves_room_for_drivers_and_ray_data():
    cpus, n = plan_trials([2.0], 0.0, 1.0, 0.0, None)
    assert (cpus, n) == (1.0, 1)  # 2 CPUs: one trial worker + its driver + Ray Data's reserve
    cpus, n = plan_trials([2.0], 0.0, 0.7, 0.0, 4)
    assert n == 2 and 2 * (cpus + 0.05) + 0.5 <= 2.0  # fractional trials run two at a time, still leaving room
    cpus, n = plan_trials([2.0], 0.0, 4.0, 0.0, None)
    assert cpus <= 1.45 and n == 1  # a request larger than a node is reduced, never left pending forever
    assert plan_trials([16.0] * 2, 2.0, 4.0, 1.0, None)[1] == 2  # GPUs bound concurrency


def test_rank_key_prefers_specificity_then_auc():
    rows = [
        {"val_spec_at_target": 0.9, "val_auc": 0.99},
        {"val_spec_at_target": 0.95, "val_auc": 0.90},
        {"val_spec_at_target": 0.95, "val_auc": 0.97},
        {"val_spec_at_target": float("nan"), "val_auc": 1.0},
    ]
    assert [rows.index(r) for r in sorted(rows, key=rank_key, reverse=True)] == [2, 1, 0, 3]


def test_ensemble_members_leave_out_a_model_that_learned_nothing():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20), np.zeros(80)].astype(int)
    probs = {
        "a": np.clip(0.6 * y + rng.uniform(0, 0.4, 100), 0, 1),
        "noise": rng.uniform(0, 1, 100),
        "b": np.clip(0.5 * y + rng.uniform(0, 0.5, 100), 0, 1),
    }
    members, figures, tried = choose_members(probs, y, 0.98)
    assert members == ["a", "b"] and len(tried) == 4  # every subset of two or more
    assert figures["val_spec_at_target"] == max(t["val_spec_at_target"] for t in tried)
    with pytest.raises(ValueError, match="two or more"):
        choose_members({"only": probs["a"]}, y, 0.98)


def test_no_ensemble_of_fewer_than_two_models_that_separate_the_classes():
    models = [
        {"kind": "model", "backbone": "a", "separates": True},
        {"kind": "model", "backbone": "b", "separates": False},
    ]
    usable, reason = usable_members(models)
    assert usable == ["a"] and "two or more" in reason and "learned nothing: b" in reason
    usable, reason = usable_members(models[:1])  # a single backbone searched
    assert usable == ["a"] and "two or more" in reason
    assert usable_members([*models, {"kind": "model", "backbone": "c", "separates": True}]) == (["a", "c"], None)


def test_search_finishes_ranks_exports_and_resumes(search):
    interrupted, resumed, root = search
    out = root / "out"
    assert interrupted.errors >= 1 and not interrupted.resumed  # the crash hook made trials fail
    failed = {r["trial_id"] for r in interrupted.leaderboard if r.get("error")}
    for backbone, uri in interrupted.exported.items():  # only trials that finished are exported
        assert load_info(uri).provenance["tune"]["trial_id"] not in failed, backbone
    assert set(interrupted.exported) == {
        r["backbone"] for r in interrupted.leaderboard if r["kind"] == "trial" and not r.get("error")
    }
    assert resumed.resumed and resumed.errors == 0 and resumed.trials == 2
    trials = [r for r in resumed.leaderboard if r["kind"] == "trial"]
    assert sorted(r["backbone"] for r in trials) == sorted(BACKBONES)
    assert all(r["epochs_run"] == 2 for r in trials), [(r["trial_id"], r["epochs_run"]) for r in trials]
    keys = [rank_key(r) for r in trials]
    assert keys == sorted(keys, reverse=True) and [r["rank"] for r in trials] == [1, 2]

    # The restored trials went on from their last epoch's checkpoint (Train V2 run named after the trial).
    histories = [json.loads(p.read_text()) for p in (out / "_tune" / "runs").glob("train-*/checkpoint_*/history.json")]
    assert any(h[-1]["resumed"] for h in histories if len(h) == 2 and h[-1]["epoch"] == 1)

    # leaderboard.csv and chart; one exported, calibrated model per backbone and an ensemble.
    with (out / "leaderboard.csv").open() as f:
        board = list(csv.DictReader(f))
    assert [r["kind"] for r in board].count("trial") == 2
    assert [r["epochs_run"] for r in board if r["kind"] == "trial"] == ["2"] * 2  # integers, not "2.0"
    assert [r["rank"] for r in board if r["kind"] == "trial"] == ["1", "2"]
    assert (out / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    assert set(resumed.exported) == set(BACKBONES)
    for backbone, uri in resumed.exported.items():
        best = next(r for r in trials if r["backbone"] == backbone)  # the backbone's trial (best of two: test_tune_s3)
        info = load_info(uri)
        cal = info.provenance["calibration"]
        assert info.backbone == backbone and info.provenance["tune"]["trial_id"] == best["trial_id"]
        assert info.temperature == pytest.approx(cal["temperature"]) and cal["ece_after"] <= cal["ece_before"] + 1e-9
        assert info.preprocess.input_size == 32 and (Path(uri) / "metrics.csv").exists()
        assert info.preprocess.crop == LUNG_BOX  # the search's preprocessing travels with every exported model
        # the threshold keeps validation sensitivity at the target on the calibrated probabilities, and every
        # recorded figure is that of the stored validation probabilities at the stored threshold
        p, y = np.load(Path(uri) / "val_scores.npy")
        assert np.mean(p[y == 1] >= info.threshold) >= 0.98
        val = info.provenance["validation"]
        assert val["val_threshold"] == info.threshold
        assert val["val_spec_at_target"] == pytest.approx(float(np.mean(p[y == 0] < info.threshold)))
        assert val["val_sens_at_threshold"] == pytest.approx(float(np.mean(p[y == 1] >= info.threshold)))
        assert val["val_auc"] == pytest.approx(roc_auc_score(y, p))
        assert val["separates_classes"] == (roc_auc_score(y, p) > 0.5 and np.ptp(p) >= 1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"]
    separating = [b for b in BACKBONES if summary["models"][b]["separates"]]
    if len(separating) >= 2:
        assert board[-1]["kind"] == "ensemble" and set(summary["models"]) == {*BACKBONES, "ensemble"}
        assert summary["ensemble"]["exported_to"] == resumed.ensemble and summary["ensemble"]["reason"] is None
    else:  # 2 epochs from scratch at 32 px: the models usually learn nothing (constant output in eval mode)
        assert (
            resumed.ensemble is None
            and not (out / "ensemble").exists()
            and "ensemble" not in [r["kind"] for r in board]
        )
        assert summary["ensemble"]["exported_to"] is None and "two or more" in summary["ensemble"]["reason"]
        assert [r["separates"] for r in board if r["exported_to"]] == [
            str(b in separating) for b in (r["backbone"] for r in board if r["exported_to"])
        ]


def test_resuming_with_other_settings_is_refused(search):
    from cxr.errors import OutputError

    _, _, root = search
    config = root / "out" / "search_config.json"
    stored = json.loads(config.read_text())
    cfg = SearchConfig(**{**stored, "crop": tuple(stored["crop"]), "weights": "auto", "epochs": 3})
    with pytest.raises(
        OutputError, match=r"other settings .*epochs: 2 there, 3 asked.*weights: 'none' there, 'auto' asked"
    ):
        run_search(cfg)
    assert json.loads(config.read_text()) == stored  # nothing changed


def test_calibration_lowers_ece_of_an_over_confident_model(tiny_model, tmp_path):
    import torch

    loaded = load_checkpoint(tiny_model, optimize=False)
    with torch.no_grad():  # deliberately over-confident: logits scaled up 40x
        head = loaded.model.classifier[-1]
        head.weight.mul_(40.0)
        head.bias.mul_(40.0)
    images, y = _images(make_labelled_tree(tmp_path, n=20, layout=""), loaded.info.preprocess)
    cal = calibrate(loaded, images, y, 0.98)
    assert cal.temperature > 2.0
    assert cal.ece_after < cal.ece_before - 0.05, cal
    p = loaded.predict_proba(images)
    assert expected_calibration_error(y, p) == pytest.approx(cal.ece_before, abs=1e-4)  # temperature 1 so far
    loaded.info.temperature = cal.temperature  # predict_proba applies the stored temperature
    assert expected_calibration_error(y, loaded.predict_proba(images)) == pytest.approx(cal.ece_after, abs=1e-4)


def _near_constant_model(tiny_model: str, out: Path, scale: float = 100.0) -> str:
    """tiny_model with its head scaled up: logits that differ by ~1e-7 between images (correlated with the label),
    float32 probabilities that do not differ at all: a model that learned nothing, as efficientnet_b0 from scratch."""
    import torch

    from cxr.checkpoint import save_checkpoint

    loaded = load_checkpoint(tiny_model, optimize=False)
    with torch.no_grad():
        loaded.model.classifier[-1].weight.mul_(scale)
    save_checkpoint(loaded.model, loaded.info, str(out))
    return str(out)


def test_export_of_a_model_that_learned_nothing_reports_it(tiny_model, tmp_path, caplog):
    """Every exported figure is that of the float32 probabilities the export gives (as scoring loads it), not of the
    float64 calibration, where a temperature at its bound made differences of 1e-7 look like AUC 0.95."""
    src = _near_constant_model(tiny_model, tmp_path / "src")
    images, y = _images(make_labelled_tree(tmp_path / "data", n=20, layout=""), load_info(src).preprocess)
    out = tmp_path / "export"
    with caplog.at_level("WARNING", logger="cxr.tune"):
        info, cal, probs = export_calibrated(src, images, y, 0.98, str(out), {"tune": {"trial_id": "t"}})
    assert "at the upper bound of its search" in caplog.text  # the fit ran into T = 100 (no signal)
    assert cal.fitted_temperature == pytest.approx(TEMPERATURE_BOUNDS[1], rel=1e-3)
    assert "upper bound" in info.provenance["calibration"]["note"] or "merges" in info.provenance["calibration"]["note"]
    assert not cal.separates and info.provenance["validation"]["separates_classes"] is False

    scored = load_checkpoint(str(out)).predict_proba(images)  # as the score job computes them
    np.testing.assert_array_equal(scored, probs)
    f = validation_figures(y, scored, 0.98)
    val = info.provenance["validation"]
    assert f["spread"] < 1e-6 and val["val_auc"] == pytest.approx(f["auc"])  # constant output
    assert info.threshold == val["val_threshold"] == f["threshold"]
    assert val["val_spec_at_target"] == pytest.approx(float(np.mean(scored[y == 0] < info.threshold)))
    assert val["val_sens_at_threshold"] == pytest.approx(float(np.mean(scored[y == 1] >= info.threshold)))
    assert info.provenance["calibration"]["ece_after"] == pytest.approx(expected_calibration_error(y, scored))


def test_a_temperature_at_its_bound_is_not_used():
    """Perfectly separated validation logits: the NLL falls towards T -> 0, where every float32 probability is 0
    or 1."""
    from types import SimpleNamespace

    import torch

    y = np.r_[np.ones(10), np.zeros(10)].astype(int)
    margin = np.where(y == 1, 3.0, -3.0) + np.linspace(0, 1, 20)
    loaded = SimpleNamespace(
        info=SimpleNamespace(positive_index=1, backbone="fake"),
        logits=lambda x: torch.as_tensor(np.stack([-margin[x] / 2, margin[x] / 2], axis=1), dtype=torch.float32),
    )
    cal = calibrate(loaded, np.arange(20), y, 0.98)
    assert cal.fitted_temperature == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-3)
    assert cal.temperature == 1.0 and "perfectly separated" in cal.note
    assert cal.separates and cal.auc == 1.0 and cal.threshold < 1.0 and cal.ece_after == pytest.approx(cal.ece_before)


def test_ensemble_round_trips_and_scores_like_a_model(search, tiny_model, tmp_path):
    from cxr.evaluate import evaluate
    from cxr.score import score
    from cxr.tune import _export_ensemble

    _, resumed, root = search
    # The search's own models may have learned nothing (then it exports no ensemble): export one of them here.
    val_probs = {b: np.load(Path(resumed.exported[b]) / "val_scores.npy")[0] for b in BACKBONES}
    y = np.load(Path(resumed.exported[BACKBONES[0]]) / "val_scores.npy")[1].astype(int)
    ens_uri, row = _export_ensemble(
        SearchConfig(data="d", output=str(tmp_path / "search")), None, resumed.exported, val_probs, y, None
    )
    assert row["members"] == "+".join(BACKBONES)
    ens = load_checkpoint(ens_uri)
    assert isinstance(ens, LoadedEnsemble) and ens.info.kind == "ensemble" and ens.info.model_id.startswith("ensemble@")
    assert ens.info.threshold == pytest.approx(json.loads((Path(ens_uri) / "model.json").read_text())["threshold"])
    fresh = make_labelled_tree(tmp_path / "fresh", n=5, size=48, seed=9, layout="")
    images, y = _images(fresh, ens.info.preprocess)
    members = [load_checkpoint(resumed.exported[b]) for b in BACKBONES]
    expected = np.mean([m.predict_proba(images) for m in members], axis=0)
    np.testing.assert_allclose(ens.predict_proba(images), expected, atol=1e-5)
    np.testing.assert_allclose(np.exp(ens.logits(images).numpy())[:, 1], expected, atol=1e-5)

    # The score pipeline takes it as --model: the table carries its probabilities, threshold and id.
    summary = score([str(fresh)], str(tmp_path / "scores"), ens_uri)
    table = pq.read_table(tmp_path / "scores").to_pandas().sort_values("path")
    assert summary.files == 10 and table["error"].isna().all()
    assert set(table["model"]) == {ens.info.model_id} and np.allclose(table["threshold"], ens.info.threshold)
    order = [str(p) for p in sorted(fresh.glob("covid/*"))] + [str(p) for p in sorted(fresh.glob("non/*"))]
    by_path = dict(zip(table["path"], table["prob_covid"]))
    np.testing.assert_allclose([by_path[p] for p in order], expected, atol=1e-4)
    # ... and so does evaluate.
    result = evaluate([str(fresh)], ens_uri, str(tmp_path / "report"), split=None, n_bootstrap=20)
    assert (tmp_path / "report" / "report.html").exists() and result.errors == 0

    # Tampering with a member is detected; members with another preprocessing spec are refused.
    import shutil

    copy = shutil.copytree(ens_uri, tmp_path / "ensemble")
    member = copy / "members" / BACKBONES[0] / "model.json"
    meta = json.loads(member.read_text())
    meta["weights_sha256"] = "0" * 64
    member.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        load_checkpoint(str(copy))
    with pytest.raises(CheckpointError, match="preprocessing"):
        save_ensemble({"a": resumed.exported[BACKBONES[0]], "b": tiny_model}, str(tmp_path / "mixed"), 0.5)


@pytest.mark.cluster  # runs the job, which starts a local Ray instance
def test_tune_job_rejects_bad_input(tmp_path):
    from support.jobs import run_job

    bad = run_job(
        "tune.py",
        "--data",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
        "--backbones",
        "mobilenet_v2,vgg99",
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown backbone" in bad.stderr
    missing = run_job("tune.py", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), timeout=120)
    assert missing.returncode == 3 and "error:" in missing.stderr
    assert not (tmp_path / "o").exists()  # nothing written for a search that cannot start
    crop = run_job(
        "tune.py", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--crop", "0.9,0.1,0,1", timeout=120
    )
    assert crop.returncode == 2 and "crop must satisfy" in crop.stderr


@pytest.mark.cluster  # runs the job, which starts a local Ray instance
def test_tune_job_checks_imagenet_weights_before_the_search(tmp_path):
    """An empty torch hub cache and no network: efficientnet_b0's ImageNet file is missing (mobilenet_v2's comes from
    the offline weights package); the job says so at once (exit 4), before writing anything."""
    from support.jobs import offline_env, run_job

    data = make_labelled_tree(tmp_path / "data", n=4, size=32)
    no_net = offline_env(tmp_path)
    r = run_job(
        "tune.py",
        "--data",
        str(data),
        "--output",
        str(tmp_path / "o"),
        "--backbones",
        "mobilenet_v2,efficientnet_b0",
        env=no_net,
        timeout=120,
    )
    assert r.returncode == 4, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ImageNet weights of efficientnet_b0 not available") and "mobilenet_v2" not in line
    assert "--weights auto" in line and "--weights none" in line and "CXR_WEIGHTS_DIR" in line and "--backbones" in line
    assert not (tmp_path / "o").exists()


def test_auto_weights_for_timm_models(tmp_path, monkeypatch):
    """``--weights auto`` with timm models: ImageNet where an offline copy exists (EfficientNet-Lite0's package),
    from scratch where neither the Hugging Face cache nor an offline copy has them; ``imagenet`` names the missing
    ones before the search."""
    import huggingface_hub.constants

    from cxr.tune import check_imagenet_weights, weights_per_backbone

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    both = ["timm/tf_efficientnet_lite0", "timm/resnet18"]
    assert weights_per_backbone(both, "auto") == {"timm/tf_efficientnet_lite0": "imagenet", "timm/resnet18": "none"}
    with pytest.raises(
        CheckpointError, match=r"ImageNet weights of timm/resnet18 not available \(not in the Hugging Face"
    ):
        check_imagenet_weights(both, "imagenet")
    check_imagenet_weights(both[:1], "imagenet")  # available: no error
