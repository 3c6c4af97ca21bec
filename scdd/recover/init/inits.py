"""The registered initialisations (see scdd/recover/init/__init__.py for what each does)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scdd import augment
from scdd.data import RealData
from scdd.data.base import class_members
from scdd.models import head_path, members_of
from scdd.recover.init.plan import InitPlan, Origin, register_init
from scdd.runtime import Runtime
from scdd.validate.baseline import draw_class, images_at, labels_of

if TYPE_CHECKING:  # annotations only: the compute path imports without pydantic (bench/gpu_check.py)
    from api_schema import RecoverSpec

SCORE_BATCH = 512
CROP_RATIO = (3 / 4, 4 / 3)


def init_generator(seed: int, source_index: int) -> torch.Generator:
    """The generator of one class's initialisation: its draws depend on the seed and the class alone, so a class
    plans the same wherever it runs (in this process, or on whichever worker's slice holds it)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7 + 7_919 * (source_index + 1))


def class_candidates(data: RealData, members: list[torch.Tensor], label: int, count: int, needed: int,
                     generator: torch.Generator, what: str) -> torch.Tensor:
    """`count` training indices of class `label` drawn at random (all when it has fewer), at least `needed`;
    `members`: every class's training indices (`class_members`)."""
    return draw_class(
        members[label], label, count, needed, generator,
        lambda label, have: f"class {data.info.class_names[label]!r} has {have} training images, fewer than the "
        f"{needed} that {what} needs; lower recover.ipc or raise dataset.train_limit",
    )


def per_class(data: RealData, seed: int,
              labels: Sequence[int] | None) -> Iterator[tuple[int, torch.Generator, list[torch.Tensor]]]:
    """(label, its generator, every class's training indices) for each class to plan: `labels`, or all."""
    members = class_members(labels_of(data.train), data.info.num_classes)
    for label in range(data.info.num_classes) if labels is None else labels:
        yield label, init_generator(seed, data.info.source_indices[label]), members


def load_train(data: RealData, indices: torch.Tensor) -> torch.Tensor:
    """(n, C, S, S) normalised training images."""
    return images_at(data.train, indices)[0]


def origin(data: RealData, init: str, index: int, box: tuple[float, float, float, float], loss: float | None) -> Origin:
    train = data.train
    source = getattr(train, "source_index", None)
    samples = getattr(train, "samples", None)
    return Origin(init=init, train_index=index,
                  source_index=int(source[index]) if source is not None else None,
                  source_file=str(samples[index][0]) if samples is not None else None,
                  box=tuple(round(float(v), 3) for v in box), loss=None if loss is None else round(loss, 5))


def full_box(size: int) -> tuple[float, float, float, float]:
    return (0.0, 0.0, float(size), float(size))


def crop_views(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(n, C, S, S) images, (n, 4) boxes (x0, y0, w, h) -> each box resized to S x S (bilinear)."""
    n = len(images)
    params = augment.AugmentParams(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], torch.zeros(n, dtype=torch.bool),
                                   torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    return augment.apply(images, params)


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, images: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, K), features (n, D): the input of the classifier head), in batches, on the CPU. An ensemble's
    features are its members' (each L2-normalised, so every member counts alike) side by side."""
    members = members_of(teacher)
    captured: list[list[torch.Tensor]] = [[] for _ in members]
    handles = [
        member.get_submodule(head_path(member)).register_forward_hook(
            lambda _m, inputs, _out, into=into: into.append(inputs[0].detach().float().cpu().flatten(1)))
        for member, into in zip(members, captured)
    ]
    logits = []
    try:
        for start in range(0, len(images), SCORE_BATCH):
            batch = images[start:start + SCORE_BATCH].to(runtime.device, memory_format=runtime.memory_format())
            with runtime.autocast():
                logits.append(teacher(batch).float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    features = [torch.cat(parts) for parts in captured]
    if len(features) > 1:
        features = [F.normalize(f, dim=1) for f in features]
    return torch.cat(logits), torch.cat(features, dim=1)


def crop_losses(teacher: nn.Module, images: torch.Tensor, label: int, boxes: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """-log p(label | crop) under `teacher` for every (image, crop): images (n, C, S, S), boxes (n, m, 4) -> (n, m)."""
    n, m = boxes.shape[:2]
    views = crop_views(images.repeat_interleave(m, dim=0), boxes.reshape(n * m, 4))
    logits, _ = teacher_outputs(teacher, views, runtime)
    return F.cross_entropy(logits, torch.full((n * m,), label), reduction="none").view(n, m)


def rank_positions(losses: torch.Tensor, ipc: int, rank: str) -> torch.Tensor:
    """Positions of the `ipc` images kept from `losses` (n,): easy = the lowest losses; medium = the ipc
    losses around the median (the window of sorted positions centred on n // 2)."""
    order = losses.argsort(stable=True)
    if rank == "easy":
        return order[:ipc]
    start = min(max(len(order) // 2 - ipc // 2, 0), len(order) - ipc)
    return order[start:start + ipc]


def herding_positions(features: torch.Tensor, ipc: int) -> torch.Tensor:
    """Greedy herding (Welling 2009; Rebuffi et al. iCaRL 2017): features (n, D), L2-normalised here; the
    k-th pick minimises || mean - (sum of the picks so far + f_i) / k || over the images not yet picked."""
    f = F.normalize(features.double(), dim=1)
    mean = f.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(mean)
    available = torch.ones(len(f), dtype=torch.bool)
    for k in range(1, ipc + 1):
        distance = ((mean - (running + f) / k) ** 2).sum(1)
        distance[~available] = float("inf")
        pick = int(distance.argmin())
        chosen.append(pick)
        available[pick] = False
        running += f[pick]
    return torch.tensor(chosen)


def kmeans_positions(features: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 30) -> torch.Tensor:
    """k-means (k-means++ seeding, Lloyd steps) on L2-normalised features (n, D); the position of the image
    nearest each centroid (distinct images), in centroid order: a coverage coreset of the class's modes."""
    f = F.normalize(features.double(), dim=1)
    n = len(f)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [f[first]]
    for _ in range(1, k):
        d2 = torch.cdist(f, torch.stack(centres)).min(dim=1).values ** 2
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n, dtype=f.dtype)
        centres.append(f[int(torch.multinomial(probs.float(), 1, generator=generator))])
    c = torch.stack(centres)
    for _ in range(iterations):
        assign = torch.cdist(f, c).argmin(dim=1)
        for j in range(k):
            members = f[assign == j]
            if len(members):
                c[j] = members.mean(0)
    distance = torch.cdist(c, f)
    chosen: list[int] = []
    for j in range(k):
        row = distance[j].clone()
        row[chosen] = float("inf")
        chosen.append(int(row.argmin()))
    return torch.tensor(chosen)


register_init("noise")(None)


@register_init("real")
def real(data: RealData, teacher: nn.Module, spec: RecoverSpec, runtime: Runtime, seed: int,
         labels: Sequence[int] | None = None) -> InitPlan:
    """A seeded random training image of the class per synthetic image (whole image, no crop)."""
    size = data.info.image_size
    all_pixels, origins = [], []
    for label, generator, members in per_class(data, seed, labels):
        idx = class_candidates(data, members, label, spec.ipc, spec.ipc, generator, "init 'real'")
        all_pixels.append(data.info.denormalize(load_train(data, idx)))
        origins.append([origin(data, "real", int(i), full_box(size), None) for i in idx])
    return InitPlan(torch.stack(all_pixels), origins)


@register_init("selected")
def selected(data: RealData, teacher: nn.Module, spec: RecoverSpec, runtime: Runtime, seed: int,
             labels: Sequence[int] | None = None) -> InitPlan:
    """RDED-style scored crops: the first crop of each candidate is the whole image, the others random-resized."""
    select, size = spec.select, data.info.image_size
    all_pixels, origins = [], []
    for label, generator, members in per_class(data, seed, labels):
        idx = class_candidates(data, members, label, select.candidates, spec.ipc, generator, "init 'selected'")
        images = load_train(data, idx)
        n = len(idx)
        boxes = torch.empty(n, select.crops, 4)
        boxes[:, 0] = torch.tensor(full_box(size))
        if select.crops > 1:
            x0, y0, w, h = augment.sample_crop_boxes(n * (select.crops - 1), size, size, tuple(select.crop_scale),
                                                     CROP_RATIO, generator)
            boxes[:, 1:] = torch.stack([x0, y0, w, h], dim=1).view(n, select.crops - 1, 4)
        losses = crop_losses(teacher, images, label, boxes, runtime)
        best_loss, best_crop = losses.min(dim=1)
        keep = rank_positions(best_loss, spec.ipc, select.rank)
        kept_boxes = boxes[keep, best_crop[keep]]
        all_pixels.append(data.info.denormalize(crop_views(images[keep], kept_boxes)))
        origins.append([origin(data, "selected", int(idx[p]), tuple(b.tolist()), float(best_loss[p]))
                        for p, b in zip(keep, kept_boxes)])
    return InitPlan(torch.stack(all_pixels), origins)


@register_init("herding")
def herding(data: RealData, teacher: nn.Module, spec: RecoverSpec, runtime: Runtime, seed: int,
            labels: Sequence[int] | None = None) -> InitPlan:
    """Herding on the recovery teacher's features of `select.candidates` whole images per class."""
    size = data.info.image_size
    all_pixels, origins = [], []
    for label, generator, members in per_class(data, seed, labels):
        idx = class_candidates(data, members, label, spec.select.candidates, spec.ipc, generator, "init 'herding'")
        images = load_train(data, idx)
        _, features = teacher_outputs(teacher, images, runtime)
        keep = herding_positions(features, spec.ipc)
        all_pixels.append(data.info.denormalize(images[keep]))
        origins.append([origin(data, "herding", int(idx[p]), full_box(size), None) for p in keep])
    return InitPlan(torch.stack(all_pixels), origins)


@register_init("kmeans")
def kmeans(data: RealData, teacher: nn.Module, spec: RecoverSpec, runtime: Runtime, seed: int,
           labels: Sequence[int] | None = None) -> InitPlan:
    """The candidate nearest each of IPC k-means centroids of the recovery teacher's features, per class."""
    size = data.info.image_size
    all_pixels, origins = [], []
    for label, generator, members in per_class(data, seed, labels):
        idx = class_candidates(data, members, label, spec.select.candidates, spec.ipc, generator, "init 'kmeans'")
        images = load_train(data, idx)
        _, features = teacher_outputs(teacher, images, runtime)
        keep = kmeans_positions(features, spec.ipc, generator)
        all_pixels.append(data.info.denormalize(images[keep]))
        origins.append([origin(data, "kmeans", int(idx[p]), full_box(size), None) for p in keep])
    return InitPlan(torch.stack(all_pixels), origins)
