"""What a student trains on, read where it trains: one process reads the whole set, a rank of a distributed
run reads only its shard (every world_size-th image), as uint8; the float copy is made per batch.

Sources: `distilled` (the written PNGs, read back from the output store through the manifest: what the user
gets), `baseline` (the random real subset of the same size), `full-data` (the whole training split,
DD-Ranking's full-data run; in-memory datasets only). A job of kind evaluate judges a set that exists:
`external` (the set at evaluate.images, scdd/validate/external_set.py) and `external-baseline` (random real
images, as many of each class as the set holds) stand for `distilled` and `baseline` (`source_of`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from scdd.artifacts import read_distilled
from scdd.data import RealData
from scdd.data.base import PixelSet, class_members
from scdd.layout import MANIFEST
from scdd.shard import Shard
from scdd.store import ArtifactStore
from scdd.validate.baseline import draw_class, labels_of, pixels_at, random_real_subset, shard_of, whole_split
from scdd.validate.external_set import index_external_set, read_external

if TYPE_CHECKING:
    from api_schema import JobSpec

SOURCE_OF_STAGE = {"validate": "distilled", "validate-hard": "distilled", "baseline": "baseline",
                   "full-data": "full-data"}
EVALUATE_SOURCES = {"distilled": "external", "baseline": "external-baseline"}  # kind evaluate


def source_of(stage: str, spec: JobSpec) -> str:
    """The images a student run of `stage` trains on in a job of `spec` (kind evaluate: the set it judges)."""
    source = SOURCE_OF_STAGE[stage]
    return EVALUATE_SOURCES.get(source, source) if spec.kind == "evaluate" else source


def random_real_like(data: RealData, counts: tuple[int, ...], seed: int, shard: Shard | None = None,
                     workers: int = 0) -> PixelSet:
    """Random real training images, `counts[c]` of class c, drawn as `random_real_subset` draws (equal counts give
    its very subset), or `shard`'s part of them."""
    generator = torch.Generator().manual_seed(seed)
    members = class_members(labels_of(data.train), data.info.num_classes)
    index = torch.cat([draw_class(
        members[label], label, count, count, generator,
        lambda label, have, count=count: f"class {data.info.class_names[label]!r} has {have} training images, "
        f"fewer than the {count} the set holds: the random-real baseline needs as many; raise dataset.train_limit or "
        f"set validate.baseline: false") for label, count in enumerate(counts)])
    return pixels_at(data.train, shard_of(index, shard), len(index) if shard is not None else None, workers)


def student_images(source: str, spec: JobSpec, data: RealData, store: ArtifactStore, shard: Shard | None = None,
                   workers: int = 0) -> PixelSet:
    """The images of `source` (or `shard`'s part) as a PixelSet; `workers` DataLoader workers decode real images."""
    if source == "distilled":
        return read_distilled(store, store.read_json(MANIFEST)["images"], data.info, shard)
    if source == "baseline":
        return random_real_subset(data.train, spec.recover.ipc, data.info.num_classes, spec.seed, shard, workers)
    if source == "full-data":
        return whole_split(data.train, shard)
    if source in ("external", "external-baseline"):
        found = index_external_set(spec.evaluate.images, data.info, spec)
        if source == "external":
            return read_external(found, data.info, shard)
        return random_real_like(data, found.counts, spec.seed, shard, workers)
    raise ValueError(f"unknown student image source {source!r}")
