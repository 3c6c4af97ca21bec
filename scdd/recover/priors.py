"""Optional image priors of DeepInversion (arXiv 1912.08795), on normalised images (N, C, H, W)."""

import torch


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of vertically and horizontally adjacent pixels (a scalar)."""
    dy = images[:, :, 1:, :] - images[:, :, :-1, :]
    dx = images[:, :, :, 1:] - images[:, :, :, :-1]
    return dy.pow(2).mean() + dx.pow(2).mean()


def l2_norm(images: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each image's L2 norm (a scalar)."""
    return torch.linalg.vector_norm(images.flatten(1), 2, dim=1).mean()
