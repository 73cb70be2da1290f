"""Connecting to Ray the same way from every job."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

# glibc malloc settings for the processes that run torch (training workers, scoring and explaining actors).
# With glibc's defaults every buffer above 32 MiB is mmap'ed, page-faulted in afresh and unmapped again, and a
# CNN's activations are that large (mobilenet_v2 at 224 px, batch 32: up to 154 MB); in a thread other than
# the main one (where Ray Train runs the training function) the thread's own arena, whose heaps hold 64 MiB
# at most, makes it worse. Measured on a 2-core CPU machine: ~0.8 million page faults per training step.
# One arena, no mmap and no trimming let the freed buffers be reused: training 1.3-2x and inference
# 1.6-3x faster, for ~20% more peak memory (the process keeps its peak instead of returning it between steps;
# benchmarks/malloc.py).
TORCH_WORKER_MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def code_runtime_env() -> dict:
    """Ship this very ``cxr`` package to the workers (``py_modules``), so that they run the driver's code
    whether or not the cluster's nodes have the project installed. Merges with the runtime env of
    ``ray job submit --working-dir``."""
    return {"py_modules": [str(Path(__file__).resolve().parent)]}


def torch_worker_runtime_env() -> dict:
    """The runtime env of a process that runs torch: the malloc settings above as ``env_vars`` (Ray merges them
    with the job's own), or nothing where the driver's environment sets any of them or ``GLIBC_TUNABLES``
    (the user's choice wins)."""
    if "GLIBC_TUNABLES" in os.environ or any(k in os.environ for k in TORCH_WORKER_MALLOC_ENV):
        return {}
    return {"env_vars": dict(TORCH_WORKER_MALLOC_ENV)}


def torch_actor_remote_args() -> dict:
    """Extra ``ray_remote_args`` of a Ray Data actor pool that runs torch (``map_batches(..., **these)``)."""
    env = torch_worker_runtime_env()
    return {"runtime_env": env} if env else {}


class RecheckNoFreeCpuWarning(logging.Filter):
    """Ray Data warns that a dataset "will hang" when no CPU is free at the moment its execution starts. Right
    after an execution whose tasks have just finished, the cluster has not yet counted their CPUs free again:
    every training job on a 2-CPU machine printed the warning while preparing its data, and never hung. This
    looks again for up to ``wait_s`` and drops the warning if a CPU is free by then; a cluster whose CPUs stay
    taken (by actors, trials, other jobs) still gets it. Ray gives the warning once per process, so a dropped
    false one is not followed by a true one later (``ensure_ray`` installs this for the jobs)."""

    MESSAGE = "does not have any available CPUs"

    def __init__(self, wait_s: float = 1.0):
        super().__init__()
        self.wait_s = wait_s

    def filter(self, record: logging.LogRecord) -> bool:
        if self.MESSAGE not in record.getMessage():
            return True
        import ray

        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                if ray.available_resources().get("CPU", 0) > 0:
                    return False
            except Exception:  # noqa: BLE001 - no answer from Ray: the warning stands
                return True
            if time.monotonic() > deadline:
                return True
            time.sleep(0.05)


def recheck_no_free_cpu_warning() -> None:
    """Install :class:`RecheckNoFreeCpuWarning` on the logger of Ray Data's warning (once)."""
    logger = logging.getLogger("ray.data.dataset")
    if not any(isinstance(f, RecheckNoFreeCpuWarning) for f in logger.filters):
        logger.addFilter(RecheckNoFreeCpuWarning())


def ensure_ray() -> None:
    """Join the cluster in ``RAY_ADDRESS`` (or the one ``ray job submit`` runs us in), else start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, runtime_env=code_runtime_env())
    recheck_no_free_cpu_warning()
