"""Fine-tuning on Ray Train (Train V2): the per-worker loop apart from the driver that builds the trainer.

Driver (:func:`train`):
    labelled files -> patient-grouped stratified train/validation split
    -> Ray Data: decode + preprocess once (the scoring function), materialised in the object store;
       the COVID rows repeated ``oversample`` times (each copy augmented differently every epoch)
    -> ``TorchTrainer(train_loop_per_worker)``, data-parallel, CPU or GPU, FailureConfig resumes
    -> best checkpoint by validation specificity at the target sensitivity (ties: ROC AUC)
    -> with ``threshold_folds`` K > 1: the same training on the other folds of the K-fold split, and the
       threshold chosen from all folds' out-of-fold scores (every training image scored once, by a model
       that did not see it; pooled by operating point) instead of one small validation split
    -> with ``seeds`` N > 1: N models per split that differ only in their seed (initialisation, batch order,
       augmentation), the split's scores the mean of their probabilities, and the output an ensemble checkpoint
    -> output: ``model.safetensors`` + ``model.json`` (threshold chosen on validation), ``config.json``,
       ``metrics.csv`` (per epoch), and Ray Train's run folder ``_ray/`` (``_ray_seed<i>/`` for more seeds).

Worker (:func:`train_loop_per_worker`): augmentation (both classes alike, so the augmentation itself is
no class cue), class-weighted cross-entropy, AdamW with cosine decay, mixed precision on GPU, and per
epoch a full validation pass whose probabilities are gathered from all workers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass, fields, replace

import numpy as np

from . import storage
from .augment import AugmentConfig
from .checkpoint import ModelInfo, save_checkpoint
from .configs import TrainConfig
from .data import (
    LabelledFile,
    apply_groups,
    balance_weights,
    class_counts,
    cv_folds,
    fingerprint,
    group_values,
    holdout_splits,
    labelled_files,
    split_train_val,
)
from .errors import InputError
from .preprocess import PreprocessSpec
from .runtime import ensure_ray, torch_worker_runtime_env

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"
HISTORY = "history.json"  # every epoch's metrics so far, carried from checkpoint to checkpoint
CONFIG = "config.json"  # the run's settings: written before training starts, completed when it ends
PROGRESS_EVERY_S = 60.0  # within an epoch, a progress line at most this often ($CXR_PROGRESS_EVERY_S)
# TrainConfig fields that may change when an interrupted run is resumed (where and how it runs, not what it
# learns); every other field, present or future, makes a different run.
RESUMABLE_WITH = frozenset({"output", "workers", "cpus_per_worker", "threads_per_worker", "gpu", "max_failures"})


# --------------------------------------------------------------------------- worker side


def _val_scores(model, shard, spec, device, batch_size: int, tta: str = "none") -> tuple[np.ndarray, np.ndarray, float]:
    import torch

    from .models import forward_tta
    from .preprocess import to_model_input

    model.eval()
    probs, labels, loss_sum = [], [], 0.0
    with torch.inference_mode():
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            x = to_model_input(batch["image"], spec).to(device)
            y = torch.tensor(batch["label"], dtype=torch.long, device=device)  # a copy: Ray's arrays are read-only
            logits = forward_tta(model, x, tta)  # as the checkpoint will score: threshold and metrics hold for it
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            probs.append(torch.softmax(logits, 1)[:, 1].cpu().numpy())
            labels.append(batch["label"])
    p = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    return p, y, loss_sum


def _gather(*arrays):
    """Concatenate per-worker arrays on every worker (torch.distributed is set up by TorchTrainer)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arrays
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, arrays)
    return tuple(np.concatenate([o[i] for o in out]) for i in range(len(arrays)))


def validation_metrics(y: np.ndarray, p: np.ndarray, target: float) -> dict:
    from sklearn.metrics import roc_auc_score

    from .metrics import choose_threshold

    if len(np.unique(y)) < 2:
        return {
            "val_auc": float("nan"),
            "val_spec_at_target": float("nan"),
            "val_threshold": 0.5,
            "val_score": float("nan"),
        }
    t = choose_threshold(y, p, target)
    spec = float(np.mean(p[y == 0] < t))
    auc = float(roc_auc_score(y, p))
    sens = float(np.mean(p[y == 1] >= t))
    return {
        "val_auc": auc,
        "val_spec_at_target": spec,
        "val_sens_at_threshold": sens,
        "val_threshold": float(t),
        "val_score": spec + 1e-3 * auc,
    }


def epoch_batches(shard, batch_size: int, rng: np.random.Generator):
    """One epoch of a worker's training rows (numpy batches), varied per epoch by a local shuffle buffer of a
    few batches; the rows' global order is random already (:func:`prepare_split` shuffles them once)."""
    return shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        local_shuffle_buffer_size=4 * batch_size,
        local_shuffle_seed=int(rng.integers(2**31)),
    )


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: set up (or resume after a failure), then per epoch train, validate and
    report (rank 0 with a checkpoint)."""
    import ray.train
    import torch
    from ray.train.torch import get_device

    from .models import input_normalization

    cfg = TrainConfig(**config["train"])
    # the data's preprocessing, normalised as the backbone's weights expect (one prepared data set serves every
    # backbone of a search); the checkpoint records it, so scoring normalises the same way
    spec = replace(PreprocessSpec.from_dict(config["preprocess"]), **input_normalization(cfg.backbone))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(cfg.seed + rank)
    device = get_device()
    model, optimizer, scheduler, start_epoch, history, resumed = _start_or_resume(cfg, use_amp=device.type == "cuda")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.epochs):
        start = time.perf_counter()
        trained = _train_epoch(model, optimizer, cfg, spec, device, epoch, rank, world, config)
        scheduler.step()
        p, y, val_loss = _val_scores(model, val_shard, spec, device, cfg.batch_size * 2, cfg.tta)
        p, y, losses = _gather(p, y, np.array([val_loss]))
        metrics = {
            "epoch": epoch,
            "train_loss": trained["train_loss"],
            "val_loss": float(np.sum(losses) / max(1, len(y))),
            "train_images_per_s": trained["train_images_per_s"],
            "epoch_seconds": time.perf_counter() - start,
            "data_wait_s": trained["data_wait_s"],  # time the loop waited for the next batch: > a few % = input-bound
            "lr": scheduler.get_last_lr()[0],
            "val_n": int(len(y)),
            "val_positives": int(np.sum(y)),
            **validation_metrics(y, p, cfg.target_sensitivity),
        }
        history.append({**metrics, "resumed": resumed and epoch == start_epoch})
        _report_epoch(metrics, history, model, optimizer, cfg, spec, p, y, rank, config["label"])


def _start_or_resume(cfg: TrainConfig, use_amp: bool):
    """The worker's model, optimiser and schedule: new, or restored from the last report's checkpoint after a
    failure (weights, optimiser state, epoch and history). Returns (model, optimizer, scheduler, first epoch to
    run, history so far, whether it resumed)."""
    import ray.train
    import torch
    from ray.train.torch import prepare_model
    from safetensors.torch import load_file

    from .models import create_model

    checkpoint = ray.train.get_checkpoint()
    model = create_model(cfg.backbone, weights=cfg.weights if not checkpoint else "none")
    if use_amp:
        model = model.to(memory_format=torch.channels_last)
    optimizer_state, start_epoch, history = None, 0, []
    if checkpoint:  # resuming after a failure: weights, optimiser and epoch from the last report
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
            state = torch.load(os.path.join(d, TRAIN_STATE), map_location="cpu", weights_only=True)
            optimizer_state, start_epoch = state["optimizer"], int(state["epoch"]) + 1
            with open(os.path.join(d, HISTORY)) as f:
                history = json.load(f)
    model = prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, cfg.epochs), last_epoch=start_epoch - 1 if start_epoch else -1
    )
    return model, optimizer, scheduler, start_epoch, history, bool(checkpoint)


def _train_epoch(model, optimizer, cfg: TrainConfig, spec, device, epoch: int, rank: int, world: int, config: dict):
    """One pass over this worker's shard of the training images (augmented); rank 0 prints a progress line every
    ``progress_every_s``. Returns the epoch's training figures for its metrics row."""
    import ray.train
    import torch

    from .augment import augment
    from .preprocess import to_model_input

    use_amp = device.type == "cuda"
    aug = AugmentConfig.from_dict(cfg.augment)
    class_weight = torch.tensor([1.0, config["covid_weight"]], device=device)
    crash_now = config["crash_at_epoch"] == epoch and rank == 0 and not os.path.exists(config["fail_marker"])
    model.train()
    rng = np.random.default_rng([cfg.seed, epoch, rank])
    start, seen, loss_sum, waited = time.perf_counter(), 0, 0.0, 0.0
    fetched = time.perf_counter()
    next_note = start + config["progress_every_s"]
    for batch in epoch_batches(ray.train.get_dataset_shard("train"), cfg.batch_size, rng):
        waited += time.perf_counter() - fetched
        images = np.stack([augment(im, rng, aug) for im in batch["image"]])
        x = to_model_input(images, spec).to(device)
        if use_amp:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.tensor(batch["label"], dtype=torch.long, device=device)  # a copy: Ray's arrays are read-only
        # each image's weight: its class's, times its own (1, or its group's share under --balance-by)
        w = class_weight[y] * torch.tensor(batch["weight"], dtype=torch.float32, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            ce = torch.nn.functional.cross_entropy(model(x).float(), y, reduction="none")
        loss = (ce * w).sum() / w.sum().clamp_min(1e-12)  # = cross_entropy(weight=class_weight) when all weigh 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
        loss_sum += loss.item() * len(y)
        fetched = time.perf_counter()
        if rank == 0 and fetched >= next_note:  # a long epoch (big data, a CPU) shows it is moving
            line = progress_line(
                epoch, cfg, seen * world, config["train_rows"], loss_sum / seen, fetched - start, config["label"]
            )
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            next_note = fetched + config["progress_every_s"]
        if crash_now:  # testing hook: a hard crash mid-epoch, as an OOM kill or a lost node looks.
            open(config["fail_marker"], "w").close()
            time.sleep(5)  # Ray Train's controller polls reports every 2 s: let it see the last one
            os._exit(1)
    train_seconds = time.perf_counter() - start
    return {
        "train_loss": loss_sum / max(1, seen),
        "train_images_per_s": seen * world / max(train_seconds, 1e-9),
        "data_wait_s": waited,
    }


def _report_epoch(metrics, history, model, optimizer, cfg: TrainConfig, spec, p, y, rank: int, label: str) -> None:
    """Report the epoch to Ray Train: rank 0 prints its line and reports with a checkpoint (weights, optimiser
    state, history, validation scores), the other ranks report the metrics alone."""
    import ray.train
    import torch

    if rank != 0:
        ray.train.report(metrics)
        return
    # The job's own progress: Ray forwards the workers' stdout to the driver's. Not print(): Train V2 patches it
    # in its workers to write to its logger *and* the wrapped stdout (every line twice).
    sys.stdout.write(epoch_line(metrics, cfg, label) + "\n")
    sys.stdout.flush()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, HISTORY), "w") as f:
            json.dump(history, f)
        info = ModelInfo(cfg.backbone, spec, threshold=metrics["val_threshold"], tta=cfg.tta)
        save_checkpoint(getattr(model, "module", model), info, d)
        torch.save({"optimizer": optimizer.state_dict(), "epoch": metrics["epoch"]}, os.path.join(d, TRAIN_STATE))
        np.save(os.path.join(d, "val_scores.npy"), np.stack([p, y.astype(np.float32)]))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def epoch_line(metrics: dict, cfg: TrainConfig, label: str = "") -> str:
    """``epoch 2/6: train loss 0.312, val loss 0.280, val AUC 0.987, specificity 0.940 at sensitivity >= 0.98,
    57 images/s, 35 s``, after ``label: `` when the run is one of several (a fold's, a seed's, a trial's)."""
    m = metrics
    return (
        f"{label + ': ' if label else ''}epoch {m['epoch'] + 1}/{cfg.epochs}: train loss {m['train_loss']:.3f}, "
        f"val loss {m['val_loss']:.3f}, val AUC {m['val_auc']:.3f}, specificity {m['val_spec_at_target']:.3f} at "
        f"sensitivity >= {cfg.target_sensitivity}, {m['train_images_per_s']:.0f} images/s, {m['epoch_seconds']:.0f} s"
    )


def progress_line(
    epoch: int, cfg: TrainConfig, seen: int, total: int | None, loss: float, seconds: float, label: str = ""
) -> str:
    """``epoch 2/6: 640 of 1930 training images, train loss so far 0.412, 45 images/s, about 29 s to go``: written
    within an epoch every ``PROGRESS_EVERY_S`` (``$CXR_PROGRESS_EVERY_S``)."""
    rate = seen / max(seconds, 1e-9)
    of = f" of {total}" if total else ""
    left = f", about {max(0.0, total - seen) / max(rate, 1e-9):.0f} s to go" if total else ""
    return (
        f"{label + ': ' if label else ''}epoch {epoch + 1}/{cfg.epochs}: {seen}{of} training images, "
        f"train loss so far {loss:.3f}, {rate:.0f} images/s{left}"
    )


def run_label(run_name: str, cfg: TrainConfig) -> str:
    """What an epoch line names its run by: ``fold 2/5``, ``seed 1``, both, nothing for a single run's ``_ray``,
    and a run name of another kind (a Tune trial's) as it is."""
    m = re.fullmatch(r"_ray(?:_fold(\d+))?(?:_seed\d+)?", run_name)
    if not m:
        return run_name
    parts = []
    if cfg.threshold_folds > 1:
        parts.append(f"fold {int(m.group(1)) + 1}/{cfg.threshold_folds}" if m.group(1) else "shipped model")
    if cfg.seeds > 1:
        parts.append(f"seed {cfg.seed}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- driver side


@dataclass
class TrainResult:
    output: str
    model_id: str
    threshold: float
    best_epoch: int
    metrics: dict
    seconds: float
    cross_validation: dict | None = None
    holdout: dict | None = None  # cxr.holdout.run_holdout's summary (``holdout_by``)


def prepared_rows(
    files: list[LabelledFile],
    spec: PreprocessSpec,
    settings,
    task_cpus: float,
    split: str,
    *,
    weights: list[float] | None = None,
    keep_path: bool = False,
):
    """Decode + preprocess once (the scoring pipeline's own function), materialised; undecodable files dropped.
    Rows: ``image``, ``label``, ``weight`` (the training loss weight, ``weights`` or 1), and ``path`` with
    ``keep_path``. Returns (dataset, number of files left out)."""
    import pyarrow as pa
    from ray.data.expressions import col

    from .score import decoded_dataset
    from .sources import table_dataset

    table = pa.table(
        {
            "path": [f.path for f in files],
            "label": pa.array([f.label for f in files], pa.int64()),
            "weight": pa.array(weights if weights is not None else [1.0] * len(files), pa.float32()),
        }
    )
    ds = decoded_dataset(table_dataset(table), spec, settings, task_cpus).materialize()
    bad = ds.filter(expr=col("error") != "").select_columns(["path", "error"]).take_all()
    for row in bad[:20]:
        log.warning("skipping %s: %s", row["path"], row["error"])
    if bad:
        log.warning("%d of %d %s files could not be decoded and are left out", len(bad), len(files), split)
    columns = ["image", "label", "weight"] + (["path"] if keep_path else [])
    return ds.filter(expr=col("error") == "").select_columns(columns).materialize(), len(bad)


@dataclass
class PreparedData:
    """The decoded, preprocessed and split data, materialised once and shared by every run that trains on it."""

    files: list
    train_files: list
    val_files: list
    counts: dict
    spec: PreprocessSpec
    train_ds: object  # MaterializedDataset: training rows, COVID rows repeated ``oversample`` times
    val_ds: object  # MaterializedDataset: validation rows
    undecodable: int
    balanced_covid_weight: float  # n_non / (n_covid * oversample)


def prepare_data(cfg: TrainConfig, settings=None) -> PreparedData:
    """List, split (patient-grouped), decode and preprocess ``cfg.data`` once, on the cluster."""
    settings = settings or storage.s3_settings()
    files = apply_groups(labelled_files(cfg.data, "train", settings, cfg.label_map), cfg.groups)
    counts = class_counts(files)
    if min(counts.values()) < 2:
        raise InputError(f"need at least 2 images of each class to train, found {counts} in {cfg.data}")
    if cfg.balance_by:
        group_values(files, cfg.balance_by, "--balance-by")  # a column no image has: the error before any work
    if cfg.holdout_by:
        holdout_splits(files, cfg.holdout_by)
    train_files, val_files = split_train_val(files, cfg.val_fraction, cfg.seed)
    log.info(
        "data %s: %s; train %s, validation %s (patient-grouped)",
        cfg.data,
        counts,
        class_counts(train_files),
        class_counts(val_files),
    )
    return prepare_split(cfg, files, train_files, val_files, preprocess_spec(cfg), settings)


def preprocess_spec(cfg: TrainConfig) -> PreprocessSpec:
    return PreprocessSpec(input_size=cfg.image_size, crop=tuple(cfg.crop) if cfg.crop else None, equalize=cfg.equalize)


def prepare_split(cfg: TrainConfig, files, train_files, val_files, spec: PreprocessSpec, settings) -> PreparedData:
    """Decode and preprocess one train/validation split on the cluster; oversample the COVID training rows."""
    from ray.data.expressions import col

    ensure_ray()
    counts = class_counts(files)
    weights = None
    if cfg.balance_by:
        weights = balance_weights(train_files, cfg.balance_by)
        log.info("balanced by %s: %s", cfg.balance_by, balance_summary(train_files, weights, cfg.balance_by))
    train_ds, bad_train = prepared_rows(train_files, spec, settings, 0.5, "training", weights=weights)
    val_ds, bad_val = prepared_rows(val_files, spec, settings, 0.5, "validation")
    covid = train_ds.filter(expr=col("label") == 1)
    n_covid = covid.count()
    n_non = train_ds.count() - n_covid
    if cfg.oversample > 1:
        train_ds = train_ds.union(*[covid] * (cfg.oversample - 1))
    # The rows arrive sorted by path (every COVID image before every non-COVID one) with the oversampled
    # copies appended: the workers' local shuffle buffer (a few batches) cannot mix that, and every epoch
    # would start with COVID-only batches and end with a run of them. One global shuffle here, while the
    # cluster is idle, gives every batch the data's class mix; the buffer then varies the batches per epoch.
    train_ds = train_ds.random_shuffle(seed=cfg.seed).materialize()
    return PreparedData(
        files,
        train_files,
        val_files,
        counts,
        spec,
        train_ds,
        val_ds,
        bad_train + bad_val,
        n_non / max(1, n_covid * cfg.oversample),
    )


def balance_summary(files, weights: list[float], column: str) -> dict:
    """``{value: {"covid": [images, their share of the class's weight], "non": [...]}}`` for the log and the
    provenance: how much each group of ``column`` teaches of each class under :func:`data.balance_weights`."""
    totals = {c: sum(w for f, w in zip(files, weights) if f.label == c) or 1.0 for c in (0, 1)}
    out: dict[str, dict] = {}
    for f, v, w in zip(files, group_values(files, column, "--balance-by"), weights):
        cell = out.setdefault(v, {"non": [0, 0.0], "covid": [0, 0.0]})["covid" if f.label else "non"]
        cell[0] += 1
        cell[1] += w / totals[f.label]
    return {v: {k: [n, round(share, 3)] for k, (n, share) in cells.items()} for v, cells in sorted(out.items())}


CRASH_AT_EPOCH_ENV = "CXR_TEST_CRASH_AT_EPOCH"


def crash_at_epoch() -> int | None:
    """The test-only crash hook, read here and only on the driver: with ``CXR_TEST_CRASH_AT_EPOCH=N`` set, the
    first run (``train``: the main split's first model; ``tune``: the first trial to get there) kills its rank-0
    worker once in epoch N, so that the tests see recovery from a worker failure. Never set in production."""
    value = os.environ.get(CRASH_AT_EPOCH_ENV)
    return int(value) if value else None


def fit(
    cfg: TrainConfig,
    data: PreparedData,
    *,
    storage_path: str,
    run_name: str = "_ray",
    storage_filesystem=None,
    callbacks: list | None = None,
    fail_marker: str | None = None,
    crash_at_epoch: int | None = None,
):
    """Build and fit the ``TorchTrainer`` on ``data``; returns Ray Train's Result (raises its error).

    Called by :func:`train` and, unchanged, from inside a Ray Tune trial (with ``TuneReportCallback``). A run
    whose ``run_name`` already has checkpoints under ``storage_path`` resumes from the latest one.
    ``crash_at_epoch``: the test-only crash hook (see :func:`crash_at_epoch`)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    covid_weight = cfg.covid_weight if cfg.covid_weight is not None else data.balanced_covid_weight
    node_cpus = max((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n.get("Alive")), default=1.0)
    threads = cfg.threads_per_worker or max(1, int(node_cpus // max(1, cfg.workers)))
    loop_config = {
        "train": asdict(cfg),
        "preprocess": data.spec.to_dict(),
        "threads": threads,
        "covid_weight": covid_weight,
        "label": run_label(run_name, cfg),
        "train_rows": data.train_ds.count(),
        "progress_every_s": float(os.environ.get("CXR_PROGRESS_EVERY_S", PROGRESS_EVERY_S)),
        "crash_at_epoch": crash_at_epoch,
        "fail_marker": fail_marker or os.path.join(tempfile.gettempdir(), f"cxr-fail-{os.getpid()}-{int(time.time())}"),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_score", checkpoint_score_order="max"
            ),
            callbacks=callbacks or None,
            worker_runtime_env=torch_worker_runtime_env(),
        ),
        datasets={"train": data.train_ds, "val": data.val_ds},
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def _comparable(value):
    """A setting as config.json holds it (tuples as lists, keys as strings), so that read and new compare alike."""
    return json.loads(json.dumps(value, default=str))


def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return (
        text if len(text) <= 40 else f"<{len(value)} entries>" if isinstance(value, (dict, list)) else text[:37] + "..."
    )


def setting_changes(cfg: TrainConfig, recorded: dict) -> list[str]:
    """``"epochs 2 -> 1"`` for every training setting of ``cfg`` that differs from a run's ``config.json``
    (a setting the run's config.json lacks, from an older version, counts as its default)."""
    changes = []
    for f in fields(TrainConfig):
        if f.name in RESUMABLE_WITH:
            continue
        default = (
            f.default_factory() if f.default_factory is not MISSING else None if f.default is MISSING else f.default
        )
        old, new = _comparable(recorded.get(f.name, default)), _comparable(getattr(cfg, f.name))
        if f.name == "data" and isinstance(old, str) and isinstance(new, str):
            old, new = old.rstrip("/"), new.rstrip("/")
        if old != new:
            changes.append(f"{f.name} {_shown(old)} -> {_shown(new)}")
    return changes


def check_output(cfg: TrainConfig, overwrite: bool, settings) -> None:
    """Before any work: refuse (``OutputError``, exit 5) an output that holds a training run (``config.json``,
    Ray Train's ``_ray*/``) with other settings, which Ray Train would otherwise resume and return unchanged;
    the same settings resume it. ``overwrite`` empties the output instead."""
    import pyarrow.fs as pafs

    from .output import OutputError, prepare_output

    if overwrite:
        prepare_output(cfg.output, True, settings)  # empties it (local or S3) and checks that it can be written
        return
    fs, path = storage.filesystem(cfg.output, settings)
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise OutputError(f"output {cfg.output} is a file; give a directory or prefix")
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OutputError:
        raise
    except Exception as exc:
        raise OutputError(f"cannot read {cfg.output}: {storage.describe_error(exc)}") from exc
    names = {os.path.basename(e.path.rstrip("/")) for e in entries}
    runs = sorted(n for n in names if n.startswith("_ray"))
    if CONFIG not in names and not runs:
        return
    advice = "choose a new --output, or pass --overwrite to replace it"
    recorded = None
    if CONFIG in names:
        try:
            recorded = json.loads(storage.read_bytes(storage.join(cfg.output, CONFIG), settings))
        except Exception:  # noqa: BLE001
            recorded = None
    if not isinstance(recorded, dict):
        raise OutputError(
            f"{cfg.output} holds a training run ({', '.join(runs) or CONFIG}) whose settings are unknown "
            f"(no readable {CONFIG}): {advice}"
        )
    changes = setting_changes(cfg, recorded)
    if changes:
        raise OutputError(f"{cfg.output} holds a training run with other settings ({', '.join(changes)}): {advice}")
    if runs:
        log.info("%s holds a run with these settings (%s): resuming it", cfg.output, ", ".join(runs))


def write_metrics_csv(history: list[dict], uri: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in history for k in row)))
    writer.writeheader()
    writer.writerows(history)
    storage.write_bytes(uri, buf.getvalue().encode())


def check_weights(cfg: TrainConfig) -> None:
    """The starting weights are there before anything is written or started (else every worker fails in its first
    seconds, Ray Train retries, and the job ends with tracebacks). Raises CheckpointError (exit 4), one line."""
    from .errors import CheckpointError
    from .models import create_model, fetch_imagenet

    if cfg.weights == "none":
        return
    if cfg.weights == "imagenet":
        why = fetch_imagenet(cfg.backbone)
        if why:
            raise CheckpointError(
                f"ImageNet weights of {cfg.backbone} not available ({why}): use --weights none (train from scratch), "
                "pass --weights PATH, or put the file in the hub cache or a folder named by CXR_WEIGHTS_DIR "
                "(docs/jobs/train.md)"
            )
        return
    try:
        create_model(cfg.backbone, cfg.weights)  # the file exists and fits the backbone
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"--weights: {exc}" if cfg.weights in str(exc) else f"--weights {cfg.weights}: {exc}"
        ) from exc


def train(cfg: TrainConfig, overwrite: bool = False) -> TrainResult:
    """Fine-tune ``cfg.backbone`` on ``cfg.data`` and write the best checkpoint to ``cfg.output``.

    An output that holds a run of the same settings resumes it (Ray Train goes on from its last checkpoint);
    one with other settings raises ``OutputError`` before any work, unless ``overwrite`` (see :func:`check_output`).

    Long on purpose: the job's phases in order (checks, data, the runs, the ensemble's and the folds' threshold,
    provenance, the checkpoint), each a call; what stays inline is the provenance record."""
    from .models import check_backbone

    check_backbone(cfg.backbone)
    settings = storage.s3_settings()
    check_output(cfg, overwrite, settings)
    check_weights(cfg)
    started = time.perf_counter()
    data = prepare_data(cfg, settings)
    files, train_files, val_files, counts = data.files, data.train_files, data.val_files, data.counts
    covid_weight = cfg.covid_weight if cfg.covid_weight is not None else data.balanced_covid_weight
    storage_path, storage_fs = storage.ray_storage(cfg.output, settings)
    # The settings go in before Ray Train writes anything, so that an interrupted run is known by them
    # (after the data is read: a command that fails on its input leaves nothing behind to be refused).
    write_config(cfg, settings)
    members = fit_members(cfg, data, storage_path, storage_fs, "_ray", crash_at_epoch=crash_at_epoch())
    import ray

    node_cpus = max((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n.get("Alive")), default=1.0)
    threads = cfg.threads_per_worker or max(1, int(node_cpus // max(1, cfg.workers)))
    best_checkpoint, best_metrics, history = members[0]
    main_scores = split_scores(members, data)
    if len(members) > 1:  # the ensemble's own figures on validation
        p, y = main_scores[0], main_scores[1].astype(int)
        best_metrics = {
            "epoch": best_metrics["epoch"],
            "val_n": int(len(y)),
            "val_positives": int(y.sum()),
            **validation_metrics(y, p, cfg.target_sensitivity),
        }
    threshold_rule = f"highest threshold keeping validation sensitivity >= {cfg.target_sensitivity}"
    cv = None
    if cfg.threshold_folds > 1:
        cv = cross_validate_threshold(cfg, data, main_scores, settings, storage_path, storage_fs)
        threshold_rule = (
            f"the validation non-COVID quantile at specificity {cv['operating_specificity']:.4f}: the highest "
            "operating point keeping "
            f"sensitivity >= {cfg.target_sensitivity} on the out-of-fold scores of {cfg.threshold_folds} "
            "patient-grouped folds "
            f"({cv['positives']} COVID, {cv['n'] - cv['positives']} non-COVID), pooled by operating point"
        )
    holdout = None
    if cfg.holdout_by:
        from .holdout import run_holdout

        holdout = run_holdout(cfg, files, data.spec, settings, storage_path, storage_fs)
    seconds = time.perf_counter() - started
    provenance = {
        "data": {
            "uri": cfg.data,
            "fingerprint": fingerprint(files),
            "counts": counts,
            "train": class_counts(train_files),
            "validation": class_counts(val_files),
            "undecodable": data.undecodable,
        },
        "training": {
            **{k: v for k, v in asdict(cfg).items() if k != "groups"},
            "covid_weight": covid_weight,
            "best_epoch": int(best_metrics["epoch"]),
            "seconds": round(seconds, 1),
        },
        "validation": {k: best_metrics[k] for k in best_metrics if k.startswith("val_")},
        "threshold_rule": threshold_rule,
    }
    if cv is not None:
        provenance["cross_validation"] = cv
    if cfg.balance_by:
        weights = balance_weights(train_files, cfg.balance_by)
        provenance["data"]["balance"] = balance_summary(train_files, weights, cfg.balance_by)
    if holdout is not None:
        provenance["holdout"] = holdout
    threshold = cv["threshold"] if cv is not None else best_metrics["val_threshold"]
    if len(members) == 1:
        with best_checkpoint.as_directory() as d:
            from .checkpoint import load_checkpoint

            loaded = load_checkpoint(d, optimize=False)
            info = loaded.info
            info.threshold = threshold
            info.provenance = provenance
            info.weights_sha256 = ""
            info = save_checkpoint(loaded.model, info, cfg.output)
        write_metrics_csv(history, storage.join(cfg.output, "metrics.csv"))
    else:
        provenance["members"] = [
            {
                "name": f"seed{cfg.seed + i}",
                "seed": cfg.seed + i,
                "best_epoch": int(m["epoch"]),
                **{k: m[k] for k in m if k.startswith("val_")},
            }
            for i, (_, m, _) in enumerate(members)
        ]
        info = _save_ensemble(cfg, members, threshold, provenance, settings)
        write_metrics_csv(
            [{"member": f"seed{cfg.seed + i}", **row} for i, (_, _, h) in enumerate(members) for row in h],
            storage.join(cfg.output, "metrics.csv"),
        )
    buf = io.BytesIO()
    np.save(buf, main_scores)
    storage.write_bytes(storage.join(cfg.output, "val_scores.npy"), buf.getvalue())
    write_config(cfg, settings, covid_weight_used=covid_weight, threads_per_worker_used=threads)
    return TrainResult(
        cfg.output, info.model_id, info.threshold, int(best_metrics["epoch"]), dict(best_metrics), seconds, cv, holdout
    )


def write_config(cfg: TrainConfig, settings=None, **used) -> None:
    storage.write_bytes(
        storage.join(cfg.output, CONFIG), json.dumps({**asdict(cfg), **used}, indent=2, default=str).encode(), settings
    )


def _best(result) -> tuple[object, dict]:
    """The checkpoint with the highest ``val_score`` (ties: the earlier epoch) and its metrics."""
    return max(
        result.best_checkpoints, key=lambda cm: (np.nan_to_num(cm[1].get("val_score", -1), nan=-1), -cm[1]["epoch"])
    )


def member_config(cfg: TrainConfig, i: int) -> TrainConfig:
    """Member ``i`` of a seed ensemble: the same recipe with model seed ``cfg.seed + i`` (initialisation, batch
    order, augmentation); the split and fold assignment stay those of ``cfg.seed`` (made before, on the driver)."""
    return TrainConfig(**{**asdict(cfg), "seed": cfg.seed + i})


def member_data(data: PreparedData, cfg: TrainConfig, i: int) -> PreparedData:
    """Member ``i``'s data: member 0 trains on the rows in the order :func:`prepare_data` shuffled them, every
    other member on the rows shuffled again with its own seed. The workers' buffer mixes only a few batches, so
    one shared order would give every member nearly the same batches, and members fine-tuned from the same
    ImageNet weights differ mostly by their batches (only the head's initialisation is their own)."""
    if i == 0:
        return data
    return replace(data, train_ds=data.train_ds.random_shuffle(seed=cfg.seed + i).materialize())


def fit_members(
    cfg: TrainConfig,
    data: PreparedData,
    storage_path: str,
    storage_fs,
    run_name: str,
    crash_at_epoch: int | None = None,
) -> list[tuple[object, dict, list]]:
    """Fit ``cfg.seeds`` models on one split (runs ``run_name``, ``run_name_seed<i>``); per model its best
    checkpoint, that checkpoint's metrics and the whole per-epoch history. ``crash_at_epoch`` (the test-only
    crash hook) applies to the first model only."""
    members = []
    for i in range(max(1, cfg.seeds)):
        if cfg.seeds > 1:
            log.info("%s: model %d of %d (seed %d)", run_name, i + 1, cfg.seeds, cfg.seed + i)
        result = fit(
            member_config(cfg, i),
            member_data(data, cfg, i),
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            run_name=run_name if i == 0 else f"{run_name}_seed{i}",
            crash_at_epoch=crash_at_epoch if i == 0 else None,
        )
        with result.checkpoint.as_directory() as d:  # the latest checkpoint holds the whole history
            with open(os.path.join(d, HISTORY)) as f:
                history = json.load(f)
        members.append((*_best(result), history))
    return members


def validation_arrays(data: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    """The validation images (N, S, S) and labels, in one fixed order, on the driver."""
    images, labels = [], []
    for batch in data.val_ds.iter_batches(batch_size=256, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def split_scores(members: list[tuple[object, dict, list]], data: PreparedData) -> np.ndarray:
    """``[prob; label]`` of a split's validation images: one model's own (saved with its checkpoint), or the
    mean of the members' probabilities, every member scoring the same images in one order on the driver."""
    if len(members) == 1:
        with members[0][0].as_directory() as d:
            return np.load(os.path.join(d, "val_scores.npy"))
    from .checkpoint import load_checkpoint

    images, y = validation_arrays(data)
    probs = []
    for checkpoint, _, _ in members:
        with checkpoint.as_directory() as d:
            loaded = load_checkpoint(d)
            probs.append(np.concatenate([loaded.predict_proba(images[i : i + 64]) for i in range(0, len(images), 64)]))
    return np.stack([np.mean(probs, axis=0), y.astype(np.float32)])


def _save_ensemble(
    cfg: TrainConfig, members: list[tuple[object, dict, list]], threshold: float, provenance: dict, settings
) -> ModelInfo:
    """The members' best checkpoints as one ensemble checkpoint at ``cfg.output`` (``members/seed<s>/``)."""
    from contextlib import ExitStack

    from .checkpoint import save_ensemble

    with ExitStack() as stack:  # each checkpoint as a local directory (downloaded when the output is on S3)
        sources = {
            f"seed{cfg.seed + i}": stack.enter_context(checkpoint.as_directory())
            for i, (checkpoint, _, _) in enumerate(members)
        }
        return save_ensemble(sources, cfg.output, threshold, provenance, settings)


def cross_validate_threshold(
    cfg: TrainConfig, data: PreparedData, main_scores: np.ndarray, settings, storage_path: str, storage_fs
) -> dict:
    """Train the same model on the other folds of the K-fold split; choose the threshold from all folds.

    The shipped model is one fold's model (its validation split is fold ``k`` of the same
    ``StratifiedGroupKFold``); the other K-1 models are trained only to score the images the shipped model
    trained on, so that every training image is scored once by a model that never saw it: the threshold
    rests on all ~80 COVID images instead of ~17. The fold models' probabilities are not comparable with
    each other (their calibration differs from run to run), so the folds are pooled by *operating point*:
    see :func:`transfer_threshold`. The fold models are not kept beyond their runs under ``_ray_fold<k>/``."""
    from .metrics import wilson_ci

    folds = cv_folds(data.files, cfg.threshold_folds, cfg.seed)
    main_val = {f.path for f in data.val_files}
    scores: list[tuple[int, bool, np.ndarray]] = []  # (fold, shipped, [p; y])
    for k, (train_files, val_files) in enumerate(folds):
        if {f.path for f in val_files} == main_val:
            scores.append((k, True, main_scores))
            continue
        log.info(
            "threshold cross-validation: fold %d of %d (train %s, validation %s)",
            k + 1,
            len(folds),
            class_counts(train_files),
            class_counts(val_files),
        )
        fold_data = prepare_split(cfg, data.files, train_files, val_files, data.spec, settings)
        scores.append(
            (
                k,
                False,
                split_scores(fit_members(cfg, fold_data, storage_path, storage_fs, f"_ray_fold{k}"), fold_data),
            )
        )
    t = transfer_threshold(
        [(s[0], s[1].astype(int)) for _, _, s in scores],
        (main_scores[0], main_scores[1].astype(int)),
        cfg.target_sensitivity,
    )
    p, y = main_scores[0], main_scores[1].astype(int)
    tn, fp = int(np.sum(p[y == 0] < t["threshold"])), int(np.sum(p[y == 0] >= t["threshold"]))
    tp, fn = int(np.sum(p[y == 1] >= t["threshold"])), int(np.sum(p[y == 1] < t["threshold"]))
    buf = io.StringIO()
    rows = np.concatenate([np.column_stack([np.full(s.shape[1], k), s[1], s[0]]) for k, _, s in scores])
    np.savetxt(buf, rows, fmt=["%d", "%d", "%.6f"], delimiter=",", header="fold,label,prob", comments="")
    storage.write_bytes(storage.join(cfg.output, "cv_scores.csv"), buf.getvalue().encode())
    pooled = t["pooled_sensitivity"]
    return {
        "folds": cfg.threshold_folds,
        "n": int(sum(s.shape[1] for _, _, s in scores)),
        "positives": int(sum(s[1].sum() for _, _, s in scores)),
        "method": "operating point (specificity) pooled over folds",
        **{
            k: t[k]
            for k in ("threshold", "operating_specificity", "threshold_at_operating_point", "threshold_single_split")
        },
        "pooled_sensitivity": {**pooled, "ci95": list(wilson_ci(pooled["k"], pooled["n"]))},
        "shipped_validation": {
            "sensitivity": {"k": tp, "n": tp + fn, "ci95": list(wilson_ci(tp, tp + fn))},
            "specificity": {"k": tn, "n": tn + fp, "value": tn / max(1, tn + fp), "ci95": list(wilson_ci(tn, tn + fp))},
        },
        "per_fold": [
            {"fold": k, "shipped": shipped, **_fold_summary(s, cfg.target_sensitivity)} for k, shipped, s in scores
        ],
    }


def transfer_threshold(
    folds: list[tuple[np.ndarray, np.ndarray]], shipped: tuple[np.ndarray, np.ndarray], target: float
) -> dict:
    """The shipped model's threshold from several models' out-of-fold scores ``(prob, label)``.

    Each fold's model ranks its own images; its probabilities are not on a common scale with the others'.
    So every COVID image is placed by the share of its fold's non-COVID images that score below it (the
    specificity at which it is still caught), the folds are pooled on that scale, and the *operating
    specificity* ``q`` is the highest that keeps pooled sensitivity >= ``target``. The shipped model's
    threshold is then its own validation non-COVID images' ``q`` quantile (a few hundred of them, so the
    quantile is well determined), and never above the threshold its validation split alone gives
    (sensitivity first)."""
    from .metrics import choose_threshold

    places = []
    for prob, label in folds:
        neg = np.sort(prob[label == 0])
        if neg.size == 0 or not np.any(label == 1):
            raise ValueError("every fold needs COVID and non-COVID images to transfer a threshold")
        places.append(np.searchsorted(neg, prob[label == 1], side="left") / neg.size)
    places = np.concatenate(places)
    q = choose_threshold(np.ones(places.size, int), places, target)
    prob, label = shipped
    neg = np.sort(prob[label == 0])
    # the highest negative at or below the operating point: about q * n negatives score below it (one fewer
    # at most, erring towards sensitivity); the tolerance keeps 0.61 * 100 from counting as 62
    at_q = float(neg[min(max(math.ceil(q * neg.size - 1e-9) - 1, 0), neg.size - 1)])
    single = choose_threshold(label, prob, target)
    return {
        "threshold": float(min(at_q, single)),
        "operating_specificity": float(q),
        "threshold_at_operating_point": at_q,
        "threshold_single_split": float(single),
        "pooled_sensitivity": {
            "k": int(np.sum(places >= q)),
            "n": int(places.size),
            "value": float(np.mean(places >= q)),
        },
    }


def _fold_summary(scores: np.ndarray, target: float) -> dict:
    p, y = scores[0], scores[1].astype(int)
    m = validation_metrics(y, p, target)
    return {
        "n": int(len(y)),
        "positives": int(y.sum()),
        "auc": m["val_auc"],
        "threshold": m["val_threshold"],
        "specificity_at_target": m["val_spec_at_target"],
    }
