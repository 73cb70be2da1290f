"""Where a job writes: a local directory or an s3:// prefix that must be empty (or emptied with ``--overwrite``)
and writable, checked before any work starts; and the id each run's files carry."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from . import storage
from .errors import OutputError

__all__ = ["OutputError", "new_run_id", "prepare_output"]


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def prepare_output(output: str, overwrite: bool, settings: storage.S3Settings) -> None:
    """Fail early (before any work) if the output is non-empty or cannot be written."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(output, settings)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            raise OutputError(f"output {output} is a file; give a directory or prefix")
        existing = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        if any(i.type == pafs.FileType.File for i in existing):
            if not overwrite:
                raise OutputError(f"output {output} is not empty; choose a new location or pass --overwrite")
            fs.delete_dir_contents(path, missing_dir_ok=True)
        if not storage.is_s3(output):
            fs.create_dir(path, recursive=True)
        probe = storage.join(output, f"_write_check_{secrets.token_hex(4)}")
        storage.write_bytes(probe, b"", settings)
        fs.delete_file(storage.filesystem(probe, settings)[1])
    except OutputError:
        raise
    except Exception as exc:
        raise OutputError(f"cannot write to {output}: {storage.describe_error(exc)}") from exc
