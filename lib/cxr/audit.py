"""Shortcut audit: does a model that looks good on its own data still work elsewhere, and where does it look?

One report that puts side by side, at the model's own threshold (chosen on validation):

- **generalisation**: sensitivity and false-positive rate (Wilson 95% intervals) on the internal set
  versus external sets from other hospitals; the scores come from the scoring Predictor itself
  (explain.Explainer wraps it), so evaluate = score + metrics holds here too;
- **data shortcut**: the metadata-only baseline of validate.py on the internal set (can file
  properties alone predict the label?);
- **attention**: the Grad-CAM focus score (explain.py) per set and class.

and ends in a plain-language verdict, built from these rules (``RULES``):

- metadata-only ROC AUC >= 0.8 on the internal set: its labels carry a shortcut;
- an external set's sensitivity is more than 0.15 below the internal one and its 95% interval lies
  wholly below the internal value (same for a false-positive rate more than 0.15 above);
- in a set, the median focus of the images *predicted* COVID-19 (at least 3) is < 0.5 (a uniform
  heatmap gives 0.525): where the model says COVID-19, its evidence lies mostly outside the lungs.
  (The heatmap of the COVID-19 class on an image predicted normal explains little, so those images
  are reported but do not count.)

Any of them makes the verdict "do not trust"; passing them all does not prove the model right.
"""

from __future__ import annotations

import base64
import logging
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .data import CLASS_NAMES, MISSING, SPLIT_NAMES, column_values, labelled_files
from .errors import InputError
from .explain import FOCUS_THRESHOLD, LUNG_BOX, check_model, run_explain
from .metrics import binary_report, subgroup_report, to_jsonable
from .report import by_figure_name, plot_by, plot_rates, subgroup_table

log = logging.getLogger(__name__)

METADATA_AUC_FLAG = 0.8
RATE_GAP = 0.15
MIN_FOCUS_IMAGES = 3  # the focus rule needs at least this many images predicted covid in a set
RULES = {
    "min_focus_images": MIN_FOCUS_IMAGES,
    "metadata_auc_flag": METADATA_AUC_FLAG,
    "rate_gap": RATE_GAP,
    "focus_threshold": FOCUS_THRESHOLD,
    "lung_box": {"x": [LUNG_BOX[0], LUNG_BOX[1]], "y": [LUNG_BOX[2], LUNG_BOX[3]]},
}


def set_name(uri: str) -> str:
    """A short readable name: the last folder, with its parent when that folder is a class or split name."""
    parts = [p for p in uri.rstrip("/").replace("s3://", "").split("/") if p not in ("", ".", "..")]
    if len(parts) >= 2 and parts[-1].lower() in (*CLASS_NAMES, *SPLIT_NAMES):
        return "/".join(parts[-2:])
    return parts[-1] if parts else uri


def _sample(files, limit: int | None, rng: np.random.Generator):
    if limit is None:
        return files
    out = []
    for label in (0, 1):
        sel = [f for f in files if f.label == label]
        if len(sel) > limit:
            sel = [sel[i] for i in sorted(rng.choice(len(sel), size=limit, replace=False))]
        out += sel
    return out


@dataclass
class AuditResult:
    report: dict
    files: dict[str, str]
    seconds: float

    def line(self) -> str:
        return f"audit: {self.report['verdict']['headline']} -> {self.files['report_html']}"

    def by_lines(self) -> list[str]:
        """Per ``--by`` column and set, one line per value: n, sensitivity, specificity, ROC AUC."""

        def rate(d):
            return "n/a" if not d else f"{d['value']:.3f} ({d['k']}/{d['n']})"

        lines = []
        for column, per_set in (self.report.get("by") or {}).items():
            for name, groups in per_set.items():
                width = max((len(g["group"]) for g in groups), default=0)
                lines.append(f"by {column} on {name}:")
                lines += [
                    f"  {g['group']:<{width}}  n {g['n']} ({g['n_positive']} covid), sensitivity "
                    f"{rate(g['sensitivity'])}, specificity {rate(g['specificity'])}, ROC AUC "
                    + ("n/a" if g["roc_auc"] is None else f"{g['roc_auc']:.3f}")
                    for g in groups
                ]
        return lines


def _rate(r: dict | None) -> dict:
    r = r or {}
    return {"value": r.get("value"), "ci95": r.get("ci95"), "k": r.get("k"), "n": r.get("n")}


def _focus_stats(values) -> dict:
    a = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if a.size == 0:
        return {"n": 0, "median": None, "q25": None, "q75": None, "share_outside": None}
    q25, med, q75 = np.percentile(a, [25, 50, 75])
    return {
        "n": int(a.size),
        "median": float(med),
        "q25": float(q25),
        "q75": float(q75),
        "share_outside": float(np.mean(a < FOCUS_THRESHOLD)),
    }


def set_figures(rows: list[dict], threshold: float, n_bootstrap: int) -> dict:
    ok = [r for r in rows if r["error"] is None]
    y = np.array([r["label"] for r in ok], int)
    p = np.array([r["prob_covid"] for r in ok], float)
    out = {
        "files": len(rows),
        "unreadable": len(rows) - len(ok),
        "n_covid": int(np.sum(y == 1)),
        "n_non": int(np.sum(y == 0)),
    }
    if ok:
        rep = binary_report(y, p, threshold, n_bootstrap=n_bootstrap)
        out.update(
            {
                "sensitivity": _rate(rep["sensitivity"]),
                "false_positive_rate": _rate(rep["false_positive_rate"]),
                "roc_auc": (rep.get("roc_auc") or {}).get("value"),
            }
        )
    out["focus"] = {
        "all": _focus_stats(r["focus"] for r in ok),
        "predicted_covid": _focus_stats(r["focus"] for r in ok if r["prediction"] == "covid"),
        **{CLASS_NAMES[c]: _focus_stats(r["focus"] for r in ok if r["label"] == c) for c in (0, 1)},
    }
    return out


def verdict(sets: dict[str, dict], internal: str, metadata: dict, source: dict | None = None) -> dict:
    """Plain-language findings from the rules in the module docstring (and the source control's flag, with
    ``source``: :func:`cxr.shortcut.source_signal` on the model's embeddings)."""
    from .shortcut import signal_message

    problems, notes = [], []
    if source and source["flag"]:
        problems.append(f"On {internal}, {signal_message(source)}.")
    auc = metadata.get("auc")
    if auc is not None and auc >= METADATA_AUC_FLAG:
        problems.append(
            f"The internal data has a shortcut: file properties alone (image size, colour mode, format, file size) "
            f"predict its labels with ROC AUC {auc:.2f}, so a model can score well on it without looking at the lungs."
        )
    ref = sets[internal]
    for name, s in sets.items():
        if name == internal:
            continue
        for key, worse, what in (
            ("sensitivity", -1, "finds COVID-19"),
            ("false_positive_rate", 1, "flags normal X-rays as COVID-19"),
        ):
            a, b = (ref.get(key) or {}), (s.get(key) or {})
            if a.get("value") is None or b.get("value") is None:
                continue
            gap = (b["value"] - a["value"]) * worse
            beyond = b["ci95"][1] < a["value"] if worse < 0 else b["ci95"][0] > a["value"]
            if gap > RATE_GAP and beyond:
                problems.append(
                    f"On {name} it {what} {'far less' if worse < 0 else 'far more'} often than on the internal set: "
                    f"{key.replace('_', ' ')} {b['value']:.2f} ({b['k']}/{b['n']}) against {a['value']:.2f} "
                    f"({a['k']}/{a['n']})."
                )
    for name, s in sets.items():
        f = s["focus"]["predicted_covid"]
        if f["n"] < MIN_FOCUS_IMAGES:
            continue
        if f["median"] < FOCUS_THRESHOLD:
            problems.append(
                f"On {name}, where it says COVID-19 its Grad-CAM evidence lies mostly outside the lungs: median focus "
                f"{f['median']:.2f} over {f['n']} images predicted COVID-19 ({f['share_outside']:.0%} below "
                f"{FOCUS_THRESHOLD}; "
                "a uniform heatmap would give 0.525)."
            )
        else:
            notes.append(
                f"On {name} the median focus of the images predicted COVID-19 is {f['median']:.2f} (n={f['n']})."
            )
    trust = not problems
    headline = (
        "No shortcut found by these checks (this does not prove the model is right)."
        if trust
        else f"Do not trust this model's figures: {len(problems)} warning sign(s) of shortcut learning."
    )
    return {"trustworthy": trust, "headline": headline, "problems": problems, "notes": notes}


def by_figures(rows: list[dict], meta: dict, by: list[str], threshold: float, n_bootstrap: int) -> dict:
    """``column -> set -> subgroup_report`` (evaluate's figures per value of a manifest column) for each set
    where some image has the column (``meta``: ``(set, path) -> the image's manifest metadata``)."""
    out = {}
    for column in by:
        per_set = {}
        for name in dict.fromkeys(r["set"] for r in rows):
            ok = [r for r in rows if r["set"] == name and r["error"] is None]
            values = [meta.get((name, r["path"]), {}).get(column, MISSING) for r in ok]
            if ok and any(v != MISSING for v in values):
                y = np.array([r["label"] for r in ok], int)
                p = np.array([r["prob_covid"] for r in ok], float)
                per_set[name] = subgroup_report(y, p, values, threshold, n_bootstrap=n_bootstrap)
        out[column] = per_set
    return out


def embedding_source_signal(rows: list[dict], column: str, sources: dict, groups: dict, seed: int = 0) -> dict:
    """The source control (:func:`cxr.shortcut.source_signal`) on the model's own penultimate-layer embeddings of
    the internal set's readable images (``rows`` with an ``embedding``; ``sources``/``groups``: path -> value):
    how much of the source the model carries."""
    from .shortcut import image_model, source_signal

    chosen = [r for r in rows if r.get("embedding") is not None and sources.get(r["path"], MISSING) != MISSING]
    x = np.array([r["embedding"] for r in chosen], np.float32).reshape(len(chosen), -1)
    signal = source_signal(
        column,
        {"model embeddings": (x, image_model)},
        [sources[r["path"]] for r in chosen],
        [r["label"] for r in chosen],
        [groups.get(r["path"], r["path"]) for r in chosen],
        seed=seed,
    )
    signal["left_out"] = len(rows) - len(chosen)
    return signal


# --------------------------------------------------------------------------- plots and page


def _plot_focus(rows: list[dict], sets: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    from .pages import COLOURS, save_figure

    fig = Figure(figsize=(10.5, 0.55 * len(sets) + 2.2), layout="constrained")
    ax = fig.subplots()
    data, pos, colours = [], [], []
    for i, name in enumerate(sets):
        for k, (label, cls) in enumerate(((1, "covid"), (0, "non"))):
            v = [r["focus"] for r in rows if r["set"] == name and r["label"] == label and r["focus"] is not None]
            if v:
                data.append(v)
                pos.append(i + (k - 0.5) * 0.35)
                colours.append(COLOURS[cls])
    if data:
        parts = ax.boxplot(
            data,
            positions=pos,
            widths=0.3,
            orientation="horizontal",
            patch_artist=True,
            showfliers=True,
            flierprops={"markersize": 2},
        )
        for patch, c in zip(parts["boxes"], colours):
            patch.set(facecolor=c, alpha=0.4, edgecolor=c)
    ax.axvline(0.525, color="#999", ls=":", label="uniform heatmap (0.525)")
    ax.axvline(FOCUS_THRESHOLD, color="#111", ls="--", label=f"flag below {FOCUS_THRESHOLD}")
    ax.set_yticks(range(len(sets)), labels=sets)
    ax.invert_yaxis()
    ax.plot([], [], "s", color=COLOURS["covid"], alpha=0.5, label="true covid")
    ax.plot([], [], "s", color=COLOURS["non"], alpha=0.5, label="true non")
    ax.set(
        xlim=(0, 1),
        xlabel="focus: share of Grad-CAM mass inside the lung box",
        title="Where the model looks, per set and class",
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="x")
    save_figure(fig, path)


def _baseline_line(meta: dict) -> str:
    """The metadata baseline's cross-validated AUCs and strongest features, in one sentence."""
    aucs = ", ".join(f"{k} {x:.3f}" for k, x in meta["auc_by_model"].items())
    features = ", ".join(n for n, _ in meta["top_features"][:4]) or "none"
    return f"Cross-validated ROC AUC: {aucs}; strongest features: {features}."


def _source_html(signal: dict | None, out: Path) -> str:
    """The source control on the model's embeddings: what it measures, its table and confusion matrix."""
    from .pages import esc, img_tag
    from .shortcut import plot_confusion, signal_table_html

    if not signal:
        return ""
    figs = [
        img_tag(out / f"source_confusion_{scope}.png", f"Source predicted from the model's embeddings, {scope} images")
        for scope in ("all", "covid", "non")
        if plot_confusion(signal, out / f"source_confusion_{scope}.png", scope)
    ]
    return "\n".join(
        [
            f"<h2>Source control: {esc(signal['column'])} (internal set)</h2>",
            '<p class="sub">Can the model\'s own penultimate-layer features (PCA + logistic regression) tell which '
            f"{esc(signal['column'])} an image came from? Cross-validated, folds grouped by patient; within one class "
            "the source is a signal the label does not explain, and a model that carries it can score by the "
            "source where the source goes with the label.</p>",
            signal_table_html(signal),
            '<div class="figs">' + "".join(figs) + "</div>",
        ]
    )


def _by_html(by: dict, threshold: float, out: Path) -> str:
    """Per ``--by`` column and set: evaluate's table (n, sensitivity, specificity, ROC AUC per value) and figure."""
    from .pages import esc, img_tag

    parts = []
    for column, per_set in by.items():
        for name, groups in per_set.items():
            grouping = {"by": f"{column} ({name})", "groups": groups}
            path = out / by_figure_name(f"{column}-{name}")
            plot_by(grouping, threshold, path)
            parts += [
                f"<h2>By {esc(column)}: {esc(name)}</h2>",
                subgroup_table(grouping),
                '<div class="figs">' + img_tag(path, f"{name} by {column}") + "</div>",
            ]
    return "\n".join(parts)


def _html(report: dict, images: list[tuple[Path, str]], heatmaps: list[dict], out: Path) -> str:
    """The audit report's page, written top to bottom (cards, the per-set table, figures, heatmaps, baseline):
    long, but flat; split, its pieces would only be called here, in this order."""
    from .pages import CSS, card, esc, img_tag

    v = report["verdict"]
    meta = report["metadata_baseline"]
    sets = report["sets"]
    cards = [
        card(
            "Verdict",
            "do not trust" if not v["trustworthy"] else "no red flags",
            f"{len(v['problems'])} warning sign(s)",
        ),
        card(
            "Metadata-only ROC AUC",
            "n/a" if meta.get("auc") is None else f"{meta['auc']:.3f}",
            "internal set, file properties alone",
        ),
        card("Threshold", f"{report['threshold']:.4f}", "the model's own (chosen on validation)"),
    ]

    def fmt(r):
        if not r or r.get("value") is None:
            return "—"
        return f"{r['value']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] ({r['k']}/{r['n']})"

    def ff(f):
        if not f["n"]:
            return "—"
        return f"{f['median']:.2f} [{f['q25']:.2f}–{f['q75']:.2f}], {f['share_outside']:.0%} &lt; {FOCUS_THRESHOLD}"

    rows = [
        "<table><tr><th>set</th><th>images (covid / non)</th><th>sensitivity</th><th>false-positive rate</th><th>ROC "
        "AUC</th>"
        "<th>focus, predicted covid: median [IQR], share flagged</th><th>focus, true covid</th><th>focus, true "
        "non</th></tr>"
    ]
    for name, s in sets.items():
        auc = s.get("roc_auc")
        bad = f" ({s['unreadable']} unreadable)" if s["unreadable"] else ""
        rows.append(
            f"<tr><td>{esc(name)}{' (internal)' if name == report['internal'] else ''}</td><td>{s['n_covid']} / "
            f"{s['n_non']}{bad}</td>"
            f"<td>{fmt(s.get('sensitivity'))}</td><td>{fmt(s.get('false_positive_rate'))}</td>"
            f"<td>{'—' if auc is None else f'{auc:.3f}'}</td><td>{ff(s['focus']['predicted_covid'])}</td>"
            f"<td>{ff(s['focus']['covid'])}</td><td>{ff(s['focus']['non'])}</td></tr>"
        )
    rows.append("</table>")
    figs = []
    for h in heatmaps:
        src = base64.b64encode((out / h["heatmap"]).read_bytes()).decode("ascii")
        figs.append(
            f'<figure><img src="data:image/png;base64,{src}" width="220"><figcaption>{esc(h["set"])} · true '
            f"{CLASS_NAMES[h['label']]}<br>"
            f"{esc(posixpath.basename(h['path']))}</figcaption></figure>"
        )
    x0, x1, y0, y1 = LUNG_BOX
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>Shortcut audit: {esc(report['model'])}</title><style>{CSS}</style></head><body>",
            f"<h1>Shortcut audit: {esc(report['model'])}</h1>",
            f'<p class="sub">Internal: {esc(report["internal"])}. External: '
            f"{esc(', '.join(n for n in sets if n != report['internal']) or 'none')}. "
            f"{esc(report.get('sampling', ''))}</p>",
            f"<h2>Verdict</h2><p><b>{esc(v['headline'])}</b></p>",
            "<ul>" + "".join(f"<li>{esc(p)}</li>" for p in v["problems"]) + "</ul>" if v["problems"] else "",
            ("<p>" + " ".join(esc(n) for n in v["notes"]) + "</p>") if v["notes"] else "",
            f'<div class="cards">{"".join(cards)}</div>',
            "<h2>Per set</h2>",
            "\n".join(rows),
            '<p class="sub">Focus: share of the Grad-CAM heatmap (COVID-19 class) inside the lung box x '
            f"{x0:.0%}–{x1:.0%}, y {y0:.0%}–{y1:.0%} "
            "of the image; 0.525 for a uniform heatmap; below 0.5 the evidence lies mostly outside the lungs "
            "(borders, corners, text labels).</p>",
            "<h2>Metadata-only baseline (internal set)</h2>",
            f"<p>{esc(meta.get('reason') or _baseline_line(meta))}</p>",
            _source_html(report.get("source_control"), out),
            _by_html(report.get("by") or {}, report["threshold"], out),
            "<h2>Figures</h2>",
            '<div class="figs">' + "".join(img_tag(p, alt) for p, alt in images) + "</div>",
            "<h2>Sample heatmaps</h2>",
            '<div class="figs">' + "".join(figs) + "</div>",
            "<footer>Generated by cxr.audit. Research tool, not a medical device.</footer></body></html>",
        ]
    )


# --------------------------------------------------------------------------- driver


def audit(
    model: str,
    internal: str,
    externals: list[str],
    output_dir: str,
    *,
    internal_split: str | None = "test",
    limit: int | None = None,
    seed: int = 0,
    heatmaps_per_class: int = 2,
    n_bootstrap: int = 500,
    batch_size: int = 16,
    actors: int | None = None,
    layer: str | None = None,
    overwrite: bool = False,
    label_map: dict | None = None,
    by: list[str] | None = None,
    source_column: str | None = None,
) -> AuditResult:
    """Audit ``model`` on ``internal`` versus ``externals``; report to the local folder ``output_dir``.

    ``internal_split`` picks the internal split folder where the data has one (``None``: all splits);
    external sets take every split. ``limit``: at most that many images per set and class, drawn at
    random with ``seed``. ``heatmaps_per_class``: overlay PNGs kept per set and class. A non-empty
    ``output_dir`` raises OutputError unless ``overwrite``, which empties it first (no stale heatmaps stay behind).
    ``by``: manifest columns, each adding evaluate's per-value figures per set that has it (:func:`by_figures`);
    ``source_column``: the internal manifest's column naming each image's source, adding the source control on
    the model's embeddings (:func:`embedding_source_signal`). A column no image has is an :class:`InputError`.

    Long on purpose: the audit's steps in order (choose the images of each set, score and Grad-CAM them in one
    pass, the metadata baseline, the figures per set, the report), each a call that shares the scored rows with
    the next."""
    from .output import prepare_output
    from .validate import inspect_files, metadata_baseline

    settings = storage.s3_settings()
    info = check_model(model, layer, settings)  # early: CheckpointError, or LayerError for a layer it lacks
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    names = [set_name(u) for u in (internal, *externals)]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    chosen, internal_files, split_used, meta, listed = [], None, False, {}, []
    for name, uri in zip(names, (internal, *externals)):
        files = labelled_files(uri, internal_split if uri == internal else None, settings, label_map)
        if not files:
            raise InputError(f"no labelled images in {uri}")
        if uri == internal:
            internal_files = files
            fs, root = storage.filesystem(uri, settings)
            root = storage.to_uri(fs, root).rstrip("/") + "/"
            split_used = internal_split is not None and any(
                f.path.startswith(root) and f.path[len(root) :].split("/", 1)[0].lower() == internal_split.lower()
                for f in files
            )
        listed += files
        picked = _sample(files, limit, rng)
        overlay = set()
        for label in (0, 1):
            sel = [f.path for f in picked if f.label == label]
            if sel and heatmaps_per_class:
                overlay |= set(rng.choice(sel, size=min(heatmaps_per_class, len(sel)), replace=False).tolist())
        chosen += [(f.path, f.label, name, f.path in overlay) for f in picked]
        meta.update({(name, f.path): f.meta for f in picked})
        log.info("set %s: %d of %d images", name, len(picked), len(files))
    for column in dict.fromkeys(by or []):  # a column no set has: an error before any scoring
        column_values(listed, column, "--by")
    sources = column_values(internal_files, source_column, "--source-column") if source_column else None
    table = pa.table(
        {
            "path": [c[0] for c in chosen],
            "label": pa.array([c[1] for c in chosen], pa.int8()),
            "set": [c[2] for c in chosen],
            "overlay": [c[3] for c in chosen],
        }
    )
    prepare_output(output_dir, overwrite, settings)
    out = Path(output_dir)
    result = run_explain(
        table,
        model,
        settings,
        str(out.resolve()),
        layer=layer,
        batch_size=batch_size,
        actors=actors,
        embeddings=bool(source_column),
    )
    if result.num_rows != table.num_rows:
        raise RuntimeError(f"explained {result.num_rows} rows for {table.num_rows} images")
    pq.write_table(
        result.drop_columns([c for c in ("embedding",) if c in result.column_names]), out / "predictions.parquet"
    )
    rows = result.to_pylist()
    for r in rows:
        r["label"] = int(r["label"])
    log.info("metadata-only baseline on %d internal files", len(internal_files))
    inspected = inspect_files(
        pa.table(
            {
                "path": [f.path for f in internal_files],
                "split": ["internal"] * len(internal_files),
                "label": pa.array([f.label for f in internal_files], pa.int8()),
            }
        ),
        settings,
    ).to_pylist()
    metadata = metadata_baseline(inspected, seed=seed)
    sets = {name: set_figures([r for r in rows if r["set"] == name], info.threshold, n_bootstrap) for name in names}
    source = None
    if source_column:
        internal_rows = [r for r in rows if r["set"] == names[0]]
        groups = {f.path: f.group for f in internal_files}
        source = embedding_source_signal(internal_rows, source_column, sources, groups, seed=seed)
    report = {
        "model": info.model_id,
        "model_uri": model,
        "threshold": info.threshold,
        "internal": names[0],
        "internal_split": (internal_split if split_used else "all") if internal_split else "all",
        "sets": sets,
        "metadata_baseline": metadata,
        "verdict": verdict(sets, names[0], metadata, source),
        "source_control": source,
        "by": by_figures(rows, meta, list(dict.fromkeys(by or [])), info.threshold, n_bootstrap) if by else None,
        "rules": RULES,
        "sampling": (
            f"At most {limit} images per set and class, drawn at random (seed {seed})."
            if limit
            else "Every image of every set."
        ),
        "data": dict(zip(names, (internal, *externals))),
        "seconds": round(time.perf_counter() - start, 1),
    }
    images = [
        (out / "rates.png", "Sensitivity and false-positive rate per set"),
        (out / "focus.png", "Focus score per set and class"),
    ]
    plot_rates(
        sets, info.threshold, images[0][0], labels=[f"{n} (internal)" if i == 0 else n for i, n in enumerate(names)]
    )
    _plot_focus(rows, names, images[1][0])
    import json

    (out / "report.json").write_text(
        json.dumps(to_jsonable(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
    )
    heatmaps = sorted((r for r in rows if r["heatmap"]), key=lambda r: (names.index(r["set"]), -r["label"], r["path"]))
    (out / "report.html").write_text(_html(report, images, heatmaps, out), encoding="utf-8")
    return AuditResult(
        report,
        {
            "report_html": str(out / "report.html"),
            "report_json": str(out / "report.json"),
            "predictions": str(out / "predictions.parquet"),
        },
        time.perf_counter() - start,
    )
