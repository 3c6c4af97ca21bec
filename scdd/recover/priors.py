"""Optional image priors of DeepInversion (arXiv 1912.08795), on normalised images (N, C, H, W).

Both return one value per image (N,), so a distributed batch can sum its shares."""

import torch


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Per image: mean squared difference of vertically plus of horizontally adjacent pixels."""
    dy = images[:, :, 1:, :] - images[:, :, :-1, :]
    dx = images[:, :, :, 1:] - images[:, :, :, :-1]
    return dy.pow(2).flatten(1).mean(1) + dx.pow(2).flatten(1).mean(1)


def l2_norm(images: torch.Tensor) -> torch.Tensor:
    """Per image: its L2 norm."""
    return torch.linalg.vector_norm(images.flatten(1), 2, dim=1)
