"""Batches from a split: a fast path for in-memory tensors, a DataLoader otherwise.

Files are decoded in DataLoader worker processes (`workers`, sized by `decode_workers` from the threads the
process holds): torch's own worker pool, so a file dataset needs nothing but a picklable `pixel(i)`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from scdd.data.base import TensorImageDataset
from scdd.errors import ScddError

# Decoding processes per training/evaluating process at most: a JPEG decodes in a few ms, so 7 workers keep one
# GPU fed at 224 px, and each one is a forked process with its own memory.
MAX_DECODE_WORKERS = 7


def decode_workers(threads: int | None) -> int:
    """DataLoader workers for a process that holds `threads` CPU threads (`resources.threads`; None counts as 1):
    0 with one thread (decode in the process itself: tiny CPU jobs never fork), else one less than the threads
    (the process keeps one for itself), bounded by the CPUs this process may run on and by MAX_DECODE_WORKERS."""
    threads = threads or 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(threads, cpus, MAX_DECODE_WORKERS + 1) - 1)


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
    for images, labels in _batches(dataset, batch_size, workers, shuffle=shuffle, generator=generator):
        yield images, torch.as_tensor(labels)


class _Failed:
    """A user error (a corrupt file) raised while reading a sample, carried back as a value so the caller re-raises
    it as it is (DataLoader would re-raise a copy whose message holds the worker's traceback)."""

    def __init__(self, error: ScddError):
        self.error = error


class _Caught(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except ScddError as exc:
            return _Failed(exc)


def _collate(items: list):
    failed = next((item for item in items if isinstance(item, _Failed)), None)
    return failed if failed is not None else default_collate(items)


def _batches(dataset: Dataset, batch_size: int, workers: int, **options) -> Iterator:
    for batch in DataLoader(_Caught(dataset), batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                            **options):
        if isinstance(batch, _Failed):
            raise batch.error
        yield batch


class _Pixels(Dataset):
    """Sample `index[k]` of a file dataset as (uint8 (C, S, S) pixels, label)."""

    def __init__(self, dataset: Dataset, index: list[int]):
        self.dataset, self.index = dataset, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        i = self.index[k]
        return self.dataset.pixel(i), int(self.dataset.samples[i][1])


def load_pixels(dataset: Dataset, index: Sequence[int] | torch.Tensor, workers: int = 0,
                batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """((n, C, S, S) uint8 pixels, (n,) labels) of the samples at `index`, in its order. An in-memory dataset
    (`TensorImageDataset`) is indexed; a file dataset (one with `pixel(i)`, e.g. `ImageFileDataset`) is decoded
    by a DataLoader with `workers` worker processes (0: in this process; never more than there are batches of
    `batch_size`), written into one preallocated tensor. A corrupt file raises its CorruptImageError."""
    index = torch.as_tensor(index, dtype=torch.long).flatten()
    if isinstance(dataset, TensorImageDataset) or not hasattr(dataset, "pixel") or len(index) == 0:
        return dataset.pixels(index)
    batches = -(-len(index) // batch_size)
    pixels = labels = None
    start = 0
    for batch, batch_labels in _batches(_Pixels(dataset, index.tolist()), batch_size, min(workers, batches)):
        if pixels is None:
            pixels = torch.empty((len(index), *batch.shape[1:]), dtype=torch.uint8)
            labels = torch.empty(len(index), dtype=torch.long)
        pixels[start : start + len(batch)] = batch
        labels[start : start + len(batch)] = batch_labels
        start += len(batch)
    return pixels, labels
