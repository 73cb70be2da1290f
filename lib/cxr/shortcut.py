"""Source shortcut control: how well can a small model tell which source (hospital, archive, journal) an
image came from, and could that source stand in for the label?

Public COVID-19 X-ray collections mix sources, and the sources differ in more than the disease: a model can
score by recognising the source. This module measures the signal in any features (file properties, image
thumbnails, a model's own embeddings), cross-validated with folds grouped by patient:

- **balanced accuracy** of predicting the source (chance = 1/k for k sources) and the **macro one-vs-rest ROC
  AUC**, with the confusion matrix, over all images and **within each class** (among covid images only, among
  non images only): a source told apart inside one class is a signal the label does not explain;
- the **label-source association**: Cramér's V of the source x label table and the share of covid per source.
  Source signal in the images is a shortcut risk only where the source says something about the label.

:func:`source_signal` is used by validate (file properties and thumbnails) and audit (the model's embeddings).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from .data import CLASS_NAMES

IMAGE_AUC_FLAG = 0.8  # macro one-vs-rest ROC AUC of the source at or above which the features "tell the source"
ASSOCIATION_FLAG = 0.3  # Cramér's V of source x label at or above which the source "says something" about the label
MIN_PER_SOURCE = 2  # a source with fewer images (in the set or class) is left out of that fit


def image_model(n: int, folds: int = 5, max_components: int = 32):
    """Standardise -> PCA (at most ``max_components``, a third of a training fold's images) -> multinomial
    logistic regression with balanced class weights: the small model that predicts the source from pixels or
    embeddings."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = n - -(-n // max(2, folds))  # the smallest training fold
    components = max(1, min(max_components, train // 3))  # few: the strong directions, not every pixel's noise
    return make_pipeline(
        StandardScaler(),
        PCA(n_components=components, random_state=0),
        LogisticRegression(max_iter=2000, class_weight="balanced"),
    )


def cramers_v(sources: Sequence[str], labels: Sequence[int]) -> float | None:
    """Cramér's V of the source x label contingency table (0: the source says nothing about the label, 1: it
    gives the label away); None with a single source or a single class."""
    from scipy.stats.contingency import association

    names, classes = sorted(set(sources)), sorted(set(labels))
    if len(names) < 2 or len(classes) < 2:
        return None
    table = np.zeros((len(names), len(classes)), int)
    for s, y in zip(sources, labels):
        table[names.index(s), classes.index(y)] += 1
    return float(association(table, method="cramer"))


def predict_source(
    features,
    sources: Sequence[str],
    groups: Sequence[str],
    make_model: Callable[[int, int], object],
    *,
    seed: int = 0,
    folds: int = 5,
) -> dict:
    """Cross-validated prediction of ``sources`` from ``features`` (an array or DataFrame, one row per image):
    folds stratified by source and grouped by ``groups`` (patients). ``make_model(n, folds)`` builds a fresh
    scikit-learn classifier with ``predict_proba``. Sources with fewer than :data:`MIN_PER_SOURCE` images are
    left out (listed under ``left_out``).

    Returns ``balanced_accuracy``, ``chance`` (1/k), ``roc_auc`` (macro one-vs-rest), ``roc_auc_by_source`` (each
    source against the rest: one source recognised among look-alikes shows here), ``confusion`` (rows true,
    columns predicted, in ``sources`` order), ``n``, ``folds``; or ``reason`` when fewer than two sources remain."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    counts = Counter(sources)
    keep = np.array([counts[s] >= MIN_PER_SOURCE for s in sources], bool)
    left_out = sorted(s for s, n in counts.items() if n < MIN_PER_SOURCE)
    y = np.asarray(sources, dtype=object)[keep]
    names = sorted(set(y.tolist()))
    if len(names) < 2:
        return {
            "reason": f"needs at least 2 sources with {MIN_PER_SOURCE}+ images",
            "n": int(keep.sum()),
            "left_out": left_out,
        }
    g = np.asarray(groups, dtype=object)[keep]
    x = features[keep] if not hasattr(features, "iloc") else features.iloc[np.flatnonzero(keep)]
    n_folds = int(min(folds, min(Counter(y.tolist()).values()), len(set(g.tolist()))))
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    codes = np.array([names.index(s) for s in y])
    proba = cross_val_predict(make_model(len(codes), n_folds), x, codes, groups=g, cv=cv, method="predict_proba")
    pred = proba.argmax(axis=1)
    try:
        auc = float(
            roc_auc_score(codes, proba[:, 1])
            if len(names) == 2
            else roc_auc_score(codes, proba, multi_class="ovr", average="macro")
        )
    except ValueError:  # a source never in a test fold's positives: no AUC
        auc = None
    return {
        "n": int(len(codes)),
        "sources": names,
        "balanced_accuracy": float(balanced_accuracy_score(codes, pred)),
        "chance": 1.0 / len(names),
        "roc_auc": auc,
        "roc_auc_by_source": {
            name: float(roc_auc_score(codes == j, proba[:, j])) if 0 < np.sum(codes == j) < len(codes) else None
            for j, name in enumerate(names)
        },
        "confusion": confusion_matrix(codes, pred, labels=list(range(len(names)))).tolist(),
        "folds": n_folds,
        "left_out": left_out,
    }


def source_signal(
    column: str,
    features: dict[str, tuple[object, Callable[[int, int], object]]],
    sources: Sequence[str],
    labels: Sequence[int],
    groups: Sequence[str],
    *,
    seed: int = 0,
    folds: int = 5,
) -> dict:
    """The source control for one metadata ``column``: per source its image counts and share of covid, the
    label-source association (Cramér's V), and for each named feature set (``name -> (features, make_model)``,
    rows aligned with ``sources``, ``labels`` and ``groups``) the cross-validated source prediction
    (:func:`predict_source`) over all images and within each class (``all``, ``covid``, ``non``).

    ``flag`` is true when some feature set tells the sources apart within a class (macro ROC AUC >=
    :data:`IMAGE_AUC_FLAG`) and the source is associated with the label (Cramér's V >= :data:`ASSOCIATION_FLAG`)."""
    sources = [str(s) for s in sources]
    labels = [int(y) for y in labels]
    per_source = {}
    for s in sorted(set(sources)):
        ys = [y for src, y in zip(sources, labels) if src == s]
        per_source[s] = {"n": len(ys), "covid": sum(ys), "non": len(ys) - sum(ys), "share_covid": sum(ys) / len(ys)}
    v = cramers_v(sources, labels)
    models = {}
    for name, (x, make_model) in features.items():
        fits = {"all": predict_source(x, sources, groups, make_model, seed=seed, folds=folds)}
        for label, cls in ((1, CLASS_NAMES[1]), (0, CLASS_NAMES[0])):
            idx = np.flatnonzero(np.asarray(labels) == label)
            sub = x.iloc[idx] if hasattr(x, "iloc") else x[idx]
            fits[cls] = predict_source(
                sub, [sources[i] for i in idx], [groups[i] for i in idx], make_model, seed=seed, folds=folds
            )
        models[name] = fits
    within = [
        (name, cls, fit["roc_auc"])
        for name, fits in models.items()
        for cls in CLASS_NAMES
        if (fit := fits[cls]).get("roc_auc") is not None
    ]
    best = max(within, key=lambda t: t[2], default=None)
    return {
        "column": column,
        "n": len(sources),
        "per_source": per_source,
        "label_association": {"cramers_v": v},
        "models": models,
        "strongest_within_class": None if best is None else {"features": best[0], "class": best[1], "roc_auc": best[2]},
        "flag": bool(best is not None and best[2] >= IMAGE_AUC_FLAG and v is not None and v >= ASSOCIATION_FLAG),
        "thresholds": {"roc_auc": IMAGE_AUC_FLAG, "cramers_v": ASSOCIATION_FLAG},
    }


def signal_lines(signal: dict) -> list[str]:
    """The control in a few lines of plain text (stdout)."""
    v = signal["label_association"]["cramers_v"]
    shares = ", ".join(f"{s} {d['covid']}/{d['n']} covid" for s, d in signal["per_source"].items())
    lines = [
        f"source column {signal['column']!r}: {len(signal['per_source'])} sources ({shares}); label-source "
        f"Cramér's V {'n/a' if v is None else f'{v:.2f}'}"
    ]
    for name, fits in signal["models"].items():
        parts = []
        for scope, fit in fits.items():
            if fit.get("reason"):
                parts.append(f"{scope}: n/a ({fit['reason']})")
                continue
            auc = "n/a" if fit["roc_auc"] is None else f"{fit['roc_auc']:.3f}"
            parts.append(
                f"{scope}: balanced accuracy {fit['balanced_accuracy']:.3f} (chance {fit['chance']:.3f}), "
                f"ROC AUC {auc}, n {fit['n']}"
            )
        lines.append(f"  {name} -> source: " + "; ".join(parts))
    return lines


def signal_message(signal: dict) -> str:
    """The warning, when ``signal['flag']``: which features tell the source and how the source relates to the
    label."""
    best, v = signal["strongest_within_class"], signal["label_association"]["cramers_v"]
    return (
        f"the {best['features']} features tell the {signal['column']!r} apart even among {best['class']} images only "
        f"(cross-validated macro ROC AUC {best['roc_auc']:.3f}) and the {signal['column']} is associated with the "
        f"label (Cramér's V {v:.2f}): a model can score by recognising where an image came from"
    )


def plot_confusion(signal: dict, path, scope: str = "all") -> bool:
    """One confusion matrix per feature set (rows true source, columns predicted, row-normalised) of the fit over
    ``scope`` (all, covid, non); False (nothing written) when no fit has one."""
    from matplotlib.figure import Figure

    from .pages import save_figure

    fits = [(name, fits[scope]) for name, fits in signal["models"].items() if "confusion" in fits[scope]]
    if not fits:
        return False
    k = max(len(f["sources"]) for _, f in fits)
    fig = Figure(figsize=(1.2 + (2.2 + 0.45 * k) * len(fits), 1.6 + 0.45 * k), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(fits)))
    for ax, (name, fit) in zip(axes, fits):
        m = np.asarray(fit["confusion"], float)
        share = m / np.maximum(1, m.sum(axis=1, keepdims=True))
        ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{int(m[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black",
                )
        ticks = range(len(fit["sources"]))
        ax.set_xticks(ticks, labels=fit["sources"], rotation=40, ha="right", fontsize=8)
        ax.set_yticks(ticks, labels=fit["sources"], fontsize=8)
        ax.set(
            xlabel="predicted source",
            ylabel="true source",
            title=f"{name}: balanced acc. {fit['balanced_accuracy']:.2f} (chance {fit['chance']:.2f})",
        )
        ax.title.set_fontsize(9)
    fig.suptitle(f"Which {signal['column']}? Cross-validated, {scope} images", fontsize=10)
    save_figure(fig, path)
    return True


def signal_table_html(signal: dict) -> str:
    """The control as an HTML table: one row per feature set and scope, then the sources' share of covid."""
    from .pages import esc

    def cell(fit):
        if fit.get("reason"):
            return f'<td colspan="3">n/a: {esc(fit["reason"])}</td>'
        auc = "—" if fit["roc_auc"] is None else f"{fit['roc_auc']:.3f}"
        return f"<td>{fit['balanced_accuracy']:.3f} (chance {fit['chance']:.3f})</td><td>{auc}</td><td>{fit['n']}</td>"

    rows = [
        "<table><tr><th>features</th><th>images</th><th>balanced accuracy</th><th>macro ROC AUC</th><th>n</th></tr>"
    ]
    for name, fits in signal["models"].items():
        rows += [f"<tr><td>{esc(name)}</td><td>{esc(scope)}</td>{cell(fit)}</tr>" for scope, fit in fits.items()]
    rows.append("</table>")
    v = signal["label_association"]["cramers_v"]
    rows.append(
        f"<p>Label-source association: Cramér's V {'n/a' if v is None else f'{v:.2f}'} (0: the source says nothing "
        "about the label; 1: it gives the label away).</p>"
    )
    rows.append("<table><tr><th>source</th><th>images</th><th>covid</th><th>non</th><th>share covid</th></tr>")
    rows += [
        f"<tr><td>{esc(s)}</td><td>{d['n']}</td><td>{d['covid']}</td><td>{d['non']}</td><td>{d['share_covid']:.0%}</td></tr>"
        for s, d in signal["per_source"].items()
    ]
    rows.append("</table>")
    return "\n".join(rows)
