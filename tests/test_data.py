"""Tests for cxr.data: labelled file trees generated in tmp_path (tiny PNGs), splits on synthetic lists. No Ray."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.data import (
    CLASS_NAMES,
    LabelledFile,
    apply_groups,
    class_counts,
    cv_folds,
    fingerprint,
    labelled_files,
    parse_label_map,
    patient_id,
    read_group_table,
    split_train_val,
)
from cxr.sources import InputError
from support.s3 import upload_tree


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tree(root: Path, files: list[str]) -> Path:
    for i, name in enumerate(files):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(i) if not name.endswith(".txt") else b"not an image")
    return root


def _labels(files) -> dict[str, int]:
    return {Path(f.path).name: f.label for f in files}


def test_class_names_match_checkpoint():
    from cxr.checkpoint import CLASS_NAMES as CHECKPOINT_NAMES

    assert CLASS_NAMES == CHECKPOINT_NAMES == ("non", "covid")


def test_split_layout(tmp_path):
    root = _tree(
        tmp_path / "ds",
        [
            "train/covid/c1.png",
            "train/covid/sub/c2.jpg",
            "train/non/patient00001-study1-view1_frontal.png",
            "train/non/n2.png",
            "train/non/notes.txt",
            "test/covid/tc.png",
            "test/non/tn.png",
            "SOURCE/x.png",
            "loose.png",
        ],
    )
    train = labelled_files(str(root))
    assert _labels(train) == {"c1.png": 1, "c2.jpg": 1, "patient00001-study1-view1_frontal.png": 0, "n2.png": 0}
    assert [f.path for f in train] == sorted(f.path for f in train)
    assert all(Path(f.path).is_absolute() for f in train)
    groups = {Path(f.path).name: f.group for f in train}
    assert groups["patient00001-study1-view1_frontal.png"] == "patient00001"
    assert groups["n2.png"] == str(root / "train/non/n2.png")
    assert _labels(labelled_files(str(root), split="test")) == {"tc.png": 1, "tn.png": 0}
    assert len(labelled_files(str(root), split=None)) == 6  # every split
    assert labelled_files(str(root)) == train  # deterministic
    with pytest.raises(InputError, match="no 'val' split folder"):
        labelled_files(str(root), split="val")


def test_plain_layout_uppercase_and_split_ignored(tmp_path):
    root = _tree(tmp_path / "ds", ["COVID/a.png", "Non/b.png", "Non/deep/er/c.png", "other/d.png"])
    files = labelled_files(str(root), split="test")
    assert _labels(files) == {"a.png": 1, "b.png": 0, "c.png": 0}
    assert class_counts(files) == {"non": 2, "covid": 1}


def test_single_class_folders(tmp_path):
    _tree(
        tmp_path, ["hannover/covid/a.png", "hannover/covid/b.png", "normals/train/non/x.png", "normals/test/non/y.png"]
    )
    assert _labels(labelled_files(str(tmp_path / "hannover" / "covid"))) == {"a.png": 1, "b.png": 1}
    assert _labels(labelled_files(str(tmp_path / "hannover"))) == {"a.png": 1, "b.png": 1}
    assert _labels(labelled_files(str(tmp_path / "normals"), split=None)) == {"x.png": 0, "y.png": 0}


def test_missing_classes_raise(tmp_path):
    _tree(tmp_path, ["flat/a.png", "wrong/pos/a.png", "wrong/neg/b.png", "splits/train/pos/a.png"])
    for name in ("flat", "wrong", "splits"):
        with pytest.raises(InputError, match=r"no class folder .*\{covid,non\}"):
            labelled_files(str(tmp_path / name))
    with pytest.raises(InputError, match="not found"):
        labelled_files(str(tmp_path / "absent"))
    with pytest.raises(InputError, match="is a file"):
        labelled_files(str(tmp_path / "flat" / "a.png"))


def test_s3_layout(s3_bucket, tmp_path):
    bucket, client = s3_bucket
    upload_tree(
        client, bucket, _tree(tmp_path / "ds", ["train/covid/a.png", "train/Non/b.png", "test/non/c.png"]), "cxr5k"
    )
    files = labelled_files(f"s3://{bucket}/cxr5k")
    assert [(f.path, f.label) for f in files] == [
        (f"s3://{bucket}/cxr5k/train/Non/b.png", 0),
        (f"s3://{bucket}/cxr5k/train/covid/a.png", 1),
    ]
    local = labelled_files(str(tmp_path / "ds"))
    assert fingerprint(files) == fingerprint(local)  # relative paths: the copy keeps its fingerprint


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/d/non/patient00042_study1_view1_frontal.jpg", "patient00042"),
        ("/d/non/Atelectasis-patient03614-study5-view1_frontal.jpg", "patient03614"),
        ("s3://b/x/No Finding-PATIENT00007-study1-view1_frontal.jpg", "patient00007"),
        ("/chexpert/train/patient00042/study1/view1_frontal.jpg", "patient00042"),
        ("/d/covid/covid-19-pneumonia-22-day1-pa.png", None),
        ("/d/covid/outpatient12.png", None),
        ("/patient00001-data/covid/a.png", None),
    ],
)
def test_patient_id(path, expected):
    assert patient_id(path) == expected


def _synthetic(n_pos=30, n_neg=270, per_patient=3) -> list[LabelledFile]:
    """Negatives: CheXpert-style, ``per_patient`` images per patient; positives: one group per file."""
    neg = [
        LabelledFile(
            f"/d/non/patient{i // per_patient:05d}_study{i % per_patient}_view1.jpg",
            0,
            f"patient{i // per_patient:05d}",
        )
        for i in range(n_neg)
    ]
    pos = [LabelledFile(f"/d/covid/c{i:03d}.png", 1, f"/d/covid/c{i:03d}.png") for i in range(n_pos)]
    return pos + neg


def test_split_stratified_grouped_deterministic():
    files = _synthetic()
    train, val = split_train_val(files, 0.2, seed=0)
    assert sorted(train + val, key=lambda f: f.path) == sorted(files, key=lambda f: f.path)
    assert abs(class_counts(val)["covid"] - 6) <= 1 and abs(class_counts(val)["non"] - 54) <= 3  # 3 per patient
    assert not {f.group for f in train} & {f.group for f in val}
    assert max(Counter(f.group for f in val).values()) == 3  # whole patients moved together
    assert split_train_val(list(reversed(files)), 0.2, seed=0) == (train, val)  # order-independent
    assert split_train_val(files, 0.2, seed=1) != (train, val)


@pytest.mark.filterwarnings("ignore:The least populated class")
def test_split_keeps_a_positive_in_validation():
    fallbacks = 0
    for per_patient in (1, 3):
        for seed in range(5):
            files = _synthetic(n_pos=2, n_neg=60, per_patient=per_patient)
            train, val = split_train_val(files, 0.2, seed=seed)
            assert class_counts(val)["covid"] >= 1 and class_counts(train)["covid"] >= 1
            assert not {f.group for f in train} & {f.group for f in val}
            fallbacks += class_counts(cv_folds(files, 5, seed)[0][1])["covid"] == 0
    assert fallbacks  # some of these first folds had no positive: the fallback fold was used


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(_synthetic(), 0.0)
    with pytest.raises(ValueError, match="patient groups"):
        split_train_val(_synthetic(n_pos=1, n_neg=3, per_patient=3), 0.2)


def test_cv_folds_cover_every_file_once():
    files = _synthetic()
    folds = cv_folds(files, n_splits=5, seed=3)
    assert len(folds) == 5
    seen = Counter(f.path for _, val in folds for f in val)
    assert set(seen) == {f.path for f in files} and set(seen.values()) == {1}
    for train, val in folds:
        assert len(train) + len(val) == len(files)
        assert not {f.group for f in train} & {f.group for f in val}
        assert class_counts(val)["covid"] == 6
    assert split_train_val(files, 0.2, seed=3) == folds[0]


def test_fingerprint_and_counts():
    files = _synthetic(n_pos=3, n_neg=6)
    fp = fingerprint(files)
    assert len(fp) == 64 and fp == fingerprint(list(reversed(files)))
    flipped = [LabelledFile(f.path, 1 - f.label, f.group) if i == 0 else f for i, f in enumerate(files)]
    assert fingerprint(flipped) != fp
    assert fingerprint(files[1:]) != fp
    assert class_counts(files) == {"non": 6, "covid": 3} and class_counts([]) == {"non": 0, "covid": 0}
    with pytest.raises(ValueError):
        LabelledFile("/x.png", 2, "/x.png")


def test_group_tables_map_file_names_to_groups_csv_or_tsv(tmp_path):
    (tmp_path / "g.csv").write_text("file,group,extra\nsub/a.png,case-1,x\nb.png, case-2 ,y\nc.png,,z\n,orphan,w\n")
    assert read_group_table(str(tmp_path / "g.csv")) == {"a.png": "case-1", "b.png": "case-2", "c.png": "(empty)"}
    (tmp_path / "g.tsv").write_text("file\tgroup\na.png\tAP Supine\n")
    assert read_group_table(str(tmp_path / "g.tsv")) == {"a.png": "AP Supine"}
    (tmp_path / "bad.csv").write_text("name,site\na.png,x\n")
    with pytest.raises(InputError, match=r"--groups .*needs the columns 'file' and 'group'"):
        read_group_table(str(tmp_path / "bad.csv"), "--groups")
    with pytest.raises(InputError, match="cannot read it"):
        read_group_table(str(tmp_path / "missing.csv"))
    files = [
        LabelledFile("/d/covid/a.png", 1, "/d/covid/a.png"),
        LabelledFile("s3://b/non/patient7-x.png", 0, "patient7"),
    ]
    grouped = apply_groups(files, {**read_group_table(str(tmp_path / "g.csv")), "patient7-x.png": "case-9"})
    assert [f.group for f in grouped] == ["g:case-1", "g:case-9"] and [f.path for f in grouped] == [
        f.path for f in files
    ]
    assert apply_groups(files, {"other.png": "x"}) == files and apply_groups(files, None) is files


# --------------------------------------------------------------------------- labelled manifests


def test_manifest_relative_paths_labels_patients_and_metadata(tmp_path):
    _tree(tmp_path / "img", ["a/1.png", "a/2.png", "b/3.png", "b/4.png"])
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "labels.csv").write_text(
        "path,label,patient,source,view\n"
        "../img/a/1.png,COVID,p1,siteA,PA\n"
        f"{tmp_path}/img/a/2.png, non ,p1,siteA,\n"
        "../img/b/3.png,non,,siteB,AP\n"
        "./../img/b/4.png,covid,7,siteB,AP\n"
    )
    files = labelled_files(str(tmp_path / "tables" / "labels.csv"), split="test")  # split ignored
    assert [(f.path, f.label, f.group) for f in files] == [
        (f"{tmp_path}/img/a/1.png", 1, "patient:p1"),
        (f"{tmp_path}/img/a/2.png", 0, "patient:p1"),
        (f"{tmp_path}/img/b/3.png", 0, f"{tmp_path}/img/b/3.png"),  # no patient: its own group
        (f"{tmp_path}/img/b/4.png", 1, "patient:7"),
    ]
    assert files[0].meta == {"patient": "p1", "source": "siteA", "view": "PA"}
    assert files[1].meta == {"patient": "p1", "source": "siteA"}  # an empty value is left out
    # the patient column replaces --groups for its rows; a row without one still takes its --groups group
    grouped = apply_groups(files, {"1.png": "case-1", "3.png": "case-1"})
    assert [f.group for f in grouped] == ["patient:p1", "patient:p1", "g:case-1", "patient:7"]
    # the same images as a Parquet table with a uri column, labels mapped
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"uri": ["img/a/1.png", "img/b/3.png"], "label": ["COVID-19", "pneumonia"], "age": [40, None]}),
        tmp_path / "labels.parquet",
    )
    files = labelled_files(str(tmp_path / "labels.parquet"), label_map=parse_label_map("covid-19=covid,Pneumonia=non"))
    assert [(f.path, f.label, f.meta) for f in files] == [
        (f"{tmp_path}/img/a/1.png", 1, {"age": "40"}),
        (f"{tmp_path}/img/b/3.png", 0, {}),
    ]


def test_manifest_bad_labels_name_the_rows(tmp_path):
    (tmp_path / "m.csv").write_text(
        "path,label\na.png,covid\nb.png,maybe\nc.png,\n,non\na.png,non\nd.png,Maybe\ne.png,pneumonia\n"
    )
    with pytest.raises(InputError) as err:
        labelled_files(str(tmp_path / "m.csv"))
    message = str(err.value)
    assert "\n" not in message
    assert "row 4 with no path" in message
    assert "row 3 (c.png) with no label" in message
    assert "rows 2 (b.png), 6 (d.png), 7 (e.png) with an unknown label" in message
    assert "row 5 (a.png) with a path listed before" in message
    assert "'Maybe', 'maybe', 'pneumonia'" in message and "--label-map maps non=non, covid=covid" in message
    (tmp_path / "nolabel.csv").write_text("path,site\na.png,x\n")
    with pytest.raises(InputError, match="no 'label' column"):
        labelled_files(str(tmp_path / "nolabel.csv"))
    with pytest.raises(InputError, match="manifest not found"):
        labelled_files(str(tmp_path / "missing.csv"))


@pytest.mark.parametrize(
    "text, message",
    [("covid", "VALUE=CLASS"), ("a=covid,b=flu", "must be one of non, covid"), ("a=covid,A=non", "mapped twice")],
)
def test_parse_label_map_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_label_map(text)


def test_manifest_on_s3_resolves_relative_paths(s3_bucket, tmp_path):
    bucket, client = s3_bucket
    _tree(tmp_path / "ds", ["img/a.png", "img/b.png"])
    (tmp_path / "ds" / "meta").mkdir()
    (tmp_path / "ds" / "meta" / "labels.csv").write_text(
        "path,label,source\n../img/a.png,covid,x\n../img/b.png,non,y\n"
    )
    upload_tree(client, bucket, tmp_path / "ds", "archive")
    files = labelled_files(f"s3://{bucket}/archive/meta/labels.csv")
    assert [(f.path, f.label, f.meta["source"]) for f in files] == [
        (f"s3://{bucket}/archive/img/a.png", 1, "x"),
        (f"s3://{bucket}/archive/img/b.png", 0, "y"),
    ]
