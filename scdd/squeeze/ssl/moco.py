"""MoCo v2 (He et al. arXiv 1911.05722; Chen et al. arXiv 2003.04297).

Two augmented views of each image: the query encoder (backbone + 2-layer MLP projection) encodes
one, a momentum encoder (an EMA copy, never updated by gradients) the other. InfoNCE over the
positive key and a queue of negatives:

    loss = CE([q.k+, q.queue] / T, 0)   with q, k L2-normalised, (N, 1 + K) logits

Shuffle-BN: MoCo splits each batch over GPUs and shuffles the keys across them so a query and its
key never share BatchNorm statistics. In one process the same is done with `bn_groups`
sub-batches: queries in contiguous groups, keys in groups of a random permutation.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from api_schema import SSLSpec
from scdd import augment
from scdd.data import RealData, iterate_batches
from scdd.optim import build_optimizer, training_step
from scdd.progress import Progress
from scdd.runtime import Runtime
from scdd.shard import LOCAL, Shard, TrainHooks
from scdd.squeeze.ssl.registry import register_ssl

VIEW_CROP_SCALE = (0.2, 1.0)  # MoCo v2's CIFAR-size crops
JITTER_STRENGTH, JITTER_PROBABILITY = 0.4, 0.8


def projection_head(feature_dim: int, out_dim: int) -> nn.Module:
    hidden = min(2048, feature_dim)
    return nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class MoCo(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, spec: SSLSpec):
        super().__init__()
        self.spec = spec
        self.encoder_q = nn.Sequential(backbone, projection_head(feature_dim, spec.proj_dim))
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(spec.proj_dim, spec.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q[0]

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.spec.momentum
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            k.mul_(m).add_(q.detach(), alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        size = self.queue.shape[1]
        index = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[:, index] = keys.T.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    def _encode_in_groups(self, encoder: nn.Module, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        groups = min(self.spec.bn_groups, len(x))
        parts = [encoder(x[chunk]) for chunk in order.chunk(groups)]
        out = torch.empty(len(x), parts[0].shape[1], dtype=parts[0].dtype, device=x.device)
        out[order] = torch.cat(parts)
        return out

    def forward(self, view_q: torch.Tensor, view_k: torch.Tensor, generator: torch.Generator,
                encoder_q: nn.Module | None = None, shard: Shard | None = None) -> torch.Tensor:
        """InfoNCE loss of a batch of view pairs, each (N, C, S, S); updates the key encoder and queue.

        Data-parallel: `encoder_q` is the DDP-wrapped query encoder, and the keys of every rank's
        batch enter the queue (all-gathered), as in MoCo's multi-GPU code."""
        n = len(view_q)
        encoder_q = encoder_q or self.encoder_q
        q = F.normalize(self._encode_in_groups(encoder_q, view_q, torch.arange(n, device=view_q.device)), dim=1)
        with torch.no_grad():
            self.momentum_update()
            shuffle = torch.randperm(n, generator=generator).to(view_k.device)
            k = F.normalize(self._encode_in_groups(self.encoder_k, view_k, shuffle), dim=1)
        positives = (q * k).sum(dim=1, keepdim=True)
        negatives = q @ self.queue.clone().detach().to(q.dtype)
        logits = torch.cat([positives, negatives], dim=1).float() / self.spec.temperature
        loss = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=q.device))
        self.enqueue(k if shard is None else shard.gather(k))
        return loss


def make_view(images: torch.Tensor, data: RealData, generator: torch.Generator) -> torch.Tensor:
    """One random view of a normalised batch: crop, flip, colour jitter (per image)."""
    info = data.info
    pixels = info.denormalize(augment.crop_flip(images, VIEW_CROP_SCALE, generator))
    return info.normalize(augment.color_jitter(pixels, JITTER_STRENGTH, JITTER_PROBABILITY, generator))


@register_ssl("moco_v2")
def pretrain_moco_v2(
    backbone: nn.Module, feature_dim: int, data: RealData, spec: SSLSpec, runtime: Runtime, seed: int, progress: Progress,
    hooks: TrainHooks = LOCAL,
) -> dict:
    """Pretrain `backbone` in place; data-parallel and resumable through `hooks` (scdd/shard.py)."""
    device, fmt = runtime.device, runtime.memory_format()
    moco = MoCo(backbone, feature_dim, spec).to(device, memory_format=fmt).train()
    encoder_q = hooks.wrap(moco.encoder_q)
    optimizer = build_optimizer("sgd", moco.encoder_q.parameters(), spec.lr, spec.weight_decay)
    batch_size, steps_per_epoch, scheduler = hooks.schedule(optimizer, len(data.train), spec.batch_size, spec.epochs)
    generator = torch.Generator().manual_seed(seed)
    stateful = (moco, optimizer, scheduler, generator)
    first_epoch = hooks.begin(progress, "ssl", spec.epochs, steps_per_epoch, *stateful)
    epoch_losses = [round(loss, 4) for loss in hooks.losses]  # epochs before a resume
    for epoch in range(first_epoch, spec.epochs):
        total, steps = torch.zeros((), device=device), 0
        order = hooks.epoch_order(len(data.train), epoch, generator, seed)
        for images, _labels in iterate_batches(data.train, batch_size, indices=order):
            if len(images) < 2:
                continue  # InfoNCE needs a batch (ranks' parts are equally long, so all skip together)
            images = images.to(device, memory_format=fmt)
            view_q, view_k = make_view(images, data, generator), make_view(images, data, generator)
            with runtime.autocast():
                loss = moco(view_q, view_k, generator, encoder_q, hooks.shard)
            training_step(loss, optimizer, scheduler)
            total, steps = total + loss.detach(), steps + 1
            progress.advance(1, loss=loss.detach())
        epoch_losses.append(round(float(total) / max(1, steps), 4))
        hooks.end_epoch(epoch, epoch_losses[-1], *stateful)
    progress.finish()
    return {"method": "moco_v2", "epochs": spec.epochs, "epoch_losses": epoch_losses}
