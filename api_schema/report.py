"""The report of a distillation job (`report.json`) and the summary a job ends with, as pydantic models.

The pipeline builds a `Report` and writes it to report.json; the job driver sends `Report.summary()`
in its `job_finished` event; the API returns that summary; bench/ reads reports through `Report`.

A report holds only the keys that apply to its run (no baseline without `validate.baseline`, no
`dd_ranking` without `validate.dd_ranking`, no `relabel_teacher` in hard-label validation), so it is
written with `to_json_dict()`, which leaves out the fields a run did not set. Parts whose contents
depend on the method or where the stage ran (teacher details, student results from Ray Train) allow
extra keys, so a report written by another version still loads.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobSummary(_Out):
    """The headline numbers of a finished job's report (the full report is `report.json`)."""

    teacher_top1: Optional[float] = Field(None, description="Teacher top-1 accuracy on the real test split.")
    images: Optional[int] = Field(None, description="Synthetic images written.")
    student_top1: Optional[float] = Field(None, description="Student (trained on the synthetic images) top-1.")
    baseline_top1: Optional[float] = Field(None, description="Same protocol on a random real subset of the same size.")
    ior: Optional[float] = Field(
        None, description="DD-Ranking's improvement over random: student_top1 - baseline_top1, in points."
    )
    output: Optional[str] = Field(None, description="The artifact store URL of the job.")


class DatasetFacts(_Part):
    name: str
    classes: int
    image_size: int
    channels: int
    train_images: int
    test_images: int
    test_limit: Optional[int] = Field(
        None, description="Set when accuracies are on at most this many test images per class (dataset.test_limit).")
    mean: Optional[list[float]] = Field(None, description="The per-channel mean every model saw (dataset.normalization).")
    std: Optional[list[float]] = Field(None, description="The per-channel std every model saw.")
    normalization: Optional[str] = Field(None, description="default, measured or given.")
    test_resize_ratio: Optional[float] = Field(None, description="Set when test images were resized by this ratio, "
                                               "then centre-cropped.")


class RuntimeFacts(_Part):
    device: str
    amp: str
    channels_last: bool
    compile: str


class Accuracy(_Part):
    """Top-1 / top-5 (percent) on the real test split (or the part dataset.test_limit keeps) of `total` images."""

    top1: float
    top5: float
    total: int


class BNVariance(_Part):
    """One BatchNorm layer's running variance across its channels (SC-DD, arXiv 2404.07976, Sec. 3)."""

    layer: str
    channels: int
    mean: float
    std: float
    min: float
    max: float


class SSLFacts(_Part):
    """How the self-supervised backbone was made: `source` pretrained (with the method's own facts:
    method, epochs, epoch_losses, workers on Ray) or checkpoint (checkpoint, format)."""

    source: str
    method: Optional[str] = None


class ProbeFacts(Accuracy):
    epochs: int


class MemberFacts(Accuracy):
    """One backbone of an ensemble teacher, with its own accuracy on the real test split."""

    arch: str


class TeacherReport(Accuracy):
    """The recovery teacher; `kind`, `ssl`, `probe`, `checkpoint` are the facts of how it was made. An ensemble
    (method gvbsm) has arch `ensemble`, its accuracy is that of the members' mean logits, and `members` lists them."""

    arch: str
    source: str  # trained, cached, checkpoint or resumed
    digest: Optional[str]
    kind: Optional[str] = None
    ssl: Optional[SSLFacts] = None
    probe: Optional[ProbeFacts] = None
    checkpoint: Optional[str] = None
    members: Optional[list[MemberFacts]] = None
    bn_running_var: list[BNVariance]


class RecoverRestart(_Part):
    """A distributed recover's worker group formed anew: the unit it was running and why."""

    unit: str
    cause: str
    time: float


class RecoverReport(_Part):
    images: int
    expected_images: int
    init: str
    iterations: int
    units_run: int
    units_resumed: int
    seconds: float
    image_iterations_per_second: float
    final_ce: float
    final_bn: float  # the statistic loss (BatchNorm, plus convolution where matched) of the last step
    workers: int
    bn_sync: str
    statistics: list[str] = Field(default_factory=lambda: ["batchnorm"])  # what recovery matched, per backbone
    stat_momentum: float = 0.0  # EMA momentum of the batch statistics (0: none)
    backbones: int = 1  # backbones matched in rotation (an ensemble's members)
    restarts: list[RecoverRestart] = Field(default_factory=list)


class StudentProtocol(_Part):
    """The student protocol a validation ran (`scdd.validate.protocol.Protocol`); no temperature in hard mode."""

    mode: str
    preset: str
    student_arch: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    temperature: Optional[float] = None
    mix: str
    mix_alpha: float
    crop_scale: tuple[float, float]
    ema_decay: float
    schedule_span: float
    crop: str = "resized"
    crop_padding: Optional[int] = None  # crop padded
    momentum: Optional[float] = None  # optimizer sgd
    nesterov: Optional[bool] = None  # optimizer sgd
    decay_norm_and_bias: bool = True
    warmup_epochs: int = 0
    schedule_unit: str = "step"
    temperature_squared: Optional[bool] = None  # kd


class EpochLoss(_Part):
    epoch: int
    loss: float


class StudentScore(Accuracy):
    """A student's accuracy; on Ray Train also the workers, per-epoch losses and where a restart resumed."""

    workers: Optional[int] = None
    epochs: Optional[list[EpochLoss]] = None
    resumed_at_epoch: Optional[int] = None


class BaselineScore(StudentScore):
    """The same protocol on `images` random real training images."""

    kind: str
    images: int


class RelabelTeacherFacts(_Part):
    """The KD relabel teacher (its accuracy too when it is not the recovery teacher)."""

    source: str
    digest: Optional[str]
    members: Optional[list[str]] = None  # an ensemble's members (their mean logits are the soft labels)
    top1: Optional[float] = None
    top5: Optional[float] = None
    total: Optional[int] = None


class CrossArchScore(_Part):
    """One student architecture trained on the set (validate.students), beside its random-real baseline."""

    arch: str
    top1: float
    top5: float
    total: int
    baseline_top1: Optional[float] = None
    ior: Optional[float] = None  # top1 minus baseline_top1, in points


class SoftLabelFacts(_Part):
    """Soft labels written with the set (validate.store_soft_labels; the format: docs/output-and-s3.md)."""

    path: str  # folder in the output
    epochs: int
    batches: int
    images: int  # labelled (augmented) images in all
    topk: Optional[int] = None
    bytes: int
    format_version: int


class RecipeFacts(_Part):
    """The named recipe (spec `recipe`) and what it set."""

    name: str
    set: dict[str, Any]  # dotted spec field -> the recipe's value, where the job uses it
    overridden: dict[str, Any] = Field(default_factory=dict)  # dotted field -> the spec's value, where it differs


class EvaluatedSet(_Part):
    """kind evaluate: the set that was judged."""

    images_url: str
    images: int
    classes: int


class DDRanking(_Part):
    """DD-Ranking's scores (IOR, HLR, LRS) and the hard-label runs behind them."""

    set_hard_top1: float
    hard_protocol: StudentProtocol
    full_data_hard_top1: float
    full_data_source: str  # spec, cached or trained
    full_data_protocol: StudentProtocol
    ior: float
    hlr: float
    lrs: float
    weight: float


class ValidateReport(_Part):
    protocol: StudentProtocol
    images: int
    student: StudentScore
    relabel_teacher: Optional[RelabelTeacherFacts] = None
    baseline: Optional[BaselineScore] = None
    ior: Optional[float] = None  # student minus baseline top-1, in points
    gain_top1: Optional[float] = None  # the old name of `ior`, kept for one release
    dd_ranking: Optional[DDRanking] = None
    students: Optional[list[CrossArchScore]] = None  # validate.students: every architecture, the first is `student`
    soft_labels: Optional[SoftLabelFacts] = None


class Report(_Part):
    """report.json of a job."""

    job_id: str
    output: str
    complete: bool
    resumed: bool
    method: str
    dataset: DatasetFacts
    runtime: RuntimeFacts
    teacher: Optional[TeacherReport] = None  # None: kind evaluate
    recover: Optional[RecoverReport] = None  # None: kind evaluate
    kind: str = "distill"
    recipe: Optional[RecipeFacts] = None
    evaluated: Optional[EvaluatedSet] = None  # kind evaluate
    validate_: Optional[ValidateReport] = Field(alias="validate")  # `validate` is a BaseModel method
    stage_seconds: dict[str, float]
    schedule: Optional[str]

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @property
    def partial(self) -> bool:
        """Fewer images than asked for: a stopped or time-boxed run, resumable with the same spec and output."""
        return not self.complete

    def summary(self) -> JobSummary:
        validate = self.validate_
        return JobSummary(
            teacher_top1=self.teacher.top1 if self.teacher else None,
            images=self.recover.images if self.recover else (self.evaluated.images if self.evaluated else None),
            student_top1=validate.student.top1 if validate else None,
            baseline_top1=validate.baseline.top1 if validate and validate.baseline else None,
            ior=validate.ior if validate else None,
            output=self.output,
        )

    def to_json_dict(self) -> dict[str, Any]:
        """What report.json holds: the keys this run set (and any extra ones it was read with)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)
