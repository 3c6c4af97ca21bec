"""The published SRe2L recover loop (arXiv 2306.13092, as its reference code runs it): the speed
yardstick of bench/recover_speed.py and bench/gpu_check.py.

One RandomResizedCrop + flip for the whole batch, one roll, BN variance by permute-and-copy, fp32,
eager, a loss.item() per step. It imports neither pydantic nor api_schema: `spec` is anything with a
RecoverSpec's attributes (lr, iterations, r_bn, first_bn_multiplier, augment.crop_scale).
"""

from __future__ import annotations

import math
import random
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from scdd.recover.bn_loss import bn_layers


class PublishedBNHook:
    """The reference hook: mean over (0, 2, 3), variance of a permuted contiguous copy."""

    def __init__(self, module: nn.BatchNorm2d):
        self.handle = module.register_forward_hook(self.hook)
        self.r_feature = None

    def hook(self, module, inputs, _output):
        x = inputs[0]
        channels = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().reshape([channels, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)


def yardstick(teacher, targets, spec, bounds, image_shape: tuple[int, int, int], jitter: int, seed: int):
    """Run the published loop on `teacher`'s device for `spec.iterations` steps from seeded noise of
    `image_shape` (C, S, S); returns (seconds, final images on that device)."""
    teacher = teacher.to(memory_format=torch.contiguous_format)
    device = next(teacher.parameters()).device
    hooks = [PublishedBNHook(m) for m in bn_layers(teacher)]
    random.seed(seed)
    torch.manual_seed(seed)
    channels, size, _ = image_shape
    noise = torch.randn((len(targets), channels, size, size), generator=torch.Generator().manual_seed(seed))
    inputs = noise.to(device).requires_grad_(True)
    targets = targets.to(device)
    optimizer = torch.optim.Adam([inputs], lr=spec.lr, betas=[0.5, 0.9], eps=1e-8)
    rescale = [spec.first_bn_multiplier] + [1.0] * (len(hooks) - 1)
    low, high = (b.to(device) for b in bounds)
    started = time.perf_counter()
    for iteration in range(spec.iterations):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * (1 + math.cos(math.pi * iteration / spec.iterations)) * spec.lr
        aug = transforms.Compose([transforms.RandomResizedCrop(size, scale=spec.augment.crop_scale), transforms.RandomHorizontalFlip()])
        inputs_jit = aug(inputs)
        off1, off2 = random.randint(0, jitter), random.randint(0, jitter)
        inputs_jit = torch.roll(inputs_jit, shifts=(off1, off2), dims=(2, 3))
        optimizer.zero_grad()
        outputs = teacher(inputs_jit)
        loss_ce = F.cross_entropy(outputs, targets)
        loss_bn = sum(h.r_feature * rescale[i] for i, h in enumerate(hooks))
        loss = loss_ce + spec.r_bn * loss_bn
        loss.item()  # the published loop reads the loss every step
        loss.backward()
        optimizer.step()
        inputs.data = torch.max(torch.min(inputs.data, high), low)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    for h in hooks:
        h.handle.remove()
    return seconds, inputs.detach()
