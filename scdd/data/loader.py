"""Batches from a split: a fast path for in-memory tensors, a DataLoader otherwise."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from scdd.data.base import TensorImageDataset


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images (B, C, S, S), labels (B,)) covering the dataset once."""
    if isinstance(dataset, TensorImageDataset):
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            yield dataset.batch(order[start : start + batch_size])
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers)
    for images, labels in loader:
        yield images, torch.as_tensor(labels)
