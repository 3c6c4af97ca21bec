"""Optimise one batch of synthetic images against a frozen teacher (the SRe2L/SC-DD recover step).

Images start as Gaussian noise in normalised space and are optimised by Adam (betas 0.5, 0.9)
under a cosine learning rate without warm-up. Every step draws a fresh augmentation (per image, or
one shared by the batch: recover.augment.per; scdd/augment.py), computes CE(teacher(aug(x)), targets)
+ r_bn * statistic loss (+ priors), steps, and clips pixels to the valid normalised range. The last
iterate is returned. With an ensemble teacher each step runs one backbone, in rotation, with its own
statistics (objective.py).

In a distributed recover each worker holds a share of the batch (possibly none) and the BN
statistics are those of the whole batch; `recover_loss` splits the loss so that every worker's
gradients are those of the whole batch's loss (see scope.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from scdd import augment
from scdd.models.ensemble import Ensemble, members_of
from scdd.recover.objective import RecoverObjective
from scdd.recover.priors import l2_norm, total_variation
from scdd.runtime import Runtime, compiled

if TYPE_CHECKING:  # annotations only: the compute path imports without pydantic (bench/gpu_check.py)
    from api_schema import RecoverSpec


@dataclass(frozen=True)
class StepLoss:
    own: torch.Tensor  # what this process back-propagates
    ce_sum: torch.Tensor  # summed over this process's images
    prior_sum: torch.Tensor  # weighted priors, summed over this process's images
    bn: torch.Tensor  # statistic loss of the scope's batch (the same on every worker of a global scope)


def recover_loss(
    teacher: nn.Module,
    views: torch.Tensor,
    targets: torch.Tensor,
    inputs: torch.Tensor,
    spec: RecoverSpec,
    runtime: Runtime,
    objective: RecoverObjective,
    batch_images: int,
) -> StepLoss:
    """Loss of one recover step for this process's share of a batch of `batch_images` images.

    views (n, C, S, S): augmented `inputs` (n may be 0 on a worker with no images in this batch);
    targets (n,) class positions. The scope's whole-batch loss is
    CE_mean + r_bn * BN + tv_weight * TV_mean + l2_weight * L2_mean; this process's `own` part holds
    its images' CE and prior terms over `batch_images` and the BN term times the scope's
    `replicated_scale`, so the parts' gradients and their sum are those of the whole batch.
    """
    zero = torch.zeros((), device=inputs.device)
    ce_sum = prior_sum = zero
    if len(targets):
        with record_function("recover.forward"), runtime.autocast():  # the BN hooks gather their statistics here
            logits = teacher(views)
        ce_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        if spec.tv_weight:
            prior_sum = prior_sum + spec.tv_weight * total_variation(inputs).sum()
        if spec.l2_weight:
            prior_sum = prior_sum + spec.l2_weight * l2_norm(inputs).sum()
    with record_function("recover.bn_loss"):  # the statistics' distance (and their all-reduce across workers)
        bn = objective.loss()
    own = (ce_sum + prior_sum) / batch_images + objective.scope.replicated_scale * spec.r_bn * bn
    return StepLoss(own, ce_sum, prior_sum, bn)


@dataclass(frozen=True)
class SynthesisResult:
    images: torch.Tensor  # (N, C, S, S) normalised, on the CPU
    ce: float  # losses of the last step
    bn: float
    total: float


def cosine_lr(base_lr: float, step: int, total: int) -> float:
    """Cosine decay from base_lr at step 0 towards 0 at step `total`, no warm-up."""
    return 0.5 * (1 + math.cos(math.pi * step / total)) * base_lr


def jitter_pixels(spec: RecoverSpec, image_size: int) -> int:
    return spec.augment.jitter if spec.augment.jitter is not None else image_size // 8


def synthesize(
    teacher: nn.Module | Sequence[nn.Module],
    targets: torch.Tensor,
    spec: RecoverSpec,
    pixel_bounds: tuple[torch.Tensor, torch.Tensor],
    image_shape: tuple[int, int, int],
    runtime: Runtime,
    generator: torch.Generator,
    objective: RecoverObjective,
    on_step: Callable[[int], None] | None = None,
    start: torch.Tensor | None = None,
    augment_generator: torch.Generator | None = None,
) -> SynthesisResult:
    """`teacher` must be in eval mode with frozen parameters (see `prepare_teacher`; an ensemble's
    members: a sequence, one runner per backbone), `objective` an entered RecoverObjective (or a single
    StatisticLoss) hooked on it; `targets` (N,) are class positions (N may be 0 for a worker
    of a distributed batch). `start` (N, C, S, S), normalised: the initial images (real-pixel
    inits); None: Gaussian noise drawn from `generator`. Reported losses are those of the scope's
    whole batch (none when `spec.iterations` is 0: the images stay as they start). `augment_generator`: where the
    augmentation is drawn from (None: `generator`); a distributed recover with augment.per "batch" gives every
    worker of a batch the same one, so all its shares see the same crop, flip and roll."""
    device = runtime.device
    channels, size, _ = image_shape
    n = len(targets)
    low, high = (b.to(device) for b in pixel_bounds)
    initial = torch.randn((n, channels, size, size), generator=generator) if start is None else start.float()
    inputs = initial.to(device).contiguous(memory_format=runtime.memory_format()).requires_grad_(True)
    targets = targets.to(device)
    optimizer = torch.optim.Adam([inputs], lr=spec.lr, betas=(0.5, 0.9), eps=1e-8)
    aug = spec.augment
    jitter = jitter_pixels(spec, size)
    batch_images = objective.scope.images(n)
    runners = list(teacher) if isinstance(teacher, Sequence) else [teacher]
    objective.reset()
    loss = None
    for step in range(spec.iterations):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(spec.lr, step, spec.iterations)
        views = inputs
        if n:
            with record_function("recover.augment"):
                params = augment.sample_params(
                    n, size, crop=aug.crop, scale=aug.crop_scale, ratio=aug.crop_ratio, flip=aug.flip, jitter=jitter,
                    generator=generator if augment_generator is None else augment_generator,
                    per=aug.per, jitter_direction=aug.jitter_direction,
                )
                views = augment.apply(inputs, params)
        runner = runners[objective.select(step)]
        loss = recover_loss(runner, views, targets, inputs, spec, runtime, objective, batch_images)
        with record_function("recover.backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.own.backward()
        with record_function("recover.optimizer"):
            optimizer.step()
            with torch.no_grad():
                torch.maximum(torch.minimum(inputs, high), low, out=inputs)
        if on_step is not None:
            on_step(step)
    ce = bn = total = 0.0
    if loss is not None:
        sums = objective.scope.total(torch.stack([loss.ce_sum.detach(), loss.prior_sum.detach()])) / batch_images
        ce, bn = float(sums[0]), float(loss.bn.detach())
        total = ce + spec.r_bn * bn + float(sums[1])
    return SynthesisResult(inputs.detach().float().cpu().contiguous(), ce, bn, total)


def freeze(teacher: nn.Module, runtime: Runtime) -> nn.Module:
    """Eval mode, no parameter gradients, on the runtime's device and memory format."""
    teacher.eval().requires_grad_(False)
    return teacher.to(runtime.device, memory_format=runtime.memory_format())


def prepare_teacher(teacher: nn.Module, runtime: Runtime, image_iterations_per_unit: int) -> nn.Module | list[nn.Module]:
    """The frozen teacher as recover runs it: compiled where that pays (BN hooks stay on the
    original modules, which the compiled graph calls); an ensemble's members, one runner each."""
    teacher = freeze(teacher, runtime)
    members = members_of(teacher)
    runners = [compiled(m) if runtime.should_compile(image_iterations_per_unit // len(members)) else m for m in members]
    return runners if isinstance(teacher, Ensemble) else runners[0]
