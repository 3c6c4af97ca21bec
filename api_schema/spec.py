"""The job spec: one pydantic model for a whole distillation job.

It is the request body of `POST /v1/jobs`, the YAML file of `scdd distill --config`, and what the
pipeline runs. Defaults live here once: with no overrides the spec describes the Fashion-MNIST
demo, sized to finish in minutes on two CPU cores. Unknown fields are rejected everywhere.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from api_schema.names import (
    MODELS_WITHOUT_BATCHNORM,
    DatasetName,
    InitName,
    JobKind,
    MethodName,
    ModelName,
    RecipeName,
    SSLCheckpointFormat,
    SSLMethodName,
)

ClassRef = Union[Annotated[int, Field(ge=0)], Annotated[str, Field(min_length=1, max_length=200)]]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ordered_positive(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not 0 < low <= high:
        raise ValueError(f"must satisfy 0 < low <= high, got {value}")
    return value


def _area_fraction(value: tuple[float, float]) -> tuple[float, float]:
    if value[1] > 1:
        raise ValueError(f"area fractions must be <= 1, got {value}")
    return value


# (low, high) ranges of random-resized-crop parameters.
AspectRange = Annotated[tuple[float, float], AfterValidator(_ordered_positive)]
AreaRange = Annotated[tuple[float, float], AfterValidator(_ordered_positive), AfterValidator(_area_fraction)]


class DatasetSpec(_Spec):
    """Which real dataset to distill, and how much of it to use."""

    name: DatasetName = Field("fashion-mnist", description="Dataset from the dataset registry.")
    root: Optional[str] = Field(
        None,
        max_length=4096,
        description="Where the data lies. fashion-mnist: folder with the four IDX files "
        "(default /usr/share/datasets/fashion-mnist). imagefolder: folder holding train/ and val/, "
        "one sub-folder per class (required). A folder path, not a URL: on a cluster, a shared volume mounted "
        "at the same path on every node.",
    )
    image_size: Optional[int] = Field(
        None,
        ge=8,
        le=1024,
        description="Side length images are resized to. None: the native size (28 for "
        "fashion-mnist; for imagefolder the shorter side of the first training image).",
    )
    classes: Optional[list[ClassRef]] = Field(
        None,
        min_length=1,
        max_length=100_000,
        description="Subset of classes to use, by index in the source or by name. None: all.",
    )
    train_limit: Optional[int] = Field(
        2000,
        ge=1,
        le=10_000_000,
        description="Training images per class the job uses (a seeded random pick; squeeze, selection and the "
        "random-real baseline draw from them). None: all. The default 2000 sizes the demo's squeeze for a few minutes "
        "on 2 CPU cores; set None for real jobs.",
    )
    test_limit: Optional[int] = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Test images per class every accuracy is measured on (a seeded random pick). None: the whole "
        "test split, as published numbers need; a limit makes quick checks cheaper and their accuracies noisier.",
    )
    normalization: Literal["default", "measured", "given"] = Field(
        "default",
        description="Per-channel mean/std every model sees. default: the dataset's (Fashion-MNIST: its 60 000 training "
        "images; imagefolder: ImageNet's); measured: measured on the training images the job uses (at most 10 000, a "
        "seeded pick), stored with the teacher and in the report (CIFAR and Tiny-ImageNet teachers were trained with "
        "their own); given: `mean` and `std`.",
    )
    mean: Optional[tuple[Annotated[float, Field(ge=0, le=1)], ...]] = Field(
        None, min_length=1, max_length=4, description="normalization given: the per-channel mean of pixels in [0, 1].")
    std: Optional[tuple[Annotated[float, Field(gt=0, le=1)], ...]] = Field(
        None, min_length=1, max_length=4, description="normalization given: the per-channel std of pixels in [0, 1].")
    test_resize_ratio: float = Field(
        1.0, ge=1, le=4,
        description="Test images are resized to round(image_size x ratio) (shorter side), then centre-cropped to "
        "image_size: 256 / 224 = 1.142857 is ImageNet's Resize(256) + CenterCrop(224). 1: resized to image_size.",
    )

    @model_validator(mode="after")
    def _normalization_values(self) -> "DatasetSpec":
        given = self.mean is not None or self.std is not None
        if self.normalization == "given":
            if self.mean is None or self.std is None or len(self.mean) != len(self.std):
                raise ValueError("dataset.normalization 'given' needs dataset.mean and dataset.std, one value per channel "
                                 "each (e.g. mean [0.5071, 0.4865, 0.4409], std [0.2673, 0.2564, 0.2762] for CIFAR-100)")
        elif given:
            raise ValueError(f"dataset.mean / dataset.std are used only with dataset.normalization 'given' (it is "
                             f"{self.normalization!r}); set both, or drop mean and std")
        return self


class SSLSpec(_Spec):
    """SC-DD squeeze, step 1: a self-supervised backbone (pretrained here, or imported)."""

    method: SSLMethodName = Field("moco_v2", description="Self-supervised method from the SSL registry.")
    epochs: int = Field(
        2, ge=1, le=10_000, description="Pretraining epochs over the training images (labels unused); short demo default."
    )
    batch_size: int = Field(256, ge=8, le=65_536, description="Pretraining batch size.")
    lr: float = Field(0.06, gt=0, le=10, description="SGD learning rate (momentum 0.9, cosine decay).")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="Weight decay.")
    temperature: float = Field(0.2, gt=0, le=10, description="InfoNCE temperature.")
    queue_size: int = Field(4096, ge=16, le=1_000_000, description="Negative keys kept in the MoCo queue.")
    momentum: float = Field(0.99, ge=0, lt=1, description="EMA momentum of the key encoder.")
    proj_dim: int = Field(128, ge=8, le=8192, description="Output size of the projection head.")
    bn_groups: int = Field(
        4, ge=1, le=64, description="Shuffle-BN groups: keys are encoded in this many shuffled sub-batches."
    )
    checkpoint: Optional[str] = Field(
        None, max_length=4096, description="Import this self-supervised checkpoint instead of pretraining."
    )
    checkpoint_format: SSLCheckpointFormat = Field(
        "auto", description="Layout of `checkpoint`: auto-detected, or moco_v2, moco_v3, dino, swav, torchvision."
    )


class ProbeSpec(_Spec):
    """SC-DD squeeze, step 2: a linear classifier on the frozen backbone (BN statistics untouched)."""

    epochs: int = Field(30, ge=1, le=10_000, description="Probe training epochs over precomputed features.")
    batch_size: int = Field(256, ge=1, le=65_536, description="Probe batch size.")
    lr: float = Field(1e-3, gt=0, le=10, description="AdamW learning rate (cosine decay).")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="AdamW weight decay.")
    augmented_views: int = Field(
        2,
        ge=0,
        le=64,
        description="Random-resized-crop + flip views per training image whose features the probe also trains on "
        "(0: clean images only). A probe trained on clean features only is not robust to the crops recover "
        "applies, and recovery cannot lower its cross-entropy.",
    )


class TeacherSpec(_Spec):
    """Squeeze: the teacher whose BatchNorm statistics recovery matches."""

    arch: ModelName = Field("convnet", description="Teacher architecture from the model registry.")
    checkpoint: Optional[str] = Field(
        None,
        max_length=4096,
        description="Load this full teacher checkpoint (path or URL) instead of building one.",
    )
    epochs: int = Field(
        3, ge=1, le=10_000, description="Supervised training epochs (sre2l; the relabel teacher); short demo default."
    )
    batch_size: int = Field(128, ge=1, le=65_536, description="Training batch size.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD (momentum 0.9, nesterov) or AdamW.")
    lr: Optional[float] = Field(
        None, gt=0, le=10, description="Peak learning rate (cosine decay). None: 0.05 for sgd, 1e-3 for adamw."
    )
    weight_decay: float = Field(5e-4, ge=0, le=1, description="Weight decay.")
    ssl: SSLSpec = Field(default_factory=SSLSpec, description="Self-supervised backbone (method scdd).")
    probe: ProbeSpec = Field(default_factory=ProbeSpec, description="Linear probe (method scdd).")
    ensemble: tuple[ModelName, ...] = Field(
        ("convnet", "convnet_d2_w32", "wrn16_2"),
        min_length=1,
        max_length=8,
        description="Method gvbsm (and validate.relabel_teacher ensemble): the backbones trained with labels, each "
        "like a supervised teacher (the same epochs and optimiser, cached alike), whose BatchNorm and convolution "
        "statistics recovery matches, one backbone per iteration in this order. Each needs BatchNorm layers.",
    )

    @model_validator(mode="after")
    def _ensemble_has_batchnorm(self) -> "TeacherSpec":
        without = [name for name in self.ensemble if name in MODELS_WITHOUT_BATCHNORM]
        if without:
            raise ValueError(
                f"teacher.ensemble: {', '.join(without)} has no BatchNorm layer, and recovery matches every backbone's "
                f"BatchNorm statistics; choose backbones with BatchNorm (e.g. convnet, convnet_d2_w32, wrn16_2)")
        if len(set(self.ensemble)) != len(self.ensemble):
            raise ValueError("teacher.ensemble names a model twice; list each backbone once")
        return self

    def supervised_part(self) -> dict:
        """The fields that determine a supervised teacher."""
        return self.model_dump(mode="json", exclude={"ssl", "probe", "ensemble"})

    def ensemble_part(self) -> dict:
        """The fields that determine a gvbsm ensemble (its members' training, not teacher.arch)."""
        return self.model_dump(mode="json", exclude={"ssl", "probe", "arch"})


class AugmentSpec(_Spec):
    """Augmentations applied to the synthetic batch on every recover step, drawn per image or once per batch."""

    crop: bool = Field(True, description="Random-resized-crop, resized back to the image size.")
    crop_scale: AreaRange = Field((0.08, 1.0), description="Area fraction range of the random-resized-crop.")
    crop_ratio: AspectRange = Field((3 / 4, 4 / 3), description="Aspect-ratio range of the random-resized-crop.")
    flip: bool = Field(True, description="Random horizontal flip (probability 0.5).")
    jitter: Optional[int] = Field(
        None,
        ge=0,
        le=512,
        description="Maximum random roll in pixels along each axis. None: image_size // 8.",
    )
    jitter_direction: Literal["both", "forward"] = Field(
        "both",
        description="both: roll by -jitter..jitter; forward: by 0..jitter (the SRe2L / SC-DD reference's torch.roll "
        "by randint(0, jitter)).",
    )
    per: Literal["image", "batch"] = Field(
        "image",
        description="image: every image draws its own crop box, flip and roll; batch: one draw shared by the whole "
        "batch of a step (the reference's RandomResizedCrop and roll applied to the batch tensor).",
    )


class SelectSpec(_Spec):
    """How the `selected`, `herding` and `kmeans` initialisations pick real images."""

    candidates: int = Field(
        100, ge=1, le=1_000_000, description="Real training images drawn at random per class as candidates (>= ipc)."
    )
    crops: int = Field(
        5, ge=1, le=1000,
        description="selected: crops scored per candidate; the first is the whole image, the rest random-resized.",
    )
    crop_scale: AreaRange = Field((0.5, 1.0), description="selected: area fraction range of the random crops.")
    rank: Literal["easy", "medium"] = Field(
        "easy",
        description="selected: which scored images to keep per class: easy = the lowest teacher loss -log p(y|crop), "
        "medium = the IPC around the median loss.",
    )


# Per initialisation: (iterations, lr, r_bn) when the spec leaves them out; chosen on held-out training
# images (bench/init_study.py; docs/benchmarks-and-findings.md, "What we found").
INIT_DEFAULTS: dict[str, tuple[int, float, float]] = {
    "noise": (300, 0.25, 0.1),
    "real": (0, 0.05, 0.01),
    "selected": (0, 0.05, 0.01),
    "herding": (0, 0.05, 0.01),
    "kmeans": (0, 0.05, 0.01),
}


class RecoverSpec(_Spec):
    """Recover: synthesise images by matching the teacher's BatchNorm statistics, from noise or real pixels."""

    ipc: int = Field(10, ge=1, le=10_000, description="Images per class to synthesise.")
    init: InitName = Field(
        "herding",
        description="Where recovery starts: noise (SRe2L/SC-DD as published), real (a random training image of the "
        "class), selected (the teacher's best-scored real crops, RDED-style), herding (a coreset tracking the "
        "class's teacher-feature mean; the default, the best held-out IOR) or kmeans (the images nearest k-means "
        "centroids of the teacher's features). Every init but noise puts real training pixels into the set.",
    )
    select: SelectSpec = Field(default_factory=SelectSpec, description="Candidate selection of selected / herding / kmeans.")
    iterations: Optional[int] = Field(
        None, ge=0, le=1_000_000,
        description="Optimisation steps per batch (0: keep the initial images as they are; noise needs >= 1). "
        "None: the init's default (noise 300, real-pixel inits 0).",
    )
    batch_size: int = Field(
        100, ge=1, le=100_000, description="Classes per batch (one image of each class per round), per worker: with "
        "W workers each synthesises a batch of its own class slice per step (W x batch_size images share the "
        "BatchNorm statistics with bn_sync global)."
    )
    lr: Optional[float] = Field(
        None, gt=0, le=100, description="Adam learning rate (cosine decay, no warm-up). None: the init's default."
    )
    r_bn: Optional[float] = Field(
        None,
        ge=0,
        le=1e6,
        description="Weight of the BatchNorm-statistic loss. None: the init's default (noise 0.1, chosen on "
        "held-out training images).",
    )
    first_bn_multiplier: float = Field(
        10.0, ge=0, le=1e6, description="Extra weight of the first BatchNorm layer's loss."
    )
    tv_weight: float = Field(0.0, ge=0, le=1e6, description="Weight of a total-variation image prior.")
    l2_weight: float = Field(0.0, ge=0, le=1e6, description="Weight of an L2 image prior.")
    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="Per-step augmentation.")
    stat_momentum: float = Field(
        0.0, ge=0, lt=1,
        description="EMA momentum of the batch statistics matched (G-VBSM): each step compares the moving average "
        "of the batch's statistics (with this step's gradient) with the targets; 0 compares this step's own. "
        "Method gvbsm makes 0.8 the default.",
    )
    bn_sync: Literal["global", "local"] = Field(
        "global",
        description="With several workers: global gives every BatchNorm layer the statistics of the union of all "
        "workers' batches each step (like SyncBatchNorm; the single-process objective); local keeps each "
        "worker's own statistics. No effect with one worker.",
    )

    @model_validator(mode="after")
    def _init_defaults(self) -> "RecoverSpec":
        iterations, lr, r_bn = INIT_DEFAULTS[self.init]
        for name, value in (("iterations", iterations), ("lr", lr), ("r_bn", r_bn)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.init == "noise" and self.iterations < 1:
            raise ValueError("recover.iterations must be >= 1 with init 'noise' (0 would keep pure noise)")
        if self.init in ("selected", "herding", "kmeans") and self.select.candidates < self.ipc:
            raise ValueError(
                f"recover.select.candidates ({self.select.candidates}) must be >= recover.ipc ({self.ipc}): "
                f"init {self.init!r} keeps IPC of the candidates of each class"
            )
        return self


class ValidateSpec(_Spec):
    """Validate: train a student on the distilled images, test it on the real test split (all of it by default), and
    train the same student the same way on a random real subset of the same size (the baseline).

    Fields left at None take the default of the mode (`kd`: knowledge distillation, SRe2L/SC-DD
    style; `hard`: cross-entropy on class labels, the protocol of classic distillation papers) and
    of the preset (`quick`: a short schedule; `long`: the papers' long student schedule).
    """

    enabled: bool = Field(True, description="Run the validation stage.")
    mode: Literal["kd", "hard"] = Field("kd", description="kd: soft labels from the relabel teacher; hard: class labels.")
    preset: Literal["quick", "long"] = Field(
        "quick",
        description="Student protocol, applied identically to the random-real baseline. quick: 100 epochs (kd) at "
        "batch 64, cosine to 0. long (RDED/EDC): 300 epochs, batch by set size (half the set, 10..100), a cosine "
        "that decays to half, and the EMA of the weights is the student tested.",
    )
    student_arch: Optional[ModelName] = Field(None, description="Student model. None: by resolution: below 32 px convnet (kd), "
                                              "convnet_in (hard); 32-64 px resnet18_small (kd), convnet_in (hard); above 64 px "
                                              "resnet18.")
    epochs: Optional[int] = Field(None, ge=1, le=100_000, description="Training epochs. None: 100 (kd quick), 300 (otherwise).")
    batch_size: Optional[int] = Field(
        None, ge=1, le=65_536, description="Batch size. None: 64 (kd quick), 256 (hard quick), by set size (long)."
    )
    optimizer: Optional[Literal["sgd", "adamw"]] = Field(None, description="None: adamw (kd), sgd momentum 0.9 (hard).")
    lr: Optional[float] = Field(None, gt=0, le=10, description="Peak learning rate (cosine). None: 1e-3 (kd), 0.01 (hard).")
    weight_decay: Optional[float] = Field(None, ge=0, le=1, description="None: 0.01 (kd), 5e-4 (hard).")
    ema_decay: Optional[float] = Field(
        None, ge=0, lt=1, description="Decay of the weights' EMA that is tested (0: the last weights). None: 0 (quick), 0.99 (long)."
    )
    schedule_span: Optional[float] = Field(
        None, ge=1, le=100,
        description="The cosine runs over span x the steps: 1 decays to 0, 2 only to half. None: 1 (quick), 2 (long).",
    )
    temperature: float = Field(4.0, gt=0, le=100, description="Knowledge-distillation temperature (kd).")
    mix: Optional[Literal["none", "cutmix", "mixup"]] = Field(
        None, description="Batch mixing. None: cutmix (kd), none (hard)."
    )
    mix_alpha: float = Field(1.0, gt=0, le=100, description="Beta(alpha, alpha) of the mixing ratio.")
    crop_scale: AreaRange = Field((0.5, 1.0), description="Random-resized-crop area range of the student's batches.")
    crop: Literal["resized", "padded"] = Field(
        "resized",
        description="The student's crop: resized (random-resized-crop of crop_scale, then flip) or padded (pad by "
        "crop_padding pixels with zeros, random crop back to the image size, then flip: the CIFAR protocol).",
    )
    crop_padding: int = Field(4, ge=0, le=256, description="crop padded: pixels of zero padding on each side.")
    momentum: float = Field(0.9, ge=0, lt=1, description="optimizer sgd: the momentum.")
    nesterov: bool = Field(True, description="optimizer sgd: Nesterov momentum (false: plain momentum SGD, as the "
                           "reference's torch.optim.SGD).")
    decay_norm_and_bias: bool = Field(
        True, description="false: weight decay only on weights of two or more dimensions (convolutions, linear layers), "
        "none on BatchNorm parameters and biases (SC-DD's ImageNet student).")
    warmup_epochs: int = Field(0, ge=0, le=10_000, description="Epochs of linear learning-rate warm-up before the cosine.")
    schedule_unit: Literal["step", "epoch"] = Field(
        "step", description="The cosine (and warm-up) is stepped every batch (step) or once per epoch (epoch, as the "
        "reference scripts' LambdaLR).")
    temperature_squared: bool = Field(
        True, description="kd: multiply the KL loss by T^2 (Hinton et al.); false: the KL alone (the SRe2L / SC-DD "
        "scripts).")
    students: tuple[ModelName, ...] = Field(
        (),
        max_length=16,
        description="Several student architectures trained on the same set under the same protocol (a cross-"
        "architecture table in the report, each beside its own random-real baseline when baseline is on). The first is "
        "the validation student of the report's `student`. Empty: student_arch alone.",
    )
    store_soft_labels: int = Field(
        0, ge=0, le=10_000,
        description="Also write the soft labels of this many epochs of the validation student's augmented batches "
        "(crop boxes, flips, mix parameters, fp16 teacher logits; docs/output-and-s3.md) under soft_labels/; a "
        "student trained from them needs no teacher. 0: none.",
    )
    soft_label_topk: Optional[int] = Field(
        None, ge=1, le=100_000, description="store_soft_labels: keep only the top-k logits of each image (None: all).")
    relabel_teacher: Literal["supervised", "recover", "ensemble"] = Field(
        "recover",
        description="Teacher giving soft labels (kd): the recovery teacher itself (recover; for sre2l that is the "
        "supervised teacher), a supervised teacher of the teacher arch (supervised: the same for sre2l and scdd, "
        "so a comparison differs only in the images), or the mean logits of an ensemble (ensemble: the gvbsm "
        "ensemble of teacher.ensemble, the same for every method, or the teachers in relabel_checkpoints).",
    )
    relabel_checkpoint: Optional[str] = Field(
        None,
        max_length=4096,
        description="With relabel_teacher supervised: load the relabel teacher from this checkpoint instead of "
        "training it. A checkpoint scdd saved (a run's teacher.pt) names its architecture, which may differ from "
        "teacher.arch, so a set can be judged with soft labels from a teacher it was not recovered with.",
    )
    relabel_checkpoints: tuple[Annotated[str, Field(min_length=1, max_length=4096)], ...] = Field(
        (),
        max_length=16,
        description="With relabel_teacher ensemble: the members, as checkpoints scdd saved (a run's teacher.pt, of any "
        "architecture, or a whole ensemble) or bare state dicts of teacher.arch; the soft labels are their mean "
        "logits. Empty: the gvbsm ensemble of teacher.ensemble.",
    )
    relabel_arch: Optional[ModelName] = Field(
        None,
        description="relabel_teacher supervised: the relabel teacher's architecture where it differs from teacher.arch "
        "(SC-DD's ImageNet students learn from a supervised ResNet-18, its images come from a ResNet-50). With "
        "relabel_checkpoint (a bare state dict, a torchvision reference-script or MoCo linear-eval checkpoint) it is "
        "tried first, then the name in the file, then teacher.arch; without, a supervised teacher of this "
        "architecture is trained (and cached). None: teacher.arch.",
    )
    baseline: bool = Field(True, description="Also train on a random real subset of the same size (IPC per class).")
    dd_ranking: bool = Field(
        False,
        description="Also score the set as DD-Ranking does: a hard-label run of the set and of the full training split "
        "(cached per dataset, student and protocol), giving hlr and lrs beside ior. Needs baseline.",
    )
    full_data_epochs: int = Field(
        5, ge=1, le=10_000,
        description="dd_ranking: epochs of the full-data hard-label run (batch 256, the hard protocol otherwise).",
    )
    full_data_top1: Optional[float] = Field(
        None, ge=0, le=100,
        description="dd_ranking: the full-data hard-label top-1 to use instead of training it (e.g. a published number).",
    )

    @model_validator(mode="after")
    def _ranking_needs_baseline(self) -> "ValidateSpec":
        if self.dd_ranking and not self.baseline:
            raise ValueError("validate.dd_ranking needs validate.baseline: true (IOR is measured against random real images)")
        return self

    @model_validator(mode="after")
    def _soft_labels_need_kd(self) -> "ValidateSpec":
        if self.store_soft_labels and self.mode != "kd":
            raise ValueError("validate.store_soft_labels stores the relabel teacher's soft labels, which only mode kd "
                             "uses; set validate.mode: kd or store_soft_labels: 0")
        if len(set(self.students)) != len(self.students):
            raise ValueError("validate.students names an architecture twice; list each student once")
        return self

    @model_validator(mode="after")
    def _checkpoint_needs_supervised(self) -> "ValidateSpec":
        if self.relabel_checkpoint and self.relabel_teacher != "supervised":
            raise ValueError("validate.relabel_checkpoint is used only with validate.relabel_teacher: supervised "
                             "(with recover the recovery teacher gives the soft labels); set both")
        if self.relabel_arch and self.relabel_teacher != "supervised":
            raise ValueError("validate.relabel_arch is the architecture of the supervised relabel teacher (its checkpoint's, "
                             "or the one trained): set validate.relabel_teacher: supervised, or drop relabel_arch")
        if self.relabel_checkpoints and self.relabel_teacher != "ensemble":
            raise ValueError("validate.relabel_checkpoints is used only with validate.relabel_teacher: ensemble; set both "
                             "(or relabel_checkpoint, singular, with relabel_teacher: supervised)")
        return self


class ResourcesSpec(_Spec):
    """Where and how fast to compute."""

    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.",
    )
    amp: Literal["auto", "bf16", "off"] = Field(
        "auto",
        description="bf16 autocast. auto: on where bf16 is fast (CUDA with bf16, CPUs with AVX512-BF16 or AMX).",
    )
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="channels-last memory format. auto: on (faster on CUDA and on oneDNN CPUs)."
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile the teacher for recover. auto: on when the recover run is long enough to "
        "repay the compile time (at least 2000 image-iterations per unit); falls back to eager if compiling fails.",
    )
    threads: Optional[int] = Field(
        None, ge=1, le=1024,
        description="CPU threads for torch. With workers > 1: each worker's threads (None: 1), and the "
        "driver process keeps torch's default. None: torch's default.",
    )
    workers: int = Field(
        1, ge=1, le=4096,
        description="Workers: above 1, every stage runs on Ray with this many workers: recover on Ray actors, one per "
        "GPU (or `threads` CPUs each, gloo, without GPUs), each recovering a slice of the classes; the training stages "
        "on Ray Train (DDP). 1: in this process, no Ray. Joins the Ray cluster at RAY_ADDRESS, else starts a local one.",
    )


class S3Spec(_Spec):
    """Connection settings of s3:// artifact stores (AWS S3 or an S3-compatible server such as MinIO,
    Ceph RGW or moto); ignored for other URLs. Fields left at None fall back to the environment.

    Credentials are never part of the spec (it is stored in the manifest and in Redis): botocore
    reads them from the environment of each process that touches the store — AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, the shared ~/.aws files, or an instance or
    pod role. The endpoint may also come from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, the region
    from AWS_DEFAULT_REGION.
    """

    endpoint_url: Optional[str] = Field(
        None,
        max_length=2048,
        pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="S3 API endpoint, e.g. http://minio:9000 for MinIO/Ceph/moto. None: "
        "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL if set, else AWS S3.",
    )
    region: Optional[str] = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Region name used to sign requests, e.g. us-east-1. "
        "None: AWS_DEFAULT_REGION or the profile's region.",
    )
    profile: Optional[str] = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.@+=,:/-]+$",
        description="Named profile of the shared AWS config/credentials files to take credentials from. "
        "None: AWS_PROFILE, else the default credential chain. Secret keys are never accepted in the spec; "
        "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN) in the environment instead.",
    )


class OutputSpec(_Spec):
    """Where results go."""

    url: Optional[str] = Field(
        None,
        max_length=4096,
        description="Artifact store URL: a local directory or an fsspec URL. None: ./runs/<job id>. "
        "Running again with the same URL resumes the run.",
    )
    grid_per_class: int = Field(8, ge=1, le=100, description="Images per class shown in grid.png.")
    image_format: Literal["png", "jpeg"] = Field(
        "png",
        description="How the distilled images are written: png (lossless) or jpeg (as the SRe2L / SC-DD reference "
        "saves them; students then train on the decoded JPEGs, as theirs do).",
    )
    jpeg_quality: int = Field(75, ge=1, le=100, description="image_format jpeg: the quality (75: PIL's default, the reference's).")
    teacher_cache: Optional[str] = Field(
        None,
        max_length=4096,
        description="Folder or URL where trained teachers are cached by the hash of what determines them. "
        "None: $SCDD_CACHE_DIR/teachers, or ~/.cache/scdd/teachers.",
    )
    s3: S3Spec = Field(
        default_factory=S3Spec,
        description="Endpoint, region and profile for s3:// URLs; credentials come only from the environment.",
    )


class EvaluateSpec(_Spec):
    """kind evaluate: judge a distilled set that exists (made by an earlier run, released by a paper's authors, a
    colleague's) without squeeze or recover: its students train on it and are tested on the dataset's test split."""

    images: Optional[str] = Field(
        None,
        max_length=4096,
        description="The distilled set: a folder or fsspec URL (s3://...) holding one sub-folder per class (an "
        "ImageFolder; the class folders are matched to the dataset's classes by name, else in sorted order), or a scdd "
        "output (its images/ and manifest.json).",
    )


# Recover settings a method sets when the spec leaves them out: G-VBSM weighs its (many more) statistic terms
# at 0.01 and smooths the batch statistics by an EMA of momentum 0.8 (its and EDC's published scripts).
METHOD_RECOVER_DEFAULTS: dict[str, dict[str, float]] = {"gvbsm": {"r_bn": 0.01, "stat_momentum": 0.8}}


class JobSpec(_Spec):
    """A whole distillation job: squeeze -> recover -> validate -> report."""

    recipe: Optional[RecipeName] = Field(
        None,
        description="A published recipe (api_schema/recipes.py; the docs' recipe table names each value's source): it sets "
        "every field of recover, augmentation, precision, output format and student protocol to the reference "
        "scripts' values; fields this spec also sets override it. The report lists the values it set.",
    )
    kind: JobKind = Field(
        "distill",
        description="distill: squeeze, recover, validate. evaluate: train and test students on the existing set at "
        "evaluate.images (no recover; the relabel teacher from validate.relabel_checkpoint, else trained).",
    )
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec, description="kind evaluate: the set to judge.")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec, description="The real dataset.")
    method: MethodName = Field(
        "scdd", description="scdd: self-supervised backbone + linear probe teacher; sre2l: supervised teacher; gvbsm: "
        "an ensemble of supervised backbones (teacher.ensemble) matched in rotation on BatchNorm and convolution "
        "statistics (by default with recover.r_bn 0.01 and recover.stat_momentum 0.8)."
    )
    teacher: TeacherSpec = Field(default_factory=TeacherSpec, description="Squeeze stage.")
    recover: RecoverSpec = Field(default_factory=RecoverSpec, description="Recover stage.")
    validate_: ValidateSpec = Field(
        default_factory=ValidateSpec, alias="validate", description="Validation stage."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Compute resources.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of every random choice in the job.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Artifact output.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data):
        """A named recipe's values under the ones the spec gives (api_schema/recipes.py)."""
        if isinstance(data, dict) and data.get("recipe") is not None:
            from api_schema.recipes import with_recipe
            return with_recipe(data)
        return data

    @model_validator(mode="after")
    def _kind_fields(self) -> "JobSpec":
        if self.kind == "evaluate":
            if not self.evaluate.images:
                raise ValueError("kind evaluate needs evaluate.images: the folder or URL of the distilled set to judge")
            if not self.validate_.enabled:
                raise ValueError("kind evaluate trains students: validate.enabled must be true")
        elif self.evaluate.images:
            raise ValueError("evaluate.images is used only with kind: evaluate (kind distill makes its own images)")
        return self

    @model_validator(mode="after")
    def _method_defaults(self) -> "JobSpec":
        """Recover settings a method changes when the spec leaves them out (METHOD_RECOVER_DEFAULTS)."""
        unset = {k: v for k, v in METHOD_RECOVER_DEFAULTS.get(self.method, {}).items()
                 if k not in self.recover.model_fields_set}
        if unset:
            object.__setattr__(self, "recover", self.recover.model_copy(update=unset))
        return self

    @model_validator(mode="after")
    def _imagefolder_needs_root(self) -> "JobSpec":
        if self.dataset.name == "imagefolder" and not self.dataset.root:
            raise ValueError("dataset.root is required for dataset 'imagefolder' (a folder with train/ and val/)")
        if self.dataset.root and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", self.dataset.root):
            raise ValueError(f"dataset.root {self.dataset.root!r} is a URL: a dataset is read from a folder that every "
                             f"worker can read at the same path (on a cluster, a shared volume such as a PVC or NFS "
                             f"mount); copy the data there and pass that folder")
        return self

    def to_dict(self) -> dict:
        """The spec as plain JSON-able data, with the public field names."""
        return self.model_dump(mode="json", by_alias=True)

    def digest(self, *sections: str) -> str:
        """A short stable hash of the named top-level sections (all when none are named)."""
        data = self.to_dict()
        return self.hash_of({key: data[key] for key in (sections or tuple(sorted(data)))})

    @staticmethod
    def hash_of(data: dict) -> str:
        """The short stable hash every digest of a spec uses (also for derived keys, e.g. the full-data cache)."""
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def training_data(self) -> dict:
        """The dataset section without what only picks or shapes test images: teachers and images do not depend on
        it, so a digest of it stays the same when only the test split is cut (dataset.test_limit) or resized.
        Normalisation fields added later count only when set, so earlier digests stay."""
        data = self.to_dict()["dataset"]
        for key in ("test_limit", "test_resize_ratio"):
            data.pop(key)
        _drop_defaults(data, DatasetSpec, ("normalization", "mean", "std"))
        return data

    def supervised_teacher_digest(self) -> str:
        """Hash of what determines a supervised teacher (sre2l's recovery teacher, the relabel teacher)."""
        return self.hash_of({"kind": "supervised", "dataset": self.training_data(),
                           "teacher": self.teacher.supervised_part(), "seed": self.seed})

    def ensemble_teacher_digest(self) -> str:
        """Hash of what determines the gvbsm ensemble (its recovery teacher, and the ensemble relabel teacher)."""
        return self.hash_of({"kind": "gvbsm", "dataset": self.training_data(),
                             "teacher": self.teacher.ensemble_part(), "seed": self.seed})

    def teacher_digest(self) -> str:
        """Hash of what determines the recovery teacher: a second job with the same value reuses it."""
        if self.method == "sre2l":
            return self.supervised_teacher_digest()
        if self.method == "gvbsm":
            return self.ensemble_teacher_digest()
        return self.hash_of({"kind": self.method, "dataset": self.training_data(),
                           "teacher": self.teacher_section(), "seed": self.seed})

    def teacher_section(self) -> dict:
        """The teacher section as digests see it: teacher.ensemble counts only where an ensemble is used, so
        adding that field kept every other method's teachers and job ids."""
        data = self.to_dict()["teacher"]
        if self.method != "gvbsm" and self.validate_.relabel_teacher != "ensemble":
            data.pop("ensemble")
        return data

    def images_depend_on_workers(self) -> bool:
        """Whether the worker count changes the synthetic images (the rule a resume on other workers follows).

        With optimisation steps (recover.iterations > 0) it does: W workers cut the classes into W slices, a unit
        holds one batch of every slice, each worker's share draws its noise and augmentation from its own seed,
        and (bn_sync global) the statistics matched are those of the W shares together. Without steps
        (iterations 0: a real-pixel init kept as it is) every image is its class's planned initial image, drawn
        per class whatever the slicing (scdd/recover/init), so any worker count makes the same bytes."""
        return self.recover.iterations > 0

    def recover_digest(self) -> str:
        """Hash of what determines the synthetic images; a resumed run must match it. The worker count
        counts exactly where it changes the images (`images_depend_on_workers`), when above 1 (and bn_sync
        only then)."""
        data = {key: self.to_dict()[key] for key in ("method", "recover", "seed")}
        data["teacher"] = self.teacher_section()
        data["dataset"] = self.training_data()
        if not self.recover.stat_momentum:
            data["recover"].pop("stat_momentum")  # the field's default, added later: earlier job ids stay
        _drop_defaults(data["recover"]["augment"], AugmentSpec, ("jitter_direction", "per"))
        if self.output.image_format != "png":  # the bytes written, and what the students read back
            data["image_format"] = {"format": self.output.image_format, "quality": self.output.jpeg_quality}
        if self.resources.workers > 1 and self.images_depend_on_workers():
            data["workers"] = self.resources.workers
        else:
            data["recover"].pop("bn_sync")
        return self.hash_of(data)

    def resume_refusal(self, workers: int) -> str | None:
        """Why this job's output cannot be resumed with `workers` workers (None: it can). The rule of
        `images_depend_on_workers`: another worker count is refused exactly where it would change the images."""
        if workers == self.resources.workers or not self.images_depend_on_workers():
            return None
        return (f"this job's images depend on its worker count (recover.iterations {self.recover.iterations} > 0: "
                f"the classes are cut into one slice per worker, each share is seeded per worker, and the BatchNorm "
                f"statistics are those of all workers' batches), so only {self.resources.workers} workers can resume "
                f"it; a job with recover.iterations 0 resumes on any worker count")

    def evaluation_digest(self) -> str:
        """Hash of what an evaluate job judges and how: the set, the data, the students and their teacher."""
        data = self.to_dict()
        return self.hash_of({"images": self.evaluate.images, "dataset": data["dataset"], "validate": data["validate"],
                             "teacher": self.teacher_section(), "seed": self.seed})

    def job_id(self) -> str:
        if self.kind == "evaluate":
            return f"{self.dataset.name}-evaluate-{self.evaluation_digest()}"
        return f"{self.dataset.name}-{self.method}-ipc{self.recover.ipc}-{self.recover_digest()}"


def _drop_defaults(data: dict, model: type[BaseModel], names: tuple[str, ...]) -> None:
    """Remove from a section's dict the named fields that are at their defaults (fields added after job ids were
    published: a spec that does not set them keeps its id)."""
    for name in names:
        if data.get(name) == model.model_fields[name].default:
            data.pop(name, None)
