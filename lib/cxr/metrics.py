"""Evaluation metrics for the binary COVID-19 / non-COVID chest X-ray task.

Conventions used throughout this module:

* ``y_true`` holds labels ``1`` = "covid" (positive) and ``0`` = "non" (negative);
  booleans are accepted too.
* ``prob`` holds the predicted probability of *covid* (the positive class), in [0, 1].
* A prediction is positive when ``prob >= threshold``.

Everything here is plain functions: no I/O, no global state, numpy + scikit-learn
(+ scipy, which scikit-learn depends on).  :func:`binary_report` returns a dict that
``json.dumps`` accepts as is (plain ``int``/``float``/``str``/``list``/``dict``,
NaN and infinities replaced by ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.stats import norm
from sklearn.metrics import (
    average_precision_score,
    classification_report,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

__all__ = [
    "wilson_ci",
    "choose_threshold",
    "specificity_at_sensitivity",
    "expected_calibration_error",
    "fit_temperature",
    "softmax_prob",
    "bootstrap_auc_ci",
    "binary_report",
    "subgroup_report",
    "to_jsonable",
]

#: Most points kept per curve in ``binary_report(...)["curves"]``.
MAX_CURVE_POINTS = 500


# --------------------------------------------------------------------------- helpers


def _as_labels(y_true: Any) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.dtype == bool:
        return y.astype(np.int64)
    if y.size and not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"y_true must hold 0/1 labels, got dtype {y.dtype}")
    if y.size and not np.all((y == 0) | (y == 1)):
        bad = np.unique(y[(y != 0) & (y != 1)])[:5]
        raise ValueError(f"y_true must hold only 0 (non) and 1 (covid); found {bad.tolist()}")
    return y.astype(np.int64)


def _as_probs(prob: Any, n: int | None = None) -> np.ndarray:
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"prob must be 1-D (probability of covid), got shape {p.shape}")
    if n is not None and p.shape[0] != n:
        raise ValueError(f"y_true and prob differ in length: {n} != {p.shape[0]}")
    if not np.all(np.isfinite(p)):
        raise ValueError("prob contains NaN or infinite values")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("prob must lie in [0, 1] (probability of the positive class)")
    return p


def as_label_and_prob(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) as checked arrays of one length: labels 0/1, probabilities finite in [0, 1]."""
    y = _as_labels(y_true)
    return y, _as_probs(prob, y.shape[0])


def _ratio(k: int, n: int) -> float:
    return k / n if n else math.nan


def to_jsonable(obj: Any) -> Any:
    """Recursively convert ``obj`` to plain JSON types; NaN/inf become ``None``.

    numpy scalars and arrays become Python numbers and lists, tuples become lists and
    mapping keys become strings.  Anything else unknown becomes ``str(obj)``.
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    return str(obj)


# --------------------------------------------------------------------------- proportions


def wilson_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n``.

    Returns ``(lower, upper)``, clipped to [0, 1]; exactly 0 when ``k == 0`` and exactly 1
    when ``k == n``.  ``n == 0`` gives ``(nan, nan)``.
    """
    k, n = int(k), int(n)
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return (math.nan, math.nan)
    z = float(norm.ppf(0.5 + confidence / 2.0))
    z2 = z * z
    p = k / n
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


# --------------------------------------------------------------------------- thresholds


def choose_threshold(y_true: Any, prob: Any, target_sensitivity: float = 0.98) -> float:
    """Highest threshold ``t`` with ``sensitivity(prob >= t) >= target_sensitivity``.

    ``t`` is always one of the positive scores: the ``ceil(target * P)``-th largest
    (at least the 1st).  Ties are harmless because ``>=`` keeps every tied score.
    Raises ``ValueError`` when ``y_true`` has no positives.
    """
    y, p = as_label_and_prob(y_true, prob)
    if not 0.0 <= target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in [0, 1], got {target_sensitivity}")
    pos = np.sort(p[y == 1])[::-1]
    if pos.size == 0:
        raise ValueError("choose_threshold needs at least one positive (covid) example")
    # Tolerance so that e.g. 0.98 * 50 = 49.000000000000007 needs 49 positives, not 50.
    k = math.ceil(target_sensitivity * pos.size - 1e-9)
    k = min(max(k, 1), pos.size)
    return float(pos[k - 1])


def specificity_at_sensitivity(y_true: Any, prob: Any, target: float) -> tuple[float, float]:
    """``(specificity, threshold)`` at the threshold from :func:`choose_threshold`.

    Specificity is NaN when there are no negatives; raises ``ValueError`` (from
    :func:`choose_threshold`) when there are no positives.
    """
    y, p = as_label_and_prob(y_true, prob)
    t = choose_threshold(y, p, target)
    neg = p[y == 0]
    spec = float(np.mean(neg < t)) if neg.size else math.nan
    return (spec, t)


# --------------------------------------------------------------------------- calibration


def expected_calibration_error(y_true: Any, prob: Any, n_bins: int = 15, *, form: str = "positive") -> float:
    """Expected calibration error with ``n_bins`` equal-width bins on [0, 1].

    ``form="positive"`` (default): the *positive-class reliability* form, i.e. the gap a
    reliability diagram of P(covid) shows::

        ECE = sum_b (|B_b| / N) * | mean(y in B_b) - mean(prob in B_b) |

    with samples binned by ``prob`` (the covid probability).

    ``form="confidence"``: the Guo et al. (2017) confidence/accuracy form on the top-label
    confidence ``max(p, 1 - p)``, accuracy being whether ``(p >= 0.5) == y``.  Confidences
    lie in [0.5, 1], so only the upper half of the bins is used.

    Bin ``b`` covers ``[b/n_bins, (b+1)/n_bins)``, the last bin also includes 1.0.
    Returns NaN for empty input.
    """
    y, p = as_label_and_prob(y_true, prob)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if y.size == 0:
        return math.nan
    if form == "positive":
        score, outcome = p, y.astype(np.float64)
    elif form == "confidence":
        pred = (p >= 0.5).astype(np.int64)
        score = np.maximum(p, 1.0 - p)
        outcome = (pred == y).astype(np.float64)
    else:
        raise ValueError(f"form must be 'positive' or 'confidence', got {form!r}")
    idx = np.minimum((score * n_bins).astype(np.int64), n_bins - 1)
    sum_score = np.bincount(idx, weights=score, minlength=n_bins)
    sum_outcome = np.bincount(idx, weights=outcome, minlength=n_bins)
    # sum_b |B_b|/N * |mean_out - mean_score| == sum_b |sum_out - sum_score| / N
    return float(np.sum(np.abs(sum_outcome - sum_score)) / y.size)


def _two_class_logits(logits: Any) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:  # a single binary logit per sample == logits [0, z]
        z = np.stack([np.zeros_like(z), z], axis=1)
    if z.ndim != 2 or z.shape[1] != 2:
        raise ValueError(f"logits must have shape (N, 2) (or (N,) binary logits), got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinite values")
    return z


def softmax_prob(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Probability of covid (class 1) from ``(N, 2)`` logits divided by ``temperature``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _two_class_logits(logits)
    return np.exp(log_softmax(z / temperature, axis=1)[:, 1])


def fit_temperature(logits: Any, y_true: Any, *, bounds: tuple[float, float] = (0.01, 100.0)) -> float:
    """Temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` on ``y_true``.

    ``logits`` has shape ``(N, 2)`` (column 1 = covid); a 1-D array is read as binary
    logits ``[0, z]``.  The NLL is convex in the inverse temperature ``1/T``, so a bounded
    1-D Brent search over ``1/T`` in ``[1/bounds[1], 1/bounds[0]]`` finds the optimum
    (clipped to ``bounds`` when it lies outside, e.g. perfectly separable data).
    ``T > 1`` softens overconfident logits, ``T < 1`` sharpens underconfident ones.
    """
    z = _two_class_logits(logits)
    y = _as_labels(y_true)
    if y.shape[0] != z.shape[0]:
        raise ValueError(f"logits and y_true differ in length: {z.shape[0]} != {y.shape[0]}")
    if y.size == 0:
        raise ValueError("fit_temperature needs at least one example")
    t_lo, t_hi = bounds
    if not 0 < t_lo < t_hi:
        raise ValueError(f"bounds must satisfy 0 < lo < hi, got {bounds}")
    rows = np.arange(y.size)

    def nll(beta: float) -> float:
        return float(-np.mean(log_softmax(z * beta, axis=1)[rows, y]))

    res = minimize_scalar(nll, bounds=(1.0 / t_hi, 1.0 / t_lo), method="bounded", options={"xatol": 1e-6})
    beta = float(res.x)
    return float(min(max(1.0 / beta, t_lo), t_hi))


# --------------------------------------------------------------------------- AUC bootstrap


def _aucs_from_counts(cp: np.ndarray, cn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and average precision from per-distinct-score counts.

    ``cp[b, j]`` / ``cn[b, j]`` count positives / negatives of resample ``b`` whose score
    is the ``j``-th smallest distinct score.  Equals sklearn's ``roc_auc_score`` and
    ``average_precision_score`` on the expanded data (ties included).
    """
    n_pos = cp.sum(axis=1)
    n_neg = cn.sum(axis=1)
    # ROC AUC = P(s_pos > s_neg) + 1/2 P(s_pos == s_neg)
    neg_below = np.cumsum(cn, axis=1) - cn
    roc = (cp * (neg_below + 0.5 * cn)).sum(axis=1) / (n_pos * n_neg)
    # AP = sum over distinct scores s of (#pos at s / P) * precision(threshold s)
    tp = np.cumsum(cp[:, ::-1], axis=1)[:, ::-1]
    fp = np.cumsum(cn[:, ::-1], axis=1)[:, ::-1]
    denom = tp + fp
    prec = np.divide(tp, denom, out=np.zeros(tp.shape), where=denom > 0)
    ap = (cp * prec).sum(axis=1) / n_pos
    return roc, ap


def _bootstrap_aucs(y: np.ndarray, p: np.ndarray, n_bootstrap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and average precision for ``n_bootstrap`` stratified resamples.

    Positives and negatives are resampled separately (with replacement, sizes kept), so
    every resample has both classes.  Scores are replaced by their rank among the distinct
    scores; each resample is then a histogram of counts per distinct score, from which
    both statistics follow by cumulative sums (ties handled as scikit-learn does:
    ROC AUC counts a tie as 1/2, average precision treats tied scores as one threshold).
    """
    uniq, inv = np.unique(p, return_inverse=True)
    u = uniq.size
    r_pos, r_neg = inv[y == 1], inv[y == 0]
    n_pos, n_neg = r_pos.size, r_neg.size
    rng = np.random.default_rng(seed)
    roc = np.empty(n_bootstrap)
    ap = np.empty(n_bootstrap)
    chunk = int(max(1, min(n_bootstrap, 4_000_000 // max(u, n_pos, n_neg, 1))))
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        offs = (np.arange(b) * u)[:, None]
        cp = np.bincount((offs + r_pos[rng.integers(0, n_pos, size=(b, n_pos))]).ravel(), minlength=b * u).reshape(b, u)
        cn = np.bincount((offs + r_neg[rng.integers(0, n_neg, size=(b, n_neg))]).ravel(), minlength=b * u).reshape(b, u)
        roc[start : start + b], ap[start : start + b] = _aucs_from_counts(cp, cn)
    return roc, ap


def bootstrap_auc_ci(
    y_true: Any, prob: Any, *, n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Stratified-bootstrap percentile intervals for ROC AUC and average precision.

    Returns ``{"roc_auc": (lo, hi), "pr_auc": (lo, hi)}``; ``(nan, nan)`` when only one
    class is present or ``n_bootstrap == 0``.
    """
    y, p = as_label_and_prob(y_true, prob)
    nan2 = (math.nan, math.nan)
    if n_bootstrap <= 0 or not (np.any(y == 1) and np.any(y == 0)):
        return {"roc_auc": nan2, "pr_auc": nan2}
    roc, ap = _bootstrap_aucs(y, p, int(n_bootstrap), seed)
    alpha = (1.0 - confidence) / 2.0
    q = [100.0 * alpha, 100.0 * (1.0 - alpha)]
    lo_r, hi_r = np.percentile(roc, q)
    lo_a, hi_a = np.percentile(ap, q)
    return {"roc_auc": (float(lo_r), float(hi_r)), "pr_auc": (float(lo_a), float(hi_a))}


# --------------------------------------------------------------------------- report


def _thin(*arrays: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> list[np.ndarray]:
    """Keep at most ``max_points`` evenly spaced points (always the first and last)."""
    m = arrays[0].size
    if m <= max_points:
        return list(arrays)
    keep = np.unique(np.round(np.linspace(0, m - 1, max_points)).astype(np.int64))
    return [a[keep] for a in arrays]


def _proportion(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_ci(k, n)
    return {"value": _ratio(k, n), "ci95": [lo, hi], "k": int(k), "n": int(n)}


def _target_key(t: float) -> str:
    return str(float(t))


def binary_report(
    y_true: Any,
    prob: Any,
    threshold: float,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    sensitivity_targets: Iterable[float] = (0.95, 0.98, 1.0),
    class_names: Sequence[str] = ("non", "covid"),
) -> dict[str, Any]:
    """Everything needed to judge the classifier at ``threshold`` on one evaluation set.

    The result is JSON-serialisable (NaN -> ``None``).  Keys:

    * ``n``, ``n_positive``, ``n_negative``, ``threshold``, ``class_names``;
    * ``confusion_matrix``: ``{"tn", "fp", "fn", "tp"}``; ``confusion_matrix_labels``:
      ``{"rows": "true", "cols": "predicted", "order": class_names}`` (sklearn's layout
      ``[[tn, fp], [fn, tp]]``);
    * ``classification_report``: sklearn's ``output_dict`` with ``labels=[0, 1]``,
      ``target_names=class_names``, ``zero_division=0`` (so a class absent from
      ``y_true`` shows support 0 and recall 0 there, as sklearn reports it);
    * ``sensitivity``, ``specificity``, ``false_positive_rate``: ``{"value", "ci95",
      "k", "n"}`` with Wilson 95% intervals; ``None`` values when the class is absent;
    * ``roc_auc``, ``pr_auc`` (average precision): ``{"value", "ci95"}``, stratified
      bootstrap percentile intervals (``bootstrap`` records how);
    * ``specificity_at_sensitivity``: ``{str(target): {"specificity", "threshold",
      "sensitivity"}}`` (``sensitivity`` is the one achieved, >= target);
    * ``curves``: ``{"roc": {"fpr", "tpr"}, "pr": {"recall", "precision"}}`` thinned to
      at most ``MAX_CURVE_POINTS`` points, or ``None`` with one class only.

    With only one class present (e.g. an external COVID-only set) the AUCs, curves,
    operating points and the absent class's rates are ``None``; nothing raises or warns.

    Long on purpose: it assembles one flat dict, key by key, in the order documented above; each figure is a
    call."""
    y, p = as_label_and_prob(y_true, prob)
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    class_names = [str(c) for c in class_names]
    if len(class_names) != 2:
        raise ValueError(f"class_names must have two entries (non, covid), got {class_names}")
    if y.size == 0:
        raise ValueError("binary_report needs at least one example")

    n_pos = int(np.sum(y == 1))
    n_neg = int(y.size - n_pos)
    both = n_pos > 0 and n_neg > 0
    pred = (p >= threshold).astype(np.int64)

    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    cls_rep = classification_report(y, pred, labels=[0, 1], target_names=class_names, output_dict=True, zero_division=0)

    if both:
        roc_value = float(roc_auc_score(y, p))
        pr_value = float(average_precision_score(y, p))
        ci = bootstrap_auc_ci(y, p, n_bootstrap=n_bootstrap, seed=seed)
        fpr, tpr, _ = roc_curve(y, p)
        precision, recall, _ = precision_recall_curve(y, p)
        fpr, tpr = _thin(fpr, tpr)
        recall, precision = _thin(recall, precision)
        curves: dict[str, Any] | None = {
            "roc": {"fpr": fpr, "tpr": tpr},
            "pr": {"recall": recall, "precision": precision},
        }
    else:
        roc_value = pr_value = math.nan
        ci = {"roc_auc": (math.nan, math.nan), "pr_auc": (math.nan, math.nan)}
        curves = None

    spec_at_sens: dict[str, Any] = {}
    for target in sensitivity_targets:
        target = float(target)
        if both:
            spec, t = specificity_at_sensitivity(y, p, target)
            achieved = float(np.mean(p[y == 1] >= t))
            spec_at_sens[_target_key(target)] = {"specificity": spec, "threshold": t, "sensitivity": achieved}
        else:
            spec_at_sens[_target_key(target)] = {"specificity": None, "threshold": None, "sensitivity": None}

    report = {
        "n": int(y.size),
        "n_positive": n_pos,
        "n_negative": n_neg,
        "threshold": threshold,
        "class_names": class_names,
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "confusion_matrix_labels": {
            "rows": "true",
            "cols": "predicted",
            "order": class_names,
            "layout": [["tn", "fp"], ["fn", "tp"]],
        },
        "classification_report": cls_rep,
        "sensitivity": _proportion(tp, tp + fn),
        "specificity": _proportion(tn, tn + fp),
        "false_positive_rate": _proportion(fp, tn + fp),
        "roc_auc": {"value": roc_value, "ci95": list(ci["roc_auc"])},
        "pr_auc": {"value": pr_value, "ci95": list(ci["pr_auc"])},
        "bootstrap": {
            "n_resamples": int(n_bootstrap) if both else 0,
            "seed": int(seed),
            "method": "stratified percentile",
            "confidence": 0.95,
        },
        "specificity_at_sensitivity": spec_at_sens,
        "curves": curves,
    }
    return to_jsonable(report)


def subgroup_report(
    y_true: Any, prob: Any, groups: Sequence[Any], threshold: float, *, n_bootstrap: int = 0, seed: int = 0
) -> list[dict[str, Any]]:
    """The model's rates at ``threshold`` within each subgroup (hidden stratification).

    One aggregate figure can hide a subgroup on which the model fails, e.g. normal X-rays of one finding
    or one hospital that it flags far more often than the rest. One entry per distinct value of
    ``groups`` (aligned with ``y_true``/``prob``), sorted by group name: ``group``, ``n``,
    ``n_positive``, ``n_negative``; ``sensitivity``, ``specificity`` and ``false_positive_rate`` as
    ``{"value", "ci95", "k", "n"}`` (Wilson 95%), ``None`` where the group has no example of that class;
    ``roc_auc`` (a float) where the group has both classes, else ``None``, and ``roc_auc_ci95``, its
    stratified bootstrap interval from ``n_bootstrap`` resamples (``[None, None]`` without resamples or
    without both classes). JSON-serialisable like :func:`binary_report`.
    """
    y, p = as_label_and_prob(y_true, prob)
    g = np.asarray([str(v) for v in groups], dtype=object)
    if g.size != y.size:
        raise ValueError(f"groups has {g.size} entries for {y.size} examples")
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    pred = p >= threshold
    out = []
    for name in sorted(set(g.tolist())):
        m = g == name
        pos, neg = m & (y == 1), m & (y == 0)
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        both = n_pos and n_neg
        ci = bootstrap_auc_ci(y[m], p[m], n_bootstrap=n_bootstrap, seed=seed)["roc_auc"] if both else (None, None)
        out.append(
            {
                "group": name,
                "n": n_pos + n_neg,
                "n_positive": n_pos,
                "n_negative": n_neg,
                "sensitivity": _proportion(int(pred[pos].sum()), n_pos) if n_pos else None,
                "specificity": _proportion(int((~pred[neg]).sum()), n_neg) if n_neg else None,
                "false_positive_rate": _proportion(int(pred[neg].sum()), n_neg) if n_neg else None,
                "roc_auc": float(roc_auc_score(y[m], p[m])) if both else None,
                "roc_auc_ci95": list(ci),
            }
        )
    return to_jsonable(out)
