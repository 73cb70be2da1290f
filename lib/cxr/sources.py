"""Where images come from: local folders (recursive), ``s3://bucket/prefix``, or manifests of URIs.

A folder or prefix is listed on the driver and filtered by extension (``.png .jpg .jpeg .dcm``,
case-insensitive), plus files without an extension that carry DICOM's ``DICM`` magic. A manifest
(``.parquet`` or ``.csv`` with a ``path`` or ``uri`` column) is taken as given (every entry is an
input, whatever its extension), so nightly jobs over 10^7 images skip listing. A file named twice is
scored once.
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
from .errors import InputError

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = (".parquet", ".csv")
MANIFEST_COLUMNS = ("path", "uri", "url", "file")


def is_manifest(path: str) -> bool:
    return path.lower().endswith(MANIFEST_EXTENSIONS)


def _extensionless(path: str) -> bool:
    return "." not in posixpath.basename(path)


def _dicom_magic(fs: pafs.FileSystem, path: str) -> bool:
    try:
        with fs.open_input_file(path) as f:
            return is_dicom(f.read(132))
    except OSError:
        return False


def list_image_infos(uri: str, settings: storage.S3Settings | None = None) -> list[pafs.FileInfo]:
    """Like :func:`list_images`, with each file's ``FileInfo`` (``path`` as a URI, ``size``, ``mtime``)
    from the same listing: what incremental scoring keys on, at no extra request."""
    fs, root = storage.filesystem(uri, settings)
    try:
        info = fs.get_file_info(root)
    except OSError as exc:
        raise InputError(f"cannot access {uri}: {storage.describe_error(exc)}") from exc
    if info.type == pafs.FileType.File:
        return [_as_uri(fs, info)]
    if info.type == pafs.FileType.NotFound and not storage.is_s3(uri):
        raise InputError(f"input not found: {uri}")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise InputError(f"cannot list {uri}: {storage.describe_error(exc)}") from exc
    files = [i for i in infos if i.type == pafs.FileType.File and not posixpath.basename(i.path).startswith(".")]
    if not files and info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {uri}")
    chosen = [i for i in files if i.path.lower().endswith(IMAGE_EXTENSIONS)]
    bare = [i for i in files if _extensionless(i.path)]
    if bare:
        with ThreadPoolExecutor(16) as pool:
            chosen += [i for i, ok in zip(bare, pool.map(lambda i: _dicom_magic(fs, i.path), bare)) if ok]
    return sorted((_as_uri(fs, i) for i in chosen), key=lambda i: i.path)


def _as_uri(fs: pafs.FileSystem, info: pafs.FileInfo) -> pafs.FileInfo:
    return pafs.FileInfo(storage.to_uri(fs, info.path), info.type, mtime_ns=info.mtime_ns, size=info.size)


def list_images(uri: str, settings: storage.S3Settings | None = None) -> list[str]:
    """Image URIs under a folder or prefix (recursive, sorted), or ``[uri]`` for a single image file."""
    return [i.path for i in list_image_infos(uri, settings)]


def read_manifest_table(
    uri: str, settings: storage.S3Settings | None = None, *, every_column: bool = False
) -> pa.Table:
    """A ``.parquet``/``.csv`` manifest as a table whose ``path`` column holds each entry's URI (the first of
    :data:`MANIFEST_COLUMNS` present, relative paths resolved against the manifest's folder). Only that column is
    read unless ``every_column`` (then every column comes as strings, a labelled manifest's ``label``, ``patient``
    and metadata). Read on the driver with pyarrow: ~10^7 rows take ~1 GB there.

    Long on purpose: read (Parquet or CSV), find the path column, resolve it, each a short step."""
    import pyarrow.compute as pc

    fs, path = storage.filesystem(uri, settings)
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise InputError(f"manifest not found: {uri}")
        if path.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            names = pq.read_schema(path, filesystem=fs).names
            column = next((c for c in MANIFEST_COLUMNS if c in names), None)
            table = pq.read_table(path, filesystem=fs, columns=None if every_column else [column]) if column else None
        else:
            import pyarrow.csv as pacsv

            with fs.open_input_stream(path) as f:
                table = pacsv.read_csv(
                    f,
                    convert_options=pacsv.ConvertOptions(
                        column_types={c: pa.string() for c in MANIFEST_COLUMNS}, strings_can_be_null=True
                    ),
                )
            names = table.column_names
            column = next((c for c in MANIFEST_COLUMNS if c in names), None)
    except InputError:
        raise
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"cannot read manifest {uri}: {storage.describe_error(exc)}") from exc
    if column is None:
        raise InputError(
            f"manifest {uri} has no column named one of {', '.join(MANIFEST_COLUMNS)} (columns: "
            f"{', '.join(names[:10])})"
        )
    col = pc.utf8_trim_whitespace(pc.fill_null(table.column(column).combine_chunks().cast(pa.string()), ""))
    col = pc.replace_substring_regex(pc.replace_substring_regex(col, "^file://", ""), r"^(\./)+", "")
    base = storage.to_uri(fs, posixpath.dirname(path) if storage.is_s3(uri) else os.path.dirname(path))
    absolute = pc.or_(pc.or_(pc.starts_with(col, "/"), pc.match_substring(col, "://")), pc.equal(col, ""))
    resolved = pc.if_else(absolute, col, pc.binary_join_element_wise(base, col, "/"))
    if not every_column:
        return pa.table({"path": resolved})
    others = [c for c in table.column_names if c != column and c != "path"]
    return pa.table({"path": resolved, **{c: table.column(c).cast(pa.string()) for c in others}})


def read_manifest(uri: str, settings: storage.S3Settings | None = None) -> pa.Array:
    """The image URIs a ``.parquet``/``.csv`` manifest lists (one column read; relative paths resolved
    against the manifest's folder)."""
    return read_manifest_table(uri, settings).column("path").combine_chunks()


def input_paths(uris: list[str], settings: storage.S3Settings | None = None) -> pa.Array:
    """Every input image URI, each once, in input order."""
    import pyarrow.compute as pc

    arrays = []
    for uri in uris:
        if is_manifest(uri):
            arrays.append(read_manifest(uri, settings))
            log.info("input %s: manifest with %d entries", uri, len(arrays[-1]))
        else:
            arrays.append(pa.array(list_images(uri, settings), pa.string()))
            log.info("input %s: %d image files", uri, len(arrays[-1]))
    everything = pa.chunked_array(arrays, pa.string()).combine_chunks() if arrays else pa.array([], pa.string())
    unique = pc.unique(everything)
    if len(unique) < len(everything):
        log.warning("%d entries named a file already named; each file is scored once", len(everything) - len(unique))
    if len(unique) == 0:
        raise InputError("no PNG, JPEG or DICOM files found in " + ", ".join(uris))
    return unique


def rows_per_block(n: int) -> int:
    """Paths per input block, the unit of work of one decode task: small enough for parallelism,
    large enough that 10^7 inputs do not make 10^5 blocks."""
    return max(16, min(2048, -(-n // 1000)))


def table_dataset(table: pa.Table):
    """A Ray Dataset of ``table``'s rows, in blocks sized for parallel decoding (:func:`rows_per_block`)."""
    import ray.data

    step = rows_per_block(len(table))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, len(table), step)])
