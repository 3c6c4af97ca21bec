"""Convolution-statistic matching loss (G-VBSM, arXiv 2311.17950, "convolution-based statistics").

Forward hooks on every Conv2d of a frozen backbone read the convolution's input x (N, C_in, H, W) and
compare its per-channel batch statistics with those of real training data, collected once at squeeze
and stored with the backbone (scdd/models/ensemble.py `ConvStatistics`,
scdd/squeeze/conv_stats.py):

    loss_l = || mean_{N,H,W}(x) - mu_l ||_2 + || var_{N,H,W}(x) - sigma2_l ||_2

summed with w_0 = first_multiplier (the first convolution's input is the image itself) and 1
otherwise. The same scope and EMA machinery as the BatchNorm loss (stat_match.py). G-VBSM also
matches 4x4-patch statistics and drops each layer's term at random (its `drop_rate`); neither is
done here.
"""

from __future__ import annotations

from torch import nn

from scdd.models.ensemble import ConvStatistics, conv_layers
from scdd.recover.scope import BatchScope, Stats
from scdd.recover.stat_match import StatisticLoss


class ConvStatLoss(StatisticLoss):
    name = "convolution"

    def __init__(self, model: nn.Module, statistics: ConvStatistics, first_multiplier: float = 10.0,
                 scope: BatchScope | None = None, momentum: float = 0.0):
        layers = conv_layers(model)
        if len(layers) != statistics.count:
            raise ValueError(f"the backbone has {len(layers)} convolutions but its statistics describe {statistics.count}")
        if not layers:
            raise ValueError("the backbone has no Conv2d layer to match convolution statistics at")
        super().__init__(layers, first_multiplier, scope, momentum)
        self.statistics = statistics

    def target(self, index: int) -> Stats:
        return self.statistics.target(index)
