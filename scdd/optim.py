"""Optimisers and the cosine schedule (with an optional linear warm-up) shared by the training stages."""

from __future__ import annotations

import math
from typing import Iterable

import torch


def parameter_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Two groups: weights of two or more dims (convolutions, linear layers) with `weight_decay`, and the rest
    (BatchNorm / norm parameters, biases) without (SC-DD's ImageNet student, post_train/utils.py
    `get_parameters`; their test is the parameter's name, ours its shape, which names every norm and bias)."""
    params = list(params)
    return [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
            dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, *,
                    momentum: float = 0.9, nesterov: bool = True,
                    decay_norm_and_bias: bool = True) -> torch.optim.Optimizer:
    """sgd (`momentum`, `nesterov`) or adamw; `decay_norm_and_bias` false: no weight decay on parameters of
    fewer than two dims (`parameter_groups`)."""
    if not decay_norm_and_bias:
        params = parameter_groups(params, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def cosine_factor(step: int, total_steps: int, span: float = 1.0) -> float:
    """0.5 (1 + cos(pi t / (span T))) at step t of T: span 1 decays to 0, span 2 only to 0.5 (RDED's
    student schedule, a cosine over twice the epochs that it runs)."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / (span * total_steps)))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, span: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiply the base learning rate by `cosine_factor`, stepped once per batch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, total_steps, span))


def warmup_cosine_factor(t: int, total: int, span: float = 1.0, warmup: int = 0) -> float:
    """(t + 1) / warmup for the first `warmup` units, then `cosine_factor` over the units after the warm-up (the
    reference's lr_cosine_policy); warmup 0 is `cosine_factor(t, total, span)`."""
    if t < warmup:
        return (t + 1) / warmup
    return cosine_factor(t - warmup, max(1, total - warmup), span) if warmup else cosine_factor(t, total, span)


def lr_schedule(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int, span: float = 1.0,
                warmup_epochs: int = 0, unit: str = "step") -> torch.optim.lr_scheduler.LambdaLR:
    """The training loops' schedule, stepped once per batch (`training_step`): linear warm-up over
    `warmup_epochs`, then the cosine (`span`). unit step: the factor changes every batch; unit epoch: it is the
    epoch's (the reference scripts' LambdaLR stepped once per epoch), constant within an epoch. With no warm-up
    and unit step this is `cosine_schedule` over all the steps, as before."""
    if unit == "step":
        if not warmup_epochs:
            return cosine_schedule(optimizer, epochs * steps_per_epoch, span)
        total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine_factor(step, total, span, warmup))
    if unit == "epoch":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine_factor(step // steps_per_epoch, epochs, span, warmup_epochs))
    raise ValueError(f"unknown schedule unit {unit!r}")


def training_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> None:
    """Back-propagate `loss`, step the optimiser, then the per-step schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
