"""Evaluation = scoring + labels: the exact pipeline that is deployed, joined with the class folders.

Writes into a local directory: ``report.json`` and ``report.html`` (metrics with confidence intervals,
classification report, confusion matrix, specificity at sensitivity targets), the PNG plots, and
``predictions.parquet`` (the score table plus ``label``) for anyone who wants to dig further.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .checkpoint import load_checkpoint
from .data import (
    CLASS_NAMES,
    SPLIT_NAMES,
    class_counts,
    column_values,
    fingerprint,
    labelled_files,
    read_group_table,
)
from .errors import InputError
from .metrics import binary_report, subgroup_report
from .output import new_run_id, prepare_output
from .report import write_report
from .runtime import ensure_ray
from .score import OUTPUT_SCHEMA, count_not_frontal, measured_plan, score_dataset
from .sources import table_dataset

log = logging.getLogger(__name__)


SOURCE = "source"


def group_function(group_by: str):
    """``path, source URI -> group name`` for ``--group-by``: ``source`` (the ``--data`` URI an image came
    from); a ``.csv``/``.tsv`` table of ``file,group`` (file names, e.g. the view or the scanner from a
    metadata export; unlisted files fall in ``(not listed)``); or a regular expression searched in the file
    name, whose first capturing group (or the whole match when it has none) names the group; a name that
    does not match falls in ``(no match)``. Raises :class:`InputError` for an invalid expression or table."""
    if group_by == SOURCE:
        return lambda path, source: source
    if group_by.lower().endswith((".csv", ".tsv")):
        table = read_group_table(group_by, "--group-by")
        return lambda path, source: table.get(posixpath.basename(path), "(not listed)")
    try:
        pattern = re.compile(group_by)
    except re.error as exc:
        raise InputError(
            f"--group-by {group_by!r}: not {SOURCE!r} and not a valid regular expression ({exc})"
        ) from None

    def by_name(path: str, source: str) -> str:
        m = pattern.search(posixpath.basename(path))
        if m is None:
            return "(no match)"
        return (m.group(1) if pattern.groups else m.group(0)) or "(empty)"

    return by_name


@dataclass
class EvaluationResult:
    report: dict
    files: dict[str, str]
    errors: int
    seconds: float
    subgroups: dict | None = None
    not_frontal: int = 0  # of the errors: lateral/oblique DICOM views, not scored (the rest are unreadable files)
    by: dict | None = None  # metadata column -> {"by": column, "groups": [...]} (``by``)

    def line(self) -> str:
        r = self.report
        sens, spec = r["sensitivity"], r["specificity"]

        def fmt(d):
            if not d or d.get("value") is None:
                return "n/a"
            lo, hi = d["ci95"]
            return f"{d['value']:.3f} [{lo:.3f}, {hi:.3f}]"

        auc = (r.get("roc_auc") or {}).get("value")
        views = f", {self.not_frontal} not frontal views" if self.not_frontal else ""
        return (
            f"evaluated {r['n']} images ({r['n_positive']} covid, {r['n_negative']} non; not scored: "
            f"{self.errors - self.not_frontal} unreadable{views}) at threshold "
            f"{r['threshold']:.4f}: sensitivity {fmt(sens)}, specificity {fmt(spec)}, ROC AUC "
            f"{'n/a' if auc is None else f'{auc:.4f}'} -> {self.files['report_html']}"
        )

    def subgroup_lines(self) -> list[str]:
        """One line per subgroup (empty without ``group_by``), then per group of each ``by`` column under a line
        naming the column."""

        def rate(d):
            return "n/a" if not d else f"{d['value']:.3f} ({d['k']}/{d['n']})"

        def auc(g):
            lo, hi = g.get("roc_auc_ci95") or (None, None)
            if g.get("roc_auc") is None:
                return "n/a"
            return f"{g['roc_auc']:.3f}" + ("" if lo is None else f" [{lo:.3f}, {hi:.3f}]")

        groups = (self.subgroups or {}).get("groups") or []
        width = max((len(g["group"]) for g in groups), default=0)
        lines = [
            f"  {g['group']:<{width}}  sensitivity {rate(g['sensitivity'])}, false-positive rate "
            f"{rate(g['false_positive_rate'])}"
            for g in groups
        ]
        for column, grouping in (self.by or {}).items():
            width = max((len(g["group"]) for g in grouping["groups"]), default=0)
            lines.append(f"by {column}:")
            lines += [
                f"  {g['group']:<{width}}  n {g['n']} ({g['n_positive']} covid), sensitivity "
                f"{rate(g['sensitivity'])}, specificity {rate(g['specificity'])}, ROC AUC {auc(g)}"
                for g in grouping["groups"]
            ]
        return lines


def data_name(uri: str) -> str:
    """A data set's name for a report title: the folder's name above its layout folders (``.../hannover-covid/covid``
    -> ``hannover-covid``, ``s3://b/xray5k/test`` -> ``xray5k``), the URI itself when nothing else names it."""
    parts = [p for p in uri.rstrip("/").split("/") if p not in ("", ".")]
    while len(parts) > 1 and parts[-1].lower() in (*CLASS_NAMES, *SPLIT_NAMES):
        parts.pop()
    name = parts[-1] if parts else uri
    return uri.rstrip("/") if name in ("..", "data") or name.endswith(":") else name


def evaluate(
    data: list[str],
    model: str,
    output_dir: str,
    *,
    split: str | None = "test",
    threshold: float | None = None,
    n_bootstrap: int = 1000,
    title: str | None = None,
    group_by: str | None = None,
    overwrite: bool = False,
    label_map: dict | None = None,
    by: list[str] | None = None,
    **plan_overrides,
) -> EvaluationResult:
    """Score every labelled image under ``data`` with ``model`` and write the report to ``output_dir``.

    ``group_by`` (see :func:`group_function`) adds the rates per subgroup to the report and a ``group``
    column to ``predictions.parquet``. Each column of ``by``, a metadata column of labelled manifests
    (:func:`column_values`), adds n, sensitivity, specificity and ROC AUC with intervals per value, and a
    column ``by_<column>`` to ``predictions.parquet``: ``--group-by`` gives the same figures for a grouping
    that the file names, the ``--data`` or a file table make, ``by`` for one the labels table holds.
    A non-empty ``output_dir`` raises OutputError unless ``overwrite``,
    which empties it first (no stale plots of an earlier run stay behind).

    Long on purpose: one pipeline in order (list and label the files, check the output, score on Ray Data, join
    labels and groups, the metrics, the report), each step a call."""
    import ray

    settings = storage.s3_settings()
    loaded = load_checkpoint(model, settings=settings)  # fails early and clearly on a bad checkpoint; sizes the plan
    info = loaded.info
    # A folder without a split level ignores ``split``; a missing split folder is an error, never a
    # silent fall-back to another split (evaluating on training images).
    group_of = group_function(group_by) if group_by else None
    sourced = [(f, uri) for uri in data for f in labelled_files(uri, split, settings, label_map)]
    files = [f for f, _ in sourced]
    if not files:
        raise InputError("no labelled images found in " + ", ".join(data))
    labels = {f.path: f.label for f in files}
    groups = {f.path: group_of(f.path, uri) for f, uri in sourced} if group_of else None
    by_values = {column: column_values(files, column) for column in dict.fromkeys(by or [])}
    prepare_output(output_dir, overwrite, settings)
    ensure_ray()
    start = time.perf_counter()
    plan = measured_plan(list(labels), loaded, settings, **plan_overrides)
    del loaded
    run_id = new_run_id()
    paths_ds = table_dataset(pa.table({"path": list(labels)}))
    scored = score_dataset(paths_ds, model, info.preprocess, plan, run_id, settings)
    results = pa.concat_tables(ray.get(scored.to_arrow_refs())).cast(OUTPUT_SCHEMA)
    results = results.append_column("label", pa.array([labels[p] for p in results["path"].to_pylist()], pa.int8()))
    if results.num_rows != len(labels):
        raise RuntimeError(f"scored {results.num_rows} rows for {len(labels)} files")
    if groups is not None:
        results = results.append_column(
            "group", pa.array([groups[p] for p in results["path"].to_pylist()], pa.string())
        )
    for column, values in by_values.items():  # by_view: the scored 'view' column is the DICOM header's
        results = results.append_column(f"by_{column}", pa.array([values[p] for p in results["path"].to_pylist()]))
    pq.write_table(results, os.path.join(output_dir, "predictions.parquet"))
    ok = results.filter(pa.compute.is_null(results["error"]))
    errors = results.num_rows - ok.num_rows
    not_frontal = count_not_frontal(results["error"])
    y = np.asarray(ok["label"].to_numpy(zero_copy_only=False), dtype=int)
    p = np.asarray(ok["prob_covid"].to_numpy(zero_copy_only=False), dtype=float)
    t = info.threshold if threshold is None else threshold
    report = binary_report(y, p, t, n_bootstrap=n_bootstrap, class_names=CLASS_NAMES)
    subgroups = None
    if groups is not None:
        groups_of = ok["group"].to_pylist()
        subgroups = {"by": group_by, "groups": subgroup_report(y, p, groups_of, t, n_bootstrap=n_bootstrap)}
    ok_paths = ok["path"].to_pylist()
    by_report = {
        column: {
            "by": column,
            "groups": subgroup_report(y, p, [values[q] for q in ok_paths], t, n_bootstrap=n_bootstrap),
        }
        for column, values in by_values.items()
    }
    seconds = time.perf_counter() - start
    extra = {
        "model": info.model_id,
        "model_uri": model,
        "data": ", ".join(data),
        "split": split or "all",
        "data_fingerprint": fingerprint(files),
        "files": len(labels),
        "files_by_class": class_counts(files),
        "unreadable_files": errors - not_frontal,
        "not_frontal_views": not_frontal,
        "threshold_source": "given" if threshold is not None else "model.json (chosen on validation)",
        "run_id": run_id,
        "seconds": round(seconds, 1),
    }
    if errors:
        extra["unreadable_examples"] = "; ".join(
            f"{r['path']}: {r['error']}"
            for r in results.filter(pa.compute.invert(pa.compute.is_null(results["error"]))).slice(0, 5).to_pylist()
        )
    paths = write_report(
        report,
        y,
        p,
        output_dir,
        title=title or f"{info.backbone} on {', '.join(data_name(d) for d in data)}",
        extra=extra,
        subgroups=subgroups,
        by=by_report or None,
    )
    files_written = {k: str(v) for k, v in paths.items()}
    return EvaluationResult(report, files_written, errors, seconds, subgroups, not_frontal, by_report or None)
