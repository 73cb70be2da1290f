"""Connecting to Ray the same way from every job."""

from __future__ import annotations

import logging
from pathlib import Path


def code_runtime_env() -> dict:
    """Ship this very ``cxr`` package to the workers (``py_modules``), so that they run the driver's code
    whether or not the cluster's nodes have the project installed. Merges with the runtime env of
    ``ray job submit --working-dir``."""
    return {"py_modules": [str(Path(__file__).resolve().parent)]}


def ensure_ray() -> None:
    """Join the cluster in ``RAY_ADDRESS`` (or the one ``ray job submit`` runs us in), else start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, runtime_env=code_runtime_env())
