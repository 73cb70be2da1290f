"""Hyperparameter search on Ray Tune over the Ray Train trainer; calibration; export of the best models and an ensemble.

    labelled data -> decoded, split and materialised once (:func:`cxr.train.prepare_data`)
    -> Ray Tune: one *function trainable* per trial that builds and fits a ``TorchTrainer`` (Train V2's pattern;
       ``Tuner(trainer)`` no longer works), epochs reported to Tune by ``TuneReportCallback``;
       search space: backbone (grid) x learning rate (log-uniform) x COVID class weight (log-uniform, as a
       multiple of the balanced weight); ASHA stops weak trials early on the per-epoch validation score
    -> ranking: specificity at the target sensitivity on validation, ties broken by ROC AUC
    -> export: per backbone, the best trial's best epoch, temperature-calibrated on validation (ECE before and
       after recorded, threshold re-chosen on the calibrated probabilities; every figure from the float32
       probabilities of the exported checkpoint); an ensemble of two or more models that separate the classes
       (mean of the members' calibrated probabilities, its own validation threshold), none with fewer;
       ``leaderboard.csv`` + ``leaderboard.png``.

Output (local or ``s3://``)::

    leaderboard.csv, leaderboard.png, summary.json, search_config.json
    models/<backbone>/   a checkpoint (model.json, model.safetensors) + metrics.csv, val_scores.npy
    ensemble/            an ensemble checkpoint (model.json, members/<backbone>/)
    _tune/search/        the Ray Tune experiment (``Tuner.restore`` resumes it: run the same command again)
    _tune/runs/          one Ray Train run per trial configuration (a restarted trial resumes from its last epoch)

Resources: each trial's own driver (the function trainable) reserves ``DRIVER_CPUS``; its Ray Train worker
reserves ``cpus_per_trial`` (and ``gpus_per_trial``); ``DATA_RESERVE_CPUS`` stay free for Ray Data, so the
search always makes progress, even on 2 CPUs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import storage
from .checkpoint import ModelInfo, load_checkpoint, save_checkpoint, save_ensemble
from .configs import SearchConfig
from .errors import CheckpointError
from .metrics import choose_threshold, expected_calibration_error, fit_temperature
from .models import fetch_imagenet, imagenet_available
from .train import PreparedData, TrainConfig, crash_at_epoch, fit, prepare_data, validation_arrays, write_metrics_csv

log = logging.getLogger(__name__)

DRIVER_CPUS = 0.05  # a trial's driver only waits on its TorchTrainer
DATA_RESERVE_CPUS = 0.5  # never reserved by trials: Ray Data's tasks need it
SEARCH_NAME = "search"
TEMPERATURE_BOUNDS = (0.01, 100.0)  # the temperature search; a fit at a bound is not used (see calibrate)
MIN_SPREAD = 1e-6  # validation probabilities closer than this (float32 rounding at 0.5 is 6e-8) are a constant output
# Settings that define the search: a resumed search keeps its stored values of these.
_SEARCH_KEYS = (
    "data",
    "backbones",
    "num_samples",
    "epochs",
    "target_sensitivity",
    "image_size",
    "crop",
    "equalize",
    "tta",
    "weights",
    "lr_range",
    "covid_weight_range",
    "oversample",
    "batch_size",
    "val_fraction",
    "balance_by",
    "holdout_by",
    "seed",
    "grace_period",
    "reduction_factor",
)


@dataclass
class Calibration:
    temperature: float
    ece_before: float
    ece_after: float
    threshold: float  # on the calibrated probabilities, keeping validation sensitivity at the target
    sensitivity: float
    specificity: float
    auc: float
    n: int
    fitted_temperature: float = float("nan")  # what the NLL fit gave (``temperature`` is 1 where it was not used)
    note: str = "fitted"  # what was done with the fitted temperature
    separates: bool = True  # False: the probabilities do not separate the classes (AUC <= 0.5 or constant)
    spread: float = float("nan")  # max - min of the validation probabilities


@dataclass
class SearchResult:
    output: str
    leaderboard: list[dict]
    exported: dict[str, str]  # backbone -> checkpoint URI
    ensemble: str | None
    trials: int
    errors: int
    seconds: float
    resumed: bool
    unfinished: int = 0  # interrupted before they ended: the next run resumes them
    models: dict = field(
        default_factory=dict
    )  # summary.json's: per exported model (and ensemble) its calibrated figures


# --------------------------------------------------------------------------- resources


def plan_trials(
    node_cpus: list[float], total_gpus: float, cpus_per_trial: float, gpus_per_trial: float, max_concurrent: int | None
) -> tuple[float, int]:
    """(cpus_per_trial, max_concurrent) that fit the cluster while leaving CPU for Ray Data's tasks.

    A trial needs ``DRIVER_CPUS`` for its driver and ``cpus_per_trial`` for its training worker, on one node
    (the worker) or two; the cluster keeps ``DATA_RESERVE_CPUS`` unreserved. Requests that would not fit are
    reduced (with a warning), never allowed to hang the search."""
    node_cpus = [c for c in node_cpus if c > 0] or [1.0]
    largest, total = max(node_cpus), sum(node_cpus)
    room = largest - DRIVER_CPUS - (DATA_RESERVE_CPUS if len(node_cpus) == 1 else 0.0)
    if cpus_per_trial > room:
        fitted = max(0.1, round(room, 2))
        log.warning(
            "%.2f CPUs per trial leave no CPU for the trial's driver and Ray Data on any node; using %.2f",
            cpus_per_trial,
            fitted,
        )
        cpus_per_trial = fitted
    capacity = max(1, int((total - DATA_RESERVE_CPUS) // (cpus_per_trial + DRIVER_CPUS)))
    capacity = min(capacity, max(1, sum(int((c - DRIVER_CPUS) // cpus_per_trial) for c in node_cpus)))
    if gpus_per_trial > 0:
        if total_gpus < gpus_per_trial:
            log.warning(
                "asked for %.2g GPU per trial but the cluster has %.2g GPUs now; trials wait for GPU nodes",
                gpus_per_trial,
                total_gpus,
            )
        capacity = min(capacity, max(1, int(max(total_gpus, gpus_per_trial) // gpus_per_trial)))
    if max_concurrent is None:
        max_concurrent = capacity
    elif max_concurrent > capacity:
        log.warning(
            "%d concurrent trials do not fit this cluster beside Ray Data; running %d at a time",
            max_concurrent,
            capacity,
        )
        max_concurrent = capacity
    return cpus_per_trial, max(1, max_concurrent)


def check_imagenet_weights(backbones: list[str], weights: str) -> None:
    """``--weights imagenet``: every backbone's ImageNet file must be available before the search starts (else every
    trial of those backbones would fail minutes later). Raises CheckpointError (exit 4) naming them and the fixes."""
    if weights != "imagenet":
        return
    missing = {b: why for b in backbones if (why := fetch_imagenet(b))}
    if missing:
        raise CheckpointError(
            f"ImageNet weights of {', '.join(missing)} not available ({next(iter(missing.values()))}): "
            "use --weights auto (train those from scratch), --weights none, put the file in the torch hub cache "
            "(or a folder named by CXR_WEIGHTS_DIR), or leave them out of --backbones"
        )


def weights_per_backbone(backbones: list[str], weights: str) -> dict[str, str]:
    """``auto``: ImageNet weights where available here, else random initialisation (with a warning)."""
    if weights != "auto":
        return {b: weights for b in backbones}
    out = {b: "imagenet" if imagenet_available(b) else "none" for b in backbones}
    scratch = [b for b, w in out.items() if w == "none"]
    if scratch:
        log.warning("no ImageNet weights available offline for %s: these train from scratch", ", ".join(scratch))
    return out


# --------------------------------------------------------------------------- the trial


def _trial(
    config: dict,
    *,
    data: PreparedData,
    base: dict,
    weights: dict,
    runs_path: str,
    runs_fs,
    fail_marker: str,
    crash_at_epoch: int | None = None,
    holdouts: list | None = None,
) -> None:
    """One Tune trial: build and fit a TorchTrainer (Train V2), epochs reported to Tune by TuneReportCallback.
    With ``holdouts`` (the search's ``holdout_by``), then the same recipe once per held-out group, and a last
    report of the mean ROC AUC inside the held-out groups (``holdout_auc``), which ranks the trials.

    Its Train run is named after the trial, so a restarted or restored trial resumes from its last epoch."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = TrainConfig(
        **{
            **base,
            "backbone": config["backbone"],
            "weights": weights[config["backbone"]],
            "lr": float(config["lr"]),
            "covid_weight": float(data.balanced_covid_weight * config["covid_weight_scale"]),
        }
    )
    # Named after the trial's configuration, not its id: Tuner.restore(restart_errored=True) gives a restarted
    # trial a new id, and the same name is what lets its Train run resume from the last epoch's checkpoint.
    key = json.dumps({k: config[k] for k in sorted(config)}, sort_keys=True, default=str)
    name = f"train-{config['backbone'].replace('/', '-')}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    fit(
        cfg,
        data,
        storage_path=runs_path,
        storage_filesystem=runs_fs,
        run_name=name,
        callbacks=[TuneReportCallback()],
        fail_marker=fail_marker,
        crash_at_epoch=crash_at_epoch,
    )
    if holdouts:
        import ray.tune

        from .holdout import fit_holdout, run_name, summarise

        rows = [
            r
            for h in holdouts
            if h.data is not None
            for r in fit_holdout(cfg, h, runs_path, runs_fs, run_name(name, h.value))
        ]
        summary = summarise(rows, cfg.holdout_by, [h.fold for h in holdouts])
        ray.tune.report(
            {
                "holdout_auc": _finite(summary["mean_roc_auc"], math.nan),
                "holdout_pooled_auc": _finite(summary["pooled"]["roc_auc"], math.nan),
                "holdout_groups": summary["groups_with_auc"],
            }
        )


# --------------------------------------------------------------------------- calibration


def _logits(loaded, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate(
        [loaded.logits(images[i : i + batch_size]).cpu().numpy() for i in range(0, len(images), batch_size)]
    )


def _probs(logits: np.ndarray, temperature: float, positive_index: int) -> np.ndarray:
    """float32 probabilities of the positive class, computed exactly as :meth:`LoadedModel.predict_proba` does."""
    import torch

    return torch.softmax(torch.as_tensor(logits) / temperature, dim=1)[:, positive_index].numpy().astype(np.float32)


def predict(loaded, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """``loaded.predict_proba`` over ``images`` in batches (float32)."""
    return np.concatenate([loaded.predict_proba(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def validation_figures(y: np.ndarray, p: np.ndarray, target_sensitivity: float) -> dict:
    """Figures of probabilities ``p`` on labels ``y``: ROC AUC, threshold (highest keeping sensitivity at the target),
    specificity and sensitivity there, ECE, the spread of ``p`` and whether ``p`` separates the classes at all
    (``separates``: AUC above 0.5 and a spread beyond float32 rounding, ``MIN_SPREAD``)."""
    from sklearn.metrics import roc_auc_score

    y, p = np.asarray(y), np.asarray(p)
    threshold = choose_threshold(y, p, target_sensitivity)
    auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    spread = float(np.ptp(p)) if len(p) else 0.0
    return {
        "auc": auc,
        "threshold": float(threshold),
        "specificity": float(np.mean(p[y == 0] < threshold)),
        "sensitivity": float(np.mean(p[y == 1] >= threshold)),
        "ece": expected_calibration_error(y, p),
        "spread": spread,
        "separates": bool(spread >= MIN_SPREAD and auc > 0.5),
    }


def calibrate(
    loaded,
    images: np.ndarray,
    y: np.ndarray,
    target_sensitivity: float,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> Calibration:
    """Temperature scaling fitted on (validation) ``images``; every figure from the float32 probabilities the model
    gives at that temperature (as :meth:`LoadedModel.predict_proba`), the threshold re-chosen on them.

    A fitted temperature at a bound of its search means the likelihood has no optimum inside it, with a warning: at the
    lower bound validation is perfectly separated (T -> 0 would make every probability 0 or 1), so the temperature is
    left at 1; at the upper bound the logits hold no signal (T -> infinity), so it is clamped there. It is also left
    at 1 where the fitted one would merge float32 probabilities of a model with some spread and lose ranking (lower
    AUC)."""
    z = _logits(loaded, images)  # float32, with the checkpoint's test-time augmentation
    pos = loaded.info.positive_index
    name = loaded.info.backbone
    z2 = np.stack([z[:, 1 - pos], z[:, pos]], axis=1).astype(np.float64)  # column 1 = covid, as metrics expects
    fitted = fit_temperature(z2, y, bounds=bounds)
    before = _probs(z, 1.0, pos)
    t, note = fitted, "fitted"
    if fitted <= bounds[0] * 1.001:
        note = (
            f"fitted temperature {fitted:.4g} at the lower bound of its search {list(bounds)} (validation perfectly "
            "separated: "
            "every probability would be 0 or 1): temperature 1 kept"
        )
        log.warning("%s: %s", name, note)
        t = 1.0
    elif fitted >= bounds[1] / 1.001:
        note = (
            f"fitted temperature {fitted:.4g} at the upper bound of its search {list(bounds)} (no signal in the "
            "logits: "
            "every probability pulled towards the base rate): clamped there"
        )
        log.warning("%s: %s", name, note)
    if (
        t != 1.0 and len(np.unique(y)) == 2 and np.ptp(before) >= MIN_SPREAD
    ):  # (a constant output has no ranking to lose)
        from sklearn.metrics import roc_auc_score

        if roc_auc_score(y, _probs(z, t, pos)) < roc_auc_score(y, before):
            note = (
                f"fitted temperature {fitted:.4g} merges float32 probabilities (lower validation AUC): "
                "temperature 1 kept"
            )
            log.warning("%s: %s", name, note)
            t = 1.0
    after = before if t == 1.0 else _probs(z, t, pos)
    f = validation_figures(y, after, target_sensitivity)
    return Calibration(
        temperature=float(t),
        ece_before=expected_calibration_error(y, before),
        ece_after=f["ece"],
        threshold=f["threshold"],
        sensitivity=f["sensitivity"],
        specificity=f["specificity"],
        auc=f["auc"],
        n=int(len(y)),
        fitted_temperature=float(fitted),
        note=note,
        separates=f["separates"],
        spread=f["spread"],
    )


def export_calibrated(
    checkpoint_dir: str, images: np.ndarray, y: np.ndarray, target_sensitivity: float, output: str, provenance: dict
) -> tuple[ModelInfo, Calibration, np.ndarray]:
    """Calibrate the checkpoint in ``checkpoint_dir`` on validation and save it to ``output`` with its temperature and
    new threshold; returns the saved info, the calibration and the validation probabilities of the export.

    Every exported figure (AUC, threshold, specificity, sensitivity, ECE after) is computed from the float32
    probabilities the exported checkpoint gives when loaded as scoring loads it (``load_checkpoint``, fused), not
    from the float64 calibration: a tiny temperature can make differences of 1e-8 look like a perfect model.
    ``Calibration.separates`` is False for a model whose probabilities do not separate the classes (AUC <= 0.5,
    or constant output): it learned nothing."""
    loaded = load_checkpoint(checkpoint_dir, optimize=False)
    cal = calibrate(loaded, images, y, target_sensitivity)
    info = loaded.info
    info.temperature, info.threshold, info.weights_sha256 = cal.temperature, cal.threshold, ""
    save_checkpoint(loaded.model, info, output)
    probs = predict(load_checkpoint(output), images)  # through the exported checkpoint itself, as scoring loads it
    f = validation_figures(y, probs, target_sensitivity)
    cal.threshold, cal.specificity, cal.sensitivity, cal.auc = (
        f["threshold"],
        f["specificity"],
        f["sensitivity"],
        f["auc"],
    )
    cal.ece_after, cal.separates, cal.spread = f["ece"], f["separates"], f["spread"]
    info.threshold, info.weights_sha256 = cal.threshold, ""
    info.provenance = {
        **provenance,
        "calibration": {
            "method": "temperature scaling fitted on validation (NLL)",
            "temperature": cal.temperature,
            "fitted_temperature": cal.fitted_temperature,
            "temperature_bounds": list(TEMPERATURE_BOUNDS),
            "note": cal.note,
            "ece_before": cal.ece_before,
            "ece_after": cal.ece_after,
            "n": cal.n,
            "ece_bins": 15,
        },
    }
    info.provenance.setdefault("validation", {}).update(
        {
            "val_auc": cal.auc,
            "val_spec_at_target": cal.specificity,
            "val_sens_at_threshold": cal.sensitivity,
            "val_threshold": cal.threshold,
            "separates_classes": cal.separates,
            "probability_spread": cal.spread,
            "figures_from": "float32 probabilities of this checkpoint as exported "
            "(load_checkpoint, as scoring loads it)",
        }
    )
    info.provenance["threshold_rule"] = (
        f"highest threshold keeping validation sensitivity >= {target_sensitivity} (calibrated probabilities)"
    )
    if not cal.separates:
        info.provenance["validation"]["warning"] = (
            "its validation probabilities do not separate the classes: it learned nothing"
        )
    info = save_checkpoint(loaded.model, info, output)
    return info, cal, probs


# --------------------------------------------------------------------------- ranking


def _finite(x, default=-1.0) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def rank_key(row: dict) -> tuple:
    """Specificity at the target sensitivity first, ROC AUC breaks ties. (With ``holdout_by`` the mean held-out
    ROC AUC comes before both: :func:`trial_rows`.)"""
    return (_finite(row.get("val_spec_at_target")), _finite(row.get("val_auc")))


def trial_rows(results, epochs: int) -> list[dict]:
    """One leaderboard row per trial: its best epoch (by :func:`rank_key`, earliest on ties) and its history."""
    rows = []
    # Trial status (TERMINATED, ERROR, or RUNNING/PENDING/PAUSED when the search was interrupted); ResultGrid has no
    # public accessor for it, so fall back to "unknown" if this private one moves.
    analysis = getattr(results, "_experiment_analysis", None)
    status = {t.trial_id: t.status for t in getattr(analysis, "trials", None) or []}
    for r in results:
        df = r.metrics_dataframe
        trial_id = os.path.basename(r.path).split("_")[1] if r.path and "_" in os.path.basename(r.path) else ""
        trial_id = (r.metrics or {}).get("trial_id", trial_id)
        base = {
            "trial_id": trial_id,
            "status": status.get(trial_id, "unknown"),
            "backbone": r.config.get("backbone"),
            "lr": r.config.get("lr"),
            "covid_weight_scale": r.config.get("covid_weight_scale"),
            "error": "" if r.error is None else type(r.error).__name__,
        }
        if df is None or df.empty or "epoch" not in df:
            rows.append({**base, "epochs_run": 0, "history": []})
            continue
        records = df.to_dict("records")
        # the epochs' reports; with holdout_by the trial's last report carries the held-out figures instead
        history = [h for h in records if _finite(h.get("epoch")) >= 0]
        held = [h for h in records if "holdout_auc" in h and _finite(h.get("epoch")) < 0]
        best = max(history, key=lambda h: (*rank_key(h), -int(h["epoch"])))
        rows.append(
            {
                **base,
                "epochs_run": int(df["epoch"].max()) + 1,
                "stopped_early": bool(status.get(trial_id) == "TERMINATED" and df["epoch"].max() + 1 < epochs),
                "best_epoch": int(best["epoch"]),
                **{
                    k: best.get(k)
                    for k in ("val_auc", "val_spec_at_target", "val_sens_at_threshold", "val_threshold", "val_loss")
                },
                "seconds_per_epoch": float(df["epoch_seconds"].mean()),
                "train_images_per_s": float(df["train_images_per_s"].mean()),
                **({k: held[-1].get(k) for k in ("holdout_auc", "holdout_pooled_auc")} if held else {}),
                "history": history,
            }
        )
    rows.sort(key=lambda row: (_finite(row.get("holdout_auc")), *rank_key(row)), reverse=True)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


# --------------------------------------------------------------------------- leaderboard


LEADERBOARD_COLUMNS = [
    "rank",
    "kind",
    "status",
    "backbone",
    "weights",
    "trial_id",
    "lr",
    "covid_weight_scale",
    "covid_weight",
    "epochs_run",
    "stopped_early",
    "best_epoch",
    "holdout_auc",
    "holdout_pooled_auc",
    "val_auc",
    "val_spec_at_target",
    "val_sens_at_threshold",
    "val_threshold",
    "val_loss",
    "seconds_per_epoch",
    "train_images_per_s",
    "temperature",
    "ece_before",
    "ece_after",
    "separates",
    "exported_to",
    "members",
    "error",
]


def write_leaderboard(rows: list[dict], output: str) -> None:
    import pandas as pd

    df = pd.DataFrame([{k: r.get(k) for k in LEADERBOARD_COLUMNS} for r in rows], columns=LEADERBOARD_COLUMNS)
    for col in ("rank", "epochs_run", "best_epoch"):  # counts stay integers where the ensemble row has none
        df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
    storage.write_bytes(storage.join(output, "leaderboard.csv"), df.to_csv(index=False).encode())


def plot_leaderboard(models: list[dict], output: str) -> None:
    """Validation figures of the exported models and the ensemble (left), time per epoch per backbone (right)."""
    import io

    from matplotlib.figure import Figure

    names = [m["backbone"] + ("\n(learned nothing)" if m.get("separates") is False else "") for m in models]
    figures = [
        ("val_auc", "ROC AUC"),
        ("val_spec_at_target", "specificity at target sensitivity"),
        ("val_sens_at_threshold", "sensitivity at threshold"),
    ]
    fig = Figure(figsize=(11, 4.2))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    x = np.arange(len(names))
    width = 0.8 / len(figures)
    for i, (key, label) in enumerate(figures):
        vals = [_finite(m.get(key), np.nan) for m in models]
        bars = ax.bar(x + (i - 1) * width, vals, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.25)
    ax.set_title("validation (calibrated, at the validation-chosen threshold)", fontsize=9, pad=4)
    ax.legend(fontsize=7, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 1.0), frameon=False)
    single = [m for m in models if m.get("kind") != "ensemble"]
    secs = [_finite(m.get("seconds_per_epoch"), 0.0) for m in single]
    ax2.barh([m["backbone"] for m in single], secs, color="#888888")
    for i, s in enumerate(secs):
        ax2.text(s, i, f" {s:.0f}s", va="center", fontsize=7)
    ax2.set_xlabel("seconds per epoch (mean over the trial)", fontsize=8)
    ax2.tick_params(labelsize=8)
    ax2.set_title("training time", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    storage.write_bytes(storage.join(output, "leaderboard.png"), buf.getvalue())


# --------------------------------------------------------------------------- the search


def _tune_imports():
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    return tune, ASHAScheduler


def _stored_config(output: str, settings) -> dict | None:
    uri = storage.join(output, "search_config.json")
    return json.loads(storage.read_bytes(uri, settings)) if storage.exists(uri, settings) else None


def run_search(cfg: SearchConfig) -> SearchResult:
    """Run (or resume) the search, then calibrate and export. Raises InputError for unusable data.

    Phases: check or resume the stored search (:func:`_open_search`); decode the data once and plan the trials;
    run them with Ray Tune (:func:`_tuner`); collect the trials (:func:`_collect_trials`); calibrate and export
    the best model per backbone and their ensemble; write the leaderboard and summary (:func:`_write_summary`)."""
    tune, ASHAScheduler = _tune_imports()
    started = time.perf_counter()
    settings = storage.s3_settings()
    cfg.check()
    experiment, tune_path, tune_fs, resumed = _open_search(cfg, settings, tune)
    base = _base_config(cfg)
    weights = weights_per_backbone(list(cfg.backbones), cfg.weights)
    data = prepare_data(base, settings)  # decoded once, shared by every trial through the object store
    holdouts = None
    if cfg.holdout_by:  # each held-out group's training side and held-out rows, decoded once for every trial
        from .holdout import prepare_holdouts

        holdouts = prepare_holdouts(base, data.files, data.spec, settings)
    cpus, concurrent = _plan_search(cfg, base)

    runs_path, runs_fs = storage.ray_storage(storage.join(cfg.output, "_tune", "runs"), settings)
    fail_marker = os.path.join(
        tempfile.gettempdir(), "cxr-tune-fail-" + hashlib.sha256(experiment.encode()).hexdigest()[:16]
    )
    crash = crash_at_epoch()  # the test-only crash hook, passed to the trials (they do not see this environment)
    if crash is None and os.path.exists(fail_marker):
        os.remove(fail_marker)
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            data=data,
            base=asdict(base),
            weights=weights,
            runs_path=runs_path,
            runs_fs=runs_fs,
            fail_marker=fail_marker,
            crash_at_epoch=crash,
            holdouts=holdouts,
        ),
        {"CPU": DRIVER_CPUS},
    )
    tuner = _tuner(cfg, trainable, experiment, tune_path, tune_fs, resumed, concurrent)
    results = tuner.fit()
    _remove_leaked_train_groups({"CPU": cpus, **({"GPU": cfg.gpus_per_trial} if cfg.gpus_per_trial else {})})
    rows, errors, unfinished = _collect_trials(results, cfg, data, weights)
    exported, models, val_probs = _export(cfg, data, rows, results, settings)
    ensemble_uri, y = None, None
    usable, no_ensemble = usable_members(models)
    if exported:
        if no_ensemble:
            log.warning("no ensemble exported: %s", no_ensemble)
        else:
            images, y = validation_arrays(data)
            ensemble_uri, ens_row = _export_ensemble(
                cfg, data, exported, {b: val_probs[b] for b in usable}, y, settings
            )
            models.append(ens_row)
            rows.append(ens_row)
        plot_leaderboard(models, cfg.output)
    write_leaderboard(rows, cfg.output)
    seconds = time.perf_counter() - started
    summary = _write_summary(
        cfg, settings, rows, models, ensemble_uri, no_ensemble, errors, unfinished, seconds, resumed, concurrent, cpus
    )
    return SearchResult(
        cfg.output,
        rows,
        exported,
        ensemble_uri,
        summary["trials"],
        errors,
        seconds,
        resumed,
        unfinished,
        summary["models"],
    )


def _plan_search(cfg: SearchConfig, base: TrainConfig) -> tuple[float, int]:
    """CPUs per trial and trials at a time for the cluster up now (:func:`plan_trials`), set into ``base``;
    logged. Returns (CPUs per trial, concurrent trials)."""
    import ray

    from .runtime import ensure_ray

    ensure_ray()
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    cpus, concurrent = plan_trials(
        node_cpus, ray.cluster_resources().get("GPU", 0.0), cfg.cpus_per_trial, cfg.gpus_per_trial, cfg.max_concurrent
    )
    base.cpus_per_worker = cpus
    base.threads_per_worker = max(1, math.ceil(cpus))
    trials = len(cfg.backbones) * cfg.num_samples
    log.info(
        "search: %d backbones x %d samples = %d trials, %d epochs, %d at a time (%.2f CPU + %.2g GPU each, driver "
        "%.2f CPU)",
        len(cfg.backbones),
        cfg.num_samples,
        trials,
        cfg.epochs,
        concurrent,
        cpus,
        cfg.gpus_per_trial,
        DRIVER_CPUS,
    )
    return cpus, concurrent


def _open_search(cfg: SearchConfig, settings, tune) -> tuple[str, str, object, bool]:
    """Where the search lives, and whether an interrupted one is resumed there: a stored search with other
    settings is refused (OutputError); a resumed one takes its stored settings; a new one checks its data and
    ImageNet weights first (InputError, CheckpointError) and stores its settings. Returns (experiment path,
    Tune storage path, its filesystem, resumed)."""
    tune_fs, tune_path = storage.filesystem(storage.join(cfg.output, "_tune"), settings)
    tune_path = tune_path if storage.is_s3(cfg.output) else os.path.abspath(tune_path)
    tune_fs = tune_fs if storage.is_s3(cfg.output) else None
    experiment = tune_path.rstrip("/") + "/" + SEARCH_NAME
    stored = _stored_config(cfg.output, settings)
    resumed = stored is not None and tune.Tuner.can_restore(experiment, storage_filesystem=tune_fs)
    if resumed:
        changed = {
            k: (stored[k], getattr(cfg, k))
            for k in _SEARCH_KEYS
            if k in stored and json.loads(json.dumps(getattr(cfg, k))) != stored[k]
        }
        if changed:
            from .errors import OutputError

            raise OutputError(
                f"{cfg.output} holds a search with other settings "
                f"({'; '.join(f'{k}: {a!r} there, {b!r} asked' for k, (a, b) in changed.items())}); "
                "run it with its own settings (search_config.json) to resume it, or give another --output"
            )
        for k in _SEARCH_KEYS:
            if k in stored:
                setattr(cfg, k, tuple(stored[k]) if k.endswith("_range") or (k == "crop" and stored[k]) else stored[k])
        check_imagenet_weights(list(cfg.backbones), cfg.weights)
        log.info("resuming the interrupted search in %s", experiment)
    else:
        from .data import labelled_files

        labelled_files(
            cfg.data, "train", settings, cfg.label_map
        )  # bad data fails here (InputError), before anything is written
        check_imagenet_weights(list(cfg.backbones), cfg.weights)  # so do missing ImageNet weights (CheckpointError)
        storage.write_bytes(
            storage.join(cfg.output, "search_config.json"), json.dumps(asdict(cfg), indent=2).encode(), settings
        )

    return experiment, tune_path, tune_fs, resumed


def _base_config(cfg: SearchConfig) -> TrainConfig:
    """The training configuration every trial starts from (each trial sets its backbone, weights, learning rate
    and class weight)."""
    return TrainConfig(
        data=cfg.data,
        output=cfg.output,
        weights=cfg.weights,
        epochs=cfg.epochs,
        oversample=cfg.oversample,
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        crop=cfg.crop,
        equalize=cfg.equalize,
        tta=cfg.tta,
        val_fraction=cfg.val_fraction,
        label_map=cfg.label_map,
        balance_by=cfg.balance_by,
        holdout_by=cfg.holdout_by,
        target_sensitivity=cfg.target_sensitivity,
        gpu=cfg.gpus_per_trial > 0,
        seed=cfg.seed,
        max_failures=cfg.max_failures,
    )


def _tuner(cfg: SearchConfig, trainable, experiment: str, tune_path: str, tune_fs, resumed: bool, concurrent: int):
    """The Tuner: restored from ``experiment`` (unfinished and errored trials run again), or a new ASHA search."""
    tune, ASHAScheduler = _tune_imports()
    if resumed:
        tuner = tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, restart_errored=True, storage_filesystem=tune_fs
        )
    else:
        # max_t one past the last epoch: a trial that reaches it is stopped by Tune at once, killing its Train
        # controller before it releases its resource reservation (held for minutes, starving Ray Data). Trials
        # that run all epochs end by themselves instead.
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.epochs + 1,
            grace_period=min(cfg.grace_period, cfg.epochs),
            reduction_factor=cfg.reduction_factor,
        )
        if cfg.holdout_by:  # ranked by the held-out AUC each trial reports last: no stopping on validation
            from ray.tune.schedulers import FIFOScheduler

            scheduler = FIFOScheduler()
        tuner = tune.Tuner(
            trainable,
            param_space={
                "backbone": tune.grid_search(list(cfg.backbones)),
                "lr": tune.loguniform(*cfg.lr_range),
                "covid_weight_scale": tune.loguniform(*cfg.covid_weight_range),
            },
            tune_config=tune.TuneConfig(
                metric=None if cfg.holdout_by else "val_score",
                mode=None if cfg.holdout_by else "max",
                scheduler=scheduler,
                num_samples=cfg.num_samples,
                max_concurrent_trials=concurrent,
            ),
            run_config=tune.RunConfig(
                name=SEARCH_NAME,
                storage_path=tune_path,
                storage_filesystem=tune_fs,
                failure_config=tune.FailureConfig(max_failures=cfg.trial_max_failures),
            ),
        )
    return tuner


def _collect_trials(results, cfg: SearchConfig, data, weights: dict) -> tuple[list[dict], int, int]:
    """The leaderboard rows of the trials (with the class weight and ImageNet weights each used), and how many
    failed and how many did not finish (each with a warning)."""
    rows = trial_rows(results, cfg.epochs)
    errors = sum(1 for r in rows if r["error"])
    unfinished = sum(1 for r in rows if r["status"] not in ("TERMINATED", "ERROR"))
    if unfinished:
        log.warning(
            "%d of %d trials did not finish (interrupted); run the same command again to resume them",
            unfinished,
            len(rows),
        )
    for row in rows:
        row["kind"] = "trial"
        if row.get("covid_weight_scale") is not None:
            row["covid_weight"] = data.balanced_covid_weight * row["covid_weight_scale"]
    if errors:
        log.warning("%d of %d trials failed; run the same command again to resume them", errors, len(rows))

    for row in rows:
        row["weights"] = weights.get(row.get("backbone"), "")
    return rows, errors, unfinished


def _write_summary(
    cfg: SearchConfig,
    settings,
    rows: list[dict],
    models: list[dict],
    ensemble_uri: str | None,
    no_ensemble: str | None,
    errors: int,
    unfinished: int,
    seconds: float,
    resumed: bool,
    concurrent: int,
    cpus: float,
) -> dict:
    """summary.json in the output: the search's counts, resources, the exported models and the ensemble."""
    summary = {
        "trials": len(rows) - (1 if ensemble_uri else 0),
        "errors": errors,
        "unfinished": unfinished,
        "seconds": round(seconds, 1),
        "resumed": resumed,
        "concurrent_trials": concurrent,
        "cpus_per_trial": cpus,
        "gpus_per_trial": cfg.gpus_per_trial,
        "models": {
            m["backbone"]: {
                k: m.get(k)
                for k in (
                    "exported_to",
                    "val_auc",
                    "val_spec_at_target",
                    "val_sens_at_threshold",
                    "val_threshold",
                    "temperature",
                    "ece_before",
                    "ece_after",
                    "separates",
                )
            }
            for m in models
        },
        "ensemble": {
            "exported_to": ensemble_uri,
            "members": next((m["members"].split("+") for m in models if m["kind"] == "ensemble"), []),
            "reason": None if ensemble_uri else (no_ensemble or "no model was exported"),
        },
    }
    storage.write_bytes(
        storage.join(cfg.output, "summary.json"), json.dumps(summary, indent=2, default=str).encode(), settings
    )
    return summary


def _remove_leaked_train_groups(bundle: dict, grace_s: float = 5.0) -> int:
    """Remove placement groups of this job's finished Ray Train runs that Ray left behind.

    A Train run whose controller is killed mid-shutdown (Tune stopping or failing a trial) can leave its
    workers' placement group alive; Train's PlacementGroupCleaner should remove it but fails when the state
    API cannot resolve the cluster address (seen with ``ray start --temp-dir`` clusters on Ray 2.60), and the
    reserved CPUs then starve Ray Data and the score actors. Called once every trial has ended: only
    placement groups of this job with the Train workers' bundle shape are removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    time.sleep(grace_s)  # let runs that are still shutting down remove their own
    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for pg_id, entry in placement_group_table().items():
        bundles = list((entry.get("bundles") or {}).values())
        if entry.get("state") != "CREATED" or not pg_id.endswith(job) or not bundles:
            continue
        if all({k: v for k, v in b.items() if k in ("CPU", "GPU")} == bundle for b in bundles):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
    if removed:
        log.warning("removed %d placement group(s) left behind by finished Ray Train runs", removed)
    return removed


def _checkpoint_of(history: list[dict], best_epoch: int, fs) -> str | None:
    """The stored checkpoint of ``best_epoch``, else of the best epoch still kept."""
    import pyarrow.fs as pafs

    def exists(p):
        return isinstance(p, str) and p and fs.get_file_info(p.rstrip("/") + "/model.json").type == pafs.FileType.File

    for h in sorted(history, key=lambda h: (int(h["epoch"]) != best_epoch, *(-v for v in rank_key(h)))):
        if exists(h.get("checkpoint_path")):
            return h["checkpoint_path"]
    return None


def _export(cfg: SearchConfig, data: PreparedData, rows: list[dict], results, settings):
    """Per backbone: the best trial's best checkpoint, calibrated on validation, to ``models/<backbone>/``.

    Long on purpose: one loop over the backbones whose body is the export of one model (best trial, its
    checkpoint, calibration, the checkpoint written, its leaderboard row), sharing the validation arrays across
    backbones."""
    import ray.train

    from .data import class_counts, fingerprint

    runs_fs, _ = storage.filesystem(storage.join(cfg.output, "_tune", "runs"), settings)
    if not storage.is_s3(cfg.output):
        import pyarrow.fs as pafs

        runs_fs = pafs.LocalFileSystem()
    images = y = None
    exported, models, val_probs = {}, [], {}
    for backbone in cfg.backbones:
        # A failed trial is not exported, however well its last checkpoint ranks: its run did not finish (the
        # next run of the same command restarts it from that checkpoint). Interrupted trials are, as they stand.
        candidates = [r for r in rows if r["backbone"] == backbone and r.get("history") and not r["error"]]
        if not candidates and any(r["backbone"] == backbone and r["error"] for r in rows):
            log.warning("%s: every trial failed; nothing exported for it", backbone)
        for row in candidates:  # rows are ranked already
            path = _checkpoint_of(row["history"], row["best_epoch"], runs_fs)
            if path is None:
                continue
            if images is None:
                images, y = validation_arrays(data)
            out = storage.join(cfg.output, "models", backbone)
            provenance = {
                "data": {
                    "uri": cfg.data,
                    "fingerprint": fingerprint(data.files),
                    "counts": data.counts,
                    "train": class_counts(data.train_files),
                    "validation": class_counts(data.val_files),
                    "undecodable": data.undecodable,
                },
                "training": {
                    "backbone": backbone,
                    "weights": row["weights"],
                    "epochs": cfg.epochs,
                    "lr": row["lr"],
                    "covid_weight": row["covid_weight"],
                    "oversample": cfg.oversample,
                    "batch_size": cfg.batch_size,
                    "image_size": cfg.image_size,
                    "seed": cfg.seed,
                    "tta": cfg.tta,
                    "best_epoch": row["best_epoch"],
                    "epochs_run": row["epochs_run"],
                },
                "tune": {
                    "trial_id": row["trial_id"],
                    "rank": row["rank"],
                    "trials": len(rows),
                    "selection": (
                        "mean ROC AUC inside held-out " + cfg.holdout_by + " groups, then " if cfg.holdout_by else ""
                    )
                    + "specificity at target sensitivity, ties by ROC AUC",
                },
                "validation": {
                    k: row.get(k)
                    for k in ("val_auc", "val_spec_at_target", "val_sens_at_threshold", "val_threshold", "val_loss")
                },
            }
            with tempfile.TemporaryDirectory() as d:
                ray.train.Checkpoint(path, filesystem=runs_fs).to_directory(d)
                info, cal, probs = export_calibrated(d, images, y, cfg.target_sensitivity, out, provenance)
            write_metrics_csv(
                [{k: v for k, v in h.items() if not str(k).startswith("config/")} for h in row["history"]],
                storage.join(out, "metrics.csv"),
            )
            import io

            buf = io.BytesIO()
            np.save(buf, np.stack([probs, y.astype(np.float32)]))
            storage.write_bytes(storage.join(out, "val_scores.npy"), buf.getvalue(), settings)
            row.update(
                {
                    "temperature": cal.temperature,
                    "ece_before": cal.ece_before,
                    "ece_after": cal.ece_after,
                    "exported_to": out,
                    "separates": cal.separates,
                }
            )
            log.info(
                "exported %s (trial %s, epoch %d): T=%.3f%s, ECE %.4f -> %.4f, validation AUC %.3f, specificity %.3f "
                "at sensitivity %.3f "
                "(threshold %.6g) -> %s",
                backbone,
                row["trial_id"],
                row["best_epoch"],
                cal.temperature,
                "" if cal.note == "fitted" else " (not as fitted: see the warning above)",
                cal.ece_before,
                cal.ece_after,
                cal.auc,
                cal.specificity,
                cal.sensitivity,
                cal.threshold,
                out,
            )
            if not cal.separates:
                log.warning(
                    "%s learned nothing: its validation probabilities do not separate the classes (AUC %.3f, spread "
                    "%.2g); "
                    "exported for inspection, left out of the ensemble",
                    backbone,
                    cal.auc,
                    cal.spread,
                )
            exported[backbone] = out
            val_probs[backbone] = probs
            models.append(
                {
                    **row,
                    "kind": "model",
                    "val_auc": cal.auc,
                    "val_spec_at_target": cal.specificity,
                    "val_sens_at_threshold": cal.sensitivity,
                    "val_threshold": cal.threshold,
                }
            )
            break
        else:
            log.warning("no checkpoint to export for %s", backbone)
    return exported, models, val_probs


def ensemble_figures(p: np.ndarray, y: np.ndarray, target: float) -> dict:
    f = validation_figures(y, p, target)
    return {
        "val_auc": f["auc"],
        "val_spec_at_target": f["specificity"],
        "val_sens_at_threshold": f["sensitivity"],
        "val_threshold": f["threshold"],
        "val_ece": f["ece"],
        "separates": f["separates"],
    }


def choose_members(
    val_probs: dict[str, np.ndarray], y: np.ndarray, target: float
) -> tuple[list[str], dict, list[dict]]:
    """The subset of two or more models whose mean probability ranks best on validation (:func:`rank_key`; ties:
    more members). Exhaustive: at most 26 subsets for five backbones. ``val_probs`` should hold only models that
    separate the classes (:func:`usable_members`); a weak one is still left out where it would lower the ranking.
    The mean is the ensemble checkpoint's own (float32), so the figures are those it gives."""
    from itertools import combinations

    names = list(val_probs)
    if len(names) < 2:
        raise ValueError(f"an ensemble needs two or more models, got {names}")
    tried = []
    for k in range(2, len(names) + 1):
        for subset in combinations(names, k):
            figures = ensemble_figures(
                np.stack([val_probs[n] for n in subset]).mean(axis=0).astype(np.float32), y, target
            )
            tried.append({"members": list(subset), **figures})
    best = max(tried, key=lambda t: (*rank_key(t), len(t["members"])))
    return best["members"], {k: v for k, v in best.items() if k != "members"}, tried


def usable_members(models: list[dict]) -> tuple[list[str], str | None]:
    """The exported models an ensemble may take (those whose validation probabilities separate the classes), and why
    there is no ensemble (None when there are two or more)."""
    singles = [m for m in models if m.get("kind") == "model"]
    usable = [m["backbone"] for m in singles if m.get("separates", True)]
    if len(usable) >= 2:
        return usable, None
    left_out = [m["backbone"] for m in singles if not m.get("separates", True)]
    reason = (
        f"an ensemble needs two or more exported models that separate the classes on validation; "
        f"{len(usable)} did ({', '.join(usable) or 'none'})"
    )
    if left_out:
        reason += f"; learned nothing: {', '.join(left_out)}"
    return usable, reason


def _export_ensemble(cfg: SearchConfig, data: PreparedData, exported: dict, val_probs: dict, y: np.ndarray, settings):
    members, validation, tried = choose_members(val_probs, y, cfg.target_sensitivity)
    out = storage.join(cfg.output, "ensemble")
    info = save_ensemble(
        {m: exported[m] for m in members},
        out,
        validation["val_threshold"],
        {
            "members": members,
            "combination": "mean of the members' calibrated probabilities",
            "member_selection": "the subset of the exported models ranking best on validation "
            "(specificity at target sensitivity, ties ROC AUC)",
            "subsets_tried": [
                {"members": t["members"], "val_spec_at_target": t["val_spec_at_target"], "val_auc": t["val_auc"]}
                for t in tried
            ],
            "threshold_rule": f"highest threshold keeping validation sensitivity >= {cfg.target_sensitivity}",
            "validation": validation,
            "data": {"uri": cfg.data, "validation_n": int(len(y))},
        },
        settings,
    )
    log.info(
        "exported the ensemble of %s: validation specificity %.3f at sensitivity %.3f (threshold %.4f) -> %s",
        ", ".join(members),
        validation["val_spec_at_target"],
        validation["val_sens_at_threshold"],
        validation["val_threshold"],
        out,
    )
    row = {
        "kind": "ensemble",
        "backbone": "ensemble",
        "rank": "",
        **validation,
        "exported_to": out,
        "members": "+".join(members),
        "seconds_per_epoch": None,
        "trial_id": info.model_id,
    }
    return out, row


__all__ = [
    "SearchConfig",
    "SearchResult",
    "Calibration",
    "run_search",
    "calibrate",
    "export_calibrated",
    "plan_trials",
    "rank_key",
    "trial_rows",
    "CheckpointError",
]
