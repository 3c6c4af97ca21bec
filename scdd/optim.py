"""Optimisers and the per-step cosine schedule shared by the training stages."""

from __future__ import annotations

import math
from typing import Iterable

import torch


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
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


def training_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> None:
    """Back-propagate `loss`, step the optimiser, then the per-step schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
