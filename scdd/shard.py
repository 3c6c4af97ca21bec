"""Data-parallel training support for the training loops (squeeze, SSL, validation).

A loop runs in one process by default. Run data-parallel (Ray Train gives each worker a rank in a
torch process group), it gets `TrainHooks` with this process's `Shard`, a `wrap` that makes the
trained module DDP, a state to `resume` from, and an `on_epoch_end` that checkpoints. Each rank
then takes its DistributedSampler part of every epoch in batches of ceil(batch_size / W), so a
step's global batch is the single-process one, and DDP averages the gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from scdd.optim import lr_schedule
from scdd.progress import Progress


@dataclass(frozen=True)
class Shard:
    """This process's rank among `world_size` processes of the default torch process group."""

    rank: int
    world_size: int

    def indices(self, n: int) -> range:
        """Every world_size-th sample from `rank`: the shards cover 0..n-1 once, none padded."""
        return range(self.rank, n, self.world_size)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over the group (a collective: every rank calls it)."""
        values = values.clone()
        dist.all_reduce(values)
        return values

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's `values` (same shape on each), concatenated in rank order along dim 0."""
        parts = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(parts, values.contiguous())
        return torch.cat(parts)


def rank_batch(batch_size: int, n: int, world_size: int, min_rank_batch: int = 1) -> int:
    """One rank's batch for a global `batch_size` over an n-sample set on `world_size` ranks: ceil(batch_size / W),
    raised to `min_rank_batch` (at most `batch_size`) when each rank's part holds at least 4 batches of that size."""
    per_rank = math.ceil(batch_size / world_size)
    floor = min(min_rank_batch, batch_size)
    if per_rank < floor and math.ceil(n / world_size) >= 4 * floor:
        return floor
    return per_rank


@dataclass(frozen=True)
class EpochEnd:
    epoch: int  # 0-based, just finished
    loss: float  # mean training loss of the epoch on this rank
    state: dict[str, Any]  # everything the loop needs to go on after this epoch (`TrainHooks.resume`)


def _unwrapped(module: nn.Module) -> nn.Module:
    return module


@dataclass
class TrainHooks:
    shard: Shard | None = None
    wrap: Callable[[nn.Module], nn.Module] = _unwrapped  # e.g. DistributedDataParallel
    resume: dict[str, Any] | None = None  # an EpochEnd.state
    on_epoch_end: Callable[[EpochEnd], None] | None = None
    losses: list[float] = field(default_factory=list)  # this rank's epoch losses so far (with on_epoch_end)

    def schedule(self, optimizer: torch.optim.Optimizer, n: int, batch_size: int, epochs: int,
                 span: float = 1.0, min_rank_batch: int = 1, warmup_epochs: int = 0,
                 unit: str = "step") -> tuple[int, int, Any]:
        """This rank's batch size, its steps per epoch over n samples, and the schedule stepped per batch
        (`span`: see `cosine_factor`; `warmup_epochs` and `unit`: see `scdd.optim.lr_schedule`). Data-parallel,
        a step's global batch is the single-process one (ceil(batch_size / W) per rank), except that a rank's
        batch never falls below `min_rank_batch` while its part of the set holds at least 4 such batches (many
        ranks on a large set: the global batch then grows to W x min_rank_batch, see `rank_batch`)."""
        if self.shard is not None:
            batch_size = rank_batch(batch_size, n, self.shard.world_size, min_rank_batch)
            n = len(DistributedSampler(range(n), self.shard.world_size, self.shard.rank))
        steps_per_epoch = math.ceil(n / batch_size)
        return batch_size, steps_per_epoch, lr_schedule(optimizer, epochs, steps_per_epoch, span, warmup_epochs, unit)

    def begin(self, progress: Progress, stage: str, epochs: int, steps_per_epoch: int, *stateful: Any) -> int:
        """Resume the loop's stateful objects when resuming, start its progress; the first epoch to run."""
        first_epoch = self.first_epoch(*stateful)
        progress.start(stage, epochs * steps_per_epoch, "batch")
        progress.advance(first_epoch * steps_per_epoch)
        return first_epoch

    def epoch_order(self, n: int, epoch: int, generator: torch.Generator, seed: int) -> torch.Tensor:
        """This rank's sample order for one epoch: a permutation of all n in one process; with a
        shard, its DistributedSampler part (equally long on every rank, as DDP requires), and the
        generator reseeded per (rank, epoch) so ranks draw differently and a resumed run repeats
        the draws."""
        if self.shard is None:
            return torch.randperm(n, generator=generator)
        generator.manual_seed(seed + 1_000_003 * self.shard.rank + 7_919 * epoch)
        sampler = DistributedSampler(range(n), self.shard.world_size, self.shard.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), dtype=torch.long)

    def shard_order(self, held: int, total: int, epoch: int, generator: torch.Generator, seed: int) -> torch.Tensor:
        """This rank's sample order for one epoch over the `held` samples it holds of a `total`-sample set that
        is sharded (every world_size-th sample per rank, scdd.validate.student_images): a permutation of all
        in one process (`held` == `total`); with a shard, a permutation of its own samples, padded by
        wrapping to ceil(total / world_size) (equally long on every rank, as DDP requires), the generator
        reseeded per (rank, epoch) so ranks draw differently and a resumed run repeats the draws. Ranks
        never exchange images: each reads only its shard."""
        if self.shard is None:
            return torch.randperm(held, generator=generator)
        if held == 0:
            raise ValueError(f"rank {self.shard.rank} holds no images of a {total}-image set: use at most {total} workers")
        generator.manual_seed(seed + 1_000_003 * self.shard.rank + 7_919 * epoch)
        order = torch.randperm(held, generator=generator)
        return order[torch.arange(math.ceil(total / self.shard.world_size)) % held]

    def first_epoch(self, *stateful: Any) -> int:
        """Load the resume state into the loop's stateful objects (model, optimizer, scheduler,
        generator, in the order the loop saves them) and return the epoch to start at."""
        self.losses = list(self.resume["losses"]) if self.resume is not None else []
        if self.resume is None:
            return 0
        for obj, state in zip(stateful, self.resume["objects"]):
            obj.set_state(state) if isinstance(obj, torch.Generator) else obj.load_state_dict(state)
        return self.resume["epoch"] + 1

    def end_epoch(self, epoch: int, loss: float, *stateful: Any) -> None:
        if self.on_epoch_end is not None:
            self.losses.append(loss)
            objects = [obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict() for obj in stateful]
            self.on_epoch_end(EpochEnd(epoch, loss, {"epoch": epoch, "objects": objects, "losses": list(self.losses)}))


LOCAL = TrainHooks()
