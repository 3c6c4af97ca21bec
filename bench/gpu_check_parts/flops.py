"""FLOPs of one step, counted by torch's FlopCounterMode (2 FLOPs per multiply-add of convolutions and
matrix products, forward and backward; element-wise ops, BatchNorm and grid_sample are not counted).

A recover step is the teacher's forward plus the backward to the input only (the teacher is frozen:
no weight gradients), about 2 x its forward: ResNet-18 at 224 px counts 3.6 GFLOP forward (the
"1.8 GFLOPs" of torchvision's table are multiply-adds) and about 7.3 per image-iteration.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

COUNT_BATCH = 2  # images counted (more than one: a training-mode BatchNorm needs two values per channel)


def counted_flops(step: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def recover_flops_per_image(teacher: nn.Module, image_shape: tuple[int, int, int], device: torch.device) -> float:
    """Forward and input-gradient backward of the frozen `teacher`, per image."""
    x = torch.randn(COUNT_BATCH, *image_shape, device=device, requires_grad=True)
    return counted_flops(lambda: teacher(x).sum().backward()) / COUNT_BATCH


def kd_flops_per_image(student: nn.Module, teacher: nn.Module, image_shape: tuple[int, int, int],
                       device: torch.device) -> float:
    """Student forward and full backward (weight and input gradients) plus the teacher's forward, per image."""
    x = torch.randn(COUNT_BATCH, *image_shape, device=device)

    def step() -> None:
        with torch.no_grad():
            teacher(x)
        student(x).sum().backward()

    flops = counted_flops(step) / COUNT_BATCH
    student.zero_grad(set_to_none=True)
    return flops
