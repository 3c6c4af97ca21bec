"""What a recover step matches, and through which backbone: the `RecoverObjective`.

A teacher is one backbone or an `Ensemble` of several (G-VBSM, arXiv 2311.17950). Each backbone has
its statistic losses: BatchNorm statistics always (bn_loss.py), and the real-data statistics of its
convolution inputs when the ensemble carries them (conv_loss.py). Step t of a batch runs backbone
t mod M (M backbones, in the ensemble's order, restarting at every batch so a unit's images do not
depend on which units ran before it) and its losses. All of a teacher's hooks are registered at once;
only the selected backbone runs, so only its hooks fire. In a global scope every worker selects the
same backbone at the same step, so the collectives line up.
"""

from __future__ import annotations

import torch
from torch import nn

from scdd.errors import SpecError
from scdd.models.ensemble import Ensemble, members_of
from scdd.recover.bn_loss import BNStatLoss, bn_layers
from scdd.recover.conv_loss import ConvStatLoss
from scdd.recover.scope import BatchScope, LocalScope
from scdd.recover.stat_match import StatisticLoss


class StatisticSet:
    """The statistic losses of one backbone, summed."""

    def __init__(self, losses: list[StatisticLoss], scope: BatchScope):
        self.losses, self.scope = losses, scope

    def loss(self) -> torch.Tensor:
        return sum(loss.loss() for loss in self.losses)  # type: ignore[return-value]


def member_name(teacher: nn.Module, index: int) -> str:
    if isinstance(teacher, Ensemble):
        return f"ensemble member {index + 1} ({teacher.archs[index]})"
    return f"the teacher ({getattr(teacher, 'registry_name', type(teacher).__name__)})"


class RecoverObjective:
    """Use as `with RecoverObjective(teacher, first_multiplier, scope, momentum) as objective:`; each step
    `i = objective.select(step)`, a forward through backbone i, then `objective.loss()`."""

    def __init__(self, teacher: nn.Module, first_multiplier: float = 10.0, scope: BatchScope | None = None,
                 momentum: float = 0.0):
        self.scope = scope or LocalScope()
        self.members = members_of(teacher)
        conv_stats = teacher.conv_statistics if isinstance(teacher, Ensemble) else None
        self.sets = []
        for i, member in enumerate(self.members):
            if not bn_layers(member):
                raise SpecError(f"{member_name(teacher, i)} has no BatchNorm2d layer: recovery matches BatchNorm "
                                f"statistics, so every backbone must have them (choose models with BatchNorm)")
            losses: list[StatisticLoss] = [BNStatLoss(member, first_multiplier, self.scope, momentum)]
            if conv_stats is not None:
                losses.append(ConvStatLoss(member, conv_stats[i], first_multiplier, self.scope, momentum))
            self.sets.append(StatisticSet(losses, self.scope))
        self.statistics = [loss.name for loss in self.sets[0].losses]
        self._current = 0

    def __enter__(self) -> "RecoverObjective":
        for statistic_set in self.sets:
            for loss in statistic_set.losses:
                loss.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for statistic_set in self.sets:
            for loss in statistic_set.losses:
                loss.__exit__(*exc)

    def reset(self) -> None:
        for statistic_set in self.sets:
            for loss in statistic_set.losses:
                loss.reset()

    def select(self, step: int) -> int:
        """The backbone of step `step` of a batch (rotation)."""
        self._current = step % len(self.members)
        return self._current

    def loss(self) -> torch.Tensor:
        """The selected backbone's statistic losses after its forward pass."""
        return self.sets[self._current].loss()
