"""Local paths and ``s3://`` URIs behind one small API, on ``pyarrow.fs`` (what Ray Data uses too).

S3 credentials come from the standard AWS chain (environment, shared config, instance profile) on
whichever process opens the file; they are never passed around, logged or pickled by this module.
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points at an S3-compatible store, and
``AWS_REGION``/``AWS_DEFAULT_REGION`` sets the region. Those two non-secret settings are captured on
the driver (:func:`s3_settings`) and handed to Ray workers explicitly, so workers on nodes started
without them still reach the same store.
"""

from __future__ import annotations

import functools
import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None


def s3_settings() -> S3Settings:
    """Non-secret S3 settings from this process's environment."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    return S3Settings(endpoint, region)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@functools.lru_cache(maxsize=8)
def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": settings.region or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5),
        "connect_timeout": 10,
        "request_timeout": 60,
    }
    if settings.endpoint_url:
        parsed = urlparse(settings.endpoint_url)
        if parsed.scheme in ("http", "https"):
            kwargs["scheme"] = parsed.scheme
            kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        else:
            kwargs["endpoint_override"] = settings.endpoint_url
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str, settings: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, ``file://`` URI or ``s3://bucket/key`` URI."""
    if is_s3(uri):
        return _s3_filesystem(settings or s3_settings()), uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The user-facing URI of ``path`` in ``fs`` (``s3://`` kept for S3, absolute path locally)."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://") :].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def read_bytes(uri: str, settings: S3Settings | None = None) -> bytes:
    fs, path = filesystem(uri, settings)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_head(uri: str, n: int, settings: S3Settings | None = None) -> bytes:
    fs, path = filesystem(uri, settings)
    with fs.open_input_file(path) as f:
        return f.read(n)


def write_bytes(uri: str, data: bytes, settings: S3Settings | None = None) -> None:
    fs, path = filesystem(uri, settings)
    if not is_s3(uri):  # S3 has no directories to create
        fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def info(uri: str, settings: S3Settings | None = None) -> pafs.FileInfo:
    fs, path = filesystem(uri, settings)
    return fs.get_file_info(path)


def exists(uri: str, settings: S3Settings | None = None) -> bool:
    return info(uri, settings).type != pafs.FileType.NotFound


def describe_error(exc: BaseException) -> str:
    """One line for an I/O exception, without anything that could carry a credential."""
    msg = " ".join(str(exc).split())
    for marker in ("AWS Access Key Id", "Signature", "X-Amz-Credential"):
        if marker in msg:
            msg = msg.split(marker)[0] + "[redacted]"
    # the AWS SDK leaves "...during GetObject operation:" when it could not read the error's message
    return f"{type(exc).__name__}: {msg[:300].rstrip(': ')}"


def ray_storage(uri: str, settings: S3Settings) -> tuple[str, object]:
    """(storage_path, storage_filesystem) for Ray Train/Tune: an absolute local path, or an S3 path + its filesystem."""
    fs, path = filesystem(uri, settings)
    if is_s3(uri):
        return path, fs
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    return path, None
