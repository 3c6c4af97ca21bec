"""Supervised squeeze (SRe2L): train a teacher with labels on the real training split.

Standard augmentation for the image sizes this targets: per-image random-resized-crop with area
in (0.35, 1) and horizontal flip, drawn on the batch. Cosine learning rate per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from api_schema import TeacherSpec
from scdd import augment
from scdd.data import RealData, iterate_batches
from scdd.optim import build_optimizer, cosine_schedule, training_step
from scdd.progress import Progress
from scdd.runtime import Runtime

TRAIN_CROP_SCALE = (0.35, 1.0)
DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}


def train_supervised(
    model: nn.Module, data: RealData, spec: TeacherSpec, runtime: Runtime, seed: int, progress: Progress
) -> nn.Module:
    model.to(runtime.device, memory_format=runtime.memory_format()).train()
    optimizer = build_optimizer(spec.optimizer, model.parameters(), spec.lr or DEFAULT_LR[spec.optimizer], spec.weight_decay)
    steps_per_epoch = math.ceil(len(data.train) / spec.batch_size)
    scheduler = cosine_schedule(optimizer, spec.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    progress.start("squeeze", spec.epochs * steps_per_epoch, "batch")
    for _epoch in range(spec.epochs):
        for images, labels in iterate_batches(data.train, spec.batch_size, shuffle=True, generator=generator):
            images = images.to(runtime.device, memory_format=runtime.memory_format())
            with runtime.autocast():
                logits = model(augment.crop_flip(images, TRAIN_CROP_SCALE, generator))
            loss = F.cross_entropy(logits.float(), labels.to(runtime.device))
            training_step(loss, optimizer, scheduler)
            progress.advance(1, loss=loss.detach())
    progress.finish()
    return model.eval()
