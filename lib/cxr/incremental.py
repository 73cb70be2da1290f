"""Nightly incremental scoring into a table that grows run after run, exactly once per image and model.

Table layout under its root (a local directory or an ``s3://`` prefix)::

    run_date=2026-11-27/run_id=20261127T020000Z-1a2b3c/
        <attempt>-<file>.parquet     the run's rows (score.OUTPUT_SCHEMA + source_size, source_mtime)
        _committed.json              commit manifest: the run's data files and counts; written last
    _staging/<run_id>/run.json       a run in progress (model, run date); removed when it commits
    _staging/<run_id>/<attempt>/     what Ray Data writes while the run scores
    _reports/<run_id>.json           the run's report

**Commit protocol.** A run scores into ``_staging/`` (invisible to Parquet readers: pyarrow and Ray
Data skip names starting with ``_``), copies the finished files into its partition, then writes the
partition's ``_committed.json``, which lists them. A run is committed if and only if that manifest
exists, and :func:`read_table` reads exactly the files manifests list. No step relies on rename being
atomic (it is not on S3): the manifest is a single PUT, and S3 objects become visible whole.

**Incremental.** An image is identified by its URI plus the size and modification time its listing
gives (``pyarrow.fs.FileInfo``, local or S3). A run scores the images that are new, changed, or whose
last row is a read failure (retried), and skips the others, per model (``model`` column).

**Resume.** A run that dies (driver killed, cluster lost) leaves its ``_staging/<run_id>``. The next run
for the same model resumes it (same ``run_id`` and ``run_date``): the complete Parquet files the dead
attempt left are kept (a file is usable when its footer reads; a file still being written when the
driver died is ignored and its rows scored again), only the rest is scored, and the run commits once.
Files the dead attempt finished after the snapshot are not listed in the manifest, so they cannot add
duplicates. Only one run per table and model may be in progress at a time (the nightly CronJob runs
one launcher at a time).
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage
from .checkpoint import load_checkpoint
from .decode import NOT_FRONTAL
from .output import OutputError, new_run_id
from .resources import WRITE_TASKS
from .runtime import ensure_ray
from .score import OUTPUT_SCHEMA, Predictor, count_not_frontal, measured_plan, score_dataset
from .sources import InputError, input_paths, is_manifest, list_image_infos, table_dataset

log = logging.getLogger(__name__)

TABLE_SCHEMA = OUTPUT_SCHEMA.append(pa.field("source_size", pa.int64())).append(
    pa.field("source_mtime", pa.timestamp("ns", tz="UTC"))
)
PARTITIONING = pads.partitioning(pa.schema([("run_date", pa.string()), ("run_id", pa.string())]), flavor="hive")
COMMIT_FILE = "_committed.json"
STAGING = "_staging"
REPORTS = "_reports"
RUN_FILE = "run.json"
READ_FAILED = "read failed"


# --------------------------------------------------------------------------- inputs with their identity


def input_infos(uris: list[str], settings: storage.S3Settings | None = None) -> pa.Table:
    """Every input image once: ``path``, ``source_size``, ``source_mtime_ns`` (null when a manifest
    names a file that does not exist: it is scored, and becomes a read-failure row)."""
    rows: dict[str, tuple[int | None, int | None]] = {}
    for uri in uris:
        if is_manifest(uri):
            paths = [p for p in input_paths([uri], settings).to_pylist() if p not in rows]
            for p, info in zip(paths, _stat(paths, settings)):
                rows[p] = info
        else:
            for info in list_image_infos(uri, settings):
                rows.setdefault(info.path, (info.size, info.mtime_ns))
    if not rows:
        raise InputError("no PNG, JPEG or DICOM files found in " + ", ".join(uris))
    return pa.table(
        {
            "path": pa.array(list(rows), pa.string()),
            "source_size": pa.array([v[0] for v in rows.values()], pa.int64()),
            "source_mtime_ns": pa.array([v[1] for v in rows.values()], pa.int64()),
        }
    )


def _stat(uris: list[str], settings) -> list[tuple[int | None, int | None]]:
    def one(uri):
        try:
            info = storage.info(uri, settings)
        except OSError:
            return None, None
        return (info.size, info.mtime_ns) if info.type == pafs.FileType.File else (None, None)

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, uris))


class KeyedPredictor(Predictor):
    """The score pipeline's predictor, adding each image's identity (size, modification time) to its row."""

    def __call__(self, batch: dict) -> pa.Table:
        table = super().__call__(batch)
        size = np.asarray(batch["source_size"], dtype=np.int64)
        mtime = np.asarray(batch["source_mtime_ns"], dtype=np.int64)
        missing = size < 0
        return table.append_column(
            TABLE_SCHEMA.field("source_size"), pa.array(size, pa.int64(), mask=missing)
        ).append_column(
            TABLE_SCHEMA.field("source_mtime"),
            pa.array(mtime, pa.int64(), mask=missing).cast(TABLE_SCHEMA.field("source_mtime").type),
        )


# --------------------------------------------------------------------------- reading the table


def _root(uri: str, settings) -> tuple[pafs.FileSystem, str]:
    return storage.filesystem(uri, settings)


def committed_runs(uri: str, settings: storage.S3Settings | None = None) -> list[dict]:
    """The commit manifests of every committed run, oldest commit first."""
    fs, root = _root(uri, settings)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise OutputError(f"cannot list table {uri}: {storage.describe_error(exc)}") from exc
    manifests = [i.path for i in infos if i.type == pafs.FileType.File and posixpath.basename(i.path) == COMMIT_FILE]
    runs = []
    for path in manifests:
        with fs.open_input_stream(path) as f:
            runs.append(json.loads(f.read()))
    return sorted(runs, key=lambda r: (r["committed_at"], r["run_id"]))


def read_table(
    uri: str,
    columns: list[str] | None = None,
    *,
    all_versions: bool = False,
    settings: storage.S3Settings | None = None,
) -> pa.Table:
    """The committed rows of an incremental table: what readers should use.

    Only files listed by a run's ``_committed.json`` are read, so rows of a run in progress or of a
    run that died are never seen. By default one row per (``path``, ``model``): the one from the most
    recently committed run (an image that changed keeps only its latest score). ``all_versions=True``
    returns every committed row (the history). ``run_date`` and ``run_id`` come from the partition.
    """
    fs, root = _root(uri, settings)
    runs = committed_runs(uri, settings)
    files = [f"{root}/{f}" for r in runs for f in r["files"]]
    schema = TABLE_SCHEMA.append(pa.field("run_date", pa.string()))
    if not files:
        table = schema.empty_table()
    else:
        dataset = pads.dataset(
            files, schema=schema, filesystem=fs, format="parquet", partitioning=PARTITIONING, partition_base_dir=root
        )
        table = dataset.to_table()
    if not all_versions and table.num_rows:
        order = {r["run_id"]: i for i, r in enumerate(runs)}
        table = table.append_column("_order", pa.array([order[r] for r in table["run_id"].to_pylist()], pa.int32()))
        latest = (
            table.group_by(["path", "model"]).aggregate([("_order", "max")]).rename_columns(["path", "model", "_order"])
        )
        table = table.join(latest, ["path", "model", "_order"], join_type="inner").drop_columns(["_order"])
        table = table.sort_by([("path", "ascending"), ("model", "ascending")])
    if not all_versions and not table.num_rows:
        table = schema.empty_table()
    table = table.select([n for n in schema.names])
    return table.select(columns) if columns else table


# --------------------------------------------------------------------------- report


@dataclass
class RunReport:
    run_id: str
    run_date: str
    model: str
    table: str
    inputs: int
    new: int
    changed: int
    retried: int  # earlier rows were read failures
    skipped: int  # already scored by this model, unchanged
    reused: int  # rows finished by a run that died, resumed here
    scored: int  # rows this run adds (new + changed + retried); reused ones included
    ok: int
    errors: int
    predicted_positive: int
    positive_share: float | None
    previous_positive_share: float | None
    drift: bool
    drift_note: str
    score_quantiles: dict = field(default_factory=dict)
    score_histogram: list = field(default_factory=list)
    resumed: bool = False
    seconds: float = 0.0
    not_frontal: int = 0  # of the errors: lateral/oblique DICOM views left unscored (score them with --all-views)
    plan: dict | None = (
        None  # the score ResourcePlan (with the measured decode share); None when nothing was left to score
    )

    def line(self) -> str:
        share = "-" if self.positive_share is None else f"{self.positive_share:.3f}"
        prev = "-" if self.previous_positive_share is None else f"{self.previous_positive_share:.3f}"
        return (
            f"run {self.run_id}{' (resumed)' if self.resumed else ''}: {self.inputs} inputs: {self.new} new, "
            f"{self.changed} changed, "
            f"{self.retried} retried, {self.skipped} skipped; scored {self.scored} ({self.reused} reused from the "
            "dead attempt), "
            f"{self.errors} errors{f' ({self.not_frontal} of them not frontal views)' if self.not_frontal else ''}; "
            f"positive share {share} (previous {prev}){' DRIFT: ' + self.drift_note if self.drift else ''} "
            f"in {self.seconds:.1f}s -> {self.table}"
        )


def drift_check(
    pos: int, n: int, prev_pos: int, prev_n: int, threshold: float, alpha: float = 0.01
) -> tuple[bool, str]:
    """Flag a change of the share predicted positive of at least ``threshold`` (absolute) that is also
    significant (two-proportion z-test at ``alpha``), so a handful of images never raises the flag."""
    if n == 0 or prev_n == 0:
        return False, "no previous run to compare with" if prev_n == 0 else "nothing scored"
    p, q = pos / n, prev_pos / prev_n
    pooled = (pos + prev_pos) / (n + prev_n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n + 1 / prev_n)) if 0 < pooled < 1 else 0.0
    p_value = math.erfc(abs(p - q) / se / math.sqrt(2)) if se > 0 else (1.0 if p == q else 0.0)
    shifted = abs(p - q) >= threshold and p_value < alpha
    return (
        shifted,
        f"positive share {p:.3f} vs {q:.3f} over the previous runs (|diff| {abs(p - q):.3f}, threshold {threshold}, "
        f"p={p_value:.2g})",
    )


def classify(wanted: pa.Table, done: dict, all_views: bool = False) -> pa.Array:
    """What a run does with each input image (a row of :func:`input_infos`): ``new``, ``changed`` (other
    size or modification time), ``retried`` (its last row is a read failure, or a view left out when
    ``all_views``) or ``skipped``. ``done`` maps a path to its current row's (size, mtime in ns, error)."""
    kinds = []
    for p, s, m in zip(
        wanted["path"].to_pylist(), wanted["source_size"].to_pylist(), wanted["source_mtime_ns"].to_pylist()
    ):
        before = done.get(p)
        if before is None:
            kinds.append("new")
        elif (before[0], before[1]) != (s, m):
            kinds.append("changed")
        elif before[2] is not None and (
            before[2].startswith(READ_FAILED) or all_views and before[2].startswith(NOT_FRONTAL)
        ):
            kinds.append("retried")
        else:
            kinds.append("skipped")
    return pa.array(kinds, pa.string())


def distribution(prob: pa.Array) -> tuple[dict, list]:
    values = prob.drop_null().to_numpy(zero_copy_only=False)
    if not len(values):
        return {}, []
    qs = {f"p{int(q * 100):02d}": float(np.quantile(values, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
    qs["mean"] = float(values.mean())
    return qs, np.histogram(values, bins=10, range=(0.0, 1.0))[0].tolist()


# --------------------------------------------------------------------------- the run


def _rel(root: str, path: str) -> str:
    return posixpath.relpath(path, root)


def _list_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def _usable_parquet(fs: pafs.FileSystem, paths: list[str]) -> list[str]:
    """The files whose Parquet footer reads (a file cut short by a dying writer does not)."""
    good = []
    for path in paths:
        try:
            pq.read_metadata(path, filesystem=fs)
            good.append(path)
        except Exception:  # noqa: BLE001 - any unreadable file is simply not reused
            log.warning("ignoring incomplete staged file %s", path)
    return good


def _read_files(fs, files: list[str], columns: list[str] | None = None) -> pa.Table:
    if not files:
        return TABLE_SCHEMA.empty_table().select(columns) if columns else TABLE_SCHEMA.empty_table()
    return pads.dataset(files, schema=TABLE_SCHEMA, filesystem=fs, format="parquet").to_table(columns=columns)


def _pending_runs(fs, root: str, model_id: str) -> list[dict]:
    staging = f"{root}/{STAGING}"
    runs = []
    for info in fs.get_file_info(pafs.FileSelector(staging, allow_not_found=True)):
        if info.type != pafs.FileType.Directory:
            continue
        run_file = f"{info.path}/{RUN_FILE}"
        try:
            with fs.open_input_stream(run_file) as f:
                run = json.loads(f.read())
        except (OSError, ValueError):
            continue
        if run.get("model") == model_id:
            runs.append(run)
    return sorted(runs, key=lambda r: r["started_at"])


def _write_json(fs, path: str, obj: dict, local: bool) -> None:
    if local:
        fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(obj, indent=2, default=str).encode())


def run_incremental(
    inputs: list[str],
    table: str,
    model: str = "default",
    *,
    batch_size: int | None = None,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    threads_per_actor: int | None = None,
    rows_per_file: int | None = None,
    drift_threshold: float = 0.1,
    drift_window: int = 7,
    run_id: str | None = None,
    all_views: bool = False,
) -> RunReport:
    """Score what is new or changed under ``inputs`` into the incremental table at ``table``, resuming a
    run of the same model that died, and commit it; returns the run's report (also in ``_reports/``).
    ``all_views``: score lateral and oblique DICOM views too (and rows that earlier runs left unscored as
    ``not a frontal view``).

    Raises InputError, CheckpointError or OutputError before any work when it cannot run.

    Long on purpose: one run's phases (claim or resume the run, classify the inputs, reuse staged files, score,
    publish, commit the manifest, report) share the run's id, folders and counts, and the order of its writes is the
    commit protocol; read top to bottom, the protocol is visible in one place. New tables should use the Iceberg
    format (:func:`cxr.table.run_nightly`); this one is kept for folder tables and their migration.
    """
    settings = storage.s3_settings()
    loaded = load_checkpoint(model, settings=settings)  # validates it before any work; sizes the plan below
    info = loaded.info
    start = time.perf_counter()
    fs, root = _root(table, settings)
    local = not storage.is_s3(table)
    try:
        if fs.get_file_info(root).type == pafs.FileType.File:
            raise OutputError(f"table {table} is a file; give a directory or prefix")
        probe = f"{root}/{STAGING}/_write_check_{secrets.token_hex(4)}"
        _write_json(fs, probe, {}, local)
        fs.delete_file(probe)
        history = committed_runs(table, settings)
    except OutputError:
        raise
    except Exception as exc:
        raise OutputError(f"cannot write to {table}: {storage.describe_error(exc)}") from exc

    wanted = input_infos(inputs, settings)
    # -- the run: resume the one that died, or start one
    pending = []
    for run in _pending_runs(fs, root, info.model_id):
        if run["run_id"] in {r["run_id"] for r in history}:  # committed, then died before cleaning up
            fs.delete_dir(f"{root}/{STAGING}/{run['run_id']}")
        else:
            pending.append(run)
    for stale in pending[:-1]:  # only the newest can be resumed (one run at a time); older ones were superseded
        log.warning("discarding run %s that never committed (superseded by %s)", stale["run_id"], pending[-1]["run_id"])
        fs.delete_dir(f"{root}/{STAGING}/{stale['run_id']}")
    resumed = bool(pending)
    if resumed:
        run = pending[-1]
        log.info("resuming run %s of %s (started %s)", run["run_id"], run["run_date"], run["started_at"])
    else:
        now = datetime.now(UTC)
        run = {
            "run_id": run_id or new_run_id(),
            "run_date": now.strftime("%Y-%m-%d"),
            "model": info.model_id,
            "model_uri": model,
            "started_at": now.isoformat(),
            "inputs": inputs,
        }
        _write_json(fs, f"{root}/{STAGING}/{run['run_id']}/{RUN_FILE}", run, local)
    rid, run_date = run["run_id"], run["run_date"]
    staging = f"{root}/{STAGING}/{rid}"

    # -- what is to do: compare with the table's current rows for this model
    current = read_table(table, ["path", "model", "source_size", "source_mtime", "error"], settings=settings)
    current = current.filter(pc.equal(current["model"], info.model_id))
    done = {
        p: (s, m, e)
        for p, s, m, e in zip(
            current["path"].to_pylist(),
            current["source_size"].to_pylist(),
            current["source_mtime"].cast(pa.int64()).to_pylist(),
            current["error"].to_pylist(),
        )
    }
    kinds = classify(wanted, done, all_views)
    todo = wanted.filter(pc.not_equal(kinds, "skipped"))
    todo_keys = {
        (p, s, m)
        for p, s, m in zip(
            todo["path"].to_pylist(), todo["source_size"].to_pylist(), todo["source_mtime_ns"].to_pylist()
        )
    }

    # -- reuse what a dead attempt of this run finished
    staged = _usable_parquet(fs, [i.path for i in _list_files(fs, staging) if i.path.endswith(".parquet")])
    reused_files, reused_paths = [], set()
    for path in staged:
        rows = _read_files(fs, [path], ["path", "source_size", "source_mtime"])
        keys = list(
            zip(
                rows["path"].to_pylist(),
                rows["source_size"].to_pylist(),
                rows["source_mtime"].cast(pa.int64()).to_pylist(),
            )
        )
        names = {k[0] for k in keys}
        if all(k in todo_keys for k in keys) and not names & reused_paths and len(names) == len(keys):
            reused_files.append(path)
            reused_paths |= names
        else:  # its rows are stale (the image changed again) or overlap another file: score them again
            log.warning("not reusing staged file %s", path)
    remaining = todo.filter(pc.invert(pc.is_in(todo["path"], pa.array(sorted(reused_paths), pa.string()))))
    counts = {k: pc.sum(pc.equal(kinds, k)).as_py() or 0 for k in ("new", "changed", "retried", "skipped")}
    log.info(
        "run %s: %d inputs: %d new, %d changed, %d retried, %d skipped; %d reused, %d to score",
        rid,
        len(wanted),
        counts["new"],
        counts["changed"],
        counts["retried"],
        counts["skipped"],
        len(reused_paths),
        len(remaining),
    )

    # -- score the rest into a fresh attempt folder
    attempt = f"{staging}/{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    new_files: list[str] = []
    plan = None
    if len(remaining):
        ensure_ray()
        plan = measured_plan(
            remaining["path"],
            loaded,
            settings,
            all_views,
            actors=actors,
            cpus_per_actor=cpus_per_actor,
            gpus_per_actor=gpus_per_actor,
            threads_per_actor=threads_per_actor,
            batch_size=batch_size,
        )
        del loaded
        per_file = rows_per_file or max(plan.batch_size, min(10_000, -(-len(remaining) // 20)))
        log.info("run %s: plan %s, ~%d rows per file", rid, plan, per_file)
        keyed = remaining.set_column(1, "source_size", pc.fill_null(remaining["source_size"], -1)).set_column(
            2, "source_mtime_ns", pc.fill_null(remaining["source_mtime_ns"], -1)
        )  # missing file: -1 (numpy has no null ints)
        results = score_dataset(
            table_dataset(keyed),
            model,
            info.preprocess,
            plan,
            rid,
            settings,
            predictor_cls=KeyedPredictor,
            all_views=all_views,
        )
        results.write_parquet(
            attempt,
            filesystem=fs,
            min_rows_per_file=per_file,
            ray_remote_args={"num_cpus": plan.task_cpus},
            concurrency=WRITE_TASKS,
        )
        new_files = _usable_parquet(fs, [i.path for i in _list_files(fs, attempt) if i.path.endswith(".parquet")])

    # -- check: exactly one row per image to do
    files = reused_files + new_files
    rows = _read_files(fs, files, ["path"])
    if rows.num_rows != len(todo) or set(rows["path"].to_pylist()) != set(todo["path"].to_pylist()):
        raise RuntimeError(
            f"run {rid}: staged {rows.num_rows} rows ({len(set(rows['path'].to_pylist()))} images) for {len(todo)} "
            "images to score"
        )

    # -- publish into the run's partition, then commit with the manifest (written last)
    partition = f"{root}/run_date={run_date}/run_id={rid}"
    if local:
        fs.create_dir(partition, recursive=True)
    fs.delete_dir_contents(partition, missing_dir_ok=True)  # leftovers of a publish that was cut short
    published = []
    for src in files:
        dst = f"{partition}/{posixpath.basename(posixpath.dirname(src))}-{posixpath.basename(src)}"
        fs.copy_file(src, dst)
        published.append(_rel(root, dst))
    stats = _read_files(fs, files, ["prob_covid", "prediction", "error"])
    n_err = stats.num_rows - (pc.sum(pc.is_null(stats["error"])).as_py() or 0) if stats.num_rows else 0
    n_ok = stats.num_rows - n_err
    positive = (pc.sum(pc.equal(stats["prediction"], info.positive_class)).as_py() or 0) if stats.num_rows else 0
    previous = [r for r in history if r["model"] == info.model_id and r["counts"]["ok"] > 0][-drift_window:]
    prev_ok = sum(r["counts"]["ok"] for r in previous)
    prev_pos = sum(r["counts"]["predicted_positive"] for r in previous)
    drift, note = drift_check(positive, n_ok, prev_pos, prev_ok, drift_threshold)
    quantiles, histogram = distribution(stats["prob_covid"])
    report = RunReport(
        run_id=rid,
        run_date=run_date,
        model=info.model_id,
        table=table,
        inputs=len(wanted),
        new=counts["new"],
        changed=counts["changed"],
        retried=counts["retried"],
        skipped=counts["skipped"],
        reused=len(reused_paths),
        scored=stats.num_rows,
        ok=n_ok,
        errors=n_err,
        predicted_positive=positive,
        positive_share=positive / n_ok if n_ok else None,
        previous_positive_share=prev_pos / prev_ok if prev_ok else None,
        drift=drift,
        drift_note=note,
        score_quantiles=quantiles,
        score_histogram=histogram,
        resumed=resumed,
        seconds=time.perf_counter() - start,
        not_frontal=count_not_frontal(stats["error"]),
        plan=asdict(plan) if plan else None,
    )
    manifest = {
        "run_id": rid,
        "run_date": run_date,
        "model": info.model_id,
        "model_uri": run["model_uri"],
        "inputs": run["inputs"],
        "started_at": run["started_at"],
        "committed_at": datetime.now(UTC).isoformat(),
        "files": published,
        "counts": {"rows": stats.num_rows, "ok": n_ok, "errors": n_err, "predicted_positive": positive},
    }
    _write_json(fs, f"{partition}/{COMMIT_FILE}", manifest, local)  # the commit
    _write_json(fs, f"{root}/{REPORTS}/{rid}.json", asdict(report), local)
    try:
        fs.delete_dir(staging)
    except OSError as exc:  # committed already; the next run would find no run.json problem either way
        log.warning("could not clean %s: %s", staging, storage.describe_error(exc))
    return report
