"""The malloc settings torch worker processes start with (cxr.runtime), on a real local Ray cluster."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pyarrow as pa
import pytest
from ray import cloudpickle

from cxr.output import new_run_id
from cxr.resources import cluster_plan
from cxr.runtime import TORCH_WORKER_MALLOC_ENV, torch_actor_remote_args, torch_worker_runtime_env
from cxr.score import Predictor, score_dataset
from cxr.sources import table_dataset

pytestmark = pytest.mark.timeout(300)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # EnvPredictor runs on the workers


def test_settings_by_default_and_the_users_own_win(monkeypatch):
    for name in [*TORCH_WORKER_MALLOC_ENV, "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name, raising=False)
    settings = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**30)}
    assert torch_worker_runtime_env() == {"env_vars": settings}
    assert torch_actor_remote_args() == {"runtime_env": {"env_vars": settings}}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert torch_worker_runtime_env() == {} and torch_actor_remote_args() == {}
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert torch_worker_runtime_env() == {}


class EnvPredictor(Predictor):
    """The score rows plus what this actor process's environment says about malloc."""

    def __call__(self, batch: dict) -> pa.Table:
        table = super().__call__(batch)
        return table.append_column(
            "mmap_max", pa.array([os.environ.get("MALLOC_MMAP_MAX_")] * table.num_rows, pa.string())
        )


def _actor_env(folder, files, model) -> set:
    from cxr import storage
    from cxr.checkpoint import load_info

    settings = storage.s3_settings()
    good = [str(folder / name) for name, (_, error, _) in sorted(files.items()) if error is None][:4]
    paths = table_dataset(pa.table({"path": good}))
    ds = score_dataset(
        paths,
        model,
        load_info(model, settings).preprocess,
        cluster_plan(batch_size=4),
        new_run_id(),
        settings,
        predictor_cls=EnvPredictor,
    )
    rows = ds.take_all()
    assert len(rows) == 4 and all(r["error"] is None for r in rows)
    return {r["mmap_max"] for r in rows}


def test_scoring_actors_start_with_the_settings_unless_the_user_set_their_own(
    ray_driver, mixed_folder, tiny_model, monkeypatch
):
    folder, files = mixed_folder
    for name in [*TORCH_WORKER_MALLOC_ENV, "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name, raising=False)
    assert _actor_env(folder, files, tiny_model) == {"0"}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the driver's own choice: the actors get nothing from us
    assert _actor_env(folder, files, tiny_model) == {None}


def test_training_workers_get_the_settings(ray_driver, monkeypatch, tmp_path):
    """fit() hands them to Ray Train as the workers' runtime env (Ray starts the worker processes with it)."""
    import ray.train.torch

    from cxr.preprocess import PreprocessSpec
    from cxr.train import TrainConfig, fit

    for name in [*TORCH_WORKER_MALLOC_ENV, "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name, raising=False)
    seen = {}

    class Captured(Exception):
        pass

    def fake_trainer(*args, **kwargs):
        seen.update(kwargs)
        raise Captured

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", fake_trainer)
    data = SimpleNamespace(
        spec=PreprocessSpec(input_size=32),
        train_ds=SimpleNamespace(count=lambda: 10),
        val_ds=None,
        balanced_covid_weight=1.0,
    )  # stands in for PreparedData (the data sets are never read)
    with pytest.raises(Captured):
        fit(TrainConfig(data="unused", output=str(tmp_path)), data, storage_path=str(tmp_path))
    assert seen["run_config"].worker_runtime_env == {"env_vars": TORCH_WORKER_MALLOC_ENV}


def test_ray_datas_no_free_cpu_warning_is_dropped_only_when_a_cpu_is_free_again(ray_driver, monkeypatch):
    import logging
    import time

    import ray

    from cxr.runtime import RecheckNoFreeCpuWarning, ensure_ray

    ensure_ray()
    ensure_ray()
    logger = logging.getLogger("ray.data.dataset")  # where Ray Data gives it
    [check] = [f for f in logger.filters if isinstance(f, RecheckNoFreeCpuWarning)]  # installed once

    def record(msg: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.WARNING, "dataset.py", 1, msg, None, None)

    warning = record(
        "Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will "
        "hang unless more CPUs are freed up."
    )
    assert check.filter(record("Warning: something else"))
    assert not check.filter(warning)  # CPUs free (or free within a second): a false alarm, dropped
    with monkeypatch.context() as m:
        m.setattr(ray, "available_resources", lambda: (_ for _ in ()).throw(RuntimeError("not connected")))
        assert check.filter(warning)  # no answer from Ray: shown

    @ray.remote(num_cpus=1)
    class Hold:
        def ready(self) -> bool:
            return True

    holders = [Hold.remote() for _ in range(int(ray.cluster_resources()["CPU"]))]
    try:
        ray.get([h.ready.remote() for h in holders], timeout=120)
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        start = time.monotonic()
        assert check.filter(warning)  # every CPU stays taken: the warning is true and shown
        assert time.monotonic() - start >= check.wait_s
    finally:
        for h in holders:
            ray.kill(h)
