"""One distillation job: load -> squeeze -> recover -> write -> validate -> report.

Running the same spec into the same output again resumes: the teacher checkpoint and every
finished recover unit are reused. A different spec aimed at an output that holds a run is refused
rather than mixed into it. The stages that can run distributed run on the backend the caller
passes (scdd/backend.py); the output's layout is scdd/layout.py.
"""

from __future__ import annotations

from typing import Callable

import torch

from api_schema import JobSpec, Report, ValidateReport
from api_schema.recipes import recipe_facts
from api_schema.report import EvaluatedSet, StudentScore
from scdd.artifacts import library_versions
from scdd.backend import Backend, LocalBackend, StudentRun
from scdd.data import RealData, load_dataset
from scdd.errors import JobCancelled, OutputConflictError, SpecError
from scdd.evaluate import Accuracy
from scdd.layout import IMAGES_DIR, MANIFEST, RELABEL_PATH, REPORT, SPEC_RECORD, TEACHER_PATH
from scdd.models import checkpoint_bytes, model_metadata
from scdd.passes import accuracy_counts, combine_accuracy, plan_init_slice, write_grid
from scdd.progress import Progress, SilentProgress, StageClock, StageListener
from scdd.recover import RecoverResult, collect_result, freeze, recover_plan
from scdd.recover.init import INITS, init_planned, mark_init_planned
from scdd.report import dataset_facts, recover_facts, relabel_facts, squeeze_schedule, teacher_facts
from scdd.runtime import Runtime
from scdd.squeeze import Teacher, TeacherCache, load_stored_teacher, recovery_teacher, relabel_teacher
from scdd.squeeze.methods import Trainers
from scdd.squeeze.teachers import shape_metadata
from scdd.store import ArtifactStore, open_store
from scdd.validate import resolve_protocol
from scdd.validate.external_set import index_external_set
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


def accuracy_on_workers(backend: Backend, spec: JobSpec, store: ArtifactStore, runtime: Runtime, data: RealData,
                        path: str) -> list[Accuracy]:
    """The test accuracy of the model saved at `path` (then of each ensemble member), each worker counting its
    shard of the test split."""
    return combine_accuracy(backend.run_pass(accuracy_counts, spec, store, runtime, data, path))


def save_teacher(store: ArtifactStore, path: str, teacher: Teacher, spec: JobSpec, data: RealData) -> None:
    info = data.info
    store.write_bytes(path, checkpoint_bytes(
        teacher.model, **{"arch": spec.teacher.arch, **model_metadata(teacher.model)}, **shape_metadata(info),
        class_names=list(info.class_names), digest=teacher.digest, source=teacher.source, details=teacher.details,
    ))


def student_fits(backend: Backend, spec: JobSpec, data: RealData, runtime: Runtime, progress: Progress,
                 store: ArtifactStore) -> tuple[Callable[[StudentRun], StudentScore],
                                                Callable[[list[StudentRun]], list[StudentScore]]]:
    """The validate stage's student runs on `backend`: one, and several side by side (validate.students)."""
    def fit(run: StudentRun) -> StudentScore:
        return backend.fit_student(run, spec, data, runtime, progress, store)

    def fit_many(runs: list[StudentRun]) -> list[StudentScore]:
        return backend.fit_students(runs, spec, data, runtime, progress, store)

    return fit, fit_many


def start_job(spec: JobSpec, backend: Backend, on_stage: StageListener | None
              ) -> tuple[StageClock, Runtime, ArtifactStore, TeacherCache]:
    """What every kind of job starts with: its stage clock, the driver's runtime, the global seed, its output and
    the teacher cache."""
    clock = StageClock(listener=on_stage)
    runtime = backend.driver_runtime(spec.resources)
    torch.manual_seed(spec.seed)
    return clock, runtime, open_output(spec), TeacherCache(spec.output.teacher_cache)


def recipe_of(spec: JobSpec) -> dict:
    """The report's `recipe` (the named recipe and the values it set), where the spec names one."""
    return {"recipe": recipe_facts(spec.recipe, spec.to_dict())} if spec.recipe else {}


def validate_images(
    spec: JobSpec, data: RealData, images: int, relabel_of: Callable[[], Teacher], recovery: Teacher | None,
    backend: Backend, store: ArtifactStore, cache: TeacherCache, runtime: Runtime, progress: Progress, clock: StageClock,
) -> ValidateReport:
    """The validate stage for a set of `images` images in `store` (made by recover, or judged by kind evaluate): in kd
    the relabel teacher `relabel_of()` (saved in the output and tested unless it is the `recovery` teacher, saved
    already), then the students."""
    protocol = resolve_protocol(spec.validate_, images, data.info.image_size)
    relabel = relabel_path = relabel_info = None
    if protocol.mode == "kd":
        with clock.stage("squeeze"):
            relabel = relabel_of()
            freeze(relabel.model, runtime)
            relabel_path, accuracy = TEACHER_PATH, None
            if relabel is not recovery:
                relabel_path = RELABEL_PATH  # where the students' workers load it
                save_teacher(store, relabel_path, relabel, spec, data)
                accuracy = accuracy_on_workers(backend, spec, store, runtime, data, relabel_path)[0]
        relabel_info = relabel_facts(relabel, recovery, accuracy)
    fit, fit_many = student_fits(backend, spec, data, runtime, progress, store)
    return validate_stage(spec, data, images, protocol, relabel, relabel_path, relabel_info, fit, clock, cache.store,
                          fit_many)


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
    if spec.kind == "evaluate":
        return run_evaluation(spec, progress, backend, on_stage=on_stage)
    clock, runtime, store, cache = start_job(spec, backend, on_stage)

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
        teacher = teacher_facts(recovery, spec, accuracy_on_workers(backend, spec, store, runtime, data, TEACHER_PATH))

    with clock.stage("recover"):
        if INITS.get(spec.recover.init) is not None and not init_planned(store):
            # real-pixel inits: each worker plans its class slice, from the saved teacher
            backend.run_pass(plan_init_slice, spec, store, runtime, data)
            mark_init_planned(store, spec.recover, info.num_classes)
        try:
            result = backend.recover(recovery.model, info, spec.recover, runtime, store, spec.seed, progress,
                                     max_units=max_units)
        except JobCancelled:  # keep what was made, marked partial, and stop
            units = recover_plan(store, info.num_classes, spec.recover, spec.resources.workers)
            write_manifest(store, spec, data, collect_result(store, units, 0, 0.0, 0), complete=False)
            raise
    complete = len(result.entries) == info.num_classes * spec.recover.ipc

    with clock.stage("write"):  # the images are in the store already: the manifest, and grid.png on a worker
        write_manifest(store, spec, data, result, complete)
        backend.run_pass(write_grid, spec, store, runtime, data, ranks=1)

    validation = None
    if spec.validate_.enabled and complete:
        validation = validate_images(
            spec, data, len(result.entries), lambda: relabel_teacher(spec, data, recovery, cache, runtime, progress,
                                                                     backend.trainers),
            recovery, backend, store, cache, runtime, progress, clock)

    report = Report(
        job_id=spec.job_id(),
        output=store.url,
        complete=complete,
        resumed=resuming,
        method=spec.method,
        dataset=dataset_facts(data, spec.dataset.test_limit),
        runtime=backend.describe_runtime(runtime),
        teacher=teacher,
        recover=recover_facts(result, spec, info.num_classes, recovery.model),
        validate=validation,
        stage_seconds=clock.seconds,
        schedule=squeeze_schedule(spec, recovery),
        **recipe_of(spec),
    )
    store.write_json(REPORT, report.to_json_dict())
    return report


# ---- kind evaluate: judge a set that exists ----------------------------------------------------------------------

def claim_evaluation_output(store: ArtifactStore, spec: JobSpec) -> bool:
    """Record an evaluate job's spec in its output, or check it matches the one there. True when one was there."""
    if store.exists(SPEC_RECORD):
        recorded = store.read_json(SPEC_RECORD)
        if recorded.get("evaluation_digest") != spec.evaluation_digest():
            raise OutputConflictError(
                f"output {store.url} holds another run (not this evaluation of {spec.evaluate.images}); choose "
                f"another --out, or delete that folder to start over")
        return True
    if store.list(IMAGES_DIR) or store.exists(REPORT):
        raise OutputConflictError(f"output {store.url} already holds a run or a set; an evaluation writes its report "
                                  f"to a folder of its own: choose another --out")
    store.write_json(SPEC_RECORD, {"evaluation_digest": spec.evaluation_digest(), "spec": spec.to_dict()})
    return False


def evaluation_teacher(spec: JobSpec, data: RealData, cache: TeacherCache, runtime: Runtime, progress: Progress,
                       trainers: Trainers) -> Teacher:
    """The KD relabel teacher of an evaluate job, obtained as a distill job of the same spec obtains it:
    validate.relabel_checkpoint, an ensemble, the supervised teacher, or (relabel_teacher recover) the recovery
    teacher of `method` (trained, or from the teacher cache where a distill run left it)."""
    vspec = spec.validate_
    needs_recovery = (vspec.relabel_teacher == "recover"
                      or (vspec.relabel_teacher == "supervised" and not vspec.relabel_checkpoint and spec.method == "sre2l"
                          and vspec.relabel_arch in (None, spec.teacher.arch))
                      or (vspec.relabel_teacher == "ensemble" and not vspec.relabel_checkpoints and spec.method == "gvbsm"))
    if needs_recovery:
        recovery = recovery_teacher(spec, data, cache, runtime, progress, trainers)
    else:  # relabel_teacher does not look at it for this spec
        recovery = Teacher(model=None, source="unused", digest=None)  # type: ignore[arg-type]
    return relabel_teacher(spec, data, recovery, cache, runtime, progress, trainers)


def run_evaluation(spec: JobSpec, progress: Progress, backend: Backend, *,
                   on_stage: StageListener | None = None) -> Report:
    """kind evaluate: the students of the validate stage (validate.students, each beside its random-real baseline
    of the same count per class) trained on the set at evaluate.images and tested on the real test split; no
    squeeze of a recovery teacher unless the relabel teacher is that teacher, no recover. Writes report.json and
    (kd) the relabel teacher to the output."""
    clock, runtime, store, cache = start_job(spec, backend, on_stage)

    with clock.stage("load"):
        data = load_dataset(spec.dataset, spec.seed)
        resuming = claim_evaluation_output(store, spec)
        found = index_external_set(spec.evaluate.images, data.info, spec)  # a listing: no image is read here
    images = len(found)
    validation = validate_images(
        spec, data, images, lambda: evaluation_teacher(spec, data, cache, runtime, progress, backend.trainers), None,
        backend, store, cache, runtime, progress, clock)
    report = Report(
        job_id=spec.job_id(),
        output=store.url,
        complete=True,
        resumed=resuming,
        method=spec.method,
        kind="evaluate",
        evaluated=EvaluatedSet(images_url=spec.evaluate.images, images=images, classes=data.info.num_classes),
        dataset=dataset_facts(data, spec.dataset.test_limit),
        runtime=backend.describe_runtime(runtime),
        teacher=None,
        recover=None,
        validate=validation,
        stage_seconds=clock.seconds,
        schedule=None,
        **recipe_of(spec),
    )
    store.write_json(REPORT, report.to_json_dict())
    return report
