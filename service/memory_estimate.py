"""The estimated peak memory of one process of a job, from its spec alone (service/budget.py checks it against the
tenant's and the cluster's bounds). The formula, term by term, is below; tests/test_service_budget.py keeps the model
table in step with the models and compares the estimate with the peak RSS of real CPU runs."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from api_schema import JobSpec

# ---- the memory estimate ----------------------------------------------------------------------------------------
#
# An order-of-magnitude estimate of the peak memory of one process of a job (the in-process run, or one Ray worker),
# from its spec alone. Every term is a product of spec fields and a few measured constants, in bytes:
#
#   peak = BASE (1 GiB) + dataset held + max over the stages of (the sum of the stage's terms)
#
# with S the image size, C its channels (1 for fashion-mnist, 3 for an imagefolder), W the workers:
#
#   dataset held   fashion-mnist keeps its splits as uint8: (train + test images) x C x S^2 (an imagefolder is
#                  decoded per batch: nothing held)
#   load           fashion-mnist resized from its 28 px: the train split's float copies, 8 x images x C x S^2
#   training       of any model (supervised teacher, each ensemble member, student, full-data run) on a batch b
#                  (ceil(batch_size / W) per Ray Train rank):
#                  b x S^2 x A[arch] x 2 (saved activations, and their gradients during backward)
#                  + b x C x S^2 x 4 x 3 (the float batch, its augmented and mixed copies) + parameters x 16
#                  (weights, gradients, two optimizer moments; the head's are features x classes)
#   MoCo           (method scdd, pretrained here) training of the query encoder on b = ceil(ssl.batch_size / W)
#                  + the queue: queue_size x proj_dim x 4 x 2 (the buffer and its copy per step)
#                  + the logits: b x (queue_size + 1) x 4 x 4 (logits, scaled, softmax, gradient)
#   probe          train images x (1 + augmented_views) x features x 4 x 3 (the views, joined, standardised)
#   init           (real-pixel inits, one class at a time; candidates at most the images a class has)
#                  herding / kmeans: candidates x C x S^2 x 4 x 2 + their features; selected: candidates x crops
#                  x C x S^2 x 4 x 2 (every crop resized, at once) + their features; both + the scoring forward
#                  without gradients (half the activations of 512 images); real: ipc x C x S^2 x 4 x 2
#   recover        per worker, b = min(recover.batch_size, its classes): b x S^2 x A[teacher] x 2 (the
#                  input gradient needs the teacher's activations) + b x C x S^2 x 4 x 5 (images, gradient, Adam's
#                  two moments, the augmented view) + the worker's initial pixels, classes x ipc x C x S^2 (uint8)
#   accuracy       every model tested (the recovery teacher, each student) on batches of e = min(500, test images):
#                  e x S^2 x A[arch] / 2 (a forward without gradients holds about half) + e x C x S^2 x 8
#   validate       the set and its baseline as uint8, ipc x classes x C x S^2 x 2, + each student's training
#                  (above) + the relabel teacher's forward without gradients (half its activations)
#                  + one epoch of stored soft labels, images x classes (or topk) x 2
#
# A[arch] (ARCHS[arch].activations) is the bytes a training forward saves for backward per input pixel of one image
# (float32), measured with torch.autograd.graph.saved_tensors_hooks at 32 and 64 px (the larger; 128 px saves less;
# a test keeps the table in step with the models). bf16 autocast halves the activations; the estimate does not count
# on it. On a GPU the batch terms live in the GPU's memory rather than the host's: the estimate does not tell them
# apart, so there it bounds the two together. A test compares it with the measured peak RSS of real CPU runs
# (tests/test_service_budget.py): within a factor of 2 either way (0.9x to 1.6x measured).
#
# What the service cannot know is left out or assumed, and said so: an image size it cannot tell (an imagefolder
# without dataset.image_size whose images it cannot read) drops the pixel terms; an unknown class count drops the
# per-class terms; an imagefolder without dataset.train_limit is taken to hold IMAGES_PER_CLASS_UNKNOWN per class.

GIB = 1024**3
BASE_BYTES = 1 * GIB  # python, torch, torchvision and the job's code: 0.85 GiB measured after import, 0.9 at a tiny run
FLOAT = 4
FASHION_MNIST_PER_CLASS = (6000, 1000)  # train, test images per class
IMAGES_PER_CLASS_UNKNOWN = 1300  # an imagefolder without dataset.train_limit: ImageNet-1K's ~1 281 per class
SCORE_BATCH = 512  # scdd/recover/init/inits.py: images scored per forward
EVAL_BATCH = 500  # scdd/evaluate.py: test images per forward


@dataclass(frozen=True)
class Arch:
    """A registry model's size: saved activation bytes per input pixel of one image (training forward, float32),
    the classifier's input features (ConvNets: width x (S / 2^depth)^2), and the parameters before the head."""

    activations: int
    features: int  # for the ConvNets: their width (features = width x (S >> depth)^2)
    body_params: int
    depth: int = 0  # ConvNets: the pooled blocks; 0: `features` is the feature size

    def feature_dim(self, size: int) -> int:
        return self.features * (size >> self.depth) ** 2 if self.depth else self.features

    def params(self, classes: int, size: int) -> int:
        return self.body_params + (self.feature_dim(size) + 1) * classes


# Measured at 32 and 64 px, 3 channels, rounded up (tests/test_service_budget.py checks every registry model).
ARCHS: dict[str, Arch] = {
    "convnet": Arch(1527, 128, 299_520, depth=3),
    "convnet_d1_w32": Arch(301, 32, 960, depth=1),
    "convnet_d2_w32": Arch(373, 32, 10_272, depth=2),
    "convnet_in": Arch(1527, 128, 299_520, depth=3),
    "densenet121": Arch(2929, 1024, 6_953_856),
    "efficientnet_b0": Arch(2004, 1280, 4_007_548),
    "mobilenet_v2": Arch(1702, 1280, 2_223_872),
    "mobilenet_v2_small": Arch(6342, 1280, 2_223_872),
    "regnet_y_400mf": Arch(815, 440, 3_903_144),
    "resnet101": Arch(2948, 2048, 42_500_160),
    "resnet18": Arch(482, 512, 11_176_512),
    "resnet18_small": Arch(4628, 512, 11_168_832),
    "resnet50": Arch(1928, 2048, 23_508_032),
    "resnet50_small": Arch(25_124, 2048, 23_500_352),
    "shufflenet_v2": Arch(474, 1024, 1_253_604),
    "wrn16_2": Arch(1940, 128, 690_384),
}


@dataclass(frozen=True)
class Term:
    """One term of the estimate: the stage it belongs to, the spec field that sizes it, what it is, its bytes."""

    stage: str
    field: tuple[str, ...]
    what: str
    bytes: float


@dataclass(frozen=True)
class MemoryEstimate:
    held: list[Term]  # held through the whole job (the dataset)
    stages: dict[str, list[Term]]  # the terms of each stage, whose sum adds to what is held
    assumed: tuple[str, ...]  # what the estimate could not know and how it went on

    @property
    def stage_bytes(self) -> dict[str, float]:
        return {stage: sum(t.bytes for t in terms) for stage, terms in self.stages.items()}

    @property
    def peak_stage(self) -> Optional[str]:
        totals = self.stage_bytes
        return max(totals, key=totals.get) if totals else None

    @property
    def peak_bytes(self) -> float:
        return BASE_BYTES + sum(t.bytes for t in self.held) + max(self.stage_bytes.values(), default=0.0)

    @property
    def largest(self) -> Optional[Term]:
        """The largest term of the peak: its field is what to lower."""
        terms = self.held + (self.stages[self.peak_stage] if self.peak_stage else [])
        return max(terms, key=lambda t: t.bytes) if terms else None


def gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB" if n >= GIB / 10 else f"{n / 1024**2:,.0f} MiB"


def image_size_of(spec: JobSpec, look_in_root: bool = True) -> Optional[int]:
    """The side the job's images are resized to: dataset.image_size, Fashion-MNIST's 28, or (an imagefolder whose
    root the service may read) the shorter side of the first image of the first class folder (the loader takes the
    first of its seeded pick: a folder of mixed sizes may differ); None when it cannot tell. Reads one image header."""
    if spec.dataset.image_size:
        return spec.dataset.image_size
    if spec.dataset.name == "fashion-mnist":
        return 28
    if not look_in_root or not spec.dataset.root:
        return None
    try:
        from PIL import Image

        train = Path(spec.dataset.root) / "train"
        first = min((entry.name for entry in os.scandir(train) if entry.is_dir() and not entry.name.startswith(".")),
                    default=None)
        if first is None:
            return None
        names = sorted(entry.name for entry in os.scandir(train / first) if entry.is_file())
        for name in names:
            if name.lower().endswith((".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")):
                with Image.open(train / first / name) as image:  # the header only
                    return min(image.size)
    except (OSError, ValueError, SyntaxError):
        return None
    return None


def _student_archs(spec: JobSpec, size: int) -> list[str]:
    """The students' architectures as scdd/validate/protocol.py resolves them (`student_for_resolution`)."""
    validate = spec.validate_
    if validate.students:
        return list(validate.students)
    if validate.student_arch:
        return [validate.student_arch]
    preset = "convnet" if validate.mode == "kd" else "convnet_in"
    if size < 32:
        return [preset]
    return ["resnet18"] if size > 64 else ["resnet18_small" if validate.mode == "kd" else preset]


def _student_batch(spec: JobSpec) -> int:
    validate = spec.validate_
    if validate.batch_size:
        return validate.batch_size
    if validate.preset == "long":
        return 100  # batch_for_set: at most 100
    return 64 if validate.mode == "kd" else 256


def estimate_memory(spec: JobSpec, classes: Optional[int], size: Optional[int]) -> MemoryEstimate:
    """The estimate described above, for `classes` classes (None: unknown) at `size` px (None: unknown)."""
    assumed: list[str] = []
    if size is None:
        assumed.append("the image size is unknown (set dataset.image_size): pixel terms left out")
        size = 0
    if classes is None:
        assumed.append("the class count is unknown (list dataset.classes): per-class terms left out")
    k = classes or 0
    k_params = classes or 1
    channels = 1 if spec.dataset.name == "fashion-mnist" else 3
    pixels = size * size
    image = channels * pixels  # bytes of one uint8 image
    workers = spec.resources.workers
    held: list[Term] = []
    stages: dict[str, list[Term]] = {}

    def add(stage: str, field: tuple[str, ...], what: str, n: float) -> None:
        stages.setdefault(stage, []).append(Term(stage, field, what, float(n)))

    limit = spec.dataset.train_limit
    if spec.dataset.name == "fashion-mnist":
        train_per, test_per = FASHION_MNIST_PER_CLASS
        train_per = min(limit, train_per) if limit else train_per
        test_per = min(spec.dataset.test_limit, test_per) if spec.dataset.test_limit else test_per
        n_train, n_test = train_per * k, test_per * k
        field = ("dataset", "image_size") if size > 28 else ("dataset", "train_limit")
        held.append(Term("held", field, f"the dataset as uint8: {n_train + n_test:,} images x {channels} x {size}^2",
                         (n_train + n_test) * image))
        if size != 28:
            add("load", ("dataset", "image_size"), f"resizing {n_train:,} images to {size} px as float",
                8 * n_train * image)
    else:
        train_per = limit or IMAGES_PER_CLASS_UNKNOWN
        if not limit:
            assumed.append(f"dataset.train_limit unset: {IMAGES_PER_CLASS_UNKNOWN} training images per class assumed")
        n_train = train_per * k
        n_test = spec.dataset.test_limit * k if spec.dataset.test_limit and classes else EVAL_BATCH
    eval_batch = min(EVAL_BATCH, n_test)

    def accuracy(stage: str, arch_name: str) -> None:
        add(stage, ("dataset", "image_size"), f"testing {arch_name} on batches of {eval_batch} test images at "
            f"{size} px", eval_batch * pixels * ARCHS[arch_name].activations / 2 + eval_batch * image * FLOAT * 2)

    def training(stage: str, arch_name: str, batch: int, field: tuple[str, ...], what: str) -> None:
        arch = ARCHS[arch_name]
        b = math.ceil(batch / workers)
        add(stage, field, f"{what}: {arch_name} activations of a batch of {b} at {size} px",
            b * pixels * arch.activations * 2)
        add(stage, field, f"{what}: the float batch of {b}", b * image * FLOAT * 3)
        add(stage, field, f"{what}: {arch_name} parameters and optimizer state",
            arch.params(k_params, size) * FLOAT * 4)

    teacher, validate, method = spec.teacher, spec.validate_, spec.method
    evaluate = spec.kind == "evaluate"
    batch_field = ("teacher", "batch_size")
    if not evaluate and not teacher.checkpoint:  # the recovery teacher is made here
        if method == "sre2l":
            training("squeeze", teacher.arch, teacher.batch_size, batch_field, "teacher training")
        elif method == "gvbsm":
            for member in teacher.ensemble:
                training(f"squeeze {member}", member, teacher.batch_size, batch_field, "ensemble member training")
        else:  # scdd: MoCo pretraining (unless imported), then the probe on precomputed features
            ssl, arch = teacher.ssl, ARCHS[teacher.arch]
            if not ssl.checkpoint:
                b = math.ceil(ssl.batch_size / workers)
                training("squeeze ssl", teacher.arch, ssl.batch_size, ("teacher", "ssl", "batch_size"),
                         "MoCo pretraining")
                add("squeeze ssl", ("teacher", "ssl", "batch_size"), f"MoCo: the key encoder's forward and the "
                    f"second view of {b}", b * pixels * arch.activations / 2 + b * image * FLOAT * 3)
                add("squeeze ssl", ("teacher", "ssl", "queue_size"), f"the MoCo queue: queue_size {ssl.queue_size:,} "
                    f"x proj_dim {ssl.proj_dim:,} x 4 B, and its copy", ssl.queue_size * ssl.proj_dim * FLOAT * 2)
                add("squeeze ssl", ("teacher", "ssl", "queue_size"), f"the MoCo logits: {b} x queue_size "
                    f"{ssl.queue_size + 1:,} x 4 B, x 4 (scaled, softmax, gradient)",
                    b * (ssl.queue_size + 1) * FLOAT * 4)
            views = 1 + teacher.probe.augmented_views
            add("squeeze probe", ("teacher", "probe", "augmented_views"), f"the probe's features: {n_train:,} images x "
                f"{views} views x {arch.feature_dim(size):,} features x 4 B, x 3",
                n_train * views * arch.feature_dim(size) * FLOAT * 3)
    if validate.enabled and validate.mode == "kd":  # a relabel teacher trained for the students
        if validate.relabel_teacher == "supervised" and not validate.relabel_checkpoint and not (
                method == "sre2l" and not validate.relabel_arch):
            training("squeeze relabel", validate.relabel_arch or teacher.arch, teacher.batch_size, batch_field,
                     "relabel teacher training")
        if validate.relabel_teacher == "ensemble" and not validate.relabel_checkpoints and method != "gvbsm":
            for member in teacher.ensemble:
                training(f"squeeze relabel {member}", member, teacher.batch_size, batch_field,
                         "relabel ensemble member training")

    recover = spec.recover
    recovery_archs = list(teacher.ensemble) if method == "gvbsm" else [teacher.arch]
    if not evaluate:
        for name in recovery_archs:  # the recovery teacher's accuracy on the test split
            accuracy(f"accuracy {name}", name)
        largest = max(recovery_archs, key=lambda name: ARCHS[name].activations)
        arch = ARCHS[largest]
        select = recover.select
        candidates = min(select.candidates, train_per)  # a class with fewer images gives all it has
        forward = min(SCORE_BATCH, candidates) * pixels * arch.activations / 2
        features = sum(ARCHS[name].feature_dim(size) for name in recovery_archs)
        if recover.init in ("herding", "kmeans"):
            add("recover init", ("recover", "select", "candidates"), f"{candidates:,} candidates of a class "
                f"as float, their features and the scoring forward", candidates * image * FLOAT * 2
                + candidates * features * 12 + forward)
        elif recover.init == "selected":
            views = candidates * select.crops
            add("recover init", ("recover", "select", "crops"), f"{candidates:,} candidates x {select.crops} "
                f"crops of a class resized at once as float, and their features", views * image * FLOAT * 2
                + candidates * image * FLOAT + forward + views * (features + k_params) * FLOAT)
        elif recover.init == "real":
            add("recover init", ("recover", "ipc"), f"{recover.ipc} images of a class as float",
                recover.ipc * image * FLOAT * 2)
        slice_classes = math.ceil(k / workers)
        if recover.iterations:
            b = min(recover.batch_size, slice_classes) if classes else recover.batch_size
            add("recover", ("recover", "batch_size"), f"{largest} activations of a batch of {b} images at {size} px, "
                f"with the input gradient", b * pixels * arch.activations * 2)
            add("recover", ("recover", "batch_size"), f"the {b} images, their gradient, Adam's moments and the view",
                b * image * FLOAT * 5)
        if recover.init != "noise" and classes:
            add("recover", ("recover", "ipc"), f"the initial pixels of a worker's {slice_classes:,} classes x ipc "
                f"{recover.ipc} as uint8", slice_classes * recover.ipc * image)
    if validate.enabled:
        images = 0 if evaluate else recover.ipc * k  # an evaluate job's set: its size is not in the spec
        relabel = validate.relabel_arch or teacher.arch
        b = math.ceil(_student_batch(spec) / workers)
        for student in _student_archs(spec, size):  # one after another: the largest counts
            stage = f"validate {student}"
            if images:
                add(stage, ("recover", "ipc"), f"the set and its baseline as uint8: {images:,} images each",
                    images * image * (2 if validate.baseline else 1))
            training(stage, student, _student_batch(spec), ("validate", "batch_size"), f"student {student}")
            if validate.mode == "kd":
                add(stage, ("validate", "batch_size"), f"the relabel teacher's forward on {b} images",
                    b * pixels * ARCHS[relabel].activations / 2)
            if validate.store_soft_labels and images:
                kept = min(validate.soft_label_topk or k, k)
                add(stage, ("validate", "store_soft_labels"), f"an epoch of soft labels: {images:,} images x "
                    f"{kept:,} logits x 2 B", images * kept * 2)
            accuracy(f"accuracy {student}", student)
        if validate.dd_ranking:
            student = _student_archs(spec, size)[0]
            training("validate full data", student, 256, ("validate", "dd_ranking"), "the full-data run")
    return MemoryEstimate(held, stages, tuple(assumed))
