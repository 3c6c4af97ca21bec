"""An exponential moving average of a model's weights, the student that the long protocol evaluates
(EDC, arXiv 2404.13733, trains its students with one; Polyak & Juditsky 1992).

After every optimiser step: ema <- d_t * ema + (1 - d_t) * weights, with the warm-up
d_t = min(decay, (1 + t) / (10 + t)) so that the first steps are not drowned by the random
initialisation. Buffers (BatchNorm running statistics) are copied, not averaged: they already are
running averages.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.steps = 0
        self.average = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for avg, new in zip(self.average.parameters(), model.parameters()):
            avg.lerp_(new.detach().to(avg.dtype), 1 - d)
        for avg, new in zip(self.average.buffers(), model.buffers()):
            avg.copy_(new)
        self.steps += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights and buffers into `model` (the student that is then tested)."""
        model.load_state_dict(self.average.state_dict())
        return model

    def state_dict(self) -> dict:
        return {"steps": self.steps, "average": self.average.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.average.load_state_dict(state["average"])
