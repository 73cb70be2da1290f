"""One figure comparing leave-one-group-out runs: ROC AUC with its interval inside each held-out group, one marker
per run, beside a reference model scored on the same groups (an evaluate report made with ``--by COLUMN``).

    .venv/bin/python scripts/plot-holdout-runs.py OUT.png --reference runs/default-sources/report.json:"shipped" \\
        runs/loso/pack:"b: pack" runs/loso/pack-balanced:"c: balanced" ...

Each run is ``PATH[:LABEL]``: a train output with ``holdout.json`` (or the file itself). Used for docs/sources.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from cxr.pages import save_figure


def _split(arg: str) -> tuple[str, str]:
    path, _, label = arg.partition(":")
    return path, label or os.path.basename(os.path.normpath(path))


def holdout_groups(path: str) -> tuple[dict[str, dict], float | None]:
    """group -> {roc_auc, ci95}, and the mean over groups, of a run's holdout.json."""
    if os.path.isdir(path):
        path = os.path.join(path, "holdout.json")
    summary = json.load(open(path))
    return {g["group"]: {"roc_auc": g["roc_auc"], "ci95": g["roc_auc_ci95"]} for g in summary["groups"]}, summary[
        "mean_roc_auc"
    ]


def report_groups(path: str, column: str) -> tuple[dict[str, dict], float | None]:
    """group -> {roc_auc, ci95} of an evaluate report's per-``column`` figures, and their mean."""
    report = json.load(open(path))
    section = (report.get("by") or {}).get(column)
    if section is None:
        raise SystemExit(f"{path} has no figures by {column!r}: make it with `evaluate.py --by {column}`")
    groups = {g["group"]: {"roc_auc": g["roc_auc"], "ci95": g["roc_auc_ci95"]} for g in section["groups"]}
    aucs = [g["roc_auc"] for g in groups.values() if g["roc_auc"] is not None]
    return groups, (sum(aucs) / len(aucs) if aucs else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", help="the PNG to write")
    ap.add_argument("runs", nargs="+", help="PATH[:LABEL] of a train output made with --holdout-by")
    ap.add_argument("--reference", help="PATH[:LABEL] of an evaluate report.json made with --by COLUMN")
    ap.add_argument("--column", default="source", help="the column the runs held out (default: source)")
    args = ap.parse_args(argv)
    series = []
    if args.reference:
        path, label = _split(args.reference)
        series.append((label + " (scored, not held out)", *report_groups(path, args.column)))
    for arg in args.runs:
        path, label = _split(arg)
        series.append((label, *holdout_groups(path)))
    groups = sorted({g for _, by_group, _ in series for g in by_group})
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.3 * len(groups) * len(series) ** 0.5 + 0.2 * len(series)))
    step = 0.8 / max(1, len(series))
    for i, (label, by_group, mean) in enumerate(series):
        ys, xs, lo, hi = [], [], [], []
        for j, g in enumerate(groups):
            if g in by_group and by_group[g]["roc_auc"] is not None:
                a, (low, high) = by_group[g]["roc_auc"], by_group[g]["ci95"]
                ys.append(j - 0.4 + step * (i + 0.5))
                xs.append(a)
                lo.append(a - low)
                hi.append(high - a)
        mean_text = "" if mean is None else f", mean {mean:.3f}"
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", ms=4, capsize=2, label=f"{label}{mean_text}")
    ax.axvline(0.5, color="grey", lw=1, ls="--")
    ax.set_yticks(range(len(groups)), groups)
    ax.invert_yaxis()
    ax.set_xlim(0.2, 1.0)
    ax.set_xlabel(f"ROC AUC inside each {args.column} (bootstrap 95% interval); 0.5 = chance")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    save_figure(fig, args.output)
    plt.close(fig)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
