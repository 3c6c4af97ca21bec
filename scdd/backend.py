"""Where the stages that can run distributed run: the pipeline's backend.

A backend provides squeeze's training loops (`trainers`), the recover stage (`recover`), student
training (`fit_student`: the validation student, the random-real baseline and DD-Ranking's hard-label
runs) and the other passes over images (`run_pass`: teacher accuracy, initialisation, the grid;
scdd/passes.py). `LocalBackend` runs them in this process as the only worker; `workers.backend.RayBackend`
runs them on a Ray cluster with `resources.workers` workers. The pipeline takes one backend and never asks
which, and never touches images itself.
"""

from __future__ import annotations

from dataclasses import dataclass
import typing
from typing import Any

import torch
from torch import nn

from api_schema import JobSpec, RecoverSpec, ResourcesSpec
from api_schema.report import StudentScore
from scdd.data import RealData
from scdd.data.loader import decode_workers
from scdd.data.base import DatasetInfo
from scdd.evaluate import evaluate
from scdd.models import create_model
from scdd.passes import PassContext, PassFn
from scdd.progress import Progress
from scdd.recover import RecoverResult, recover_dataset
from scdd.runtime import Runtime, resolve_runtime
from scdd.shard import Shard
from scdd.squeeze import Teacher
from scdd.squeeze.methods import LOCAL_TRAINERS, Trainers
from scdd.store import ArtifactStore
from scdd.validate import Protocol, train_student
from scdd.validate.soft_labels import SoftLabelRequest, SoftLabelWriter, write_index
from scdd.validate.student_images import source_of, student_images


@dataclass(frozen=True)
class StudentRun:
    """One student to train under `protocol` and test on the real test split (dataset.test_limit may cut it).

    `stage` names the run (validate, baseline, validate-hard, full-data), which names the images it trains on
    (scdd/validate/student_images.py `source_of`: the distilled set, or for kind evaluate the set judged; the
    random real subset; the whole training split), read where it trains. In KD, `relabel` gives the soft labels, and `relabel_path` is where it is saved in
    the output (remote workers load it from there). `variant` tells apart runs of one stage (validate.students:
    each further architecture's run is named `<stage>-<arch>`)."""

    stage: str
    protocol: Protocol
    relabel: Teacher | None = None
    relabel_path: str | None = None
    variant: str | None = None
    soft_labels: SoftLabelRequest | None = None  # store the relabel teacher's soft labels (validate/soft_labels.py)

    @property
    def name(self) -> str:
        """The run's name: its stage, or `<stage>-<variant>` (its progress loop; its folder on Ray Train)."""
        return self.stage if self.variant is None else f"{self.stage}-{self.variant}"


class Backend(typing.Protocol):
    """Runs the stages of a job that can run distributed (see the module's docstring)."""

    trainers: Trainers

    def driver_runtime(self, resources: ResourcesSpec) -> Runtime:
        """Where the driver keeps its models (it computes on no images itself)."""
        ...

    def describe_runtime(self, driver: Runtime) -> dict:
        """The report's `runtime`: where the stages computed."""
        ...

    def recover(self, teacher: nn.Module, info: DatasetInfo, spec: RecoverSpec, runtime: Runtime,
                store: ArtifactStore, seed: int, progress: Progress | None = None,
                max_units: int | None = None) -> RecoverResult:
        """Every recover unit not yet recorded in `store` (at most `max_units`); the entries of all recorded."""
        ...

    def fit_student(self, run: StudentRun, spec: JobSpec, data: RealData, runtime: Runtime,
                    progress: Progress, store: ArtifactStore) -> StudentScore: ...

    def fit_students(self, runs: list[StudentRun], spec: JobSpec, data: RealData, runtime: Runtime,
                     progress: Progress, store: ArtifactStore) -> list[StudentScore]:
        """Several independent runs (validate.students), their scores in order: one after another here, side by
        side where the backend has workers to share among them."""
        ...

    def run_pass(self, fn: PassFn, spec: JobSpec, store: ArtifactStore, runtime: Runtime, data: RealData, *args: Any,
                 ranks: int | None = None) -> list[Any]:
        """`fn(ctx, *args)` on `ranks` workers (None: every worker), each with its rank; their results in rank order."""
        ...


class LocalBackend:
    """Every stage in this process."""

    trainers: Trainers = LOCAL_TRAINERS

    def driver_runtime(self, resources: ResourcesSpec) -> Runtime:
        return resolve_runtime(resources)  # the driver is the only worker

    def describe_runtime(self, driver: Runtime) -> dict:
        return driver.describe()

    def recover(self, teacher: nn.Module, info: DatasetInfo, spec: RecoverSpec, runtime: Runtime,
                store: ArtifactStore, seed: int, progress: Progress | None = None,
                max_units: int | None = None) -> RecoverResult:
        return recover_dataset(teacher, info, spec, runtime, store, seed, progress, max_units)

    def fit_student(self, run: StudentRun, spec: JobSpec, data: RealData, runtime: Runtime,
                    progress: Progress, store: ArtifactStore) -> StudentScore:
        info = data.info
        workers = decode_workers(spec.resources.threads)
        images = student_images(source_of(run.stage, spec), spec, data, store, workers=workers)
        torch.manual_seed(spec.seed)  # every student of a job starts from the same weights
        student = create_model(run.protocol.student_arch, info.num_classes, info.channels, info.image_size)
        teacher = run.relabel.model if run.relabel is not None else None
        writer = SoftLabelWriter(store, run.soft_labels.epochs, run.soft_labels.topk) if run.soft_labels else None
        train_student(student, images, run.protocol, teacher, runtime, spec.seed, progress, run.name,
                      soft_labels=writer)
        if writer is not None:
            run.soft_labels.facts = write_index(store, writer.topk, 1, run.protocol.to_dict())
        accuracy = evaluate(student, data.test, runtime, workers=workers)
        return StudentScore(**accuracy.to_dict())

    def fit_students(self, runs: list[StudentRun], spec: JobSpec, data: RealData, runtime: Runtime,
                     progress: Progress, store: ArtifactStore) -> list[StudentScore]:
        return [self.fit_student(run, spec, data, runtime, progress, store) for run in runs]

    def run_pass(self, fn: PassFn, spec: JobSpec, store: ArtifactStore, runtime: Runtime, data: RealData, *args: Any,
                 ranks: int | None = None) -> list[Any]:
        context = PassContext(Shard(0, 1), spec, store, runtime, decode_workers(spec.resources.threads), data)
        return [fn(context, *args)]
