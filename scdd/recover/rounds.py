"""Recover a whole distilled dataset, unit by unit, resumably.

Work is split in rounds: round r synthesises image r of every class. A round is cut into batches
of `batch_size` classes; a (round, batch) pair is a unit. Each unit has its own seed derived from
(seed, round, batch), so a unit's images do not depend on which units ran before it: a resumed
run produces the same files as an uninterrupted one. A finished unit writes its images first and
then a record `state/units/r<round>-b<batch>.json` (scdd/layout.py) (its manifest entries and losses); a rerun skips
every recorded unit and never rewrites its files.

With W workers (workers/recover.py) the classes are cut into W balanced contiguous slices; batch b
of a round holds the b-th run of `batch_size` classes of every slice: each worker synthesises a full
batch of its own slice per unit (a share may be short or empty at the end of a round), so W workers do
W times the work of one per step, and the BatchNorm statistics they share (bn_sync: global) are those of
the W x batch_size images. With W = 1 this is the single-process plan.

Images are written as PNG, or as JPEG where the job's output.image_format says so (`image_format_of`: the spec the
output records in `state/spec.json`, so a distributed worker that only gets the recover spec writes the same files).
With recover.augment.per "batch" every step draws one crop, flip and roll for the whole batch from a generator of its
own, seeded per unit and not per worker (`Unit.augment_seed`): every worker's share of a batch sees the same draw,
as the reference's single-process batch does.

The cut is fixed by the first recover of an output (`state/plan.json`): a resume on another worker
count (which the recover digest allows only where the images do not depend on it: no optimisation
steps, `JobSpec.images_depend_on_workers`) finds the same units, and each worker then makes every
share whose index is its rank modulo the worker count.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from scdd.artifacts import PNG, ImageEntry, ImageFormat, entry_for
from scdd.data.base import DatasetInfo
from scdd.errors import SpecError
from scdd.layout import PLAN_RECORD, SPEC_RECORD, UNITS_DIR, unit_record_path
from scdd.progress import Progress, SilentProgress
from scdd.recover.objective import RecoverObjective
from scdd.recover.init import InitReader, init_reader
from scdd.recover.synthesize import prepare_teacher, synthesize
from scdd.runtime import Runtime
from scdd.store import ArtifactStore

if TYPE_CHECKING:  # annotations only: the compute path imports without pydantic (bench/gpu_check.py)
    from api_schema import RecoverSpec


@dataclass(frozen=True)
class Unit:
    round: int
    batch: int
    shares: tuple[tuple[int, ...], ...]  # class positions synthesised by each worker (rank order)

    @property
    def labels(self) -> tuple[int, ...]:
        return tuple(label for share in self.shares for label in share)

    @property
    def name(self) -> str:
        return f"r{self.round:05d}-b{self.batch:05d}"

    @property
    def record_path(self) -> str:
        return unit_record_path(self.name)

    def seed(self, base_seed: int, rank: int = 0) -> int:
        """Seed of one worker's share (rank 0's is the single-process unit seed)."""
        key = f"{base_seed}:{self.round}:{self.batch}" + (f":{rank}" if rank else "")
        digest = hashlib.sha256(key.encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)

    def augment_seed(self, base_seed: int) -> int:
        """Seed of the unit's per-batch augmentation draws (recover.augment.per batch), the same on every worker."""
        digest = hashlib.sha256(f"{base_seed}:{self.round}:{self.batch}:augment".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def class_slices(num_classes: int, workers: int) -> list[range]:
    """W balanced contiguous slices of the classes (sizes differ by at most one)."""
    if workers > num_classes:
        raise SpecError(
            f"{workers} workers for {num_classes} classes: each worker needs a class of its own; "
            f"use at most {num_classes} workers"
        )
    base, extra = divmod(num_classes, workers)
    starts = [w * base + min(w, extra) for w in range(workers + 1)]
    return [range(starts[w], starts[w + 1]) for w in range(workers)]


def plan_units(num_classes: int, ipc: int, batch_size: int, workers: int = 1) -> list[Unit]:
    """Every unit of a run: `ipc` rounds, each cut in batches of up to `batch_size` classes per worker."""
    slices = class_slices(num_classes, workers)
    per_worker = batch_size
    batches = math.ceil(max(len(s) for s in slices) / per_worker)
    return [
        Unit(r, b, tuple(tuple(s[b * per_worker:(b + 1) * per_worker]) for s in slices))
        for r in range(ipc)
        for b in range(batches)
    ]


def plan_cut(store: ArtifactStore, workers: int) -> int:
    """The worker count the output's units are cut for: the one recorded by its first recover, else `workers`
    (recorded now). An output from before the record has the cut of its spec's worker count, which the recover
    digest kept equal to `workers` wherever the cut mattered."""
    if store.exists(PLAN_RECORD):
        return int(store.read_json(PLAN_RECORD)["workers"])
    store.write_json(PLAN_RECORD, {"workers": workers})
    return workers


def recover_plan(store: ArtifactStore, num_classes: int, spec: RecoverSpec, workers: int) -> list[Unit]:
    """Every unit of the run in `store`, cut as its first recover cut them (`plan_cut`), for `workers` workers
    now. A cut for another worker count is run only without optimisation steps: with steps, each share's
    seed and the statistics it shares depend on its worker (the recover digest refuses such a resume)."""
    cut = plan_cut(store, workers)
    if cut != workers and spec.iterations > 0:
        raise SpecError(f"output {store.url} holds recover units cut for {cut} workers, and with recover.iterations "
                        f"{spec.iterations} > 0 the images depend on the worker count: resume with {cut} workers")
    return plan_units(num_classes, spec.ipc, spec.batch_size, cut)


def image_format_of(store: ArtifactStore | None) -> ImageFormat:
    """The image format of the job whose output `store` is: its spec as `state/spec.json` records it (png where the
    record is absent or does not say)."""
    if store is None or not store.exists(SPEC_RECORD):
        return PNG
    return ImageFormat.of(store.read_json(SPEC_RECORD).get("spec"))


def shares_of(unit: Unit, rank: int, workers: int) -> list[int]:
    """The share indices worker `rank` of `workers` makes: its own (the cut's worker count is `workers`), or every
    `workers`-th share from `rank` on (a resume on another worker count)."""
    return list(range(rank, len(unit.shares), workers))


def merge_shares(unit: Unit, parts: list[dict], synced: bool) -> dict:
    """The unit record from the records of its shares (one per share, in share order)."""
    entries = sorted((e for part in parts for e in part["entries"]), key=lambda e: (e["label"], e["round"]))
    if synced:  # every share reports the losses of the whole batch
        losses = {key: parts[0][key] for key in ("ce", "bn", "total")}
    else:  # each share's own batch: weigh by its images
        sizes = [len(share) for share in unit.shares]
        images = max(1, sum(sizes))
        losses = {key: sum(p[key] * n for p, n in zip(parts, sizes)) / images for key in ("ce", "bn", "total")}
    return {"round": unit.round, "batch": unit.batch, "workers": len(parts), "bn_sync": "global" if synced else "local",
            "entries": entries, **losses, "seconds": max(p["seconds"] for p in parts)}


@dataclass
class RecoverResult:
    entries: list[ImageEntry]
    units_run: int
    units_resumed: int
    seconds: float  # time spent synthesising in this run
    image_iterations: int  # images x iterations synthesised in this run
    final_ce: float  # mean over all units of the last step's losses
    final_bn: float
    restarts: list[dict] = field(default_factory=list)  # distributed runs: worker groups re-formed, and why

    @property
    def image_iterations_per_second(self) -> float:
        return self.image_iterations / self.seconds if self.seconds > 0 else 0.0


def run_share(
    unit: Unit,
    rank: int,
    teacher: nn.Module | list[nn.Module],
    info: DatasetInfo,
    spec: RecoverSpec,
    runtime: Runtime,
    seed: int,
    objective: RecoverObjective,
    progress: Progress,
    store: ArtifactStore | None,
    init: InitReader | None = None,
    image_format: ImageFormat | None = None,
) -> dict:
    """Synthesise worker `rank`'s share of one unit and write its images to `store` (None: compute
    only, for a worker whose share is already stored but whose peers need it in the collectives).
    `init` reads the run's stored initial images (real-pixel inits; None: noise). `image_format`: how the
    images are written (None: `image_format_of(store)`). Returns the share's record: manifest entries (with
    each image's origin) and the batch's last-step losses."""
    started = time.perf_counter()
    labels = unit.shares[rank]
    if not labels and not objective.scope.collective:  # nothing to make, and no peer waits for this rank
        return {"round": unit.round, "batch": unit.batch, "rank": rank, "entries": [],
                "ce": 0.0, "bn": 0.0, "total": 0.0, "seconds": 0.0}
    generator = torch.Generator().manual_seed(unit.seed(seed, rank))
    start = info.normalize(init.pixels(unit.round, labels)) if init is not None and labels else None
    shared = spec.augment.per == "batch"  # one draw per step for the whole batch, whichever worker holds a share
    augment_generator = torch.Generator().manual_seed(unit.augment_seed(seed)) if shared else None
    result = synthesize(
        teacher,
        torch.tensor(labels, dtype=torch.long),
        spec,
        info.pixel_bounds(),
        (info.channels, info.image_size, info.image_size),
        runtime,
        generator,
        objective,
        on_step=lambda step: progress.advance(1),
        start=start,
        augment_generator=augment_generator,
    )
    entries = []
    if store is not None:
        image_format = image_format or image_format_of(store)
        for label, image in zip(labels, info.denormalize(result.images)):
            data = image_format.encode(image)
            origin = init.origin(label, unit.round) if init is not None else None
            entry = entry_for(info, label, unit.round, data, rank, origin, image_format)
            store.write_bytes(entry.path, data)
            entries.append(entry.to_dict())
    return {
        "round": unit.round,
        "batch": unit.batch,
        "rank": rank,
        "entries": entries,
        "ce": result.ce,
        "bn": result.bn,
        "total": result.total,
        "seconds": time.perf_counter() - started,
    }


def pending_units(store: ArtifactStore, units: list[Unit]) -> list[Unit]:
    done = set(store.list(UNITS_DIR))
    return [u for u in units if u.record_path not in done]


def collect_result(store: ArtifactStore, units: list[Unit], units_run: int, seconds: float, image_iterations: int) -> RecoverResult:
    """The entries of every recorded unit, and this run's counts."""
    recorded = set(store.list(UNITS_DIR))
    records = [store.read_json(u.record_path) for u in units if u.record_path in recorded]
    entries = [ImageEntry(**e) for rec in records for e in rec["entries"]]
    entries.sort(key=lambda e: (e.label, e.round))
    return RecoverResult(
        entries=entries,
        units_run=units_run,
        units_resumed=len(records) - units_run,
        seconds=seconds,
        image_iterations=image_iterations,
        final_ce=sum(r["ce"] for r in records) / max(1, len(records)),
        final_bn=sum(r["bn"] for r in records) / max(1, len(records)),
    )


def recover_dataset(
    teacher: nn.Module,
    info: DatasetInfo,
    spec: RecoverSpec,
    runtime: Runtime,
    store: ArtifactStore,
    seed: int,
    progress: Progress | None = None,
    max_units: int | None = None,
    image_format: ImageFormat | None = None,
) -> RecoverResult:
    """Run, in this process, every unit not yet recorded in `store` (at most `max_units` of them,
    for tests and time-boxed runs) and return the entries of all recorded units. `teacher` is
    frozen here. `image_format`: how the images are written (None: the job's, `image_format_of(store)`)."""
    progress = progress or SilentProgress()
    units = recover_plan(store, info.num_classes, spec, 1)
    pending = pending_units(store, units)
    if max_units is not None:
        pending = pending[:max_units]
    progress.start("recover", len(pending) * spec.iterations, "it")
    started = time.perf_counter()
    image_iterations = 0
    if pending:
        runner = prepare_teacher(teacher, runtime, len(pending[0].labels) * spec.iterations)
        init = init_reader(store, spec.init)
        image_format = image_format or image_format_of(store)
        with RecoverObjective(teacher, spec.first_bn_multiplier, momentum=spec.stat_momentum) as objective:
            for unit in pending:
                if len(unit.shares) == 1:  # the single-process cut: its record as it always was
                    record = run_share(unit, 0, runner, info, spec, runtime, seed, objective, progress, store, init,
                                       image_format)
                else:  # a resume of a multi-worker cut (no optimisation steps): every share here
                    record = merge_shares(unit, [run_share(unit, share, runner, info, spec, runtime, seed, objective,
                                                           progress, store, init, image_format)
                                                 for share in range(len(unit.shares))], synced=False)
                store.write_json(unit.record_path, record)
                image_iterations += len(unit.labels) * spec.iterations
                progress.advance(0, ce=record["ce"], bn=record["bn"])
    seconds = time.perf_counter() - started
    progress.finish()
    return collect_result(store, units, len(pending), seconds, image_iterations)
