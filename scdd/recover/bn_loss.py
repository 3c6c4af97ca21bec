"""BatchNorm-statistic matching loss (SRe2L, arXiv 2306.13092, eq. 5; SC-DD, arXiv 2404.07976).

Forward hooks on every BatchNorm2d of the frozen teacher read the layer's input x (N, C, H, W)
and compare its batch statistics with the layer's running statistics:

    loss_l = || mean_{N,H,W}(x) - running_mean ||_2 + || var_{N,H,W}(x) - running_var ||_2

with the biased variance. The total is sum_l w_l * loss_l, w_0 = first_bn_multiplier, w_l = 1
otherwise. Statistics are computed in float32 at least, also under autocast.

Whose batch the statistics describe is the `BatchScope` (scope.py): this process's (one pass of
`torch.var_mean`), or the union of all workers' batches in a distributed recover.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scdd.recover.scope import BatchScope, LocalScope


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


class BNStatLoss:
    """Context manager that hooks the BN layers of `model`; `loss()` after each forward.

    Use as `with BNStatLoss(teacher, 10.0) as bn: teacher(x); loss = bn.loss()`. The hooks are
    removed on exit.
    """

    def __init__(self, model: nn.Module, first_bn_multiplier: float = 10.0, scope: BatchScope | None = None):
        self.layers = bn_layers(model)
        if not self.layers:
            raise ValueError("the teacher has no BatchNorm2d layer: recovery needs BatchNorm statistics")
        self.weights = [first_bn_multiplier] + [1.0] * (len(self.layers) - 1)
        self.scope = scope or LocalScope()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._collected: list[Any] = [None] * len(self.layers)

    def _hook(self, index: int):
        def hook(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            self._collected[index] = self.scope.collect(module, inputs[0])

        return hook

    def __enter__(self) -> "BNStatLoss":
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._collected = [None] * len(self.layers)

    def layer_losses(self) -> list[torch.Tensor]:
        """Per-layer losses of the last forward pass (float32 scalars); resets for the next one.

        In a global scope this is a collective: every worker calls it once per step, also a worker
        that ran no forward because it holds no images."""
        stats = self.scope.combine(self.layers, self._collected)
        self._collected = [None] * len(self.layers)
        return [
            (torch.linalg.vector_norm(mean - layer.running_mean, 2) + torch.linalg.vector_norm(var - layer.running_var, 2)).float()
            for layer, (mean, var) in zip(self.layers, stats)
        ]

    def loss(self) -> torch.Tensor:
        """Weighted sum over layers of the last forward pass; resets for the next one."""
        return sum(w * l for w, l in zip(self.weights, self.layer_losses()))  # type: ignore[return-value]
