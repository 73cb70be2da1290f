"""The nightly result table as an Apache Iceberg table: one current row per (``path``, ``model``), readable by
every engine that reads Iceberg (PyIceberg, Polars, DuckDB, Trino, Athena, Spark), exactly once under faults.

**Catalog.** A table is named ``namespace.table`` in a PyIceberg catalog. The embedded default is PyIceberg's
SQL catalog on a SQLite file, ``<warehouse>/catalog.db``, beside a local warehouse folder (nothing to run); a
warehouse on ``s3://`` takes a catalog URI (``sqlite:////path/catalog.db`` on the launcher, or a REST catalog's
``https://`` URL). Without ``warehouse``/``uri`` the catalog is PyIceberg's own configuration by name
(``.pyiceberg.yaml``, ``PYICEBERG_CATALOG__<NAME>__*`` variables: REST, AWS Glue, ...).

**Writes.** Rows go in with Ray Data's Iceberg writer in upsert mode on (``path``, ``model``): a changed image's
new row replaces its old one in the current snapshot, and earlier snapshots keep the old one (time travel).
A run commits in chunks of ``commit_every`` images (one snapshot each); a chunk is visible whole or not at all.
Every snapshot's summary carries ``cxr.*`` properties: run id, run date, model, chunk number, the chunk's counts,
and on a run's last snapshot ``cxr.run-complete=true`` with the run's report (JSON, drift included).

**Resume.** A run that died leaves its committed chunks (rows and snapshots) and no ``cxr.run-complete=true``
snapshot. The next run of the same model takes over its run id: the committed rows are skipped (they are
current), the rest is scored, at most one chunk (the one in flight) is scored again.

**Concurrency.** Each commit requires the table's current snapshot to be the one this run last saw (its own
last commit, or the table as it found it). A second writer in between makes the commit fail with
:class:`ConcurrentRunError`, nothing of the failed chunk visible: of two runs started at once, the first to
commit wins and the other stops at its next commit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from . import storage
from .configs import MAINTAIN_OLDER_THAN_DAYS, MAINTAIN_RETAIN_LAST, ORPHANS_OLDER_THAN_HOURS
from .output import OutputError

log = logging.getLogger(__name__)

KEYS = ["path", "model"]
PREFIX = "cxr."
COMPLETE = PREFIX + "run-complete"
REPORT = PREFIX + "report"
CATALOG_FILE = "catalog.db"
DEFAULT_CATALOG = "cxr"
# Images per commit: a killed run scores at most this many again, and each commit costs about a second and
# one snapshot (compacted by maintenance). 1/10 of the run, at least 1,000 and at most 20,000 images.
MIN_CHUNK, MAX_CHUNK = 1_000, 20_000
# Unreferenced files younger than this are kept by maintenance: a write still in flight has written its files and not
# yet committed them. Iceberg's own default (Spark's remove_orphan_files): far beyond any write's duration here.
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def iceberg_schema() -> pa.Schema:
    """The table's columns: the score rows, the image identity (Iceberg v2 timestamps are microseconds), run date."""
    from .incremental import TABLE_SCHEMA

    fields = [
        pa.field("source_mtime", pa.timestamp("us", tz="UTC")) if f.name == "source_mtime" else f for f in TABLE_SCHEMA
    ]
    return pa.schema(fields).append(pa.field("run_date", pa.string()))


class ConcurrentRunError(OutputError):
    """Another writer committed to the table while this run was scoring."""


def is_identifier(name: str) -> bool:
    """Whether ``name`` is an Iceberg table name (``namespace.table``) rather than a folder or URI."""
    return bool(_IDENT.match(name)) and not os.path.exists(name)


def default_chunk(n: int) -> int:
    return max(MIN_CHUNK, min(MAX_CHUNK, math.ceil(n / 10)))


# --------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class CatalogConfig:
    """Where a table's catalog is: ``warehouse`` (folder or ``s3://`` prefix) and/or ``uri`` (``sqlite:///...``,
    ``https://`` REST), or neither: PyIceberg's configuration of the catalog ``name``."""

    name: str = DEFAULT_CATALOG
    warehouse: str | None = None
    uri: str | None = None

    def properties(self) -> dict[str, str]:
        props: dict[str, str] = {}
        if self.uri:
            props["uri"] = self.uri
            props["type"] = "rest" if self.uri.startswith(("http://", "https://")) else "sql"
        if self.warehouse:
            if storage.is_s3(self.warehouse):
                props["warehouse"] = self.warehouse.rstrip("/")
                if not self.uri:
                    raise OutputError(
                        f"a warehouse on S3 ({self.warehouse}) needs --catalog-uri: a SQLite file "
                        "(sqlite:////path/catalog.db) or a REST catalog URL"
                    )
            else:
                folder = os.path.abspath(self.warehouse)
                if os.path.isfile(folder):
                    raise OutputError(f"warehouse {self.warehouse} is a file; give a folder")
                os.makedirs(folder, exist_ok=True)
                props["warehouse"] = "file://" + folder
                if not self.uri:
                    props.update(type="sql", uri=f"sqlite:///{os.path.join(folder, CATALOG_FILE)}")
        settings = storage.s3_settings()
        if settings.endpoint_url:
            props.setdefault("s3.endpoint", settings.endpoint_url)
        if settings.region:
            props.setdefault("s3.region", settings.region)
        return props

    def load(self):
        from pyiceberg.catalog import load_catalog

        try:
            return load_catalog(self.name, **self.properties())
        except OutputError:
            raise
        except Exception as exc:
            raise OutputError(
                f"cannot open Iceberg catalog {self.name!r}: {exc} (give --warehouse, --catalog-uri, "
                "or configure the catalog in .pyiceberg.yaml)"
            ) from exc


def open_table(identifier: str, catalog: CatalogConfig, create: bool = True):
    """The Iceberg table ``identifier`` (``namespace.table``), created empty with the nightly schema if missing."""
    from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError, TableAlreadyExistsError

    cat = catalog.load()
    try:
        return cat.load_table(identifier)
    except NoSuchTableError:
        if not create:
            raise OutputError(f"no table {identifier} in catalog {catalog.name!r}") from None
    except Exception as exc:
        raise OutputError(f"cannot open table {identifier}: {storage.describe_error(exc)}") from exc
    namespace = identifier.rsplit(".", 1)[0]
    try:
        cat.create_namespace(namespace)
    except NamespaceAlreadyExistsError:
        pass
    try:
        return cat.create_table(identifier, schema=iceberg_schema())
    except TableAlreadyExistsError:  # another run created it meanwhile
        return cat.load_table(identifier)
    except Exception as exc:
        raise OutputError(f"cannot create table {identifier}: {storage.describe_error(exc)}") from exc


# --------------------------------------------------------------------------- history (snapshot summaries)


def snapshots(tbl) -> list[dict]:
    """Every snapshot of the table, oldest first: ``snapshot_id``, ``timestamp_ms``, ``operation`` and the
    summary's ``cxr.*`` properties (without the prefix)."""
    out = []
    for snap in sorted(tbl.snapshots(), key=lambda s: (s.sequence_number or 0, s.timestamp_ms)):
        summary = snap.summary.additional_properties if snap.summary else {}
        props = {k[len(PREFIX) :]: v for k, v in summary.items() if k.startswith(PREFIX)}
        out.append(
            {
                "snapshot_id": snap.snapshot_id,
                "timestamp_ms": snap.timestamp_ms,
                "operation": str(snap.summary.operation.value) if snap.summary else None,
                **props,
            }
        )
    return out


def run_reports(tbl, model: str | None = None) -> list[dict]:
    """The reports of the completed runs (from their last snapshot's summary), oldest first."""
    reports = {}  # by run id: one report per run (PyIceberg's own upsert may commit a run as two snapshots)
    for s in snapshots(tbl):
        if s.get("run-complete") == "true" and "report" in s:
            reports.pop(s["run-id"], None)
            reports[s["run-id"]] = json.loads(s["report"])
    return [r for r in reports.values() if model is None or r["model"] == model]


def _current(tbl, model_id: str) -> pa.Table:
    from pyiceberg.expressions import EqualTo

    if tbl.current_snapshot() is None:
        return iceberg_schema().empty_table().select(["path", "source_size", "source_mtime", "error", "run_id"])
    return tbl.scan(
        row_filter=EqualTo("model", model_id),
        selected_fields=("path", "source_size", "source_mtime", "error", "run_id"),
    ).to_arrow()


# --------------------------------------------------------------------------- commits


def _sink_class():
    from ray.data._internal.datasource.iceberg_datasink import IcebergDatasink

    class GuardedIcebergDatasink(IcebergDatasink):
        """Ray Data's Iceberg writer, committing only on top of the snapshot this run last saw (the
        transaction it commits already requires the snapshot it loaded: no writer can slip in between)."""

        def __init__(self, *args, expected_snapshot: int | None, **kwargs):
            super().__init__(*args, **kwargs)
            self._expected = expected_snapshot

        def on_write_start(self, schema=None) -> None:
            super().on_write_start(schema)
            _check_expected(self._table, self._expected)

    return GuardedIcebergDatasink


def _check_expected(tbl, expected: int | None) -> None:
    snap = tbl.current_snapshot()
    now = snap.snapshot_id if snap else None
    if now != expected:
        summary = snap.summary.additional_properties if snap and snap.summary else {}
        who = summary.get(PREFIX + "run-id", "another writer")
        raise ConcurrentRunError(
            f"table {'.'.join(tbl.name())} was changed by {who} (snapshot {now}) while this run "
            "was scoring; this run's uncommitted work was dropped, the table is unchanged by it"
        )


def _is_commit_conflict(exc: BaseException) -> bool:
    from pyiceberg.exceptions import CommitFailedException

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (CommitFailedException, ConcurrentRunError)) or "CommitFailedException" in repr(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def commit_rows(
    tbl, identifier: str, catalog: CatalogConfig, rows: pa.Table, properties: dict[str, str], expected: int | None
) -> int:
    """Upsert ``rows`` on (path, model) as one snapshot with ``properties`` in its summary, on top of snapshot
    ``expected`` only; returns the new snapshot's id. Rows are written by Ray Data's Iceberg writer; a commit
    with no rows (a run with nothing to score still reports) by PyIceberg."""
    from ray.data import SaveMode

    props = {k: str(v) for k, v in properties.items()}
    try:
        if rows.num_rows:
            import ray.data

            # upsert on (path, model); into a table without any snapshot an append (Ray 2.60's upsert cannot scan
            # a table that has no 'main' branch yet); the expected-snapshot check makes that the same thing
            upsert = {"mode": SaveMode.UPSERT, "upsert_kwargs": {"join_cols": KEYS}} if expected is not None else {}
            sink = _sink_class()(
                identifier,
                catalog_kwargs={"name": catalog.name, **catalog.properties()},
                snapshot_properties=props,
                expected_snapshot=expected,
                **upsert,
            )
            ray.data.from_arrow(rows).write_datasink(sink)
        else:
            tbl.refresh()
            _check_expected(tbl, expected)
            tbl.append(iceberg_schema().empty_table(), snapshot_properties=props)
    except ConcurrentRunError:
        raise
    except Exception as exc:
        if _is_commit_conflict(exc):
            raise ConcurrentRunError(
                f"table {identifier}: another writer committed first ({exc}); this run's "
                "uncommitted work was dropped, the table is unchanged by it"
            ) from exc
        raise
    tbl.refresh()
    snap = tbl.current_snapshot()
    mine = snap.summary.additional_properties if snap.summary else {}
    if snap.parent_snapshot_id != expected or any(mine.get(k) != v for k, v in props.items() if k.startswith(PREFIX)):
        raise ConcurrentRunError(
            f"table {identifier}: the commit of run {props.get(PREFIX + 'run-id')} landed on top "
            f"of snapshot {snap.parent_snapshot_id}, not {expected}"
        )
    return snap.snapshot_id


def _to_table_rows(batch: pa.Table, run_date: str) -> pa.Table:
    schema = iceberg_schema()
    batch = batch.set_column(
        batch.schema.get_field_index("source_mtime"),
        "source_mtime",
        batch["source_mtime"].cast(pa.timestamp("us", tz="UTC"), safe=False),
    )
    batch = batch.append_column("run_date", pa.array([run_date] * batch.num_rows, pa.string()))
    return batch.select(schema.names).cast(schema)


def _counts(rows: pa.Table, positive_class: str) -> dict[str, int]:
    n = rows.num_rows
    errors = n - (pc.sum(pc.is_null(rows["error"])).as_py() or 0) if n else 0
    positive = (pc.sum(pc.equal(rows["prediction"], positive_class)).as_py() or 0) if n else 0
    return {"rows": n, "ok": n - errors, "errors": errors, "predicted-positive": positive}


# --------------------------------------------------------------------------- the nightly run


def run_nightly(
    inputs: list[str],
    identifier: str,
    model: str = "default",
    *,
    catalog: CatalogConfig | None = None,
    batch_size: int | None = None,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    threads_per_actor: int | None = None,
    commit_every: int | None = None,
    drift_threshold: float = 0.1,
    drift_window: int = 7,
    run_id: str | None = None,
    all_views: bool = False,
    everything: bool = False,
):
    """Score what is new or changed under ``inputs`` into the Iceberg table ``identifier``, committing every
    ``commit_every`` images (default :func:`default_chunk`) and resuming a run of the same model that died;
    returns the run's report (a :class:`cxr.incremental.RunReport`, also in the last snapshot's summary).
    ``everything``: a one-off run (jobs/score.py --table) that scores every input again, whatever the table holds;
    its snapshots say ``cxr.operation-kind=score`` and a nightly run never resumes it.

    Raises InputError, CheckpointError or OutputError before any work when it cannot run, and
    ConcurrentRunError when another writer commits to the table meanwhile.

    Long on purpose: the phases (resume or start the run, classify the inputs against the table, plan, score and
    commit in chunks, the final report snapshot) share the run's id, counts and the snapshot each commit expects;
    kept in one function so the exactly-once order of commits reads top to bottom."""
    from .checkpoint import load_checkpoint
    from .incremental import KeyedPredictor, RunReport, classify, distribution, drift_check, input_infos
    from .output import new_run_id
    from .runtime import ensure_ray
    from .score import count_not_frontal, measured_plan, score_dataset
    from .sources import table_dataset

    catalog = catalog or CatalogConfig()
    settings = storage.s3_settings()
    loaded = load_checkpoint(model, settings=settings)
    info = loaded.info
    start = time.perf_counter()
    tbl = open_table(identifier, catalog)
    wanted = input_infos(inputs, settings)
    history = snapshots(tbl)

    # -- the run: resume this model's run that never completed, or start one
    kind = "score" if everything else "nightly"
    mine = [s for s in history if s.get("model") == info.model_id and s.get("operation-kind") == kind]
    resumed = not everything and bool(mine) and mine[-1].get("run-complete") == "false"
    if resumed:
        rid, run_date = mine[-1]["run-id"], mine[-1]["run-date"]
        log.info(
            "resuming run %s of %s (%s chunks committed)", rid, run_date, sum(s.get("run-id") == rid for s in mine)
        )
    else:
        rid, run_date = run_id or new_run_id(), datetime.now(UTC).strftime("%Y-%m-%d")
    earlier = [s for s in mine if s.get("run-id") == rid]  # chunks a dead attempt of this run committed

    # -- what is to do: compare with the current rows of this model (identity to the microsecond)
    current = _current(tbl, info.model_id)
    done = {
        p: (s, None if m is None else m * 1000, e)
        for p, s, m, e in zip(
            current["path"].to_pylist(),
            current["source_size"].to_pylist(),
            current["source_mtime"].cast(pa.int64()).to_pylist(),
            current["error"].to_pylist(),
        )
    }
    reused_paths = set(pc.filter(current["path"], pc.equal(current["run_id"], rid)).to_pylist()) if resumed else set()
    us_mtime = pc.multiply(pc.divide(wanted["source_mtime_ns"], 1000), 1000)
    kinds = classify(wanted.set_column(2, "source_mtime_ns", us_mtime), done, all_views)
    kinds = pa.array(
        [
            "reused" if k == "skipped" and p in reused_paths else k
            for p, k in zip(wanted["path"].to_pylist(), kinds.to_pylist())
        ]
    )
    reused_paths = {p for p, k in zip(wanted["path"].to_pylist(), kinds.to_pylist()) if k == "reused"}
    todo = wanted if everything else wanted.filter(pc.is_in(kinds, pa.array(["new", "changed", "retried"])))
    kind_of = dict(zip(wanted["path"].to_pylist(), kinds.to_pylist()))
    counts = {k: pc.sum(pc.equal(kinds, k)).as_py() or 0 for k in ("new", "changed", "retried", "skipped", "reused")}
    for k in ("new", "changed", "retried"):  # what the dead attempt did counts for the run
        counts[k] += sum(int(s.get(k, 0)) for s in earlier)
    chunk = commit_every or default_chunk(len(todo) + len(reused_paths))
    log.info(
        "run %s: %d inputs: %d new, %d changed, %d retried, %d skipped; %d reused, %d to score, %d per commit",
        rid,
        len(wanted),
        counts["new"],
        counts["changed"],
        counts["retried"],
        counts["skipped"],
        len(reused_paths),
        len(todo),
        chunk,
    )

    base = {"operation-kind": kind, "run-id": rid, "run-date": run_date, "model": info.model_id, "model-uri": model}
    expected = tbl.current_snapshot().snapshot_id if tbl.current_snapshot() else None
    number = len(earlier)
    totals = {"rows": 0, "ok": 0, "errors": 0, "predicted-positive": 0}
    for s in earlier:
        for k in totals:
            totals[k] += int(s.get(k, 0))
    scored_now: list[pa.Table] = []

    def commit(rows: pa.Table, final: dict | None = None) -> None:
        nonlocal expected, number
        c = _counts(rows, info.positive_class)
        chunk_kinds = [kind_of.get(p) for p in rows["path"].to_pylist()]
        props = {
            **base,
            "chunk": number,
            COMPLETE[len(PREFIX) :]: "true" if final else "false",
            **c,
            **{k: chunk_kinds.count(k) for k in ("new", "changed", "retried")},
            **(final or {}),
        }
        expected = commit_rows(tbl, identifier, catalog, rows, {PREFIX + k: v for k, v in props.items()}, expected)
        number += 1
        log.info("run %s: committed chunk %d (%d rows) as snapshot %s", rid, number, rows.num_rows, expected)

    plan = None
    buffer: list[pa.Table] = []
    if len(todo):
        ensure_ray()
        plan = measured_plan(
            todo["path"],
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
        keyed = todo.set_column(1, "source_size", pc.fill_null(todo["source_size"], -1)).set_column(
            2, "source_mtime_ns", pc.fill_null(todo["source_mtime_ns"], -1)
        )
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
        for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = _to_table_rows(batch, run_date)
            buffer.append(rows)
            scored_now.append(rows.select(["prob_covid", "prediction", "error"]))
            while sum(t.num_rows for t in buffer) >= chunk:  # commit exactly `chunk` rows, keep the rest
                pending = pa.concat_tables(buffer)
                done_rows, buffer = pending.slice(0, chunk), [pending.slice(chunk)]
                commit(done_rows)
                for k, v in _counts(done_rows, info.positive_class).items():
                    totals[k] += v

    # -- the last commit carries the run's report
    last = pa.concat_tables(buffer) if buffer else iceberg_schema().empty_table()
    for k, v in _counts(last, info.positive_class).items():
        totals[k] += v
    if totals["rows"] != len(todo) + len(reused_paths):
        raise RuntimeError(f"run {rid}: {totals['rows']} rows for {len(todo) + len(reused_paths)} images to score")
    stats = _run_rows(tbl, rid, scored_now) if resumed else (pa.concat_tables(scored_now) if scored_now else None)
    quantiles, histogram = distribution(stats["prob_covid"]) if stats is not None else ({}, [])
    previous = [r for r in run_reports(tbl, info.model_id) if r["ok"] > 0 and r["run_id"] != rid][-drift_window:]
    prev_ok, prev_pos = sum(r["ok"] for r in previous), sum(r["predicted_positive"] for r in previous)
    drift, note = drift_check(totals["predicted-positive"], totals["ok"], prev_pos, prev_ok, drift_threshold)
    report = RunReport(
        run_id=rid,
        run_date=run_date,
        model=info.model_id,
        table=identifier,
        inputs=len(wanted),
        new=counts["new"],
        changed=counts["changed"],
        retried=counts["retried"],
        skipped=counts["skipped"],
        reused=len(reused_paths),
        scored=totals["rows"],
        ok=totals["ok"],
        errors=totals["errors"],
        predicted_positive=totals["predicted-positive"],
        positive_share=totals["predicted-positive"] / totals["ok"] if totals["ok"] else None,
        previous_positive_share=prev_pos / prev_ok if prev_ok else None,
        drift=drift,
        drift_note=note,
        score_quantiles=quantiles,
        score_histogram=histogram,
        resumed=resumed,
        seconds=time.perf_counter() - start,
        not_frontal=count_not_frontal(stats["error"]) if stats is not None else 0,
        plan=asdict(plan) if plan else None,
    )
    commit(last, {"report": json.dumps(asdict(report), default=str), "drift": str(drift).lower()})
    report.seconds = time.perf_counter() - start
    return report


def _run_rows(tbl, rid: str, scored_now: list[pa.Table]) -> pa.Table | None:
    """This run's rows for its statistics: those committed by a dead attempt and those scored now."""
    from pyiceberg.expressions import EqualTo

    parts = [
        tbl.scan(row_filter=EqualTo("run_id", rid), selected_fields=("prob_covid", "prediction", "error")).to_arrow()
    ]
    parts += scored_now
    return pa.concat_tables([p.cast(parts[0].schema) for p in parts])


# --------------------------------------------------------------------------- maintenance


@dataclass
class MaintenanceReport:
    table: str
    snapshots_before: int
    snapshots_expired: int  # the compaction's own intermediate snapshot included; in a dry run: would expire
    snapshots_after: int
    data_files_before: int
    data_files_after: int
    files_deleted: int
    bytes_before: int
    bytes_after: int
    rows: int
    seconds: float
    orphans_older_than_hours: float = ORPHANS_OLDER_THAN_HOURS
    orphan_files_deleted: int = 0  # in a dry run: would delete
    orphan_bytes_deleted: int = 0
    orphan_files_too_young: int = 0  # unreferenced, but younger than the grace period: kept
    dry_run: bool = False
    orphans: list[str] = field(default_factory=list)  # the orphan files deleted (or, in a dry run, to delete)

    def line(self) -> str:
        if self.dry_run:
            return (
                f"{self.table}: dry run, nothing changed: would expire {self.snapshots_expired} snapshots "
                f"({self.snapshots_before} now); {self.data_files_before} data files ({self.rows} rows)"
            )
        return (
            f"{self.table}: expired {self.snapshots_expired} snapshots ({self.snapshots_before} before, "
            f"{self.snapshots_after} kept); compacted "
            f"{self.data_files_before} data files into {self.data_files_after} ({self.rows} rows, "
            f"{self.bytes_before / 1e6:.1f} -> {self.bytes_after / 1e6:.1f} MB); deleted {self.files_deleted} "
            f"unreferenced files in {self.seconds:.1f}s"
        )

    def orphans_line(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (
            f"{self.table}: {verb} {self.orphan_files_deleted} orphan files ({self.orphan_bytes_deleted / 1e6:.1f} MB) "
            f"older than {self.orphans_older_than_hours:g} h; kept {self.orphan_files_too_young} younger ones"
        )


def _live_files(tbl) -> list:
    snap = tbl.current_snapshot()
    return [] if snap is None else [t.file for t in tbl.scan().plan_files()]


def _all_referenced(tbl, only: set[int] | None = None) -> set[str]:
    """Every file a remaining snapshot (or those of ``only``) still needs (each manifest read once: snapshots share
    most of them)."""
    paths, manifests = set(), {}
    for snap in tbl.snapshots():
        if only is not None and snap.snapshot_id not in only:
            continue
        paths.add(snap.manifest_list)
        for manifest in snap.manifests(tbl.io):
            manifests[manifest.manifest_path] = manifest
    for path, manifest in manifests.items():
        paths.add(path)
        for entry in manifest.fetch_manifest_entry(tbl.io, discard_deleted=True):
            paths.add(entry.data_file.file_path)
    return paths


def _metadata_files(tbl) -> set[str]:
    """The table's metadata files outside the snapshots: the current metadata.json, the earlier ones its log keeps
    (readers may time-travel by metadata file), and the statistics files."""
    meta = tbl.metadata
    paths = {tbl.metadata_location, *(entry.metadata_file for entry in meta.metadata_log)}
    paths |= {s.statistics_path for s in meta.statistics} | {s.statistics_path for s in meta.partition_statistics}
    return paths


def _table_filesystem(tbl):
    """(pyarrow filesystem, function: URI -> path in it) for the table's files, with the table's own credentials and
    endpoint where its FileIO is PyIceberg's pyarrow one (the default), else the project's (local or s3://)."""
    from pyiceberg.io.pyarrow import PyArrowFileIO

    def path_of(uri: str) -> str:
        return PyArrowFileIO.parse_location(uri)[2]

    scheme, netloc, _ = PyArrowFileIO.parse_location(tbl.location())
    if isinstance(tbl.io, PyArrowFileIO):
        return tbl.io.fs_by_scheme(scheme, netloc), path_of
    if scheme not in ("file", "s3"):
        raise OutputError(f"cannot list {tbl.location()} to find orphan files: only local and s3:// tables")
    return storage.filesystem(tbl.location())[0], path_of


def remove_orphan_files(tbl, older_than_hours: float = ORPHANS_OLDER_THAN_HOURS, dry_run: bool = False) -> dict:
    """Delete the files under the table's data and metadata locations that nothing references (no kept snapshot's
    manifest list, manifests, data or delete files; not the current metadata.json, its metadata log or statistics
    files) and that were last modified more than ``older_than_hours`` ago: what a write killed between writing its
    files and the catalog commit, or a commit that lost to a concurrent writer, leaves behind (Iceberg's
    ``remove_orphan_files``). The grace period protects the files of a write still in flight, which exist before
    the commit that references them. ``dry_run``: delete nothing, say what would go.

    The folders are listed before the table's metadata is read, so a commit landing in between is seen as
    referencing its files. Returns ``{"orphans": [URI...], "bytes": n, "too_young": n}``."""
    fs, path_of = _table_filesystem(tbl)
    location = tbl.location().rstrip("/")
    folders = [
        tbl.properties.get("write.data.path", f"{location}/data"),
        tbl.properties.get("write.metadata.path", f"{location}/metadata"),
    ]
    scheme = location.split("://", 1)[0] + "://" if "://" in location else ""
    cutoff_ns = time.time_ns() - int(older_than_hours * 3600 * 1e9)
    listed = []
    for folder in folders:
        selector = pafs.FileSelector(path_of(folder), recursive=True, allow_not_found=True)
        try:
            listed += [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
        except OSError as exc:
            raise OutputError(f"cannot list {folder} to find orphan files: {storage.describe_error(exc)}") from exc
    tbl.refresh()
    referenced = {path_of(p) for p in _all_referenced(tbl) | _metadata_files(tbl)}
    unreferenced = [i for i in listed if i.path not in referenced]
    old = [i for i in unreferenced if i.mtime_ns is not None and i.mtime_ns < cutoff_ns]
    out = {"orphans": [], "bytes": 0, "too_young": len(unreferenced) - len(old)}
    for info in sorted(old, key=lambda i: i.path):
        uri = scheme + info.path if scheme else info.path
        if not dry_run:
            try:
                fs.delete_file(info.path)
            except OSError as exc:
                log.warning("could not delete orphan file %s: %s", uri, storage.describe_error(exc))
                continue
            log.debug("deleted orphan file %s (%d bytes)", uri, info.size or 0)
        out["orphans"].append(uri)
        out["bytes"] += info.size or 0
    return out


def maintain(
    identifier: str,
    catalog: CatalogConfig | None = None,
    *,
    older_than_days: float = MAINTAIN_OLDER_THAN_DAYS,
    retain_last: int = MAINTAIN_RETAIN_LAST,
    compact: bool = True,
    target_file_rows: int = 1_000_000,
    orphans_older_than_hours: float = ORPHANS_OLDER_THAN_HOURS,
    dry_run: bool = False,
) -> MaintenanceReport:
    """Compact the current rows into few large files (one overwrite snapshot, same rows), then expire the snapshots
    older than ``older_than_days`` beyond the newest ``retain_last`` (and the current one), delete the data and
    metadata files no remaining snapshot references, and the orphan files older than ``orphans_older_than_hours``
    (:func:`remove_orphan_files`). Time travel reaches back as far as the kept snapshots. ``dry_run``: change
    nothing, report what would be expired and which orphan files would be deleted."""
    start = time.perf_counter()
    catalog = catalog or CatalogConfig()
    tbl = open_table(identifier, catalog, create=False)
    before = _live_files(tbl)
    n_snaps = len(tbl.snapshots())
    candidates = set(_all_referenced(tbl))
    seen = {s.snapshot_id for s in tbl.snapshots()}
    rows = sum(f.record_count for f in before)
    if not dry_run and compact and len(before) > max(1, math.ceil(rows / target_file_rows)):
        data = tbl.scan().to_arrow()
        data = data.sort_by([("path", "ascending"), ("model", "ascending")])
        tbl.overwrite(
            data,
            snapshot_properties={PREFIX + "operation-kind": "compact", PREFIX + "compacted-rows": str(data.num_rows)},
        )
        # the compaction's own snapshots (its delete step may expire at once): their files are candidates too
        candidates |= _all_referenced(tbl, {s.snapshot_id for s in tbl.snapshots()} - seen)
    keep = {s.snapshot_id for s in sorted(tbl.snapshots(), key=lambda s: s.timestamp_ms)[-retain_last:]}
    keep.add(tbl.current_snapshot().snapshot_id) if tbl.current_snapshot() else None
    cutoff = datetime.now(UTC) - timedelta(days=older_than_days)
    old = [
        s.snapshot_id
        for s in tbl.snapshots()
        if s.snapshot_id not in keep and s.timestamp_ms < cutoff.timestamp() * 1000
    ]
    deleted = 0
    if not dry_run:
        if old:
            tbl.maintenance.expire_snapshots().by_ids(old).commit()
        tbl.refresh()
        still = _all_referenced(tbl)
        for path in sorted(candidates - still):
            try:
                tbl.io.delete(path)
                deleted += 1
            except OSError as exc:
                log.warning("could not delete %s: %s", path, exc)
    orphans = remove_orphan_files(tbl, orphans_older_than_hours, dry_run)
    after = _live_files(tbl)
    return MaintenanceReport(
        identifier,
        n_snaps,
        len(old),
        len(tbl.snapshots()),
        len(before),
        len(after),
        deleted,
        sum(f.file_size_in_bytes for f in before),
        sum(f.file_size_in_bytes for f in after),
        sum(f.record_count for f in after),
        time.perf_counter() - start,
        orphans_older_than_hours,
        len(orphans["orphans"]),
        orphans["bytes"],
        orphans["too_young"],
        dry_run,
        orphans["orphans"],
    )


# --------------------------------------------------------------------------- migration from the Parquet format


def migrate(source: str, identifier: str, catalog: CatalogConfig | None = None) -> list[dict]:
    """Copy every committed run of a table in the ``_committed.json`` format (:mod:`cxr.incremental`) into the Iceberg
    table, oldest commit first, one snapshot per run (upsert, so its current rows are the old table's current rows and
    each earlier version stays in the snapshots). Runs already migrated (same run id) are skipped, so an interrupted
    migration is simply run again. Returns what was done per run."""
    from .incremental import committed_runs, read_table

    catalog = catalog or CatalogConfig()
    tbl = open_table(identifier, catalog)
    settings = storage.s3_settings()
    runs = committed_runs(source, settings)
    if not runs:
        raise OutputError(f"{source} holds no committed run (no _committed.json)")
    history = read_table(source, all_versions=True, settings=settings)
    done_ids = {s.get("run-id") for s in snapshots(tbl)}
    out = []
    for run in runs:
        if run["run_id"] in done_ids:
            out.append({"run_id": run["run_id"], "rows": 0, "skipped": True})
            continue
        rows = history.filter(pc.equal(history["run_id"], run["run_id"]))
        rows = _to_table_rows(rows.drop_columns(["run_date"]), run["run_date"])
        report = {
            "run_id": run["run_id"],
            "run_date": run["run_date"],
            "model": run["model"],
            "ok": run["counts"]["ok"],
            "errors": run["counts"]["errors"],
            "predicted_positive": run["counts"]["predicted_positive"],
            "scored": run["counts"]["rows"],
            "migrated_from": source,
        }
        props = {
            "operation-kind": "nightly",
            "run-id": run["run_id"],
            "run-date": run["run_date"],
            "model": run["model"],
            "model-uri": run.get("model_uri", ""),
            "chunk": 0,
            "run-complete": "true",
            "migrated-from": source,
            "committed-at": run["committed_at"],
            "report": json.dumps(report),
            **{k.replace("_", "-"): v for k, v in run["counts"].items()},
        }
        props = {PREFIX + k: str(v) for k, v in props.items()}
        if rows.num_rows:
            tbl.upsert(rows, join_cols=KEYS, snapshot_properties=props)
        else:
            tbl.append(iceberg_schema().empty_table(), snapshot_properties=props)
        out.append({"run_id": run["run_id"], "rows": rows.num_rows, "skipped": False})
    return out
