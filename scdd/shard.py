"""This process's part of a data-parallel job: its rank among `world_size` processes of the
default torch process group (set up by Ray Train, or by a test)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
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
