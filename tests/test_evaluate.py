"""The evaluate job: the score pipeline joined with labels, and a report whose numbers are right."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_labelled_tree, run_job

from cxr.evaluate import evaluate

pytestmark = pytest.mark.timeout(300)


def test_report_numbers_match_the_predictions(ray_driver, trained_model, tmp_path):
    data = make_labelled_tree(tmp_path / "data", n=15, seed=3, layout="test")
    (data / "test" / "non" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "report"
    result = evaluate([str(data)], trained_model.output, str(out), n_bootstrap=200)
    pred = pq.read_table(out / "predictions.parquet").to_pandas()
    assert len(pred) == 31 and result.errors == 1
    ok = pred[pred["error"].isna()]
    t = result.report["threshold"]
    assert t == pytest.approx(trained_model.threshold)
    tp = int(((ok.label == 1) & (ok.prob_covid >= t)).sum())
    tn = int(((ok.label == 0) & (ok.prob_covid < t)).sum())
    r = json.loads((out / "report.json").read_text())
    assert r["confusion_matrix"]["tp"] == tp and r["confusion_matrix"]["tn"] == tn
    assert r["sensitivity"]["value"] == pytest.approx(tp / 15) and r["specificity"]["value"] == pytest.approx(tn / 15)
    lo, hi = r["sensitivity"]["ci95"]
    assert lo <= r["sensitivity"]["value"] <= hi
    assert r["classification_report"]["covid"]["support"] == 15 and r["classification_report"]["non"]["support"] == 15
    assert r["extra"]["unreadable_files"] == 1 and "corrupt.png" in r["extra"]["unreadable_examples"]
    for name in ("report.html", "roc.png", "pr.png", "histogram.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 1000, name
    html = (out / "report.html").read_text()
    assert "Sensitivity" in html and "data:image/png;base64" in html


def test_single_class_external_folder_gives_sensitivity_only(ray_driver, trained_model, tmp_path):
    data = make_labelled_tree(tmp_path / "ext", n=10, seed=5, layout="")
    out = tmp_path / "report"
    proc = run_job("evaluate.py", "--data", str(data / "covid"), "--model", trained_model.output, "--output", str(out),
                   "--bootstrap", "50", env={"RAY_ADDRESS": ray_driver.address})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluated 10 images (10 covid, 0 non" in proc.stdout
    r = json.loads((out / "report.json").read_text())
    assert r["specificity"]["value"] is None and r["roc_auc"]["value"] is None
    assert r["sensitivity"]["n"] == 10 and not (out / "roc.png").exists()
    prob = pq.read_table(out / "predictions.parquet")["prob_covid"].to_numpy()
    assert r["sensitivity"]["k"] == int(np.sum(prob >= r["threshold"]))


def test_a_missing_split_is_an_error_not_a_fallback_to_training_images(tiny_model, tmp_path):
    from cxr.sources import InputError

    data = make_labelled_tree(tmp_path / "data", n=2, layout="train")  # no test/ folder
    with pytest.raises(InputError, match="no 'test' split folder"):
        evaluate([str(data)], tiny_model, str(tmp_path / "report"), split="test")
    assert not (tmp_path / "report" / "report.json").exists()
