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
