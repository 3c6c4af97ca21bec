"""Linear probe on a frozen backbone (SC-DD squeeze, step 2).

The backbone stays in eval mode throughout, so its BatchNorm running statistics remain exactly
those of the self-supervised model: they are what recovery matches. Features are computed once:
of the clean training images and of `augmented_views` random-resized-crop + flip views of each
(the supervised teacher's training augmentation), so the probe, like a supervised teacher, is
robust to the crops recover applies. The probe is trained on standardised features and the
standardisation is folded into its weights (W' = W / s, b' = b - W' m), so backbone + probe is a
plain registry model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from api_schema import ProbeSpec
from scdd import augment
from scdd.data import RealData, iterate_batches
from scdd.evaluate import Accuracy, count_correct
from scdd.optim import build_optimizer, cosine_schedule, training_step
from scdd.progress import Progress
from scdd.runtime import Runtime
from scdd.squeeze.supervised import TRAIN_CROP_SCALE


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    runtime: Runtime,
    generator: torch.Generator | None = None,
    batch_size: int = 500,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float32 features on the CPU and (N,) labels; the backbone is put in eval mode. With a
    generator, each image is first given a random crop and flip (the supervised training augmentation)."""
    backbone.eval()
    feats, labels = [], []
    for images, batch_labels in iterate_batches(dataset, batch_size):
        if generator is not None:
            images = augment.crop_flip(images, TRAIN_CROP_SCALE, generator)
        with runtime.autocast():
            out = backbone(images.to(runtime.device, memory_format=runtime.memory_format()))
        feats.append(out.float().cpu())
        labels.append(batch_labels)
    return torch.cat(feats), torch.cat(labels)


@dataclass(frozen=True)
class ProbeResult:
    head: nn.Linear  # acts on raw backbone features
    accuracy: Accuracy  # on the real test split


def train_probe(
    backbone: nn.Module, data: RealData, spec: ProbeSpec, runtime: Runtime, seed: int, progress: Progress
) -> ProbeResult:
    generator = torch.Generator().manual_seed(seed)
    views = [extract_features(backbone, data.train, runtime)]
    views += [extract_features(backbone, data.train, runtime, generator) for _ in range(spec.augmented_views)]
    train_x, train_y = torch.cat([x for x, _ in views]), torch.cat([y for _, y in views])
    test_x, test_y = extract_features(backbone, data.test, runtime)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_z = (train_x - mean) / std
    linear = nn.Linear(train_x.shape[1], data.info.num_classes)
    optimizer = build_optimizer("adamw", linear.parameters(), spec.lr, spec.weight_decay)
    steps_per_epoch = math.ceil(len(train_z) / spec.batch_size)
    scheduler = cosine_schedule(optimizer, spec.epochs * steps_per_epoch)
    progress.start("probe", spec.epochs, "epoch")
    for _epoch in range(spec.epochs):
        order = torch.randperm(len(train_z), generator=generator)
        for start in range(0, len(order), spec.batch_size):
            index = order[start : start + spec.batch_size]
            loss = F.cross_entropy(linear(train_z[index]), train_y[index])
            training_step(loss, optimizer, scheduler)
        progress.advance(1, loss=loss.detach())
    progress.finish()

    folded = nn.Linear(train_x.shape[1], data.info.num_classes)
    with torch.no_grad():
        folded.weight.copy_(linear.weight / std)
        folded.bias.copy_(linear.bias - folded.weight @ mean)
        c1, c5 = count_correct(folded(test_x), test_y)
    total = len(test_y)
    return ProbeResult(folded, Accuracy(100.0 * c1 / total, 100.0 * c5 / total, c1, c5, total))
