"""The pipeline's backend on a Ray cluster: recover with `resources.workers` actors (workers/recover.py),
squeeze's training loops and the students on Ray Train (workers/train.py).

`RayOptions` holds how the Ray stages run: retries, timeouts, how often workers ask whether the job
is cancelled, and the fault injections tests use. A job's `JobControl` actor (cancel flag and
progress relay, workers/control.py) is given when the backend is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from api_schema import JobSpec, RecoverSpec
from api_schema.report import StudentScore
from scdd.backend import StudentRun
from scdd.data import RealData
from scdd.data.base import DatasetInfo
from scdd.pipeline import open_output
from scdd.progress import Progress
from scdd.recover import RecoverResult
from scdd.runtime import Runtime
from scdd.squeeze.methods import Trainers
from scdd.store import ArtifactStore
from workers.recover import FaultInjection, RayRecover
from workers.train import RayTraining, TrainFault


@dataclass(frozen=True)
class RayOptions:
    """How the Ray stages run. The defaults are the production ones."""

    recover_retries: int = 3  # a recover unit whose worker group failed more often fails the job
    collective_timeout_s: float = 1800.0  # recover workers' process-group timeout
    placement_timeout_s: float = 120.0  # waiting for the cluster to place a recover worker group
    train_failures: int = 2  # Ray Train restarts of a training stage
    check_s: float = 0.5  # how often a remote worker asks whether the job is cancelled
    checkpoint_every_s: float = 30.0  # Ray Train: report and checkpoint at most this often
    recover_fault: FaultInjection | None = None  # tests: a recover worker kills itself
    train_fault: TrainFault | None = None  # tests: a Ray Train worker kills itself


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
                                    checkpoint_every_s=options.checkpoint_every_s)
        self.trainers: Trainers = self.training.trainers()

    def recover(self, teacher: nn.Module, info: DatasetInfo, spec: RecoverSpec, runtime: Runtime,
                store: ArtifactStore, seed: int, progress: Progress | None = None,
                max_units: int | None = None) -> RecoverResult:
        return self.ray_recover(teacher, info, spec, runtime, store, seed, progress, max_units)

    def fit_student(self, run: StudentRun, spec: JobSpec, data: RealData, runtime: Runtime,
                    progress: Progress) -> StudentScore:
        """The workers read the images themselves (the distilled ones from the store, real ones from disk)."""
        return self.training.fit_student(run.stage, run.protocol, run.relabel_path)
