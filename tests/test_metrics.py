"""Tests for cxr.metrics: hand-computed values, bootstrap behaviour, calibration."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr.metrics import (
    _aucs_from_counts,
    binary_report,
    bootstrap_auc_ci,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    softmax_prob,
    specificity_at_sensitivity,
    subgroup_report,
    to_jsonable,
    wilson_ci,
)

# Hand example used throughout: positives [0.9, 0.8, 0.3], negatives [0.5, 0.2].
Y_HAND = np.array([1, 1, 1, 0, 0])
P_HAND = np.array([0.9, 0.8, 0.3, 0.5, 0.2])


def _synthetic(n_pos: int, n_neg: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos, dtype=int), np.zeros(n_neg, dtype=int)]
    p = np.r_[rng.beta(5, 2, n_pos), rng.beta(2, 5, n_neg)]
    return y, p


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- wilson_ci


def test_wilson_ci_hand_values():
    lo, hi = wilson_ci(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)


def test_wilson_ci_edges():
    lo, hi = wilson_ci(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_ci(10, 10)
    assert hi == 1.0
    assert lo == pytest.approx(1 - 0.2775, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_ci(0, 0))


def test_wilson_ci_wider_at_higher_confidence_and_validates():
    lo95, hi95 = wilson_ci(30, 100)
    lo99, hi99 = wilson_ci(30, 100, confidence=0.99)
    assert lo99 < lo95 < 0.30 < hi95 < hi99
    with pytest.raises(ValueError):
        wilson_ci(11, 10)


# --------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    "target, expected",
    [(1.0, 0.3), (0.98, 0.3), (0.6, 0.8), (2 / 3, 0.8), (1 / 3, 0.9), (0.0, 0.9)],
)
def test_choose_threshold_hand_example(target, expected):
    assert choose_threshold(Y_HAND, P_HAND, target) == expected


def test_choose_threshold_is_highest_threshold_meeting_target():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    p = np.round(rng.random(400), 2)  # plenty of ties
    pos = p[y == 1]
    for target in (0.5, 0.9, 0.95, 0.98, 1.0):
        t = choose_threshold(y, p, target)
        assert t in pos
        assert np.mean(pos >= t) >= target
        higher = pos[pos > t]
        if higher.size:  # the next positive score up no longer reaches the target
            assert np.mean(pos >= higher.min()) < target


def test_choose_threshold_float_tolerance():
    # 0.98 * 50 = 49.00000000000001 in floating point: 49 of 50 positives must suffice.
    y = np.ones(50, dtype=int)
    p = np.linspace(0.02, 1.0, 50)
    assert choose_threshold(y, p, 0.98) == p[1]


def test_choose_threshold_without_positives_raises():
    with pytest.raises(ValueError):
        choose_threshold([0, 0, 0], [0.1, 0.5, 0.9])


def test_specificity_at_sensitivity_hand_example():
    assert specificity_at_sensitivity(Y_HAND, P_HAND, 1.0) == (0.5, 0.3)
    assert specificity_at_sensitivity(Y_HAND, P_HAND, 0.6) == (1.0, 0.8)


# --------------------------------------------------------------------------- binary_report


def test_binary_report_hand_example():
    # threshold 0.4 -> predictions [1, 1, 0, 1, 0]: TP 2, FN 1, FP 1, TN 1
    r = binary_report(Y_HAND, P_HAND, 0.4, n_bootstrap=100)
    json.dumps(r, allow_nan=False)
    assert (r["n"], r["n_positive"], r["n_negative"], r["threshold"]) == (5, 3, 2, 0.4)
    assert r["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 1, "tp": 2}

    sens, spec, fpr = r["sensitivity"], r["specificity"], r["false_positive_rate"]
    assert (sens["k"], sens["n"]) == (2, 3) and sens["value"] == pytest.approx(2 / 3)
    assert sens["ci95"] == pytest.approx(list(wilson_ci(2, 3)))
    assert (spec["k"], spec["n"]) == (1, 2) and spec["value"] == pytest.approx(0.5)
    assert (fpr["k"], fpr["n"]) == (1, 2) and fpr["value"] == pytest.approx(0.5)
    assert fpr["ci95"] == pytest.approx(list(wilson_ci(1, 2)))

    cr = r["classification_report"]
    assert cr["covid"]["precision"] == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert cr["covid"]["recall"] == pytest.approx(2 / 3)
    assert cr["covid"]["f1-score"] == pytest.approx(2 / 3)
    assert cr["covid"]["support"] == 3
    assert cr["non"]["precision"] == pytest.approx(1 / 2)  # TN / (TN + FN)
    assert cr["non"]["recall"] == pytest.approx(1 / 2)
    assert cr["non"]["support"] == 2
    assert cr["accuracy"] == pytest.approx(3 / 5)
    assert cr["macro avg"]["precision"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert cr["weighted avg"]["precision"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2) / 5)

    # AUC by hand: 5 of 6 (pos, neg) pairs ordered correctly; AP = (1 + 1 + 3/4) / 3
    assert r["roc_auc"]["value"] == pytest.approx(5 / 6)
    assert r["pr_auc"]["value"] == pytest.approx(11 / 12)

    sas = r["specificity_at_sensitivity"]
    assert set(sas) == {"0.95", "0.98", "1.0"}
    assert sas["1.0"]["threshold"] == 0.3 and sas["1.0"]["specificity"] == 0.5
    assert sas["0.95"]["threshold"] == 0.3  # ceil(0.95 * 3) = 3 positives needed


def test_binary_report_class_names_and_targets():
    r = binary_report(
        Y_HAND, P_HAND, 0.4, n_bootstrap=0, sensitivity_targets=(0.5,), class_names=("negative", "positive")
    )
    assert set(r["classification_report"]) >= {"negative", "positive"}
    assert r["confusion_matrix_labels"]["order"] == ["negative", "positive"]
    assert r["specificity_at_sensitivity"]["0.5"]["threshold"] == 0.8
    assert r["roc_auc"]["ci95"] == [None, None]  # no resamples asked for


def test_binary_report_curves_thinned():
    y, p = _synthetic(1500, 3500)
    r = binary_report(y, p, 0.5, n_bootstrap=50)
    roc, pr = r["curves"]["roc"], r["curves"]["pr"]
    assert 2 <= len(roc["fpr"]) == len(roc["tpr"]) <= 500
    assert 2 <= len(pr["recall"]) == len(pr["precision"]) <= 500
    assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(roc["fpr"]) >= 0)


@pytest.mark.parametrize("label", [0, 1])
def test_binary_report_single_class(label):
    rng = np.random.default_rng(0)
    y = np.full(40, label)
    p = rng.random(40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = binary_report(y, p, 0.5)
    json.dumps(r, allow_nan=False)
    assert r["roc_auc"] == {"value": None, "ci95": [None, None]}
    assert r["pr_auc"] == {"value": None, "ci95": [None, None]}
    assert r["curves"] is None
    assert all(v["specificity"] is None for v in r["specificity_at_sensitivity"].values())
    present, absent = ("sensitivity", "specificity") if label == 1 else ("specificity", "sensitivity")
    assert r[present]["value"] == pytest.approx(np.mean((p >= 0.5) == bool(label)))
    assert r[present]["ci95"][0] is not None
    assert r[absent] == {"value": None, "ci95": [None, None], "k": 0, "n": 0}
    if label == 1:
        assert r["false_positive_rate"]["value"] is None


def test_binary_report_rejects_bad_input():
    with pytest.raises(ValueError):
        binary_report([0, 2, 1], [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(ValueError):
        binary_report([0, 1, 1], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError):
        binary_report([0, 1], [0.1, 1.2], 0.5)
    with pytest.raises(ValueError):
        binary_report([0, 1], [0.1, float("nan")], 0.5)


def test_to_jsonable_replaces_nan_and_numpy_types():
    out = to_jsonable({"a": np.float32(np.nan), "b": (np.int64(3), np.inf), 4: np.array([1.5])})
    assert out == {"a": None, "b": [3, None], "4": [1.5]}
    json.dumps(out, allow_nan=False)


# --------------------------------------------------------------------------- bootstrap


def test_counts_formula_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(7)
    for _ in range(25):
        y = rng.integers(0, 2, 60)
        y[:2] = [0, 1]
        p = np.round(rng.random(60), 1)  # heavy ties
        w = rng.integers(0, 4, 60)
        w[:2] = 1
        uniq, inv = np.unique(p, return_inverse=True)
        cp = np.bincount(inv[y == 1], weights=w[y == 1], minlength=uniq.size)[None]
        cn = np.bincount(inv[y == 0], weights=w[y == 0], minlength=uniq.size)[None]
        roc, ap = _aucs_from_counts(cp, cn)
        assert roc[0] == pytest.approx(roc_auc_score(y, p, sample_weight=w))
        assert ap[0] == pytest.approx(average_precision_score(y, p, sample_weight=w))


def test_bootstrap_ci_contains_point_and_shrinks_with_more_data():
    y_small, p_small = _synthetic(40, 160, seed=1)
    y_big, p_big = _synthetic(1000, 4000, seed=1)
    r_small = binary_report(y_small, p_small, 0.5, n_bootstrap=500)
    r_big = binary_report(y_big, p_big, 0.5, n_bootstrap=500)
    for r in (r_small, r_big):
        for key in ("roc_auc", "pr_auc"):
            lo, hi = r[key]["ci95"]
            assert lo <= r[key]["value"] <= hi
    width = {k: [r[k]["ci95"][1] - r[k]["ci95"][0] for r in (r_small, r_big)] for k in ("roc_auc", "pr_auc")}
    assert width["roc_auc"][1] < width["roc_auc"][0]
    assert width["pr_auc"][1] < width["pr_auc"][0]


def test_bootstrap_is_seeded():
    y, p = _synthetic(50, 200, seed=2)
    a = bootstrap_auc_ci(y, p, n_bootstrap=200, seed=5)
    b = bootstrap_auc_ci(y, p, n_bootstrap=200, seed=5)
    c = bootstrap_auc_ci(y, p, n_bootstrap=200, seed=6)
    assert a == b
    assert a != c


def test_subgroup_report_hand_example():
    # group a: positives [0.9, 0.3], negatives [0.6, 0.1]; group b: negatives [0.7, 0.2, 0.4]; group c: positive [0.8]
    y = [1, 1, 0, 0, 0, 0, 0, 1]
    p = [0.9, 0.3, 0.6, 0.1, 0.7, 0.2, 0.4, 0.8]
    g = ["a", "a", "a", "a", "b", "b", "b", "c"]
    rows = subgroup_report(y, p, g, threshold=0.5)
    assert [r["group"] for r in rows] == ["a", "b", "c"]
    a, b, c = rows
    assert (a["n"], a["n_positive"], a["n_negative"]) == (4, 2, 2)
    assert a["sensitivity"]["k"] == 1 and a["sensitivity"]["n"] == 2 and a["sensitivity"]["value"] == 0.5
    assert a["sensitivity"]["ci95"] == pytest.approx(list(wilson_ci(1, 2)))
    assert a["false_positive_rate"]["k"] == 1 and a["false_positive_rate"]["value"] == 0.5
    assert a["roc_auc"] == pytest.approx(0.75)  # pairs (0.9>0.6, 0.9>0.1, 0.3<0.6, 0.3>0.1): 3 of 4
    assert b["sensitivity"] is None and b["roc_auc"] is None
    assert b["false_positive_rate"]["k"] == 1 and b["false_positive_rate"]["n"] == 3
    assert c["false_positive_rate"] is None and c["sensitivity"]["value"] == 1.0
    assert a["specificity"]["k"] == 1 and a["specificity"]["ci95"] == pytest.approx(list(wilson_ci(1, 2)))
    assert b["specificity"]["k"] == 2 and b["specificity"]["n"] == 3 and c["specificity"] is None
    assert a["roc_auc_ci95"] == [None, None] and b["roc_auc_ci95"] == [None, None]  # no resamples / one class
    assert json.loads(json.dumps(rows)) == rows
    # with resamples: each group's interval is the bootstrap of that group alone
    booted = subgroup_report(y, p, g, threshold=0.5, n_bootstrap=200, seed=3)
    assert booted[0]["roc_auc_ci95"] == pytest.approx(
        list(bootstrap_auc_ci(y[:4], p[:4], n_bootstrap=200, seed=3)["roc_auc"])
    )
    assert booted[1]["roc_auc_ci95"] == [None, None] and booted[2]["roc_auc_ci95"] == [None, None]


def test_subgroup_report_rejects_misaligned_groups():
    with pytest.raises(ValueError, match="groups has 2 entries for 5"):
        subgroup_report(Y_HAND, P_HAND, ["a", "b"], 0.5)


# --------------------------------------------------------------------------- calibration


def test_ece_hand_example():
    y = [0, 1, 1, 1]
    p = [0.2, 0.2, 0.8, 0.8]
    # positive form: bin(0.2): |0.5 - 0.2| * 1/2, bin(0.8): |1.0 - 0.8| * 1/2
    assert expected_calibration_error(y, p, n_bins=5) == pytest.approx(0.25)
    # confidence form: all confidences 0.8, accuracy 3/4
    assert expected_calibration_error(y, p, n_bins=5, form="confidence") == pytest.approx(0.05)


def test_ece_calibrated_small_overconfident_large_and_temperature_fixes_it():
    rng = np.random.default_rng(0)
    n = 20_000
    true_logit = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < _sigmoid(true_logit)).astype(int)

    calibrated = _sigmoid(true_logit)
    assert expected_calibration_error(y, calibrated) < 0.02
    assert expected_calibration_error(y, calibrated, form="confidence") < 0.02

    logits = np.stack([np.zeros(n), 5.0 * true_logit], axis=1)  # overconfident x5
    over = softmax_prob(logits)
    ece_over = expected_calibration_error(y, over)
    assert ece_over > 0.1
    assert expected_calibration_error(y, over, form="confidence") > 0.1

    t = fit_temperature(logits, y)
    assert t > 1.0
    assert t == pytest.approx(5.0, rel=0.1)
    ece_fixed = expected_calibration_error(y, softmax_prob(logits, t))
    assert ece_fixed < 0.03 < ece_over


def test_fit_temperature_underconfident_and_1d_logits():
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 3.0, 5000)
    y = (rng.random(5000) < _sigmoid(z)).astype(int)
    t_under = fit_temperature(np.stack([np.zeros_like(z), z / 3.0], axis=1), y)
    assert t_under < 1.0
    assert t_under == pytest.approx(1 / 3, rel=0.15)
    # a 1-D array is read as binary logits [0, z]
    assert fit_temperature(z / 3.0, y) == pytest.approx(t_under, rel=1e-4)
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((3, 3)), [0, 1, 0])
