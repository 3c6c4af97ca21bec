"""What a student trains on, read where it trains: one process reads the whole set, a rank of a distributed
run reads only its shard (every world_size-th image), as uint8; the float copy is made per batch.

Sources: `distilled` (the written PNGs, read back from the output store through the manifest: what the user
gets), `baseline` (the random real subset of the same size), `full-data` (the whole training split,
DD-Ranking's full-data run; in-memory datasets only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scdd.artifacts import read_distilled
from scdd.data import RealData
from scdd.data.base import PixelSet
from scdd.layout import MANIFEST
from scdd.shard import Shard
from scdd.store import ArtifactStore
from scdd.validate.baseline import random_real_subset, whole_split

if TYPE_CHECKING:
    from api_schema import JobSpec

SOURCE_OF_STAGE = {"validate": "distilled", "validate-hard": "distilled", "baseline": "baseline",
                   "full-data": "full-data"}


def student_images(source: str, spec: JobSpec, data: RealData, store: ArtifactStore, shard: Shard | None = None,
                   workers: int = 0) -> PixelSet:
    """The images of `source` (or `shard`'s part) as a PixelSet; `workers` DataLoader workers decode real images."""
    if source == "distilled":
        return read_distilled(store, store.read_json(MANIFEST)["images"], data.info, shard)
    if source == "baseline":
        return random_real_subset(data.train, spec.recover.ipc, data.info.num_classes, spec.seed, shard, workers)
    if source == "full-data":
        return whole_split(data.train, shard)
    raise ValueError(f"unknown student image source {source!r}")
