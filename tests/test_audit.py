"""End to end on a real (tiny) checkpoint that learned a planted shortcut: a bright square in the top-left
corner of every COVID image. The audit must flag it, and the explain and score jobs must explain it."""

from __future__ import annotations

import json
from html import escape

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxr.audit import audit
from cxr.explain import versus_threshold
from support.images import dicom_bytes, xray_like
from support.jobs import run_job
from support.planted import marker_tree, train_tiny

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


@pytest.fixture(scope="module")
def corner_model(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("corner")
    return train_tiny(root / "train", str(root / "model"), cue="marker")


def test_audit_flags_a_model_that_learned_a_corner_marker(ray_driver, corner_model, tmp_path):
    internal = marker_tree(tmp_path / "hospital-a", 8, 128, seed=1, cue="marker")  # same source as training
    same_source = marker_tree(tmp_path / "hospital-a-2025", 8, 128, seed=2, cue="marker")
    elsewhere = marker_tree(tmp_path / "hospital-b", 8, 128, seed=3, cue="finding")  # real finding, no marker
    out = tmp_path / "audit"
    (out / "heatmaps").mkdir(parents=True)
    (out / "heatmaps" / "stale.png").write_bytes(b"from an earlier run")  # overwrite: emptied first, no stale heatmaps
    result = audit(
        corner_model,
        str(internal),
        [str(same_source), str(elsewhere)],
        str(out),
        n_bootstrap=50,
        heatmaps_per_class=1,
        overwrite=True,
    )
    r = json.loads((out / "report.json").read_text())
    sets = r["sets"]
    assert list(sets) == ["hospital-a", "hospital-a-2025", "hospital-b"] and r["internal"] == "hospital-a"
    assert sets["hospital-a"]["sensitivity"]["value"] == 1.0 and sets["hospital-a-2025"]["sensitivity"]["value"] >= 0.85
    assert sets["hospital-b"]["sensitivity"]["value"] <= 0.25
    problems = result.report["verdict"]["problems"]
    assert not result.report["verdict"]["trustworthy"] and "Do not trust" in result.line()
    assert any(p.startswith("On hospital-b it finds COVID-19 far less often") for p in problems)
    assert not any("hospital-a-2025" in p for p in problems)  # same source: no false alarm
    # the flat bright square also makes the files compress better: file size alone gives the marker away
    assert r["metadata_baseline"]["auc"] > 0.9 and r["metadata_baseline"]["top_features"][0][0] in (
        "log_size_bytes",
        "bytes_per_pixel",
    )
    assert any(p.startswith("The internal data has a shortcut: file properties alone") for p in problems)
    pred = pq.read_table(out / "predictions.parquet").to_pandas()
    assert len(pred) == 48 and pred["focus"].dropna().between(0, 1).all()
    assert sets["hospital-a"]["focus"]["covid"]["n"] == 8
    shown = pred.dropna(subset=["heatmap"])
    assert len(shown) == 6 and all((out / h).stat().st_size > 1000 for h in shown["heatmap"])
    assert len(list((out / "heatmaps").iterdir())) == 6
    html = (out / "report.html").read_text()
    assert "Do not trust" in html and html.count("data:image/png;base64") == 2 + 6


def test_explain_job_and_the_score_jobs_positive_heatmaps(ray_driver, corner_model, tmp_path):
    data = marker_tree(tmp_path / "in", 4, 128, seed=5, cue="marker")
    env = {"RAY_ADDRESS": ray_driver.address}
    out = tmp_path / "explain"
    views = tmp_path / "views"
    views.mkdir()
    (views / "lateral.dcm").write_bytes(dicom_bytes(xray_like(128, 128, seed=6).astype(np.uint16) * 16, view="LL"))
    proc = run_job(
        "explain.py",
        "--input",
        str(data),
        "--input",
        str(views),
        "--model",
        corner_model,
        "--output",
        str(out),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "explained 8 of 9 images (0 unreadable, 1 not frontal views)" in proc.stdout
    table = pq.read_table(out / "explanations.parquet").to_pandas()
    assert len(table) == 9 and table["heatmap"].notna().sum() == 8 and len(list((out / "heatmaps").glob("*.png"))) == 8
    assert table.loc[table["path"].str.endswith("lateral.dcm"), "error"].iloc[0].startswith("not a frontal view")
    assert (table["prediction"] == "covid").sum() == 4 and set(table.columns) >= {
        "prob_covid",
        "focus",
        "corner_share",
        "outside_lungs",
    }
    gallery = (out / "gallery.html").read_text()
    ok = table[table["error"].isna()]
    captions = [
        escape(versus_threshold(p, t, pred)) for p, t, pred in zip(ok["prob_covid"], ok["threshold"], ok["prediction"])
    ]
    assert len(captions) == 8 and all(
        c in gallery for c in captions
    )  # the probability against the threshold, and the prediction
    assert sum("&gt;=" in c for c in captions) == (ok["prediction"] == "covid").sum() == 4

    scores = tmp_path / "scores"
    proc = run_job(
        "score.py",
        "--input",
        str(data),
        "--output",
        str(scores),
        "--model",
        corner_model,
        "--explain-positive",
        "--explain-limit",
        "3",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "explained 3 of 4 files (--explain-limit 3; 0 unreadable)" in proc.stdout  # the limit cut 4 positives to 3
    scored = pq.read_table(scores).to_pandas()
    assert len(scored) == 8  # the score table is unchanged: _heatmaps/ is not part of it
    explained = pq.read_table(scores / "_heatmaps" / "explanations.parquet").to_pandas()
    positive = scored[scored["prediction"] == "covid"].set_index("path")["prob_covid"]
    assert set(positive.index) == {str(p) for p in (data / "covid").glob("*.png")}
    chosen = positive[positive.index.isin(explained["path"])]
    assert (
        len(explained) == len(chosen) == 3 and chosen.min() >= positive.drop(chosen.index).max()
    )  # the 3 most probable
    assert "Explained 3 of 4 files (--explain-limit 3)." in (scores / "_heatmaps" / "gallery.html").read_text()


def test_explain_job_takes_an_ensemble_and_refuses_a_layer_it_lacks(ray_driver, corner_model, tmp_path):
    from cxr.checkpoint import save_ensemble
    from cxr.explain import Explainer

    data = marker_tree(tmp_path / "in", 2, 128, seed=6, cue="marker")
    ensemble = str(tmp_path / "ensemble")
    save_ensemble(
        {"a": corner_model, "b": corner_model}, ensemble, threshold=0.5
    )  # two equal members: the member's maps
    env = {"RAY_ADDRESS": ray_driver.address}
    out = tmp_path / "explain"
    proc = run_job("explain.py", "--input", str(data), "--model", ensemble, "--output", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "explained 4 of 4 images (0 unreadable)" in proc.stdout
        and "2 with no positive evidence (focus n/a)" in proc.stdout
    )
    assert (
        "4 images, median focus" in (out / "gallery.html").read_text()
        and "2 with no positive evidence" in (out / "gallery.html").read_text()
    )
    table = pq.read_table(out / "explanations.parquet").to_pandas().sort_values("path")
    assert table["heatmap"].notna().all() and (table["prediction"] == "covid").sum() == 2
    assert table["model"].str.startswith("ensemble@").all()
    # the same focus as the member explains itself (Explainer in this process, on the job's own rows)
    from cxr import storage
    from cxr.decode import decode
    from cxr.preprocess import preprocess

    single = Explainer(corner_model, "r", 1, storage.s3_settings())
    paths = table["path"].tolist()
    images = np.stack([preprocess(decode(open(p, "rb").read(), p).image, single.info.preprocess) for p in paths])
    own = single(
        {
            "path": np.array(paths),
            "image": images,
            "width": np.full(4, 128),
            "height": np.full(4, 128),
            "error": np.array([None] * 4, object),
        }
    ).to_pandas()
    assert table["focus"].notna().sum() == 2 and np.allclose(table["focus"], own["focus"], atol=1e-4, equal_nan=True)

    bad = run_job(
        "explain.py",
        "--input",
        str(data),
        "--model",
        ensemble,
        "--output",
        str(tmp_path / "bad"),
        "--layer",
        "features.99",
        env=env,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip().splitlines()[-1]
        == "error: --layer features.99: model mobilenet_v2 has no layer 'features.99'"
    )
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def _hospital_manifest(root, n: int = 8) -> str:
    """A labelled manifest of two hospitals, half covid each: north's images carry a large bright corner square."""
    import csv

    from support.planted import chest_like, write_png

    with open(root / "labels.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "label", "patient", "hospital"])
        for k, hospital in enumerate(("north", "south")):
            for i in range(n):
                arr = chest_like(64, 64, seed=700 + 100 * k + i, finding=i % 2 == 0)
                if hospital == "north":
                    arr[2:22, 2:22] = 250
                write_png(root / "images" / f"{hospital}-{i}.png", arr)
                out.writerow(
                    [f"images/{hospital}-{i}.png", "covid" if i % 2 == 0 else "non", f"{hospital}{i}", hospital]
                )
    return str(root / "labels.csv")


def test_audit_by_column_and_source_control_on_the_models_embeddings(ray_driver, tiny_model, tmp_path):
    from cxr.errors import InputError

    (tmp_path / "data").mkdir()
    internal = _hospital_manifest(tmp_path / "data")
    external = marker_tree(tmp_path / "elsewhere", 3, 64, seed=4, cue="finding")  # a folder: no hospital column
    with pytest.raises(InputError, match="--by site: no labelled image has a 'site' column"):
        audit(tiny_model, internal, [], str(tmp_path / "no"), by=["site"])
    with pytest.raises(InputError, match="--source-column hospital: .*class folders, not a manifest"):
        audit(tiny_model, str(external), [], str(tmp_path / "no"), source_column="hospital")
    assert not (tmp_path / "no").exists()
    out = tmp_path / "audit"
    result = audit(
        tiny_model,
        internal,
        [str(external)],
        str(out),
        n_bootstrap=20,
        heatmaps_per_class=0,
        by=["hospital"],
        source_column="hospital",
    )
    r = json.loads((out / "report.json").read_text())
    assert list(r["by"]["hospital"]) == ["labels.csv"]  # only the set that has the column
    north, south = r["by"]["hospital"]["labels.csv"]
    assert (north["group"], north["n"], north["n_positive"], south["n"]) == ("north", 8, 4, 8)
    pred = pq.read_table(out / "predictions.parquet").to_pandas()
    sel = pred[(pred.set == "labels.csv") & pred.path.str.contains("/north-")]
    assert north["sensitivity"]["k"] == int((sel[sel.label == 1].prob_covid >= r["threshold"]).sum())
    assert "embedding" not in pred.columns
    signal = r["source_control"]
    assert signal["column"] == "hospital" and signal["label_association"]["cramers_v"] == pytest.approx(0, abs=1e-9)
    fit = signal["models"]["model embeddings"]["all"]
    assert fit["n"] == 16 and fit["sources"] == ["north", "south"] and fit["chance"] == 0.5
    assert fit["balanced_accuracy"] >= 0.8 and not signal["flag"]  # the marker shows; the label does not follow it
    assert "by hospital on labels.csv:" in result.by_lines()
    html = (out / "report.html").read_text()
    assert "Source control: hospital (internal set)" in html and "By hospital: labels.csv" in html
    assert (out / "source_confusion_all.png").stat().st_size > 1000 and (out / "by-hospital-labels.csv.png").exists()
