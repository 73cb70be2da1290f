"""The validate job: every planted problem is found, and a clean generated set raises no alarm."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from cxr.validate import near_duplicate_pairs, validate
from support.jobs import run_job
from support.planted import clean_tree, planted_tree
from support.s3 import upload_tree

pytestmark = pytest.mark.timeout(300)


def _by_check(findings) -> dict:
    return {f["check"] if isinstance(f, dict) else f.check: f for f in findings}


def test_metadata_baseline_names_only_features_it_uses():
    from cxr.validate import metadata_baseline

    # every image 96x96: the label shows in the file size only, so width, height and the rest are not "strongest"
    rows = [
        {
            "path": f"/d/{c}/{i}.png",
            "error": None,
            "width": 96,
            "height": 96,
            "size_bytes": (9000 if c == "covid" else 3000) + 7 * i,
            "bits": 8,
            "mode": "L",
            "format": "PNG",
            "label": int(c == "covid"),
        }
        for c in ("covid", "non")
        for i in range(10)
    ]
    base = metadata_baseline(rows)
    assert base["auc"] > 0.95
    names = [n for n, _ in base["top_features"]]
    assert names and set(names) <= {"log_size_bytes", "bytes_per_pixel"} and all(w > 0 for _, w in base["top_features"])


def test_near_duplicate_pairs_match_brute_force():
    import numpy as np

    rng = np.random.default_rng(0)
    hashes = [int(h) for h in rng.integers(0, 2**64, size=300, dtype=np.uint64)]
    for i in range(0, 40, 4):  # plant neighbours at 0..7 bits
        hashes[i + 1] = hashes[i] ^ sum(1 << int(b) for b in rng.choice(64, size=i // 5, replace=False))
    hashes[5] = None
    for d in (0, 3, 4, 7):
        brute = sorted(
            (i, j, bin(a ^ b).count("1"))
            for i, a in enumerate(hashes)
            for j, b in enumerate(hashes)
            if i < j and a is not None and b is not None and bin(a ^ b).count("1") <= d
        )
        assert near_duplicate_pairs(hashes, d) == brute
    assert len(near_duplicate_pairs(hashes, 7)) == 9  # the ten planted pairs, less the one whose hash is missing


def test_planted_problems_are_all_found_and_strict_fails(ray_driver, tmp_path):
    root, planted = planted_tree(tmp_path / "data")
    out = tmp_path / "report"
    out.mkdir()
    (out / "stale.png").write_bytes(b"from an earlier run")
    proc = run_job(
        "validate.py",
        "--data",
        str(root),
        "--output",
        str(out),
        "--strict",
        "--min-side",
        "32",
        "--overwrite",
        env={"RAY_ADDRESS": ray_driver.address},
    )
    assert proc.returncode == 6, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not (out / "stale.png").exists()  # --overwrite emptied the folder first
    report = json.loads((out / "validation.json").read_text())
    found = _by_check(report["findings"])
    assert report["ok"] is False
    assert {
        c: found[c]["severity"]
        for c in ("unreadable", "duplicate_across_splits", "near_duplicate_across_splits", "patient_overlap")
    } == dict.fromkeys(
        ("unreadable", "duplicate_across_splits", "near_duplicate_across_splits", "patient_overlap"), "error"
    )
    bad = " ".join(found["unreadable"]["files"])
    assert (
        "empty.png: empty file" in bad and "truncated.png: truncated PNG" in bad and found["unreadable"]["count"] == 2
    )
    assert sorted(p.split("/")[-1] for p in found["duplicate_across_splits"]["files"][0]) == [
        "copy-of-train-covid-3.png",
        "covid-train-3.png",
    ]
    pair = found["near_duplicate_across_splits"]["files"]
    assert len(pair) == 1 and {p.split("/")[-1] for p in pair[0][:2]} == {
        "recompressed-train-non-5.jpg",
        "non-train-5.png",
    }
    assert found["patient_overlap"]["files"] == ["patient00042: test, train"]
    assert found["wrong_extension"]["files"] == [f"{planted['wrong_extension']}: JPEG content with a .png extension"]
    assert found["unexpected_mode"]["files"] == [f"{planted['rgb']}: mode RGB"]
    assert found["tiny_image"]["files"] == [f"{planted['tiny']}: 20x20"]
    assert (
        found["not_frontal"]["files"] == [f"{planted['lateral']}: ViewPosition LL"]
        and found["not_frontal"]["severity"] == "warning"
    )
    views = dict(zip(*pq.read_table(out / "files.parquet", columns=["path", "view"]).to_pydict().values()))
    assert views[str(planted["lateral"])] == "LL" and views[str(planted["tiny"])] is None
    assert report["metadata_baseline"]["auc"] > 0.95 and "metadata_shortcut" in found
    assert {n for n, _ in report["metadata_baseline"]["top_features"][:3]} & {"width", "height", "aspect", "log_pixels"}
    assert "class_imbalance" not in found and "duplicate_within_split" not in found and "label_conflict" not in found
    assert (
        report["distributions"]["covid"]["width"]["median"] == 80
        and report["distributions"]["non"]["width"]["median"] == 64
    )
    assert report["counts"]["train"] == {"non": 12 + 7, "covid": 12} and report["counts"]["test"]["covid"] == 7
    html = (out / "report.html").read_text()
    assert "duplicate_across_splits" in html and "data:image/png;base64" in html
    assert "error: --strict: 4 error finding(s)" in proc.stderr


def test_clean_set_on_s3_raises_no_alarm(ray_driver, s3_bucket, tmp_path):
    name, client = s3_bucket
    upload_tree(client, name, clean_tree(tmp_path / "clean"), "data")
    result = validate(f"s3://{name}/data", str(tmp_path / "report"), min_side=32)
    assert [f.message for f in result.findings] == []
    s = result.summary
    assert (
        s["files"] == 36
        and s["unreadable"] == 0
        and s["counts"] == {"train": {"non": 12, "covid": 12}, "test": {"non": 6, "covid": 6}}
    )
    assert s["duplicates"]["exact_groups"] == 0 and s["duplicates"]["near_pairs"] == 0
    assert s["metadata_baseline"]["auc"] < 0.75
    assert json.loads((tmp_path / "report" / "validation.json").read_text())["ok"] is True


# --------------------------------------------------------------------------- source control


def _sourced_rows(marked: bool, covid_share: dict, n: int = 16, size: int = 64) -> tuple[list[dict], tuple]:
    """Inspected rows of images from three sources; ``marked``: each source burns in its own corner square (a: top
    left, b: bottom right, c: none); ``covid_share``: source -> share of its ``n`` images labelled covid."""
    from cxr.validate import inspect_bytes
    from support.images import png_bytes
    from support.planted import chest_like

    rows, sources = [], {}
    for k, source in enumerate(("a", "b", "c")):
        for i in range(n):
            label = int(i < round(covid_share[source] * n))
            arr = chest_like(size, size, seed=1000 * k + i, finding=bool(label))
            if marked and source == "a":
                arr[2:20, 2:20] = 250
            if marked and source == "b":
                arr[-20:-2, -20:-2] = 250
            path = f"/d/{source}-{i}.png"
            row = inspect_bytes(path, png_bytes(arr), thumbnails=True)
            rows.append({**row, "split": "all", "label": label})
            sources[path] = source
    return rows, ("hospital", sources, {p: p for p in sources})


def test_source_control_tells_marked_sources_apart_but_sees_no_label_link():
    from cxr.validate import source_control, source_finding

    rows, source = _sourced_rows(True, dict.fromkeys("abc", 0.5))
    signal = source_control(rows, *source)
    image = signal["models"]["image"]
    assert image["all"]["chance"] == pytest.approx(1 / 3) and image["all"]["n"] == 48
    assert image["all"]["balanced_accuracy"] > 0.9 and image["all"]["roc_auc"] > 0.95
    assert min(image[c]["balanced_accuracy"] for c in ("covid", "non")) > 0.7
    assert min(image[c]["roc_auc"] for c in ("covid", "non")) > 0.85
    assert sum(map(sum, image["all"]["confusion"])) == 48 and image["all"]["sources"] == ["a", "b", "c"]
    assert min(image["all"]["roc_auc_by_source"].values()) > 0.9
    assert signal["label_association"]["cramers_v"] == pytest.approx(0.0, abs=1e-9)
    assert signal["per_source"]["a"] == {"n": 16, "covid": 8, "non": 8, "share_covid": 0.5}
    assert signal["flag"] is False and source_finding(signal) == []


def test_source_control_near_chance_when_sources_look_alike():
    from cxr.validate import source_control

    rows, source = _sourced_rows(False, dict.fromkeys("abc", 0.5))
    signal = source_control(rows, *source)
    image = signal["models"]["image"]
    assert image["all"]["balanced_accuracy"] < 0.55 and image["all"]["roc_auc"] < 0.7
    assert signal["flag"] is False


def test_source_control_warns_when_the_source_stands_in_for_the_label():
    from cxr.validate import source_control, source_finding

    rows, source = _sourced_rows(True, {"a": 0.875, "b": 0.125, "c": 0.5})
    signal = source_control(rows, *source)
    assert signal["label_association"]["cramers_v"] > 0.5 and signal["flag"] is True
    (finding,) = source_finding(signal)
    assert finding.severity == "warning" and finding.check == "source_shortcut"
    message = finding.message
    assert "'hospital' apart even among" in message and "Cramér's V" in message


def test_source_column_on_a_folder_dataset_is_a_clear_error(tmp_path):
    from support.images import make_labelled_tree

    root = make_labelled_tree(tmp_path / "data", n=4, size=32, layout="")
    proc = run_job("validate.py", "--data", str(root), "--output", str(tmp_path / "out"), "--source-column", "source")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "--source-column source: no labelled image has a 'source' column" in proc.stderr
    assert "class folders, not a manifest" in proc.stderr and not (tmp_path / "out").exists()


def test_source_column_job_on_a_manifest(ray_driver, tmp_path):
    import csv

    from support.images import png_bytes
    from support.planted import chest_like

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "label", "patient", "hospital"])
        for k, hospital in enumerate(("north", "south")):
            for i in range(12):
                arr = chest_like(64, 64, seed=100 * k + i, finding=i % 2 == 0)
                if hospital == "north":
                    arr[2:20, 2:20] = 250
                (root / "images" / f"{hospital}-{i}.png").write_bytes(png_bytes(arr))
                out.writerow(
                    [f"images/{hospital}-{i}.png", "covid" if i % 2 == 0 else "non", f"{hospital}{i // 2}", hospital]
                )
    report = tmp_path / "report"
    proc = run_job(
        "validate.py",
        "--data",
        str(root / "labels.csv"),
        "--output",
        str(report),
        "--min-side",
        "32",
        "--source-column",
        "hospital",
        env={"RAY_ADDRESS": ray_driver.address},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    signal = json.loads((report / "validation.json").read_text())["source_control"]
    assert signal["column"] == "hospital" and signal["per_source"]["north"] == {
        "n": 12,
        "covid": 6,
        "non": 6,
        "share_covid": 0.5,
    }
    image = signal["models"]["image"]
    assert image["all"]["balanced_accuracy"] > 0.9 and image["all"]["folds"] >= 2 and not signal["flag"]
    assert "source column 'hospital': 2 sources (north 6/12 covid, south 6/12 covid)" in proc.stdout
    assert "image -> source: all: balanced accuracy" in proc.stdout
    html = (report / "report.html").read_text()
    assert "Source control: hospital" in html and (report / "source_confusion_all.png").stat().st_size > 1000
    assert "thumbnail" not in pq.read_schema(report / "files.parquet").names
