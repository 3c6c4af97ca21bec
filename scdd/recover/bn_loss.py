"""BatchNorm-statistic matching loss (SRe2L, arXiv 2306.13092, eq. 5; SC-DD, arXiv 2404.07976).

Forward hooks on every BatchNorm2d of the frozen teacher read the layer's input x (N, C, H, W)
and compare its batch statistics with the layer's running statistics:

    loss_l = || mean_{N,H,W}(x) - running_mean ||_2 + || var_{N,H,W}(x) - running_var ||_2

with the biased variance. The total is sum_l w_l * loss_l, w_0 = first_bn_multiplier, w_l = 1
otherwise. Statistics are computed in one pass (`torch.var_mean`) in float32, also under autocast.

How the batch statistics are computed is pluggable (`BatchStats`): per process here; the
distributed recover passes a function that all-reduces them across workers.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

BatchStats = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (mean (C,), biased var (C,))


def local_batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    return mean, var


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


class BNStatLoss:
    """Context manager that hooks the BN layers of `model`; `loss()` after each forward.

    Use as `with BNStatLoss(teacher, 10.0) as bn: teacher(x); loss = bn.loss()`. The hooks are
    removed on exit.
    """

    def __init__(self, model: nn.Module, first_bn_multiplier: float = 10.0, batch_stats: BatchStats = local_batch_stats):
        self.layers = bn_layers(model)
        if not self.layers:
            raise ValueError("the teacher has no BatchNorm2d layer: recovery needs BatchNorm statistics")
        self.weights = [first_bn_multiplier] + [1.0] * (len(self.layers) - 1)
        self.batch_stats = batch_stats
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._layer_losses: list[torch.Tensor | None] = [None] * len(self.layers)

    def _hook(self, index: int):
        def hook(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            mean, var = self.batch_stats(inputs[0])
            self._layer_losses[index] = torch.linalg.vector_norm(mean - module.running_mean, 2) + torch.linalg.vector_norm(
                var - module.running_var, 2
            )

        return hook

    def __enter__(self) -> "BNStatLoss":
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._layer_losses = [None] * len(self.layers)

    def layer_losses(self) -> list[torch.Tensor]:
        if any(loss is None for loss in self._layer_losses):
            raise RuntimeError("BNStatLoss.loss() called before a forward pass through every BatchNorm layer")
        return list(self._layer_losses)  # type: ignore[arg-type]

    def loss(self) -> torch.Tensor:
        """Weighted sum over layers of the last forward pass; resets for the next one."""
        losses = self.layer_losses()
        self._layer_losses = [None] * len(self.layers)
        return sum(w * l for w, l in zip(self.weights, losses))  # type: ignore[return-value]
