"""Tests for cxr.report.write_report: files, PNG validity, JSON and HTML content."""

from __future__ import annotations

import base64
import html
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from cxr.metrics import binary_report, to_jsonable
from cxr.report import write_report

Image = pytest.importorskip("PIL.Image")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script>"


def _data(n_pos: int = 100, n_neg: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos, dtype=int), np.zeros(n_neg, dtype=int)]
    p = np.r_[rng.beta(6, 2, n_pos), rng.beta(2, 6, n_neg)]
    return y, p


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    y, p = _data()
    report = binary_report(y, p, 0.5, n_bootstrap=200)
    out = tmp_path_factory.mktemp("rep") / "nested" / "out"  # created by write_report
    extra = {"model": "densenet121", "note": EVIL, EVIL: 1, "config": {"lr": 1e-3}}
    paths = write_report(report, y, p, out, title="Internal <test> & set", extra=extra)
    return report, extra, paths, out


def _check_png(path: str, min_side: int = 250) -> bytes:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert im.format == "PNG"
        assert min_side <= w <= 3000 and min_side <= h <= 3000
        assert im.convert("L").getextrema()[0] < 128  # something dark was drawn
    return data


def test_files_written(written):
    _, _, paths, out = written
    assert set(paths) == {"roc", "pr", "histogram", "confusion_matrix", "report_json", "report_html"}
    names = {
        "roc": "roc.png",
        "pr": "pr.png",
        "histogram": "histogram.png",
        "confusion_matrix": "confusion_matrix.png",
        "report_json": "report.json",
        "report_html": "report.html",
    }
    for key, name in names.items():
        assert paths[key] == str(out / name)
        assert (out / name).is_file() and (out / name).stat().st_size > 0


def test_pngs_are_valid(written):
    _, _, paths, _ = written
    for key in ("roc", "pr", "histogram", "confusion_matrix"):
        _check_png(paths[key])


def test_json_is_report_plus_extra(written):
    report, extra, paths, _ = written
    text = Path(paths["report_json"]).read_text(encoding="utf-8")
    assert text.startswith("{\n  ")  # pretty-printed
    loaded = json.loads(text)
    assert loaded["extra"] == to_jsonable(extra)
    assert {k: v for k, v in loaded.items() if k != "extra"} == report


def test_html_key_numbers_images_and_escaping(written):
    report, _, paths, _ = written
    page = Path(paths["report_html"]).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")

    # title escaped
    assert "Internal &lt;test&gt; &amp; set" in page
    assert "Internal <test>" not in page

    # key numbers with their intervals
    def pct(x):
        return f"{100 * x:.1f}%"

    for key in ("sensitivity", "specificity"):
        d = report[key]
        assert pct(d["value"]) in page
        assert f"{pct(d['ci95'][0])}–{pct(d['ci95'][1])}" in page
        assert f"{d['k']}/{d['n']}" in page
    for key in ("roc_auc", "pr_auc"):
        d = report[key]
        assert f"{d['value']:.3f}" in page
        assert f"{d['ci95'][0]:.3f}–{d['ci95'][1]:.3f}" in page
    assert "0.5000" in page  # threshold

    # classification report table and specificity at sensitivity targets
    cr = report["classification_report"]
    for row in ("non", "covid", "macro avg", "weighted avg", "accuracy"):
        assert f"<td>{row}</td>" in page
    assert f"<td>{cr['covid']['precision']:.3f}</td>" in page
    for d in report["specificity_at_sensitivity"].values():
        assert f"{d['threshold']:.4f}" in page
        assert pct(d["specificity"]) in page

    # images embedded as data URIs, identical to the files on disk
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 4
    embedded = {base64.b64decode(u) for u in uris}
    for key in ("roc", "pr", "histogram", "confusion_matrix"):
        assert Path(paths[key]).read_bytes() in embedded
    assert 'src="roc.png"' not in page and "file:" not in page

    # extra shown as a key/value table, everything escaped
    assert "<script" not in page.lower()
    assert html.escape(EVIL, quote=True) in page
    assert "densenet121" in page
    assert html.escape('{"lr": 0.001}', quote=True) in page


def test_single_class_report(tmp_path):
    rng = np.random.default_rng(1)
    y = np.ones(60, dtype=int)
    p = rng.random(60)
    (tmp_path / "roc.png").write_bytes(b"stale")  # from an earlier two-class run
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = binary_report(y, p, 0.5)
        paths = write_report(report, y, p, tmp_path, title="External COVID-only")
    assert set(paths) == {"histogram", "confusion_matrix", "report_json", "report_html"}
    assert not (tmp_path / "roc.png").exists() and not (tmp_path / "pr.png").exists()
    for key in ("histogram", "confusion_matrix"):
        _check_png(paths[key])
    page = Path(paths["report_html"]).read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2
    assert f"{100 * report['sensitivity']['value']:.1f}%" in page
    assert "n/a" in page
    loaded = json.loads(Path(paths["report_json"]).read_text(encoding="utf-8"))
    assert loaded["roc_auc"]["value"] is None and "extra" not in loaded


def test_length_mismatch_rejected(tmp_path):
    y, p = _data(10, 20)
    report = binary_report(y, p, 0.5, n_bootstrap=10)
    with pytest.raises(ValueError):
        write_report(report, y[:-1], p[:-1], tmp_path)


def test_figures_by_metadata_columns(tmp_path):
    from cxr.metrics import subgroup_report

    y, p = _data(40, 60, seed=2)
    source = np.where(np.arange(100) % 2, "site <A>", "siteB")
    view = np.where(y == 1, "PA", "AP")  # each view one class: rates, no AUC
    report = binary_report(y, p, 0.5, n_bootstrap=50)
    by = {
        column: {"by": column, "groups": subgroup_report(y, p, values, 0.5, n_bootstrap=50)}
        for column, values in (("source", source), ("view", view))
    }
    (tmp_path / "by-site.png").write_bytes(b"stale")  # a column of an earlier run
    paths = write_report(report, y, p, tmp_path, by=by)
    assert not (tmp_path / "by-site.png").exists()
    for column in ("source", "view"):
        assert paths[f"by_{column}"] == str(tmp_path / f"by-{column}.png")
        _check_png(paths[f"by_{column}"])
    loaded = json.loads(Path(paths["report_json"]).read_text(encoding="utf-8"))
    assert loaded["by"] == by and "subgroups" not in loaded
    a = {g["group"]: g for g in loaded["by"]["source"]["groups"]}["site <A>"]
    lo, hi = a["roc_auc_ci95"]
    assert lo < a["roc_auc"] < hi and a["specificity"]["n"] == 30
    page = Path(paths["report_html"]).read_text(encoding="utf-8")
    assert "<h2>By source</h2>" in page and "<h2>By view</h2>" in page and "<td>site &lt;A&gt;</td>" in page
    assert f"{a['roc_auc']:.3f} 95% CI {lo:.3f}–{hi:.3f}" in page
    assert page.count("data:image/png;base64,") == 6  # roc, pr, histogram, confusion, by-source, by-view
