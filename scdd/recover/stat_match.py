"""The machinery every statistic-matching loss of recover shares (bn_loss.py, conv_loss.py).

A `StatisticLoss` hooks some layers of a frozen backbone. After a forward pass it compares, for each
layer i, the per-channel batch statistics of the layer's input x (N, C, H, W) (mean and biased
variance over N, H, W, in float32 at least) with that layer's targets (mu_i, sigma2_i):

    loss_i = || mean(x) - mu_i ||_2 + || var(x) - sigma2_i ||_2,   loss = sum_i w_i * loss_i

with w_0 = first_multiplier and w_i = 1 otherwise. Whose batch the statistics describe is the
`BatchScope` (scope.py): this process's, or the union of all workers' batches.

EMA smoothing (G-VBSM, arXiv 2311.17950, "score distillation sampling" form; `momentum` > 0): each
layer keeps an exponential moving average m_t = momentum * m_{t-1} + (1 - momentum) * s_t of its batch
statistics s_t over the steps of one batch of images (m_1 = s_1; `reset()` starts a new batch), and
the loss compares m_t + s_t - stop_grad(s_t) with the targets: the value of the average, the gradient
of this step's statistics. momentum 0 compares s_t itself (SRe2L, SC-DD).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scdd.recover.scope import BatchScope, LocalScope, Stats


class StatisticLoss:
    """Context manager that hooks `layers`; `loss()` after each forward (see the module's doc).

    Subclasses give the layers and `target(i)`. `select(step)` and `reset()` make a single loss usable
    where recover expects a `RecoverObjective` (scdd/recover/objective.py): one backbone, every step.
    """

    name = "statistics"

    def __init__(self, layers: list[nn.Module], first_multiplier: float, scope: BatchScope | None, momentum: float):
        if not 0 <= momentum < 1:
            raise ValueError(f"the EMA momentum of batch statistics must be in [0, 1), got {momentum}")
        self.layers = layers
        self.weights = [first_multiplier] + [1.0] * (len(layers) - 1)
        self.scope = scope or LocalScope()
        self.momentum = momentum
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._collected: list[Any] = [None] * len(layers)
        self._average: list[Stats | None] = [None] * len(layers)

    def target(self, index: int) -> Stats:
        raise NotImplementedError

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            self._collected[index] = self.scope.collect(inputs[0], self.target(index)[0])

        return hook

    def __enter__(self) -> "StatisticLoss":
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._collected = [None] * len(self.layers)
        self.reset()

    def reset(self) -> None:
        """Forget the moving averages: the next step starts a new batch of images."""
        self._average = [None] * len(self.layers)

    def select(self, step: int) -> int:
        return 0

    def targets(self) -> list[Stats]:
        return [self.target(i) for i in range(len(self.layers))]

    def batch_stats(self, targets: list[Stats] | None = None) -> list[Stats]:
        """Each layer's (mean, biased var) over the scope's batch of the last forward; resets for the next one.
        In a global scope this is a collective (every worker calls it once per step)."""
        stats = self.scope.combine([mean for mean, _var in targets or self.targets()], self._collected)
        self._collected = [None] * len(self.layers)
        return stats

    def _smoothed(self, index: int, mean: torch.Tensor, var: torch.Tensor) -> Stats:
        if not self.momentum:
            return mean, var
        current = (mean.detach(), var.detach())
        average = self._average[index]
        if average is not None:
            current = tuple(self.momentum * a + (1 - self.momentum) * c for a, c in zip(average, current))
        self._average[index] = current
        return current[0] + mean - mean.detach(), current[1] + var - var.detach()

    def layer_losses(self) -> list[torch.Tensor]:
        """Per-layer losses of the last forward pass (float32 scalars)."""
        losses = []
        targets = self.targets()
        for i, ((mean, var), (target_mean, target_var)) in enumerate(zip(self.batch_stats(targets), targets)):
            mean, var = self._smoothed(i, mean, var)
            losses.append((torch.linalg.vector_norm(mean - target_mean, 2)
                           + torch.linalg.vector_norm(var - target_var, 2)).float())
        return losses

    def loss(self) -> torch.Tensor:
        """Weighted sum over layers of the last forward pass."""
        return sum(w * l for w, l in zip(self.weights, self.layer_losses()))  # type: ignore[return-value]
