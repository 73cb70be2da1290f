"""Labelled image files and leak-free splits (plain functions: no Ray, no torch).

A dataset is a local folder or ``s3://`` prefix laid out as

    ROOT/{train,test}/{covid,non}/...     (COVID-Xray-5k's own layout; ``split`` picks the sub-folder)
    ROOT/{covid,non}/...                  (no split level)
    ROOT = .../covid  or  .../non         (one class only, e.g. ``external/hannover-covid/covid``)
    ROOT = labels.csv or labels.parquet   (a labelled manifest: :func:`manifest_files`)

Class and split folder names match case-insensitively; images are found recursively below each class
folder (:func:`cxr.sources.list_images`); other folders and loose files next to them are ignored.

Splits are stratified by label and grouped by patient, so that no patient has images on both sides.
The patient comes from CheXpert-style names (``patient00042``); a file without one is its own group.
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from . import storage
from .errors import InputError
from .sources import is_manifest, list_images, read_manifest_table

CLASS_NAMES = ("non", "covid")  # label index 0 = non, 1 = covid (same order as cxr.checkpoint.CLASS_NAMES)
SPLIT_NAMES = ("train", "test")
FINGERPRINT_VERSION = "cxr-data-v1"

_PATIENT_IN_NAME = re.compile(r"(?<![a-z0-9])patient(\d+)(?![0-9])", re.IGNORECASE)
_PATIENT_DIR = re.compile(r"patient(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class LabelledFile:
    path: str  # full URI (local absolute path or s3://...)
    label: int  # 0 non, 1 covid
    group: str  # patient id where the path carries one (or a manifest's patient column), else the path itself
    # a labelled manifest's other columns (source, view, patient, ...): column -> value, empty values left out
    meta: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 (non) or 1 (covid), got {self.label!r}")


def patient_id(path: str) -> str | None:
    """``'patient00042'`` from a CheXpert-style path, else None.

    Looks in the file name first (``Atelectasis-patient00042-study1-view1_frontal.jpg``,
    ``patient00042_study1_view1_frontal.jpg``), then for a folder named exactly ``patientNNNNN``
    (CheXpert's own ``patient00042/study1/view1_frontal.jpg``). Case-insensitive; returned lower-case.
    """
    parts = path.replace("\\", "/").rstrip("/").split("/")
    if m := _PATIENT_IN_NAME.search(parts[-1]):
        return f"patient{m.group(1)}"
    for part in reversed(parts[:-1]):
        if m := _PATIENT_DIR.fullmatch(part):
            return f"patient{m.group(1)}"
    return None


def read_group_table(uri: str, option: str = "groups") -> dict[str, str]:
    """File name -> group from a CSV or TSV (local or s3://) with the columns ``file`` and ``group`` (other
    columns are ignored): the train job's ``--groups`` and the evaluate job's ``--group-by TABLE``.
    :class:`InputError` naming ``option`` when it cannot be read or lacks those columns."""
    import csv
    import io

    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except Exception as exc:  # noqa: BLE001 - missing, unreadable, not text: all mean a bad table
        raise InputError(f"{option} {uri}: cannot read it ({storage.describe_error(exc)})") from None
    rows = csv.DictReader(io.StringIO(text), delimiter="\t" if uri.lower().endswith(".tsv") else ",")
    if not {"file", "group"} <= set(rows.fieldnames or []):
        raise InputError(f"{option} {uri}: needs the columns 'file' and 'group', has {rows.fieldnames}")
    return {
        posixpath.basename(row["file"].strip()): (row["group"] or "").strip() or "(empty)"
        for row in rows
        if row["file"]
    }


def _class_dirs(fs: pafs.FileSystem, path: str) -> list[tuple[str, int]]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(
        (i.path, CLASS_NAMES.index(posixpath.basename(i.path).lower()))
        for i in infos
        if i.type == pafs.FileType.Directory and posixpath.basename(i.path).lower() in CLASS_NAMES
    )


def _split_dirs(fs: pafs.FileSystem, path: str) -> dict[str, list[str]]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    out: dict[str, list[str]] = {}
    for i in infos:
        name = posixpath.basename(i.path).lower()
        if i.type == pafs.FileType.Directory and name in SPLIT_NAMES:
            out.setdefault(name, []).append(i.path)
    return out


def apply_groups(files: list[LabelledFile], groups: dict[str, str] | None) -> list[LabelledFile]:
    """``files`` with the group of every file that ``groups`` (file name -> group, :func:`read_group_table`)
    names; the others keep theirs (patient id or own path), and so does every file whose manifest row names
    its patient (the manifest's ``patient`` column replaces ``--groups`` for those rows)."""
    if not groups:
        return files
    return [
        dataclasses.replace(f, group=f"g:{groups[posixpath.basename(f.path)]}")
        if posixpath.basename(f.path) in groups and PATIENT_COLUMN not in f.meta
        else f
        for f in files
    ]


# --------------------------------------------------------------------------- labelled manifests

LABEL_COLUMN = "label"
PATIENT_COLUMN = "patient"


def parse_label_map(text: str) -> dict[str, str]:
    """``'COVID-19=covid,Pneumonia=non,Normal=non'`` -> ``{'covid-19': 'covid', 'pneumonia': 'non', ...}``: a
    labelled manifest's label values (case-insensitive, stripped) -> class name. :class:`ValueError` for an
    entry without ``=``, a class other than covid/non, or a value named twice."""
    out: dict[str, str] = {}
    for entry in text.split(","):
        value, sep, cls = entry.partition("=")
        value, cls = value.strip().casefold(), cls.strip().lower()
        if not sep or not value:
            raise ValueError(f"expected VALUE=CLASS entries separated by commas, got {entry.strip()!r}")
        if cls not in CLASS_NAMES:
            raise ValueError(f"{entry.strip()!r}: the class must be one of {', '.join(CLASS_NAMES)}")
        if value in out:
            raise ValueError(f"label value {value!r} is mapped twice")
        out[value] = cls
    return out


def _rows(rows: list[int], paths: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"{i + 1}" + (f" ({posixpath.basename(paths[i])})" if paths[i] else "") for i in rows[:limit])
    return f"row{'s' if len(rows) > 1 else ''} {shown}" + (
        f" and {len(rows) - limit} more" if len(rows) > limit else ""
    )


def manifest_files(
    uri: str, settings: storage.S3Settings | None = None, label_map: Mapping[str, str] | None = None
) -> list[LabelledFile]:
    """The labelled files a CSV or Parquet table lists, sorted by path: column ``path`` (or ``uri``; relative to
    the table's folder, local or ``s3://``) and ``label``, whose values ``label_map`` (value -> covid/non, see
    :func:`parse_label_map`; default: the class names themselves) maps, case-insensitively. An optional ``patient``
    column is the split's group; every other column is carried as ``meta``. Rows are counted from 1 after the
    header. :class:`InputError` naming the rows for a missing or unknown label, a missing path, or a path listed
    twice."""
    label_map = {k.casefold(): v for k, v in (label_map or {c: c for c in CLASS_NAMES}).items()}
    table = read_manifest_table(uri, settings, every_column=True)
    if LABEL_COLUMN not in table.column_names:
        raise InputError(
            f"labelled manifest {uri} has no {LABEL_COLUMN!r} column (columns: {', '.join(table.column_names[:10])})"
        )
    rows = table.to_pylist()
    paths = [r["path"] for r in rows]
    known = ", ".join(f"{v}={c}" for v, c in label_map.items())
    problems = {
        "no path": [i for i, r in enumerate(rows) if not r["path"]],
        "no label": [i for i, r in enumerate(rows) if not (r[LABEL_COLUMN] or "").strip()],
        "an unknown label": [
            i
            for i, r in enumerate(rows)
            if (r[LABEL_COLUMN] or "").strip() and (r[LABEL_COLUMN] or "").strip().casefold() not in label_map
        ],
    }
    seen: dict[str, int] = {}
    problems["a path listed before"] = [i for i, p in enumerate(paths) if p and seen.setdefault(p, i) != i]
    bad = [f"{_rows(idx, paths)} with {what}" for what, idx in problems.items() if idx]
    if bad:
        unknown = sorted({rows[i][LABEL_COLUMN].strip() for i in problems["an unknown label"]})
        hint = f" (values {', '.join(map(repr, unknown[:5]))}; --label-map maps {known})" if unknown else ""
        raise InputError(f"labelled manifest {uri}: " + "; ".join(bad) + hint)
    if not rows:
        raise InputError(f"labelled manifest {uri} lists no images")
    out = []
    for r in rows:
        scheme, sep, rest = r["path"].rpartition("://")
        path = scheme + sep + posixpath.normpath(rest)  # 'labels/../images/a.png' -> 'images/a.png'
        meta = {k: str(v).strip() for k, v in r.items() if k not in ("path", LABEL_COLUMN) and v is not None}
        meta = {k: v for k, v in meta.items() if v}
        label = CLASS_NAMES.index(label_map[r[LABEL_COLUMN].strip().casefold()])
        group = f"patient:{meta[PATIENT_COLUMN]}" if PATIENT_COLUMN in meta else (patient_id(path) or path)
        out.append(LabelledFile(path, label, group, meta))
    return sorted(out, key=lambda f: f.path)


def labelled_files(
    uri: str,
    split: str | None = "train",
    settings: storage.S3Settings | None = None,
    label_map: Mapping[str, str] | None = None,
) -> list[LabelledFile]:
    """Every image below ``uri``'s class folders, labelled by folder, sorted by path; or, where ``uri`` is a
    ``.csv``/``.parquet`` table, the files it lists with their labels mapped by ``label_map`` and their
    metadata (:func:`manifest_files`; ``split`` is ignored, as for a folder without a split level).

    With a ``{train,test}`` layout ``split`` picks the sub-folder; ``split=None`` takes every split
    folder present (e.g. all of an external set of normals). Without a split level ``split`` is ignored.
    Raises :class:`InputError` when ``uri`` is missing or holds no ``covid``/``non`` folder.
    """
    if is_manifest(uri):
        return manifest_files(uri, settings, label_map)
    layout = "expected {covid,non}/ or {train,test}/{covid,non}/ below it, or a folder itself named covid or non"
    fs, root = storage.filesystem(uri, settings)
    try:
        kind = fs.get_file_info(root).type
        if kind == pafs.FileType.File:
            raise InputError(f"{uri} is a file, not a dataset folder ({layout})")
        if kind == pafs.FileType.NotFound and not storage.is_s3(uri):
            raise InputError(f"dataset not found: {uri}")
        classes = _class_dirs(fs, root)
        if not classes and (splits := _split_dirs(fs, root)):
            if split is None:
                chosen = [p for name in SPLIT_NAMES for p in splits.get(name, [])]
            elif split.lower() in splits:
                chosen = splits[split.lower()]
            else:
                raise InputError(f"no {split!r} split folder in {uri} (found: {', '.join(sorted(splits))})")
            classes = [c for d in chosen for c in _class_dirs(fs, d)]
        if not classes and posixpath.basename(root).lower() in CLASS_NAMES:
            classes = [(root, CLASS_NAMES.index(posixpath.basename(root).lower()))]
    except OSError as exc:
        raise InputError(f"cannot list {uri}: {storage.describe_error(exc)}") from exc
    if not classes:
        where = f"{uri} (split {split!r})" if split else uri
        raise InputError(f"no class folder (covid or non) in {where}: {layout}")
    out = [
        LabelledFile(p, label, patient_id(p) or p)
        for path, label in classes
        for p in list_images(storage.to_uri(fs, path), settings)
    ]
    return sorted(out, key=lambda f: f.path)


MISSING = "(missing)"


def column_values(files, column: str, option: str = "--by") -> dict[str, str]:
    """path -> the value of metadata column ``column`` (a labelled manifest's column; :data:`MISSING` where a row
    leaves it empty or the file comes from a folder). :class:`InputError` (naming ``option``) when no file has that
    column, naming the columns there are."""
    if not any(column in f.meta for f in files):
        columns = sorted({c for f in files for c in f.meta})
        where = f"their columns: {', '.join(columns)}" if columns else "they come from class folders, not a manifest"
        raise InputError(f"{option} {column}: no labelled image has a {column!r} column ({where})")
    return {f.path: f.meta.get(column, MISSING) for f in files}


# --------------------------------------------------------------------------- splits


def _folds(files, n_splits: int, seed: int) -> tuple[list[LabelledFile], list[tuple[list[int], list[int]]]]:
    from sklearn.model_selection import StratifiedGroupKFold

    files = sorted(files, key=lambda f: f.path)  # the split depends on the set, not the input order
    n_groups = len({f.group for f in files})
    if n_splits < 2:
        raise ValueError(f"need at least 2 folds, got {n_splits}")
    if n_groups < n_splits:
        raise ValueError(f"cannot split {len(files)} files in {n_groups} patient groups into {n_splits} folds")
    labels = [f.label for f in files]
    groups = [f.group for f in files]
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return files, [(list(tr), list(va)) for tr, va in cv.split(labels, labels, groups)]


def _take(files, idx) -> list[LabelledFile]:
    return [files[i] for i in idx]


MAX_VAL_FRACTION = 0.5  # the validation split is one fold of round(1 / fraction): at least 2 folds


def split_train_val(files, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[LabelledFile], list[LabelledFile]]:
    """(train, val): one fold of ``StratifiedGroupKFold(round(1/val_fraction), shuffle=True, seed)``.

    The first fold is the validation set, unless it lacks a positive (covid) on either side while there
    are >= 2 positive patient groups: then the first fold that has positives on both sides is taken.
    Both lists come sorted by path; the result depends only on the set of files and the seed.
    """
    if not 0 < val_fraction <= MAX_VAL_FRACTION:
        raise ValueError(f"val_fraction must be in (0, {MAX_VAL_FRACTION}], got {val_fraction}")
    files, folds = _folds(files, round(1 / val_fraction), seed)
    chosen = folds[0]
    if len({f.group for f in files if f.label == 1}) >= 2:
        has_pos = lambda idx: any(files[i].label == 1 for i in idx)  # noqa: E731
        chosen = next((fold for fold in folds if has_pos(fold[0]) and has_pos(fold[1])), chosen)
    return _take(files, chosen[0]), _take(files, chosen[1])


def cv_folds(files, n_splits: int = 5, seed: int = 0) -> list[tuple[list[LabelledFile], list[LabelledFile]]]:
    """Every (train, val) fold of the same stratified, patient-grouped K-fold split."""
    files, folds = _folds(files, n_splits, seed)
    return [(_take(files, tr), _take(files, va)) for tr, va in folds]


# --------------------------------------------------------------------------- groups: hold out, balance

MISSING_GROUP = MISSING  # the group of a file whose manifest row leaves the column empty (or has no manifest)
# A group that holds one class only (in the training images) gets this share of what a group holding both gets:
# every image of it says "this source means this class", the shortcut that balancing is there to remove.
ONE_CLASS_SHARE = 0.1


def group_values(files, column: str, option: str = "--by") -> list[str]:
    """Each file's value of metadata column ``column`` (:data:`MISSING` where it has none), aligned with ``files``;
    :func:`column_values`' error when no file has that column."""
    values = column_values(files, column, option)
    return [values[f.path] for f in files]


@dataclass(frozen=True)
class Holdout:
    """One leave-one-group-out split: the rows of one value of a column held out, the rest to train on."""

    value: str
    held: list  # the rows whose column is ``value``
    rest: list  # every row of a patient with no row in ``held`` (patients never split)


def holdout_splits(files, column: str) -> list[Holdout]:
    """One :class:`Holdout` per value of ``column``, sorted by value. A patient with rows under two values
    leaves the training side of both (their rows are scored only where their value is held out). Rows without
    a value are never held out: they always train. :class:`InputError` without at least two values."""
    values = group_values(files, column, "--holdout-by")
    named = sorted({v for v in values if v != MISSING_GROUP})
    if len(named) < 2:
        raise InputError(f"--holdout-by {column}: need at least two values to hold out, found {named or 'none'}")
    out = []
    for value in named:
        held = [f for f, v in zip(files, values) if v == value]
        held_groups = {f.group for f in held}
        out.append(Holdout(value, held, [f for f in files if f.group not in held_groups]))
    return out


def balance_weights(files, column: str) -> list[float]:
    """Per-image training weights (aligned with ``files``) under which every value of ``column`` contributes the
    same share of each class: within class c, a group holding both classes gets share 1, a group holding class
    c only gets :data:`ONE_CLASS_SHARE`, and each group's share is split evenly among its images of class c.
    Every class keeps its total weight (its image count), so the class weight and ``--oversample`` act as
    without balancing. Rows without a value form one more group."""
    values = group_values(files, column, "--balance-by")
    labels = [f.label for f in files]
    classes_of: dict[str, set[int]] = {}
    count: dict[tuple[str, int], int] = {}
    for v, y in zip(values, labels):
        classes_of.setdefault(v, set()).add(y)
        count[v, y] = count.get((v, y), 0) + 1
    share = {v: 1.0 if len(c) == 2 else ONE_CLASS_SHARE for v, c in classes_of.items()}
    n_class = {y: labels.count(y) for y in set(labels)}
    total_share = {y: sum(share[v] for v in classes_of if y in classes_of[v]) for y in n_class}
    return [n_class[y] * share[v] / (total_share[y] * count[v, y]) for v, y in zip(values, labels)]


# --------------------------------------------------------------------------- summaries


def fingerprint(files) -> str:
    """SHA-256 hex of the file list: sorted ``label<TAB>relative path`` lines.

    Paths are taken relative to the files' deepest common folder, so a dataset copied elsewhere (another
    mount, an S3 prefix) keeps its fingerprint, while adding, removing, renaming or relabelling a file
    changes it. File contents are not read. Independent of the input order.
    """
    split = [f.path.replace("\\", "/").split("/") for f in files]
    common = split[0][:-1] if split else []
    for parts in split[1:]:
        n = 0
        while n < min(len(common), len(parts) - 1) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    lines = sorted(f"{f.label}\t{'/'.join(p[len(common) :])}" for f, p in zip(files, split))
    return hashlib.sha256("\n".join([FINGERPRINT_VERSION, *lines]).encode()).hexdigest()


def class_counts(files) -> dict[str, int]:
    counts = dict.fromkeys(CLASS_NAMES, 0)
    for f in files:
        counts[CLASS_NAMES[f.label]] += 1
    return counts
