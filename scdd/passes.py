"""Passes over images that run where the data is — per rank shard or class slice, on the backend's workers —
so the driver only coordinates (DESIGN.md, "The data plane"). `LocalBackend` runs a pass in this process as
the only worker (rank 0 of 1), `workers.backend.RayBackend` as one Ray task per worker, each holding one GPU
(or `resources.threads` CPUs); the code is the same.

A pass is a module-level function `fn(ctx: PassContext, *args)` returning something small (counts, a
number); the driver combines the ranks' results. What it reads (the teacher, the test split, the written
images) it reads itself, from the store or the dataset, and what it makes it writes to the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from scdd.artifacts import render_grid
from scdd.data import RealData, load_dataset
from scdd.evaluate import Accuracy, evaluate
from scdd.layout import GRID, MANIFEST, TEACHER_PATH
from scdd.models import members_of, model_from_checkpoint
from scdd.recover.init import plan_init_classes
from scdd.recover.rounds import class_slices
from scdd.recover.synthesize import freeze
from scdd.runtime import Runtime
from scdd.shard import Shard
from scdd.store import ArtifactStore

if TYPE_CHECKING:
    from api_schema import JobSpec

PassFn = Callable[..., Any]


@dataclass
class PassContext:
    """Where a pass runs: its rank among the pass's workers, the job, its output store and the runtime."""

    shard: Shard
    spec: JobSpec
    store: ArtifactStore
    runtime: Runtime
    decode_workers: int = 0  # DataLoader workers that decode real images
    loaded: RealData | None = field(default=None, repr=False)

    def data(self) -> RealData:
        """The job's dataset (its index only: images are decoded when a pass reads them)."""
        if self.loaded is None:
            self.loaded = load_dataset(self.spec.dataset, self.spec.seed)
        return self.loaded

    def model(self, path: str):
        """The model saved at `path` in the store, frozen on this worker's device."""
        model, _ = model_from_checkpoint(self.store.read_bytes(path), self.store.url_of(path))
        return freeze(model, self.runtime)


def accuracy_counts(ctx: PassContext, path: str) -> list[list[int]]:
    """(top-1 hits, top-k hits, samples) on this rank's shard of the test split, of the model at `path` and
    then of each ensemble member (none for a single model)."""
    model = ctx.model(path)
    test = ctx.data().test
    indices = ctx.shard.indices(len(test))
    counts = [list(evaluate(model, test, ctx.runtime, indices=indices, workers=ctx.decode_workers).counts())]
    members = members_of(model)
    if len(members) > 1:
        counts += [list(evaluate(m, test, ctx.runtime, indices=indices, workers=ctx.decode_workers).counts())
                   for m in members]
    return counts


def combine_accuracy(parts: list[list[list[int]]]) -> list[Accuracy]:
    """The ranks' `accuracy_counts` -> the model's accuracy, then each member's, over the whole test split."""
    return [Accuracy.combine([part[i] for part in parts]) for i in range(len(parts[0]))]


def plan_init_slice(ctx: PassContext) -> int:
    """Plan the real-pixel initialisation of this rank's class slice (scdd/recover/init); the classes planned."""
    data = ctx.data()
    classes = data.info.num_classes
    slices = class_slices(classes, min(ctx.shard.world_size, classes))
    if ctx.shard.rank >= len(slices):
        return 0
    return plan_init_classes(data, ctx.model(TEACHER_PATH), ctx.spec.recover, ctx.runtime, ctx.spec.seed, ctx.store,
                             slices[ctx.shard.rank])


def write_grid(ctx: PassContext) -> int:
    """grid.png from the images in the store (run on one worker); the bytes written."""
    data = render_grid(ctx.store, ctx.store.read_json(MANIFEST)["images"], ctx.data().info,
                       ctx.spec.output.grid_per_class)
    ctx.store.write_bytes(GRID, data)
    return len(data)
