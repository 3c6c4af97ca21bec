"""Which batch a recover step's statistics and losses are over: this process's, or the global one.

A `BatchScope` is asked three things during a recover step:
- `collect(x, center)`, in each hooked layer's forward hook (x: the layer's input, center: the target
  mean of its channels): what this process contributes for that layer;
- `combine(centers, collected)`, after the forward: each layer's batch (mean, biased var) over the scope;
- `images(n)`, `replicated_scale` and `total(values)`: how to turn this process's share of a loss into
  its part of the scope's loss.

`LocalScope` is the single-process path (and `bn_sync: local`): statistics of this process's batch.

`GlobalScope` (`bn_sync: global`) gives every hooked layer (BatchNorm or convolution) the statistics of the union of all workers'
batches, like SyncBatchNorm. Each worker contributes per-channel sums and sums of squares and its
element count; one differentiable all-reduce per step combines every layer at once (one collective
instead of one per layer, and immune to hooks firing in a different order on different workers).

Gradients. Let L = CE_sum / N + r_bn * BN(global stats) be the loss of one process holding the
concatenated batch of N images. Worker w back-propagates

    L_w = CE_sum_w / N + (1 / W) * r_bn * BN(global stats)

The CE part of image i depends only on image i, so its gradient is right as it stands. BN(.) is
computed identically on every worker (it is replicated), and the all-reduce's backward sums the
gradient arriving at the global sums over all W workers: back-propagating BN on every worker would
multiply each input's gradient by W, hence the 1/W. Then dL_w/dx_i = dL/dx_i for every image i of
worker w, and sum_w L_w = L. tests/test_global_bn.py checks both against one process.

Precision. The sums are taken in float32 over values shifted by the layer's target mean (the BN running
mean, or a convolution input's real-data mean: the same constant on every worker, and close to the batch mean, so the sum of squares does not swamp the
variance), then all-reduced and combined in float64: var = S2/n - (S1/n)^2 loses no digits that
matter even for ImageNet-size global batches (counts up to 2^53 are exact).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

Stats = tuple[torch.Tensor, torch.Tensor]  # (mean (C,), biased var (C,))


class BatchScope(Protocol):
    replicated_scale: float  # multiplier of loss terms that every worker computes identically
    collective: bool  # whether every worker must take part in every step (also with no images)

    def collect(self, x: torch.Tensor, center: torch.Tensor) -> Any: ...

    def combine(self, centers: list[torch.Tensor], collected: list[Any]) -> list[Stats]: ...

    def images(self, n: int) -> int: ...

    def total(self, values: torch.Tensor) -> torch.Tensor: ...


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the workers: the backward sums the incoming gradients the same way
    (torch.distributed.nn.functional.all_reduce does this too, but is deprecated)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


def local_batch_stats(x: torch.Tensor) -> Stats:
    """Per-channel mean and biased variance of x (N, C, H, W) over N, H, W, in float32."""
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    return mean, var


class LocalScope:
    """Statistics and losses of this process's batch."""

    replicated_scale = 1.0
    collective = False

    def collect(self, x: torch.Tensor, center: torch.Tensor) -> Stats:
        return local_batch_stats(x)

    def combine(self, centers: list[torch.Tensor], collected: list[Any]) -> list[Stats]:
        if any(c is None for c in collected):
            raise RuntimeError("a statistic loss was asked for before a forward pass through every layer it hooks")
        return collected

    def images(self, n: int) -> int:
        return n

    def total(self, values: torch.Tensor) -> torch.Tensor:
        return values


class GlobalScope:
    """Statistics and losses of the union of all workers' batches in `group` (see the module doc).

    Every worker must make the same sequence of calls (one `images` per batch, one `combine` and one
    backward per step, one `total` per report), also a worker with no images: it contributes zeros.
    """

    collective = True

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.replicated_scale = 1.0 / self.world_size

    def collect(self, x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        shifted = x.float() - center.float().view(1, -1, 1, 1)
        sums = shifted.sum(dim=(0, 2, 3), dtype=torch.float32)
        squares = shifted.square().sum(dim=(0, 2, 3), dtype=torch.float32)
        count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float64, device=x.device)
        return torch.cat([sums.double(), squares.double(), count])

    def combine(self, centers: list[torch.Tensor], collected: list[Any]) -> list[Stats]:
        parts = [
            c if c is not None else self._nothing(center)
            for center, c in zip(centers, collected)
        ]
        total = all_reduce_sum(torch.cat(parts), self.group)
        stats = []
        for center, part in zip(centers, total.split([p.numel() for p in parts])):
            channels = center.numel()
            sums, squares, count = part[:channels], part[channels:2 * channels], part[2 * channels].clamp(min=1)
            shift_mean = sums / count
            var = squares / count - shift_mean.square()
            stats.append((center.double() + shift_mean, var))
        return stats

    @staticmethod
    def _nothing(center: torch.Tensor) -> torch.Tensor:
        # A worker with no images in this batch: zero sums and counts, and a leaf that takes part in
        # the backward all-reduce, which every worker must join.
        return torch.zeros(2 * center.numel() + 1, dtype=torch.float64, device=center.device, requires_grad=True)

    def images(self, n: int) -> int:
        count = torch.tensor([n], dtype=torch.float64, device=self._device())
        dist.all_reduce(count, group=self.group)
        return int(count.item())

    def total(self, values: torch.Tensor) -> torch.Tensor:
        values = values.detach().to(self._device(), torch.float64).clone()
        dist.all_reduce(values, group=self.group)
        return values

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def sync_bytes_per_step(model: nn.Module) -> int:
    """Bytes each worker all-reduces per recover step in a global scope when matching BN statistics: the
    float64 vector of (sums, sums of squares, count) of every BN layer, once forward and once backward."""
    values = sum(2 * layer.num_features + 1 for layer in model.modules() if isinstance(layer, nn.BatchNorm2d))
    return 2 * values * 8
