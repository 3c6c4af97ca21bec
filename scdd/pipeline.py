"""One distillation job on one machine: load -> squeeze -> recover -> write -> validate -> report.

Running the same spec into the same output again resumes: the teacher checkpoint and every
finished recover unit are reused. A different spec aimed at an output that holds a run is refused
rather than mixed into it.
"""

from __future__ import annotations

import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from api_schema import JobSpec
from scdd.artifacts import decode_png, grid_png, library_versions
from scdd.data import RealData, load_dataset
from scdd.data.base import DatasetInfo
from scdd.errors import JobCancelled, OutputConflictError, SpecError
from scdd.evaluate import evaluate
from scdd.models import checkpoint_bytes, create_model
from scdd.progress import Progress, SilentProgress
from scdd.recover import RecoverResult, RecoverStage, collect_result, freeze, plan_units, recover_dataset
from scdd.recover.init import plan_initialisation
from scdd.runtime import Runtime, resolve_runtime
from scdd.squeeze import (
    Teacher,
    TeacherCache,
    bn_variance_summary,
    load_stored_teacher,
    recovery_teacher,
    relabel_teacher,
)
from scdd.squeeze.methods import LOCAL_TRAINERS, Trainers
from scdd.store import ArtifactStore, open_store
from scdd.validate import Protocol, random_real_subset, ranking, resolve_protocol, train_student
from scdd.validate.baseline import whole_split

SPEC_RECORD = "state/spec.json"
TEACHER_PATH = "teacher/teacher.pt"  # the recovery teacher, in the output
RELABEL_PATH = "teacher/relabel.pt"  # the KD relabel teacher, when it is another one
FULL_DATA_BATCH = 256  # the full-data hard-label run of DD-Ranking


StageListener = typing.Callable[[str, str, float], None]  # ("started" | "finished", stage, seconds)


@dataclass
class StageClock:
    seconds: dict[str, float] = field(default_factory=dict)
    listener: StageListener | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        if self.listener is not None:
            self.listener("started", name, 0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 3)
        if self.listener is not None:
            self.listener("finished", name, elapsed)


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


def load_distilled(store: ArtifactStore, paths: list[str], labels: list[int], info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the written PNGs back: (N, C, S, S) normalised images and their labels (what a user gets)."""
    pixels = torch.stack([decode_png(store.read_bytes(path), info.channels) for path in paths])
    return info.normalize(pixels), torch.tensor(labels)


def write_manifest(store: ArtifactStore, spec: JobSpec, data: RealData, result: RecoverResult, complete: bool) -> None:
    info = data.info
    store.write_json(
        "manifest.json",
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
    store.write_bytes("grid.png", grid_png(per_class, data.info, spec.output.grid_per_class))


def save_teacher(store: ArtifactStore, path: str, teacher: Teacher, spec: JobSpec, data: RealData) -> None:
    info = data.info
    store.write_bytes(path, checkpoint_bytes(
        teacher.model, arch=spec.teacher.arch, num_classes=info.num_classes, in_channels=info.channels,
        image_size=info.image_size, class_names=list(info.class_names), digest=teacher.digest,
        source=teacher.source, details=teacher.details,
    ))


def teacher_report(teacher: Teacher, spec: JobSpec, data: RealData, runtime: Runtime) -> dict:
    return {
        "arch": spec.teacher.arch,
        "source": teacher.source,
        "digest": teacher.digest,
        **evaluate(teacher.model, data.test, runtime).to_dict(),
        **teacher.details,
        "bn_running_var": bn_variance_summary(teacher.model),
    }


def squeeze_schedule(spec: JobSpec, recovery: Teacher) -> str | None:
    """One line on how long the teachers trained, so a short (demo) schedule is never mistaken for a full one."""
    if recovery.source == "checkpoint":
        return None
    t, v = spec.teacher, spec.validate_
    scdd_pretrained = spec.method == "scdd" and not t.ssl.checkpoint
    supervised = spec.method == "sre2l" or (
        v.enabled and v.mode == "kd" and v.relabel_teacher == "supervised" and not v.relabel_checkpoint)
    parts = [f"{t.ssl.epochs} {t.ssl.method} epochs, {t.probe.epochs} probe epochs"] if scdd_pretrained else []
    if supervised:
        parts.append(f"{t.epochs} supervised epochs")
    if spec.dataset.train_limit is not None:
        parts.append(f"at most {spec.dataset.train_limit} training images per class")
    if not parts:
        return None
    short = (supervised and t.epochs < 10) or (scdd_pretrained and t.ssl.epochs < 100)
    note = (" (short schedules sized for a few minutes on a CPU; raise --ssl-epochs / --teacher-epochs and "
            "use --train-limit all for quality)")
    return ", ".join(parts) + (note if short else "")


class StudentStage(typing.Protocol):
    """Trains a student for `stage` ("validate" or "baseline") and tests it on the whole real test
    split: in this process (`local_student_stage`) or data-parallel on a cluster (workers/train.py).
    `relabel_path` is where the relabel teacher is saved in the output (kd)."""

    def __call__(self, stage: str, images: torch.Tensor, labels: torch.Tensor, protocol: Protocol,
                 relabel: Teacher | None, relabel_path: str | None) -> dict: ...


def local_student_stage(spec: JobSpec, data: RealData, runtime: Runtime, progress: Progress) -> StudentStage:
    def fit(stage: str, images: torch.Tensor, labels: torch.Tensor, protocol: Protocol, relabel: Teacher | None,
            relabel_path: str | None) -> dict:
        info = data.info
        torch.manual_seed(spec.seed)  # the same student initialisation for both
        student = create_model(protocol.student_arch, info.num_classes, info.channels, info.image_size)
        teacher = relabel.model if relabel is not None else None
        train_student(student, images, labels, protocol, teacher, runtime, spec.seed, progress, stage)
        return evaluate(student, data.test, runtime).to_dict()

    return fit


def validate_both(
    spec: JobSpec, data: RealData, images: torch.Tensor, labels: torch.Tensor, relabel: Teacher | None,
    relabel_path: str | None, protocol: Protocol, fit: StudentStage, clock: StageClock, cache: ArtifactStore,
) -> dict:
    """Train the student on the distilled images and, as the baseline, on a random real subset of the
    same size, under one protocol; test both on the whole real test split. With `dd_ranking`, also
    the hard-label runs that DD-Ranking's HLR and LRS need."""
    info = data.info
    with clock.stage("validate"):
        student = fit("validate", images, labels, protocol, relabel, relabel_path)
        result = {"protocol": protocol.to_dict(), "images": len(images), "student": student}
    if relabel is not None:
        result["relabel_teacher"] = {"source": relabel.source, "digest": relabel.digest}
    if spec.validate_.baseline:
        with clock.stage("baseline"):
            real_images, real_labels = random_real_subset(data.train, spec.recover.ipc, info.num_classes, spec.seed)
            result["baseline"] = {"kind": "random real subset", "images": len(real_images),
                                  **fit("baseline", real_images, real_labels, protocol, relabel, relabel_path)}
        result["ior"] = ranking.ior(result["student"]["top1"], result["baseline"]["top1"])
        result["gain_top1"] = result["ior"]  # the key's old name, kept for one release
    if spec.validate_.dd_ranking:
        with clock.stage("dd_ranking"):
            result["dd_ranking"] = dd_ranking_scores(spec, data, images, labels, protocol, fit, result, cache)
    return result


def dd_ranking_scores(spec: JobSpec, data: RealData, images: torch.Tensor, labels: torch.Tensor, protocol: Protocol,
                      fit: StudentStage, result: dict, cache: ArtifactStore) -> dict:
    """HLR and LRS: the set with hard labels, and the full training split with hard labels (cached)."""
    vspec = spec.validate_
    hard = protocol if protocol.mode == "hard" else resolve_protocol(vspec.model_copy(update={"mode": "hard"}), len(images))
    set_hard = result["student"] if protocol.mode == "hard" else fit("validate-hard", images, labels, hard, None, None)
    full_protocol = replace(hard, epochs=vspec.full_data_epochs, batch_size=FULL_DATA_BATCH)
    if vspec.full_data_top1 is not None:
        full_top1, source = vspec.full_data_top1, "spec"
    else:
        key = spec._hash({"dataset": spec.to_dict()["dataset"], "protocol": full_protocol.to_dict(), "seed": spec.seed})
        path = f"full-data/{key}.json"
        if cache.exists(path):
            full_top1, source = cache.read_json(path)["top1"], "cached"
        else:
            all_images, all_labels = whole_split(data.train)
            full_top1, source = fit("full-data", all_images, all_labels, full_protocol, None, None)["top1"], "trained"
            cache.write_json(path, {"top1": full_top1, "protocol": full_protocol.to_dict(),
                                    "dataset": spec.to_dict()["dataset"], "seed": spec.seed})
    hlr = ranking.hlr(full_top1, set_hard["top1"])
    return {"set_hard_top1": set_hard["top1"], "hard_protocol": hard.to_dict(), "full_data_hard_top1": full_top1,
            "full_data_source": source, "full_data_protocol": full_protocol.to_dict(), "ior": result["ior"],
            "hlr": hlr, "lrs": round(ranking.lrs(result["ior"], hlr), 4), "weight": ranking.DEFAULT_WEIGHT}


def run_distillation(
    spec: JobSpec, progress: Progress | None = None, max_units: int | None = None, recover: RecoverStage | None = None,
    fit_student: StudentStage | None = None, trainers: Trainers | None = None, on_stage: StageListener | None = None,
) -> dict:
    """Run the whole job; returns the report (also written to report.json).

    `max_units` stops recovery early (the run stays resumable); used to test interruption.
    `recover`, `fit_student` and `trainers` (squeeze's training loops) run those stages: in this
    process by default; `workers/` has their Ray versions for `resources.workers` > 1 (the CLI and
    the job driver pick them; this layer does not import Ray). `on_stage` hears every stage start
    and finish.
    """
    if recover is None:
        if spec.resources.workers > 1:
            raise SpecError(
                f"resources.workers = {spec.resources.workers} runs recover on Ray: pass "
                f"recover=workers.recover.RayRecover(spec.resources), or use `scdd distill --workers N`"
            )
        recover = recover_dataset
    progress = progress or SilentProgress()
    clock = StageClock(listener=on_stage)
    runtime = resolve_runtime(spec.resources)
    torch.manual_seed(spec.seed)
    store = open_store(spec.output, spec.output.url or default_output_url(spec))
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
        recovery = recovery or recovery_teacher(spec, data, cache, runtime, progress, trainers or LOCAL_TRAINERS)
        freeze(recovery.model, runtime)
        save_teacher(store, TEACHER_PATH, recovery, spec, data)
        teacher_info = teacher_report(recovery, spec, data, runtime)

    with clock.stage("recover"):
        plan_initialisation(data, recovery.model, spec.recover, runtime, spec.seed, store)
        try:
            result = recover(recovery.model, info, spec.recover, runtime, store, spec.seed, progress, max_units=max_units)
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
        relabel = relabel_path = None
        if protocol.mode == "kd":
            with clock.stage("squeeze"):
                relabel = relabel_teacher(spec, data, recovery, cache, runtime, progress, trainers or LOCAL_TRAINERS)
                freeze(relabel.model, runtime)
                relabel_path = TEACHER_PATH
                if relabel is not recovery:
                    relabel_path = RELABEL_PATH
                    save_teacher(store, relabel_path, relabel, spec, data)
        fit = fit_student or local_student_stage(spec, data, runtime, progress)
        validation = validate_both(spec, data, images, labels, relabel, relabel_path, protocol, fit, clock, cache.store)
        if relabel is not None and relabel is not recovery:
            validation["relabel_teacher"].update(evaluate(relabel.model, data.test, runtime).to_dict())

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
        "teacher": teacher_info,
        "recover": {
            "images": len(result.entries),
            "expected_images": info.num_classes * spec.recover.ipc,
            "init": spec.recover.init,
            "iterations": spec.recover.iterations,
            "units_run": result.units_run,
            "units_resumed": result.units_resumed,
            "seconds": round(result.seconds, 3),
            "image_iterations_per_second": round(result.image_iterations_per_second, 2),
            "final_ce": result.final_ce,
            "final_bn": result.final_bn,
            "workers": spec.resources.workers,
            "bn_sync": spec.recover.bn_sync if spec.resources.workers > 1 else "local",
            "restarts": result.restarts,
        },
        "validate": validation,
        "stage_seconds": clock.seconds,
        "schedule": squeeze_schedule(spec, recovery),
    }
    store.write_json("report.json", report)
    return report
