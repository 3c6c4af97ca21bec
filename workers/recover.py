"""Distributed recover on Ray: W workers, a slice of the classes each, BatchNorm statistics of the
union of their batches (scdd/recover/scope.py), resumable unit by unit.

Each worker is a Ray actor with one GPU (NCCL) or `resources.threads` CPUs (gloo); the W actors form
one torch process group. The driver hands out units one at a time: every worker synthesises its
share of the unit in lockstep with the others (one all-reduce forward and one backward per step in
`bn_sync: global`), writes its images and a part record straight to the artifact store, and
returns the part record (small: manifest entries and losses). The driver merges the parts into the
unit record `state/units/<unit>.json` (the record the single-process path writes) and the manifest.

Why our own actors with a torch process group rather than Ray Train's worker group: recover is not
a training loop that checkpoints a model, it is a sequence of lockstep units whose progress lives in
the artifact store. Handing out units one at a time lets the driver see each one finish (progress,
cancellation between units, a retry count per unit); when a worker dies the driver kills the group,
forms a new one and hands out the first unrecorded unit again, where Ray Train would re-run the
whole training function from its last checkpoint.

A worker whose part of a unit is already stored (its peer died after it finished) still joins the
unit's collectives but writes nothing, so no file is written twice.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import ray
import torch
import torch.distributed as dist
from ray.exceptions import RayActorError, RayTaskError
from torch import nn

from api_schema import RecoverSpec, ResourcesSpec
from scdd.data.base import DatasetInfo
from scdd.errors import JobCancelled, ScddError, WorkerFailedError
from scdd.models import model_from_checkpoint
from scdd.layout import TEACHER_PATH, part_record_path
from scdd.progress import CheckedProgress, Progress, SilentProgress
from scdd.recover import (
    GlobalScope,
    LocalScope,
    RecoverObjective,
    RecoverResult,
    Unit,
    collect_result,
    image_format_of,
    merge_shares,
    pending_units,
    prepare_teacher,
    recover_plan,
    run_share,
    shares_of,
)
from scdd.recover.init import init_reader
from scdd.runtime import Runtime, resolve_runtime
from scdd.store import ArtifactStore
from workers.cluster import (
    DEFAULT_PLACEMENT_TIMEOUT_S,
    Placement,
    WorkerGroup,
    connect,
    rendezvous_address,
    wants_gpus,
)
from workers.control import RemoteCheck

log = logging.getLogger("scdd.workers")

@dataclass(frozen=True)
class FaultInjection:
    """Test hook: worker `rank` kills its own process (SIGKILL, as the OOM killer would) when it is
    about to start its unit number `after_units` + 1, in each of the first `groups` groups formed."""

    rank: int
    after_units: int
    groups: int = 1


@dataclass(frozen=True)
class WorkerJob:
    """What every worker of a run needs; small, pickled into each actor (the teacher it reads from
    the store, which is the channel for large data)."""

    store: ArtifactStore
    teacher_path: str
    info: DatasetInfo
    recover: RecoverSpec
    resources: ResourcesSpec
    seed: int
    use_gpu: bool
    cut: int  # the worker count the units are cut for (scdd.recover.recover_plan): this run's, or its first's

    def threads(self) -> int:
        return self.resources.threads or 1


class RecoverWorker:
    """One rank of a distributed recover (instantiated as a Ray actor by `WorkerGroup`)."""

    def __init__(self, rank: int, world_size: int, job: WorkerJob, fault: FaultInjection | None, control: Any = None):
        self.rank, self.world_size, self.job = rank, world_size, job
        # Checked between iterations: a cancelled job stops within a step (plus the check interval).
        self.progress: Progress = CheckedProgress(SilentProgress(), RemoteCheck(control)) if control else SilentProgress()
        self.fault = fault if fault is not None and fault.rank == rank else None
        self.units_started = 0
        torch.set_num_threads(job.threads())

    def address(self) -> str:
        return rendezvous_address()

    def setup(self, address: str, timeout_s: float) -> dict[str, Any]:
        """Join the process group, load the teacher from the store and hook the layers whose statistics it matches."""
        job = self.job
        if job.use_gpu:
            torch.cuda.set_device(0)  # Ray exposes exactly the GPU it assigned to this actor
        backend = "nccl" if job.use_gpu else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(seconds=timeout_s))
        self.runtime: Runtime = resolve_runtime(job.resources.model_copy(
            update={"device": "cuda" if job.use_gpu else "cpu", "threads": job.threads()}))
        data = job.store.read_bytes(job.teacher_path)
        teacher, _ = model_from_checkpoint(data, job.store.url_of(job.teacher_path))
        share = min(job.recover.batch_size, math.ceil(job.info.num_classes / job.cut))  # a share's batch
        self.runner: nn.Module | list[nn.Module] = prepare_teacher(teacher, self.runtime, share * job.recover.iterations)
        synced = is_synced(job.recover, self.world_size, job.cut)
        self.objective = RecoverObjective(teacher, job.recover.first_bn_multiplier,
                                          GlobalScope() if synced else LocalScope(), job.recover.stat_momentum)
        self.objective.__enter__()
        self.init = init_reader(job.store, job.recover.init)
        self.image_format = image_format_of(job.store)  # once: the job's spec record, not a read per share
        return {"rank": self.rank, "backend": backend, "pid": os.getpid(), **self.runtime.describe()}

    def run_unit(self, unit: Unit) -> list[dict]:
        """The records of this worker's shares of `unit` (its own share, or several on a resume with fewer
        workers than the cut: `shares_of`)."""
        if self.fault is not None and self.units_started >= self.fault.after_units:
            os.kill(os.getpid(), signal.SIGKILL)
        self.units_started += 1
        return [self._run_share(unit, share) for share in shares_of(unit, self.rank, self.world_size)]

    def _run_share(self, unit: Unit, share: int) -> dict:
        job, path = self.job, part_record_path(unit.name, share)
        args = (unit, share, self.runner, job.info, job.recover, self.runtime, job.seed, self.objective, self.progress)
        if job.store.exists(path):
            if isinstance(self.objective.scope, GlobalScope):
                run_share(*args, store=None, init=self.init)  # the peers need this rank in every collective
            return job.store.read_json(path)
        record = run_share(*args, store=job.store, init=self.init, image_format=self.image_format)
        job.store.write_json(path, record)
        return record


class WorkerLost(Exception):
    """A worker died or its collective broke: the group must be formed anew."""


DEATH_GRACE_S = 10.0  # how long a failed collective waits to see whether a peer died (the real cause)


def gather(refs: list[ray.ObjectRef], check: Callable[[], None] | None = None, poll_s: float = 0.25) -> list[Any]:
    """Results of one call on every rank, in rank order; the first failure ends the wait. `check` runs
    every `poll_s` while waiting and may raise (JobCancelled) to stop waiting for slow calls (actor start-up,
    loading the teacher), not only between recover iterations."""
    results: dict[ray.ObjectRef, Any] = {}
    waiting = list(refs)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1, timeout=poll_s)
        if not done:
            if check is not None:
                check()
            continue
        (ready,) = done
        rank = refs.index(ready)
        try:
            results[ready] = ray.get(ready)
        except RayActorError as exc:
            raise WorkerLost(_died(rank, exc)) from None
        except RayTaskError as exc:
            if isinstance(exc.cause, (ScddError, JobCancelled)):
                raise exc.cause from None
            failure = f"worker {rank} failed: {type(exc.cause).__name__}: {str(exc.cause).splitlines()[0][:300]}"
            death = death_among(waiting, refs)
            raise WorkerLost(f"{death}; {failure}" if death else failure) from None
    return [results[ref] for ref in refs]


def _died(rank: int, exc: RayActorError) -> str:
    return f"worker {rank} died ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"


def death_among(waiting: list[ray.ObjectRef], refs: list[ray.ObjectRef], grace_s: float = DEATH_GRACE_S) -> str | None:
    """When one rank dies, its peers' collectives fail too, and a peer's error may arrive first: look for a
    death among the other calls for a short while, so the cause named is the dead worker, not its peer."""
    deadline = time.monotonic() + grace_s
    while waiting and time.monotonic() < deadline:
        done, waiting = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        for ref in done:
            try:
                ray.get(ref)
            except RayActorError as exc:
                return _died(refs.index(ref), exc)
            except Exception:  # another consequence of the same failure
                pass
    return None


def is_synced(spec: RecoverSpec, world_size: int, cut: int) -> bool:
    """Whether the workers share BatchNorm statistics: bn_sync global, several workers, each with its own share
    (a resume on another worker count than the cut has no optimisation steps, so nothing to share)."""
    return spec.bn_sync == "global" and world_size > 1 and cut == world_size


class RayRecover:
    """The recover stage on a Ray cluster, with `resources.workers` workers (`RayBackend.recover`).
    Same call as `scdd.recover.recover_dataset`; the workers load the teacher the pipeline saved at
    `teacher_path` in the store, not the `teacher` object passed in."""

    def __init__(self, resources: ResourcesSpec, teacher_path: str = TEACHER_PATH, max_retries: int = 3,
                 fault: FaultInjection | None = None, collective_timeout_s: float = 1800.0,
                 placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S, control: Any = None):
        self.resources = resources
        self.teacher_path = teacher_path
        self.max_retries = max_retries
        self.fault = fault
        self.collective_timeout_s = collective_timeout_s
        self.placement_timeout_s = placement_timeout_s
        self.control = control  # workers.control.JobControl actor: cancellation between iterations
        self.groups_formed = 0
        self.restarts: list[dict] = []

    def __call__(self, teacher: nn.Module, info: DatasetInfo, spec: RecoverSpec, runtime: Runtime, store: ArtifactStore,
                 seed: int, progress: Progress | None = None, max_units: int | None = None) -> RecoverResult:
        progress = progress or SilentProgress()
        self.groups_formed, self.restarts = 0, []
        connect()
        world_size = self.resources.workers
        units = recover_plan(store, info.num_classes, spec, world_size)
        pending = pending_units(store, units)
        if max_units is not None:
            pending = pending[:max_units]
        use_gpu = wants_gpus(self.resources.device)
        cut = len(units[0].shares) if units else world_size
        job = WorkerJob(store, self.teacher_path, info, spec, self.resources, seed, use_gpu, cut)
        placement = Placement(world_size, job.threads(), 1 if use_gpu else 0)
        synced = is_synced(spec, world_size, cut)
        if cut != world_size:
            log.info("recover: the units are cut for %d workers (this output's first recover); %d workers make "
                     "them now (no optimisation steps: the same images)", cut, world_size)
        log.info("recover: %d workers on %s (%s), bn_sync %s, %d units to run", world_size,
                 "one GPU each" if use_gpu else f"{job.threads()} CPU thread(s) each", "nccl" if use_gpu else "gloo",
                 "global" if synced else "local", len(pending))
        check = RemoteCheck(self.control) if self.control is not None else None
        failures: Counter[str] = Counter()
        progress.start("recover", len(pending) * spec.iterations, "it")
        started = time.perf_counter()
        units_run = image_iterations = 0
        while pending:
            group = self._form_group(placement, job)
            try:
                (address,) = gather([group.actors[0].address.remote()], check)
                gather(group.call("setup", address, self.collective_timeout_s), check)
                while pending:
                    unit = pending[0]
                    parts = sorted((part for shares in gather(group.call("run_unit", unit), check) for part in shares),
                                   key=lambda part: part["rank"])
                    record = merge_shares(unit, parts, synced)
                    store.write_json(unit.record_path, record)
                    pending.pop(0)
                    units_run += 1
                    image_iterations += len(unit.labels) * spec.iterations
                    progress.advance(spec.iterations, ce=record["ce"], bn=record["bn"], round=unit.round,
                                     images_written=len(record["entries"]))
            except WorkerLost as lost:
                unit = pending[0]
                failures[unit.name] += 1
                self.restarts.append({"unit": unit.name, "cause": str(lost), "time": time.time()})
                if failures[unit.name] > self.max_retries:
                    raise WorkerFailedError(
                        f"recover unit {unit.name} (round {unit.round}, batch {unit.batch}) failed "
                        f"{failures[unit.name]} times; last cause: {lost}. The units before it are stored: "
                        f"run the same job again to resume"
                    ) from None
            finally:
                group.shutdown()
        progress.finish()
        result = collect_result(store, units, units_run, time.perf_counter() - started, image_iterations)
        result.restarts = list(self.restarts)
        return result

    def _form_group(self, placement: Placement, job: WorkerJob) -> WorkerGroup:
        fault = self.fault if self.fault is not None and self.groups_formed < self.fault.groups else None
        self.groups_formed += 1
        return WorkerGroup(RecoverWorker, placement, lambda rank: (rank, placement.workers, job, fault, self.control),
                           self.placement_timeout_s)
