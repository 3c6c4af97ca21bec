"""Random-resized-crop, horizontal flip and roll of a batch, in one differentiable op.

By default every image in the batch gets its own crop box, flip and roll (`per="image"`); `per="batch"`
draws one box, one flip and one roll and gives them to every image, as the SRe2L / SC-DD reference
scripts do (torchvision's RandomResizedCrop and RandomHorizontalFlip applied to the batch tensor, then
one `torch.roll`). All three are folded into one sampling grid, so the batch is resampled by a single
`grid_sample` call (bilinear, align_corners=False) and gradients flow back to the pixels.

The order is the reference's: crop (resized back to the image size), then flip, then roll. Rolls are
drawn in -jitter..jitter (`jitter_direction="both"`) or 0..jitter (`"forward"`, the reference's
`random.randint(0, jitter)`), a positive roll shifting content right / down as `torch.roll` does.

Crop boxes follow torchvision's RandomResizedCrop: up to 10 tries of area fraction ~ U(scale) and
log aspect ratio ~ U(log ratio), the first box that fits is used, otherwise the whole image
clipped to the ratio bounds. Boxes are continuous rather than rounded to whole pixels (the reference's
are whole pixels, resized with antialiasing). A transform that is off (crop, flip false; jitter 0)
draws nothing from the generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    """The draws of a batch, all (N,) tensors: crop box in pixels, flip flags and roll offsets (per image, or one
    draw repeated N times)."""

    x0: torch.Tensor
    y0: torch.Tensor
    w: torch.Tensor
    h: torch.Tensor
    flip: torch.Tensor
    roll_x: torch.Tensor
    roll_y: torch.Tensor


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    tries: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, y0, w, h) per image, each (n,), in pixel units of a (height, width) image."""
    area = height * width
    target = area * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    w = (target * aspect).sqrt()
    h = (target / aspect).sqrt()
    fits = (w <= width) & (h <= height)
    first = fits.float().argmax(dim=1)  # index of the first fitting try (0 when none fits)
    any_fit = fits.any(dim=1)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    # Fallback as torchvision: the whole image, clipped to the aspect-ratio bounds, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), width / ratio[0]
    elif in_ratio > ratio[1]:
        fw, fh = height * ratio[1], float(height)
    else:
        fw, fh = float(width), float(height)
    w = torch.where(any_fit, w, torch.full_like(w, fw))
    h = torch.where(any_fit, h, torch.full_like(h, fh))
    u = torch.rand(n, 2, generator=generator)
    x0 = torch.where(any_fit, u[:, 0] * (width - w), (width - w) / 2)
    y0 = torch.where(any_fit, u[:, 1] * (height - h), (height - h) / 2)
    return x0, y0, w, h


def sample_params(
    n: int,
    size: int,
    *,
    crop: bool,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: bool,
    jitter: int,
    generator: torch.Generator | None,
    per: str = "image",
    jitter_direction: str = "both",
) -> AugmentParams:
    """The draws for a batch of `n` (size x size) images. per "image": each image its own; "batch": one draw
    (crop box, flip, roll) repeated for every image. jitter_direction "both": rolls in -jitter..jitter; "forward":
    in 0..jitter. A transform that is off draws nothing, so turning one off leaves the others' draws as they were."""
    if per not in ("image", "batch"):
        raise ValueError(f"per must be 'image' or 'batch', not {per!r}")
    if jitter_direction not in ("both", "forward"):
        raise ValueError(f"jitter_direction must be 'both' or 'forward', not {jitter_direction!r}")
    draws = n if per == "image" else min(n, 1)
    if crop:
        x0, y0, w, h = sample_crop_boxes(draws, size, size, scale, ratio, generator)
    else:
        x0 = y0 = torch.zeros(draws)
        w = h = torch.full((draws,), float(size))
    flips = torch.rand(draws, generator=generator) < 0.5 if flip else torch.zeros(draws, dtype=torch.bool)
    if jitter > 0:
        low = -jitter if jitter_direction == "both" else 0
        rolls = torch.randint(low, jitter + 1, (2, draws), generator=generator)
    else:
        rolls = torch.zeros(2, draws, dtype=torch.long)
    params = AugmentParams(x0, y0, w, h, flips, rolls[0], rolls[1])
    if draws == n:
        return params
    return AugmentParams(*(v.expand(n).clone() for v in (params.x0, params.y0, params.w, params.h, params.flip,
                                                         params.roll_x, params.roll_y)))


def apply(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Resample (N, C, S, S) images: crop box -> resize to S -> flip -> roll (circular shift)."""
    n, _, height, width = images.shape
    device = images.device
    p = {k: v.to(device) for k, v in vars(params).items()}
    cols = torch.arange(width, device=device)
    rows = torch.arange(height, device=device)
    # Roll: output pixel j shows the pre-roll pixel (j - shift) mod S.
    src_cols = (cols[None, :] - p["roll_x"][:, None]) % width  # (N, W)
    src_rows = (rows[None, :] - p["roll_y"][:, None]) % height  # (N, H)
    fx = (src_cols.float() + 0.5) / width  # position inside the crop, 0..1
    fx = torch.where(p["flip"][:, None], 1 - fx, fx)
    fy = (src_rows.float() + 0.5) / height
    gx = 2 * (p["x0"][:, None] + fx * p["w"][:, None]) / width - 1  # (N, W) in [-1, 1]
    gy = 2 * (p["y0"][:, None] + fy * p["h"][:, None]) / height - 1  # (N, H)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (N, H, W, 2)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def crop_flip(images: torch.Tensor, scale: tuple[float, float], generator: torch.Generator | None) -> torch.Tensor:
    """Per-image random-resized-crop (area `scale`, aspect 3/4..4/3) and flip, no roll: the training
    augmentation of the squeeze, probe, self-supervised and student stages."""
    params = sample_params(
        len(images), images.shape[-1], crop=True, scale=scale, ratio=(3 / 4, 4 / 3),
        flip=True, jitter=0, generator=generator,
    )
    return apply(images, params)


def color_jitter(
    pixels: torch.Tensor, strength: float, probability: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Per-image brightness, contrast (and saturation for RGB) jitter of (N, C, H, W) pixels in [0, 1].

    Each factor is drawn from U(1 - strength, 1 + strength); an image is jittered with `probability`
    (as MoCo v2's RandomApply(ColorJitter, p=0.8)). Hue is left alone.
    """
    n, channels = pixels.shape[:2]
    device = pixels.device

    def factors() -> torch.Tensor:
        draw = torch.empty(n).uniform_(1 - strength, 1 + strength, generator=generator)
        return draw.to(device).view(n, 1, 1, 1)

    apply_to = (torch.rand(n, generator=generator) < probability).to(device).view(n, 1, 1, 1)
    out = pixels * factors()  # brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * factors() + mean  # contrast
    if channels == 3:
        grey = out.mean(dim=1, keepdim=True)
        out = (out - grey) * factors() + grey  # saturation
    return torch.where(apply_to, out.clamp(0, 1), pixels)
