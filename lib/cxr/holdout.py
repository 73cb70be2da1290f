"""Leave-one-group-out validation: does the recipe separate the classes inside a group (a source, a hospital, a
scanner) that its model never saw?

A pooled validation split draws from every source the model trains on, so a model that recognises the source
scores well on it wherever each source holds mostly one class. Holding a whole source out removes that: inside
a held-out source that holds both classes, the source cannot give the answer.

Driver side only (called by :func:`cxr.train.train` with ``holdout_by``)::

    per value v of the column: rows with v held out; the rest (minus every patient with a row under v)
    -> the train job's own split, decoding and Ray Train fit (run ``_ray_holdout_<v>``)
    -> threshold chosen on that model's own validation split (sensitivity first), without v
    -> the held-out rows scored by it
    -> per value and pooled: n, ROC AUC (bootstrap interval), sensitivity and specificity (Wilson) at that threshold

Output, beside the checkpoint: ``holdout.csv`` (one row per held-out image with its metadata), ``holdout.json``
(the figures; also in the checkpoint's provenance) and ``holdout.html`` with ``holdout.png``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import storage
from .configs import TrainConfig
from .data import CLASS_NAMES, class_counts, holdout_splits, split_train_val
from .errors import InputError
from .metrics import bootstrap_auc_ci, choose_threshold, subgroup_report, to_jsonable, wilson_ci
from .pages import CSS, card, esc, img_tag, save_figure

log = logging.getLogger(__name__)

__all__ = [
    "HOLDOUT_CSV",
    "HOLDOUT_HTML",
    "HOLDOUT_JSON",
    "PreparedHoldout",
    "fit_holdout",
    "holdout_line",
    "prepare_holdouts",
    "run_holdout",
    "run_name",
    "summarise",
]

HOLDOUT_CSV = "holdout.csv"
HOLDOUT_JSON = "holdout.json"
HOLDOUT_HTML = "holdout.html"
N_BOOTSTRAP = 1000


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", value)[:60] or "_"


def run_name(prefix: str, value: str) -> str:
    """The Ray Train run of the model that holds ``value`` out: ``<prefix>_holdout_<value>``."""
    return f"{prefix}_holdout_{_slug(value)}"


@dataclass
class PreparedHoldout:
    """One held-out group, decoded and split once (shared by every run that trains on it, e.g. a search's trials):
    the training side as the train job prepares it, the held-out rows ready to score."""

    value: str
    fold: dict  # value, held_out and train_pool counts; "skipped" (why) when the rest cannot train a model
    data: object = None  # cxr.train.PreparedData of the rest
    held_ds: object = None  # MaterializedDataset of the held-out rows: image, label, weight, path
    held_meta: dict = field(default_factory=dict)  # path -> the held-out row's metadata


def prepare_holdouts(cfg: TrainConfig, files: list, spec, settings) -> list[PreparedHoldout]:
    """Split ``files`` by ``cfg.holdout_by`` (:func:`cxr.data.holdout_splits`); per value decode the rest (split
    as the train job splits) and the held-out rows. A value whose rest lacks 2 images of a class is skipped."""
    from .train import prepare_split, prepared_rows

    out = []
    for h in holdout_splits(files, cfg.holdout_by):
        counts = class_counts(h.rest)
        fold = {"value": h.value, "held_out": class_counts(h.held), "train_pool": counts}
        if min(counts.values()) < 2:
            fold["skipped"] = f"the other groups hold {counts}: need 2 images of each class to train"
            log.warning("holdout %s=%s skipped: %s", cfg.holdout_by, h.value, fold["skipped"])
            out.append(PreparedHoldout(h.value, fold))
            continue
        train_files, val_files = split_train_val(h.rest, cfg.val_fraction, cfg.seed)
        data = prepare_split(cfg, h.rest, train_files, val_files, spec, settings)
        held_ds, bad = prepared_rows(h.held, spec, settings, 0.5, "held-out", keep_path=True)
        fold.update(validation=class_counts(val_files), undecodable=bad)
        out.append(PreparedHoldout(h.value, fold, data, held_ds, {f.path: f.meta for f in h.held}))
    return out


def score_held_out(members: list, held_ds) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The held-out rows scored by the members' best checkpoints (their mean probability): (paths, labels,
    probabilities)."""
    from .checkpoint import load_checkpoint

    paths, images, labels = [], [], []
    for batch in held_ds.iter_batches(batch_size=256, batch_format="numpy"):
        paths += [str(p) for p in batch["path"]]
        images.append(batch["image"])
        labels.append(batch["label"])
    if not paths:
        return [], np.zeros(0, int), np.zeros(0, np.float32)
    x = np.concatenate(images)
    probs = []
    for checkpoint, _, _ in members:
        with checkpoint.as_directory() as d:
            loaded = load_checkpoint(d)
            probs.append(np.concatenate([loaded.predict_proba(x[i : i + 64]) for i in range(0, len(x), 64)]))
    return paths, np.concatenate(labels).astype(int), np.mean(probs, axis=0)


def fit_holdout(cfg: TrainConfig, h: PreparedHoldout, storage_path: str, storage_fs, name: str) -> list[dict]:
    """Train ``cfg`` on ``h``'s rest (Ray Train run ``name``, resumed where it has checkpoints), choose the
    threshold on its own validation split, and score the held-out rows: one row per image, as ``holdout.csv``."""
    from .train import fit_members, split_scores

    column = cfg.holdout_by
    started = time.perf_counter()
    log.info("holdout %s=%s: training on %s", column, h.value, h.fold["train_pool"])
    members = fit_members(cfg, h.data, storage_path, storage_fs, name)
    val = split_scores(members, h.data)
    threshold = float(choose_threshold(val[1].astype(int), val[0], cfg.target_sensitivity))
    paths, y, p = score_held_out(members, h.held_ds)
    h.fold["seconds"] = round(time.perf_counter() - started, 1)
    return [
        {
            "path": path,
            column: h.value,
            "label": CLASS_NAMES[int(label)],
            "prob": round(float(prob), 6),
            "threshold": round(threshold, 6),
            "predicted": CLASS_NAMES[int(prob >= threshold)],
            **{c: v for c, v in h.held_meta.get(path, {}).items() if c != column},
        }
        for path, label, prob in zip(paths, y, p)
    ]


def run_holdout(cfg: TrainConfig, files: list, spec, settings, storage_path: str, storage_fs) -> dict:
    """Train and score one model per value of ``cfg.holdout_by`` (see the module's docstring); write
    ``holdout.csv``, ``holdout.json`` and ``holdout.html`` under ``cfg.output``; return the summary."""
    column = cfg.holdout_by
    prepared = prepare_holdouts(cfg, files, spec, settings)
    rows: list[dict] = []
    for k, h in enumerate(prepared):
        if h.data is None:
            continue
        log.info("holdout %d of %d: %s=%s held out (%s)", k + 1, len(prepared), column, h.value, h.fold["held_out"])
        scored = fit_holdout(cfg, h, storage_path, storage_fs, run_name("_ray", h.value))
        rows += scored
        if scored:
            group = summarise(scored, column, [h.fold])["groups"][0]
            log.info("holdout %s=%s: %s", column, h.value, _fold_line(group))
    folds = [h.fold for h in prepared]
    if not rows:
        raise InputError(f"--holdout-by {column}: no group could be held out ({'; '.join(_reasons(folds))})")
    summary = summarise(rows, column, folds)
    write_outputs(summary, rows, column, cfg.output, settings)
    return summary


def _reasons(folds: list[dict]) -> list[str]:
    return [f"{f['value']}: {f['skipped']}" for f in folds if "skipped" in f]


def summarise(rows: list[dict], column: str, folds: list[dict]) -> dict:
    """The figures of scored held-out rows (as :func:`run_holdout` writes them): per group n, ROC AUC with its
    bootstrap interval, sensitivity and specificity (Wilson) at the group's own threshold; pooled the same, each
    image judged at its own model's threshold (the pooled AUC mixes models whose scales differ: the mean of the
    groups' AUCs is the figure to compare recipes by)."""
    from sklearn.metrics import roc_auc_score

    groups = []
    by_value = {f["value"]: f for f in folds}
    for value in dict.fromkeys(r[column] for r in rows):
        sel = [r for r in rows if r[column] == value]
        y = np.array([CLASS_NAMES.index(r["label"]) for r in sel])
        p = np.array([r["prob"] for r in sel])
        g = subgroup_report(y, p, [value] * len(sel), sel[0]["threshold"], n_bootstrap=N_BOOTSTRAP)[0]
        fold = by_value.get(value, {})
        groups.append(
            {**g, "threshold": sel[0]["threshold"], **{k: fold[k] for k in ("train_pool", "seconds") if k in fold}}
        )
    y = np.array([CLASS_NAMES.index(r["label"]) for r in rows])
    p = np.array([r["prob"] for r in rows])
    pred = np.array([r["predicted"] == "covid" for r in rows])
    aucs = [g["roc_auc"] for g in groups if g["roc_auc"] is not None]
    both = bool(np.any(y == 1) and np.any(y == 0))
    tp, pos = int(np.sum(pred & (y == 1))), int(np.sum(y == 1))
    tn, neg = int(np.sum(~pred & (y == 0))), int(np.sum(y == 0))
    pooled = {
        "n": int(len(y)),
        "n_positive": pos,
        "n_negative": neg,
        "roc_auc": float(roc_auc_score(y, p)) if both else None,
        "roc_auc_ci95": list(bootstrap_auc_ci(y, p, n_bootstrap=N_BOOTSTRAP)["roc_auc"]) if both else [None, None],
        "sensitivity": {"k": tp, "n": pos, "value": tp / pos if pos else None, "ci95": list(wilson_ci(tp, pos))},
        "specificity": {"k": tn, "n": neg, "value": tn / neg if neg else None, "ci95": list(wilson_ci(tn, neg))},
    }
    return to_jsonable(
        {
            "column": column,
            "mean_roc_auc": float(np.mean(aucs)) if aucs else None,
            "groups_with_auc": len(aucs),
            "pooled": pooled,
            "groups": groups,
            "skipped": {f["value"]: f["skipped"] for f in folds if "skipped" in f},
        }
    )


def _fmt(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "n/a"
    lo, hi = d["ci95"]
    return f"{d['value']:.3f} [{lo:.3f}, {hi:.3f}] ({d['k']}/{d['n']})"


def _auc(g: dict) -> str:
    if g.get("roc_auc") is None:
        return "n/a (one class)"
    lo, hi = g.get("roc_auc_ci95") or (None, None)
    return f"{g['roc_auc']:.3f}" + ("" if lo is None or math.isnan(lo) else f" [{lo:.3f}, {hi:.3f}]")


def _fold_line(g: dict) -> str:
    return (
        f"n {g['n']} ({g['n_positive']} covid), ROC AUC {_auc(g)}, sensitivity {_fmt(g['sensitivity'])}, "
        f"specificity {_fmt(g['specificity'])} at threshold {g['threshold']:.4f}"
    )


def holdout_line(summary: dict) -> str:
    """The job's one-paragraph answer: the mean held-out AUC, then each group."""
    mean = summary["mean_roc_auc"]
    lines = [
        f"held out by {summary['column']}: mean ROC AUC inside held-out groups "
        f"{'n/a' if mean is None else f'{mean:.3f}'} ({summary['groups_with_auc']} groups with both classes); "
        f"pooled ROC AUC {_auc(summary['pooled'])}, sensitivity {_fmt(summary['pooled']['sensitivity'])}, "
        f"specificity {_fmt(summary['pooled']['specificity'])}"
    ]
    lines += [f"  {g['group']}: {_fold_line(g)}" for g in summary["groups"]]
    lines += [f"  {v}: skipped ({why})" for v, why in summary["skipped"].items()]
    return "\n".join(lines)


def _plot(summary: dict, rows: list[dict], column: str, path: Path) -> None:
    """Left: each held-out group's ROC AUC with its interval (0.5 = chance); right: their ROC curves."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    groups = [g for g in summary["groups"] if g["roc_auc"] is not None]
    fig = Figure(figsize=(10, 0.9 + 0.45 * max(3, len(groups) + 1)))
    ax, roc = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    names = [g["group"] for g in groups] + ["pooled"]
    points = groups + [summary["pooled"]]
    for i, g in enumerate(points):
        lo, hi = g["roc_auc_ci95"]
        if g["roc_auc"] is None:
            continue
        ax.errorbar(
            g["roc_auc"],
            i,
            xerr=[[g["roc_auc"] - (lo if lo is not None else g["roc_auc"])], [(hi or g["roc_auc"]) - g["roc_auc"]]],
            fmt="o" if i < len(groups) else "D",
            color="#111111" if i == len(groups) else "#d62728",
            capsize=3,
        )
    ax.axvline(0.5, color="#999999", linestyle="--", label="chance")
    ax.set_yticks(range(len(names)), [f"{n} (n={g['n']})" for n, g in zip(names, points)])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("ROC AUC inside the held-out group (95% bootstrap interval)")
    ax.set_title(f"held out by {column}")
    for g in groups:
        sel = [r for r in rows if r[column] == g["group"]]
        fpr, tpr, _ = roc_curve([r["label"] == "covid" for r in sel], [r["prob"] for r in sel])
        roc.plot(fpr, tpr, label=f"{g['group']} ({g['roc_auc']:.2f})")
    roc.plot([0, 1], [0, 1], color="#999999", linestyle="--")
    roc.set_xlabel("1 - specificity")
    roc.set_ylabel("sensitivity")
    roc.set_title("ROC inside each held-out group")
    roc.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(summary: dict, rows: list[dict], column: str, output: str, settings) -> None:
    """``holdout.csv`` (every column any row has, in a fixed order), ``holdout.json`` and ``holdout.html`` (cards,
    the table, the figure) under ``output``, local or S3."""
    columns = list(
        dict.fromkeys(["path", column, "label", "prob", "threshold", "predicted", *(c for r in rows for c in r)])
    )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(storage.join(output, HOLDOUT_CSV), buf.getvalue().encode(), settings)
    storage.write_bytes(storage.join(output, HOLDOUT_JSON), json.dumps(summary, indent=2).encode(), settings)
    with tempfile.TemporaryDirectory() as d:
        png = Path(d) / "holdout.png"
        _plot(summary, rows, column, png)
        storage.write_bytes(storage.join(output, "holdout.png"), png.read_bytes(), settings)
        page = _html(summary, column, png)
    storage.write_bytes(storage.join(output, HOLDOUT_HTML), page.encode(), settings)


def _html(summary: dict, column: str, png: Path) -> str:
    mean = summary["mean_roc_auc"]
    pooled = summary["pooled"]
    cards = "".join(
        [
            card(
                "mean ROC AUC inside held-out groups",
                "n/a" if mean is None else f"{mean:.3f}",
                f"{summary['groups_with_auc']} groups with both classes; 0.5 = chance",
            ),
            card("pooled ROC AUC", "n/a" if pooled["roc_auc"] is None else f"{pooled['roc_auc']:.3f}", _auc(pooled)),
            card("pooled sensitivity", _fmt(pooled["sensitivity"]).split(" ")[0], _fmt(pooled["sensitivity"])),
            card("pooled specificity", _fmt(pooled["specificity"]).split(" ")[0], _fmt(pooled["specificity"])),
        ]
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in (column, "n", "covid", "non", "ROC AUC [95% CI]", "sensitivity", "specificity", "threshold")
    )
    body = "".join(
        f"<tr><td>{esc(g['group'])}</td><td>{g['n']}</td><td>{g['n_positive']}</td><td>{g['n_negative']}</td>"
        f"<td>{esc(_auc(g))}</td><td>{esc(_fmt(g['sensitivity']))}</td><td>{esc(_fmt(g['specificity']))}</td>"
        f"<td>{g['threshold']:.4f}</td></tr>"
        for g in summary["groups"]
    )
    skipped = "".join(f"<p class='note'>{esc(v)} not held out: {esc(why)}</p>" for v, why in summary["skipped"].items())
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>held out by {esc(column)}</title>"
        f"<style>{CSS}</style></head><body><h1>Leave-one-{esc(column)}-out validation</h1>"
        "<p class='sub'>One model per value, trained without that value's images (patients never split), its "
        "threshold chosen on its own validation split; the held-out images scored by it. Inside a held-out group "
        "that holds both classes the group cannot give the answer: an AUC near 0.5 there with a high pooled AUC "
        "means the model recognises the group, not the disease.</p>"
        f"<div class='cards'>{cards}</div><h2>Per held-out group</h2><table><tr>{head}</tr>{body}</table>{skipped}"
        f"<div class='figs'>{img_tag(png, f'ROC AUC inside each held-out {column}')}</div>"
        "<footer>holdout.csv: every held-out image with its probability, threshold and metadata.</footer>"
        "</body></html>"
    )
