"""Relabel / validate: train a student on the distilled images by knowledge distillation.

The teacher labels the same augmented batch the student sees (per-image random-resized-crop and
flip); the loss is KL(softmax(t / T) || softmax(s / T)) * T^2 (Hinton et al. 2015), AdamW with
a cosine schedule per step. The student is then tested on the whole real test split.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from api_schema import ValidateSpec
from scdd import augment
from scdd.optim import cosine_schedule, training_step
from scdd.progress import Progress
from scdd.runtime import Runtime


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Batch-mean KL divergence between temperature-softened distributions, times T^2. (N, K) -> ()."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


def train_student_kd(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    spec: ValidateSpec,
    runtime: Runtime,
    seed: int,
    progress: Progress,
) -> nn.Module:
    """`images` (N, C, S, S) normalised distilled images; the teacher is frozen and in eval mode."""
    device, fmt = runtime.device, runtime.memory_format()
    student.to(device, memory_format=fmt).train()
    teacher.eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = math.ceil(len(images) / spec.batch_size)
    scheduler = cosine_schedule(optimizer, spec.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    progress.start("validate", spec.epochs * steps_per_epoch, "batch")
    for _epoch in range(spec.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), spec.batch_size):
            batch = images[order[start : start + spec.batch_size]]
            params = augment.sample_params(
                len(batch), size, crop=True, scale=spec.crop_scale, ratio=(3 / 4, 4 / 3),
                flip=True, jitter=0, generator=generator,
            )
            batch = augment.apply(batch.to(device, memory_format=fmt), params)
            with runtime.autocast():
                with torch.no_grad():
                    teacher_logits = teacher(batch)
                student_logits = student(batch)
            loss = kd_loss(student_logits, teacher_logits, spec.temperature)
            training_step(loss, optimizer, scheduler)
            progress.advance(1, loss=loss.detach())
    progress.finish()
    return student.eval()
