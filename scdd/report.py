"""The sections of a job's report (`api_schema.Report`) made from what the run produced: the dataset,
the teachers, the recover run and the squeeze schedule (the validate section: scdd/validate/stage.py)."""

from __future__ import annotations

from torch import nn

from api_schema import JobSpec
from api_schema.report import DatasetFacts, RecoverReport, RelabelTeacherFacts, TeacherReport
from scdd.data import RealData
from scdd.evaluate import Accuracy
from scdd.models import Ensemble, members_of, model_metadata
from scdd.recover import RecoverObjective, RecoverResult
from scdd.squeeze import Teacher, bn_variance_summary


def dataset_facts(data: RealData, test_limit: int | None) -> DatasetFacts:
    """Counts (the splits' lengths come from the dataset's index) and how every model saw the images: the
    normalisation (its kind and per-channel mean/std) and, where the test split was resized first, the ratio."""
    info = data.info
    limited = {} if test_limit is None else {"test_limit": test_limit}  # the key only where the test split is cut
    if info.test_resize_ratio != 1:
        limited["test_resize_ratio"] = info.test_resize_ratio
    return DatasetFacts(name=info.name, classes=info.num_classes, image_size=info.image_size, channels=info.channels,
                        train_images=len(data.train), test_images=len(data.test),
                        mean=[round(float(m), 6) for m in info.mean], std=[round(float(s), 6) for s in info.std],
                        normalization=info.normalization, **limited)


def teacher_facts(teacher: Teacher, spec: JobSpec, accuracy: list[Accuracy]) -> TeacherReport:
    """The recovery teacher: how it was made, its accuracy on the real test split and its BN variances (an
    ensemble's: each member's accuracy too). `accuracy`: the model's, then each member's (scdd/passes.py)."""
    model = teacher.model
    members = {}  # the key only for an ensemble, as a report holds only the keys that apply to its run
    if isinstance(model, Ensemble):
        members = {"members": [{"arch": arch, **member.to_dict()}
                               for arch, member in zip(model.archs, accuracy[1:])]}
    return TeacherReport.model_validate({
        "arch": model_metadata(model).get("arch", spec.teacher.arch),
        "source": teacher.source,
        "digest": teacher.digest,
        **accuracy[0].to_dict(),
        **teacher.details,
        **members,
        "bn_running_var": bn_variance_summary(model),
    })


def relabel_facts(relabel: Teacher, recovery: Teacher, accuracy: Accuracy | None) -> RelabelTeacherFacts:
    """The KD relabel teacher; its accuracy (`accuracy`) when it is not the recovery teacher (reported already)."""
    scores = {} if relabel is recovery or accuracy is None else accuracy.to_dict()
    members = {"members": list(relabel.model.archs)} if isinstance(relabel.model, Ensemble) else {}
    return RelabelTeacherFacts(source=relabel.source, digest=relabel.digest, **members, **scores)


def recover_facts(result: RecoverResult, spec: JobSpec, classes: int, teacher: nn.Module) -> RecoverReport:
    matched = {"statistics": RecoverObjective(teacher).statistics,  # hooks nothing until entered
               "stat_momentum": spec.recover.stat_momentum, "backbones": len(members_of(teacher))}
    if matched == {"statistics": ["batchnorm"], "stat_momentum": 0.0, "backbones": 1}:
        matched = {}  # SRe2L / SC-DD: the report's defaults say it, and its keys stay those of earlier reports
    return RecoverReport(
        images=len(result.entries),
        expected_images=classes * spec.recover.ipc,
        init=spec.recover.init,
        iterations=spec.recover.iterations,
        units_run=result.units_run,
        units_resumed=result.units_resumed,
        seconds=round(result.seconds, 3),
        image_iterations_per_second=round(result.image_iterations_per_second, 2),
        final_ce=result.final_ce,
        final_bn=result.final_bn,
        workers=spec.resources.workers,
        bn_sync=spec.recover.bn_sync if spec.resources.workers > 1 else "local",
        restarts=result.restarts,
        **matched,
    )


def squeeze_schedule(spec: JobSpec, recovery: Teacher) -> str | None:
    """One line on how long the teachers trained, so a short (demo) schedule is never mistaken for a full one."""
    if recovery.source == "checkpoint":
        return None
    t, v = spec.teacher, spec.validate_
    scdd_pretrained = spec.method == "scdd" and not t.ssl.checkpoint
    supervised = spec.method == "sre2l" or (
        v.enabled and v.mode == "kd" and v.relabel_teacher == "supervised" and not v.relabel_checkpoint)
    ensemble = spec.method == "gvbsm" or (
        v.enabled and v.mode == "kd" and v.relabel_teacher == "ensemble" and not v.relabel_checkpoints)
    parts = [f"{t.ssl.epochs} {t.ssl.method} epochs, {t.probe.epochs} probe epochs"] if scdd_pretrained else []
    if supervised:
        parts.append(f"{t.epochs} supervised epochs")
    if ensemble:
        parts.append(f"{t.epochs} supervised epochs for each of the {len(t.ensemble)} ensemble backbones")
    if spec.dataset.train_limit is not None:
        parts.append(f"at most {spec.dataset.train_limit} training images per class")
    if not parts:
        return None
    short = ((supervised or ensemble) and t.epochs < 10) or (scdd_pretrained and t.ssl.epochs < 100)
    note = (" (short schedules sized for a few minutes on a CPU; raise --ssl-epochs / --teacher-epochs and "
            "use --train-limit all for quality)")
    return ", ".join(parts) + (note if short else "")
