"""Train a student on a small image set (distilled or a real baseline subset) under a protocol.

kd:   the relabel teacher labels the same augmented, mixed batch the student sees; loss = kd_loss.
hard: cross-entropy on the class labels, mixed as the images are (lam y_i + (1 - lam) y_perm(i)).
Augmentation per image on every batch: random-resized-crop (protocol.crop_scale) and flip, or the padded crop
and flip (protocol.crop; scdd/validate/crops.py), then the batch's mix.
Soft labels: a kd student can store its teacher's labels of its batches (`soft_labels`, a SoftLabelWriter), and a
student can train from stored ones without a teacher (`soft_label_source`; scdd/validate/soft_labels.py).
With `protocol.ema_decay` > 0 the student returned holds the EMA of its weights (validate/ema.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from scdd.data.base import PixelSet
from scdd.optim import build_optimizer, training_step
from scdd.progress import Progress
from scdd.runtime import Runtime
from scdd.shard import LOCAL, TrainHooks
from scdd.validate.ema import WeightEMA
from scdd.validate.crops import CropDraw, apply_crops, black, draw_crops
from scdd.validate.mix import MixDraw, apply_mix, draw_mix
from scdd.validate.kd import kd_loss
from scdd.validate.protocol import Protocol
from scdd.validate.soft_labels import SoftLabelReader, SoftLabelWriter, batch_draws, batch_logits

MIN_RANK_BATCH = 16  # data-parallel students: a rank's batch never falls below this on a large set


def online_batches(images: PixelSet, protocol: Protocol, order: torch.Tensor, batch_size: int,
                   generator: torch.Generator, fill: torch.Tensor | None,
                   fmt: torch.memory_format = torch.contiguous_format,
                   ) -> Iterator[tuple[torch.Tensor, CropDraw, MixDraw, torch.Tensor]]:
    """One epoch's batches in `order`: (index, crop draws, mix draws, the augmented mixed float batch). The
    draws come from `generator` in the order the student loop always drew them (crop and flip, then the mix)."""
    size = images.pixels.shape[-1]
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        crops = draw_crops(protocol.crop, len(index), size, protocol.crop_scale, protocol.crop_padding, generator)
        batch = apply_crops(protocol.crop, images.batch(index), crops, fill).contiguous(memory_format=fmt)
        mix = draw_mix(len(batch), batch.shape[-2], batch.shape[-1], protocol.mix, protocol.mix_alpha, generator)
        yield index, crops, mix, apply_mix(batch, mix)


def padding_fill(images: PixelSet, protocol: Protocol) -> torch.Tensor | None:
    """crop padded: the normalised black the padding shows (RandomCrop pads before Normalize)."""
    return black(images.mean, images.std) if protocol.crop == "padded" else None


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
    *,
    soft_labels: SoftLabelWriter | None = None,
    soft_label_source: SoftLabelReader | None = None,
) -> nn.Module:
    """`images`: the set (or, data-parallel, this rank's shard of it) as uint8 with labels; each batch is made
    float on the device. `teacher` (eval, frozen) is required for kd unless `soft_label_source` gives the stored
    soft labels to replay (their batches, draws and logits; no teacher). `soft_labels`: a writer that stores the
    teacher's soft labels of the first epochs it wants (kd). Data-parallel and resumable through `hooks`
    (scdd/shard.py)."""
    replay = soft_label_source is not None
    if (replay or soft_labels is not None) and protocol.mode != "kd":
        raise ValueError("soft labels are stored and replayed in kd validation only")
    if replay and soft_labels is not None:
        raise ValueError("a student trained from stored soft labels has no teacher whose labels it could store")
    if protocol.mode == "kd" and teacher is None and not replay:
        raise ValueError("kd validation needs a relabel teacher (or stored soft labels)")
    device, fmt = runtime.device, runtime.memory_format()
    student.to(device, memory_format=fmt).train()
    net = hooks.wrap(student)
    optimizer = build_optimizer(protocol.optimizer, student.parameters(), protocol.lr, protocol.weight_decay,
                                momentum=protocol.momentum, nesterov=protocol.nesterov,
                                decay_norm_and_bias=protocol.decay_norm_and_bias)
    batch_size, steps_per_epoch, scheduler = hooks.schedule(
        optimizer, images.set_size, protocol.batch_size, protocol.epochs, protocol.schedule_span, MIN_RANK_BATCH,
        protocol.warmup_epochs, protocol.schedule_unit)
    generator = torch.Generator().manual_seed(seed)
    ema = WeightEMA(student, protocol.ema_decay) if protocol.ema_decay > 0 else None
    stateful = (student, optimizer, scheduler, generator) + ((ema,) if ema is not None else ())
    first_epoch = hooks.begin(progress, stage, protocol.epochs, steps_per_epoch, *stateful)
    rank, world = (hooks.shard.rank, hooks.shard.world_size) if hooks.shard is not None else (None, 1)
    if soft_labels is not None:
        soft_labels.begin(first_epoch, images.pixels.shape[-1], protocol.crop)
    fill = padding_fill(images, protocol)
    images = images.to(device)
    labels = images.labels
    for epoch in range(first_epoch, protocol.epochs):
        if replay:
            batches = replayed_batches(images, soft_label_source, epoch, rank, world, steps_per_epoch, fill, fmt)
        else:
            order = hooks.shard_order(len(images), images.set_size, epoch, generator, seed).to(device)
            batches = ((index, crops, mix, batch, None)
                       for index, crops, mix, batch in online_batches(images, protocol, order, batch_size, generator,
                                                                      fill, fmt))
        total = torch.zeros((), device=device)
        for index, crops, mix, batch, stored_logits in batches:
            with runtime.autocast():
                logits = net(batch)
                if protocol.mode == "kd" and not replay:
                    with torch.no_grad():
                        target_logits = teacher(batch)
            if protocol.mode == "kd":
                target = stored_logits if replay else target_logits
                loss = kd_loss(logits, target, protocol.temperature, protocol.temperature_squared)
                if soft_labels is not None and soft_labels.wants(epoch):
                    soft_labels.add(index.cpu() * world + (rank or 0), crops, mix, target_logits)
            else:
                y, lam = labels[index], mix.lam
                loss = lam * F.cross_entropy(logits.float(), y) + (1 - lam) * F.cross_entropy(
                    logits.float(), y[mix.perm.to(device)])
            training_step(loss, optimizer, scheduler)
            if ema is not None:
                ema.update(student)
            total += loss.detach()
            progress.advance(1, loss=loss.detach())
        if soft_labels is not None:
            soft_labels.end_epoch(epoch)
        hooks.end_epoch(epoch, float(total) / steps_per_epoch, *stateful)
    progress.finish()
    if ema is not None:
        ema.copy_to(student)
    return student.eval()


def replayed_batches(images: PixelSet, source: SoftLabelReader, epoch: int, rank: int | None, world: int,
                     steps_per_epoch: int, fill: torch.Tensor | None,
                     fmt: torch.memory_format,
                     ) -> Iterator[tuple[torch.Tensor, CropDraw, MixDraw, torch.Tensor, torch.Tensor]]:
    """Epoch `epoch` of a student trained from stored soft labels: stored epoch epoch mod N, batch by batch, the
    stored images (this rank's, data-parallel), crops, flips and mix, with the stored logits as the target."""
    stored = source.for_training(epoch, rank)
    if len(stored["batches"]) != steps_per_epoch:
        raise ValueError(f"the stored soft labels hold {len(stored['batches'])} batches per epoch, this student takes "
                         f"{steps_per_epoch}: train it with the protocol they were stored under (their index.json)")
    device = images.pixels.device
    for record in stored["batches"]:
        crops, mix = batch_draws(record)
        index = ((record["index"] - (rank or 0)) // world).to(device)  # this rank's shard holds every world-th image
        batch = apply_crops(stored["crop"], images.batch(index), crops, fill).contiguous(memory_format=fmt)
        yield index, crops, mix, apply_mix(batch, mix), batch_logits(record, stored["num_classes"]).to(device)
