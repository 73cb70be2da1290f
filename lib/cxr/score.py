"""Batch scoring on Ray Data: paths -> bytes -> decoded, preprocessed images -> probabilities -> Parquet.

    input_paths (sources.py)           one row per input file: ``path`` (a sample decoded first: measure_costs)
      .map_batches(decode_batch)       tasks: read bytes, decode, preprocess (no torch); errors become values
      .map_batches(Predictor)          actor pool: the model is loaded once per actor
      .write_parquet(output)

Every input row yields exactly one output row; a file that cannot be read or decoded gets an
``error`` and null prediction columns, and never stops the job.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from . import storage
from .checkpoint import load_checkpoint
from .decode import NOT_FRONTAL, decode
from .output import new_run_id, prepare_output
from .preprocess import PreprocessSpec, preprocess
from .resources import WRITE_TASKS, ResourcePlan, cluster_resources, default_gpus_per_actor, plan_resources
from .runtime import ensure_ray, torch_actor_remote_args
from .sources import input_paths, table_dataset

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("prob_covid", pa.float32()),
        ("prediction", pa.string()),
        ("threshold", pa.float32()),
        ("model", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("view", pa.string()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)
SUMMARY_FILE = "_summary.json"


# --------------------------------------------------------------------------- measured plan


@dataclass(frozen=True)
class Costs:
    """CPU seconds per image of the pipeline's two stages, one thread each, measured on a sample of the inputs."""

    files: int  # files sampled
    decode_s: float  # read + decode + preprocess (the decode tasks' work)
    model_s: float  # the model's forward pass, batch of 8 (the predictor's work)

    @property
    def decode_share(self) -> float:
        total = self.decode_s + self.model_s
        return self.decode_s / total if total > 0 else 0.0

    def line(self) -> str:
        return (
            f"per image, one thread: decoding {self.decode_s * 1e3:.1f} ms ({self.files} files sampled), "
            f"model {self.model_s * 1e3:.1f} ms: decoding is {self.decode_share:.0%} of the CPU work"
        )


def measure_costs(
    paths, loaded, settings: storage.S3Settings, all_views: bool = False, max_files: int = 8, max_seconds: float = 2.0
) -> Costs | None:
    """Decode up to ``max_files`` of ``paths`` (spread over the list; stopping after ``max_seconds``) and run
    ``loaded`` (a :class:`~cxr.checkpoint.LoadedModel` or ensemble) on a batch, here, on one thread; CPU time
    (``time.thread_time``), so that slow storage does not count as decoding. What the files cost is what
    their format costs: a PNG or JPEG about as much as the model at 128 px, a compressed full-size DICOM
    30-130x more (``benchmarks/decode.py``). The files are read in a daemon thread given ``2 * max_seconds
    + 1`` s: a read that hangs (a stuck S3 request) does not hold the job up; None when no file was done."""
    import torch

    spec = loaded.info.preprocess
    n = len(paths)
    sample = [paths[int(i)] for i in np.unique(np.linspace(0, n - 1, min(n, max_files)).round())]
    sample = [p.as_py() if isinstance(p, pa.Scalar) else str(p) for p in sample]
    seconds: list[float] = []  # CPU time per file, appended by the thread

    def decode_sample() -> None:
        _load_one(sample[0], spec, settings, all_views=all_views)  # untimed: the first call imports the decoders
        for path in sample:
            t = time.thread_time()
            _load_one(path, spec, settings, all_views=all_views)
            seconds.append(time.thread_time() - t)
            if time.perf_counter() - start > max_seconds:
                return

    start = time.perf_counter()
    worker = threading.Thread(target=decode_sample, name="cxr-measure-costs", daemon=True)
    worker.start()
    worker.join(2 * max_seconds + 1)
    done = list(seconds)
    if not done:
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = np.zeros((8, spec.input_size, spec.input_size), np.float32)
        loaded.predict_proba(batch[:1])  # first call: allocations, kernels chosen
        t = time.thread_time()
        loaded.predict_proba(batch)
        model_cpu = (time.thread_time() - t) / len(batch)
    finally:
        torch.set_num_threads(threads)
    return Costs(len(done), sum(done) / len(done), model_cpu)


def measured_plan(
    paths, loaded, settings: storage.S3Settings, all_views: bool = False, measure: bool = True, **overrides
) -> ResourcePlan:
    """:func:`cluster_plan` for scoring ``paths`` with ``loaded``: where the plan is for CPU actors whose
    CPUs are not given, the inputs' costs are measured first (:func:`measure_costs`) and size it."""
    nodes, gpus = cluster_resources()
    share = None
    if (
        measure
        and len(paths)
        and overrides.get("cpus_per_actor") is None
        and default_gpus_per_actor(overrides.get("gpus_per_actor"), gpus) == 0
    ):
        costs = measure_costs(paths, loaded, settings, all_views)
        if costs is None:
            log.warning(
                "no sample of the inputs could be read and decoded within a few seconds (slow storage?): the fixed plan"
            )
        else:
            log.info("measured %s", costs.line())
            share = costs.decode_share
    return plan_resources(nodes, gpus, decode_share=share, **overrides)


# --------------------------------------------------------------------------- pipeline stages


def _decode_preprocess(
    data: bytes, path: str, spec: PreprocessSpec, all_views: bool = False
) -> tuple[np.ndarray | None, int, int, str | None, str | None]:
    """(image, width, height, error, DICOM view). A lateral/oblique DICOM view is not scored (an error row
    ``not a frontal view ...``) unless ``all_views``: the models read frontal chest X-rays."""
    decoded = decode(data, path, frontal_only=not all_views)
    if not decoded.ok:
        return None, decoded.width or -1, decoded.height or -1, decoded.error, decoded.view
    try:
        return preprocess(decoded.image, spec), decoded.width, decoded.height, None, decoded.view
    except Exception as exc:  # noqa: BLE001
        return None, decoded.width, decoded.height, f"preprocess failed: {type(exc).__name__}: {exc}", decoded.view


def device_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) when ``data`` is a JPEG that the device decoder gives exactly as the CPU path does:
    a complete (ends with EOI) baseline/progressive JPEG, grayscale or RGB, no EXIF rotation, within the
    pixel cap. Anything else (None) stays on the CPU path. Reads the header only."""
    from io import BytesIO

    from PIL import Image

    from .decode import MAX_PIXELS

    if not (data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"):
        return None
    try:
        with Image.open(BytesIO(data), formats=("JPEG",)) as im:
            if im.format != "JPEG" or im.mode not in ("L", "RGB") or im.getexif().get(0x0112, 1) != 1:
                return None
            width, height = im.size
    except Exception:  # noqa: BLE001 - the CPU path reports what is wrong with it
        return None
    return (width, height) if 0 < width * height <= MAX_PIXELS else None


def _load_one(
    path: str, spec: PreprocessSpec, settings: storage.S3Settings, device_jpeg: bool = False, all_views: bool = False
) -> tuple[np.ndarray | None, int, int, str | None, str | None, bytes]:
    """(image, width, height, error, DICOM view, JPEG bytes left for the device decoder or b"")."""
    try:
        data = storage.read_bytes(path, settings)
    except Exception as exc:  # noqa: BLE001 - any read failure is this file's error, not the job's
        return None, -1, -1, f"read failed: {storage.describe_error(exc)}", None, b""
    if device_jpeg and (size := device_jpeg_size(data)) is not None:
        return None, size[0], size[1], None, None, data
    return (*_decode_preprocess(data, path, spec, all_views), b"")


def decode_batch(
    batch: dict, spec: dict, settings: storage.S3Settings, device_jpeg: bool = False, all_views: bool = False
) -> dict:
    """Ray Data task: read, decode and preprocess a batch of paths (threads overlap I/O and decoding).

    Columns other than ``path`` (e.g. training labels) pass through unchanged. ``device_jpeg``: JPEGs that
    the device decoder takes (:func:`device_jpeg_size`) are not decoded here; their bytes go in a ``jpeg``
    column (b"" for the other rows, whose ``image`` is decoded here as usual) for the predictor. ``all_views``:
    also lateral and oblique DICOM views (otherwise error rows, see :func:`_decode_preprocess`).
    """
    spec_ = PreprocessSpec.from_dict(spec)
    paths = [str(p) for p in batch["path"]]
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(paths)))) as pool:
        results = list(pool.map(lambda p: _load_one(p, spec_, settings, device_jpeg, all_views), paths))
    size = spec_.input_size
    blank = np.zeros((size, size), np.float32)
    extra = {"jpeg": np.array([r[5] for r in results], dtype=object)} if device_jpeg else {}
    return {
        **extra,
        **{k: v for k, v in batch.items() if k != "path"},
        "path": np.array(paths, dtype=object),
        "image": np.stack([r[0] if r[0] is not None else blank for r in results]),
        "width": np.array([r[1] for r in results], dtype=np.int32),
        "height": np.array([r[2] for r in results], dtype=np.int32),
        # "" for no error: an all-None column would come back from Arrow as nulls of no type (floats)
        "error": np.array([r[3] or "" for r in results], dtype=object),
        "view": np.array([r[4] or "" for r in results], dtype=object),
    }


def decoded_dataset(
    paths_ds,
    spec: PreprocessSpec,
    settings: storage.S3Settings,
    task_cpus: float = 0.5,
    batch_size: int = 32,
    device_jpeg: bool = False,
    all_views: bool = False,
):
    """``paths_ds`` (a ``path`` column and any others) -> the same rows with ``image``, ``width``, ``height``,
    ``error``, ``view`` (and ``jpeg`` with ``device_jpeg``: see :func:`decode_batch`)."""
    return paths_ds.map_batches(
        decode_batch,
        fn_args=(spec.to_dict(), settings),
        fn_kwargs={"device_jpeg": device_jpeg, "all_views": all_views},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=task_cpus,
    )


class Predictor:
    """Ray Data callable class: loads the checkpoint once per actor, predicts batches."""

    def __init__(self, model_uri: str, run_id: str, threads: int, use_gpu: bool, settings: storage.S3Settings):
        import torch

        torch.set_num_threads(threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.loaded = load_checkpoint(model_uri, device=device, settings=settings)
        info = self.loaded.info
        self.threshold = np.float32(info.threshold)
        self.positive = info.positive_class
        self.negative = next(c for c in info.class_names if c != info.positive_class)
        self.model_id = info.model_id
        self.run_id = run_id

    def __call__(self, batch: dict) -> pa.Table:
        errors = [e if isinstance(e, str) and e else None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        n = len(errors)
        prob = np.full(n, np.nan, dtype=np.float32)
        if ok.any():
            images = self._device_images(batch, errors, ok) if "jpeg" in batch else batch["image"][ok]
            still = np.array(
                [errors[i] is None for i in np.flatnonzero(ok)], dtype=bool
            )  # device JPEGs the CPU could not decode either
            ok = np.array([e is None for e in errors], dtype=bool)
            if not still.all():  # only with device JPEGs: images is a tensor
                import torch

                images = images[torch.from_numpy(still).to(images.device)]
            if ok.any():
                prob[ok] = self.loaded.predict_proba(images)
        prediction = np.where(prob >= self.threshold, self.positive, self.negative)
        width, height = np.asarray(batch["width"]), np.asarray(batch["height"])
        now = datetime.now(UTC)
        return pa.table(
            {
                "path": pa.array([str(p) for p in batch["path"]], pa.string()),
                "prob_covid": pa.array(prob, pa.float32(), mask=~ok),
                "prediction": pa.array(prediction.tolist(), pa.string(), mask=~ok),
                "threshold": pa.array(np.full(n, self.threshold), pa.float32()),
                "model": pa.array([self.model_id] * n, pa.string()),
                "error": pa.array(errors, pa.string()),
                "width": pa.array(width, pa.int32(), mask=~ok | (width < 0)),
                "height": pa.array(height, pa.int32(), mask=~ok | (height < 0)),
                "view": pa.array(
                    [v if isinstance(v, str) and v else None for v in batch.get("view", [None] * n)], pa.string()
                ),
                "run_id": pa.array([self.run_id] * n, pa.string()),
                "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            },
            schema=OUTPUT_SCHEMA,
        )

    def _device_images(self, batch: dict, errors: list, ok: np.ndarray):
        """The ``ok`` rows' images as one tensor on the model's device: rows with JPEG bytes decoded there
        (``device_decode``), the others as decoded by the tasks. A JPEG the device cannot decode goes
        through the CPU decoder, whose error (if any) becomes the row's."""
        import torch

        from .device_decode import decode_preprocess_jpegs

        spec = self.loaded.info.preprocess
        index = np.flatnonzero(ok)
        images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok], dtype=np.float32))
        rows = [k for k, i in enumerate(index) if len(batch["jpeg"][i])]
        if not rows:
            return images
        images = images.to(self.loaded.device)
        datas = [bytes(batch["jpeg"][index[k]]) for k in rows]
        decoded, device_errors = decode_preprocess_jpegs(datas, spec, self.loaded.device)
        images[rows] = decoded
        for k, data, err in zip(rows, datas, device_errors):
            if err is not None:
                i = index[k]
                image, _, _, cpu_error, _ = _decode_preprocess(data, str(batch["path"][i]), spec)
                if cpu_error:
                    errors[i] = cpu_error
                else:
                    images[k] = torch.from_numpy(image).to(images.device)
        return images


def score_dataset(
    paths_ds,
    model_uri: str,
    spec: PreprocessSpec,
    plan: ResourcePlan,
    run_id: str,
    settings: storage.S3Settings,
    predictor_cls: type = None,
    device_jpeg: bool | None = None,
    all_views: bool = False,
):
    """The scoring pipeline as a lazy Ray Dataset of result rows (``OUTPUT_SCHEMA``; a ``predictor_cls``
    subclassing :class:`Predictor` may add columns). ``device_jpeg`` (default: when the actors have GPUs):
    JPEGs are decoded by the predictor on its device (nvJPEG), not by the CPU decode tasks. ``all_views``: score
    lateral and oblique DICOM views too (otherwise error rows)."""
    import ray.data

    if device_jpeg is None:
        device_jpeg = plan.gpus_per_actor > 0
    decoded = decoded_dataset(paths_ds, spec, settings, plan.task_cpus, plan.batch_size, device_jpeg, all_views)
    return decoded.map_batches(
        predictor_cls or Predictor,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "run_id": run_id,
            "threads": plan.threads_per_actor,
            "use_gpu": plan.gpus_per_actor > 0,
            "settings": settings,
        },
        batch_size=plan.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.actors),
        num_cpus=plan.cpus_per_actor,
        num_gpus=plan.gpus_per_actor,
        **torch_actor_remote_args(),
    )


# --------------------------------------------------------------------------- driver


@dataclass
class ScoreSummary:
    run_id: str
    model: str
    output: str
    files: int
    scored: int
    errors: int
    predicted_covid: int
    seconds: float
    images_per_s: float
    not_frontal: int = 0  # of the errors: lateral/oblique DICOM views left unscored
    plan: dict | None = None  # the ResourcePlan the run used (with the measured decode share)

    def line(self) -> str:
        views = f" ({self.not_frontal} of them not frontal views)" if self.not_frontal else ""
        return (
            f"scored {self.files} files: {self.scored} ok, {self.errors} errors{views}, {self.predicted_covid} "
            "predicted covid "
            f"in {self.seconds:.1f}s ({self.images_per_s:.1f} images/s) -> {self.output}"
        )


def summarize(output: str, run_id: str, model_id: str, seconds: float, settings: storage.S3Settings) -> ScoreSummary:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(output, settings)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["error", "prediction"])
    files = table.num_rows
    errors = files - pc.sum(pc.is_null(table["error"])).as_py() if files else 0
    covid = pc.sum(pc.equal(table["prediction"], "covid")).as_py() or 0 if files else 0
    return ScoreSummary(
        run_id,
        model_id,
        output,
        files,
        files - errors,
        errors,
        covid,
        seconds,
        files / seconds if seconds > 0 else 0.0,
        count_not_frontal(table["error"]),
    )


def count_not_frontal(errors) -> int:
    """How many rows of an ``error`` column are lateral/oblique views left unscored."""
    import pyarrow.compute as pc

    return pc.sum(pc.starts_with(errors, NOT_FRONTAL)).as_py() or 0 if len(errors) else 0


def score(
    inputs: list[str],
    output: str,
    model: str = "default",
    *,
    batch_size: int | None = None,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    threads_per_actor: int | None = None,
    overwrite: bool = False,
    run_id: str | None = None,
    device_jpeg: bool | None = None,
    all_views: bool = False,
    measure: bool = True,
) -> ScoreSummary:
    """Score every image under ``inputs`` into a Parquet table at ``output``.

    ``device_jpeg`` (default: on GPU actors) decodes JPEGs on the predictor's device, see :func:`score_dataset`.
    ``all_views``: score lateral and oblique DICOM views too; by default they are error rows (``not a frontal view``).
    ``measure`` (default): on CPU, size the plan by what these inputs cost to decode (:func:`measured_plan`).
    Raises InputError, CheckpointError or OutputError (before any work is started) when it cannot run.
    """
    settings = storage.s3_settings()
    loaded = load_checkpoint(
        model, settings=settings
    )  # validates the checkpoint fully before starting the cluster work
    info = loaded.info
    prepare_output(output, overwrite, settings)
    ensure_ray()
    paths = input_paths(inputs, settings)
    start = time.perf_counter()  # the run's time includes sampling the inputs' costs
    plan = measured_plan(
        paths,
        loaded,
        settings,
        all_views,
        measure,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        threads_per_actor=threads_per_actor,
        batch_size=batch_size,
    )
    del loaded
    paths_ds, n_inputs = table_dataset(pa.table({"path": paths})), len(paths)
    run_id = run_id or new_run_id()
    log.info("run %s: model %s, %d files, plan %s", run_id, info.model_id, n_inputs, plan)
    results = score_dataset(
        paths_ds, model, info.preprocess, plan, run_id, settings, device_jpeg=device_jpeg, all_views=all_views
    )
    fs, path = storage.filesystem(output, settings)
    results.write_parquet(
        path,
        filesystem=fs,
        min_rows_per_file=50_000,
        ray_remote_args={"num_cpus": plan.task_cpus},
        concurrency=WRITE_TASKS,
    )
    seconds = time.perf_counter() - start
    summary = summarize(output, run_id, info.model_id, seconds, settings)
    summary.plan = asdict(plan)
    if summary.files != n_inputs:
        raise RuntimeError(f"output has {summary.files} rows for {n_inputs} input files")
    storage.write_bytes(storage.join(output, SUMMARY_FILE), json.dumps(asdict(summary), indent=2).encode(), settings)
    return summary
