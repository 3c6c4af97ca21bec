"""Supervised squeeze (SRe2L): train a teacher with labels on the real training split.

Standard augmentation for the image sizes this targets: per-image random-resized-crop with area
in (0.35, 1) and horizontal flip, drawn on the batch. Cosine learning rate per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from api_schema import TeacherSpec
from scdd import augment
from scdd.data import RealData, iterate_batches
from scdd.optim import build_optimizer, training_step
from scdd.progress import Progress
from scdd.runtime import Runtime
from scdd.shard import LOCAL, TrainHooks

TRAIN_CROP_SCALE = (0.35, 1.0)
DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}


def train_supervised(
    model: nn.Module, data: RealData, spec: TeacherSpec, runtime: Runtime, seed: int, progress: Progress,
    hooks: TrainHooks = LOCAL,
) -> nn.Module:
    """Train `model` in place; data-parallel and resumable through `hooks` (scdd/shard.py)."""
    model.to(runtime.device, memory_format=runtime.memory_format()).train()
    net = hooks.wrap(model)
    optimizer = build_optimizer(spec.optimizer, model.parameters(), spec.lr or DEFAULT_LR[spec.optimizer], spec.weight_decay)
    batch_size, steps_per_epoch, scheduler = hooks.schedule(optimizer, len(data.train), spec.batch_size, spec.epochs)
    generator = torch.Generator().manual_seed(seed)
    stateful = (model, optimizer, scheduler, generator)
    first_epoch = hooks.begin(progress, "squeeze", spec.epochs, steps_per_epoch, *stateful)
    for epoch in range(first_epoch, spec.epochs):
        total = torch.zeros((), device=runtime.device)
        order = hooks.epoch_order(len(data.train), epoch, generator, seed)
        for images, labels in iterate_batches(data.train, batch_size, indices=order):
            images = images.to(runtime.device, memory_format=runtime.memory_format())
            with runtime.autocast():
                logits = net(augment.crop_flip(images, TRAIN_CROP_SCALE, generator))
            loss = F.cross_entropy(logits.float(), labels.to(runtime.device))
            training_step(loss, optimizer, scheduler)
            total += loss.detach()
            progress.advance(1, loss=loss.detach())
        hooks.end_epoch(epoch, float(total) / steps_per_epoch, *stateful)
    progress.finish()
    return model.eval()
