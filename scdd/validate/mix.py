"""CutMix (Yun et al. arXiv 1905.04899) and MixUp (Zhang et al. arXiv 1710.09412) on a batch.

Both pair image i with image perm[i] and return the mixed batch with lam, the fraction of each
image that is its own (for CutMix, the exact area fraction of the pasted box).
"""

from __future__ import annotations

import math
import random

import torch


def _beta(alpha: float, generator: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw, seeded through the torch generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return random.Random(seed).betavariate(alpha, alpha)


def mix_batch(
    images: torch.Tensor, kind: str, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mixed images, perm, lam) for `kind` in none, cutmix, mixup."""
    n = len(images)
    perm = torch.randperm(n, generator=generator).to(images.device)
    if kind == "none" or n < 2:
        return images, perm, 1.0
    lam = _beta(alpha, generator)
    if kind == "mixup":
        return lam * images + (1 - lam) * images[perm], perm, lam
    if kind == "cutmix":
        height, width = images.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = (int(v) for v in torch.randint(0, 10**9, (2,), generator=generator))
        cy, cx = cy % height, cx % width
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        mixed = images.clone()
        mixed[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)
        return mixed, perm, lam
    raise ValueError(f"unknown mix {kind!r}")
