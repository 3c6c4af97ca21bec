"""Batches from a split: a fast path for in-memory tensors, a DataLoader otherwise."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from scdd.data.base import TensorImageDataset


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    workers: int = 0,
    indices: Sequence[int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images (B, C, S, S), labels (B,)) covering the dataset (or its `indices`) once."""
    if isinstance(dataset, TensorImageDataset):
        order = torch.arange(len(dataset)) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
        if shuffle:
            order = order[torch.randperm(len(order), generator=generator)]
        for start in range(0, len(order), batch_size):
            yield dataset.batch(order[start : start + batch_size])
        return
    if indices is not None:
        dataset = Subset(dataset, list(indices))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers)
    for images, labels in loader:
        yield images, torch.as_tensor(labels)
