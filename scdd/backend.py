"""Where the stages that can run distributed run: the pipeline's backend.

A backend provides squeeze's training loops (`trainers`), the recover stage (`recover`) and student
training (`fit_student`: the validation student, the random-real baseline and DD-Ranking's hard-label
runs). `LocalBackend` runs them in this process; `workers.backend.RayBackend` runs them on a Ray
cluster with `resources.workers` workers. The pipeline takes one backend and never asks which.
"""

from __future__ import annotations

from dataclasses import dataclass
import typing

import torch
from torch import nn

from api_schema import JobSpec, RecoverSpec
from api_schema.report import StudentScore
from scdd.data import RealData
from scdd.data.base import DatasetInfo
from scdd.evaluate import evaluate
from scdd.models import create_model
from scdd.progress import Progress
from scdd.recover import RecoverResult, recover_dataset
from scdd.runtime import Runtime
from scdd.squeeze import Teacher
from scdd.squeeze.methods import LOCAL_TRAINERS, Trainers
from scdd.store import ArtifactStore
from scdd.validate import Protocol, train_student


@dataclass(frozen=True)
class StudentRun:
    """One student to train under `protocol` and test on the real test split (dataset.test_limit may cut it).

    `stage` names the run (validate, baseline, validate-hard, full-data); `images` (N, C, S, S) are
    normalised, `labels` (N,) class positions. In KD, `relabel` gives the soft labels, and
    `relabel_path` is where it is saved in the output (remote workers load it from there)."""

    stage: str
    images: torch.Tensor
    labels: torch.Tensor
    protocol: Protocol
    relabel: Teacher | None = None
    relabel_path: str | None = None


class Backend(typing.Protocol):
    """Runs the stages of a job that can run distributed (see the module's docstring)."""

    trainers: Trainers

    def recover(self, teacher: nn.Module, info: DatasetInfo, spec: RecoverSpec, runtime: Runtime,
                store: ArtifactStore, seed: int, progress: Progress | None = None,
                max_units: int | None = None) -> RecoverResult:
        """Every recover unit not yet recorded in `store` (at most `max_units`); the entries of all recorded."""
        ...

    def fit_student(self, run: StudentRun, spec: JobSpec, data: RealData, runtime: Runtime,
                    progress: Progress) -> StudentScore: ...


class LocalBackend:
    """Every stage in this process."""

    trainers: Trainers = LOCAL_TRAINERS

    def recover(self, teacher: nn.Module, info: DatasetInfo, spec: RecoverSpec, runtime: Runtime,
                store: ArtifactStore, seed: int, progress: Progress | None = None,
                max_units: int | None = None) -> RecoverResult:
        return recover_dataset(teacher, info, spec, runtime, store, seed, progress, max_units)

    def fit_student(self, run: StudentRun, spec: JobSpec, data: RealData, runtime: Runtime,
                    progress: Progress) -> StudentScore:
        info = data.info
        torch.manual_seed(spec.seed)  # every student of a job starts from the same weights
        student = create_model(run.protocol.student_arch, info.num_classes, info.channels, info.image_size)
        teacher = run.relabel.model if run.relabel is not None else None
        train_student(student, run.images, run.labels, run.protocol, teacher, runtime, spec.seed, progress, run.stage)
        return StudentScore(**evaluate(student, data.test, runtime).to_dict())
