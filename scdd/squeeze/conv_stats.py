"""Collect the real-data statistics of every convolution's input (G-VBSM's convolution statistics).

One pass over the real training images (clean, no augmentation; eval mode, so BatchNorm uses its
running statistics): per convolution, the per-channel mean and biased variance of its input over all
images and positions, accumulated in float64. These are the dataset's pooled statistics; G-VBSM's
code averages per-batch statistics of augmented batches instead (a batch of 64 has a slightly lower
variance than the pool).
"""

from __future__ import annotations

import torch
from torch import nn

from scdd.data import RealData, iterate_batches
from scdd.models.ensemble import ConvStatistics, conv_layers
from scdd.runtime import Runtime


@torch.no_grad()
def collect_conv_statistics(model: nn.Module, statistics: ConvStatistics, data: RealData, runtime: Runtime,
                            batch_size: int = 500) -> None:
    """Fill `statistics` (the targets of `model`'s ConvStatLoss) from `data.train`."""
    layers = conv_layers(model)
    sums: list[torch.Tensor | None] = [None] * len(layers)
    squares: list[torch.Tensor | None] = [None] * len(layers)
    counts = [0] * len(layers)

    def hook(index: int):
        def accumulate(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            x = inputs[0].double()
            s, q = x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))
            sums[index] = s if sums[index] is None else sums[index] + s
            squares[index] = q if squares[index] is None else squares[index] + q
            counts[index] += x.numel() // x.shape[1]

        return accumulate

    was_training = model.training
    model.eval()
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for images, _ in iterate_batches(data.train, batch_size):
            model(images.to(runtime.device, memory_format=runtime.memory_format()))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for i in range(len(layers)):
        mean = sums[i] / counts[i]
        var = (squares[i] / counts[i] - mean.square()).clamp(min=0)
        target_mean, target_var = statistics.target(i)
        target_mean.copy_(mean)
        target_var.copy_(var)
