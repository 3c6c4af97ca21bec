"""The honest baseline: a random real subset with the same number of images per class."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset

from scdd.data.base import TensorImageDataset
from scdd.errors import DataError


def labels_of(dataset: Dataset) -> torch.Tensor:
    if isinstance(dataset, TensorImageDataset):
        return dataset.labels
    return torch.tensor([label for _path, label in dataset.samples])  # ImageFileDataset


def draw_per_class(labels: torch.Tensor, num_classes: int, count: int, needed: int, generator: torch.Generator,
                   too_few: Callable[[int, int], str]) -> list[torch.Tensor]:
    """Per class, `count` indices of `labels` drawn at random (all when the class has fewer); a class with
    fewer than `needed` raises DataError(too_few(label, members))."""
    picks = []
    for label in range(num_classes):
        members = (labels == label).nonzero().flatten()
        if len(members) < needed:
            raise DataError(too_few(label, len(members)))
        picks.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return picks


def images_at(dataset: Dataset, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((n, C, S, S) normalised images, labels) of the samples at `index`."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.batch(index)
    pairs = [dataset[int(i)] for i in index]
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])


def random_real_subset(dataset: Dataset, ipc: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly `ipc` images of each class, drawn with `seed`: ((K*ipc, C, S, S) images, labels)."""
    chosen = draw_per_class(
        labels_of(dataset), num_classes, ipc, ipc, torch.Generator().manual_seed(seed),
        lambda label, have: f"class {label} has {have} training images, fewer than IPC {ipc}: the random-real baseline "
        f"needs IPC real images per class; raise dataset.train_limit or set validate.baseline: false",
    )
    return images_at(dataset, torch.cat(chosen))


def whole_split(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of an in-memory split: ((N, C, S, S) images, labels) (the full-data run of DD-Ranking)."""
    if not isinstance(dataset, TensorImageDataset):
        raise DataError(
            "the full-data hard-label run of validate.dd_ranking holds the whole training split in memory and is "
            "supported for in-memory datasets (fashion-mnist); for others set validate.full_data_top1"
        )
    return dataset.batch(torch.arange(len(dataset)))
