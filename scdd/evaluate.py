"""Top-1 / top-5 accuracy on a whole split, model in eval mode (no running maximum over batches)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from scdd.data.loader import iterate_batches
from scdd.runtime import Runtime
from scdd.shard import Shard


@dataclass(frozen=True)
class Accuracy:
    top1: float  # percent
    top5: float
    correct1: int
    correct5: int
    total: int

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "total": self.total}

    def counts(self) -> tuple[int, int, int]:
        return self.correct1, self.correct5, self.total

    @staticmethod
    def combine(parts: Sequence[Sequence[int]]) -> "Accuracy":
        """The accuracy over disjoint shards from their (top-1 hits, top-k hits, samples)."""
        correct1, correct5, total = (sum(int(p[i]) for p in parts) for i in range(3))
        return Accuracy(100.0 * correct1 / max(1, total), 100.0 * correct5 / max(1, total), correct1, correct5, total)


@torch.no_grad()
def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(top-1 hits, top-k hits) with k = min(5, classes)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, runtime: Runtime, batch_size: int = 500, shard: Shard | None = None,
             indices: Sequence[int] | None = None, workers: int = 0) -> Accuracy:
    """Accuracy on the whole split. With `shard`, this rank counts its samples (every world_size-th)
    and the counts are summed over the process group, so every rank returns the whole split's
    accuracy with each sample counted once, equal to the single-process value. With `indices` (and no
    shard): the counts of those samples only (a pass over one shard, combined by `Accuracy.combine`). `workers`:
    DataLoader processes decoding a file dataset (`scdd.data.loader.decode_workers`; 0: in this process)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.long)  # top-1 hits, top-k hits, samples
    if shard is not None:
        indices = shard.indices(len(dataset))
    for images, labels in iterate_batches(dataset, batch_size, workers=workers, indices=indices):
        images = images.to(runtime.device, memory_format=runtime.memory_format())
        with runtime.autocast():
            logits = model(images)
        c1, c5 = count_correct(logits.float().cpu(), labels)
        counts += torch.tensor([c1, c5, len(labels)])
    if shard is not None:
        counts = shard.sum(counts.to(runtime.device)).cpu()
    model.train(was_training)
    return Accuracy.combine([counts.tolist()])
