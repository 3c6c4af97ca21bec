"""The validate stage of a job: the student on the distilled images and, as the baseline, on a random
real subset of the same size, under one protocol, both tested on the real test split (all of it unless
dataset.test_limit cuts it); with `validate.dd_ranking`, also the hard-label runs that DD-Ranking's HLR
and LRS need.

Students train through `fit` (the backend's `fit_student`: in this process or on Ray Train).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from api_schema import JobSpec
from api_schema.report import (
    BaselineScore,
    CrossArchScore,
    DDRanking,
    RelabelTeacherFacts,
    SoftLabelFacts,
    StudentProtocol,
    StudentScore,
    ValidateReport,
)
from scdd.backend import StudentRun
from scdd.data import RealData
from scdd.layout import full_data_record_path
from scdd.progress import StageClock
from scdd.squeeze import Teacher
from scdd.store import ArtifactStore
from scdd.validate import ranking
from scdd.validate.baseline import whole_split_supported
from scdd.validate.protocol import Protocol, resolve_protocol
from scdd.validate.soft_labels import request_for

FULL_DATA_BATCH = 256  # the full-data hard-label run of DD-Ranking

StudentFit = Callable[[StudentRun], StudentScore]
StudentFits = Callable[[list[StudentRun]], list[StudentScore]]  # independent runs, side by side where it can


def protocol_facts(protocol: Protocol) -> StudentProtocol:
    return StudentProtocol.model_validate(protocol.to_dict())


def validate_stage(
    spec: JobSpec, data: RealData, images: int, protocol: Protocol,
    relabel: Teacher | None, relabel_path: str | None, relabel_facts: RelabelTeacherFacts | None, fit: StudentFit,
    clock: StageClock, cache: ArtifactStore, fit_many: StudentFits | None = None,
) -> ValidateReport:
    """The `validate` section of the report for a distilled set of `images` images (its students read the
    images where they train). `relabel_facts` describe the KD relabel teacher. With validate.students, every
    architecture trains under `protocol` (its student_arch replaced) through `fit_many` (default: `fit` in
    turn), each beside its own baseline; the first is the report's `student`."""
    fit_many = fit_many or (lambda runs: [fit(run) for run in runs])
    archs = spec.validate_.students
    protocols = [replace(protocol, student_arch=arch) for arch in archs] or [protocol]
    protocol = protocols[0]

    def runs(stage: str) -> list[StudentRun]:  # the first keeps the stage's name, the others add their arch
        return [StudentRun(stage, p, relabel, relabel_path, None if i == 0 else p.student_arch)
                for i, p in enumerate(protocols)]

    soft = request_for(spec.validate_, protocol)  # validate.store_soft_labels: the first student writes them
    with clock.stage("validate"):
        first, *others = runs("validate")
        students = fit_many([replace(first, soft_labels=soft), *others])
    student = students[0]
    fields: dict = {"protocol": protocol_facts(protocol), "images": images, "student": student}
    if soft is not None and soft.facts is not None:
        fields["soft_labels"] = SoftLabelFacts(**soft.facts)
    if relabel_facts is not None:
        fields["relabel_teacher"] = relabel_facts
    baselines: list[StudentScore | None] = [None] * len(students)
    if spec.validate_.baseline:
        with clock.stage("baseline"):
            baselines = fit_many(runs("baseline"))
        score = baselines[0]
        fields["baseline"] = BaselineScore(kind="random real subset", images=images,
                                           **score.model_dump(exclude_unset=True))
        fields["ior"] = ranking.ior(student.top1, score.top1)
        fields["gain_top1"] = fields["ior"]  # the key's old name, kept for one release
    if archs:
        fields["students"] = [CrossArchScore(
            arch=p.student_arch, top1=s.top1, top5=s.top5, total=s.total,
            **({} if b is None else {"baseline_top1": b.top1, "ior": ranking.ior(s.top1, b.top1)}))
            for p, s, b in zip(protocols, students, baselines)]
    if spec.validate_.dd_ranking:
        with clock.stage("dd_ranking"):
            fields["dd_ranking"] = dd_ranking_scores(spec, data, images, protocol, fit, student, fields["ior"], cache)
    return ValidateReport(**fields)


def dd_ranking_scores(spec: JobSpec, data: RealData, images: int, protocol: Protocol,
                      fit: StudentFit, student: StudentScore, ior: float, cache: ArtifactStore) -> DDRanking:
    """HLR and LRS: the set with hard labels, and the full training split with hard labels (cached).
    `student` is the validation student, `ior` its improvement over random real images."""
    vspec = spec.validate_
    hard = protocol
    if protocol.mode != "hard":
        hard = resolve_protocol(vspec.model_copy(update={"mode": "hard"}), images, data.info.image_size)
    set_hard = student if protocol.mode == "hard" else fit(StudentRun("validate-hard", hard))
    full_protocol = replace(hard, epochs=vspec.full_data_epochs, batch_size=FULL_DATA_BATCH)
    if vspec.full_data_top1 is not None:
        full_top1, source = vspec.full_data_top1, "spec"
    else:
        dataset = spec.training_data()  # and the test images its accuracy is on, where they are cut
        if spec.dataset.test_limit is not None:
            dataset["test_limit"] = spec.dataset.test_limit
        key = spec.hash_of({"dataset": dataset, "protocol": full_protocol.to_dict(), "seed": spec.seed})
        path = full_data_record_path(key)
        if cache.exists(path):
            full_top1, source = cache.read_json(path)["top1"], "cached"
        else:
            whole_split_supported(data.train)
            full_top1, source = fit(StudentRun("full-data", full_protocol)).top1, "trained"
            cache.write_json(path, {"top1": full_top1, "protocol": full_protocol.to_dict(),
                                    "dataset": dataset, "seed": spec.seed})
    hlr = ranking.hlr(full_top1, set_hard.top1)
    return DDRanking(set_hard_top1=set_hard.top1, hard_protocol=protocol_facts(hard), full_data_hard_top1=full_top1,
                     full_data_source=source, full_data_protocol=protocol_facts(full_protocol), ior=ior,
                     hlr=hlr, lrs=round(ranking.lrs(ior, hlr), 4), weight=ranking.DEFAULT_WEIGHT)
