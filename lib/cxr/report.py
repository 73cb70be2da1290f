"""Write an evaluation report (plots, JSON, one self-contained HTML page) to a folder.

Plots are drawn with matplotlib's object API (``matplotlib.figure.Figure``), which renders
with the Agg backend and never touches pyplot or a display, so this is safe on headless
Ray workers and does not change the process-wide backend.

The input is the dict from :func:`cxr.metrics.binary_report` plus the labels and covid
probabilities it was computed from.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter
from sklearn.metrics import precision_recall_curve, roc_curve

from .metrics import as_label_and_prob, to_jsonable
from .pages import COLOURS, CSS, card, esc, img_tag, save_figure

__all__ = ["plot_rates", "write_report"]


# --------------------------------------------------------------------------- formatting


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    return f"{float(x):.{digits}f}"


def _pct(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100.0 * float(x):.{digits}f}%"


def _ci_pct(ci: Any) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f"95% CI {_pct(ci[0])}–{_pct(ci[1])}"


def _ci_num(ci: Any) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f"95% CI {_num(ci[0])}–{_num(ci[1])}"


# --------------------------------------------------------------------------- plots


def _plot_roc(y: np.ndarray, p: np.ndarray, report: Mapping[str, Any], path: Path) -> None:
    fpr, tpr, _ = roc_curve(y, p)
    roc = report.get("roc_auc") or {}
    fig = Figure(figsize=(5.6, 5.2), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color=COLOURS["chance"], label="chance")
    ci = _ci_num(roc.get("ci95"))
    ax.plot(
        fpr, tpr, lw=2, color=COLOURS["covid"], label=f"ROC  AUC {_num(roc.get('value'))}" + (f" ({ci})" if ci else "")
    )
    sens = (report.get("sensitivity") or {}).get("value")
    fpr_op = (report.get("false_positive_rate") or {}).get("value")
    if sens is not None and fpr_op is not None:
        ax.plot(
            [fpr_op],
            [sens],
            "o",
            ms=8,
            mfc="white",
            mec=COLOURS["op"],
            mew=2,
            label=f"operating point t={_num(report.get('threshold'))}: sens {_pct(sens)}, spec {_pct(1 - fpr_op)}",
        )
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        aspect="equal",
        xlabel="False positive rate (1 − specificity)",
        ylabel="Sensitivity (true positive rate)",
        title="ROC curve (positive class: covid)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def _plot_pr(y: np.ndarray, p: np.ndarray, report: Mapping[str, Any], path: Path) -> None:
    precision, recall, _ = precision_recall_curve(y, p)
    pr = report.get("pr_auc") or {}
    prevalence = float(np.mean(y))
    fig = Figure(figsize=(5.6, 5.2), layout="constrained")
    ax = fig.subplots()
    ax.axhline(prevalence, ls="--", lw=1, color=COLOURS["chance"], label=f"chance (prevalence {_pct(prevalence)})")
    ci = _ci_num(pr.get("ci95"))
    ax.step(
        recall,
        precision,
        where="post",
        lw=2,
        color=COLOURS["covid"],
        label=f"PR  AP {_num(pr.get('value'))}" + (f" ({ci})" if ci else ""),
    )
    cm = report.get("confusion_matrix") or {}
    tp, fp, fn = cm.get("tp", 0), cm.get("fp", 0), cm.get("fn", 0)
    if tp + fn > 0 and tp + fp > 0:
        r_op, p_op = tp / (tp + fn), tp / (tp + fp)
        ax.plot(
            [r_op],
            [p_op],
            "o",
            ms=8,
            mfc="white",
            mec=COLOURS["op"],
            mew=2,
            label=f"operating point t={_num(report.get('threshold'))}: recall {_pct(r_op)}, precision {_pct(p_op)}",
        )
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        aspect="equal",
        xlabel="Recall (sensitivity)",
        ylabel="Precision (PPV)",
        title="Precision–recall curve (positive class: covid)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    save_figure(fig, path)


def _plot_histogram(y: np.ndarray, p: np.ndarray, report: Mapping[str, Any], names: list[str], path: Path) -> None:
    bins = np.linspace(0.0, 1.0, 51)
    fig = Figure(figsize=(7.0, 4.4), layout="constrained")
    ax = fig.subplots()
    for label, name, colour in ((0, names[0], COLOURS["non"]), (1, names[1], COLOURS["covid"])):
        sel = p[y == label]
        if sel.size == 0:
            continue
        ax.hist(sel, bins=bins, histtype="stepfilled", alpha=0.35, color=colour)
        ax.hist(sel, bins=bins, histtype="step", lw=1.5, color=colour, label=f"true {name} (n={sel.size})")
    t = report.get("threshold")
    if t is not None:
        ax.axvline(float(t), color=COLOURS["op"], ls="--", lw=1.5, label=f"threshold {_num(t)}")
    ax.set_yscale("log")
    # plain "1, 10, 100" (and "2, 3, 5" minor labels when the span is short), not 10^k
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    ax.set(
        xlim=(0, 1),
        xlabel=f"Predicted probability of {names[1]}",
        ylabel="Count (log scale)",
        title="Predicted probabilities by true class",
    )
    ax.grid(alpha=0.3, which="both", axis="y")
    ax.legend(loc="best", fontsize=8)
    save_figure(fig, path)


def _plot_confusion(report: Mapping[str, Any], names: list[str], path: Path) -> None:
    cm = report.get("confusion_matrix") or {}
    m = np.array([[cm.get("tn", 0), cm.get("fp", 0)], [cm.get("fn", 0), cm.get("tp", 0)]])
    fig = Figure(figsize=(4.8, 4.2), layout="constrained")
    ax = fig.subplots()
    row_tot = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, row_tot, out=np.zeros(m.shape), where=row_tot > 0)
    ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    tags = [["TN", "FP"], ["FN", "TP"]]
    for i in range(2):
        for j in range(2):
            share = f"\n{_pct(frac[i, j])} of row" if row_tot[i, 0] else ""
            ax.text(
                j,
                i,
                f"{tags[i][j]}\n{m[i, j]:,}{share}",
                ha="center",
                va="center",
                fontsize=11,
                color="white" if frac[i, j] > 0.6 else "black",
            )
    ax.set_xticks([0, 1], labels=[f"pred {n}" for n in names])
    ax.set_yticks([0, 1], labels=[f"true {n}" for n in names])
    ax.set(xlabel="Predicted", ylabel="True", title=f"Confusion matrix (threshold {_num(report.get('threshold'))})")
    save_figure(fig, path)


_RATE_PANELS = {
    "sensitivity": ("covid", "Sensitivity (COVID-19 found)"),
    "specificity": ("non", "Specificity (non-COVID cleared)"),
    "false_positive_rate": ("non", "False-positive rate (normals flagged)"),
}


def _plot_auc_panel(ax, groups: Mapping[str, Mapping[str, Any]]) -> None:
    """ROC AUC with its bootstrap interval per group (``roc_auc``, ``roc_auc_ci95`` of a subgroup)."""
    for i, name in enumerate(groups):
        g = groups[name]
        if g.get("roc_auc") is None:
            ax.text(0.02, i, "needs both classes", va="center", fontsize=8, color="#777")
            continue
        value, (lo, hi) = g["roc_auc"], g.get("roc_auc_ci95") or (None, None)
        err = None if lo is None else [[value - lo], [hi - value]]
        ax.errorbar([value], [i], xerr=err, fmt="s", color="#444", capsize=4)
        ax.text(value, i - 0.22, f"{value:.2f}", fontsize=8, ha="center")
    ax.axvline(0.5, color="#999", linestyle="--", linewidth=1)
    ax.set(xlim=(-0.02, 1.02), ylim=(len(groups) - 0.5, -0.6), title="ROC AUC (0.5 = chance)")
    ax.grid(alpha=0.3, axis="x")


def plot_rates(
    groups: Mapping[str, Mapping[str, Any]],
    threshold: float,
    path: Path,
    *,
    labels: list[str] | None = None,
    rates: tuple[str, str] = ("sensitivity", "false_positive_rate"),
    auc: bool = False,
) -> None:
    """Two rates (``rates``: sensitivity, specificity or false_positive_rate) with their 95% intervals, one row
    per group (a data set or a subgroup): ``groups`` maps a name to a dict with those rates as
    :func:`cxr.metrics.binary_report` gives them (``None`` where the group lacks the class); with ``auc`` a third
    panel, each group's ROC AUC and bootstrap interval (:func:`cxr.metrics.subgroup_report`)."""
    names = list(groups)
    fig = Figure(figsize=(13.0 if auc else 9.0, 0.5 * len(names) + 2.2), layout="constrained")
    axes = fig.subplots(1, 3 if auc else 2, sharey=True)
    if auc:
        _plot_auc_panel(axes[2], groups)
    for ax, key in zip(axes, rates):
        colour, title = COLOURS[_RATE_PANELS[key][0]], _RATE_PANELS[key][1]
        for i, name in enumerate(names):
            r = groups[name].get(key) or {}
            if r.get("value") is None:
                ax.text(0.02, i, "no examples", va="center", fontsize=8, color="#777")
                continue
            lo, hi = r["ci95"]
            ax.errorbar(
                [r["value"]], [i], xerr=[[r["value"] - lo], [hi - r["value"]]], fmt="o", color=colour, capsize=4
            )
            ax.text(
                r["value"],
                i - 0.22,
                f"{r['value']:.2f} ({r['k']}/{r['n']})",
                fontsize=8,
                ha="center" if 0.1 < r["value"] < 0.9 else ("left" if r["value"] <= 0.1 else "right"),
            )
        ax.set(xlim=(-0.02, 1.02), ylim=(len(names) - 0.5, -0.6), title=title)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(names)), labels=labels or names)
    note = "; ROC AUC: bootstrap" if auc else ""
    fig.suptitle(f"At the model's threshold {threshold:.3f} (95% Wilson intervals{note})", fontsize=10)
    save_figure(fig, path)


# --------------------------------------------------------------------------- HTML


def _rate_card(label: str, d: Mapping[str, Any] | None) -> str:
    d = d or {}
    detail = _ci_pct(d.get("ci95"))
    if d.get("n"):
        detail = f"{detail} · {d.get('k')}/{d.get('n')}".lstrip(" ·")
    return card(label, _pct(d.get("value")), detail or "no examples of this class")


def _auc_card(label: str, d: Mapping[str, Any] | None) -> str:
    d = d or {}
    return card(label, _num(d.get("value")), _ci_num(d.get("ci95")) or "needs both classes")


def _classification_table(cr: Mapping[str, Any], names: list[str]) -> str:
    rows = ["<table><tr><th></th><th>precision</th><th>recall</th><th>f1-score</th><th>support</th></tr>"]
    absent = []
    for key, value in cr.items():
        if isinstance(value, Mapping):
            support = value.get("support")
            if key in names and not support:
                absent.append(key)
            rows.append(
                f"<tr><td>{esc(key)}</td><td>{esc(_num(value.get('precision')))}</td>"
                f"<td>{esc(_num(value.get('recall')))}</td>"
                f"<td>{esc(_num(value.get('f1-score')))}</td>"
                f"<td>{esc(_num(int(support) if support is not None else None))}</td></tr>"
            )
        else:
            rows.append(f'<tr><td>{esc(key)}</td><td colspan="3">{esc(_num(value))}</td><td></td></tr>')
    rows.append("</table>")
    if absent:
        rows.append(
            '<p class="note">No true examples of '
            + ", ".join(f"“{esc(a)}”" for a in absent)
            + " in this set: its recall and F1 (and therefore the macro average) are "
            "undefined and shown as 0 by scikit-learn's zero_division=0 convention.</p>"
        )
    return "\n".join(rows)


def _spec_at_sens_table(sas: Mapping[str, Any]) -> str:
    rows = [
        "<table><tr><th>target sensitivity</th><th>threshold</th><th>achieved sensitivity</th><th>specificity</th></tr>"
    ]
    for target, d in sas.items():
        d = d or {}
        try:
            target_txt = _pct(float(target))
        except ValueError:
            target_txt = str(target)
        rows.append(
            f"<tr><td>{esc(target_txt)}</td><td>{esc(_num(d.get('threshold'), 4))}</td>"
            f"<td>{esc(_pct(d.get('sensitivity')))}</td>"
            f"<td>{esc(_pct(d.get('specificity')))}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def _confusion_table(cm: Mapping[str, Any], names: list[str]) -> str:
    return (
        f"<table><tr><th></th><th>pred {esc(names[0])}</th><th>pred {esc(names[1])}</th></tr>"
        f"<tr><td>true {esc(names[0])}</td><td>TN {esc(cm.get('tn'))}</td>"
        f"<td>FP {esc(cm.get('fp'))}</td></tr>"
        f"<tr><td>true {esc(names[1])}</td><td>FN {esc(cm.get('fn'))}</td>"
        f"<td>TP {esc(cm.get('tp'))}</td></tr></table>"
    )


def _extra_table(extra: Mapping[str, Any]) -> str:
    rows = ["<table><tr><th>key</th><th>value</th></tr>"]
    for k, v in extra.items():
        if isinstance(v, str):
            text = v
        else:
            text = json.dumps(to_jsonable(v), ensure_ascii=False, allow_nan=False)
        rows.append(f'<tr><td>{esc(k)}</td><td style="text-align:left">{esc(text)}</td></tr>')
    rows.append("</table>")
    return "\n".join(rows)


def subgroup_table(sub: Mapping[str, Any]) -> str:
    """A grouping (``{"by": name, "groups": metrics.subgroup_report(...)}``) as an HTML table with a line saying
    what it shows."""
    rows = [
        f'<p class="sub">Grouped by {esc(sub.get("by"))}: the rates within each group at the same threshold. '
        "A group far from the overall figures is where the model fails.</p>",
        "<table><tr><th>group</th><th>images</th><th>covid / non</th><th>sensitivity</th><th>specificity</th>"
        "<th>false-positive rate</th><th>ROC AUC</th></tr>",
    ]

    def rate(d):
        if not d:
            return "—"
        return f"{_pct(d.get('value'))} ({d.get('k')}/{d.get('n')}) {_ci_pct(d.get('ci95'))}"

    for g in sub.get("groups") or []:
        rows.append(
            f"<tr><td>{esc(g['group'])}</td><td>{esc(g['n'])}</td><td>{esc(g['n_positive'])} / "
            f"{esc(g['n_negative'])}</td>"
            f"<td>{esc(rate(g.get('sensitivity')))}</td><td>{esc(rate(g.get('specificity')))}</td>"
            f"<td>{esc(rate(g.get('false_positive_rate')))}</td>"
            f"<td>{esc(_num(g.get('roc_auc')))} {esc(_ci_num(g.get('roc_auc_ci95')))}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def _html(
    report: Mapping[str, Any],
    title: str,
    extra: Mapping[str, Any] | None,
    images: list[tuple[Path, str]],
    names: list[str],
    subgroups: Mapping[str, Any] | None = None,
    subgroup_image: Path | None = None,
    by: Mapping[str, Mapping[str, Any]] | None = None,
    by_images: Mapping[str, Path] | None = None,
) -> str:
    n, n_pos, n_neg = report.get("n"), report.get("n_positive"), report.get("n_negative")
    cards = "".join(
        [
            _rate_card(f"Sensitivity ({names[1]} recall)", report.get("sensitivity")),
            _rate_card(f"Specificity ({names[0]} recall)", report.get("specificity")),
            _auc_card("ROC AUC", report.get("roc_auc")),
            _auc_card("PR AUC (average precision)", report.get("pr_auc")),
            card("Threshold", _num(report.get("threshold"), 4), f"{names[1]} if prob ≥ threshold"),
            card("Examples", _num(n), f"{n_pos} {names[1]} · {n_neg} {names[0]}"),
        ]
    )
    notes = []
    if not (n_pos and n_neg):
        notes.append(
            '<p class="note">Only one class is present in this set: AUCs, curves '
            "and the missing class's rates are not defined.</p>"
        )
    boot = report.get("bootstrap") or {}
    if boot.get("n_resamples"):
        notes.append(
            f'<p class="sub">AUC intervals: {esc(boot.get("method"))} bootstrap, '
            f"{esc(boot.get('n_resamples'))} resamples, seed {esc(boot.get('seed'))}. "
            "Rate intervals: Wilson score.</p>"
        )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">Positive class: {esc(names[1])}. Research tool, not a medical device.</p>',
        f'<div class="cards">{cards}</div>',
        *notes,
        "<h2>Classification report</h2>",
        _classification_table(report.get("classification_report") or {}, names),
        "<h2>Confusion matrix</h2>",
        _confusion_table(report.get("confusion_matrix") or {}, names),
        "<h2>Specificity at target sensitivity</h2>",
        _spec_at_sens_table(report.get("specificity_at_sensitivity") or {}),
        "<h2>Figures</h2>",
        '<div class="figs">' + "".join(img_tag(p, alt) for p, alt in images) + "</div>",
    ]
    if subgroups:
        parts += ["<h2>Subgroups</h2>", subgroup_table(subgroups)]
        if subgroup_image is not None:
            parts.append('<div class="figs">' + img_tag(subgroup_image, "Rates per subgroup") + "</div>")
    for column, grouping in (by or {}).items():
        parts += [f"<h2>By {esc(column)}</h2>", subgroup_table(grouping)]
        if by_images and column in by_images:
            parts.append('<div class="figs">' + img_tag(by_images[column], f"Figures by {column}") + "</div>")
    if extra:
        parts += ["<h2>Details</h2>", _extra_table(extra)]
    parts += ["<footer>Generated by cxr.report.</footer>", "</body></html>"]
    return "\n".join(parts)


# --------------------------------------------------------------------------- entry point


def by_figure_name(name: str) -> str:
    """``by-<name>.png``, the name made safe for a file name."""
    return f"by-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"


def plot_by(grouping: Mapping[str, Any], threshold: float, path: Path) -> None:
    """Sensitivity, specificity and ROC AUC with their intervals per group of one grouping (``{"by", "groups"}``,
    the groups from :func:`cxr.metrics.subgroup_report`)."""
    plot_rates(
        {g["group"]: g for g in grouping["groups"]},
        threshold,
        path,
        labels=[f"{g['group']} (n={g['n']})" for g in grouping["groups"]],
        rates=("sensitivity", "specificity"),
        auc=True,
    )


def _plot_by(by: Mapping[str, Mapping[str, Any]], threshold: float, out: Path) -> dict[str, Path]:
    """``by-<column>.png`` per grouping of ``by`` (sensitivity, specificity, ROC AUC); stale ones removed."""
    images = {}
    for column, grouping in by.items():
        images[column] = out / by_figure_name(column)
        plot_by(grouping, threshold, images[column])
    for stale in set(out.glob("by-*.png")) - set(images.values()):
        stale.unlink()
    return images


def write_report(
    report: dict,
    y_true: Any,
    prob: Any,
    out_dir: str | os.PathLike,
    *,
    title: str = "Evaluation",
    extra: dict | None = None,
    subgroups: dict | None = None,
    by: dict[str, dict] | None = None,
) -> dict[str, str]:
    """Write plots, ``report.json`` and a self-contained ``report.html`` into ``out_dir``.

    ``report`` is the dict from :func:`cxr.metrics.binary_report` computed on ``y_true`` /
    ``prob`` (labels 1 = covid, probabilities of covid).  ``out_dir`` is a local folder,
    created if missing.  Files:

    * ``roc.png``, ``pr.png`` -- only when both classes are present (stale copies from an
      earlier run in the same folder are removed otherwise, so they cannot mislead);
    * ``histogram.png`` -- probability histograms per true class, log-y, threshold line;
    * ``confusion_matrix.png`` -- counts and row percentages;
    * ``subgroups.png`` -- with ``subgroups`` (``{"by": str, "groups": [...]}``, the groups from
      :func:`cxr.metrics.subgroup_report`): the rates per group with their intervals;
    * ``by-<column>.png`` -- for each grouping of ``by`` (``{column: {"by": column, "groups": [...]}}``, e.g.
      ``evaluate --by source``): sensitivity, specificity and ROC AUC per group with their intervals;
    * ``report.json`` -- ``report`` plus ``{"extra": extra}``, ``{"subgroups": subgroups}`` and ``{"by": by}``
      when given, indented;
    * ``report.html`` -- one page with the key numbers, tables and the PNGs embedded as
      base64 data URIs; every report/extra value is HTML-escaped.

    Returns ``{name: path}`` with names ``roc``, ``pr``, ``histogram``,
    ``confusion_matrix``, ``subgroups``, ``report_json``, ``report_html`` (``roc``/``pr``/``subgroups``
    only when written).

    Long on purpose: it writes the files listed above one after another, each a call."""
    y, p = as_label_and_prob(y_true, prob)
    if report.get("n") is not None and int(report["n"]) != y.size:
        raise ValueError(f"report was computed on {report['n']} examples, got {y.size}")
    names = [
        str(c)
        for c in (
            report.get("class_names") or (report.get("confusion_matrix_labels") or {}).get("order") or ("non", "covid")
        )
    ]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    both = bool(np.any(y == 1) and np.any(y == 0))

    images: list[tuple[Path, str]] = []
    if both:
        paths["roc"] = out / "roc.png"
        _plot_roc(y, p, report, paths["roc"])
        paths["pr"] = out / "pr.png"
        _plot_pr(y, p, report, paths["pr"])
        images += [(paths["roc"], "ROC curve"), (paths["pr"], "Precision–recall curve")]
    else:
        for stale in ("roc.png", "pr.png"):
            (out / stale).unlink(missing_ok=True)
    paths["histogram"] = out / "histogram.png"
    _plot_histogram(y, p, report, names, paths["histogram"])
    paths["confusion_matrix"] = out / "confusion_matrix.png"
    _plot_confusion(report, names, paths["confusion_matrix"])
    images += [
        (paths["histogram"], "Predicted probabilities by true class"),
        (paths["confusion_matrix"], "Confusion matrix"),
    ]

    if subgroups:
        paths["subgroups"] = out / "subgroups.png"
        plot_rates(
            {g["group"]: g for g in subgroups["groups"]},
            float(report["threshold"]),
            paths["subgroups"],
            labels=[f"{g['group']} (n={g['n']})" for g in subgroups["groups"]],
        )
    else:
        (out / "subgroups.png").unlink(missing_ok=True)
    by_images = _plot_by(by or {}, float(report["threshold"]), out)
    paths.update({f"by_{column}": image for column, image in by_images.items()})

    payload = dict(report)
    if extra is not None:
        payload["extra"] = extra
    if subgroups:
        payload["subgroups"] = subgroups
    if by:
        payload["by"] = by
    paths["report_json"] = out / "report.json"
    paths["report_json"].write_text(
        json.dumps(to_jsonable(payload), indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
    )

    paths["report_html"] = out / "report.html"
    paths["report_html"].write_text(
        _html(report, title, extra, images, names, subgroups, paths.get("subgroups"), by, by_images), encoding="utf-8"
    )
    return {k: str(v) for k, v in paths.items()}
