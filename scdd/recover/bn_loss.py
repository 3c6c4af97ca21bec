"""BatchNorm-statistic matching loss (SRe2L, arXiv 2306.13092, eq. 5; SC-DD, arXiv 2404.07976).

Forward hooks on every BatchNorm2d of the frozen teacher read the layer's input x (N, C, H, W)
and compare its batch statistics with the layer's running statistics:

    loss_l = || mean_{N,H,W}(x) - running_mean ||_2 + || var_{N,H,W}(x) - running_var ||_2

with the biased variance. The total is sum_l w_l * loss_l, w_0 = first_bn_multiplier, w_l = 1
otherwise. Statistics are computed in float32 at least, also under autocast. The hooks, the batch
scope (this process's batch or all workers') and the optional EMA smoothing of G-VBSM are the shared
machinery of stat_match.py.
"""

from __future__ import annotations

from torch import nn

from scdd.recover.scope import BatchScope, Stats
from scdd.recover.stat_match import StatisticLoss


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


class BNStatLoss(StatisticLoss):
    """Use as `with BNStatLoss(teacher, 10.0) as bn: teacher(x); loss = bn.loss()`. The hooks are
    removed on exit."""

    name = "batchnorm"

    def __init__(self, model: nn.Module, first_bn_multiplier: float = 10.0, scope: BatchScope | None = None,
                 momentum: float = 0.0):
        layers = bn_layers(model)
        if not layers:
            raise ValueError("the teacher has no BatchNorm2d layer: recovery needs BatchNorm statistics")
        super().__init__(layers, first_bn_multiplier, scope, momentum)

    def target(self, index: int) -> Stats:
        layer = self.layers[index]
        return layer.running_mean, layer.running_var
