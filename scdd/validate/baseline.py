"""The honest baseline: a random real subset with the same number of images per class.

Only labels are read to draw it; pixels are decoded for the samples a caller (a rank) trains on, as uint8.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset

from scdd.data.base import PixelSet, TensorImageDataset, class_members
from scdd.errors import DataError
from scdd.shard import Shard


def labels_of(dataset: Dataset) -> torch.Tensor:
    """The split's labels (N,), from its index: no image is read."""
    return dataset.labels  # TensorImageDataset and ImageFileDataset


def draw_class(members: torch.Tensor, label: int, count: int, needed: int, generator: torch.Generator,
               too_few: Callable[[int, int], str]) -> torch.Tensor:
    """`count` of class `label`'s sample indices `members` drawn at random (all when it has fewer); a class with
    fewer than `needed` raises DataError(too_few(label, members))."""
    if len(members) < needed:
        raise DataError(too_few(label, len(members)))
    return members[torch.randperm(len(members), generator=generator)[:count]]


def draw_per_class(labels: torch.Tensor, num_classes: int, count: int, needed: int, generator: torch.Generator,
                   too_few: Callable[[int, int], str]) -> list[torch.Tensor]:
    """`draw_class` for every class in order, with one generator."""
    members = class_members(labels, num_classes)
    return [draw_class(members[label], label, count, needed, generator, too_few) for label in range(num_classes)]


def images_at(dataset: Dataset, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((n, C, S, S) normalised images, labels) of the samples at `index` (a batch's worth)."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.batch(index)
    pairs = [dataset[int(i)] for i in index]
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])


def pixels_at(dataset: Dataset, index: torch.Tensor, total: int | None = None, workers: int = 0) -> PixelSet:
    """The samples at `index` as a PixelSet (uint8), decoded in `workers` DataLoader workers for file datasets."""
    from scdd.data.loader import load_pixels

    pixels, labels = load_pixels(dataset, index, workers=workers)
    return PixelSet(pixels, labels, dataset.mean, dataset.std, total)


def shard_of(index: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    """The positions of `index` that `shard` holds (every world_size-th from its rank); all without a shard."""
    return index if shard is None else index[shard.rank::shard.world_size]


def random_real_indices(dataset: Dataset, ipc: int, num_classes: int, seed: int) -> torch.Tensor:
    """Training-split indices of exactly `ipc` images of each class, drawn with `seed`, class by class (K*ipc,)."""
    chosen = draw_per_class(
        labels_of(dataset), num_classes, ipc, ipc, torch.Generator().manual_seed(seed),
        lambda label, have: f"class {label} has {have} training images, fewer than IPC {ipc}: the random-real baseline "
        f"needs IPC real images per class; raise dataset.train_limit or set validate.baseline: false",
    )
    return torch.cat(chosen)


def random_real_subset(dataset: Dataset, ipc: int, num_classes: int, seed: int, shard: Shard | None = None,
                       workers: int = 0) -> PixelSet:
    """The random real subset (`random_real_indices`), or `shard`'s part of it: only those pixels are decoded."""
    index = random_real_indices(dataset, ipc, num_classes, seed)
    return pixels_at(dataset, shard_of(index, shard), len(index) if shard is not None else None, workers)


def whole_split_supported(dataset: Dataset) -> None:
    """DataError unless `whole_split` can hold the split (checked in the driver before any worker starts)."""
    if not isinstance(dataset, TensorImageDataset):
        raise DataError(
            "the full-data hard-label run of validate.dd_ranking holds the whole training split in memory and is "
            "supported for in-memory datasets (fashion-mnist); for others set validate.full_data_top1"
        )


def whole_split(dataset: Dataset, shard: Shard | None = None) -> PixelSet:
    """Every image of an in-memory split, or `shard`'s part (the full-data run of DD-Ranking)."""
    whole_split_supported(dataset)
    index = torch.arange(len(dataset))
    return pixels_at(dataset, shard_of(index, shard), len(index) if shard is not None else None)
