"""The predictor pool's resource plan: how many actors, with how many CPUs, GPUs and threads each, so that the
actors never starve Ray Data's read/decode/write tasks (a pool that takes every CPU hangs the job silently).

:func:`plan_resources` is pure (node CPUs and GPUs in, a :class:`ResourcePlan` out); :func:`cluster_plan` applies it
to the running cluster. ``cxr.score.measured_plan`` sizes it from the inputs' measured decoding cost.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResourcePlan:
    actors: int  # maximum size of the predictor actor pool
    cpus_per_actor: float  # logical CPUs each predictor actor reserves
    gpus_per_actor: float
    threads_per_actor: int  # torch intra-op threads in each actor
    task_cpus: float  # logical CPUs each non-actor task reserves (read, decode, write)
    batch_size: int
    decode_share: float | None = None  # decoding's measured share of the CPU work per image (see measure_costs)


# Parquet write tasks at a time (``write_parquet(concurrency=...)``): one writes thousands of result rows a second.
# The cap matters: Ray Data's per-operator budget would otherwise keep CPU for an idle write stage that the
# decode tasks need; and a cap above the number of files written makes Ray Data warn.
WRITE_TASKS = 1


def default_gpus_per_actor(asked: float | None, total_gpus: float) -> float:
    """GPUs per predictor actor: as asked, else 1 when the cluster has GPUs now."""
    return asked if asked is not None else (1.0 if total_gpus >= 1 else 0.0)


def plan_resources(
    node_cpus: list[float],
    total_gpus: float = 0.0,
    *,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    threads_per_actor: int | None = None,
    batch_size: int | None = None,
    decode_share: float | None = None,
) -> ResourcePlan:
    """Size the predictor actor pool so that it can never starve the pipeline's tasks.

    Actors that reserve every CPU leave Ray Data's read, decode and write tasks unschedulable and the
    job hangs silently. Each node therefore hosts at most ``floor((cpus - task_cpus) / cpus_per_actor)``
    actors and the default pool is no larger than the sum of that over the nodes up now: however Ray
    places the actors, some node keeps ``task_cpus`` free. An actor that would take a whole node is
    shrunk (with a warning). ``actors`` beyond that sum is kept as the pool's maximum, with a warning:
    Ray Data starts one actor and adds more only within its resource budget, that is as an autoscaling
    cluster adds nodes (GPU nodes too: the GPUs up now do not cap it). By default each CPU node gets one actor
    whose torch threads use all its cores (up to 8), sharing the last half core with the tasks: right where the
    model is the cost (PNG/JPEG at 224 px).

    ``decode_share`` (CPU plans, no ``cpus_per_actor`` given): decoding's measured share of the CPU work per
    image (:func:`measure_costs`). The actors then reserve only the model's share of a node (at least half a
    CPU, rounded up to halves) and the pool holds only as many actors as the model's share of the cluster
    needs, so that the rest goes to the decode tasks: compressed full-size DICOM costs 30-130x the model.
    """
    node_cpus = [c for c in node_cpus if c > 0] or [1.0]
    gpus_per_actor = default_gpus_per_actor(gpus_per_actor, total_gpus)
    if gpus_per_actor > 0 and total_gpus < gpus_per_actor:
        log.warning(
            "asked for %.2g GPU per actor but the cluster has %.2g GPUs now; actors wait for GPU nodes",
            gpus_per_actor,
            total_gpus,
        )
    task_cpus = 1.0 if gpus_per_actor > 0 and max(node_cpus) >= 4 else 0.5
    largest = max(node_cpus)
    default_threads = None
    measured = decode_share is not None and cpus_per_actor is None and gpus_per_actor == 0
    if measured:
        decode_share = min(max(float(decode_share), 0.0), 1.0)
    if cpus_per_actor is None:
        cpus_per_actor = 1.0 if gpus_per_actor > 0 else max(0.5, min(largest, 8.0) - task_cpus)
        default_threads = 1 if gpus_per_actor > 0 else int(min(largest, 8.0))
        if measured:
            model_cpus = (1.0 - decode_share) * min(largest, 8.0)
            cpus_per_actor = min(cpus_per_actor, max(0.5, math.ceil(model_cpus * 2) / 2))
    if cpus_per_actor > largest - task_cpus:
        fitted = max(0.1, largest - task_cpus)
        log.warning(
            "%.2f CPUs per actor would leave no CPU for decoding on any node; reserving %.2f instead",
            cpus_per_actor,
            fitted,
        )
        default_threads = default_threads or max(1, math.ceil(cpus_per_actor))
        cpus_per_actor = fitted
    capacity = sum(max(0, int((c - task_cpus) // cpus_per_actor)) for c in node_cpus)
    if gpus_per_actor > 0:
        capacity = min(capacity, max(1, int(max(total_gpus, gpus_per_actor) // gpus_per_actor)))
    capacity = max(1, capacity)  # what fits on the nodes up now
    if actors is None:
        actors = capacity
        if measured:  # no more actors than the model's share of the whole cluster keeps busy
            actors = min(capacity, max(1, math.ceil((1.0 - decode_share) * sum(node_cpus) / cpus_per_actor)))
    elif actors > capacity:
        log.warning(
            "%d actors: %d fit beside the decode tasks on the nodes up now; the pool grows to %d only as nodes "
            "join (an autoscaling cluster)",
            actors,
            capacity,
            actors,
        )
    threads = threads_per_actor or default_threads or max(1, math.ceil(cpus_per_actor))
    if batch_size is None:
        batch_size = 256 if gpus_per_actor > 0 else 32
    return ResourcePlan(
        actors, cpus_per_actor, gpus_per_actor, threads, task_cpus, batch_size, decode_share if measured else None
    )


def cluster_resources() -> tuple[list[float], float]:
    """(CPUs of each live node, GPUs of the cluster), now."""
    import ray

    return [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")], ray.cluster_resources().get(
        "GPU", 0.0
    )


def cluster_plan(**overrides) -> ResourcePlan:
    """:func:`plan_resources` for the running cluster."""
    return plan_resources(*cluster_resources(), **overrides)
