"""Running a job script (``jobs/*.py``) as a subprocess, the way a user does."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
RAY = str(Path(PYTHON).parent / "ray")


def offline_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a job that must find no network and an empty torch hub cache (HF_HUB_OFFLINE is set for all)."""
    proxy = "http://127.0.0.1:9"  # nothing listens there: every download fails at once
    return {
        "TORCH_HOME": str(tmp_path / "hub"),
        "HTTPS_PROXY": proxy,
        "HTTP_PROXY": proxy,
        "https_proxy": proxy,
        "http_proxy": proxy,
        "NO_PROXY": "",
        "no_proxy": "",
    }


def run_job(script: str, *args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, str(ROOT / "jobs" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=str(ROOT),
    )


def load_job_script(job: str):
    """``jobs/<job>.py`` imported as a module (its ``parse_args`` and ``main``), without running it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"job_script_{job}", ROOT / "jobs" / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def crash_hook(epoch: int):
    """The training code's test-only crash hook (``cxr.train.crash_at_epoch``) armed for the ``with`` block: the
    first training run kills its rank-0 worker once in ``epoch``."""
    from cxr.train import CRASH_AT_EPOCH_ENV

    os.environ[CRASH_AT_EPOCH_ENV] = str(epoch)
    try:
        yield
    finally:
        del os.environ[CRASH_AT_EPOCH_ENV]
