"""One distillation job on one machine: load -> squeeze -> recover -> write -> validate -> report.

Running the same spec into the same output again resumes: the teacher checkpoint and every
finished recover unit are reused. A different spec aimed at an output that holds a run is refused
rather than mixed into it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from api_schema import JobSpec
from scdd.artifacts import decode_png, grid_png, library_versions
from scdd.data import RealData, load_dataset
from scdd.errors import OutputConflictError
from scdd.evaluate import evaluate
from scdd.models import checkpoint_bytes, create_model, load_weights
from scdd.progress import Progress, SilentProgress
from scdd.recover import RecoverResult, freeze, recover_dataset
from scdd.runtime import Runtime, resolve_runtime
from scdd.squeeze import METHODS
from scdd.store import ArtifactStore, read_url
from scdd.validate import train_student_kd

SPEC_RECORD = "state/spec.json"
TEACHER_PATH = "teacher/teacher.pt"


@dataclass
class StageClock:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 3)


def default_output_url(spec: JobSpec) -> str:
    return f"runs/{spec.job_id()}"


def claim_output(store: ArtifactStore, spec: JobSpec) -> bool:
    """Record the spec in the output, or check it matches the one there. True when resuming."""
    if store.exists(SPEC_RECORD):
        recorded = store.read_json(SPEC_RECORD)
        if recorded.get("recover_digest") != spec.recover_digest():
            raise OutputConflictError(
                f"output {store.url} holds a run of a different spec (recover digest {recorded.get('recover_digest')}, "
                f"this spec {spec.recover_digest()}); choose another --out, or delete that folder to start over"
            )
        return True
    if store.list("images"):
        raise OutputConflictError(f"output {store.url} already holds images from another tool or run; choose another --out")
    store.write_json(SPEC_RECORD, {"recover_digest": spec.recover_digest(), "spec": spec.to_dict()})
    return False


def obtain_teacher(
    spec: JobSpec, data: RealData, store: ArtifactStore, runtime: Runtime, progress: Progress
) -> tuple[nn.Module, str]:
    """The teacher and where it came from: a given checkpoint, this output's saved one, or squeeze."""
    info = data.info
    teacher_spec = spec.teacher
    if teacher_spec.checkpoint:
        model = create_model(teacher_spec.arch, info.num_classes, info.channels, info.image_size)
        load_weights(model, read_url(teacher_spec.checkpoint), teacher_spec.checkpoint)
        return model, "checkpoint"
    if store.exists(TEACHER_PATH):
        model = create_model(teacher_spec.arch, info.num_classes, info.channels, info.image_size)
        meta = load_weights(model, store.read_bytes(TEACHER_PATH), store.url_of(TEACHER_PATH))
        if meta.get("teacher_digest") == spec.teacher_digest():
            return model, "resumed"
    model = METHODS.get(spec.method)(data, teacher_spec, runtime, spec.seed, progress)
    store.write_bytes(
        TEACHER_PATH,
        checkpoint_bytes(
            model, arch=teacher_spec.arch, num_classes=info.num_classes, in_channels=info.channels,
            image_size=info.image_size, class_names=list(info.class_names), teacher_digest=spec.teacher_digest(),
        ),
    )
    return model, "trained"


def load_distilled(store: ArtifactStore, result: RecoverResult, data: RealData) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the written PNGs back: (N, C, S, S) normalised images and their labels (what a user gets)."""
    info = data.info
    pixels = torch.stack([decode_png(store.read_bytes(e.path), info.channels) for e in result.entries])
    return info.normalize(pixels), torch.tensor([e.label for e in result.entries])


def write_manifest(store: ArtifactStore, spec: JobSpec, data: RealData, result: RecoverResult, complete: bool) -> None:
    info = data.info
    store.write_json(
        "manifest.json",
        {
            "job_id": spec.job_id(),
            "complete": complete,
            "seed": spec.seed,
            "spec": spec.to_dict(),
            "versions": library_versions(),
            "classes": [
                {"label": i, "name": n, "dir": d, "source_index": s}
                for i, (n, d, s) in enumerate(zip(info.class_names, info.class_dirs, info.source_indices))
            ],
            "images": [e.to_dict() for e in result.entries],
        },
    )


def write_grid(store: ArtifactStore, spec: JobSpec, data: RealData, images: torch.Tensor, labels: torch.Tensor) -> None:
    per_class: dict[int, list[torch.Tensor]] = {}
    pixels = data.info.denormalize(images)
    for label, image in zip(labels.tolist(), pixels):
        per_class.setdefault(label, []).append(image)
    store.write_bytes("grid.png", grid_png(per_class, data.info, spec.output.grid_per_class))


def run_distillation(spec: JobSpec, progress: Progress | None = None, max_units: int | None = None) -> dict:
    """Run the whole job; returns the report (also written to report.json).

    `max_units` stops recovery early (the run stays resumable); used to test interruption.
    """
    progress = progress or SilentProgress()
    clock = StageClock()
    runtime = resolve_runtime(spec.resources)
    torch.manual_seed(spec.seed)
    store = ArtifactStore(spec.output.url or default_output_url(spec))

    with clock.stage("load"):
        data = load_dataset(spec.dataset, spec.seed)
        resuming = claim_output(store, spec)
    info = data.info

    with clock.stage("squeeze"):
        teacher, teacher_source = obtain_teacher(spec, data, store, runtime, progress)
        teacher = freeze(teacher, runtime)
        teacher_accuracy = evaluate(teacher, data.test, runtime)

    with clock.stage("recover"):
        result = recover_dataset(teacher, info, spec.recover, runtime, store, spec.seed, progress, max_units=max_units)
    complete = len(result.entries) == info.num_classes * spec.recover.ipc

    with clock.stage("write"):
        write_manifest(store, spec, data, result, complete)
        images, labels = load_distilled(store, result, data)
        write_grid(store, spec, data, images, labels)

    student_report = None
    if spec.validate_.enabled and complete:
        with clock.stage("validate"):
            vspec = spec.validate_
            student = create_model(vspec.student_arch, info.num_classes, info.channels, info.image_size)
            student = train_student_kd(student, teacher, images, vspec, runtime, spec.seed, progress)
            student_report = {"arch": vspec.student_arch, "epochs": vspec.epochs, **evaluate(student, data.test, runtime).to_dict()}

    report = {
        "job_id": spec.job_id(),
        "output": store.url,
        "complete": complete,
        "resumed": resuming,
        "method": spec.method,
        "dataset": {
            "name": info.name,
            "classes": info.num_classes,
            "image_size": info.image_size,
            "channels": info.channels,
            "train_images": len(data.train),
            "test_images": len(data.test),
        },
        "runtime": runtime.describe(),
        "teacher": {"arch": spec.teacher.arch, "source": teacher_source, **teacher_accuracy.to_dict()},
        "recover": {
            "images": len(result.entries),
            "expected_images": info.num_classes * spec.recover.ipc,
            "iterations": spec.recover.iterations,
            "units_run": result.units_run,
            "units_resumed": result.units_resumed,
            "seconds": round(result.seconds, 3),
            "image_iterations_per_second": round(result.image_iterations_per_second, 2),
            "final_ce": result.final_ce,
            "final_bn": result.final_bn,
        },
        "validate": student_report,
        "stage_seconds": clock.seconds,
    }
    store.write_json("report.json", report)
    return report
