"""Train a student on a small image set (distilled or a real baseline subset) under a protocol.

kd:   the relabel teacher labels the same augmented, mixed batch the student sees; loss = kd_loss.
hard: cross-entropy on the class labels, mixed as the images are (lam y_i + (1 - lam) y_perm(i)).
Augmentation per image on every batch: random-resized-crop (protocol.crop_scale) and flip.
With `protocol.ema_decay` > 0 the student returned holds the EMA of its weights (validate/ema.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scdd import augment
from scdd.data.base import PixelSet
from scdd.optim import build_optimizer, training_step
from scdd.progress import Progress
from scdd.runtime import Runtime
from scdd.shard import LOCAL, TrainHooks
from scdd.validate.ema import WeightEMA
from scdd.validate.kd import kd_loss
from scdd.validate.mix import mix_batch
from scdd.validate.protocol import Protocol

MIN_RANK_BATCH = 16  # data-parallel students: a rank's batch never falls below this on a large set


def train_student(
    student: nn.Module,
    images: PixelSet,
    protocol: Protocol,
    teacher: nn.Module | None,
    runtime: Runtime,
    seed: int,
    progress: Progress,
    stage: str = "validate",
    hooks: TrainHooks = LOCAL,
) -> nn.Module:
    """`images`: the set (or, data-parallel, this rank's shard of it) as uint8 with labels; each batch is made
    float on the device. `teacher` (eval, frozen) is required for kd. Data-parallel and resumable through
    `hooks` (scdd/shard.py)."""
    if protocol.mode == "kd" and teacher is None:
        raise ValueError("kd validation needs a relabel teacher")
    device, fmt = runtime.device, runtime.memory_format()
    student.to(device, memory_format=fmt).train()
    net = hooks.wrap(student)
    optimizer = build_optimizer(protocol.optimizer, student.parameters(), protocol.lr, protocol.weight_decay)
    batch_size, steps_per_epoch, scheduler = hooks.schedule(
        optimizer, images.set_size, protocol.batch_size, protocol.epochs, protocol.schedule_span, MIN_RANK_BATCH)
    generator = torch.Generator().manual_seed(seed)
    ema = WeightEMA(student, protocol.ema_decay) if protocol.ema_decay > 0 else None
    stateful = (student, optimizer, scheduler, generator) + ((ema,) if ema is not None else ())
    first_epoch = hooks.begin(progress, stage, protocol.epochs, steps_per_epoch, *stateful)
    images = images.to(device)
    labels = images.labels
    for epoch in range(first_epoch, protocol.epochs):
        order = hooks.shard_order(len(images), images.set_size, epoch, generator, seed).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = augment.crop_flip(images.batch(index), protocol.crop_scale, generator).contiguous(memory_format=fmt)
            batch, perm, lam = mix_batch(batch, protocol.mix, protocol.mix_alpha, generator)
            with runtime.autocast():
                logits = net(batch)
                if protocol.mode == "kd":
                    with torch.no_grad():
                        target_logits = teacher(batch)
            if protocol.mode == "kd":
                loss = kd_loss(logits, target_logits, protocol.temperature)
            else:
                y = labels[index]
                loss = lam * F.cross_entropy(logits.float(), y) + (1 - lam) * F.cross_entropy(logits.float(), y[perm])
            training_step(loss, optimizer, scheduler)
            if ema is not None:
                ema.update(student)
            total += loss.detach()
            progress.advance(1, loss=loss.detach())
        hooks.end_epoch(epoch, float(total) / steps_per_epoch, *stateful)
    progress.finish()
    if ema is not None:
        ema.copy_to(student)
    return student.eval()
