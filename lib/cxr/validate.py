"""Data validation: integrity, duplicates and leakage, class balance, and a metadata-only baseline.

    labelled files (data.labelled_files, every split)      on the driver
      -> Ray Data .map_batches(inspect_batch)              tasks: read bytes, sniff, decode (decode.py),
                                                           header mode/bit depth, SHA-256, perceptual hash
      -> rows collected on the driver                      one small row per file (no pixels)
      -> checks + metadata baseline (scikit-learn)         on the driver
      -> validation.json, report.html, plots

Checks, each a *finding* with a severity (``error`` findings make ``--strict`` fail):

============================  ========  ==========================================================
check                         severity  what
============================  ========  ==========================================================
``unreadable``                error     empty, truncated, corrupt, not an image (decode.py's reason)
``duplicate_across_splits``   error     identical bytes (SHA-256) in train and test: leakage
``near_duplicate_across_...`` error     near-identical images (two image hashes) in train and test: leakage
``patient_overlap``           error     one patient id (CheXpert-style names) in several splits
``label_conflict``            error     identical bytes filed under both classes
``not_frontal``               warning   lateral or oblique DICOM views (ViewPosition): left out of training and scoring
``wrong_extension``           warning   content (magic bytes) does not match the file extension
``unexpected_mode``           warning   not 8/16-bit grayscale (RGB, palette, CMYK, 1-bit, ...)
``tiny_image`` / ``huge_...`` warning   shorter side < ``min_side`` / more than ``max_pixels``
``duplicate_within_split``    warning   identical bytes twice in one split (weights that image double)
``near_duplicate_within_...`` warning   near-identical images in one split
``class_imbalance``           warning   the smallest class has < 10% of a split's images
``metadata_shortcut``         warning   file properties alone predict the label (CV ROC AUC >= 0.8)
============================  ========  ==========================================================

Near duplicates: two 64-bit hashes of the decoded grayscale image, the DCT perceptual hash
(``imagehash.phash``) and the difference hash (``imagehash.dhash``); two files are near duplicates when
both hashes differ in at most ``near_distance`` bits (default 4) and their bytes differ. (The phash
alone puts unrelated CheXpert X-rays of different patients within 4 bits of each other; on
COVID-Xray-5k requiring the dhash too keeps the true copies, which differ by 0-2 bits in both, and
drops those.) Candidate pairs are found by the pigeonhole principle (two hashes within d bits
agree exactly on at least one of d+1 bit chunks), so 10^5 files do not need 10^10 comparisons.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import storage
from .data import CLASS_NAMES, SPLIT_NAMES, column_values, labelled_files, patient_id
from .decode import decode, is_non_frontal, sniff_kind
from .errors import InputError
from .sources import table_dataset

log = logging.getLogger(__name__)

GRAYSCALE_MODES = ("L", "I;16", "I;16B", "I;16L", "I", "MONOCHROME1", "MONOCHROME2")
_BITS = {
    "1": 1,
    "L": 8,
    "P": 8,
    "LA": 8,
    "RGB": 8,
    "RGBA": 8,
    "CMYK": 8,
    "YCbCr": 8,
    "I;16": 16,
    "I;16B": 16,
    "I;16L": 16,
    "I": 32,
    "F": 32,
}
_EXT_KIND = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".dcm": "dicom"}

INSPECT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("split", pa.string()),
        ("label", pa.int8()),
        ("size_bytes", pa.int64()),
        ("ext", pa.string()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("bits", pa.int16()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("view", pa.string()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
        ("dhash", pa.string()),
        ("error", pa.string()),
        ("thumbnail", pa.binary()),  # THUMBNAIL x THUMBNAIL grayscale uint8, only for the source control
    ]
)
THUMBNAIL = 32


# --------------------------------------------------------------------------- per file (Ray tasks)


def _header(data: bytes, kind: str | None) -> tuple[str | None, int | None]:
    """(mode, bits per sample) from the header alone: Pillow's mode for PNG/JPEG, the photometric
    interpretation and BitsStored for DICOM."""
    try:
        if kind == "dicom":
            import pydicom

            ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, force=True)
            bits = ds.get("BitsStored") or ds.get("BitsAllocated")
            return str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper(), int(bits) if bits else None
        from PIL import Image

        with Image.open(BytesIO(data)) as im:
            return im.mode, _BITS.get(im.mode)
    except Exception:  # noqa: BLE001 - the decode error says why
        return None, None


def _hashes(image: np.ndarray) -> tuple[str, str]:
    """64-bit perceptual (DCT) and difference hashes of the decoded grayscale image, as hex."""
    import imagehash
    from PIL import Image

    im = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8), "L")
    return str(imagehash.phash(im)), str(imagehash.dhash(im))


def thumbnail(image: np.ndarray, side: int = THUMBNAIL) -> bytes:
    """The decoded grayscale image (floats in [0, 1]) shrunk to ``side`` x ``side`` (area average, aspect not
    kept), as uint8 bytes: what the source control's image model sees."""
    from PIL import Image

    im = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8), "L")
    return im.resize((side, side), Image.Resampling.BOX).tobytes()


def inspect_bytes(path: str, data: bytes | None, read_error: str | None = None, thumbnails: bool = False) -> dict:
    """Every property the checks need, for one file (a ``thumbnail`` of the image too with ``thumbnails``):
    never raises."""
    ext = posixpath.splitext(path)[1].lower()
    row = {
        "path": path,
        "size_bytes": None if data is None else len(data),
        "ext": ext,
        "format": None,
        "mode": None,
        "bits": None,
        "width": None,
        "height": None,
        "view": None,
        "sha256": None,
        "phash": None,
        "dhash": None,
        "error": read_error,
        "thumbnail": None,
    }
    if data is None:
        return row
    row["sha256"] = hashlib.sha256(data).hexdigest()
    row["format"] = sniff_kind("", data[:132])  # by content only
    row["mode"], row["bits"] = _header(data, row["format"])
    decoded = decode(data, path, frontal_only=False)  # a lateral view is readable: reported as a view below
    row["width"], row["height"], row["error"], row["view"] = decoded.width, decoded.height, decoded.error, decoded.view
    if decoded.ok:
        row["phash"], row["dhash"] = _hashes(decoded.image)
        if thumbnails:
            row["thumbnail"] = thumbnail(decoded.image)
    return row


def _inspect_one(path: str, settings: storage.S3Settings, thumbnails: bool) -> dict:
    try:
        data = storage.read_bytes(path, settings)
    except Exception as exc:  # noqa: BLE001
        return inspect_bytes(path, None, f"read failed: {storage.describe_error(exc)}")
    return inspect_bytes(path, data, thumbnails=thumbnails)


def inspect_batch(batch: pa.Table, settings: storage.S3Settings, thumbnails: bool = False) -> pa.Table:
    """Ray Data task: inspect a batch of files (threads overlap reads and decoding)."""
    paths = batch["path"].to_pylist()
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(paths)))) as pool:
        rows = list(pool.map(lambda p: _inspect_one(p, settings, thumbnails), paths))
    cols = {name: [r[name] for r in rows] for name in INSPECT_SCHEMA.names if name not in ("split", "label")}
    cols["split"], cols["label"] = batch["split"].to_pylist(), batch["label"].to_pylist()
    return pa.table(
        {n: pa.array(cols[n], INSPECT_SCHEMA.field(n).type) for n in INSPECT_SCHEMA.names}, schema=INSPECT_SCHEMA
    )


def _split_of(path: str, root: str) -> str:
    rel = path[len(root) :].lstrip("/") if path.startswith(root) else path
    first = rel.split("/", 1)[0].lower()
    return first if first in SPLIT_NAMES else "all"


def list_labelled(
    uri: str,
    settings: storage.S3Settings | None = None,
    label_map: dict | None = None,
    source_column: str | None = None,
) -> pa.Table:
    """``path, split, label, group`` for every image below ``uri`` (all splits present), or every image a labelled
    manifest lists (``label_map``: its label values -> class, :func:`cxr.data.manifest_files`); ``group`` is the
    patient (else the path). With ``source_column``, that metadata column too, as ``source``
    (:class:`InputError` when no file has it, e.g. a folder dataset)."""
    files = labelled_files(uri, split=None, settings=settings, label_map=label_map)
    if not files:
        raise InputError(f"no labelled images in {uri}")
    fs, root = storage.filesystem(uri, settings)
    root = storage.to_uri(fs, root).rstrip("/")
    columns = {
        "path": [f.path for f in files],
        "split": [_split_of(f.path, root) for f in files],
        "label": pa.array([f.label for f in files], pa.int8()),
        "group": [f.group for f in files],
    }
    if source_column:
        values = column_values(files, source_column, "--source-column")
        columns["source"] = [values[f.path] for f in files]
    return pa.table(columns)


def inspect_files(
    files: pa.Table, settings: storage.S3Settings | None = None, *, batch_size: int = 64, thumbnails: bool = False
) -> pa.Table:
    """Inspect every file of ``files`` (``path, split, label``) on the Ray cluster; rows come back to the driver
    (with a ``thumbnail`` of each readable image where ``thumbnails``)."""
    import ray

    from .runtime import ensure_ray

    settings = settings or storage.s3_settings()
    ensure_ray()
    ds = table_dataset(files).map_batches(
        inspect_batch, fn_args=(settings, thumbnails), batch_size=batch_size, batch_format="pyarrow", num_cpus=1
    )
    refs = ds.to_arrow_refs()
    return pa.concat_tables(ray.get(refs)).cast(INSPECT_SCHEMA)


# --------------------------------------------------------------------------- checks (driver)


@dataclass
class Finding:
    severity: str  # "error" | "warning"
    check: str
    message: str
    files: list = field(default_factory=list)  # paths, or lists of paths for groups/pairs
    count: int = 0

    def to_dict(self) -> dict:
        return {
            "severity": self.severity,
            "check": self.check,
            "message": self.message,
            "count": self.count,
            "files": self.files[:50],
            "files_truncated": max(0, len(self.files) - 50),
        }


def near_duplicate_pairs(hashes: list[int | None], max_distance: int = 4) -> list[tuple[int, int, int]]:
    """Index pairs ``(i, j, distance)``, i < j, whose 64-bit hashes differ in at most ``max_distance`` bits.

    Pigeonhole: hashes within d bits agree on at least one of d+1 disjoint bit chunks; only pairs
    sharing a chunk value are compared.
    """
    idx = np.array([i for i, h in enumerate(hashes) if h is not None], dtype=np.int64)
    if len(idx) < 2:
        return []
    values = np.array([hashes[i] for i in idx], dtype=np.uint64)
    k = max_distance + 1
    bounds = np.linspace(0, 64, k + 1).astype(int)
    found: dict[tuple[int, int], int] = {}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        chunk = (values >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(chunk, kind="stable")
        sorted_chunk = chunk[order]
        starts = np.flatnonzero(np.r_[True, sorted_chunk[1:] != sorted_chunk[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            members = order[s:e]
            v = values[members]
            dist = np.bitwise_count(v[:, None] ^ v[None, :])
            a, b = np.nonzero(np.triu(dist <= max_distance, k=1))
            for x, y in zip(a, b):
                i, j = sorted((int(idx[members[x]]), int(idx[members[y]])))
                found[(i, j)] = int(dist[x, y])
    return sorted((i, j, d) for (i, j), d in found.items())


def _cls(label) -> str:
    return CLASS_NAMES[int(label)]


def integrity_findings(rows: list[dict], min_side: int, max_pixels: int) -> list[Finding]:
    """The integrity checks as one list of findings, one block per check (unreadable, tiny, huge, odd modes, ...):
    long, but flat."""
    out = []
    bad = [r for r in rows if r["error"]]
    if bad:
        reasons = defaultdict(int)
        for r in bad:
            reasons[r["error"].split(":")[0]] += 1
        summary = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        out.append(
            Finding(
                "error",
                "unreadable",
                f"{len(bad)} file(s) cannot be decoded ({summary})",
                [f"{r['path']}: {r['error']}" for r in bad],
                len(bad),
            )
        )
    wrong = []
    for r in rows:
        expected = _EXT_KIND.get(r["ext"])
        if r["format"] and expected and r["format"] != expected:
            wrong.append(f"{r['path']}: {r['format'].upper()} content with a {r['ext']} extension")
    if wrong:
        out.append(
            Finding(
                "warning",
                "wrong_extension",
                f"{len(wrong)} file(s) whose content does not match their extension",
                wrong,
                len(wrong),
            )
        )
    odd = [r for r in rows if not r["error"] and r["mode"] and r["mode"] not in GRAYSCALE_MODES]
    if odd:
        modes = defaultdict(lambda: defaultdict(int))
        for r in odd:
            modes[r["mode"]][_cls(r["label"])] += 1
        detail = "; ".join(
            f"{m}: " + ", ".join(f"{n} {c}" for c, n in sorted(by.items())) for m, by in sorted(modes.items())
        )
        out.append(
            Finding(
                "warning",
                "unexpected_mode",
                f"{len(odd)} image(s) are not 8/16-bit grayscale ({detail})",
                [f"{r['path']}: mode {r['mode']}" for r in odd],
                len(odd),
            )
        )
    side = [r for r in rows if is_non_frontal(r.get("view"))]
    if side:
        views = ", ".join(
            f"{n} {v}" for v, n in sorted(Counter(r["view"] for r in side).items(), key=lambda kv: -kv[1])
        )
        out.append(
            Finding(
                "warning",
                "not_frontal",
                f"{len(side)} DICOM file(s) are lateral or oblique views ({views}): training "
                "leaves them out, scoring gives them error rows unless --all-views",
                [f"{r['path']}: ViewPosition {r['view']}" for r in side],
                len(side),
            )
        )
    tiny = [r for r in rows if r["width"] and r["height"] and min(r["width"], r["height"]) < min_side]
    if tiny:
        out.append(
            Finding(
                "warning",
                "tiny_image",
                f"{len(tiny)} image(s) with a side shorter than {min_side} px",
                [f"{r['path']}: {r['width']}x{r['height']}" for r in tiny],
                len(tiny),
            )
        )
    huge = [r for r in rows if r["width"] and r["height"] and r["width"] * r["height"] > max_pixels]
    if huge:
        out.append(
            Finding(
                "warning",
                "huge_image",
                f"{len(huge)} image(s) larger than {max_pixels:,} pixels",
                [f"{r['path']}: {r['width']}x{r['height']}" for r in huge],
                len(huge),
            )
        )
    return out


def duplicate_findings(rows: list[dict], near_distance: int) -> tuple[list[Finding], dict]:
    """Exact and near duplicates within and across splits as findings, one block per kind: long, but flat."""
    out = []
    by_hash = defaultdict(list)
    for r in rows:
        if r["sha256"] and r["size_bytes"]:
            by_hash[r["sha256"]].append(r)
    groups = [g for g in by_hash.values() if len(g) > 1]
    across = [g for g in groups if len({r["split"] for r in g}) > 1]
    within = [g for g in groups if len({r["split"] for r in g}) == 1]
    conflict = [g for g in groups if len({r["label"] for r in g}) > 1]
    paths = lambda g: [r["path"] for r in g]  # noqa: E731
    if across:
        out.append(
            Finding(
                "error",
                "duplicate_across_splits",
                f"{len(across)} file(s) appear byte-identical in more than one split (leakage: test images seen in "
                "training)",
                [paths(g) for g in across],
                len(across),
            )
        )
    if conflict:
        out.append(
            Finding(
                "error",
                "label_conflict",
                f"{len(conflict)} identical file(s) are filed under both classes",
                [paths(g) for g in conflict],
                len(conflict),
            )
        )
    if within:
        out.append(
            Finding(
                "warning",
                "duplicate_within_split",
                f"{len(within)} group(s) of byte-identical files within one split",
                [paths(g) for g in within],
                len(within),
            )
        )
    hashes = [int(r["phash"], 16) if r["phash"] else None for r in rows]
    dhash = lambda r: int(r["dhash"], 16)  # noqa: E731
    near = [
        (i, j, d)
        for i, j, d in near_duplicate_pairs(hashes, near_distance)
        if rows[i]["sha256"] != rows[j]["sha256"]
        and rows[i]["dhash"]
        and rows[j]["dhash"]
        and (dhash(rows[i]) ^ dhash(rows[j])).bit_count() <= near_distance
    ]
    near_across = [(i, j, d) for i, j, d in near if rows[i]["split"] != rows[j]["split"]]
    near_within = [(i, j, d) for i, j, d in near if rows[i]["split"] == rows[j]["split"]]
    fmt = lambda i, j, d: [rows[i]["path"], rows[j]["path"], f"{d} bits"]  # noqa: E731
    if near_across:
        out.append(
            Finding(
                "error",
                "near_duplicate_across_splits",
                f"{len(near_across)} pair(s) of near-identical images (perceptual and difference hashes within "
                f"{near_distance} bits) in different splits (leakage)",
                [fmt(*p) for p in near_across],
                len(near_across),
            )
        )
    if near_within:
        out.append(
            Finding(
                "warning",
                "near_duplicate_within_split",
                f"{len(near_within)} pair(s) of near-identical images (perceptual and difference hashes within "
                f"{near_distance} bits) within one split",
                [fmt(*p) for p in near_within],
                len(near_within),
            )
        )
    stats = {
        "exact_groups": len(groups),
        "exact_groups_across_splits": len(across),
        "near_pairs": len(near),
        "near_pairs_across_splits": len(near_across),
        "near_distance_bits": near_distance,
    }
    return out, stats


def patient_findings(rows: list[dict]) -> tuple[list[Finding], dict]:
    splits = defaultdict(set)
    for r in rows:
        if (pid := patient_id(r["path"])) is not None:
            splits[pid].add(r["split"])
    shared = sorted(p for p, s in splits.items() if len(s) > 1)
    stats = {
        "files_with_patient_id": sum(1 for r in rows if patient_id(r["path"])),
        "patients": len(splits),
        "patients_in_several_splits": len(shared),
    }
    if not shared:
        return [], stats
    examples = [f"{p}: {', '.join(sorted(splits[p]))}" for p in shared]
    return [
        Finding(
            "error",
            "patient_overlap",
            f"{len(shared)} patient(s) have images in more than one split (leakage)",
            examples,
            len(shared),
        )
    ], stats


def balance(rows: list[dict]) -> tuple[list[Finding], dict]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(CLASS_NAMES, 0))
    for r in rows:
        counts[r["split"]][_cls(r["label"])] += 1
    out = []
    for split, c in sorted(counts.items()):
        total = sum(c.values())
        smallest = min(c, key=c.get)
        if total and c[smallest] == 0:
            out.append(
                Finding(
                    "warning",
                    "class_imbalance",
                    f"split {split}: only {max(c, key=c.get)} images (one class: nothing to train a classifier on, "
                    "and only sensitivity or the false-positive rate to evaluate)",
                    [],
                    0,
                )
            )
        elif total and c[smallest] / total < 0.10:
            out.append(
                Finding(
                    "warning",
                    "class_imbalance",
                    f"split {split}: {smallest} is {c[smallest]} of {total} images ({100 * c[smallest] / total:.1f}%)",
                    [],
                    c[smallest],
                )
            )
    return out, {k: dict(v) for k, v in counts.items()}


def _describe(values) -> dict:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    if a.size == 0:
        return {"n": 0}
    q = np.percentile(a, [0, 5, 50, 95, 100])
    return {
        "n": int(a.size),
        "min": q[0],
        "p5": q[1],
        "median": q[2],
        "p95": q[3],
        "max": q[4],
        "mean": float(a.mean()),
    }


def distributions(rows: list[dict]) -> dict:
    out = {}
    for label, name in enumerate(CLASS_NAMES):
        sel = [r for r in rows if r["label"] == label and not r["error"]]
        modes, formats = defaultdict(int), defaultdict(int)
        for r in sel:
            modes[r["mode"] or "?"] += 1
            formats[r["format"] or "?"] += 1
        out[name] = {
            "width": _describe(r["width"] for r in sel),
            "height": _describe(r["height"] for r in sel),
            "size_bytes": _describe(r["size_bytes"] for r in sel),
            "mode": dict(modes),
            "format": dict(formats),
        }
    return out


# --------------------------------------------------------------------------- metadata-only baseline

METADATA_FEATURES = (
    "width",
    "height",
    "aspect",
    "log_pixels",
    "log_size_bytes",
    "bytes_per_pixel",
    "bits",
    "mode",
    "format",
)


def metadata_frame(rows: list[dict]):
    """File properties only, one row per readable file: what a shortcut-learning model could exploit
    without looking at the lungs."""
    import pandas as pd

    ok = [r for r in rows if not r["error"] and r["width"] and r["height"]]
    df = pd.DataFrame(
        {
            "width": [r["width"] for r in ok],
            "height": [r["height"] for r in ok],
            "aspect": [r["width"] / r["height"] for r in ok],
            "log_pixels": [math.log(r["width"] * r["height"]) for r in ok],
            "log_size_bytes": [math.log1p(r["size_bytes"]) for r in ok],
            "bytes_per_pixel": [r["size_bytes"] / (r["width"] * r["height"]) for r in ok],
            "bits": [r["bits"] or 0 for r in ok],
            "mode": [r["mode"] or "?" for r in ok],
            "format": [r["format"] or "?" for r in ok],
        }
    )
    return df, np.array([int(r["label"]) for r in ok]), ok


def metadata_encoder(scale: bool):
    """The file properties as model input: numeric ones (standardised with ``scale``), mode and format one-hot."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numeric = [c for c in METADATA_FEATURES if c not in ("mode", "format")]
    return ColumnTransformer(
        [
            ("num", StandardScaler() if scale else "passthrough", numeric),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["mode", "format"]),
        ]
    )


def metadata_forest(seed: int = 0, trees: int = 200):
    """The metadata baseline's random forest on :func:`metadata_encoder`'s features."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        metadata_encoder(False),
        RandomForestClassifier(
            n_estimators=trees, min_samples_leaf=2, class_weight="balanced", random_state=seed, n_jobs=1
        ),
    )


def metadata_baseline(rows: list[dict], seed: int = 0, folds: int = 5) -> dict:
    """Cross-validated ROC AUC of two simple classifiers (logistic regression, random forest) that see
    only width, height, aspect, pixel count, file size, bytes per pixel, bit depth, mode and format.

    Folds are stratified (and grouped by patient where names carry one). ``auc`` is the better of the
    two; ~0.5 means file properties say nothing about the label, >= 0.8 flags a shortcut.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    df, y, ok = metadata_frame(rows)
    counts = np.bincount(y, minlength=2) if len(y) else np.zeros(2, int)
    n_folds = int(min(folds, counts.min()))
    if n_folds < 2:
        return {
            "auc": None,
            "reason": "needs at least 2 readable images of each class "
            f"(have {dict(zip(CLASS_NAMES, counts.tolist()))})",
        }
    groups = [patient_id(r["path"]) or r["path"] for r in ok]
    models = {
        "logistic_regression": make_pipeline(
            metadata_encoder(True), LogisticRegression(max_iter=2000, class_weight="balanced")
        ),
        "random_forest": metadata_forest(seed),
    }
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    aucs = {}
    for name, model in models.items():
        p = cross_val_predict(model, df, y, groups=groups, cv=cv, method="predict_proba")[:, 1]
        aucs[name] = float(roc_auc_score(y, p))
    best = max(aucs, key=aucs.get)
    rf = models["random_forest"].fit(df, y)
    names = list(rf[0].get_feature_names_out())
    # the features the forest splits on, strongest first (one that never varies, e.g. every width 96, has importance 0)
    importance = sorted(
        ((n.split("__", 1)[-1], round(v, 3)) for n, v in zip(names, rf[-1].feature_importances_.tolist())),
        key=lambda kv: -kv[1],
    )
    return {
        "auc": aucs[best],
        "best_model": best,
        "auc_by_model": aucs,
        "folds": n_folds,
        "n": int(len(y)),
        "features": list(METADATA_FEATURES),
        "top_features": [kv for kv in importance if kv[1] > 0][:8],
    }


def source_control(rows: list[dict], column: str, sources: dict, groups: dict, seed: int = 0) -> dict:
    """The source shortcut control (:func:`cxr.shortcut.source_signal`) for the metadata ``column`` (``sources``:
    path -> its value; ``groups``: path -> patient, else the path): how well the file properties (the metadata
    baseline's random forest) and the images' thumbnails (:func:`cxr.shortcut.image_model`) predict the source, over
    all images and within each class. Files without a value in ``column`` or a thumbnail are left out."""
    from .data import MISSING
    from .shortcut import image_model, source_signal

    df, _, ok = metadata_frame(rows)
    keep = [i for i, r in enumerate(ok) if r.get("thumbnail") and sources.get(r["path"], MISSING) != MISSING]
    chosen = [ok[i] for i in keep]
    thumbs = (
        np.stack([np.frombuffer(r["thumbnail"], np.uint8) for r in chosen]).astype(np.float32) / 255
        if chosen
        else np.zeros((0, THUMBNAIL * THUMBNAIL), np.float32)
    )
    features = {
        "metadata": (df.iloc[keep].reset_index(drop=True), lambda n, folds: metadata_forest(seed, trees=60)),
        "image": (thumbs, image_model),
    }
    signal = source_signal(
        column,
        features,
        [sources[r["path"]] for r in chosen],
        [int(r["label"]) for r in chosen],
        [groups.get(r["path"], r["path"]) for r in chosen],
        seed=seed,
    )
    signal["left_out"] = len(rows) - len(chosen)
    return signal


def source_finding(signal: dict | None) -> list[Finding]:
    from .shortcut import signal_message

    if not signal or not signal["flag"]:
        return []
    return [Finding("warning", "source_shortcut", signal_message(signal), [], 1)]


def metadata_finding(baseline: dict, threshold: float = 0.8) -> list[Finding]:
    auc = baseline.get("auc")
    if auc is None or auc < threshold:
        return []
    top = ", ".join(n for n, _ in baseline.get("top_features", [])[:3]) or "no single feature"
    return [
        Finding(
            "warning",
            "metadata_shortcut",
            f"file properties alone predict the label with cross-validated ROC AUC {auc:.3f} "
            f"({baseline['best_model'].replace('_', ' ')}; strongest: {top}): a model can score well on this data "
            "without looking at the lungs",
            [],
            1,
        )
    ]


# --------------------------------------------------------------------------- job


@dataclass
class ValidationResult:
    summary: dict
    findings: list[Finding]
    files: dict[str, str]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def line(self) -> str:
        s = self.summary
        auc = s["metadata_baseline"].get("auc")
        return (
            f"validated {s['files']} files: {s['unreadable']} unreadable, {s['duplicates']['exact_groups']} exact "
            "duplicate group(s), "
            f"{s['duplicates']['near_pairs']} near-duplicate pair(s), {len(self.errors)} error finding(s), "
            f"{sum(1 for f in self.findings if f.severity == 'warning')} warning(s); metadata-only AUC "
            f"{'n/a' if auc is None else f'{auc:.3f}'} -> {self.files['report_html']}"
        )


def check_rows(
    rows: list[dict],
    *,
    near_distance: int = 4,
    min_side: int = 128,
    max_pixels: int = 40_000_000,
    seed: int = 0,
    source: tuple[str, dict, dict] | None = None,
) -> tuple[list[Finding], dict]:
    """All checks on inspected rows (no I/O): findings (errors first) and the summary figures. ``source``:
    ``(column, path -> value, path -> group)`` for the source control (:func:`source_control`)."""
    findings = integrity_findings(rows, min_side, max_pixels)
    dup, dup_stats = duplicate_findings(rows, near_distance)
    pat, pat_stats = patient_findings(rows)
    bal, counts = balance(rows)
    baseline = metadata_baseline(rows, seed=seed)
    signal = source_control(rows, *source, seed=seed) if source else None
    findings += dup + pat + bal + metadata_finding(baseline) + source_finding(signal)
    findings.sort(key=lambda f: f.severity != "error")
    summary = {
        "files": len(rows),
        "unreadable": sum(1 for r in rows if r["error"]),
        "counts": counts,
        "duplicates": dup_stats,
        "patients": pat_stats,
        "distributions": distributions(rows),
        "metadata_baseline": baseline,
        "source_control": signal,
        "settings": {"near_distance_bits": near_distance, "min_side": min_side, "max_pixels": max_pixels},
    }
    return findings, summary


def validate(
    data: str,
    output_dir: str,
    *,
    near_distance: int = 4,
    min_side: int = 128,
    max_pixels: int = 40_000_000,
    seed: int = 0,
    batch_size: int = 64,
    overwrite: bool = False,
    label_map: dict | None = None,
    source_column: str | None = None,
) -> ValidationResult:
    """Validate the labelled dataset at ``data`` (folder or s3:// prefix); write the report to ``output_dir``.

    ``source_column``: a labelled manifest's column naming each image's source (hospital, archive): adds the
    source control (:func:`source_control`; :class:`InputError` when no file has that column).
    ``result.errors`` lists the error findings (what ``--strict`` turns into exit code 6). A non-empty
    ``output_dir`` raises OutputError unless ``overwrite``, which empties it first.
    """
    from .output import prepare_output

    settings = storage.s3_settings()
    start = time.perf_counter()
    files = list_labelled(data, settings, label_map, source_column)
    prepare_output(output_dir, overwrite, settings)
    log.info("validating %d files under %s", files.num_rows, data)
    table = inspect_files(files, settings, batch_size=batch_size, thumbnails=bool(source_column))
    if table.num_rows != files.num_rows:
        raise RuntimeError(f"inspected {table.num_rows} rows for {files.num_rows} files")
    rows = sorted(table.to_pylist(), key=lambda r: r["path"])
    source = None
    if source_column:
        paths = files["path"].to_pylist()
        source = (
            source_column,
            dict(zip(paths, files["source"].to_pylist())),
            dict(zip(paths, files["group"].to_pylist())),
        )
        log.info(
            "source control: predicting %r from file properties and %dx%d thumbnails",
            source_column,
            THUMBNAIL,
            THUMBNAIL,
        )
    findings, summary = check_rows(
        rows, near_distance=near_distance, min_side=min_side, max_pixels=max_pixels, seed=seed, source=source
    )
    summary.update({"data": data, "seconds": round(time.perf_counter() - start, 1)})
    import pyarrow.parquet as pq

    pq.write_table(table.drop_columns(["thumbnail"]), os.path.join(output_dir, "files.parquet"))
    paths = write_validation_report(summary, findings, rows, Path(output_dir))
    return ValidationResult(summary, findings, paths)


# --------------------------------------------------------------------------- report


def dumps(obj) -> str:
    from .metrics import to_jsonable

    return json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False)


def _plots(rows: list[dict], out: Path) -> list[tuple[Path, str]]:
    """The validation report's figures, one block per figure: long, but flat."""
    from matplotlib.figure import Figure

    from .pages import COLOURS, save_figure

    ok = [r for r in rows if not r["error"] and r["width"]]
    images = []
    fig = Figure(figsize=(6.0, 4.8), layout="constrained")
    ax = fig.subplots()
    for label, name in enumerate(CLASS_NAMES):
        sel = [r for r in ok if r["label"] == label]
        if sel:
            ax.scatter(
                [r["width"] for r in sel],
                [r["height"] for r in sel],
                s=10,
                alpha=0.5,
                color=COLOURS[name],
                label=f"{name} (n={len(sel)})",
            )
    ax.set(xscale="log", yscale="log", xlabel="width (px)", ylabel="height (px)", title="Image size by class")
    if ok:  # a margin around the points, also when every image has one size (log axes give no room then)
        from matplotlib.ticker import FuncFormatter

        for axis, key, setter in ((ax.xaxis, "width", ax.set_xlim), (ax.yaxis, "height", ax.set_ylim)):
            lo, hi = min(r[key] for r in ok), max(r[key] for r in ok)
            setter(lo / 1.3, hi * 1.3)
            every = hi / lo < 4  # a narrow range: every minor tick named; else 1, 2, 3, 5 of each decade
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))  # 640, not 6.4 x 10^2
            axis.set_minor_formatter(
                FuncFormatter(lambda v, _, every=every: f"{v:.0f}" if every or f"{v:.0f}"[0] in "1235" else "")
            )
        if len({(r["width"], r["height"]) for r in ok}) == 1:
            ax.annotate(
                f"every image {ok[0]['width']} x {ok[0]['height']} px",
                (ok[0]["width"], ok[0]["height"]),
                textcoords="offset points",
                xytext=(8, 8),
                fontsize=9,
            )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, out / "size_by_class.png")
    images.append((out / "size_by_class.png", "Image size by class (a class that differs by size is a shortcut)"))

    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    sizes = [r["size_bytes"] for r in ok if r["size_bytes"]]
    if sizes:
        bins = np.logspace(np.log10(max(1, min(sizes))), np.log10(max(sizes) + 1), 40)
        for label, name in enumerate(CLASS_NAMES):
            sel = [r["size_bytes"] for r in ok if r["label"] == label]
            if sel:
                ax.hist(
                    sel,
                    bins=bins,
                    histtype="step",
                    lw=1.5,
                    color=COLOURS[name],
                    label=f"{name} (n={len(sel)})",
                    density=True,
                )
        ax.set(xscale="log", xlabel="file size (bytes)", ylabel="density", title="File size by class")
        ax.legend(fontsize=8)
    save_figure(fig, out / "file_size_by_class.png")
    images.append((out / "file_size_by_class.png", "File size by class"))

    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    keys = sorted({f"{r['format'] or '?'} {r['mode'] or '?'}" for r in ok})
    x = np.arange(len(keys))
    for k, (label, name) in enumerate(enumerate(CLASS_NAMES)):
        sel = [r for r in ok if r["label"] == label]
        share = [
            sum(1 for r in sel if f"{r['format'] or '?'} {r['mode'] or '?'}" == key) / max(1, len(sel)) for key in keys
        ]
        ax.bar(x + (k - 0.5) * 0.4, share, width=0.4, color=COLOURS[name], label=f"{name} (n={len(sel)})")
    ax.set_xticks(x, labels=keys, rotation=30, ha="right")
    ax.set(ylabel="share of the class", ylim=(0, 1.05), title="Format and mode by class")
    ax.legend(fontsize=8)
    save_figure(fig, out / "format_mode_by_class.png")
    images.append((out / "format_mode_by_class.png", "Format and colour mode by class"))
    return images


def _findings_table(findings: list[Finding]) -> str:
    from .pages import esc

    if not findings:
        return "<p><b>No problems found.</b></p>"
    rows = [
        '<table><tr><th>severity</th><th>check</th><th style="text-align:left">finding</th><th '
        'style="text-align:left">examples</th></tr>'
    ]
    for f in findings:
        ex = [" | ".join(x) if isinstance(x, list) else str(x) for x in f.files[:5]]
        more = f" (+{len(f.files) - 5} more in validation.json)" if len(f.files) > 5 else ""
        colour = "#b00020" if f.severity == "error" else "#8a5a00"
        rows.append(
            f'<tr><td style="color:{colour};font-weight:600">{esc(f.severity)}</td><td>{esc(f.check)}</td>'
            f'<td style="text-align:left">{esc(f.message)}</td>'
            f'<td style="text-align:left;font-size:.85em">{"<br>".join(esc(e) for e in ex)}{esc(more)}</td></tr>'
        )
    rows.append("</table>")
    return "\n".join(rows)


def _distribution_table(dist: dict) -> str:
    from .pages import esc

    rows = [
        "<table><tr><th>class</th><th>width median [p5–p95]</th><th>height median [p5–p95]</th>"
        "<th>file size median [p5–p95]</th><th>modes</th><th>formats</th></tr>"
    ]
    for name, d in dist.items():

        def rng(x, unit=""):
            return "n/a" if not x.get("n") else f"{x['median']:,.0f}{unit} [{x['p5']:,.0f}–{x['p95']:,.0f}]"

        rows.append(
            f"<tr><td>{esc(name)}</td><td>{rng(d['width'])}</td><td>{rng(d['height'])}</td>"
            f"<td>{rng(d['size_bytes'], ' B')}</td>"
            f"<td>{esc(', '.join(f'{k} {v}' for k, v in sorted(d['mode'].items())))}</td>"
            f"<td>{esc(', '.join(f'{k} {v}' for k, v in sorted(d['format'].items())))}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def _baseline_line(base: dict) -> str:
    """The metadata baseline's cross-validated AUC per model and its strongest features, in two sentences."""
    aucs = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in base["auc_by_model"].items())
    features = ", ".join(f"{n} ({v})" for n, v in base["top_features"][:5])
    return f"Cross-validated ROC AUC by model: {aucs}. Strongest features: {features}."


def _source_section(signal: dict | None, out: Path) -> str:
    """The source control's section: what it measures, its table and confusion matrices (empty without it)."""
    from .pages import esc, img_tag
    from .shortcut import plot_confusion, signal_table_html

    if not signal:
        return ""
    figs = []
    for scope in ("all", "covid", "non"):
        path = out / f"source_confusion_{scope}.png"
        if plot_confusion(signal, path, scope):
            figs.append(img_tag(path, f"Source predicted from metadata and images, {scope} images"))
    return "\n".join(
        [
            f"<h2>Source control: {esc(signal['column'])}</h2>",
            f'<p class="sub">Can the file properties (random forest) or {THUMBNAIL}x{THUMBNAIL} thumbnails (PCA + '
            f"logistic regression) tell which {esc(signal['column'])} an image came from? Cross-validated, folds "
            "grouped by patient; within a class the source is a signal the label does not explain. A shortcut "
            "risk where the images tell the source and the source goes with the label.</p>",
            signal_table_html(signal),
            '<div class="figs">' + "".join(figs) + "</div>",
        ]
    )


def write_validation_report(summary: dict, findings: list[Finding], rows: list[dict], out: Path) -> dict[str, str]:
    """``validation.json`` (summary + findings), the plots and a self-contained ``report.html``.

    Long on purpose: the page written top to bottom, one section after another."""
    from .pages import CSS, card, esc, img_tag

    out.mkdir(parents=True, exist_ok=True)
    payload = {
        **summary,
        "findings": [f.to_dict() for f in findings],
        "ok": not any(f.severity == "error" for f in findings),
    }
    (out / "validation.json").write_text(dumps(payload) + "\n", encoding="utf-8")
    images = _plots(rows, out)
    errors = [f for f in findings if f.severity == "error"]
    warnings = [f for f in findings if f.severity == "warning"]
    base = summary["metadata_baseline"]
    auc = base.get("auc")
    counts = summary["counts"]
    verdict = (
        "Errors found: fix them before training or evaluating on this data."
        if errors
        else "No integrity errors or leakage found." + (" Warnings below deserve a look." if warnings else "")
    )
    cards = "".join(
        [
            card("Files", f"{summary['files']:,}", f"{summary['unreadable']} unreadable"),
            card("Errors", str(len(errors)), "leakage, corrupt files, label conflicts"),
            card("Warnings", str(len(warnings)), "modes, sizes, duplicates within a split, imbalance, shortcut"),
            card(
                "Exact duplicate groups",
                str(summary["duplicates"]["exact_groups"]),
                f"{summary['duplicates']['exact_groups_across_splits']} across splits",
            ),
            card(
                "Near-duplicate pairs",
                str(summary["duplicates"]["near_pairs"]),
                f"{summary['duplicates']['near_pairs_across_splits']} across splits",
            ),
            card(
                "Metadata-only ROC AUC",
                "n/a" if auc is None else f"{auc:.3f}",
                "file properties alone; 0.5 = no shortcut",
            ),
        ]
    )
    balance_rows = "".join(
        f"<tr><td>{esc(s)}</td>" + "".join(f"<td>{c.get(n, 0):,}</td>" for n in CLASS_NAMES) + "</tr>"
        for s, c in sorted(counts.items())
    )
    html = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>Data validation: {esc(summary.get('data', ''))}</title><style>{CSS}</style></head><body>",
            f'<h1>Data validation</h1><p class="sub">{esc(summary.get("data", ""))}</p>',
            f"<p><b>{esc(verdict)}</b></p>",
            f'<div class="cards">{cards}</div>',
            "<h2>Findings</h2>",
            _findings_table(findings),
            "<h2>Class balance</h2>",
            "<table><tr><th>split</th>"
            + "".join(f"<th>{esc(n)}</th>" for n in CLASS_NAMES)
            + "</tr>"
            + balance_rows
            + "</table>",
            "<h2>Per-class file properties</h2>",
            _distribution_table(summary["distributions"]),
            "<h2>Metadata-only baseline</h2>",
            f"<p>{esc(base.get('reason') or _baseline_line(base))}</p>",
            '<p class="sub">Features: width, height, aspect ratio, pixel count, file size, bytes per pixel, bit '
            "depth, colour mode, "
            "format; never the pixels. An AUC near 0.5 means file properties say nothing about the label; near 1.0 "
            "means a model "
            "can separate the classes without looking at the lungs.</p>",
            _source_section(summary.get("source_control"), out),
            "<h2>Figures</h2>",
            '<div class="figs">' + "".join(img_tag(p, alt) for p, alt in images) + "</div>",
            "<footer>Generated by cxr.validate. Research tool, not a medical device.</footer></body></html>",
        ]
    )
    (out / "report.html").write_text(html, encoding="utf-8")
    return {
        "validation_json": str(out / "validation.json"),
        "report_html": str(out / "report.html"),
        **{p.stem: str(p) for p, _ in images},
    }
