"""Where images come from: local folders (recursive), ``s3://bucket/prefix``, or manifests of URIs.

A folder or prefix is listed on the driver and filtered by extension (``.png .jpg .jpeg .dcm``,
case-insensitive), plus files without an extension that carry DICOM's ``DICM`` magic. A manifest
(``.parquet`` or ``.csv`` with a ``path`` or ``uri`` column) is taken as given, one output row per
manifest row, and is read by Ray Data itself, so nightly jobs over 10^7 images skip listing.
"""

from __future__ import annotations

import logging
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs

from . import storage
from .decode import IMAGE_EXTENSIONS, is_dicom

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = (".parquet", ".csv")
MANIFEST_COLUMNS = ("path", "uri", "url", "file")
ROWS_PER_BLOCK = 128  # paths per input block: the unit of work of one decode task


class InputError(Exception):
    """An input cannot be used (missing, empty, unreadable manifest)."""


def _is_manifest(path: str) -> bool:
    return path.lower().endswith(MANIFEST_EXTENSIONS)


def _extensionless(path: str) -> bool:
    return "." not in posixpath.basename(path)


def _dicom_magic(fs: pafs.FileSystem, path: str) -> bool:
    try:
        with fs.open_input_file(path) as f:
            return is_dicom(f.read(132))
    except OSError:
        return False


def list_images(uri: str, settings: storage.S3Settings | None = None) -> list[str]:
    """Image URIs under a folder or prefix (recursive, sorted), or ``[uri]`` for a single image file."""
    fs, root = storage.filesystem(uri, settings)
    try:
        info = fs.get_file_info(root)
    except OSError as exc:
        raise InputError(f"cannot access {uri}: {storage.describe_error(exc)}") from exc
    if info.type == pafs.FileType.File:
        return [storage.to_uri(fs, root)]
    if info.type == pafs.FileType.NotFound and not storage.is_s3(uri):
        raise InputError(f"input not found: {uri}")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise InputError(f"cannot list {uri}: {storage.describe_error(exc)}") from exc
    files = [i.path for i in infos if i.type == pafs.FileType.File and not posixpath.basename(i.path).startswith(".")]
    if not files and info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {uri}")
    chosen = [p for p in files if p.lower().endswith(IMAGE_EXTENSIONS)]
    bare = [p for p in files if _extensionless(p)]
    if bare:
        with ThreadPoolExecutor(16) as pool:
            chosen += [p for p, ok in zip(bare, pool.map(lambda p: _dicom_magic(fs, p), bare)) if ok]
    return sorted(storage.to_uri(fs, p) for p in chosen)


def _manifest_column(uri: str, settings: storage.S3Settings | None) -> str:
    fs, path = storage.filesystem(uri, settings)
    try:
        if path.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            names = pq.read_schema(path, filesystem=fs).names
        else:
            with fs.open_input_stream(path) as f:
                names = [n.strip().strip('"') for n in f.read(65536).decode("utf-8", "replace").splitlines()[0].split(",")]
    except (OSError, IndexError, pa.ArrowInvalid) as exc:
        raise InputError(f"cannot read manifest {uri}: {storage.describe_error(exc)}") from exc
    for name in MANIFEST_COLUMNS:
        if name in names:
            return name
    raise InputError(f"manifest {uri} has no column named one of {', '.join(MANIFEST_COLUMNS)} (columns: {', '.join(names[:10])})")


def _resolve_manifest_paths(batch: pa.Table, column: str, base: str) -> pa.Table:
    """Make manifest entries absolute URIs: relative ones are taken relative to the manifest's folder."""
    out = []
    for p in batch.column(column).to_pylist():
        p = "" if p is None else str(p).strip()
        if p and not (storage.is_s3(p) or p.startswith("/") or p.startswith("file://")):
            p = storage.join(base, p)
        out.append(p[len("file://"):] if p.startswith("file://") else p)
    return pa.table({"path": pa.array(out, pa.string())})


def input_dataset(uris: list[str], settings: storage.S3Settings | None = None, task_cpus: float = 0.5):
    """A Ray Dataset with one ``path`` column: every input image, one row each.

    ``task_cpus``: what each read task reserves (kept small so that predictor actors cannot starve it).

    Returns (dataset, number of listed files or None when manifests make the count unknown upfront).
    """
    import ray.data

    listed: list[str] = []
    parts = []
    for uri in uris:
        fs, path = storage.filesystem(uri, settings)
        if _is_manifest(path):
            try:
                is_file = fs.get_file_info(path).type == pafs.FileType.File
            except OSError as exc:
                raise InputError(f"cannot access {uri}: {storage.describe_error(exc)}") from exc
            if not is_file:
                raise InputError(f"manifest not found: {uri}")
            column = _manifest_column(uri, settings)
            reader = ray.data.read_parquet if path.lower().endswith(".parquet") else ray.data.read_csv
            ds = reader(path, filesystem=fs, ray_remote_args={"num_cpus": task_cpus}).select_columns([column])
            base = storage.to_uri(fs, posixpath.dirname(path) if storage.is_s3(uri) else os.path.dirname(path))
            ds = ds.map_batches(_resolve_manifest_paths, batch_format="pyarrow", fn_args=(column, base), num_cpus=task_cpus)
            parts.append(ds.repartition(target_num_rows_per_block=ROWS_PER_BLOCK))
            log.info("input %s: manifest (column %r)", uri, column)
        else:
            found = list_images(uri, settings)
            log.info("input %s: %d image files", uri, len(found))
            listed += found
    if listed:
        unique = list(dict.fromkeys(listed))
        if len(unique) < len(listed):
            log.warning("%d files were named by more than one input; each is scored once", len(listed) - len(unique))
        table = pa.table({"path": pa.array(unique, pa.string())})
        # Many small blocks so that decoding runs as many parallel tasks as the cluster allows.
        blocks = [table.slice(i, ROWS_PER_BLOCK) for i in range(0, len(unique), ROWS_PER_BLOCK)]
        parts.insert(0, ray.data.from_arrow(blocks))
    if not parts:
        raise InputError("no PNG, JPEG or DICOM files found in " + ", ".join(uris))
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    return ds, (len(dict.fromkeys(listed)) if len(parts) == 1 and listed else None)
