"""Recover a whole distilled dataset, unit by unit, resumably.

Work is split in rounds: round r synthesises image r of every class. A round is cut into batches
of `batch_size` classes; a (round, batch) pair is a unit. Each unit has its own seed derived from
(seed, round, batch), so a unit's images do not depend on which units ran before it: a resumed
run produces the same files as an uninterrupted one. A finished unit writes its images first and
then a record `state/units/r<round>-b<batch>.json` (its manifest entries and losses); a rerun skips
every recorded unit and never rewrites its files.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from api_schema import RecoverSpec
from scdd.artifacts import ImageEntry, encode_png, entry_for
from scdd.data.base import DatasetInfo
from scdd.progress import Progress, SilentProgress
from scdd.recover.bn_loss import BatchStats, BNStatLoss, local_batch_stats
from scdd.recover.synthesize import prepare_teacher, synthesize
from scdd.runtime import Runtime
from scdd.store import ArtifactStore

UNITS_DIR = "state/units"


@dataclass(frozen=True)
class Unit:
    round: int
    batch: int
    labels: tuple[int, ...]  # class positions synthesised by this unit

    @property
    def record_path(self) -> str:
        return f"{UNITS_DIR}/r{self.round:05d}-b{self.batch:05d}.json"

    def seed(self, base_seed: int) -> int:
        digest = hashlib.sha256(f"{base_seed}:{self.round}:{self.batch}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def plan_units(num_classes: int, ipc: int, batch_size: int) -> list[Unit]:
    batches = [tuple(range(start, min(start + batch_size, num_classes))) for start in range(0, num_classes, batch_size)]
    return [Unit(r, b, labels) for r in range(ipc) for b, labels in enumerate(batches)]


@dataclass
class RecoverResult:
    entries: list[ImageEntry]
    units_run: int
    units_resumed: int
    seconds: float  # time spent synthesising in this run
    image_iterations: int  # images x iterations synthesised in this run
    final_ce: float  # mean over all units of the last step's losses
    final_bn: float

    @property
    def image_iterations_per_second(self) -> float:
        return self.image_iterations / self.seconds if self.seconds > 0 else 0.0


def run_unit(
    unit: Unit,
    teacher: nn.Module,
    info: DatasetInfo,
    spec: RecoverSpec,
    runtime: Runtime,
    store: ArtifactStore,
    seed: int,
    bn_loss: BNStatLoss,
    progress: Progress,
) -> dict:
    """Synthesise one unit, write its images, then its record. Returns the record."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(unit.seed(seed))
    result = synthesize(
        teacher,
        torch.tensor(unit.labels),
        spec,
        info.pixel_bounds(),
        (info.channels, info.image_size, info.image_size),
        runtime,
        generator,
        bn_loss,
        on_step=lambda step: progress.advance(1),
    )
    pixels = info.denormalize(result.images)
    entries = []
    for label, image in zip(unit.labels, pixels):
        data = encode_png(image)
        entry = entry_for(info, label, unit.round, data)
        store.write_bytes(entry.path, data)
        entries.append(entry.to_dict())
    record = {
        "round": unit.round,
        "batch": unit.batch,
        "entries": entries,
        "ce": result.ce,
        "bn": result.bn,
        "total": result.total,
        "seconds": time.perf_counter() - started,
    }
    store.write_json(unit.record_path, record)
    return record


def recover_dataset(
    teacher: nn.Module,
    info: DatasetInfo,
    spec: RecoverSpec,
    runtime: Runtime,
    store: ArtifactStore,
    seed: int,
    progress: Progress | None = None,
    max_units: int | None = None,
    batch_stats: BatchStats = local_batch_stats,
) -> RecoverResult:
    """Run every unit not yet recorded in `store` (at most `max_units` of them, for tests and
    time-boxed runs) and return the entries of all recorded units. `teacher` is frozen here."""
    progress = progress or SilentProgress()
    units = plan_units(info.num_classes, spec.ipc, spec.batch_size)
    done = set(store.list(UNITS_DIR))
    pending = [u for u in units if u.record_path not in done]
    if max_units is not None:
        pending = pending[:max_units]
    progress.start("recover", len(pending) * spec.iterations, "it")
    started = time.perf_counter()
    image_iterations = 0
    if pending:
        runner = prepare_teacher(teacher, runtime, len(pending[0].labels) * spec.iterations)
        with BNStatLoss(teacher, spec.first_bn_multiplier, batch_stats) as bn_loss:
            for unit in pending:
                record = run_unit(unit, runner, info, spec, runtime, store, seed, bn_loss, progress)
                image_iterations += len(unit.labels) * spec.iterations
                progress.advance(0, ce=record["ce"], bn=record["bn"])
    seconds = time.perf_counter() - started
    progress.finish()

    recorded = set(store.list(UNITS_DIR))
    records = [store.read_json(u.record_path) for u in units if u.record_path in recorded]
    entries = [ImageEntry(**e) for rec in records for e in rec["entries"]]
    entries.sort(key=lambda e: (e.label, e.round))
    return RecoverResult(
        entries=entries,
        units_run=len(pending),
        units_resumed=len(records) - len(pending),
        seconds=seconds,
        image_iterations=image_iterations,
        final_ce=sum(r["ce"] for r in records) / max(1, len(records)),
        final_bn=sum(r["bn"] for r in records) / max(1, len(records)),
    )
