"""What the check runs: shapes, models, measurement sizes and per-part time budgets (the GPU preset
and the tiny CPU preset the test suite runs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Workload:
    """A recover job this shape stands for, to turn a rate into hours."""

    label: str
    classes: int
    ipc: int
    iterations: int

    @property
    def image_iterations(self) -> int:
        return self.classes * self.ipc * self.iterations


@dataclass(frozen=True)
class ModelPlan:
    arch: str  # a name of the model registry
    budget_s: float  # the recover part's budget: compile, warm-up and the three measured loops


@dataclass(frozen=True)
class Shape:
    name: str
    image_size: int
    classes: int
    models: tuple[ModelPlan, ...]
    workload: Workload


@dataclass(frozen=True)
class Limits:
    """Sizes of the measurements: a warm call (compile, autotuning) and a calibration call of
    `warm_iterations` each, then a measured call sized to `measure_s`, clamped to the bounds."""

    batch: int
    warm_iterations: int
    min_iterations: int
    max_iterations: int
    measure_s: float
    global_iterations: int  # recover steps of the process-group part (every rank runs the same count)
    calibration_batches: int  # random batches that set a synthetic teacher's BN running statistics
    calibration_batch_size: int
    kd_images: int  # size of the random image set the KD student trains on


@dataclass(frozen=True)
class CheckConfig:
    device: torch.device
    tiny: bool
    seed: int
    imagenet: Shape  # recover at the ImageNet shape; also the shape of the process-group and KD parts
    cifar: Shape
    student: str
    limits: Limits
    global_budget_s: float  # world size 1, in this process
    world2_budget_s: float  # world size 2, two processes (a hard limit: they are killed after it)
    validate_budget_s: float
    ray_budget_s: float


# SRe2L's published recover settings (arXiv 2306.13092): Adam lr 0.25, BN-loss weight 0.01.
PUBLISHED_LR = 0.25
PUBLISHED_R_BN = 0.01

IMAGENET_IPC50 = Workload("ImageNet-1K IPC 50 x 4000 it", 1000, 50, 4000)
CIFAR100_IPC50 = Workload("CIFAR-100 IPC 50 x 1000 it", 100, 50, 1000)


def gpu_config(device: torch.device, seed: int) -> CheckConfig:
    """About 8 minutes on one H100/H200, most of it torch.compile."""
    return CheckConfig(
        device=device, tiny=False, seed=seed,
        imagenet=Shape("imagenet", 224, 1000, (ModelPlan("resnet18", 75), ModelPlan("resnet50", 100)), IMAGENET_IPC50),
        cifar=Shape("cifar", 32, 100, (ModelPlan("resnet18_small", 50), ModelPlan("resnet50_small", 70)),
                    CIFAR100_IPC50),
        student="resnet18",
        limits=Limits(batch=100, warm_iterations=2, min_iterations=6, max_iterations=400, measure_s=5.0,
                      global_iterations=20, calibration_batches=4, calibration_batch_size=32, kd_images=400),
        global_budget_s=30, world2_budget_s=60, validate_budget_s=40, ray_budget_s=60,
    )


def tiny_config(device: torch.device, seed: int) -> CheckConfig:
    """Seconds on two CPU cores: small images, four classes, a few iterations, ResNet-18 only."""
    tiny_workload = Workload("tiny: 4 classes IPC 1 x 20 it", 4, 1, 20)  # below the compile threshold: eager
    return CheckConfig(
        device=device, tiny=True, seed=seed,
        imagenet=Shape("imagenet-stem", 32, 4, (ModelPlan("resnet18", 10),), tiny_workload),
        cifar=Shape("cifar-stem", 8, 4, (ModelPlan("resnet18_small", 10),), tiny_workload),
        student="resnet18",
        limits=Limits(batch=8, warm_iterations=1, min_iterations=2, max_iterations=2, measure_s=1.0,
                      global_iterations=2, calibration_batches=2, calibration_batch_size=8, kd_images=8),
        global_budget_s=10, world2_budget_s=30, validate_budget_s=10, ray_budget_s=10,
    )
