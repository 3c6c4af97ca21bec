"""Passes over images (scdd/passes.py: teacher accuracy, initialisation, the grid) on a Ray cluster: one Ray
task per worker, each in a bundle of one placement group (one GPU, or `resources.threads` CPUs), so the
driver, which may run on a CPU-only head, touches no images.

Why Ray tasks rather than Ray Train or our recover actors: a pass needs no process group (each rank returns
its counts, the driver adds them up) and no checkpoints; a task that dies is retried by Ray, and a pass is
short. The placement group makes the pass wait for its workers like every other stage (a GPU node's cold
start), and fail with a clear line when they never come.
"""

from __future__ import annotations

import json
from typing import Any

import ray
import torch
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from api_schema import JobSpec
from scdd.data import RealData, load_dataset
from scdd.data.loader import decode_workers
from scdd.passes import PassContext, PassFn
from scdd.runtime import resolve_runtime
from scdd.shard import Shard
from scdd.store import ArtifactStore
from scdd.errors import WorkerFailedError
from workers.cluster import Placement, connect, reserve, wants_gpus
from workers.control import RemoteCheck
from workers.recover import WorkerLost, gather

TASK_RETRIES = 2  # Ray re-runs a pass task whose process died this often

_DATASETS: dict[str, RealData] = {}  # per worker process: the dataset index, loaded once for every pass


def _dataset(spec: JobSpec) -> RealData:
    key = json.dumps({"dataset": spec.dataset.model_dump(mode="json"), "seed": spec.seed}, sort_keys=True)
    if key not in _DATASETS:
        _DATASETS.clear()
        _DATASETS[key] = load_dataset(spec.dataset, spec.seed)
    return _DATASETS[key]


def run_rank(fn: PassFn, rank: int, world: int, spec: JobSpec, store: ArtifactStore, use_gpu: bool,
             args: tuple) -> Any:
    """One rank of a pass, in a Ray task."""
    threads = spec.resources.threads or 1
    torch.set_num_threads(threads)
    runtime = resolve_runtime(spec.resources.model_copy(update={"device": "cuda" if use_gpu else "cpu",
                                                                "threads": threads}))
    context = PassContext(Shard(rank, world), spec, store, runtime, decode_workers(threads), _dataset(spec))
    return fn(context, *args)


class RayPasses:
    """Runs passes on `spec.resources.workers` Ray tasks (`RayBackend.run_pass`)."""

    def __init__(self, spec: JobSpec, store: ArtifactStore, placement_timeout_s: float, control: Any = None):
        self.spec, self.store, self.placement_timeout_s, self.control = spec, store, placement_timeout_s, control

    def __call__(self, fn: PassFn, *args: Any, ranks: int | None = None) -> list[Any]:
        connect()
        resources = self.spec.resources
        world = ranks or resources.workers
        use_gpu = wants_gpus(resources.device)
        placement = Placement(world, resources.threads or 1, 1 if use_gpu else 0)
        group = reserve(placement.bundles(), self.placement_timeout_s, f"the {fn.__name__} pass")
        try:
            run = ray.remote(run_rank)
            refs = [run.options(num_cpus=placement.cpus, num_gpus=placement.gpus, max_retries=TASK_RETRIES,
                                scheduling_strategy=PlacementGroupSchedulingStrategy(
                                    group, placement_group_bundle_index=rank)).remote(
                        fn, rank, world, self.spec, self.store, use_gpu, args)
                    for rank in range(world)]
            check = RemoteCheck(self.control) if self.control is not None else None
            try:
                return gather(refs, check)
            except BaseException as error:
                for ref in refs:  # stop the other ranks (finished ones are untouched)
                    ray.cancel(ref, force=True)
                if isinstance(error, WorkerLost):
                    raise WorkerFailedError(f"the {fn.__name__} pass failed: {error}") from None
                raise
        finally:
            remove_placement_group(group)
