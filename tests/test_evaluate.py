"""The evaluate job: the score pipeline joined with labels, and a report whose numbers are right."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from cxr.errors import InputError
from cxr.evaluate import data_name, evaluate
from support.images import dicom_bytes, make_labelled_tree, xray_like
from support.jobs import run_job

pytestmark = pytest.mark.timeout(300)


def test_report_numbers_match_the_predictions(ray_driver, trained_model, tmp_path):
    data = make_labelled_tree(tmp_path / "data", n=15, seed=3, layout="test")
    (data / "test" / "non" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (data / "test" / "covid" / "lateral.dcm").write_bytes(
        dicom_bytes(xray_like(64, 64, seed=5).astype(np.uint16) * 16, view="LL")
    )
    out = tmp_path / "report"
    result = evaluate([str(data)], trained_model.output, str(out), n_bootstrap=200)
    pred = pq.read_table(out / "predictions.parquet").to_pandas()
    assert len(pred) == 32 and (result.errors, result.not_frontal) == (2, 1)
    assert "not scored: 1 unreadable, 1 not frontal views)" in result.line()
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
    assert (
        r["extra"]["not_frontal_views"] == 1 and "lateral.dcm: not a frontal view" in r["extra"]["unreadable_examples"]
    )
    for name in ("report.html", "roc.png", "pr.png", "histogram.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 1000, name
    html = (out / "report.html").read_text()
    assert "Sensitivity" in html and "data:image/png;base64" in html


def test_single_class_external_folder_gives_sensitivity_only(ray_driver, trained_model, tmp_path):
    data = make_labelled_tree(tmp_path / "ext", n=10, seed=5, layout="")
    out = tmp_path / "report"
    proc = run_job(
        "evaluate.py",
        "--data",
        str(data / "covid"),
        "--model",
        trained_model.output,
        "--output",
        str(out),
        "--bootstrap",
        "50",
        env={"RAY_ADDRESS": ray_driver.address},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"<h1>[\w/]+ on ext</h1>", (out / "report.html").read_text())  # the set's name, not "covid"
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


def test_subgroups_by_file_name_and_by_source(ray_driver, trained_model, tmp_path):
    # Two "sites": site A's names start "A-", site B's "B-"; site B also holds a second finding prefix.
    a = make_labelled_tree(tmp_path / "siteA", n=6, seed=7, layout="")
    b = make_labelled_tree(tmp_path / "siteB", n=4, seed=8, layout="")
    for root, prefix in ((a, "A"), (b, "B")):
        for f in sorted(root.glob("*/*.png")):
            f.rename(f.with_name(f"{prefix}-{f.name}"))
    (b / "non" / "Bx-extra.png").write_bytes((b / "non" / "B-non8-0.png").read_bytes())
    out = tmp_path / "by-name"
    proc = run_job(
        "evaluate.py",
        "--data",
        str(a),
        "--data",
        str(b),
        "--model",
        trained_model.output,
        "--output",
        str(out),
        "--bootstrap",
        "20",
        "--group-by",
        r"^([A-Z]+x?)-",
        env={"RAY_ADDRESS": ray_driver.address},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = pq.read_table(out / "predictions.parquet").to_pandas()
    assert sorted(pred["group"].unique()) == ["A", "B", "Bx"]
    r = json.loads((out / "report.json").read_text())
    assert r["subgroups"]["by"] == r"^([A-Z]+x?)-"
    groups = {g["group"]: g for g in r["subgroups"]["groups"]}
    assert (groups["A"]["n_positive"], groups["A"]["n_negative"]) == (6, 6)
    assert (groups["B"]["n_positive"], groups["B"]["n_negative"]) == (4, 4)
    assert (groups["Bx"]["n_positive"], groups["Bx"]["n_negative"]) == (0, 1) and groups["Bx"]["sensitivity"] is None
    t = r["threshold"]
    for name, g in groups.items():
        sel = pred[pred.group == name]
        assert g["false_positive_rate"]["k"] == int(((sel.label == 0) & (sel.prob_covid >= t)).sum()), name
        if g["sensitivity"]:
            assert g["sensitivity"]["k"] == int(((sel.label == 1) & (sel.prob_covid >= t)).sum()), name
    assert sum(g["n"] for g in groups.values()) == r["n"] == 21
    assert (out / "subgroups.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "<h2>Subgroups</h2>" in html and "<td>Bx</td>" in html
    assert any(line.strip().startswith("Bx") and "sensitivity n/a" in line for line in proc.stdout.splitlines()), (
        proc.stdout
    )

    # by source, into the same folder (overwrite: emptied first): groups are the --data URIs
    (out / "stale.txt").write_text("from an earlier run")
    result = evaluate(
        [str(a), str(b)], trained_model.output, str(out), n_bootstrap=20, group_by="source", overwrite=True
    )
    assert not (out / "stale.txt").exists()
    assert [g["group"] for g in result.subgroups["groups"]] == sorted([str(a), str(b)])
    assert [g["n"] for g in result.subgroups["groups"]] == [12, 9]
    # by a metadata table (file,group; TSV), as exported from a PACS: unlisted files are a group of their own
    views = tmp_path / "views.tsv"
    listed = sorted(pred["path"])[:15]
    views.write_text(
        "file\tgroup\tother\n" + "".join(f"{p}\t{'AP' if i % 3 else 'PA'}\tx\n" for i, p in enumerate(listed))
    )
    result = evaluate(
        [str(a), str(b)], trained_model.output, str(out), n_bootstrap=20, group_by=str(views), overwrite=True
    )
    got = {g["group"]: g["n"] for g in result.subgroups["groups"]}
    assert got == {"AP": 10, "PA": 5, "(not listed)": 6}
    by_path = pq.read_table(out / "predictions.parquet").to_pandas().set_index("path")["group"]
    assert all(by_path[p] == ("AP" if i % 3 else "PA") for i, p in enumerate(listed))
    # and without grouping the stale subgroup picture goes
    evaluate([str(a)], trained_model.output, str(out), n_bootstrap=20, overwrite=True)
    assert not (out / "subgroups.png").exists() and "subgroups" not in json.loads((out / "report.json").read_text())


@pytest.mark.cluster  # runs the job, which starts a local Ray instance
def test_a_bad_group_pattern_is_a_bad_input_before_any_scoring(tiny_model, tmp_path):
    data = make_labelled_tree(tmp_path / "data", n=2, layout="")
    proc = run_job(
        "evaluate.py",
        "--data",
        str(data),
        "--model",
        tiny_model,
        "--output",
        str(tmp_path / "r"),
        "--group-by",
        "([unclosed",
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "--group-by '([unclosed'" in proc.stderr and "not a valid regular expression" in proc.stderr
    assert not (tmp_path / "r").exists()
    (tmp_path / "bad.csv").write_text("name,site\na.png,x\n")
    for table, says in (
        (tmp_path / "missing.csv", "cannot read it"),
        (tmp_path / "bad.csv", "needs the columns 'file' and 'group'"),
    ):
        proc = run_job(
            "evaluate.py",
            "--data",
            str(data),
            "--model",
            tiny_model,
            "--output",
            str(tmp_path / "r"),
            "--group-by",
            str(table),
        )
        assert proc.returncode == 3 and says in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
        assert not (tmp_path / "r").exists()


def test_report_title_names_the_data_set_not_its_layout_folder():
    assert data_name("../shared/data/external/hannover-covid/covid") == "hannover-covid"
    assert data_name("s3://bucket/xray5k/test/") == "xray5k"
    assert data_name("../shared/data/covid-xray-5k") == "covid-xray-5k"
    assert data_name("runs/x/data") == "runs/x/data"  # a generic name: the path says more
    assert data_name("s3://bucket") == "bucket"


def test_figures_by_the_columns_of_a_labelled_manifest(ray_driver, tiny_model, tmp_path):
    data = make_labelled_tree(tmp_path / "pacs", n=8, size=32, seed=4, layout="")
    rows = ["uri,label,patient,source,view"]
    for i, f in enumerate(sorted(data.glob("*/*.png"))):
        view = "" if i % 4 == 3 else ("PA" if i % 2 else "AP")
        rows.append(f"pacs/{f.parent.name}/{f.name},{'yes' if f.parent.name == 'covid' else 'no'},p{i},s{i % 3},{view}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "report"
    proc = run_job(
        "evaluate.py",
        "--data",
        str(tmp_path / "labels.csv"),
        "--label-map",
        "yes=covid,no=non",
        "--by",
        "source",
        "--by",
        "view",
        "--model",
        tiny_model,
        "--output",
        str(out),
        "--bootstrap",
        "50",
        env={"RAY_ADDRESS": ray_driver.address},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = pq.read_table(out / "predictions.parquet").to_pandas()
    assert len(pred) == 16 and pred["error"].isna().all() and int(pred["label"].sum()) == 8
    r = json.loads((out / "report.json").read_text())
    assert list(r["by"]) == ["source", "view"]
    assert [g["group"] for g in r["by"]["view"]["groups"]] == ["(missing)", "AP", "PA"]
    t = r["threshold"]
    for column in ("source", "view"):
        groups = r["by"][column]["groups"]
        assert sum(g["n"] for g in groups) == 16
        for g in groups:
            sel = pred[pred[f"by_{column}"] == g["group"]]
            pos, neg = sel[sel.label == 1], sel[sel.label == 0]
            assert (g["n_positive"], g["n_negative"]) == (len(pos), len(neg))
            assert g["sensitivity"]["k"] == int((pos.prob_covid >= t).sum()), (column, g["group"])
            assert g["specificity"]["k"] == int((neg.prob_covid < t).sum()), (column, g["group"])
            assert g["roc_auc"] == pytest.approx(roc_auc_score(sel.label, sel.prob_covid))
            assert g["roc_auc_ci95"][0] <= g["roc_auc"] <= g["roc_auc_ci95"][1]
        assert (out / f"by-{column}.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "<h2>By source</h2>" in html and "<h2>By view</h2>" in html
    assert "by view:" in proc.stdout and re.search(r"^\s+s0\s+n \d+ \(\d+ covid\), sensitivity", proc.stdout, re.M)

    # a column the data lacks is a bad input, named with the columns there are, before any scoring
    with pytest.raises(InputError, match=r"--by site: no labelled image has a 'site' column \(their columns: "):
        evaluate(
            [str(tmp_path / "labels.csv")], tiny_model, str(out), by=["site"], label_map={"yes": "covid", "no": "non"}
        )
    with pytest.raises(InputError, match="they come from class folders"):
        evaluate([str(data)], tiny_model, str(tmp_path / "o2"), by=["source"])
    assert not (tmp_path / "o2").exists()
