"""Synthetic teachers: no dataset is needed (none is on the lent machine, nothing can be downloaded).

A registered architecture at random initialisation whose BatchNorm running statistics are the
exact averages over a few batches of Gaussian noise, so the BN-matching loss has statistics to
match. Its speed is that of a trained teacher of the same shape; its images mean nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from gpu_check_parts.config import Limits, Shape
from scdd.data.base import DatasetInfo
from scdd.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from scdd.models import create_model
from scdd.recover.bn_loss import bn_layers

CHANNELS = 3


def synthetic_teacher(arch: str, shape: Shape, limits: Limits, device: torch.device, seed: int) -> nn.Module:
    """`arch` for `shape`, on `device`, in eval mode with frozen parameters."""
    torch.manual_seed(seed)
    model = create_model(arch, shape.classes, CHANNELS, shape.image_size).to(device)
    layers = bn_layers(model)
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average: the exact mean over the calibration batches
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(limits.calibration_batches):
            size = (limits.calibration_batch_size, CHANNELS, shape.image_size, shape.image_size)
            model(torch.randn(size, generator=generator).to(device))
    for layer in layers:
        layer.momentum = 0.1  # torch's default again
    return model.eval().requires_grad_(False)


def synthetic_info(shape: Shape) -> DatasetInfo:
    """An ImageNet-normalised RGB dataset of the shape (for the pixel bounds of recover)."""
    names = tuple(f"class{k:04d}" for k in range(shape.classes))
    return DatasetInfo(name=f"synthetic-{shape.name}", class_names=names, class_dirs=names,
                       source_indices=tuple(range(shape.classes)), channels=CHANNELS, image_size=shape.image_size,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD)
