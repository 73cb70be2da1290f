"""Helpers for the S3 tests (the moto server itself is a conftest fixture)."""

from __future__ import annotations

from pathlib import Path


def upload_tree(client, bucket: str, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
