"""Top-1 / top-5 accuracy on a whole split, model in eval mode (no running maximum over batches)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from scdd.data.loader import iterate_batches
from scdd.runtime import Runtime


@dataclass(frozen=True)
class Accuracy:
    top1: float  # percent
    top5: float
    correct1: int
    correct5: int
    total: int

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "total": self.total}


@torch.no_grad()
def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(top-1 hits, top-k hits) with k = min(5, classes)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, runtime: Runtime, batch_size: int = 500) -> Accuracy:
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    for images, labels in iterate_batches(dataset, batch_size):
        images = images.to(runtime.device, memory_format=runtime.memory_format())
        with runtime.autocast():
            logits = model(images)
        c1, c5 = count_correct(logits.float().cpu(), labels)
        correct1, correct5, total = correct1 + c1, correct5 + c5, total + len(labels)
    model.train(was_training)
    return Accuracy(100.0 * correct1 / max(1, total), 100.0 * correct5 / max(1, total), correct1, correct5, total)
