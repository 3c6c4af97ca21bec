"""DD-Ranking scores of a distilled set (Li et al., "DD-Ranking", arXiv 2505.13300).

IOR  (improvement over random): the set's top-1 minus a random real subset's of the same size, under the
     identical protocol and teacher.
HLR  (hard-label recovery): full-data hard-label top-1 minus the set's hard-label top-1 (how far hard
     labels on the set fall short of the whole training split).
LRS  (label-robust score): (e^a - e^-1) / (e - e^-1) with a = w IOR - (1 - w) HLR, accuracies as
     fractions, w = 0.5: 1 for a set 100 points above random with no hard-label gap, e^-1-normalised.
Here IOR and HLR are in points (percent), as every other top-1 in the report.
"""

from __future__ import annotations

import math

DEFAULT_WEIGHT = 0.5


def ior(set_top1: float, random_top1: float) -> float:
    return round(set_top1 - random_top1, 2)


def hlr(full_data_hard_top1: float, set_hard_top1: float) -> float:
    return round(full_data_hard_top1 - set_hard_top1, 2)


def lrs(ior_points: float, hlr_points: float, weight: float = DEFAULT_WEIGHT) -> float:
    alpha = weight * ior_points / 100 - (1 - weight) * hlr_points / 100
    return (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))
