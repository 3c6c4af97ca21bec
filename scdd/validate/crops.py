"""The student's per-batch draws, as parameters that can be stored and replayed: the crop + flip of every image
(`protocol.crop`) and the batch's mix (CutMix / MixUp).

Two crops, both drawn per image:
resized  random-resized-crop of area `crop_scale`, aspect 3/4..4/3, then flip (`augment.crop_flip`'s draws;
         the box is continuous, resampled bilinearly by `augment.apply`).
padded   the CIFAR protocol: zero-pad by `padding` pixels, a random whole-pixel crop back to the image size, then
         flip (torchvision RandomCrop(S, padding=p) + RandomHorizontalFlip). "Zero" is a black pixel: padding
         happens before normalisation there, so here the pad value is the normalised black, -mean / std.
Either way a draw is a box (x0, y0, w, h) in pixels of the image (for padded: w = h = S and x0, y0 in -p..p,
outside the image is black) and a flip flag. Not differentiable (students need no gradient to their pixels).

The batch's mix is drawn and applied in the same two steps by `scdd.validate.mix` (`draw_mix`, `apply_mix`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scdd import augment

RATIO = (3 / 4, 4 / 3)  # the random-resized-crop's aspect range (augment.crop_flip's)


@dataclass(frozen=True)
class CropDraw:
    boxes: torch.Tensor  # (n, 4) float32: x0, y0, w, h in pixels of the image
    flip: torch.Tensor  # (n,) bool


def draw_crops(kind: str, n: int, size: int, scale: tuple[float, float], padding: int,
               generator: torch.Generator | None) -> CropDraw:
    """The crop boxes and flips of n images of size x size (`kind` resized or padded)."""
    if kind == "resized":
        p = augment.sample_params(n, size, crop=True, scale=scale, ratio=RATIO, flip=True, jitter=0,
                                  generator=generator)
        return CropDraw(torch.stack([p.x0, p.y0, p.w, p.h], dim=1).float(), p.flip)
    if kind == "padded":
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator) - padding
        flip = torch.rand(n, generator=generator) < 0.5
        side = torch.full((n, 2), float(size))
        return CropDraw(torch.cat([offsets.float(), side], dim=1), flip)
    raise ValueError(f"unknown student crop {kind!r}")


def apply_crops(kind: str, images: torch.Tensor, draw: CropDraw, fill: torch.Tensor | None = None) -> torch.Tensor:
    """(n, C, S, S) images cropped and flipped by `draw`. padded: `fill` (C,) is the value outside the image
    (None: 0)."""
    n = len(images)
    if kind == "resized":
        boxes = draw.boxes
        zeros = torch.zeros(n, dtype=torch.long)
        return augment.apply(images, augment.AugmentParams(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3],
                                                           draw.flip, zeros, zeros))
    if kind == "padded":
        return padded_crop(images, draw.boxes[:, :2].round().long(), draw.flip, fill)
    raise ValueError(f"unknown student crop {kind!r}")


def padded_crop(images: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor,
                fill: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's S x S window at (x0, y0) = offsets[i] (may reach outside the image by up to the padding;
    outside is `fill`, default 0), then flipped where `flip`."""
    n, channels, height, width = images.shape
    device = images.device
    pad = int(offsets.abs().max()) if n else 0
    padded = torch.zeros(n, channels, height + 2 * pad, width + 2 * pad, dtype=images.dtype, device=device)
    if fill is not None:
        padded += fill.to(device=device, dtype=images.dtype).view(1, -1, 1, 1)
    padded[:, :, pad : pad + height, pad : pad + width] = images
    offsets = offsets.to(device)
    rows = offsets[:, 1, None] + pad + torch.arange(height, device=device)  # (n, H)
    cols = offsets[:, 0, None] + pad + torch.arange(width, device=device)  # (n, W)
    cols = torch.where(flip.to(device)[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def black(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The normalised value of a black pixel per channel: what RandomCrop's zero padding becomes."""
    return -torch.tensor(mean) / torch.tensor(std)
