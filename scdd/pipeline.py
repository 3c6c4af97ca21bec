"""One distillation job: load -> squeeze -> recover -> write -> validate -> report.

Running the same spec into the same output again resumes: the teacher checkpoint and every
finished recover unit are reused. A different spec aimed at an output that holds a run is refused
rather than mixed into it. The stages that can run distributed run on the backend the caller
passes (scdd/backend.py); the output's layout is scdd/layout.py.
"""

from __future__ import annotations

import torch

from api_schema import JobSpec, Report
from api_schema.report import StudentScore
from scdd.artifacts import grid_png, library_versions, load_distilled
from scdd.backend import Backend, LocalBackend, StudentRun
from scdd.data import RealData, load_dataset
from scdd.errors import JobCancelled, OutputConflictError, SpecError
from scdd.layout import GRID, IMAGES_DIR, MANIFEST, RELABEL_PATH, REPORT, SPEC_RECORD, TEACHER_PATH
from scdd.models import checkpoint_bytes, model_metadata
from scdd.progress import Progress, SilentProgress, StageClock, StageListener
from scdd.recover import RecoverResult, collect_result, freeze, plan_units
from scdd.recover.init import plan_initialisation
from scdd.report import dataset_facts, recover_facts, relabel_facts, squeeze_schedule, teacher_facts
from scdd.runtime import resolve_runtime
from scdd.squeeze import Teacher, TeacherCache, load_stored_teacher, recovery_teacher, relabel_teacher
from scdd.squeeze.teachers import shape_metadata
from scdd.store import ArtifactStore, open_store
from scdd.validate import resolve_protocol
from scdd.validate.stage import validate_stage


def default_output_url(spec: JobSpec) -> str:
    return f"runs/{spec.job_id()}"


def open_output(spec: JobSpec) -> ArtifactStore:
    """The job's output: `output.url`, else runs/<job id>."""
    return open_store(spec.output, spec.output.url or default_output_url(spec))


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
    if store.list(IMAGES_DIR):
        raise OutputConflictError(f"output {store.url} already holds images from another tool or run; choose another --out")
    store.write_json(SPEC_RECORD, {"recover_digest": spec.recover_digest(), "spec": spec.to_dict()})
    return False


def write_manifest(store: ArtifactStore, spec: JobSpec, data: RealData, result: RecoverResult, complete: bool) -> None:
    info = data.info
    store.write_json(
        MANIFEST,
        {
            "job_id": spec.job_id(),
            "complete": complete,
            "partial": not complete,  # a stopped or time-boxed run: resumable with the same spec and output
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
    store.write_bytes(GRID, grid_png(per_class, data.info, spec.output.grid_per_class))


def save_teacher(store: ArtifactStore, path: str, teacher: Teacher, spec: JobSpec, data: RealData) -> None:
    info = data.info
    store.write_bytes(path, checkpoint_bytes(
        teacher.model, **{"arch": spec.teacher.arch, **model_metadata(teacher.model)}, **shape_metadata(info),
        class_names=list(info.class_names), digest=teacher.digest, source=teacher.source, details=teacher.details,
    ))


def run_distillation(
    spec: JobSpec, progress: Progress | None = None, backend: Backend | None = None, *, max_units: int | None = None,
    on_stage: StageListener | None = None,
) -> Report:
    """Run the whole job; returns the report (also written to report.json).

    `backend` runs squeeze's training loops, recover and the students: `LocalBackend` (this process)
    by default; `workers.backend.RayBackend` for `resources.workers` > 1 (this layer does not import
    Ray). `max_units` stops recovery early (the run stays resumable); used to test interruption.
    `on_stage` hears every stage start and finish.
    """
    if backend is None:
        if spec.resources.workers > 1:
            raise SpecError(
                f"resources.workers = {spec.resources.workers} runs on Ray: pass "
                f"backend=workers.backend.RayBackend(spec), or use `scdd distill --workers N`"
            )
        backend = LocalBackend()
    progress = progress or SilentProgress()
    clock = StageClock(listener=on_stage)
    runtime = resolve_runtime(spec.resources)
    torch.manual_seed(spec.seed)
    store = open_output(spec)
    cache = TeacherCache(spec.output.teacher_cache)

    with clock.stage("load"):
        data = load_dataset(spec.dataset, spec.seed)
        resuming = claim_output(store, spec)
    info = data.info

    with clock.stage("squeeze"):
        recovery = None
        if resuming and not spec.teacher.checkpoint:
            # The units already written came from the teacher saved in the output, so the rest must
            # too, even if the cache was cleared meanwhile.
            recovery = load_stored_teacher(store, TEACHER_PATH, spec.teacher_digest(), "resumed", spec, data)
        recovery = recovery or recovery_teacher(spec, data, cache, runtime, progress, backend.trainers)
        freeze(recovery.model, runtime)
        save_teacher(store, TEACHER_PATH, recovery, spec, data)
        teacher = teacher_facts(recovery, spec, data, runtime)

    with clock.stage("recover"):
        plan_initialisation(data, recovery.model, spec.recover, runtime, spec.seed, store)
        try:
            result = backend.recover(recovery.model, info, spec.recover, runtime, store, spec.seed, progress,
                                     max_units=max_units)
        except JobCancelled:  # keep what was made, marked partial, and stop
            units = plan_units(info.num_classes, spec.recover.ipc, spec.recover.batch_size, spec.resources.workers)
            write_manifest(store, spec, data, collect_result(store, units, 0, 0.0, 0), complete=False)
            raise
    complete = len(result.entries) == info.num_classes * spec.recover.ipc

    with clock.stage("write"):
        write_manifest(store, spec, data, result, complete)
        images, labels = load_distilled(store, [e.path for e in result.entries], [e.label for e in result.entries], info)
        write_grid(store, spec, data, images, labels)

    validation = None
    if spec.validate_.enabled and complete:
        protocol = resolve_protocol(spec.validate_, len(images))
        relabel = relabel_path = relabel_info = None
        if protocol.mode == "kd":
            with clock.stage("squeeze"):
                relabel = relabel_teacher(spec, data, recovery, cache, runtime, progress, backend.trainers)
                freeze(relabel.model, runtime)
                relabel_path = TEACHER_PATH
                if relabel is not recovery:
                    relabel_path = RELABEL_PATH
                    save_teacher(store, relabel_path, relabel, spec, data)
            relabel_info = relabel_facts(relabel, recovery, data, runtime)

        def fit(run: StudentRun) -> StudentScore:
            return backend.fit_student(run, spec, data, runtime, progress)

        validation = validate_stage(spec, data, images, labels, protocol, relabel, relabel_path, relabel_info, fit,
                                    clock, cache.store)

    report = Report(
        job_id=spec.job_id(),
        output=store.url,
        complete=complete,
        resumed=resuming,
        method=spec.method,
        dataset=dataset_facts(data, spec.dataset.test_limit),
        runtime=runtime.describe(),
        teacher=teacher,
        recover=recover_facts(result, spec, info.num_classes, recovery.model),
        validate=validation,
        stage_seconds=clock.seconds,
        schedule=squeeze_schedule(spec, recovery),
    )
    store.write_json(REPORT, report.to_json_dict())
    return report
