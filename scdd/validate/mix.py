"""CutMix (Yun et al. arXiv 1905.04899) and MixUp (Zhang et al. arXiv 1710.09412) on a batch.

Both pair image i with image perm[i] and return the mixed batch with lam, the fraction of each
image that is its own (for CutMix, the exact area fraction of the pasted box).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


def _beta(alpha: float, generator: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw, seeded through the torch generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return random.Random(seed).betavariate(alpha, alpha)


@dataclass(frozen=True)
class MixDraw:
    """A batch's mix as parameters that can be stored and replayed (scdd/validate/soft_labels.py)."""

    kind: str  # none, cutmix, mixup (none also where the batch has fewer than 2 images)
    lam: float  # the weight of each image's own label: the Beta draw (mixup), the kept area fraction (cutmix)
    perm: torch.Tensor  # (n,) int64: image i is mixed with image perm[i]
    box: tuple[int, int, int, int]  # cutmix: (y0, y1, x0, x1) of the pasted box; (0, 0, 0, 0) otherwise


def draw_mix(n: int, height: int, width: int, kind: str, alpha: float, generator: torch.Generator) -> MixDraw:
    """The draws of a batch of n (height x width) images for `kind` in none, cutmix, mixup."""
    perm = torch.randperm(n, generator=generator)
    if kind == "none" or n < 2:
        return MixDraw("none", 1.0, perm, (0, 0, 0, 0))
    lam = _beta(alpha, generator)
    if kind == "mixup":
        return MixDraw("mixup", lam, perm, (0, 0, 0, 0))
    if kind == "cutmix":
        cut = math.sqrt(1 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = (int(v) for v in torch.randint(0, 10**9, (2,), generator=generator))
        cy, cx = cy % height, cx % width
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        return MixDraw("cutmix", 1 - (y1 - y0) * (x1 - x0) / (height * width), perm, (y0, y1, x0, x1))
    raise ValueError(f"unknown mix {kind!r}")


def apply_mix(images: torch.Tensor, mix: MixDraw) -> torch.Tensor:
    """The batch mixed as `mix` says."""
    if mix.kind == "none":
        return images
    perm = mix.perm.to(images.device)
    if mix.kind == "mixup":
        return mix.lam * images + (1 - mix.lam) * images[perm]
    y0, y1, x0, x1 = mix.box
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
    return mixed


def mix_batch(
    images: torch.Tensor, kind: str, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mixed images, perm, lam) for `kind` in none, cutmix, mixup."""
    draw = draw_mix(len(images), images.shape[-2], images.shape[-1], kind, alpha, generator)
    return apply_mix(images, draw), draw.perm.to(images.device), draw.lam
