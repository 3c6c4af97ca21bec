"""Train a student on a small image set (distilled or a real baseline subset) under a protocol.

kd:   the relabel teacher labels the same augmented, mixed batch the student sees; loss = kd_loss.
hard: cross-entropy on the class labels, mixed as the images are (lam y_i + (1 - lam) y_perm(i)).
Augmentation per image on every batch: random-resized-crop (protocol.crop_scale) and flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from scdd import augment
from scdd.optim import build_optimizer, cosine_schedule, training_step
from scdd.progress import Progress
from scdd.runtime import Runtime
from scdd.shard import Shard
from scdd.validate.kd import kd_loss
from scdd.validate.mix import mix_batch
from scdd.validate.protocol import Protocol


@dataclass(frozen=True)
class EpochEnd:
    epoch: int  # 0-based, just finished
    loss: float  # mean training loss of the epoch on this rank
    state: dict[str, Any]  # what `train_student(resume=...)` needs to go on after this epoch


def epoch_order(n: int, epoch: int, generator: torch.Generator, seed: int, shard: Shard | None) -> torch.Tensor:
    """This rank's sample order for one epoch: a permutation of all n in one process; with a shard,
    a DistributedSampler's part (the ranks' parts are equally long, so every rank takes the same
    number of steps, as DDP requires)."""
    if shard is None:
        return torch.randperm(n, generator=generator)
    sampler = DistributedSampler(range(n), num_replicas=shard.world_size, rank=shard.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def train_student(
    student: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    protocol: Protocol,
    teacher: nn.Module | None,
    runtime: Runtime,
    seed: int,
    progress: Progress,
    stage: str = "validate",
    shard: Shard | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[EpochEnd], None] | None = None,
) -> nn.Module:
    """`images` (N, C, S, S) normalised, `labels` (N,); `teacher` (eval, frozen) is required for kd.

    Data-parallel (`shard` given, `student` DDP-wrapped by the caller): each rank trains on its
    DistributedSampler part in batches of ceil(batch_size / world_size), so a step's global batch is
    the protocol's; its augmentation draws are its own. `resume` is an `EpochEnd.state`."""
    if protocol.mode == "kd" and teacher is None:
        raise ValueError("kd validation needs a relabel teacher")
    device, fmt = runtime.device, runtime.memory_format()
    student.to(device, memory_format=fmt).train()
    optimizer = build_optimizer(protocol.optimizer, student.parameters(), protocol.lr, protocol.weight_decay)
    batch_size = protocol.batch_size if shard is None else math.ceil(protocol.batch_size / shard.world_size)
    samples = len(images) if shard is None else len(DistributedSampler(range(len(images)), shard.world_size, shard.rank))
    steps_per_epoch = math.ceil(samples / batch_size)
    scheduler = cosine_schedule(optimizer, protocol.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    first_epoch = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        first_epoch = resume["epoch"] + 1
    images, labels = images.to(device), labels.to(device)
    progress.start(stage, protocol.epochs * steps_per_epoch, "batch")
    progress.advance(first_epoch * steps_per_epoch)
    for epoch in range(first_epoch, protocol.epochs):
        if shard is not None:  # each rank its own draws, reproducible per epoch, so a resumed run repeats them
            generator.manual_seed(seed + 1_000_003 * shard.rank + 7_919 * epoch)
        order = epoch_order(len(images), epoch, generator, seed, shard).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = augment.crop_flip(images[index], protocol.crop_scale, generator).contiguous(memory_format=fmt)
            batch, perm, lam = mix_batch(batch, protocol.mix, protocol.mix_alpha, generator)
            with runtime.autocast():
                logits = student(batch)
                if protocol.mode == "kd":
                    with torch.no_grad():
                        target_logits = teacher(batch)
            if protocol.mode == "kd":
                loss = kd_loss(logits, target_logits, protocol.temperature)
            else:
                y = labels[index]
                loss = lam * F.cross_entropy(logits.float(), y) + (1 - lam) * F.cross_entropy(logits.float(), y[perm])
            training_step(loss, optimizer, scheduler)
            total += loss.detach()
            progress.advance(1, loss=loss.detach())
        if on_epoch_end is not None:
            state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "generator": generator.get_state()}
            on_epoch_end(EpochEnd(epoch, float(total) / steps_per_epoch, state))
    progress.finish()
    return student.eval()
