"""The pipeline's backend on a Ray cluster: recover with `resources.workers` actors (workers/recover.py),
squeeze's training loops and the students on Ray Train (workers/train.py).

`RayOptions` holds how the Ray stages run: retries, timeouts, how often workers ask whether the job
is cancelled, and the fault injections tests use. A job's `JobControl` actor (cancel flag and
progress relay, workers/control.py) is given when the backend is built.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from torch import nn

from api_schema import JobSpec, RecoverSpec, ResourcesSpec
from api_schema.report import StudentScore
from scdd.backend import StudentRun
from scdd.data import RealData
from scdd.data.base import DatasetInfo
from scdd.pipeline import open_output
from scdd.progress import Progress
from scdd.passes import PassFn
from scdd.recover import RecoverResult
from scdd.runtime import Runtime, resolve_runtime
from scdd.squeeze.methods import Trainers
from scdd.validate.student_images import source_of
from scdd.store import ArtifactStore
from workers.cluster import (
    DEFAULT_MAX_RESTARTS,
    DEFAULT_PLACEMENT_TIMEOUT_S,
    max_restarts_from_env,
    placement_timeout_from_env,
    wants_gpus,
)
from workers.passes import RayPasses
from workers.recover import FaultInjection, RayRecover
from workers.train import RayTraining, TrainFault


@dataclass(frozen=True)
class RayOptions:
    """How the Ray stages run. The defaults are the production ones."""

    recover_retries: int = DEFAULT_MAX_RESTARTS  # a recover unit whose worker group failed more often fails the job
    collective_timeout_s: float = 1800.0  # recover workers' process-group timeout
    # how long a recover worker group or a Ray Train stage waits for the cluster to place its workers (a GPU
    # node's cold start under an autoscaler takes minutes); then the stage fails with a ResourceError
    placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S
    train_failures: int = DEFAULT_MAX_RESTARTS  # Ray Train restarts of a training stage
    check_s: float = 0.5  # how often a remote worker asks whether the job is cancelled
    checkpoint_every_s: float = 30.0  # Ray Train: report and checkpoint at most this often
    recover_fault: FaultInjection | None = None  # tests: a recover worker kills itself
    train_fault: TrainFault | None = None  # tests: a Ray Train worker kills itself

    @classmethod
    def from_env(cls) -> "RayOptions":
        """The options of a real job: the defaults, with placement_timeout_s from $SCDD_PLACEMENT_TIMEOUT_S and both
        restart counts from $SCDD_MAX_RESTARTS when set (the Helm chart sets them from ray.placementTimeoutS and
        ray.maxRestarts; the dispatcher passes its own settings on; `scdd distill --workers` reads them too)."""
        restarts = max_restarts_from_env()
        return cls(placement_timeout_s=placement_timeout_from_env(), recover_retries=restarts, train_failures=restarts)


class RayBackend:
    """Recover, squeeze training and students on Ray with `spec.resources.workers` workers."""

    def __init__(self, spec: JobSpec, control: Any = None, options: RayOptions = RayOptions()):
        """`control`: the job's `workers.control.JobControl` actor, or None (no cancellation, no relayed progress)."""
        self.options = options
        self.ray_recover = RayRecover(
            spec.resources, max_retries=options.recover_retries, fault=options.recover_fault,
            collective_timeout_s=options.collective_timeout_s, placement_timeout_s=options.placement_timeout_s,
            control=control)
        self.training = RayTraining(spec, open_output(spec), max_failures=options.train_failures,
                                    fault=options.train_fault, control=control, check_s=options.check_s,
                                    checkpoint_every_s=options.checkpoint_every_s,
                                    placement_timeout_s=options.placement_timeout_s)
        self.trainers: Trainers = self.training.trainers()
        self.passes = RayPasses(spec, open_output(spec), options.placement_timeout_s, control)
        self.spec = spec

    def driver_runtime(self, resources: ResourcesSpec) -> Runtime:
        """The driver keeps its models on the CPU: it may run on a CPU-only head and computes on no images."""
        return resolve_runtime(resources.model_copy(update={"device": "cpu"}))

    def describe_runtime(self, driver: Runtime) -> dict:
        """The workers' device (decided by the spec and the cluster's configuration) and the driver's precision settings."""
        use_gpu = wants_gpus(self.spec.resources.device)
        return {**driver.describe(), "device": "cuda" if use_gpu else "cpu"}

    def run_pass(self, fn: PassFn, spec: JobSpec, store: ArtifactStore, runtime: Runtime, data: RealData, *args: Any,
                 ranks: int | None = None) -> list[Any]:
        """`fn` on the workers as Ray tasks (workers/passes.py); the driver's `data` and `runtime` stay here."""
        return self.passes(fn, *args, ranks=ranks)

    def recover(self, teacher: nn.Module, info: DatasetInfo, spec: RecoverSpec, runtime: Runtime,
                store: ArtifactStore, seed: int, progress: Progress | None = None,
                max_units: int | None = None) -> RecoverResult:
        return self.ray_recover(teacher, info, spec, runtime, store, seed, progress, max_units)

    def fit_student(self, run: StudentRun, spec: JobSpec, data: RealData, runtime: Runtime,
                    progress: Progress, store: ArtifactStore) -> StudentScore:
        """The workers read the images themselves (the distilled ones from the store, real ones from disk)."""
        return self.training.fit_student(run.name, run.protocol, run.relabel_path, source_of(run.stage, spec),
                                         soft_labels=run.soft_labels)

    def fit_students(self, runs: list[StudentRun], spec: JobSpec, data: RealData, runtime: Runtime,
                     progress: Progress, store: ArtifactStore) -> list[StudentScore]:
        """K runs side by side on the W workers: each a data-parallel run of max(1, W // K) ranks, min(K, W) of
        them at a time (`share_workers`); one run takes all W, as `fit_student` does."""
        ranks, at_once = share_workers(spec.resources.workers, len(runs))
        if at_once <= 1:
            return [self.fit_student(run, spec, data, runtime, progress, store) for run in runs]

        def fit(run: StudentRun) -> StudentScore:
            return self.training.fit_student(run.name, run.protocol, run.relabel_path, source_of(run.stage, spec),
                                             workers=ranks, soft_labels=run.soft_labels)

        with ThreadPoolExecutor(at_once, thread_name_prefix="scdd-students") as pool:
            return list(pool.map(fit, runs))


def share_workers(workers: int, runs: int) -> tuple[int, int]:
    """(ranks per run, runs at once) for `runs` independent student runs on `workers` workers: W // K ranks each
    when there are enough workers for all (the rest idle), else one rank each, W at a time."""
    ranks = max(1, workers // max(1, runs))
    return ranks, max(1, min(runs, workers // ranks))
